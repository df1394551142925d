"""Allocators: ``AllocatorType``, in-process allocators taking a ``Layout``, process-level malloc control."""

from __future__ import annotations

from kotoba_memory.allocators.inprocess import (
    Allocation,
    Allocator,
    AllocatorStats,
    ArenaAllocator,
    Layout,
    LayoutError,
    MonitoredAllocator,
    PoolAllocator,
    SystemAllocator,
    create_custom_allocator,
    create_monitored_allocator,
)
from kotoba_memory.allocators.process import (
    AllocatorInfo,
    AllocatorNotFoundError,
    ArenaAdvice,
    HeapStats,
    ProcessAllocatorStats,
    TrimResult,
    allocator_stats,
    amalloc_trim,
    configure_glibc_malloc,
    detect_allocator,
    find_allocator_library,
    heap_stats,
    malloc_arena_advice,
    malloc_trim,
)
from kotoba_memory.allocators.types import AllocatorType

__all__ = [
    "Allocation",
    "Allocator",
    "AllocatorInfo",
    "AllocatorNotFoundError",
    "AllocatorStats",
    "AllocatorType",
    "ArenaAdvice",
    "ArenaAllocator",
    "HeapStats",
    "Layout",
    "LayoutError",
    "MonitoredAllocator",
    "PoolAllocator",
    "ProcessAllocatorStats",
    "SystemAllocator",
    "TrimResult",
    "allocator_stats",
    "amalloc_trim",
    "configure_glibc_malloc",
    "create_custom_allocator",
    "create_monitored_allocator",
    "detect_allocator",
    "find_allocator_library",
    "heap_stats",
    "malloc_arena_advice",
    "malloc_trim",
]
