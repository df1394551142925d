"""The profiler's per-route table in C (``kotoba_memory._crecord.RouteTable``) against the Python reference,
and the C request recorder writing to it directly instead of calling ``record_request``."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kotoba_memory import _native
from kotoba_memory.memory_profiler import MemoryProfiler
from kotoba_memory.memory_profiler.profiler import _route_stats, _RouteTable
from kotoba_memory.process import registry
from kotoba_memory_integrations.request import RequestRecorder

_crecord = _native.load("_crecord")
needs_c = pytest.mark.skipif(_crecord is None, reason="pure Python in use: nothing to compare against")


class Route(str):
    """A str subclass whose hashing runs Python code (which could switch threads mid-update)."""

    hashed = 0

    def __hash__(self) -> int:
        Route.hashed += 1
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)


class IntLike:
    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value


ROUTES = st.one_of(st.sampled_from(["/a", "/b", "/c", "/d", "<other>"]), st.text(max_size=3),
                   st.sampled_from(["/a", "/b"]).map(Route), st.integers(0, 3), st.none())
DELTAS = st.one_of(st.none(), st.integers(-10**12, 10**12), st.integers(0, 9).map(IntLike), st.just("x"),
                   st.just(1.5))
DURATIONS = st.one_of(st.floats(0, 10), st.integers(0, 5), st.just("0.25"), st.just("slow"), st.none())
OPS = st.lists(st.one_of(st.tuples(st.just("record"), ROUTES, DELTAS, DELTAS, DURATIONS),
                         st.tuples(st.just("take")), st.tuples(st.just("clear"))), max_size=60)


def _run(table: Any, ops: list[tuple[Any, ...]]) -> list[Any]:
    out: list[Any] = []
    for op in ops:
        try:
            if op[0] == "record":
                out.append(table.record(*op[1:]))
            elif op[0] == "take":
                out.append(table.take_window_counts())
            else:
                out.append(table.clear())
        except Exception as exc:  # the same exception type, and the table unchanged by it
            out.append(type(exc).__name__)
        out.append((sorted(table.rows()), len(table)))
    return out


@needs_c
@settings(max_examples=300, deadline=None)
@given(ops=OPS, max_routes=st.integers(1, 4))
def test_c_route_table_matches_the_reference(ops: list[tuple[Any, ...]], max_routes: int) -> None:
    assert _crecord is not None
    assert _run(_crecord.RouteTable(max_routes), ops) == _run(_RouteTable(max_routes), ops)


@needs_c
def test_c_route_table_refuses_bad_construction_and_calls() -> None:
    assert _crecord is not None
    with pytest.raises(ValueError, match="max_routes"):
        _crecord.RouteTable(0)
    with pytest.raises(TypeError):
        _crecord.RouteTable("3")
    table = _crecord.RouteTable(2)
    with pytest.raises(TypeError, match="4 arguments"):
        table.record("/a", None, None)
    with pytest.raises(TypeError, match="route must be a str, got bytes"):
        table.record(b"/a", None, None, 0.0)
    with pytest.raises(OverflowError):
        table.record("/a", 2**70, None, 0.0)
    assert len(table) == 0 and table.rows() == [] and table.max_routes == 2


@needs_c
def test_c_route_table_keys_a_str_subclass_by_a_plain_copy() -> None:
    assert _crecord is not None
    table = _crecord.RouteTable(4)
    before = Route.hashed
    table.record(Route("/a"), None, None, 0.0)
    table.record("/a", None, None, 0.0)
    assert Route.hashed == before
    ((route, requests, *_),) = table.rows()
    assert (type(route), route, requests) == (str, "/a", 2)


def test_route_stats_put_the_busiest_route_first() -> None:
    table = _RouteTable(8)
    for route, n in (("/few", 1), ("/many", 3), ("/some", 2)):
        for _ in range(n):
            table.record(route, 100, None, 0.5)
    assert [(s.route, s.requests, s.rss_delta_bytes, s.rss_requests) for s in _route_stats(table)] == [
        ("/many", 3, 300, 3), ("/some", 2, 200, 2), ("/few", 1, 100, 1)]


@pytest.fixture
def active_profiler() -> Any:
    made: list[MemoryProfiler] = []

    def activate(profiler: MemoryProfiler) -> MemoryProfiler:
        registry.claim("profiler", profiler)
        made.append(profiler)
        return profiler

    yield activate
    for profiler in made:
        registry.release("profiler", profiler)


def _serve(recorder: Any, route: str, n: int) -> None:
    for _ in range(n):
        measurement = recorder.begin("GET")
        measurement.route = route
        measurement.finish()


def test_the_recorder_fills_the_running_profilers_table(active_profiler: Any) -> None:
    recorder = RequestRecorder(rss_sample_every=1)
    first = active_profiler(MemoryProfiler(leak_detection=False))
    _serve(recorder, "/one", 3)
    second = active_profiler(MemoryProfiler(leak_detection=False))  # replaces the first
    _serve(recorder, "/two", 2)
    assert [(s.route, s.requests, s.rss_requests) for s in first.routes()] == [("/one", 3, 3)]
    assert [(s.route, s.requests) for s in second.routes()] == [("/two", 2)]
    assert second._routes.take_window_counts() == {"/two": 2}


def test_a_subclass_overriding_record_request_is_called(active_profiler: Any) -> None:
    seen: list[tuple[Any, ...]] = []

    class Counting(MemoryProfiler):
        def record_request(self, route: str, rss_delta: int | None, traced_delta: int | None,
                           duration_s: float) -> None:
            seen.append((route, rss_delta))
            super().record_request(route, rss_delta, traced_delta, duration_s)

    profiler = active_profiler(Counting(leak_detection=False))
    assert profiler._request_sink is None
    _serve(RequestRecorder(rss_sample_every=1_000_000), "/x", 2)
    assert [route for route, _ in seen] == ["/x", "/x"]
    assert [(s.route, s.requests) for s in profiler.routes()] == [("/x", 2)]


def test_the_recorder_lets_go_of_a_profiler_that_stopped_running() -> None:
    recorder = RequestRecorder()
    profiler = MemoryProfiler(leak_detection=False)
    registry.claim("profiler", profiler)
    try:
        _serve(recorder, "/a", 1)
    finally:
        registry.release("profiler", profiler)
    _serve(recorder, "/a", 1)  # no profiler running now
    ref = weakref.ref(profiler)
    del profiler
    gc.collect()
    assert ref() is None


def test_many_threads_through_the_recorder_count_every_request(active_profiler: Any) -> None:
    profiler = active_profiler(MemoryProfiler(leak_detection=False, max_routes=3))
    recorder = RequestRecorder(rss_sample_every=4)

    def worker(k: int) -> None:
        for i in range(500):
            _serve(recorder, f"/r{(k + i) % 5}", 1)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = profiler.routes()
    assert sum(s.requests for s in stats) == 4000
    assert len(stats) == 4 and "<other>" in {s.route for s in stats}  # 3 routes kept apart, the rest pooled
    assert sum(profiler._routes.take_window_counts().values()) == 4000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_keeps_the_same_table_and_starts_it_empty(active_profiler: Any) -> None:
    profiler = active_profiler(MemoryProfiler(leak_detection=False))
    recorder = RequestRecorder()
    _serve(recorder, "/parent", 2)
    table = profiler._routes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what the fork registry runs, then a request of its own
        ok = False
        try:
            profiler.reinit_after_fork()
            _serve(recorder, "/child", 1)
            ok = profiler._routes is table and [(s.route, s.requests) for s in profiler.routes()] == [
                ("/child", 1)]
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert [(s.route, s.requests) for s in profiler.routes()] == [("/parent", 2)]
