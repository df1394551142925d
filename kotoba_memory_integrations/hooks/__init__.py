"""wrapt-based hooks: ``@cached``, ``@track_memory`` and runtime ``instrument``/``uninstrument``.

``@cached(cache, ttl=..., key=...)`` memoises a function, method, classmethod, staticmethod or coroutine
function in any kotoba-memory ``BaseCache``, with per-key stampede protection (the cache's
``get_or_set``/``aget_or_set``). ``@track_memory`` measures what each call allocates and keeps a bounded
per-function aggregate (``wrapper.memory_stats()``). ``instrument("pkg.module:Class.method", ...)`` applies
either of them (or any wrapt wrapper function) to code you do not own, and ``uninstrument`` puts back the
exact original object.
"""

from kotoba_memory_integrations.hooks.cached import CachedFunction, cached
from kotoba_memory_integrations.hooks.instrument import (
    Instrumentation,
    InstrumentationError,
    instrument,
    instrumented_targets,
    uninstrument,
)
from kotoba_memory_integrations.hooks.tracking import (
    FunctionMemoryStats,
    TrackedFunction,
    iter_tracked_functions,
    track_memory,
)

__all__ = [
    "CachedFunction",
    "FunctionMemoryStats",
    "InstrumentationError",
    "Instrumentation",
    "TrackedFunction",
    "cached",
    "instrument",
    "instrumented_targets",
    "iter_tracked_functions",
    "track_memory",
    "uninstrument",
]
