"""A census's new samples are checked after the next window even when the census budget puts the next
census far off: a burst's leftovers (alive at the census, freed a moment later) are shown dead before
the site grows its way to a verdict, and a leak's shown alive."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable

import pytest

from kotoba_memory.memory_profiler import MemoryProfiler


class Row:
    """A weak-referenceable row (slots: 3.11's tracemalloc cannot look up a managed ``__dict__``)."""

    __slots__ = ("__weakref__", "n", "text")

    def __init__(self, n: int) -> None:
        self.n = n
        self.text = f"row-{n}"


def make_burst_row(n: int) -> Row:
    return Row(n)  # burst site: built during a window, dropped right after it


def make_leaked_row(n: int) -> Row:
    return Row(n)  # leak site: kept forever


def run_window(profiler: MemoryProfiler, between: Callable[[int], None]) -> None:
    """Drive one tracing window by hand: ``between(i)`` runs before snapshot ``i``.

    Each window lasts over ``window_interval_s`` of real time, as scheduled windows do: a sample
    counts as alive only once seen alive that long after it was taken (fast hand-driven windows made
    the recheck after a census come too soon for the leak's samples to count).
    """
    windows = profiler.stats().windows
    time.sleep(2 * profiler.window_interval_s)
    step = 0
    while profiler.stats().windows == windows:
        between(step)
        profiler._window_step()
        step += 1


def test_a_bursts_leftovers_are_shown_dead_though_the_budget_defers_the_next_census() -> None:
    if tracemalloc.is_tracing():
        pytest.skip("someone else keeps tracemalloc on")
    # A budget so small that after the first census that finds anything no other census is due.
    profiler = MemoryProfiler(
        window_s=0.01, window_interval_s=0.01, snapshots_per_window=4, census_budget=1e-6, min_confidence=0.0
    )
    burst: list[Row] = []
    kept: list[Row] = []
    counter = iter(range(10**9))

    def between(step: int) -> None:
        if step >= 2:  # growth between the second and the last snapshot, as a leak or a burst shows
            burst.extend(make_burst_row(next(counter)) for _ in range(200))
            kept.extend(make_leaked_row(next(counter)) for _ in range(200))

    for _ in range(6):
        run_window(profiler, between)
        burst.clear()  # the burst is over: its rows die between windows
    by_line = {leak.traceback[0]: leak for leak in profiler.analyze().memory_leaks}
    stats = profiler.stats()
    assert stats.censuses == 1, stats  # the budget allowed one census only
    assert stats.survival_rechecks >= 1, stats
    burst_line = by_line[f"{__file__}:{_line_of('# burst site')}"]
    leak_line = by_line[f"{__file__}:{_line_of('# leak site')}"]
    assert "0/4 sampled objects still alive" in burst_line.evidence, burst_line
    assert burst_line.confidence == 0.0
    assert "4/4 sampled objects still alive" in leak_line.evidence, leak_line
    assert leak_line.confidence >= 0.8


def _line_of(marker: str) -> int:
    with open(__file__) as source:
        return next(i for i, text in enumerate(source, 1) if marker in text and "_line_of" not in text)
