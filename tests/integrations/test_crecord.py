"""The request recorder in C (``kotoba_memory._crecord``) against the pure-Python reference.

The same generated operation sequences drive ``PyRequestRecorder`` and ``CRequestRecorder`` with the same
scripted GC optimizer, profiler, RSS reader and listeners; every result, delivery, error count and
in-flight count must be identical. Then threads, bad input and fork on both.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotoba_memory import _native
from kotoba_memory.process import activity
from kotoba_memory_integrations import request as _request
from kotoba_memory_integrations.request import (
    KNOWN_METHODS,
    OTHER_METHOD,
    PyRequestRecorder,
    RequestMeasurement,
    RequestMetrics,
    add_request_listener,
    current_measurement,
    listener_errors,
    remove_request_listener,
)

C_BUILT = _request.CRequestRecorder is not None
needs_c = pytest.mark.skipif(not C_BUILT, reason="pure Python in use: nothing to compare against")

IMPLEMENTATIONS: list[Any] = [PyRequestRecorder] + ([_request.CRequestRecorder] if C_BUILT else [])
impl = pytest.mark.parametrize("recorder_cls", IMPLEMENTATIONS, ids=lambda c: c.__name__[:2])


class Script:
    """Values handed out in call order; an Exception instance in the script is raised instead."""

    def __init__(self, values: list[Any], log: list[Any], name: str) -> None:
        self.values, self.log, self.name, self.i = values, log, name, 0

    def next(self) -> Any:
        value = self.values[self.i % len(self.values)]
        self.i += 1
        self.log.append((self.name, repr(value)))
        if isinstance(value, BaseException):
            raise value
        return value


class FakeGc:
    def __init__(self, pauses: Script, ended: Script) -> None:
        self.pauses, self.ended = pauses, ended

    def pause_total_ns(self) -> Any:
        return self.pauses.next()

    def request_ended(self) -> None:
        self.ended.next()


class FakeRss:
    def __init__(self, script: Script, log: list[Any]) -> None:
        self.script, self.log = script, log

    def rss(self) -> Any:
        return self.script.next()

    def recent(self, max_age_s: float) -> Any:
        self.log.append(("recent", max_age_s))
        return self.script.next()


def normalized(metrics: Any) -> Any:
    """A RequestMetrics without what the two cannot share: the wall time and the traced delta's value
    (the real tracemalloc counts each implementation's own allocations; whether it is given is kept)."""
    if not isinstance(metrics, RequestMetrics):
        return metrics
    assert isinstance(metrics.duration_s, float) and 0 <= metrics.duration_s < 60
    assert metrics.traced_delta is None or isinstance(metrics.traced_delta, int)
    return metrics._replace(duration_s=None, traced_delta=metrics.traced_delta is not None)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), st.sampled_from(["GET", "POST", "BREW", "get", 7, None])),
        st.tuples(st.just("route"), st.integers(0, 5), st.sampled_from(["/a", "/b/<id>", "", None, 0])),
        st.tuples(st.just("status"), st.integers(0, 5), st.sampled_from([200, 404, None, "x"])),
        st.tuples(st.just("fail"), st.integers(0, 5), st.sampled_from([ValueError, KeyError, OSError])),
        st.tuples(st.just("finish"), st.integers(0, 5)),
        st.tuples(st.just("activate"), st.integers(0, 5)),
        st.tuples(st.just("deactivate"), st.integers(0, 5)),
        st.tuples(st.just("tracing"), st.booleans()),
        st.tuples(st.just("nested"), st.booleans()),
    ),
    max_size=40,
)
GC_VALUES = st.lists(
    st.sampled_from([0, 5, 1_000, 10**30, "12", 2.5, None, "junk", ValueError("gc")]), min_size=1, max_size=6
)
RSS_VALUES = st.lists(st.sampled_from([4096, 8192, 10**25, 0, -4096]), min_size=1, max_size=6)
DELIVERY = st.lists(st.sampled_from([None, None, None, RuntimeError("boom")]), min_size=1, max_size=4)


