"""kotoba_memory.process: memory readings, the fork registry, the scheduler, the registry, activity."""

from __future__ import annotations

import gc
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kotoba_memory.process import activity, forks, registry
from kotoba_memory.process import memory as process_memory
from kotoba_memory.process.scheduler import Scheduler, Task, _on_grid

ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# -- memory --------------------------------------------------------------------------------------
def test_rss_matches_psutil_and_the_peak_follows_growth() -> None:
    import psutil

    rss = process_memory.rss_bytes()
    assert abs(rss - psutil.Process().memory_info().rss) < 32 << 20
    process_memory.reset_peak()
    block = bytearray(96 << 20)
    block[::4096] = b"p" * len(block[::4096])
    grown = process_memory.rss_bytes()
    del block
    gc.collect()
    assert grown >= rss + (64 << 20)
    assert process_memory.peak_rss_bytes() >= grown
    assert process_memory.virtual_memory_bytes() >= process_memory.rss_bytes()


def test_cgroup_limit_v2_and_v1_are_read_from_the_given_root(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")  # v2 root without a limit
    assert process_memory.cgroup_memory(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{512 << 20}\n")
    (tmp_path / "memory.current").write_text(f"{100 << 20}\n")
    found = process_memory.cgroup_memory(tmp_path)
    assert found is not None and found.kind == "cgroup-v2" and found.limit_bytes == 512 << 20
    usage = process_memory.memory_usage(cgroup=found)
    assert usage.source == "cgroup-v2" and usage.used_bytes == 100 << 20
    assert usage.percent == pytest.approx(100 * 100 / 512)

    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "unlimited"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1")
    assert process_memory.cgroup_memory(v1) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(256 << 20))
    found = process_memory.cgroup_memory(v1)
    assert found is not None and found.kind == "cgroup-v1" and found.limit_bytes == 256 << 20


def test_memory_usage_explicit_limit_judges_this_process_rss() -> None:
    usage = process_memory.memory_usage(limit_bytes=1 << 40)
    assert usage.source == "explicit" and 0 < usage.used_bytes < 1 << 40
    assert process_memory.memory_limit_bytes() > 0


# -- scheduler -----------------------------------------------------------------------------------
def test_tasks_run_on_one_thread_that_exits_when_the_last_is_cancelled() -> None:
    sched = Scheduler()
    seen: list[str] = []
    threads: set[int] = set()

    def make(name: str):  # type: ignore[no-untyped-def]
        def run() -> None:
            seen.append(name)
            threads.add(threading.get_ident())

        return run

    a = sched.every(0.01, make("a"), name="a")
    b = sched.every(0.02, make("b"), name="b", delay_s=0.0)
    assert wait_until(lambda: seen.count("a") >= 3 and seen.count("b") >= 2)
    assert len(threads) == 1 and sched.running
    a.cancel()
    b.cancel()
    assert wait_until(lambda: not sched.running)
    count = len(seen)
    time.sleep(0.05)
    assert len(seen) == count  # nothing runs after cancel() returned


def test_error_path_uses_the_interval_and_success_path_the_returned_delay() -> None:
    sched = Scheduler()
    calls: list[int] = []

    def run() -> float:
        calls.append(1)
        return 0.001

    task = sched.every(3600, run, name="fast", delay_s=0)
    assert wait_until(lambda: len(calls) >= 20)
    task.cancel()

    failures: list[int] = []

    def broken() -> None:
        failures.append(1)
        raise ValueError("always")

    task = sched.every(3600, broken, name="broken", delay_s=0)
    assert wait_until(lambda: failures)
    time.sleep(0.05)
    assert len(failures) == 1 and task.errors == 1  # after an error: the interval, an hour away
    task.run_soon()
    assert wait_until(lambda: len(failures) == 2)
    task.cancel()


def test_tasks_of_one_interval_share_wake_ups_and_keep_their_pace() -> None:
    for now in (0.0, 12.34, 99.999, 1e6 + 0.5):
        for interval in (0.05, 1.0, 5.0, 60.0):
            step = min(interval, 1.0)
            at = _on_grid(now, interval)
            assert interval - step / 2 - 1e-9 <= at - now <= interval + step / 2 + 1e-9
            assert abs(at / step - round(at / step)) < 1e-6  # on the grid
    sched = Scheduler()
    # Each run records the time it was planned for (the task's ``next_at`` while it runs), not when the
    # thread got there: on a loaded machine the two callbacks of one wake-up can be 30+ ms apart.
    runs: dict[str, list[float]] = {"a": [], "b": []}
    tasks: dict[str, Task] = {}

    def record(name: str) -> None:
        if name in tasks:
            runs[name].append(tasks[name].next_at)

    tasks["a"] = sched.every(0.2, lambda: record("a"), name="a", delay_s=0.0)
    tasks["b"] = sched.every(0.2, lambda: record("b"), name="b", delay_s=0.07)
    try:
        assert wait_until(lambda: len(runs["a"]) >= 6 and len(runs["b"]) >= 6, timeout=10)
    finally:
        tasks["a"].cancel()
        tasks["b"].cancel()
    # started 70 ms apart, both are planned for the same grid points from b's second run on (one
    # wake-up late by ~step/2 may round b to the next point; without the grid none would match)
    shared = [t for t in runs["b"][1:] if min(abs(t - u) for u in runs["a"]) < 1e-6]
    assert len(shared) >= len(runs["b"]) - 2
    gaps = [later - earlier for earlier, later in zip(runs["a"][1:], runs["a"][2:], strict=False)]
    assert 0.1 <= statistics.median(gaps) <= 0.3


def test_system_memory_reads_the_same_figures_as_psutil() -> None:
    import psutil

    total, used = process_memory.system_memory()
    vm = psutil.virtual_memory()
    assert total == vm.total
    assert abs(used - (vm.total - vm.available)) < 64 << 20  # read a moment apart on a busy machine
    assert process_memory._meminfo() is not None  # Linux: from /proc/meminfo, not psutil


def test_cancel_waits_for_a_run_in_progress() -> None:
    sched = Scheduler()
    started = threading.Event()
    finished = threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.2)
        finished.set()

    task = sched.every(3600, slow, name="slow", delay_s=0)
    assert started.wait(5)
    task.cancel()
    assert finished.is_set()


