"""RSS trend fitting, phases and time-to-limit."""

from __future__ import annotations

import pytest

from kotoba_memory.memory_profiler._models import MemorySample
from kotoba_memory.memory_profiler._temporal import analyze_samples, linear_fit


def sample(t: float, rss: float) -> MemorySample:
    return MemorySample(t, int(rss), None, 0, (0, 0, 0))


def test_linear_fit_recovers_slope() -> None:
    xs = [float(i) for i in range(20)]
    slope, stderr, r2 = linear_fit(xs, [3.0 * x + 7.0 for x in xs])
    assert slope == pytest.approx(3.0)
    assert stderr == pytest.approx(0.0, abs=1e-9)
    assert r2 == pytest.approx(1.0)


def test_growth_projects_time_to_limit() -> None:
    samples = [sample(100.0 + i, 1_000_000 + 1000 * i + (i % 3) * 10) for i in range(60)]
    result = analyze_samples(samples, memory_limit_bytes=2_000_000)
    assert result.growth_rate_bytes_per_s == pytest.approx(1000, rel=0.01)
    assert result.time_to_limit_s == pytest.approx((2_000_000 - samples[-1].rss_bytes) / 1000, rel=0.02)
    assert result.peak_rss_bytes == samples[-1].rss_bytes
    assert [p.kind for p in result.phases] == ["growing"]


def test_plateau_has_growing_then_stable_phase_and_no_limit_eta_when_flat() -> None:
    grow = [sample(float(i), 1_000_000 + 50_000 * i) for i in range(30)]
    flat = [sample(float(30 + i), 2_500_000 + (i % 2) * 100) for i in range(60)]
    result = analyze_samples(grow + flat, memory_limit_bytes=10**9)
    kinds = [p.kind for p in result.phases]
    assert kinds[0] == "growing" and kinds[-1] == "stable"
    flat_only = analyze_samples(flat, memory_limit_bytes=10**9)
    assert flat_only.time_to_limit_s is None


def test_empty_series() -> None:
    result = analyze_samples([], None)
    assert result.samples == 0 and result.phases == ()
