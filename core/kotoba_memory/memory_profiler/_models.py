"""The immutable results the profiler hands out: samples, leak suspects, hotspots, temporal analysis."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class MemorySample:
    """One tick of the sampler: process RSS, traced bytes (when tracing), GC counts and extra gauges.

    ``heap_bytes`` is what glibc malloc has handed out and not had back (``mallinfo2``): None elsewhere,
    and on the samples between two readings when reading it is slow (see ``MemoryProfiler._read_heap``).
    """

    timestamp: float
    rss_bytes: int
    traced_bytes: int | None
    allocated_blocks: int
    gc_counts: tuple[int, int, int]
    gauges: tuple[tuple[str, float], ...] = ()
    heap_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class MemoryLeak:
    """A leak suspect: an allocation site whose retained bytes keep growing across tracing windows.

    ``size`` is the estimated bytes leaked since the site was first seen (growth rate x age);
    ``confidence`` is in [0, 1]; ``route`` is the web route most associated with the growth, if known.
    """

    size: int
    allocation_site: str
    traceback: tuple[str, ...]
    growth_rate_bytes_per_s: float
    age_seconds: float
    confidence: float
    route: str | None = None
    observed_bytes: int = 0
    growth_windows: int = 0
    windows_observed: int = 0
    evidence: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        data = asdict(self)
        data["traceback"] = list(self.traceback)
        return data


@dataclass(frozen=True, slots=True)
class AllocationHotspot:
    """An allocation site ranked by the bytes (or block count) it allocated and kept during a window."""

    allocation_site: str
    size: int
    count: int
    traceback: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        data = asdict(self)
        data["traceback"] = list(self.traceback)
        return data


@dataclass(frozen=True, slots=True)
class MemoryPhase:
    """A stretch of the RSS series classified as ``growing``, ``stable`` or ``shrinking``."""

    start_s: float
    end_s: float
    kind: str
    slope_bytes_per_s: float


@dataclass(frozen=True, slots=True)
class TemporalAnalysis:
    """RSS trend by least squares: slope with its standard error, phases and time to the memory limit."""

    duration_s: float
    samples: int
    start_rss_bytes: int
    current_rss_bytes: int
    peak_rss_bytes: int
    growth_rate_bytes_per_s: float
    growth_rate_stderr: float
    r_squared: float
    phases: tuple[MemoryPhase, ...]
    memory_limit_bytes: int | None
    time_to_limit_s: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        data = asdict(self)
        data["phases"] = [asdict(p) for p in self.phases]
        return data


@dataclass(frozen=True, slots=True)
class RouteStats:
    """Per-route aggregates fed by the web middleware through ``record_request``."""

    route: str
    requests: int
    rss_delta_bytes: int
    traced_delta_bytes: int
    traced_requests: int
    total_duration_s: float
    #: Requests whose RSS was measured (the middleware samples them); None: all ``requests``.
    rss_requests: int | None = None

    @property
    def mean_rss_delta(self) -> float:
        """Average RSS change per measured request, in bytes."""
        n = self.requests if self.rss_requests is None else self.rss_requests
        return self.rss_delta_bytes / n if n else 0.0

    @property
    def mean_traced_delta(self) -> float | None:
        """Average traced-memory change per request that was traced, or None when none was."""
        return self.traced_delta_bytes / self.traced_requests if self.traced_requests else None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready data, read directly: a brief every few seconds has one per route."""
        duration = self.total_duration_s
        return {
            "route": self.route,
            "requests": self.requests,
            "rss_delta_bytes": self.rss_delta_bytes,
            "traced_delta_bytes": self.traced_delta_bytes,
            "traced_requests": self.traced_requests,
            "total_duration_s": duration if math.isfinite(duration) else None,
            "rss_requests": self.rss_requests,
        }


