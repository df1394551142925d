"""kotoba_memory_integrations.runtime: one optimizer per process, and the pre-fork/post-fork server hooks."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest

pytest.importorskip("kotoba_memory.optimizer")

from kotoba_memory.config import MemoryConfig
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


def test_post_fork_starts_a_fresh_optimizer_in_the_child() -> None:
    parent_optimizer = runtime.start_optimizer(QUIET)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a gunicorn worker's post_fork hook does
        code = 1
        try:
            runtime.post_fork(None, None)
            child_optimizer = runtime.get_optimizer()
            fresh = child_optimizer is not None and child_optimizer is not parent_optimizer
            ok = fresh and child_optimizer.running
            os.write(write_end, b"ok" if ok else b"bad")
            runtime.stop_optimizer()
            code = 0
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
    assert runtime.get_optimizer() is parent_optimizer and parent_optimizer.running