def run_sequence(
    recorder_cls: Any, ops: list[tuple[Any, ...]], *, every: int, seed: int, gc_values: list[Any],
    rss_values: list[Any], profiler_fails: list[Any], listener_fails: list[Any], with_gc: bool,
) -> list[Any]:
    """Everything observable of one implementation running ``ops``: results, calls, counts."""
    log: list[Any] = []
    gc_opt = FakeGc(Script(gc_values, log, "pause"), Script([None, None, TypeError("ended")], log, "ended"))
    profiler_script = Script(profiler_fails, log, "profiler")
    listener_script = Script(listener_fails, log, "listener")

    class Profiler:
        def record_request(self, route: Any, rss: Any, traced: Any, duration: Any) -> None:
            log.append(("record", route, rss, traced is not None, type(duration).__name__))
            profiler_script.next()

    profiler = Profiler()
    nested_on = [False]
    recorder: Any = None

    def on_request(metrics: Any) -> None:
        log.append(("on_request", normalized(metrics)))
        if nested_on[0] and metrics.route != "/nested":
            nested_on[0] = False  # one level: the nested request's own delivery must not recurse
            inner = recorder.begin("PUT")
            inner.route = "/nested"
            log.append(("nested", normalized(inner.finish()), activity.in_flight()))

    def listener(metrics: Any) -> None:
        log.append(("listener", normalized(metrics)))
        listener_script.next()

    _request._rng.seed(seed)
    recorder = recorder_cls(
        gc_optimizer=(lambda: gc_opt) if with_gc else (lambda: None), profiler=lambda: profiler,
        on_request=on_request, rss_reader=FakeRss(Script(rss_values, log, "rss"), log),
        rss_sample_every=every, rss_sample_budget=None,  # gaps from the seed alone, not from timings
    )
    started: list[RequestMeasurement] = []
    errors0, flight0 = listener_errors(), activity.in_flight()
    add_request_listener(listener)
    try:
        for op in ops:
            kind = op[0]
            if kind == "begin":
                try:
                    started.append(recorder.begin(op[1]))
                    log.append(("begun", started[-1].method, recorder.countdown))
                except Exception as exc:  # an unhashable method, or what a fake raised
                    log.append(("begin raised", type(exc).__name__))
            elif kind == "tracing":
                if op[1] and not tracemalloc.is_tracing():
                    tracemalloc.start()
                elif not op[1] and tracemalloc.is_tracing():
                    tracemalloc.stop()
            elif kind == "nested":
                nested_on[0] = op[1]
            elif started:
                m = started[op[1] % len(started)]
                if kind == "route":
                    m.route = op[2]
                elif kind == "status":
                    m.status = op[2]
                elif kind == "fail":
                    m.fail(op[2]("x"))
                elif kind == "activate":
                    m.activate()
                    log.append(("current is it", current_measurement() is m))
                elif kind == "deactivate":
                    m.deactivate()
                    log.append(("current is it", current_measurement() is m))
                elif kind == "finish":
                    try:
                        log.append(("finish", normalized(m.finish()), m.finished))
                    except Exception as exc:  # junk from the fake RSS reader
                        log.append(("finish raised", type(exc).__name__, m.finished))
            log.append(("in flight", activity.in_flight() - flight0))
        for m in started:  # every request ends, so the next run starts from the same count
            m.deactivate()
            try:
                log.append(("final", normalized(m.finish())))
            except Exception as exc:
                log.append(("final raised", type(exc).__name__))
    finally:
        remove_request_listener(listener)
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    log.append(("errors", listener_errors() - errors0, "in flight", activity.in_flight() - flight0))
    return log


@needs_c
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=OPS, every=st.sampled_from([1, 2, 3, 8]), seed=st.integers(0, 2**32), gc_values=GC_VALUES,
    rss_values=RSS_VALUES, profiler_fails=DELIVERY, listener_fails=DELIVERY, with_gc=st.booleans(),
)
def test_both_recorders_record_and_deliver_the_same(**kw: Any) -> None:
    assert _request.CRequestRecorder is not None
    # each in a context of its own: activations left unbalanced must not leak into other tests
    reference = contextvars.copy_context().run(run_sequence, PyRequestRecorder, **kw)
    compiled = contextvars.copy_context().run(run_sequence, _request.CRequestRecorder, **kw)
    assert compiled == reference
    assert activity.in_flight() == 0 and current_measurement() is None


