"""The MemoryProfiler against real allocations, real tracing windows and real threads."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from kotoba_memory.errors import ConfigError, KotobaMemoryError
from kotoba_memory.memory_profiler import MemoryProfiler, ProfilerError, RouteStats, get_active_profiler

THIS_FILE = str(Path(__file__).resolve())


def fast_profiler(**kwargs: object) -> MemoryProfiler:
    options: dict[str, object] = {
        "sample_interval_s": 0.05,
        "window_s": 0.25,
        "window_interval_s": 0.3,
        "first_window_after_s": 0.05,
    }
    options.update(kwargs)
    return MemoryProfiler(**options)  # type: ignore[arg-type]


def wait_for_windows(profiler: MemoryProfiler, windows: int, work: object, timeout: float = 20.0) -> None:
    """Call ``work()`` until the profiler has seen ``windows`` windows (bounded in time)."""
    deadline = time.monotonic() + timeout
    while profiler.stats().windows < windows and time.monotonic() < deadline:
        work()  # type: ignore[operator]
        time.sleep(0.002)


LEAKED: list[bytes] = []


def leak_some() -> None:
    LEAKED.append(bytes(2048))  # the leak: never removed


def test_leak_is_found_at_its_line() -> None:
    profiler = fast_profiler()
    profiler.start()
    try:
        wait_for_windows(profiler, 6, leak_some)
        analysis = profiler.analyze()
        # On a loaded machine a census of pytest's heap can take most of a second, so survival evidence
        # may lag the growth windows: a leak keeps growing, so more windows can only add evidence.
        windows = 6
        while not analysis.memory_leaks and windows < 16:
            windows += 2
            wait_for_windows(profiler, windows, leak_some)
            analysis = profiler.analyze()
    finally:
        profiler.stop()
        LEAKED.clear()
    assert analysis.memory_leaks, analysis.stats
    top = analysis.memory_leaks[0]
    lines = Path(THIS_FILE).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "# the leak" in text)
    assert top.allocation_site == f"{THIS_FILE}:{line}"
    assert top.growth_rate_bytes_per_s > 0 and top.size > 0 and top.age_seconds > 0
    assert 0.5 <= top.confidence <= 1.0
    assert analysis.hotspots and analysis.hotspots[0].allocation_site == top.allocation_site
    assert analysis.stats.own_memory_bytes > 0
    assert not tracemalloc.is_tracing()


def _bounded_churn_verdict() -> dict[str, object]:
    """Run bounded churn under the profiler; return the reported leak sites and the windows seen."""
    slots: dict[int, list[int]] = {}
    counter = iter(range(10**9))

    def churn() -> None:
        for _ in range(20):
            i = next(counter)
            slots[i % 8] = list(range(30))  # bounded: eight slots replaced over and over
        _ = [str(x) for x in range(50)]

    profiler = fast_profiler()
    profiler.start()
    try:
        wait_for_windows(profiler, 6, churn)
        analysis = profiler.analyze()
    finally:
        profiler.stop()
    return {
        "leaks": [leak.allocation_site for leak in analysis.memory_leaks],
        "windows": analysis.stats.windows,
    }


def test_bounded_churn_and_temporaries_are_not_leaks() -> None:
    # A fresh process: threads that other tests leave running (sweepers, server workers) allocate
    # in the background and are not part of this workload.
    code = (
        "import json, runpy\n"
        f"ns = runpy.run_path({THIS_FILE!r})\n"
        "print(json.dumps(ns['_bounded_churn_verdict']()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    assert verdict["leaks"] == []
    assert isinstance(verdict["windows"], int) and verdict["windows"] >= 6


def test_samples_are_a_bounded_ring() -> None:
    profiler = MemoryProfiler(sample_interval_s=0.01, history_size=5, leak_detection=False)
    profiler.start()
    try:
        deadline = time.monotonic() + 5
        while profiler.stats().samples < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        samples = profiler.samples()
    finally:
        profiler.stop()
    assert len(samples) == 5
    assert samples[-1].rss_bytes > 0
    assert [s.timestamp for s in samples] == sorted(s.timestamp for s in samples)


def test_record_request_from_many_threads_is_exact() -> None:
    profiler = MemoryProfiler(leak_detection=False)
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        for _ in range(1000):
            profiler.record_request(f"/r{n % 2}", 10, 4 if n % 2 else None, 0.001)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    routes = {r.route: r for r in profiler.routes()}
    assert routes["/r0"].requests == 4000 and routes["/r1"].requests == 4000
    assert routes["/r0"].rss_delta_bytes == 40_000
    assert routes["/r0"].mean_traced_delta is None
    assert routes["/r1"].traced_delta_bytes == 16_000 and routes["/r1"].mean_traced_delta == 4


def test_unmeasured_requests_count_but_leave_the_rss_mean_alone() -> None:
    profiler = MemoryProfiler(leak_detection=False)
    for i in range(40):  # RSS measured on one request in 4 (the middleware samples it)
        profiler.record_request("/s", 4096 if i % 4 == 0 else None, None, 0.001)
    [route] = profiler.routes()
    assert (route.requests, route.rss_requests, route.rss_delta_bytes) == (40, 10, 40_960)
    assert route.mean_rss_delta == 4096  # per measured request, not diluted by the unmeasured
    assert profiler._routes.take_window_counts() == {"/s": 40}  # attribution counts every request
    assert RouteStats("/t", 8, 800, 0, 0, 0.0).mean_rss_delta == 100  # rss_requests unset: all requests


def test_routes_are_bounded() -> None:
    profiler = MemoryProfiler(leak_detection=False, max_routes=3)
    for i in range(100):
        profiler.record_request(f"/page/{i}", 0, None, 0.0)
    names = [r.route for r in profiler.routes()]
    assert len(names) <= 4 and "<other>" in names
    with pytest.raises(TypeError, match="route"):
        profiler.record_request(None, 0, None, 0.0)  # type: ignore[arg-type]


def test_failing_gauge_is_counted_and_thread_survives() -> None:
    profiler = MemoryProfiler(sample_interval_s=0.01, leak_detection=False)

    def broken() -> float:
        raise RuntimeError("boom")

    profiler.add_gauge("broken", broken)
    profiler.add_gauge("answer", lambda: 42.0)
    profiler.start()
    try:
        deadline = time.monotonic() + 5
        while profiler.stats().tick_errors < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert profiler.running
        assert profiler.stats().tick_errors >= 3
        assert ("answer", 42.0) in profiler.samples()[-1].gauges
    finally:
        profiler.stop()
    for i in range(14):
        profiler.add_gauge(f"g{i}", lambda: 0.0)
    with pytest.raises(ProfilerError):
        profiler.add_gauge("one-too-many", lambda: 0.0)
    with pytest.raises(TypeError):
        profiler.add_gauge("x", 3)  # type: ignore[arg-type]


def test_lifecycle_active_profiler_and_async_twins() -> None:
    profiler = MemoryProfiler(sample_interval_s=0.01, leak_detection=False)

    async def scenario() -> None:
        await profiler.astart()
        await profiler.astart()  # idempotent
        assert get_active_profiler() is profiler
        analysis = await profiler.aanalyze()
        assert analysis.temporal.samples >= 1
        await profiler.astop()

    asyncio.run(scenario())
    assert not profiler.running
    assert get_active_profiler() is None
    with profiler:
        assert profiler.running
    assert not profiler.running


def test_someone_elses_tracing_is_left_running() -> None:
    tracemalloc.start(3)
    try:
        profiler = fast_profiler()
        profiler.start()
        wait_for_windows(profiler, 2, leak_some)
        profiler.stop()
        assert tracemalloc.is_tracing()
        assert profiler.stats().tracing_mode == "shared"
    finally:
        tracemalloc.stop()
        LEAKED.clear()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sample_interval_s": 0}, "sample_interval_s"),
        ({"sample_interval_s": "1"}, "sample_interval_s"),
        ({"window_s": -1}, "window_s"),
        ({"window_s": 2.0, "window_interval_s": 1.0}, "window_interval_s"),
        ({"history_size": 1}, "history_size"),
        ({"snapshots_per_window": 2}, "snapshots_per_window"),
        ({"trace_frames": 0}, "trace_frames"),
        ({"min_confidence": 1.5}, "min_confidence"),
        ({"memory_limit_bytes": 0}, "memory_limit_bytes"),
        ({"first_window_after_s": -1}, "first_window_after_s"),
        ({"max_sites": True}, "max_sites"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        MemoryProfiler(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert isinstance(info.value, KotobaMemoryError) and isinstance(info.value, ValueError)
