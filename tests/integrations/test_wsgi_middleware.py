"""The WSGI middleware: per-request measurement, streaming, exceptions, threads."""

from __future__ import annotations

import itertools
import json
import mmap
import os
import threading
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from resident import fresh_resident  # tests/integrations/resident.py

from kotoba_memory.process import activity
from kotoba_memory.process.memory import shared_reader
from kotoba_memory_integrations import request as _request
from kotoba_memory_integrations.request import (
    DEFAULT_RSS_SAMPLE_EVERY,
    ENVIRON_KEY,
    UNMATCHED_ROUTE,
    RequestMetrics,
    RequestRecorder,
    RssReader,
    current_measurement,
    set_current_route,
)
from kotoba_memory_integrations.wsgi import MemoryMiddleware


class Collected:
    def __init__(self) -> None:
        self.items: list[RequestMetrics] = []
        self.lock = threading.Lock()

    def __call__(self, metrics: RequestMetrics) -> None:
        with self.lock:
            self.items.append(metrics)


class RecordingGc:
    """Implements the GC optimizer's between-request hook; a collection 'happens' inside each request.

    Requests in flight are counted by the process layer, not by the GC optimizer.
    """

    def __init__(self) -> None:
        self.ends = 0
        self.total = 0
        self.lock = threading.Lock()

    def request_ended(self) -> None:
        with self.lock:
            self.ends += 1

    def pause_total_ns(self) -> int:
        return self.total


class RecordingProfiler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None, int | None, float]] = []
        self.lock = threading.Lock()

    def record_request(
        self, route: str, rss_delta: int | None, traced_delta: int | None, duration_s: float
    ) -> None:
        with self.lock:
            self.calls.append((route, rss_delta, traced_delta, duration_s))


def call(app: Any, path: str = "/", method: str = "GET") -> tuple[str | None, bytes, Any]:
    status: list[str] = []

    def start_response(s: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        status.append(s)

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path}
    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return (status[0] if status else None), body, environ


def _ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


def make_recorder(collected: Collected, **kwargs: Any) -> RequestRecorder:
    kwargs.setdefault("rss_sample_every", 1)  # these tests check each request's own RSS figure
    kwargs.setdefault("gc_optimizer", lambda: None)
    kwargs.setdefault("profiler", lambda: None)
    return RequestRecorder(on_request=collected, **kwargs)


def test_records_status_method_and_unmatched_route() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"ok"]

    collected = Collected()
    middleware = MemoryMiddleware(app, recorder=make_recorder(collected))
    status, body, environ = call(middleware, "/users/42", "POST")
    assert (status, body) == ("201 Created", b"ok")
    [m] = collected.items
    assert m.route == UNMATCHED_ROUTE  # never the raw path
    assert (m.method, m.status, m.error) == ("POST", 201, None)
    assert m.duration_s > 0
    assert isinstance(m.rss_delta, int)
    assert environ[ENVIRON_KEY].finished


def test_route_from_the_framework_and_context_cleared() -> None:
    seen: list[object] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(current_measurement())
        set_current_route("/users/<int:id>")
        start_response("200 OK", [])
        return [b""]

    collected = Collected()
    call(MemoryMiddleware(app, recorder=make_recorder(collected)), "/users/42")
    assert collected.items[0].route == "/users/<int:id>"
    assert seen[0] is not None
    assert current_measurement() is None


def test_rss_growth_is_measured() -> None:
    keep: list[mmap.mmap] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        keep.append(fresh_resident(48 << 20))
        start_response("200 OK", [])
        return [b""]

    import psutil

    collected = Collected()
    before = psutil.Process().memory_info().rss
    call(MemoryMiddleware(app, recorder=make_recorder(collected)))
    after = psutil.Process().memory_info().rss
    reader = shared_reader()
    assert collected.items[0].rss_delta >= 40 << 20, (
        f"psutil saw {after - before} bytes of growth; the reader's descriptor {reader._fd} "
        f"is ours: {reader.descriptor_is_ours()}, last reading {reader._last}"
    )
    for block in keep:
        block.close()


