"""kotoba_memory_integrations.runtime: one optimizer per process, and the pre-fork/post-fork server hooks."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("kotoba_memory.optimizer")

from kotoba_memory.config import MemoryConfig
from kotoba_memory.process import registry, scheduler
from kotoba_memory_integrations import runtime

QUIET = MemoryConfig(enable_profiling=False, enable_caching=False, enable_gc_optimization=True)


@pytest.fixture(autouse=True)
def clean() -> object:
    runtime.stop_optimizer()
    yield None
    runtime.stop_optimizer()


def test_start_is_once_per_process_and_stop_returns_the_report() -> None:
    first = runtime.start_optimizer(QUIET)
    assert runtime.start_optimizer(MemoryConfig(enable_profiling=False)) is first  # first config wins
    assert runtime.get_optimizer() is first and first.running
    assert runtime.current_report() is not None and first.running  # a report does not stop it
    report = runtime.stop_optimizer()
    assert report is not None and "kotoba-memory report" in report.summary()
    assert runtime.get_optimizer() is None and runtime.stop_optimizer() is None
    assert runtime.current_report() is None


def test_pre_fork_freezes_the_heap() -> None:
    runtime.start_optimizer(QUIET)
    try:
        runtime.pre_fork(None, None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def _run_in_child(child: Callable[[], bool]) -> None:
    """Fork; the child runs ``child()`` and reports its verdict through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(write_end, b"ok" if child() else b"bad")
            code = 0
        except BaseException as exc:  # report, don't raise: we are a forked copy of pytest
            os.write(write_end, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish within 30 s")
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == b"ok"
    assert status == 0


def _kotoba_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kotoba")]


def _one_optimizer_with_working_threads(parent: Any) -> bool:
    """In the child: exactly one running optimizer (the inherited one), one thread of ours, sampling."""
    optimizer = runtime.get_optimizer()  # resumes the child's scheduler
    if optimizer is not parent or not optimizer.running or registry.active("optimizer") is not optimizer:
        return False
    profiler = optimizer.profiler
    before = profiler.stats().samples
    deadline = time.monotonic() + 10
    while profiler.stats().samples < before + 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    report = runtime.stop_optimizer()
    ok = profiler.stats().samples >= before + 3 and len(_kotoba_threads()) <= 1
    return ok and report is not None and runtime.get_optimizer() is None


FULL = MemoryConfig(enable_profiling=True, enable_caching=True, enable_gc_optimization=True,
                    monitoring_interval_ms=20, enable_leak_detection=True)


def test_full_optimizer_runs_one_background_thread() -> None:
    optimizer = runtime.start_optimizer(FULL)
    optimizer.cache.put("k", 1, ttl=30)  # the TTL sweeper is one more task, not one more thread
    time.sleep(0.1)
    threads = _kotoba_threads()
    assert len(threads) == 1, threads
    names = {task.name for task in scheduler.tasks()}
    assert {"memory_profiler.sample", "gc_optimizer.monitor", "cache.sweeper"} <= names


def test_post_fork_resumes_the_inherited_optimizer_in_the_child() -> None:
    parent = runtime.start_optimizer(FULL)

    def child() -> bool:
        runtime.post_fork(None, None)  # what a gunicorn worker's post_fork hook does
        return scheduler.running and _one_optimizer_with_working_threads(parent)

    _run_in_child(child)
    assert runtime.get_optimizer() is parent and parent.running and scheduler.running


def test_bare_fork_gets_exactly_one_optimizer_without_threads_started_behind_its_back() -> None:
    parent = runtime.start_optimizer(FULL)
    parent.report()

    def child() -> bool:
        # No fork hook started a thread; the inherited optimizer waits for the child's first call.
        quiet = not scheduler.running and scheduler.paused_by_fork and not _kotoba_threads()
        fresh = parent.profiler.stats().samples <= 1  # the parent's history is not the child's
        return quiet and fresh and _one_optimizer_with_working_threads(parent)

    _run_in_child(child)
    assert parent.running