def test_the_extension_is_in_use_unless_pure_python_is_forced() -> None:
    assert C_BUILT or _native.pure_python_forced()


@needs_c
def test_the_default_recorder_is_the_c_one_and_its_measurements_are_request_measurements() -> None:
    assert _request.RequestRecorder is _request.CRequestRecorder
    recorder = _request.RequestRecorder()
    m = recorder.begin()
    assert isinstance(m, RequestMeasurement) and type(m).__module__ == "kotoba_memory._crecord"
    assert m.finish() is not None and m.finished
    import kotoba_memory.__about__ as about

    assert about.implementations()["_crecord"] == "c"


@impl
def test_a_begin_that_raises_leaves_nothing_in_flight(recorder_cls: Any) -> None:
    def broken_getter() -> Any:
        raise LookupError("no optimizer")

    class BadRss:
        def rss(self) -> int:
            raise OSError("statm")

        def recent(self, max_age_s: float) -> int:
            raise OSError("statm")

    flight0 = activity.in_flight()
    with pytest.raises(LookupError):
        recorder_cls(gc_optimizer=broken_getter).begin()
    with pytest.raises(OSError):
        recorder_cls(rss_reader=BadRss(), rss_sample_every=1).begin()
    with pytest.raises(TypeError):
        recorder_cls().begin(["unhashable"])
    assert activity.in_flight() == flight0


@impl
def test_the_registry_getters_find_what_is_registered_whichever_field_holds_them(recorder_cls: Any) -> None:
    from kotoba_memory.process import registry

    class Component:
        def __init__(self) -> None:
            self.pauses = 0
            self.records: list[Any] = []

        def pause_total_ns(self) -> int:
            self.pauses += 1
            return 0

        def request_ended(self) -> None:
            pass

        def record_request(self, *args: Any) -> None:
            self.records.append(args)

    gc_like, profiler_like = Component(), Component()
    registry.claim("gc_optimizer", gc_like)
    registry.claim("profiler", profiler_like)
    try:
        recorder_cls(rss_sample_every=1_000_000).begin().finish()  # the defaults: each finds its own
        assert gc_like.pauses == 2 and len(profiler_like.records) == 1
        # swapped: each field asks what its getter returns, as a call of the getter would
        swapped = recorder_cls(
            gc_optimizer=registry.getter("profiler"), profiler=registry.getter("gc_optimizer"),
            rss_sample_every=1_000_000,
        )
        swapped.begin().finish()
        assert profiler_like.pauses == 2 and len(gc_like.records) == 1
    finally:
        registry.release("gc_optimizer", gc_like)
        registry.release("profiler", profiler_like)
    assert recorder_cls(rss_sample_every=1_000_000).begin().finish() is not None  # nothing registered
    assert registry.getter("profiler") is registry.getter("profiler")


@impl
def test_getters_returning_junk_are_counted_never_raised(recorder_cls: Any) -> None:
    class Junk:
        def pause_total_ns(self) -> str:
            return "not a number"

        def request_ended(self) -> None:
            raise AssertionError("not called: the pause reading failed at begin")

    class NoRecord:
        record_request = 42  # not callable

    errors0 = listener_errors()
    recorder = recorder_cls(gc_optimizer=lambda: Junk(), profiler=lambda: NoRecord(), on_request=3)
    metrics = recorder.begin("GET").finish()
    assert metrics is not None and metrics.gc_pause_ns == 0
    # the pause reading at begin, the profiler's record_request and the uncallable on_request
    assert listener_errors() - errors0 == 3
    recorder.deliver("not metrics")  # read by attribute, as the reference does: counted, not raised
    assert listener_errors() - errors0 == 5


@impl
def test_a_base_exception_from_a_listener_propagates_after_the_request_ended(recorder_cls: Any) -> None:
    def interrupt(metrics: RequestMetrics) -> None:
        raise KeyboardInterrupt

    flight0 = activity.in_flight()
    m = recorder_cls(on_request=interrupt, profiler=lambda: None).begin()
    with pytest.raises(KeyboardInterrupt):
        m.finish()
    assert m.finished and activity.in_flight() == flight0 and m.finish() is None


