"""Trace read-backs made outside pymalloc's pools (``kotoba_memory._cunpooled``), and the profiler's
heap figures while they are alive."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kotoba_memory import _native
from kotoba_memory.memory_profiler import MemoryProfiler
from kotoba_memory.memory_profiler import profiler as profiler_module
from kotoba_memory.process import memory as process_memory

REPO = Path(__file__).resolve().parents[2]
_cunpooled: Any = _native.load("_cunpooled")
pytestmark = pytest.mark.skipif(_cunpooled is None, reason="pure Python in use: C builds only")


def pool_blocks_in_use() -> int | None:
    """Blocks in use in pymalloc's pools (None when pymalloc is not the object allocator)."""
    sys.path[:0] = [str(REPO)]
    try:
        from benchmarks.field_apps._profiling import pymalloc_stats
    finally:
        sys.path.remove(str(REPO))
    stats = pymalloc_stats()
    return None if stats is None else int(stats["blocks_in_use"])


def made_in_c() -> list[tuple[int, float]]:
    """100k tuples of an int and a float, each made in one C call (no bytecode runs meanwhile)."""
    return list(zip(range(10**9, 10**9 + 100_000), map(float, range(100_000))))


@pytest.fixture
def no_tracing() -> Iterator[None]:
    if tracemalloc.is_tracing():
        pytest.skip("someone else keeps tracemalloc on")
    yield


def test_objects_made_in_the_call_stay_out_of_pymallocs_pools(no_tracing: None) -> None:
    if pool_blocks_in_use() is None:
        pytest.skip("pymalloc is not the object allocator here")
    gc.collect()
    blocks, pooled = sys.getallocatedblocks(), pool_blocks_in_use()
    made, new_blocks, heap = _cunpooled.call(made_in_c)
    assert len(made) == 100_000 and made[5] == (10**9 + 5, 5.0)
    # counted as blocks like any raw-served object block, but none of the 300k sits in a pool; the
    # slack is for what a thread left running by an earlier test frees meanwhile (60 blocks seen on 3.13)
    assert sys.getallocatedblocks() - blocks >= 300_000 - 1_000
    assert pool_blocks_in_use() - pooled < 1_000  # type: ignore[operator]
    assert new_blocks >= 300_000 and heap >= 32 * new_blocks
    # the same objects made outside the call do take pool blocks
    again = made_in_c()
    assert pool_blocks_in_use() - pooled > 250_000  # type: ignore[operator]
    del made, again
    gc.collect()
    # each block freed where it was made: the process's block count comes back
    assert abs(sys.getallocatedblocks() - blocks) < 1_000


def test_the_allocator_and_the_collector_are_restored_after_the_call(no_tracing: None) -> None:
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            assert _cunpooled.call(gc.isenabled)[0] is False  # paused during the call
            assert gc.isenabled() is enabled
        if pool_blocks_in_use() is not None:
            _cunpooled.call(made_in_c)
            pooled = pool_blocks_in_use()
            keep = made_in_c()
            assert pool_blocks_in_use() - pooled > 250_000  # type: ignore[operator]
            del keep
    finally:
        (gc.enable if was else gc.disable)()


def test_errors_propagate_and_bad_arguments_are_refused(no_tracing: None) -> None:
    def fails() -> None:
        raise LookupError("from inside")

    with pytest.raises(LookupError, match="from inside"):
        _cunpooled.call(fails)
    with pytest.raises(TypeError, match="func must be callable, got int"):
        _cunpooled.call(1)
    # a call from inside a call is refused; the outer call goes on and restores the allocator
    with pytest.raises(RuntimeError, match="already running"):
        _cunpooled.call(lambda: _cunpooled.call(list))
    assert _cunpooled.call(list)[0] == []