def test_traced_delta_only_while_tracing() -> None:
    keep: list[object] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        keep.append([bytes(1000) for _ in range(1000)])
        start_response("200 OK", [])
        return [b""]

    collected = Collected()
    middleware = MemoryMiddleware(app, recorder=make_recorder(collected))
    call(middleware)
    assert collected.items[0].traced_delta is None
    tracemalloc.start()
    try:
        call(middleware)
    finally:
        tracemalloc.stop()
    assert collected.items[1].traced_delta is not None
    assert collected.items[1].traced_delta >= 1_000_000


def test_streaming_body_is_measured_until_close() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ[ENVIRON_KEY].route = "/stream"
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            for i in range(3):
                yield b"chunk%d" % i

        return body()

    collected = Collected()
    middleware = MemoryMiddleware(app, recorder=make_recorder(collected))
    result = middleware({"REQUEST_METHOD": "GET"}, lambda *a: None)
    assert b"".join(result) == b"chunk0chunk1chunk2"
    assert collected.items == []  # not finished until the server closes the iterable
    result.close()  # type: ignore[attr-defined]
    result.close()  # type: ignore[attr-defined]  # idempotent
    assert [m.route for m in collected.items] == ["/stream"]


def test_close_of_the_app_iterable_is_called() -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"a"

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [])
        return Body()

    collected = Collected()
    call(MemoryMiddleware(app, recorder=make_recorder(collected)))
    assert closed == [True]
    assert len(collected.items) == 1


def test_exception_in_app_is_reraised_and_recorded() -> None:
    class Boom(RuntimeError):
        pass

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        set_current_route("/boom")
        raise Boom("kaput")

    collected = Collected()
    with pytest.raises(Boom, match="kaput"):
        call(MemoryMiddleware(app, recorder=make_recorder(collected)))
    [m] = collected.items
    assert (m.route, m.status) == ("/boom", 500)
    assert m.error is not None and m.error.endswith("Boom")


def test_exception_while_streaming_is_reraised_and_recorded_on_close() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            yield b"first"
            raise OSError("disk gone")

        return body()

    collected = Collected()
    middleware = MemoryMiddleware(app, recorder=make_recorder(collected))
    result = middleware({"REQUEST_METHOD": "GET"}, lambda *a: None)
    iterator = iter(result)
    assert next(iterator) == b"first"
    with pytest.raises(OSError, match="disk gone"):
        next(iterator)
    result.close()  # type: ignore[attr-defined]
    [m] = collected.items
    assert (m.status, m.error) == (200, "OSError")


def test_gc_hooks_and_pause_inside_request_and_profiler() -> None:
    gc_opt = RecordingGc()
    profiler = RecordingProfiler()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        gc_opt.total += 2_500_000  # a 2.5 ms pause observed while this request ran
        set_current_route("/gc")
        start_response("200 OK", [])
        return [b""]

    collected = Collected()
    recorder = RequestRecorder(on_request=collected, gc_optimizer=lambda: gc_opt, profiler=lambda: profiler)
    for _ in range(3):
        call(MemoryMiddleware(app, recorder=recorder))
    assert gc_opt.ends == 3 and activity.in_flight() == 0
    assert [m.gc_pause_ns for m in collected.items] == [2_500_000] * 3
    assert [c[0] for c in profiler.calls] == ["/gc"] * 3
    assert all(c[3] > 0 for c in profiler.calls)


def test_failing_hooks_never_reach_the_app() -> None:
    class BrokenGc(RecordingGc):
        def request_ended(self) -> None:
            raise RuntimeError("gc hook bug")

    class BrokenProfiler:
        def record_request(self, *args: object) -> None:
            raise RuntimeError("profiler bug")

    def listener(metrics: RequestMetrics) -> None:
        raise RuntimeError("listener bug")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"fine"]

    before = _request.listener_errors()
    collected = Collected()
    recorder = RequestRecorder(
        on_request=collected, gc_optimizer=lambda: BrokenGc(), profiler=lambda: BrokenProfiler()
    )
    _request.add_request_listener(listener)
    try:
        status, body, _ = call(MemoryMiddleware(app, recorder=recorder))
    finally:
        _request.remove_request_listener(listener)
    assert (status, body) == ("200 OK", b"fine")
    assert len(collected.items) == 1
    assert _request.listener_errors() - before == 3


