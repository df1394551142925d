"""Memory pools: a reserved ``MemoryPool`` (slabs + buddy blocks), bump ``Arena`` s and ``ObjectPool`` s."""

from __future__ import annotations

from kotoba_memory.memory_pool.arena import Arena, ArenaStats
from kotoba_memory.memory_pool.errors import (
    BlockInUseError,
    BlockReleasedError,
    PoolClosedError,
    PoolCorruptedError,
    PoolError,
    PoolExhausted,
)
from kotoba_memory.memory_pool.object_pool import ObjectPool, ObjectPoolStats
from kotoba_memory.memory_pool.pool import (
    DefragmentResult,
    FallbackPolicy,
    MemoryBlock,
    MemoryPool,
    PoolStats,
    iter_pools,
)
from kotoba_memory.memory_pool.size_classes import SizeClasses

__all__ = [
    "Arena",
    "ArenaStats",
    "BlockInUseError",
    "BlockReleasedError",
    "DefragmentResult",
    "FallbackPolicy",
    "MemoryBlock",
    "MemoryPool",
    "ObjectPool",
    "ObjectPoolStats",
    "PoolClosedError",
    "PoolCorruptedError",
    "PoolError",
    "PoolExhausted",
    "PoolStats",
    "SizeClasses",
    "iter_pools",
]
