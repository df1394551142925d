"""Bounded in-memory caches with pluggable eviction policies, ttl, stats and miss-ratio analysis.

``from kotoba_memory.cache_manager import CacheManager, CachePolicy, CachedValue, CacheMetadata``
"""

from __future__ import annotations

from kotoba_memory.cache_manager.base import BaseCache, iter_caches
from kotoba_memory.cache_manager.manager import CacheManager, EvictionListener
from kotoba_memory.cache_manager.policies import EvictionPolicy
from kotoba_memory.cache_manager.types import (
    CacheAnalysis,
    CachedValue,
    CacheError,
    CacheMetadata,
    CachePolicy,
    CacheStats,
    EntryTooLargeError,
    EvictionCause,
    UnhashableKeyError,
)
from kotoba_memory.cache_manager.weigher import default_weigher, estimate_size

__all__ = [
    "BaseCache",
    "CacheAnalysis",
    "CacheError",
    "CacheManager",
    "CacheMetadata",
    "CachePolicy",
    "CacheStats",
    "CachedValue",
    "EntryTooLargeError",
    "EvictionCause",
    "EvictionListener",
    "EvictionPolicy",
    "UnhashableKeyError",
    "default_weigher",
    "estimate_size",
    "iter_caches",
]
