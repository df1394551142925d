"""Former name of :mod:`kotoba_memory.cache_manager.memory` (the in-memory cache); kept for imports."""

from kotoba_memory.cache_manager.memory import CacheManager, EvictionListener

__all__ = ["CacheManager", "EvictionListener"]
