"""Trend analysis of the sampled RSS series: least-squares slope, phases, time to a limit."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from kotoba_memory.memory_profiler._models import MemoryPhase, MemorySample, TemporalAnalysis


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares slope, its standard error and r^2; (0, inf, 0) when under three points."""
    n = len(xs)
    if n < 3:
        return 0.0, math.inf, 0.0
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx <= 0.0:
        return 0.0, math.inf, 0.0
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    stderr = math.sqrt(ss_res / (n - 2) / sxx)
    r_squared = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    return slope, stderr, r_squared


def _phases(xs: Sequence[float], ys: Sequence[float], max_phases: int = 8) -> tuple[MemoryPhase, ...]:
    """Split the series into up to ``max_phases`` equal stretches, classify each, merge equal neighbours."""
    n = len(xs)
    if n < 6:
        return ()
    segments = max(1, min(max_phases, n // 3))
    size = n / segments
    # A stretch "moves" when its slope is significant and its total change exceeds the series' jitter.
    jitter = _median_abs_step(ys)
    raw: list[MemoryPhase] = []
    for i in range(segments):
        lo, hi = round(i * size), round((i + 1) * size)
        seg_x, seg_y = xs[lo:hi], ys[lo:hi]
        slope, stderr, _ = linear_fit(seg_x, seg_y)
        change = slope * (seg_x[-1] - seg_x[0]) if len(seg_x) > 1 else 0.0
        significant = stderr == 0.0 or (math.isfinite(stderr) and abs(slope) > 2.0 * stderr)
        if significant and abs(change) > 3.0 * jitter:
            kind = "growing" if slope > 0 else "shrinking"
        else:
            kind = "stable"
        raw.append(MemoryPhase(seg_x[0] - xs[0], seg_x[-1] - xs[0], kind, slope))
    merged: list[MemoryPhase] = []
    for phase in raw:
        if merged and merged[-1].kind == phase.kind:
            prev = merged[-1]
            lo_i = _index_at(xs, prev.start_s + xs[0])
            hi_i = _index_at(xs, phase.end_s + xs[0]) + 1
            slope, _, _ = linear_fit(xs[lo_i:hi_i], ys[lo_i:hi_i])
            merged[-1] = MemoryPhase(prev.start_s, phase.end_s, phase.kind, slope)
        else:
            merged.append(phase)
    return tuple(merged)


def _index_at(xs: Sequence[float], x: float) -> int:
    for i, value in enumerate(xs):
        if value >= x:
            return i
    return len(xs) - 1


def _median_abs_step(ys: Sequence[float]) -> float:
    steps = sorted(abs(b - a) for a, b in itertools.pairwise(ys))
    return steps[len(steps) // 2] if steps else 0.0


def analyze_samples(samples: Sequence[MemorySample], memory_limit_bytes: int | None) -> TemporalAnalysis:
    """Fit the RSS trend of ``samples`` and project when it would reach ``memory_limit_bytes``."""
    if not samples:
        return TemporalAnalysis(0.0, 0, 0, 0, 0, 0.0, math.inf, 0.0, (), memory_limit_bytes, None)
    xs = [s.timestamp for s in samples]
    ys = [float(s.rss_bytes) for s in samples]
    slope, stderr, r_squared = linear_fit(xs, ys)
    current = samples[-1].rss_bytes
    time_to_limit: float | None = None
    if memory_limit_bytes is not None and slope > 0 and math.isfinite(stderr) and slope > 2.0 * stderr:
        time_to_limit = max(0.0, (memory_limit_bytes - current) / slope)
    return TemporalAnalysis(
        duration_s=xs[-1] - xs[0],
        samples=len(samples),
        start_rss_bytes=samples[0].rss_bytes,
        current_rss_bytes=current,
        peak_rss_bytes=max(s.rss_bytes for s in samples),
        growth_rate_bytes_per_s=slope,
        growth_rate_stderr=stderr,
        r_squared=r_squared,
        phases=_phases(xs, ys),
        memory_limit_bytes=memory_limit_bytes,
        time_to_limit_s=time_to_limit,
    )
