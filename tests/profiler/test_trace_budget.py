"""The trace budget: tracing windows go further apart while their measured cost exceeds a share of CPU."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from kotoba_memory.config import MemoryConfig
from kotoba_memory.errors import ConfigError
from kotoba_memory.memory_profiler import MemoryProfiler
from kotoba_memory.memory_profiler._budget import TraceBudget


def run_cycle(
    budget: TraceBudget, start: float, *, gap_s: float, gap_cpu: float, gap_requests: int,
    window_s: float, window_cpu: float, window_requests: int, cpu0: float = 0.0,
) -> tuple[float, float, float]:
    """One gap then one window, as the profiler reports them; returns (next interval, wall, cpu) after it."""
    wall, cpu = start + gap_s, cpu0 + gap_cpu
    budget.opened(wall, cpu, gap_requests)
    wall, cpu = wall + window_s, cpu + window_cpu
    return budget.closed(wall, cpu, window_requests), wall, cpu


def first_window(window_cpu: float, **cycle: float) -> tuple[TraceBudget, float]:
    """A 0.5% budget at 60 s after its first window; by default a minute at half a core, 5 ms a request,
    and a 0.5 s window in which 50 requests finished."""
    budget = TraceBudget(0.005, 60.0)
    budget.restart(0.0, 0.0)
    figures = {"gap_s": 60.0, "gap_cpu": 30.0, "gap_requests": 6000, "window_s": 0.5, "window_requests": 50}
    figures.update(cycle)
    interval, _, _ = run_cycle(budget, 0.0, window_cpu=window_cpu, **figures)  # type: ignore[arg-type]
    return budget, interval


def test_a_window_that_costs_more_than_the_share_pushes_the_next_one_out() -> None:
    # 5 ms of CPU per request untraced; the window's 50 requests took 0.5 s instead of 0.25 s
    budget, interval = first_window(0.5)
    assert budget.last is not None
    assert budget.last.extra_cpu_s == pytest.approx(0.25)
    assert budget.last.cpu_rate == pytest.approx(0.5)
    assert budget.last.share == pytest.approx(0.25 / 30.5)
    # 0.25 s is 0.5% of the CPU of 100 s at half a core
    assert interval == pytest.approx(100.0)
    assert budget.next_interval_s == interval


def test_a_cheap_window_keeps_the_configured_interval() -> None:
    budget, interval = first_window(0.26)
    assert budget.last is not None and budget.last.extra_cpu_s == pytest.approx(0.01)
    assert interval == 60.0


def test_the_interval_is_capped_so_verdicts_still_come() -> None:
    assert first_window(60.0)[1] == 16 * 60.0


def test_an_idle_process_is_charged_at_least_the_idle_rate() -> None:
    # 6 ms of CPU in a minute, no requests: the window's 20 ms of bookkeeping against 5% of a core
    budget, interval = first_window(0.02, gap_cpu=0.006, gap_requests=0, window_requests=0)
    assert budget.last is not None and budget.last.cpu_rate == pytest.approx(0.0001)
    assert interval == pytest.approx((0.02 - 0.0001 * 0.5) / (0.005 * 0.05))


def test_without_enough_requests_the_gap_rate_is_the_baseline() -> None:
    budget = TraceBudget(0.01, 10.0)
    budget.restart(0.0, 0.0)
    # a process at half a core doing work that is not requests: 0.25 s expected in the window, 0.45 s used
    run_cycle(budget, 0.0, gap_s=10.0, gap_cpu=5.0, gap_requests=3, window_s=0.5, window_cpu=0.45,
              window_requests=1)
    assert budget.last is not None and budget.last.extra_cpu_s == pytest.approx(0.2)


def test_the_cost_is_smoothed_over_windows_and_falls_back_when_windows_get_cheap() -> None:
    budget = TraceBudget(0.005, 60.0)
    budget.restart(0.0, 0.0)
    wall = cpu = 0.0
    intervals = []
    # 1 s over the requests' untraced 0.25 s twice, then windows that cost nothing extra
    for window_cpu in (1.25, 1.25, 0.25, 0.25, 0.25, 0.25):
        interval, wall, cpu = run_cycle(budget, wall, gap_s=60.0, gap_cpu=30.0, gap_requests=6000,
                                        window_s=0.5, window_cpu=window_cpu, window_requests=50, cpu0=cpu)
        intervals.append(interval)
    # one cheap window is not yet the rule: the interval comes back halving
    assert intervals == [pytest.approx(v) for v in (400.0, 400.0, 200.0, 100.0, 60.0, 60.0)]


def test_an_abandoned_window_is_not_measured_and_the_next_gap_starts_there() -> None:
    budget = TraceBudget(0.005, 60.0)
    budget.restart(0.0, 0.0)
    budget.opened(60.0, 30.0, 6000)
    budget.abandoned(60.2, 31.0)  # a burst: the window was given up
    assert budget.last is None
    # the next gap is measured from the abandonment: 60 s, 30 s of CPU
    interval, _, _ = run_cycle(budget, 60.2, gap_s=60.0, gap_cpu=30.0, gap_requests=6000, cpu0=31.0,
                               window_s=0.5, window_cpu=0.5, window_requests=50)
    assert budget.last is not None and budget.last.cpu_rate == pytest.approx(0.5)
    assert interval == pytest.approx(100.0)


def test_a_window_closed_without_being_opened_changes_nothing() -> None:
    budget = TraceBudget(0.005, 60.0)
    assert budget.closed(10.0, 1.0, 5) == 60.0  # never restarted: nothing to measure against
    assert budget.last is None


def test_restart_forgets_the_parents_figures() -> None:
    budget = TraceBudget(0.005, 60.0)
    budget.restart(0.0, 0.0)
    run_cycle(budget, 0.0, gap_s=60.0, gap_cpu=30.0, gap_requests=6000, window_s=0.5, window_cpu=0.5,
              window_requests=50)
    assert budget.next_interval_s > 60.0
    budget.restart(100.0, 50.0)
    assert budget.next_interval_s == 60.0 and budget.last is None


@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), "1%"])
def test_bad_budgets_are_refused_naming_the_field(value: object) -> None:
    with pytest.raises((ConfigError, TypeError), match="leak_trace_budget"):
        MemoryConfig(leak_trace_budget=value)  # type: ignore[arg-type]
    with pytest.raises((ConfigError, TypeError), match="trace_budget"):
        MemoryProfiler(trace_budget=value)  # type: ignore[arg-type]


def test_config_default_is_a_quarter_percent_and_none_turns_it_off() -> None:
    assert MemoryConfig().leak_trace_budget == 0.0025
    assert MemoryConfig(leak_trace_budget=None).leak_trace_budget is None
    assert MemoryConfig.from_mapping({"leak_trace_budget": 0.02}).leak_trace_budget == 0.02


def _allocating_requests(profiler: MemoryProfiler, stop: threading.Event) -> None:
    """Requests that allocate a lot, so that tracing makes them several times slower."""
    while not stop.is_set():
        started = time.perf_counter()
        junk = [{"i": i, "s": str(i)} for i in range(300)]
        del junk
        profiler.record_request("/work", None, None, time.perf_counter() - started)


def _run_profiler(budget: float | None, until: Callable[[MemoryProfiler], bool]) -> MemoryProfiler:
    profiler = MemoryProfiler(
        sample_interval_s=0.5, window_s=0.1, window_interval_s=0.2, first_window_after_s=0.0,
        trace_budget=budget,
    )
    stop = threading.Event()
    worker = threading.Thread(target=_allocating_requests, args=(profiler, stop), daemon=True)
    worker.start()
    profiler.start()
    try:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and not until(profiler):
            time.sleep(0.05)
    finally:
        stop.set()
        profiler.stop()
        worker.join(5.0)
    return profiler


def test_a_real_profiler_spaces_costly_windows_and_reports_their_cost() -> None:
    # Half the time traced, requests several times slower inside: far over a 1% budget.
    profiler = _run_profiler(0.01, lambda p: p.stats().windows >= 2)
    stats = profiler.stats()
    assert stats.windows >= 2
    assert stats.window_cost_share is not None and stats.window_cost_share > 0.01  # all windows so far
    assert stats.window_interval_s > 0.2
    assert stats.window_interval_s <= 16 * 0.2


def test_without_a_budget_windows_keep_their_schedule() -> None:
    profiler = _run_profiler(None, lambda p: p.stats().windows >= 3)
    stats = profiler.stats()
    assert stats.windows >= 3
    assert stats.window_interval_s == 0.2 and stats.window_cost_share is None


def test_the_no_verdict_message_says_when_the_budget_spaced_windows_out() -> None:
    profiler = MemoryProfiler(window_interval_s=60.0, trace_budget=0.005)
    profiler.start()  # its first window is 10 s away
    try:
        # a window's measured cost, fed as the profiler would, without a minute's wait
        budget = profiler._budget
        assert budget is not None
        budget.restart(0.0, 0.0)
        run_cycle(budget, 0.0, gap_s=60.0, gap_cpu=30.0, gap_requests=6000,
                  window_s=0.5, window_cpu=0.5, window_requests=50)
        status = profiler.analyze().leak_status
    finally:
        profiler.stop()
    assert status is not None and not status.ready
    assert "windows 100 s apart" in status.message and "trace budget of 0.5% of CPU" in status.message
    assert status.first_verdict_in_s is not None and status.first_verdict_in_s >= 2 * 100.0


def test_the_share_adds_up_every_measured_window_and_the_cpu_since_the_last() -> None:
    budget = TraceBudget(0.005, 60.0)
    budget.restart(0.0, 0.0)
    assert budget.share_until(10.0) is None
    _, wall, cpu = run_cycle(budget, 0.0, gap_s=60.0, gap_cpu=30.0, gap_requests=6000,
                             window_s=0.5, window_cpu=0.5, window_requests=50)
    _, wall, cpu = run_cycle(budget, wall, gap_s=100.0, gap_cpu=50.0, gap_requests=10000, cpu0=cpu,
                             window_s=0.5, window_cpu=0.25, window_requests=50)
    # 0.25 s extra, then none, over 30.5 s and 50.25 s of CPU
    assert budget.share_until(cpu) == pytest.approx(0.25 / 80.75)
    # The CPU since the last window counts too: one early window is not the share of its short gap.
    assert budget.share_until(cpu + 80.75) == pytest.approx(0.25 / 161.5)
    assert budget.share_until(cpu - 5.0) == pytest.approx(0.25 / 80.75)  # a clock read before the close
