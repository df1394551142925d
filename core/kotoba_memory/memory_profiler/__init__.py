"""Memory profiling with leak detection cheap enough to leave on in production.

``MemoryProfiler().start()`` samples RSS in one daemon thread and opens short tracemalloc windows on a
small duty cycle; ``analyze()`` returns leak suspects (allocation site, growth rate, age, confidence,
route), allocation hotspots and the memory trend.
"""

from kotoba_memory.memory_profiler._models import (
    AllocationHotspot,
    HeldBackSite,
    LeakVerdictStatus,
    MemoryAnalysis,
    MemoryLeak,
    MemoryPhase,
    MemorySample,
    ProfilerStats,
    RouteStats,
    TemporalAnalysis,
)
from kotoba_memory.memory_profiler.profiler import MemoryProfiler, ProfilerError, get_active_profiler

__all__ = [
    "AllocationHotspot",
    "HeldBackSite",
    "LeakVerdictStatus",
    "MemoryAnalysis",
    "MemoryLeak",
    "MemoryPhase",
    "MemoryProfiler",
    "MemorySample",
    "ProfilerError",
    "ProfilerStats",
    "RouteStats",
    "TemporalAnalysis",
    "get_active_profiler",
]