def test_bad_arguments_are_refused() -> None:
    sched = Scheduler()
    with pytest.raises(ValueError, match="interval_s"):
        sched.every(0, lambda: None, name="x")
    with pytest.raises(ValueError, match="interval_s"):
        sched.every(float("nan"), lambda: None, name="x")
    with pytest.raises(TypeError, match="callable"):
        sched.every(1, "not callable", name="x")  # type: ignore[arg-type]
    assert not sched.running


# -- registry and activity -----------------------------------------------------------------------
def test_registry_claim_release_and_unknown_kind() -> None:
    first, second = object(), object()
    try:
        assert registry.claim("profiler", first) is None
        assert registry.active("profiler") is first
        assert registry.claim("profiler", second, replace=False) is first  # refused, reported
        assert registry.active("profiler") is first
        registry.release("profiler", second)  # not the running one: no-op
        assert registry.active("profiler") is first
    finally:
        registry.release("profiler", first)
    assert registry.active("profiler") is None
    with pytest.raises(ValueError, match="unknown component kind"):
        registry.claim("bogus", first)


def test_activity_counts_in_flight_and_tells_overlap() -> None:
    assert activity.in_flight() == 0
    alone, epoch = activity.begin()
    assert alone and activity.in_flight() == 1
    assert activity.end(alone, epoch) is False
    a = activity.begin()
    b = activity.begin()
    assert activity.in_flight() == 2
    assert activity.end(*b) is True and activity.end(*a) is True
    activity.mark_end()  # unbalanced: ignored
    assert activity.in_flight() == 0


@pytest.mark.skipif(activity._c is None, reason="pure Python in use: nothing to compare against")
@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["begin", "end", "start", "mark_end", "fork"]),
                              st.integers(0, 7)), max_size=40))
def test_the_c_count_follows_the_python_reference(ops: list[tuple[str, int]]) -> None:
    c = activity._c
    assert c is not None and c.in_flight() == 0
    tokens: dict[str, list[tuple[bool, int]]] = {"py": [], "c": []}
    sides = {
        "py": (activity.py_begin, activity.py_end, activity._flight.append, activity.py_mark_end,
               activity._py_reinit_after_fork, activity.py_in_flight),
        "c": (c.activity_begin, c.activity_end, lambda _: c.mark_start(), c.mark_end, c.after_fork,
              c.in_flight),
    }
    try:
        for op, pick in ops:
            seen = {}
            for side, (begin, end, start, mark_end, fork, in_flight) in sides.items():
                if op == "begin":
                    alone, epoch = begin()
                    tokens[side].append((alone, epoch))
                    seen[side] = alone
                elif op == "end" and tokens[side]:
                    seen[side] = end(*tokens[side].pop(pick % len(tokens[side])))
                elif op == "start":
                    start(None)
                elif op == "mark_end":
                    mark_end()
                elif op == "fork":
                    fork()
                seen[side] = (seen.get(side), in_flight())
            assert seen["py"] == seen["c"], (op, seen)
    finally:
        c.after_fork()
        activity._py_reinit_after_fork()