@dataclass(frozen=True, slots=True)
class ProfilerStats:
    """The profiler's own health: what it keeps, what it costs, and errors it swallowed."""

    running: bool
    samples: int
    windows: int
    sites_tracked: int
    routes_tracked: int
    own_memory_bytes: int
    tick_errors: int
    last_window_analysis_ms: float
    max_window_analysis_ms: float
    tracing_mode: str
    skipped_windows: int = 0
    censuses: int = 0
    sampled_objects: int = 0
    last_census_ms: float = 0.0
    max_census_ms: float = 0.0
    heap_thaws: int = 0
    survival_rechecks: int = 0
    # Seconds between window starts now (more than configured when a trace budget spaces them out),
    # and the windows' measured extra CPU over all the process's CPU from the profiler's start until
    # now (None without a trace budget, or before a window was measured).
    window_interval_s: float = 0.0
    window_cost_share: float | None = None


@dataclass(frozen=True, slots=True)
class LeakVerdictStatus:
    """Whether enough tracing windows ran for a leak verdict; before that, no suspects is no verdict.

    ``first_verdict_in_s`` estimates when the first verdict can come (None once ready or when leak
    detection is off); ``message`` says it in words.
    """

    ready: bool
    windows: int
    windows_needed: int
    first_verdict_in_s: float | None
    message: str


@dataclass(frozen=True, slots=True)
class HeldBackSite:
    """A site that grew in two or more tracing windows but stayed under ``min_confidence``: not a
    suspect. ``limited_by`` names the weakest of ``factors`` (their product is ``confidence``), so a
    leak that is not reported yet, or a site ruled out, can be explained."""

    allocation_site: str
    confidence: float
    limited_by: str
    factors: tuple[tuple[str, float], ...]
    evidence: str = ""
    #: The tracked traceback (innermost frame first): a line reached by two call paths is two sites.
    traceback: tuple[str, ...] = ()
    #: Bytes it grew in each window since it was first tracked, oldest first (a leak grows in every one).
    window_growth: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class MemoryAnalysis:
    """Everything ``MemoryProfiler.analyze()`` found."""

    memory_leaks: list[MemoryLeak]
    hotspots: list[AllocationHotspot]
    hotspots_by_count: list[AllocationHotspot]
    temporal: TemporalAnalysis
    routes: list[RouteStats]
    stats: ProfilerStats
    analysis_time_s: float
    samples: list[MemorySample] = field(default_factory=list)
    leak_status: LeakVerdictStatus | None = None
    #: The most confident sites under the threshold (at most five), for explaining a silence.
    held_back: list[HeldBackSite] = field(default_factory=list)

    @property
    def has_leaks(self) -> bool:
        """True when at least one suspect passed the confidence threshold."""
        return bool(self.memory_leaks)

    def to_dict(self, *, include_samples: bool = True) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        data: dict[str, Any] = {
            "memory_leaks": [leak.to_dict() for leak in self.memory_leaks],
            "hotspots": [h.to_dict() for h in self.hotspots],
            "hotspots_by_count": [h.to_dict() for h in self.hotspots_by_count],
            "temporal": self.temporal.to_dict(),
            "routes": [asdict(r) for r in self.routes],
            "stats": asdict(self.stats),
            "analysis_time_s": self.analysis_time_s,
            "leak_status": asdict(self.leak_status) if self.leak_status is not None else None,
            "held_back": [
                {
                    **asdict(h), "factors": dict(h.factors), "traceback": list(h.traceback),
                    "window_growth": list(h.window_growth),
                }
                for h in self.held_back
            ],
        }
        if include_samples:
            data["samples"] = [
                {
                    "timestamp": s.timestamp,
                    "rss_bytes": s.rss_bytes,
                    "traced_bytes": s.traced_bytes,
                    "allocated_blocks": s.allocated_blocks,
                    "heap_bytes": s.heap_bytes,
                    "gc_counts": list(s.gc_counts),
                    "gauges": dict(s.gauges),
                }
                for s in self.samples
            ]
        return data
