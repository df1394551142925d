"""Honest short runs: no suspects before enough windows is "no verdict yet", and short-run
extrapolations are withheld or carry their range."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kotoba_memory.memory_profiler import MemoryProfiler
from kotoba_memory.report import MemoryReport, MemoryStats


def test_analyze_before_enough_windows_says_there_is_no_verdict_yet() -> None:
    profiler = MemoryProfiler(window_interval_s=60.0, first_window_after_s=10.0)
    profiler.start()
    try:
        analysis = profiler.analyze()
    finally:
        profiler.stop()
    status = analysis.leak_status
    assert status is not None and not status.ready
    assert analysis.memory_leaks == []
    assert status.windows == 0 and status.windows_needed == 3
    assert status.first_verdict_in_s is not None
    # first window after ~10 s, then two more a minute apart
    assert 120.0 <= status.first_verdict_in_s <= 131.0
    assert "0 of 3 tracing windows" in status.message
    assert analysis.to_dict(include_samples=False)["leak_status"]["ready"] is False


def test_the_time_to_the_first_verdict_counts_down_between_windows() -> None:
    profiler = MemoryProfiler(window_s=0.1, window_interval_s=6.0, first_window_after_s=0.0)
    profiler.start()
    try:
        deadline = time.monotonic() + 10.0
        while profiler.stats().windows < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        first = profiler.analyze().leak_status
        time.sleep(2.0)
        later = profiler.analyze().leak_status
    finally:
        profiler.stop()
    assert first is not None and later is not None and first.windows == later.windows == 1
    assert first.first_verdict_in_s is not None and later.first_verdict_in_s is not None
    # the next window ends ~6 s after the first opened, the third 6 s later: not two whole intervals
    assert 6.0 < first.first_verdict_in_s <= 12.1
    assert first.first_verdict_in_s - later.first_verdict_in_s == pytest.approx(2.0, abs=0.6)


def test_a_closed_window_being_grouped_counts_toward_the_first_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    profiler = MemoryProfiler(window_s=0.1, window_interval_s=6.0, first_window_after_s=0.0)
    grouping, release = threading.Event(), threading.Event()
    add_window = profiler._detector.add_window

    def slow_add_window(*args: Any, **kwargs: Any) -> None:
        grouping.set()
        release.wait(10.0)
        add_window(*args, **kwargs)

    monkeypatch.setattr(profiler._detector, "add_window", slow_add_window)
    profiler.start()
    try:
        assert grouping.wait(10.0)
        status = profiler.analyze().leak_status
    finally:
        release.set()
        profiler.stop()
    assert status is not None and status.windows == 0 and status.first_verdict_in_s is not None
    # the first window counts in a moment; the second ends ~6 s after the first opened, the third 6 s
    # later: not three intervals
    assert 5.0 < status.first_verdict_in_s <= 12.1


def test_windows_needed_follows_min_confidence() -> None:
    assert MemoryProfiler(min_confidence=0.6).windows_needed() == 3
    assert MemoryProfiler(min_confidence=0.9).windows_needed() == 5


def report(duration_s: float, **fields: Any) -> MemoryReport:
    stats = MemoryStats(
        current_memory_mb=100.0, peak_memory_mb=100.0, memory_efficiency=0.5, efficiency_basis="managed",
        rss_bytes=100 << 20, peak_rss_bytes=100 << 20,
    )
    return MemoryReport(started_at=1000.0, finished_at=1000.0 + duration_s, config={}, stats=stats, **fields)


def temporal(duration_s: float) -> dict[str, Any]:
    return {
        "samples": 100, "duration_s": duration_s, "growth_rate_bytes_per_s": 1000.0,
        "growth_rate_stderr": 100.0, "time_to_limit_s": 7200.0,
    }


def test_time_to_limit_from_seconds_of_data_is_withheld() -> None:
    text = report(25.0, temporal=temporal(25.0)).summary()
    assert "withheld: only 25 s of samples" in text
    assert "memory limit in" not in text


def test_time_to_limit_from_a_long_run_carries_its_range() -> None:
    text = report(600.0, temporal=temporal(600.0)).summary()
    # slope 1000 +- 2 x 100 B/s: 7.2 MB of headroom lasts 6000 to 9000 s
    expected = "memory limit in 2.0 h at this rate (1.7 h to 2.5 h; extrapolated from 10.0 min of samples)"
    assert expected in text


def test_short_run_gc_share_is_marked() -> None:
    gc = {"total_collections": 3, "total_pause_s": 0.01, "performance_score": 0.9, "gc_time_share": 0.2}
    assert "over only 20 s (not a steady-state figure)" in report(20.0, gc=gc).summary()
    assert "over only" not in report(600.0, gc=gc).summary()
    assert "not steady state" in report(20.0, gc=gc).to_html()


def test_report_without_a_verdict_does_not_read_as_no_leaks() -> None:
    status = {"ready": False, "message": "not enough evidence for a leak verdict yet: 1 of 3 tracing windows"}
    rep = report(30.0, profiler={"windows": 1}, leak_status=status)
    assert "no verdict — not enough evidence" in rep.summary()
    assert "leak suspects: none" not in rep.summary()
    assert "no verdict: not enough evidence" in rep.to_html()
    ready = report(30.0, profiler={"windows": 5}, leak_status={"ready": True, "message": "x"})
    assert "leak suspects: none (5 tracing windows)" in ready.summary()
