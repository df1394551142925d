"""MallocTrimmer: the background malloc_trim thread."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

import pytest

from kotoba_memory.allocators import AllocatorType, MallocTrimmer, detect_allocator, process

GLIBC = detect_allocator().libc == "glibc" and detect_allocator().type is AllocatorType.SYSTEM
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc malloc only")


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    step = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        step.wait(0.01)
    return predicate()


@needs_glibc
def test_trim_now_trims_only_above_the_threshold() -> None:
    blocks = [bytearray(60_000) for _ in range(300)]
    tail = bytearray(60_000)
    del blocks
    assert MallocTrimmer(min_free_bytes=1 << 40).trim_now() is None
    trimmer = MallocTrimmer(min_free_bytes=1 << 20)
    result = trimmer.trim_now()
    assert result is not None and result.supported
    stats = trimmer.stats()
    assert stats.checks == 1 and stats.trims == 1 and stats.rss_saved_bytes >= 0 and stats.supported
    del tail


@needs_glibc
def test_thread_runs_and_stops() -> None:
    trimmer = MallocTrimmer(interval=0.02, min_free_bytes=0).start()
    try:
        assert _wait_for(lambda: trimmer.stats().trims >= 2)
        assert trimmer.stats().running
        assert trimmer.start() is trimmer  # idempotent
    finally:
        trimmer.stop()
    assert not trimmer.stats().running


@needs_glibc
def test_errors_are_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(process, "heap_stats", broken)
    trimmer = MallocTrimmer(interval=0.02).start()
    try:
        assert _wait_for(lambda: trimmer.stats().errors >= 2)
        assert trimmer.stats().running
    finally:
        trimmer.stop()


def test_does_nothing_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    musl = process.AllocatorInfo(AllocatorType.SYSTEM, None, "musl", None, os.getpid())
    monkeypatch.setattr(process, "detect_allocator", lambda pid=None: musl)
    trimmer = MallocTrimmer(interval=0.01).start()
    stats = trimmer.stats()
    assert not stats.running and not stats.supported and "musl" in (stats.reason or "")
    trimmer.stop()


def test_async_twins() -> None:
    async def main() -> None:
        trimmer = await MallocTrimmer(interval=60).astart()
        await trimmer.astop()
        assert not trimmer.stats().running

    asyncio.run(main())


@pytest.mark.parametrize(
    "kwargs", [{"interval": 0}, {"interval": -1}, {"min_free_bytes": -1}, {"interval": "1"}]
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MallocTrimmer(**kwargs)
