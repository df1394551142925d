"""Bounded in-memory caches with pluggable eviction policies, ttl, stats and miss-ratio analysis.

``from kotoba_memory.cache_manager import CacheManager, CachePolicy, CachedValue, CacheMetadata``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kotoba_memory.cache_manager.base import BaseCache, iter_caches
from kotoba_memory.cache_manager.memory import CacheManager, EvictionListener
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

if TYPE_CHECKING:
    from kotoba_memory.cache_manager.compression import (
        Codec,
        CompressionError,
        CompressionStats,
        Compressor,
        ZlibCodec,
        ZstdCodec,
        available_codecs,
        get_codec,
    )
    from kotoba_memory.cache_manager.disk import (
        DiskCache,
        DiskCacheError,
        DiskCacheStats,
        DiskFullError,
        DiskHit,
    )
    from kotoba_memory.cache_manager.near import CacheUnavailableError, NearCache, NearCacheStats
    from kotoba_memory.cache_manager.redis_tier import RedisCache, RedisCacheStats, Serializer
    from kotoba_memory.cache_manager.tiers import TieredCache, TieredCacheStats

# The tiers (disk, Redis, compression) load on first use, so importing the in-memory cache stays cheap.
_LAZY = {
    **dict.fromkeys(
        (
            "Codec",
            "CompressionError",
            "CompressionStats",
            "Compressor",
            "ZlibCodec",
            "ZstdCodec",
            "available_codecs",
            "get_codec",
        ),
        "kotoba_memory.cache_manager.compression",
    ),
    **dict.fromkeys(
        ("DiskCache", "DiskCacheError", "DiskCacheStats", "DiskFullError", "DiskHit"),
        "kotoba_memory.cache_manager.disk",
    ),
    **dict.fromkeys(
        ("RedisCache", "RedisCacheStats", "Serializer"), "kotoba_memory.cache_manager.redis_tier"
    ),
    **dict.fromkeys(("TieredCache", "TieredCacheStats"), "kotoba_memory.cache_manager.tiers"),
    **dict.fromkeys(
        ("CacheUnavailableError", "NearCache", "NearCacheStats"), "kotoba_memory.cache_manager.near"
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kotoba_memory.cache_manager' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BaseCache",
    "CacheAnalysis",
    "CacheError",
    "CacheManager",
    "CacheMetadata",
    "CachePolicy",
    "CacheStats",
    "CacheUnavailableError",
    "CachedValue",
    "Codec",
    "CompressionError",
    "CompressionStats",
    "Compressor",
    "DiskCache",
    "DiskCacheError",
    "DiskCacheStats",
    "DiskFullError",
    "DiskHit",
    "EntryTooLargeError",
    "EvictionCause",
    "EvictionListener",
    "EvictionPolicy",
    "NearCache",
    "NearCacheStats",
    "RedisCache",
    "RedisCacheStats",
    "Serializer",
    "TieredCache",
    "TieredCacheStats",
    "UnhashableKeyError",
    "ZlibCodec",
    "ZstdCodec",
    "available_codecs",
    "default_weigher",
    "estimate_size",
    "get_codec",
    "iter_caches",
]