@impl
def test_rss_readings_of_the_wrong_type_raise_the_same_type_error(recorder_cls: Any) -> None:
    class StrRss:
        def rss(self) -> str:
            return "4096"

        def recent(self, max_age_s: float) -> int:
            return 4096

    m = recorder_cls(rss_reader=StrRss(), rss_sample_every=1).begin()
    with pytest.raises(TypeError):
        m.finish()
    assert m.finished


@needs_c
def test_c_entry_points_refuse_bad_input_clearly() -> None:
    import kotoba_memory._crecord as crecord

    recorder = _request.CRequestRecorder()
    with pytest.raises(TypeError, match="at most 1 argument"):
        recorder.begin("GET", "POST")
    with pytest.raises(TypeError, match="unexpected keyword"):
        recorder.begin(verb="GET")
    m = recorder.begin(method="DELETE")
    assert m.method == "DELETE"
    m.finish()
    with pytest.raises(TypeError):
        type(m)()
    with pytest.raises(TypeError):
        recorder.countdown = "soon"
    with pytest.raises(TypeError, match="must be a ContextVar"):
        crecord.configure(RequestMeasurement, RequestMetrics, None, None, print, print, "u", frozenset(), "o",
                          print, print, 0.01, {}, print, print)
    with pytest.raises(TypeError, match="tuple"):
        crecord.set_listeners([print])
    with pytest.raises(TypeError, match="exactly 2 arguments"):
        crecord.activity_end(True)
    with pytest.raises(TypeError):
        crecord.configure()
    bare = crecord.Recorder()  # the C base alone, never initialised: errors, no crash
    with pytest.raises(AttributeError, match="gc_optimizer"):
        bare.begin()
    assert activity.in_flight() == 0
    with pytest.raises(ZeroDivisionError):
        bare.next_gap()


class _Verb(str):
    """A str subclass: the set decides its membership (the C copy of the members only takes exact str)."""


@needs_c
@pytest.mark.parametrize("method", [
    *sorted(KNOWN_METHODS), *(m.lower() for m in KNOWN_METHODS), "GE", "GETS", "GET\x00", "OPTIONSX",
    "PÖST", "ГЕТ", "", _Verb("GET"), _Verb("BREW"), b"GET", "CONNECT", "\U0001f600",
])
def test_known_methods_are_told_as_the_set_tells_them(method: Any) -> None:
    assert _request.CRequestRecorder is not None
    seen = [cls(gc_optimizer=lambda: None, profiler=lambda: None).begin(method) for cls in
            (PyRequestRecorder, _request.CRequestRecorder)]
    py, c = (m.method for m in seen)
    for m in seen:
        m.finish()
    assert py == c == (method if method in KNOWN_METHODS else OTHER_METHOD)
    assert type(c) is type(py)


@needs_c
@settings(max_examples=200, deadline=None)
@given(
    method=st.one_of(st.text(max_size=8), st.sampled_from(sorted(KNOWN_METHODS)), st.integers(), st.none(),
                     st.binary(max_size=4),
                     st.lists(st.integers(), max_size=2), st.floats()),
    route=st.one_of(st.text(max_size=8), st.none(), st.integers(), st.lists(st.integers(), max_size=2)),
    status=st.one_of(st.integers(), st.none(), st.text(max_size=3)),
    exc=st.sampled_from([ValueError("v"), KeyboardInterrupt(), 3, "str", None]),
)
def test_c_and_python_agree_on_arbitrary_field_values(method: Any, route: Any, status: Any, exc: Any) -> None:
    assert _request.CRequestRecorder is not None
    results = []
    for cls in (PyRequestRecorder, _request.CRequestRecorder):
        recorder = cls(gc_optimizer=lambda: None, profiler=lambda: None)
        try:
            m = recorder.begin(method)
        except TypeError as e:
            results.append(("begin", type(e)))
            continue
        m.route, m.status = route, status
        m.fail(exc)
        metrics = m.finish()
        assert metrics is not None
        results.append(metrics._replace(duration_s=None, rss_delta=None, sampled=None))
    assert results[0] == results[1]
    assert activity.in_flight() == 0