def test_nested_middlewares_measure_once() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b""]

    collected = Collected()
    recorder = make_recorder(collected)
    call(MemoryMiddleware(MemoryMiddleware(app, recorder=recorder), recorder=recorder))
    assert len(collected.items) == 1


def test_concurrent_requests_from_threads() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        set_current_route(f"/t/{environ['PATH_INFO'].split('/')[2]}")
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]

    collected = Collected()
    middleware = MemoryMiddleware(app, recorder=make_recorder(collected))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                _, body, _ = call(middleware, f"/t/{n}/{i}")
                assert body == f"/t/{n}/{i}".encode()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(collected.items) == 400
    routes = sorted({m.route for m in collected.items})
    assert routes == sorted(f"/t/{n}" for n in range(8))
    assert sum(1 for m in collected.items if m.route == "/t/3") == 50


def test_rss_reader_matches_psutil_and_reopens_after_close() -> None:
    import psutil

    reader = RssReader()
    rss = reader.rss()
    expected = psutil.Process().memory_info().rss
    assert abs(rss - expected) < 64 << 20
    reader.close()
    assert reader.rss() > 0
    reader.close()


def test_rss_reader_measures_the_child_after_fork() -> None:
    import os

    reader = RssReader()
    parent_rss = reader.rss()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: grow by 128 MiB and report what the same reader object sees
        try:
            block = bytearray(128 << 20)
            block[::4096] = b"c" * len(block[::4096])
            os.write(write_end, str(reader.rss()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child_rss = int(pipe.read() or 0)
    os.waitpid(pid, 0)
    assert child_rss >= parent_rss + (100 << 20)  # the child's statm, not the parent's
    assert reader.rss() < parent_rss + (64 << 20)


def test_overlapped_requests_get_no_traced_delta() -> None:
    collected = Collected()
    recorder = make_recorder(collected)
    tracemalloc.start()
    try:
        first = recorder.begin("GET")
        second = recorder.begin("GET")  # runs alongside the first
        keep = [bytes(1000) for _ in range(200)]
        second.finish()
        first.finish()
        alone = recorder.begin("GET")
        keep += [bytes(1000) for _ in range(200)]
        alone.finish()
    finally:
        tracemalloc.stop()
    overlapped_second, overlapped_first, sequential = collected.items
    assert overlapped_second.overlapped and overlapped_first.overlapped
    assert overlapped_second.traced_delta is None and overlapped_first.traced_delta is None
    assert not sequential.overlapped
    assert sequential.traced_delta is not None and sequential.traced_delta >= 200_000
    assert len(keep) == 400


def test_rss_reader_reuses_a_recent_reading_only_within_its_age() -> None:
    reader = RssReader()
    first = reader.rss()
    # Fresh pages from the kernel, touched: malloc could hand a bytearray pages already resident
    # (freed, not trimmed, by an earlier test), and RSS would not move.
    block = mmap.mmap(-1, 64 << 20)
    block[::4096] = b"r" * len(block[::4096])
    assert reader.recent(3600) == first  # young enough: no new read
    assert reader.recent(-1) >= first + (48 << 20)  # too old: read again, sees the growth
    block.close()


def test_rss_sampling_draws_random_gaps_so_periodic_traffic_cannot_alias() -> None:
    gc_opt = RecordingGc()
    profiler = RecordingProfiler()
    collected = Collected()
    recorder = RequestRecorder(
        on_request=collected, gc_optimizer=lambda: gc_opt, profiler=lambda: profiler, rss_sample_every=4,
        rss_sample_budget=None,  # one in 4 throughout: the null app's requests are cheaper than a read
    )

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        set_current_route(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b""]

    middleware = MemoryMiddleware(app, recorder=recorder)
    n = 4000
    for i in range(n):
        call(middleware, "/a" if i % 2 else "/b")  # period 2: a counter sampling 1 in 4 sees only /b
    sampled = [m for m in collected.items if m.sampled]
    # Each request has a 1/4 chance: 1000 +- 27 measured; six standard deviations either way.
    assert 1000 - 165 <= len(sampled) <= 1000 + 165
    for route in ("/a", "/b"):
        assert 500 - 120 <= sum(m.route == route for m in sampled) <= 500 + 120
    gaps = [b - a for a, b in itertools.pairwise(i for i, m in enumerate(collected.items) if m.sampled)]
    assert min(gaps) == 1 and max(gaps) > 12  # geometric, not periodic
    assert all(m.rss_delta == 0 for m in collected.items if not m.sampled)
    assert gc_opt.ends == n and activity.in_flight() == 0  # the GC hook sees every request
    # The profiler counts every request (route attribution regresses on the counts), RSS only if measured.
    assert len(profiler.calls) == n
    assert [c[1] is not None for c in profiler.calls] == [m.sampled for m in collected.items]


def test_rss_sample_every_1_measures_every_request_and_is_not_the_default() -> None:
    profiler = RecordingProfiler()
    collected = Collected()
    recorder = RequestRecorder(on_request=collected, profiler=lambda: profiler, rss_sample_every=1)
    middleware = MemoryMiddleware(_ok_app, recorder=recorder)
    for _ in range(50):
        call(middleware)
    assert all(m.sampled for m in collected.items) and len(collected.items) == 50
    assert all(isinstance(c[1], int) for c in profiler.calls) and len(profiler.calls) == 50
    assert RequestRecorder().every == DEFAULT_RSS_SAMPLE_EVERY == 8
    assert MemoryMiddleware(_ok_app).recorder.every == DEFAULT_RSS_SAMPLE_EVERY


def test_unmeasured_requests_still_get_their_traced_delta_while_tracing() -> None:
    collected = Collected()
    recorder = RequestRecorder(on_request=collected, profiler=lambda: None, rss_sample_every=1_000_000)
    recorder.countdown = 10**9  # no RSS measurement during this test
    keep: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        keep.append(bytes(100_000))
        start_response("200 OK", [])
        return [b""]

    tracemalloc.start()
    try:
        call(MemoryMiddleware(app, recorder=recorder))
    finally:
        tracemalloc.stop()
    [m] = collected.items
    assert not m.sampled and m.rss_delta == 0
    assert m.traced_delta is not None and m.traced_delta >= 100_000


def test_rss_sampling_from_many_threads_keeps_every_request() -> None:
    collected = Collected()
    recorder = RequestRecorder(on_request=collected, gc_optimizer=lambda: None, profiler=lambda: None,
                               rss_sample_every=4, rss_sample_budget=None)
    middleware = MemoryMiddleware(_ok_app, recorder=recorder)
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(500):
            call(middleware)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(collected.items) == 4000 and activity.in_flight() == 0
    # Racing threads may lose a countdown step or both sample; the rate stays near 1 in 4.
    assert 700 <= sum(m.sampled for m in collected.items) <= 1300
    assert recorder.countdown >= 1


def test_forked_children_draw_other_gaps_than_the_parent() -> None:
    recorder = RequestRecorder(rss_sample_every=1000)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next gaps and leave without running pytest's teardown
        try:
            os.write(write, json.dumps([recorder.next_gap() for _ in range(20)]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = json.loads(f.read())
    os.waitpid(pid, 0)
    parent = [recorder.next_gap() for _ in range(20)]
    assert len(child) == 20 and child != parent  # same by chance: about (1/1000) ** 20


@pytest.mark.parametrize("bad", [0, -1, 2_000_000, 1.5, True, "4"])
def test_rss_sample_every_is_validated(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="rss_sample_every"):
        RequestRecorder(rss_sample_every=bad)