def test_the_traces_read_back_are_tracemallocs_own_and_tracing_goes_on(no_tracing: None) -> None:
    tracemalloc.start(4)
    try:
        keep = [bytearray(64) for _ in range(2_000)]
        direct = tracemalloc._get_traces()  # type: ignore[attr-defined]
        unpooled, _, heap = _cunpooled.call(tracemalloc._get_traces)  # type: ignore[attr-defined]
        assert heap > 0
        assert abs(len(unpooled) - len(direct)) < 200  # `direct` itself is one more list and tuple set
        assert {t[2] for t in unpooled} >= {t[2] for t in direct if t[1] == sys.getsizeof(keep[0])} - {()}
        made_after = bytearray(64)
        assert tracemalloc.get_object_traceback(made_after) is not None  # tracemalloc's hook is back
        del unpooled, direct
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("allocator", ["debug", "malloc", "pymalloc_debug"])
def test_any_object_allocator_frees_what_the_call_made(allocator: str) -> None:
    script = textwrap.dedent(
        """
        import gc, tracemalloc
        from kotoba_memory import _cunpooled
        for tracing in (False, True):
            if tracing:
                tracemalloc.start(3)
            kept = [_cunpooled.call(lambda: [(i, str(i)) for i in range(20000)])[0] for _ in range(3)]
            traces = _cunpooled.call(tracemalloc._get_traces)[0]
            del kept[1]
            gc.collect()
            kept.append([(i, float(i)) for i in range(20000)])
            del kept, traces
            gc.collect()
        tracemalloc.stop()
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONMALLOC": allocator}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_windows_read_backs_neither_show_as_heap_growth_nor_stay_booked_as_ours(
    monkeypatch: pytest.MonkeyPatch, no_tracing: None
) -> None:
    if process_memory.heap_in_use_bytes() is None:
        pytest.skip("glibc's heap cannot be read here")
    profiler = MemoryProfiler(window_s=60.0, window_interval_s=120.0, snapshots_per_window=4)
    live = [bytearray(48) for _ in range(20_000)]  # alive before the window: not traced

    def heap_sample() -> int:
        profiler._next_heap_read = 0.0  # read glibc's heap at this sample
        profiler._sample()
        heap = profiler.samples()[-1].heap_bytes
        assert heap is not None
        return heap

    profiler._window_step()  # opens the window and reads its first snapshot back
    made = [(i, str(i)) for i in range(30_000)]  # traced: ~60k traces for the next read-backs
    profiler._window_step()
    window = profiler._window
    assert window is not None
    first, read_before = heap_sample(), window.raw_heap
    profiler._window_step()  # the same ~60k traces read back once more, nothing else made meanwhile
    second, added = heap_sample(), window.raw_heap - read_before
    assert added > 2_000_000  # the read-back took MBs of glibc's heap...
    assert abs(second - first) < added / 10  # ...which the heap samples leave out
    assert profiler._own_heap < added / 10  # and which are not booked as ours for good
    profiler._window_step()  # the last snapshot: the window closes and drops its read-backs
    assert profiler._window is None
    del live, made
    monkeypatch.setattr(profiler_module, "_cunpooled", None)  # the pure-Python path still reads back
    raw, heap = profiler_module._raw_traces()
    assert raw == [] and heap == 0  # tracing stopped with the window


_READ_BACKS_IN_RSS = textwrap.dedent(
    """
    import gc, sys, threading
    from kotoba_memory.memory_profiler import MemoryProfiler
    from kotoba_memory.memory_profiler import profiler as profiler_module
    from kotoba_memory.process import memory as pm
    variant, end = sys.argv[1:]
    if variant == "untrimmed":
        profiler_module._TRIM_AFTER_READ_BACKS = 1 << 62
    profiler = MemoryProfiler(
        window_s=60.0, window_interval_s=120.0, snapshots_per_window=6, max_trace_memory_bytes=1 << 30
    )
    app = [(i, str(i)) for i in range(200_000)]
    out = []
    def scheduler():
        profiler._window_step()
        before = pm.rss_bytes()
        made = [(i, str(i), [i]) for i in range(25_000)]
        peak = 0
        while profiler._window is not None:
            if end == "abandoned" and len(profiler._window.raws) == 5:
                # The trace table grew over its cap: the next step gives the window up.
                profiler.max_trace_memory_bytes = 1
            profiler._window_step()
            peak = max(peak, pm.rss_bytes())
        del made
        gc.collect()
        out.extend([before, peak, pm.rss_bytes(), profiler._skipped_windows])
    thread = threading.Thread(target=scheduler)
    thread.start()
    thread.join()
    print(*out)
    """
)


def read_backs_kept_in_rss(variant: str, end: str) -> float:
    """Share of a window's read-back peak still in RSS after it ended (a process of its own)."""
    if process_memory.heap_in_use_bytes() is None:
        pytest.skip("glibc's heap cannot be read here")
    # RSS is the measure, and the read-backs run on a thread of their own as on the profiler's
    # scheduler (its own glibc arena). 75k traced blocks, read back five or six times.
    done = subprocess.run(
        [sys.executable, "-c", _READ_BACKS_IN_RSS, variant, end],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    before, peak, after, skipped = (int(x) for x in done.stdout.split())
    assert skipped == (end == "abandoned")
    assert peak - before > 30 << 20  # the read-backs took tens of MiB while the window held them
    return (after - before) / (peak - before)


def test_a_closed_windows_read_backs_do_not_stay_in_the_processs_rss() -> None:
    figures = {variant: read_backs_kept_in_rss(variant, "closed") for variant in ("trimmed", "untrimmed")}
    assert figures["trimmed"] < 0.35, figures  # handed back when the window closed (0.17 here)...
    assert figures["untrimmed"] > 0.5, figures  # ...which glibc alone does not do


def test_an_abandoned_windows_read_backs_do_not_stay_in_the_processs_rss() -> None:
    # Given up over the trace table's cap after five snapshots: its read-backs are dropped and
    # trimmed as a closed window's are (without the trim, 0.91 of the peak was kept in a run by hand).
    assert read_backs_kept_in_rss("trimmed", "abandoned") < 0.35


def test_no_swap_while_another_interpreter_exists(no_tracing: None) -> None:
    # The allocator is process-wide and its swap atomic only under one GIL: with a subinterpreter (its
    # own GIL from 3.12), call() is refused and the profiler reads back in the pools instead.
    try:
        import _interpreters as interpreters  # type: ignore[import-not-found]  # 3.13+
    except ImportError:
        import _xxsubinterpreters as interpreters  # type: ignore[import-not-found,no-redef]
    assert _cunpooled.alone()
    interp = interpreters.create()
    try:
        assert not _cunpooled.alone()
        with pytest.raises(RuntimeError, match="another interpreter"):
            _cunpooled.call(list)
        tracemalloc.start(1)
        try:
            kept = made_in_c()
            raw, heap = profiler_module._raw_traces()
        finally:
            tracemalloc.stop()
        assert heap == 0  # read back in the pools: nothing booked in glibc's heap
        assert len(raw) >= len(kept)
    finally:
        interpreters.destroy(interp)
    assert _cunpooled.alone()
    assert _cunpooled.call(list)[0] == []  # usable again