@impl
def test_thread_hammer_records_every_request_once(recorder_cls: Any) -> None:
    delivered: list[RequestMetrics] = []
    lock = threading.Lock()

    def collect(metrics: RequestMetrics) -> None:
        with lock:
            delivered.append(metrics)

    recorder = recorder_cls(on_request=collect, profiler=lambda: None, gc_optimizer=lambda: None,
                            rss_sample_every=3, rss_sample_budget=None)
    barrier = threading.Barrier(8)
    finished_twice: list[Any] = []
    flight0 = activity.in_flight()
    shared: list[RequestMeasurement] = []

    def worker(n: int) -> None:
        first = recorder.begin("GET")  # open while every other thread begins its own: overlapped
        first.route = "/first"
        barrier.wait()
        for i in range(599):
            m = recorder.begin("GET" if i % 2 else "POST")
            m.activate()
            m.route = f"/r{n}"
            assert current_measurement() is m
            m.deactivate()
            if i % 50 == 0:
                with lock:
                    shared.append(m)  # finished by whichever thread gets it first
                    other = shared.pop(0)
                results = [other.finish(), other.finish()]
                if other is not m:
                    m.finish()
                finished_twice.append(results[1])
            else:
                m.finish()
        with lock:
            leftovers = list(shared)
            shared.clear()
        for m in leftovers:
            m.finish()
        first.finish()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert len(delivered) == 8 * 600 and activity.in_flight() == flight0
    assert all(r is None for r in finished_twice)
    assert {m.route for m in delivered} == {f"/r{n}" for n in range(8)} | {"/first"}
    assert all(m.overlapped for m in delivered if m.route == "/first")
    assert 0.2 < sum(m.sampled for m in delivered) / len(delivered) < 0.5  # 1 in 3 on average


