"""Turning recorded collections into a :class:`GcAnalysis`: scores, bottlenecks and opportunities."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kotoba_memory.gc_optimizer.events import NUM_GENERATIONS, GcEvent


class RiskLevel(enum.Enum):
    """How likely an optimization is to hurt (memory growth, leaked cycles) if applied."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """Pause and yield figures for one GC generation (pauses in seconds)."""

    generation: int
    collections: int
    pause_p50_s: float
    pause_p95_s: float
    pause_max_s: float
    total_pause_s: float
    collected: int
    uncollectable: int
    collections_per_minute: float
    yield_ratio: float | None  # collected per young object examined, automatic gen0 collections only


@dataclass(frozen=True, slots=True)
class GcBottleneck:
    """Something in the measurements that costs throughput, latency or memory."""

    kind: str
    description: str
    severity: float  # 0 (negligible) .. 1 (severe)
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class OptimizationOpportunity:
    """A tuning step the measurements argue for; ``auto_apply`` ones are what ``optimize()`` does."""

    optimization_type: str
    description: str
    expected_benefit: float  # 0..1, the share of measured GC cost it should remove
    risk_level: RiskLevel
    actions: list[str]
    auto_apply: bool = False
    suggested_thresholds: tuple[int, int, int] | None = None


@dataclass(frozen=True, slots=True)
class GcAnalysis:
    """What the collector has cost since the optimizer started, and what to do about it."""

    performance_score: float  # 0 (GC dominates) .. 1 (GC costs nothing measurable)
    generations: dict[int, GenerationStats]
    total_collections: int
    total_pause_s: float
    collections_per_minute: float
    gc_time_share: float  # GC pause time / wall time
    gc_cpu_share: float  # GC pause time / process CPU time, capped at 1
    efficiency_objects_per_ms: float
    bytes_reclaimed: int
    bottlenecks: list[GcBottleneck]
    optimization_opportunities: list[OptimizationOpportunity]
    thresholds: tuple[int, int, int]
    frozen_objects: int
    memory_usage_percent: float | None
    elapsed_s: float
    requests_seen: int
    explicit_collections: int
    changes_made: int = 0
    notes: list[str] = field(default_factory=list)
    # What the optimizer is doing and why: stopped, recording, warming_up, between_requests,
    # long_request_stepping or budget (RSS budget or memory ceiling).
    mode: str = "recording"
    mode_reason: str = ""
    mode_cause: str = "adaptive_off"  # short token for metrics: rss_budget, long_request, ...
    own_memory_bytes: int = 0  # the optimizer's own bookkeeping (event ring, change logs)
    rss_budget_bytes: int | None = None  # RSS above which it collects (last full collection + budget)
    budget_collections: int = 0
    long_requests: int = 0  # long requests it switched to stepping for


@dataclass(frozen=True, slots=True)
class AnalysisInput:
    """Everything :func:`build_analysis` needs, gathered by the optimizer."""

    events: Sequence[GcEvent]
    counts: Sequence[int]  # cumulative per generation, observed + manual
    pause_ns: Sequence[int]
    collected: Sequence[int]
    uncollectable: Sequence[int]
    bytes_reclaimed: int
    elapsed_s: float
    cpu_s: float
    thresholds: tuple[int, int, int]
    base_thresholds: tuple[int, int, int]
    max_young_threshold: int
    frozen_objects: int
    memory_usage_percent: float | None
    target_memory_usage_percent: float
    pause_target_s: float
    requests_seen: int
    explicit_collections: int
    adaptive: bool
    changes_made: int = 0
    callback_errors: int = 0
    monitor_errors: int = 0
    mode: str = "recording"
    mode_reason: str = ""
    mode_cause: str = "adaptive_off"
    own_memory_bytes: int = 0
    rss_budget_bytes: int | None = None
    budget_collections: int = 0
    long_requests: int = 0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def _generation_stats(data: AnalysisInput, minutes: float) -> dict[int, GenerationStats]:
    by_gen: dict[int, list[GcEvent]] = {g: [] for g in range(NUM_GENERATIONS)}
    for event in data.events:
        by_gen[event.generation].append(event)
    result: dict[int, GenerationStats] = {}
    for gen, events in by_gen.items():
        pauses = sorted(e.pause_s for e in events)
        # Only automatic collections say whether the thresholds fit: the ones we start between requests
        # are meant to find garbage.
        observed = [e for e in events if not e.manual and not e.explicit and e.examined > 0]
        examined = sum(e.examined for e in observed)
        yield_ratio = (sum(e.collected for e in observed) / examined) if (gen == 0 and examined) else None
        result[gen] = GenerationStats(
            generation=gen,
            collections=data.counts[gen],
            pause_p50_s=percentile(pauses, 50),
            pause_p95_s=percentile(pauses, 95),
            pause_max_s=pauses[-1] if pauses else 0.0,
            total_pause_s=data.pause_ns[gen] / 1e9,
            collected=data.collected[gen],
            uncollectable=data.uncollectable[gen],
            collections_per_minute=data.counts[gen] / minutes if minutes > 0 else 0.0,
            yield_ratio=yield_ratio,
        )
    return result


def _bottlenecks(
    data: AnalysisInput, gens: dict[int, GenerationStats], time_share: float
) -> list[GcBottleneck]:
    found: list[GcBottleneck] = []
    if time_share > 0.05:
        found.append(
            GcBottleneck(
                "gc_time_share",
                f"garbage collection takes {time_share:.1%} of wall time",
                min(1.0, time_share / 0.25),
            )
        )
    for gen, stats in gens.items():
        if stats.pause_max_s > data.pause_target_s:
            ratio = stats.pause_max_s / data.pause_target_s
            found.append(
                GcBottleneck(
                    "long_pause",
                    f"generation {gen} pauses reach {stats.pause_max_s * 1e3:.1f} ms "
                    f"(p95 {stats.pause_p95_s * 1e3:.1f} ms, target {data.pause_target_s * 1e3:.1f} ms)",
                    min(1.0, ratio / 10.0),
                    gen,
                )
            )
    young = gens[0]
    if young.collections_per_minute > 600 and young.yield_ratio is not None and young.yield_ratio < 0.05:
        found.append(
            GcBottleneck(
                "frequent_young_collections",
                f"{young.collections_per_minute:.0f} young collections per minute find almost no garbage "
                f"({young.yield_ratio:.1%} of the objects examined)",
                min(1.0, young.collections_per_minute / 60_000),
                0,
            )
        )
    uncollectable = sum(data.uncollectable)
    if uncollectable:
        found.append(
            GcBottleneck(
                "uncollectable_objects",
                f"{uncollectable} uncollectable objects were left in gc.garbage",
                0.5,
            )
        )
    pct = data.memory_usage_percent
    if pct is not None and pct >= data.target_memory_usage_percent:
        found.append(
            GcBottleneck(
                "memory_pressure",
                f"memory use is {pct:.1f}% of the limit, "
                f"above the {data.target_memory_usage_percent:.0f}% target",
                min(1.0, 0.5 + (pct - data.target_memory_usage_percent) / 50.0),
            )
        )
    return found


def _opportunities(
    data: AnalysisInput, gens: dict[int, GenerationStats], total_pause_s: float, time_share: float
) -> list[OptimizationOpportunity]:
    found: list[OptimizationOpportunity] = []
    share_of = (lambda g: gens[g].total_pause_s / total_pause_s) if total_pause_s > 0 else (lambda g: 0.0)
    t0, t1, t2 = data.thresholds
    young = gens[0]
    pressure = data.memory_usage_percent is not None and (
        data.memory_usage_percent >= data.target_memory_usage_percent
    )
    if pressure:
        found.append(
            OptimizationOpportunity(
                "reduce_memory_pressure",
                "memory use is above the target: collect every generation and return freed heap to the OS",
                0.5,
                RiskLevel.LOW,
                ["gc.unfreeze() if the heap was frozen", "gc.collect(2)", "malloc_trim(0)"],
                auto_apply=True,
                suggested_thresholds=data.base_thresholds,
            )
        )
    if (
        not pressure
        and t0 > 0
        and young.collections_per_minute > 60
        and young.yield_ratio is not None
        and young.yield_ratio < 0.10
        and t0 < data.max_young_threshold
    ):
        new_t0 = min(data.max_young_threshold, t0 * 4)
        found.append(
            OptimizationOpportunity(
                "raise_young_threshold",
                f"young collections find {young.yield_ratio:.1%} garbage: collect less often "
                f"(threshold0 {t0} -> {new_t0}) so short-lived objects die by reference counting first",
                round(0.75 * share_of(0), 3),
                RiskLevel.LOW,
                [f"gc.set_threshold({new_t0}, {t1}, {t2})"],
                auto_apply=True,
                suggested_thresholds=(new_t0, t1, t2),
            )
        )
    if young.yield_ratio is not None and young.yield_ratio > 0.5 and t0 > data.base_thresholds[0]:
        base0 = data.base_thresholds[0]
        found.append(
            OptimizationOpportunity(
                "lower_young_threshold",
                f"young collections reclaim {young.yield_ratio:.0%} of what they examine: cyclic garbage "
                f"is piling up between collections (threshold0 {t0} -> {base0})",
                0.3,
                RiskLevel.LOW,
                [f"gc.set_threshold({base0}, {t1}, {t2})"],
                auto_apply=True,
                suggested_thresholds=(base0, t1, t2),
            )
        )
    old = gens[2]
    if not pressure and old.collections and old.pause_max_s > data.pause_target_s:
        found.append(
            OptimizationOpportunity(
                "freeze_long_lived_heap",
                f"full collections pause up to {old.pause_max_s * 1e3:.1f} ms scanning the long-lived heap: "
                "freeze it so full collections skip it",
                round(0.8 * share_of(2), 3) or 0.1,
                RiskLevel.MEDIUM,
                [
                    "gc.collect(1)",
                    "gc.freeze()",
                    "call freeze_for_fork() before forking workers (gunicorn preload_app)",
                ],
                auto_apply=True,
            )
        )
    if data.requests_seen == 0 and time_share > 0.01 and share_of(0) + share_of(1) > 0.3:
        found.append(
            OptimizationOpportunity(
                "collect_between_requests",
                "no request boundaries were reported: let the middleware call on_request_start() and "
                "on_request_end() so young garbage is collected between requests",
                round(0.5 * (share_of(0) + share_of(1)), 3),
                RiskLevel.LOW,
                [
                    "add kotoba-memory's Django/Flask/ASGI middleware",
                    "or call on_request_start()/on_request_end() around each unit of work",
                ],
            )
        )
    if not data.adaptive and time_share > 0.05:
        found.append(
            OptimizationOpportunity(
                "enable_adaptive_mode",
                f"GC takes {time_share:.1%} of wall time: let the optimizer tune thresholds continuously",
                0.5,
                RiskLevel.LOW,
                ["GcOptimizer(adaptive=True).start()"],
            )
        )
    if sum(data.uncollectable):
        found.append(
            OptimizationOpportunity(
                "fix_uncollectable_cycles",
                "objects the collector cannot free are accumulating in gc.garbage",
                0.2,
                RiskLevel.LOW,
                [
                    "inspect gc.garbage with gc.set_debug(gc.DEBUG_SAVEALL) in a test run",
                    "break the cycles with weakref or remove the __del__ that blocks them",
                ],
            )
        )
    return found


def time_share_of(pause_s: float, elapsed_s: float) -> float:
    """GC pause time as a share of wall time (0 before any time passed)."""
    return min(1.0, pause_s / elapsed_s) if elapsed_s > 0 else 0.0


def build_analysis(data: AnalysisInput) -> GcAnalysis:
    """Compute a :class:`GcAnalysis` from recorded collections."""
    minutes = data.elapsed_s / 60.0
    gens = _generation_stats(data, minutes)
    total_collections = sum(data.counts)
    total_pause_s = sum(data.pause_ns) / 1e9
    time_share = time_share_of(total_pause_s, data.elapsed_s)
    cpu_share = min(1.0, total_pause_s / data.cpu_s) if data.cpu_s > 0 else time_share
    total_collected = sum(data.collected)
    efficiency = total_collected / (total_pause_s * 1e3) if total_pause_s > 0 else 0.0
    bottlenecks = _bottlenecks(data, gens, time_share)
    notes: list[str] = []
    if len(data.events) < total_collections:
        notes.append(
            f"pause percentiles cover the last {len(data.events)} of {total_collections} collections "
            "(bounded event ring); totals cover all"
        )
    if data.callback_errors or data.monitor_errors:
        notes.append(
            f"internal errors caught: {data.callback_errors} in the gc callback, "
            f"{data.monitor_errors} in the monitor thread (see the kotoba_memory.gc debug log)"
        )
    score = 1.0
    for bottleneck in bottlenecks:
        score *= 1.0 - 0.5 * bottleneck.severity
    return GcAnalysis(
        performance_score=round(score, 4),
        generations=gens,
        total_collections=total_collections,
        total_pause_s=total_pause_s,
        collections_per_minute=total_collections / minutes if minutes > 0 else 0.0,
        gc_time_share=time_share,
        gc_cpu_share=cpu_share,
        efficiency_objects_per_ms=efficiency,
        bytes_reclaimed=data.bytes_reclaimed,
        bottlenecks=bottlenecks,
        optimization_opportunities=_opportunities(data, gens, total_pause_s, time_share),
        thresholds=data.thresholds,
        frozen_objects=data.frozen_objects,
        memory_usage_percent=data.memory_usage_percent,
        elapsed_s=data.elapsed_s,
        requests_seen=data.requests_seen,
        explicit_collections=data.explicit_collections,
        changes_made=data.changes_made,
        notes=notes,
        mode=data.mode,
        mode_reason=data.mode_reason,
        mode_cause=data.mode_cause,
        own_memory_bytes=data.own_memory_bytes,
        rss_budget_bytes=data.rss_budget_bytes,
        budget_collections=data.budget_collections,
        long_requests=data.long_requests,
    )
