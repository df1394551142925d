"""kotoba-memory: make a Python service's memory visible, bounded and cheaper.

The framework-neutral core. Submodules are imported lazily, so ``import kotoba_memory`` is cheap and
pulls in no web framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kotoba_memory._version import __version__
from kotoba_memory.errors import ConfigError, ConfigTypeError, KotobaMemoryError

if TYPE_CHECKING:
    from kotoba_memory.allocators import AllocatorType
    from kotoba_memory.cache_manager import CacheManager, CachePolicy
    from kotoba_memory.config import MemoryConfig
    from kotoba_memory.gc_optimizer import GcOptimizer
    from kotoba_memory.memory_pool import MemoryPool
    from kotoba_memory.memory_profiler import MemoryProfiler
    from kotoba_memory.optimizer import MemoryOptimizer

_LAZY = {
    "AllocatorType": "kotoba_memory.allocators",
    "CacheManager": "kotoba_memory.cache_manager",
    "CachePolicy": "kotoba_memory.cache_manager",
    "MemoryConfig": "kotoba_memory.config",
    "GcOptimizer": "kotoba_memory.gc_optimizer",
    "MemoryPool": "kotoba_memory.memory_pool",
    "MemoryProfiler": "kotoba_memory.memory_profiler",
    "MemoryOptimizer": "kotoba_memory.optimizer",
}

__all__ = [
    "AllocatorType",
    "CacheManager",
    "CachePolicy",
    "ConfigError",
    "ConfigTypeError",
    "GcOptimizer",
    "KotobaMemoryError",
    "MemoryConfig",
    "MemoryOptimizer",
    "MemoryPool",
    "MemoryProfiler",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kotoba_memory' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
