"""GC optimization: observe every collection, analyse its cost, and tune CPython's collector.

``GcOptimizer`` records collections through ``gc.callbacks``, scores them (``analyze()``), applies
safe tuning (``optimize()``) and, in adaptive mode, keeps tuning while the app runs: young garbage
is collected between requests, the long-lived heap is frozen, full collections move to idle time and
a memory ceiling always wins over speed.
"""

from __future__ import annotations

from kotoba_memory.gc_optimizer.analysis import (
    GcAnalysis,
    GcBottleneck,
    GenerationStats,
    OptimizationOpportunity,
    RiskLevel,
)
from kotoba_memory.gc_optimizer.events import GcEvent
from kotoba_memory.gc_optimizer.memory import MemoryCeiling, MemoryUsage, malloc_trim
from kotoba_memory.gc_optimizer.optimizer import (
    GcChange,
    GcOptimizer,
    GcOptimizerError,
    get_active_gc_optimizer,
)

__all__ = [
    "GcAnalysis",
    "GcBottleneck",
    "GcChange",
    "GcEvent",
    "GcOptimizer",
    "GcOptimizerError",
    "GenerationStats",
    "MemoryCeiling",
    "MemoryUsage",
    "OptimizationOpportunity",
    "RiskLevel",
    "get_active_gc_optimizer",
    "malloc_trim",
]