# -- forks ---------------------------------------------------------------------------------------
def test_register_refuses_non_callables() -> None:
    with pytest.raises(TypeError):
        forks.register()
    with pytest.raises(TypeError, match="callable"):
        forks.register("nope")  # type: ignore[arg-type]


def test_fork_callbacks_run_in_the_child_in_order_and_bound_methods_are_weak() -> None:
    script = textwrap.dedent(
        """
        import gc, os, sys
        from kotoba_memory.process import activity, forks, scheduler

        order = []

        class Component:
            def reinit_after_fork(self):
                order.append("component")

        def broken():
            raise RuntimeError("a broken component")

        kept, dropped = Component(), Component()
        forks.register(lambda: order.append("first"), name="first")
        forks.register(broken, name="broken")
        forks.register(kept.reinit_after_fork, name="kept")
        forks.register(dropped.reinit_after_fork, name="dropped")
        del dropped
        gc.collect()
        task = scheduler.every(0.01, lambda: None, name="tick")
        activity.mark_start()  # a request in flight at fork time
        pid = os.fork()
        if pid == 0:
            ok = order == ["first", "component"] and forks.errors == 1 and forks.fork_count() == 1
            ok = ok and activity.in_flight() == 0
            ok = ok and not scheduler.running and scheduler.paused_by_fork  # no thread behind our back
            scheduler.resume()
            runs = task.runs
            import time
            deadline = time.monotonic() + 5
            while task.runs < runs + 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            ok = ok and task.runs >= runs + 3
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(order, os.waitstatus_to_exitcode(status), activity.in_flight())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[] 0 1"


def test_one_register_at_fork_and_one_statm_reader_in_the_package() -> None:
    sources = [*(ROOT / "core").rglob("*.py"), *(ROOT / "kotoba_memory_integrations").rglob("*.py")]
    fork_hooks = {p for p in sources if "os.register_at_fork(" in p.read_text()}
    statm = {p for p in sources if '"/proc/self/statm"' in p.read_text()}
    assert fork_hooks == {ROOT / "core/kotoba_memory/process/forks.py"}
    assert statm == {ROOT / "core/kotoba_memory/process/memory.py"}


def test_the_profiler_does_not_import_the_gc_optimizer() -> None:
    code = (
        "import sys, kotoba_memory.memory_profiler; "
        "print(any(m.startswith('kotoba_memory.gc_optimizer') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_rss_reader_reads_the_child_after_fork() -> None:
    parent = process_memory.rss_bytes()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            block = bytearray(128 << 20)
            block[::4096] = b"c" * len(block[::4096])
            os.write(write_end, f"{process_memory.rss_bytes()} {process_memory.peak_rss_bytes()}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_rss, child_peak = (int(x) for x in pipe.read().split())
    os.waitpid(pid, 0)
    assert child_rss >= parent + (100 << 20) and child_peak == child_rss


def test_a_worker_forked_during_a_request_reports_traced_deltas_for_its_own_requests() -> None:
    """Issue 11, item 9: the in-flight count must not carry the parent's open request into the child."""
    script = textwrap.dedent(
        """
        import os, tracemalloc
        from kotoba_memory_integrations.request import RequestRecorder

        tracemalloc.start()
        recorder = RequestRecorder(gc_optimizer=lambda: None, profiler=lambda: None)
        open_in_parent = recorder.begin("GET")  # the master is inside a request when it forks
        pid = os.fork()
        if pid == 0:
            results, kept = [], []
            for _ in range(3):
                measurement = recorder.begin("POST")
                kept.append([bytearray(1000) for _ in range(100)])
                results.append(measurement.finish())
            ok = all(r is not None and not r.overlapped and r.traced_delta is not None
                     and r.traced_delta >= 100_000 for r in results)
            print("child", [(r.overlapped, r.traced_delta is not None) for r in results], flush=True)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        parent = open_in_parent.finish()
        print("parent", os.waitstatus_to_exitcode(status), parent.traced_delta is not None, flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "parent 0 True" in out.stdout, out.stdout


def test_before_and_after_in_parent_callbacks_bracket_the_fork_in_the_parent() -> None:
    script = textwrap.dedent(
        """
        import os
        from kotoba_memory.process import forks

        seen = []
        forks.register(lambda: seen.append("child"), before=lambda: seen.append("before"),
                       after_in_parent=lambda: seen.append("parent"), name="bracket")
        pid = os.fork()
        if pid == 0:
            os._exit(0 if seen == ["before", "child"] else 3)
        _, status = os.waitpid(pid, 0)
        print(seen, os.waitstatus_to_exitcode(status))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['before', 'parent'] 0"