@impl
def test_forked_child_starts_with_nothing_in_flight_and_other_gaps(recorder_cls: Any) -> None:
    recorder = recorder_cls(rss_sample_every=1000, profiler=lambda: None, gc_optimizer=lambda: None)
    open_requests = [recorder.begin() for _ in range(3)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without pytest's teardown
        try:
            m = recorder.begin()
            at_start = activity.in_flight() - 1
            metrics = m.finish()
            report = {"in_flight_at_start": at_start, "alone": metrics is not None and not metrics.overlapped,
                      "after": activity.in_flight(), "gaps": [recorder.next_gap() for _ in range(20)]}
            os.write(write, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = json.loads(f.read())
    os.waitpid(pid, 0)
    parent_gaps = [recorder.next_gap() for _ in range(20)]
    for m in open_requests:
        m.finish()
    assert child["in_flight_at_start"] == 0 and child["alone"] and child["after"] == 0
    assert child["gaps"] != parent_gaps


def test_the_recorder_registers_its_fork_work_through_the_fork_registry_only() -> None:
    from pathlib import Path

    c_source = Path(__file__).parents[2] / "csrc" / "_crecord.c"
    source = Path(_request.__file__).read_text() + c_source.read_text()
    assert "register_at_fork" not in source and "PyOS_AfterFork" not in source
    assert "forks.register(_rng.seed" in source


# --- the WSGI wrappers: kotoba_memory._crecord.StartResponse/Body against wsgi.py's closure/_MeasuredBody


class Closing:
    """A response iterable with a close() that may raise, like a file wrapper or a streaming body."""

    def __init__(self, chunks: list[bytes], raise_at: int | None, close_raises: bool, log: list[Any]) -> None:
        self.chunks, self.raise_at, self.close_raises, self.log = chunks, raise_at, close_raises, log

    def __iter__(self) -> Any:
        for i, chunk in enumerate(self.chunks):
            if i == self.raise_at:
                raise ConnectionResetError("client went away")
            yield chunk

    def close(self) -> None:
        self.log.append("app close")
        if self.close_raises:
            raise OSError("close failed")


APPS = st.fixed_dictionaries({
    # Three ASCII digits are read in place in C; everything else goes through int(status[:3]) there too.
    "status": st.sampled_from([
        "200 OK", "404 Not Found", "abc", "20", "", 200, b"500 X", "200", "099 Low", " 20 X", "2_0 X",
        "+20 X", "20a OK", "\u0662\u0660\u0660 OK", "2\u00e90 X",
    ]),
    "exc_info_kw": st.booleans(),
    "body": st.sampled_from(["list", "tuple", "closing", "generator"]),
    "chunks": st.integers(0, 3),
    "raise_at": st.one_of(st.none(), st.integers(0, 3)),
    "close_raises": st.booleans(),
    "app_raises": st.sampled_from([None, "before", "after"]),
    "route_of": st.sampled_from([None, "label", "raises", "interrupt", "empty"]),
    "preset_route": st.sampled_from([None, "/preset"]),
    "server": st.sampled_from(["iterate+close", "close", "partial+close", "iterate"]),
    "nested": st.booleans(),
    "method": st.sampled_from([None, "GET", "POST", "BREW"]),
})


def run_wsgi(monkeypatch: Any, use_c: bool, recorder_cls: Any, spec: dict[str, Any]) -> list[Any]:
    from kotoba_memory_integrations import wsgi

    if not use_c:
        monkeypatch.setattr(wsgi, "_CStartResponse", None)
        monkeypatch.setattr(wsgi, "_Body", wsgi._MeasuredBody)
    log: list[Any] = []

    def route_of(environ: dict[str, Any]) -> str | None:
        log.append("route_of")
        kind = spec["route_of"]
        if kind == "raises":
            raise ValueError("no route")
        if kind == "interrupt":
            raise KeyboardInterrupt
        return "" if kind == "empty" else "/labelled"

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if spec["preset_route"]:
            environ["kotoba_memory.request"].route = spec["preset_route"]
        if spec["app_raises"] == "before":
            raise LookupError("app failed")
        if spec["exc_info_kw"]:
            start_response(spec["status"], [("a", "b")], exc_info=None)
        else:
            start_response(spec["status"], [("a", "b")])
        if spec["app_raises"] == "after":
            raise LookupError("app failed late")
        chunks = [b"x%d" % i for i in range(spec["chunks"])]
        body = spec["body"]
        if body == "list":
            return chunks
        if body == "tuple":
            return tuple(chunks)
        closing = Closing(chunks, spec["raise_at"], spec["close_raises"], log)
        return closing if body == "closing" else iter(closing)

    def start_response(status: Any, headers: Any, exc_info: Any = None) -> Any:
        log.append(("start_response", status, headers, exc_info))
        return log.append

    metrics: list[Any] = []
    rss = FakeRss(Script([4096, 8192], [], "rss"), [])
    recorder = recorder_cls(on_request=lambda m: metrics.append(normalized(m)), profiler=lambda: None,
                            gc_optimizer=lambda: None, rss_reader=rss, rss_sample_every=1)
    middleware_cls = wsgi.MemoryMiddleware if use_c else wsgi.PyMemoryMiddleware
    middleware = middleware_cls(
        app, recorder=recorder, route_of=None if spec["route_of"] is None else route_of
    )
    if spec["nested"]:  # an outer middleware of the same kind measures; the inner one must not
        middleware = middleware_cls(middleware, recorder=recorder)
    flight0 = activity.in_flight()
    environ: dict[str, Any] = {} if spec["method"] is None else {"REQUEST_METHOD": spec["method"]}
    try:
        result = middleware(environ, start_response)
    except BaseException as exc:
        log.append(("call raised", type(exc).__name__))
        return [*log, ("metrics", metrics), ("in flight", activity.in_flight() - flight0)]
    server = spec["server"]
    try:
        if server != "close":
            for i, chunk in enumerate(result):
                log.append(("chunk", chunk))
                if server == "partial+close" and i == 0:
                    break
    except BaseException as exc:
        log.append(("iteration raised", type(exc).__name__))
    if server != "iterate":
        try:
            result.close()
        except BaseException as exc:
            log.append(("close raised", type(exc).__name__, type(exc.__context__).__name__))
    log.append(("in flight", activity.in_flight() - flight0))
    log.append(("metrics", list(metrics)))
    if server == "iterate":  # a server that never closes: nothing recorded; end it for the next run
        environ["kotoba_memory.request"].finish()
    return log


@needs_c
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=APPS, recorder_kind=st.sampled_from(["py", "c"]))
def test_c_wsgi_wrappers_behave_like_the_reference(monkeypatch: Any, spec: dict[str, Any],
                                                   recorder_kind: str) -> None:
    recorder_cls = PyRequestRecorder if recorder_kind == "py" else _request.CRequestRecorder
    with monkeypatch.context() as mp:
        reference = contextvars.copy_context().run(run_wsgi, mp, False, recorder_cls, spec)
    compiled = contextvars.copy_context().run(run_wsgi, monkeypatch, True, recorder_cls, spec)
    assert current_measurement() is None
    assert compiled == reference


@needs_c
def test_c_wsgi_wrappers_refuse_bad_construction() -> None:
    import kotoba_memory._crecord as crecord

    m = _request.CRequestRecorder().begin()
    with pytest.raises(TypeError):
        crecord.StartResponse(m, "not callable", None, {})
    with pytest.raises(TypeError):
        crecord.StartResponse(m, print, 5, {})
    with pytest.raises(TypeError):
        crecord.StartResponse(m, print)
    with pytest.raises(TypeError):
        crecord.Body([b""])
    with pytest.raises(TypeError):
        crecord.Body([b""], m, extra=1)
    sr = crecord.StartResponse(m, lambda *a: a, None, {})
    with pytest.raises(TypeError):
        sr()
    with pytest.raises(TypeError, match="unexpected keyword"):
        sr("200 OK", [], nope=1)
    with pytest.raises(TypeError, match="multiple values"):
        sr("200 OK", [], status="x")
    with pytest.raises(TypeError):
        sr(200, [])  # status[:3] on an int, as the reference raises
    assert sr("201 Created", [("a", "b")]) == ("201 Created", [("a", "b")]) and m.status == 201
    body = crecord.Body(5, m)  # not iterable: the error comes from iter(), no measurement change
    with pytest.raises(TypeError):
        next(body)
    assert m.error is None
    body.close()
    assert m.finished and body.close() is None  # closing twice records once
    with pytest.raises(TypeError, match="__init__"):
        crecord.WSGICall()({}, print)
    from kotoba_memory_integrations.wsgi import MemoryMiddleware

    middleware = MemoryMiddleware(lambda environ, start_response: [b""])
    assert isinstance(middleware, crecord.WSGICall)
    with pytest.raises(TypeError):
        middleware({})
    with pytest.raises(TypeError, match="keyword"):
        middleware(environ={}, start_response=print)


@pytest.mark.parametrize("middleware_kind", ["c", "py"])
def test_a_start_response_that_cannot_be_called_is_refused_before_the_request_is_measured(
    middleware_kind: str,
) -> None:
    from kotoba_memory_integrations import wsgi

    middleware_cls = wsgi.MemoryMiddleware if middleware_kind == "c" else wsgi.PyMemoryMiddleware
    if middleware_kind == "c" and not C_BUILT:
        pytest.skip("pure Python in use: C builds only")
    middleware = middleware_cls(lambda environ, start_response: [b""])
    flight = activity.in_flight()
    environ: dict[str, Any] = {}
    with pytest.raises(TypeError, match="start_response must be callable, not str"):
        middleware(environ, "not callable")
    assert activity.in_flight() == flight and "kotoba_memory.request" not in environ


@impl
def test_a_subclass_overriding_deliver_and_next_gap_is_honoured(recorder_cls: Any) -> None:
    delivered: list[Any] = []

    class Mine(recorder_cls):  # type: ignore[misc,valid-type]
        def deliver(self, metrics: RequestMetrics) -> None:
            delivered.append(metrics.route)

        def next_gap(self) -> int:
            return 2  # every other request measured

    recorder = Mine(rss_sample_every=5, profiler=lambda: None, gc_optimizer=lambda: None)
    recorder.countdown = 1
    sampled = []
    for i in range(6):
        m = recorder.begin()
        m.route = f"/{i}"
        metrics = m.finish()
        assert metrics is not None
        sampled.append(metrics.sampled)
    assert delivered == [f"/{i}" for i in range(6)]
    assert sampled == [True, False, True, False, True, False]


@impl
def test_fields_replaced_while_they_run_are_held(recorder_cls: Any) -> None:
    recorder: Any = None

    class Sneaky:
        def __bool__(self) -> bool:
            m.route = "/replaced"  # drops the field's own reference while it is being tested
            return True

    def getter() -> None:
        recorder.profiler = lambda: None  # replaces itself while called
        return None

    recorder = recorder_cls(gc_optimizer=lambda: None, rss_sample_every=1)
    recorder.profiler = getter
    m = recorder.begin()
    m.route = Sneaky()
    metrics = m.finish()
    assert metrics is not None and isinstance(metrics.route, Sneaky)


class RecordingProfiler:
    """A profiler without a route table: the recorder calls its record_request()."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def record_request(self, route: Any, rss: Any, traced: Any, duration: Any) -> None:
        assert isinstance(duration, float) and duration >= 0
        self.log.append((route, rss, traced))


@needs_c
@pytest.mark.parametrize("profiler_kind", ["record_request", "route table"])
def test_a_wsgi_request_nobody_else_reads_reaches_the_profiler_as_through_the_reference(
    profiler_kind: str,
) -> None:
    """With no on_request and no listener the C wrappers hand the profiler its values without building
    a RequestMetrics: what it records must be what the reference delivers from the tuple."""
    from kotoba_memory.memory_profiler import MemoryProfiler
    from kotoba_memory_integrations import wsgi

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        if path != "/none":
            environ["kotoba_memory.request"].route = path
        if path == "/raise":
            raise LookupError(path)
        start_response("200 OK", [])
        return [b"ok"]

    def run(c_side: bool) -> Any:
        log: list[Any] = []
        profiler: Any = RecordingProfiler(log) if profiler_kind == "record_request" else MemoryProfiler(
            leak_detection=False)
        rss = FakeRss(Script([4096, 12288, 8192, 8192], [], "rss"), [])
        recorder_cls = _request.CRequestRecorder if c_side else PyRequestRecorder
        recorder = recorder_cls(profiler=lambda: profiler, gc_optimizer=lambda: None, rss_reader=rss,
                                rss_sample_every=1)
        middleware = (wsgi.MemoryMiddleware if c_side else wsgi.PyMemoryMiddleware)(app, recorder=recorder)
        for path in ("/a", "/b", "/none", "/a", "/raise"):
            try:
                body = middleware({"PATH_INFO": path}, lambda *a: None)
            except LookupError:
                continue
            assert list(body) == [b"ok"]
            body.close()
        if profiler_kind == "route table":
            return sorted((row[0], row[1]) for row in profiler._routes.rows())
        return log

    assert _request._listeners == ()  # else the tuple is built for them
    reference, compiled = run(False), run(True)
    assert compiled == reference
    if profiler_kind == "record_request":
        assert reference[0] == ("/a", 8192, None) and reference[2][0] == "unmatched"
    else:
        assert dict(reference) == {"/a": 2, "/b": 1, "/raise": 1, "unmatched": 1}


@needs_c
@pytest.mark.parametrize("status", [
    "200 OK", "200", "099 Low", "999 Custom", " 20 X", "2_0 X", "+20 X", "20a OK", "20", "",
    "\u0662\u0660\u0660 OK", "2\u00e90 X", b"500 X", 200,
])
def test_the_c_start_response_reads_the_status_code_as_int_of_its_first_three_characters(status: Any) -> None:
    import kotoba_memory._crecord as crecord

    measurement = PyRequestRecorder(profiler=lambda: None, gc_optimizer=lambda: None).begin("GET")
    sent: list[Any] = []
    wrapper = crecord.StartResponse(measurement, lambda *args: sent.append(args), None, {})
    try:
        expected: Any = int(status[:3])
    except ValueError:
        expected = None
    except TypeError:
        with pytest.raises(TypeError):  # not sliceable
            wrapper(status, [])
        assert sent == []
        return
    wrapper(status, [("a", "b")])
    assert measurement.status == expected and type(measurement.status) in (int, type(None))
    assert sent == [(status, [("a", "b")])]
    measurement.finish()
