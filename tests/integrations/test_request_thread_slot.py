"""The C MemoryMiddleware keeps its request on the thread that runs it until a context variable is wanted."""

from __future__ import annotations

import contextvars
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

from kotoba_memory_integrations import request as _request
from kotoba_memory_integrations.request import (
    ENVIRON_KEY,
    RequestMeasurement,
    RequestRecorder,
    current_measurement,
    set_current_route,
)
from kotoba_memory_integrations.wsgi import MemoryMiddleware, PyMemoryMiddleware

_crecord = _request._crecord
pytestmark = pytest.mark.skipif(
    _crecord is None, reason="pure Python in use: no thread slot, only the context")


@pytest.fixture
def lazy() -> Iterator[Any]:
    """The process as a fresh worker starts: no context variable wanted yet (restored afterwards)."""
    assert _crecord is not None
    before = _crecord.context_wanted(False)
    try:
        yield _crecord
    finally:
        _crecord.context_wanted(before)


def _recorder(seen: list[Any]) -> RequestRecorder:
    return RequestRecorder(on_request=seen.append, rss_sample_every=1_000_000,
                           gc_optimizer=lambda: None, profiler=lambda: None)


def _serve(app: Any, path: str = "/") -> dict[str, Any]:
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
    body = app(environ, lambda status, headers, exc_info=None: None)
    try:
        list(body)
    finally:
        body.close()
    return environ


def _in_copied_context_on_another_thread() -> RequestMeasurement | None:
    context = contextvars.copy_context()
    out: list[RequestMeasurement | None] = []
    thread = threading.Thread(target=lambda: out.append(context.run(current_measurement)))
    thread.start()
    thread.join()
    return out[0]


def test_the_request_is_current_on_its_thread_without_setting_the_context_variable(lazy: Any) -> None:
    seen: list[Any] = []
    inside: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inside.append((current_measurement(), _request._current.get(), environ[ENVIRON_KEY]))
        set_current_route("/items/<id>")
        start_response("200 OK", [])
        return [b"ok"]

    _serve(MemoryMiddleware(app, recorder=_recorder(seen)))
    [(current, in_context, own)] = inside
    assert current is own and in_context is None
    assert seen[0].route == "/items/<id>"
    assert current_measurement() is None and not lazy.context_wanted()


def test_a_copied_context_on_another_thread_switches_every_later_request_to_the_context(lazy: Any) -> None:
    copies: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        copies.append((_in_copied_context_on_another_thread(), environ[ENVIRON_KEY]))
        start_response("200 OK", [])
        return [b""]

    middleware = MemoryMiddleware(app, recorder=_recorder([]))
    _serve(middleware)
    assert copies[0][0] is None  # the slot cannot answer there: this call asks for the context from now on
    assert lazy.context_wanted()
    _serve(middleware)
    assert copies[1][0] is copies[1][1]
    assert current_measurement() is None and _request._current.get() is None


def test_asking_outside_every_request_keeps_the_slot(lazy: Any) -> None:
    assert current_measurement() is None
    set_current_route("/nowhere")
    thread = threading.Thread(target=current_measurement)
    thread.start()
    thread.join()
    assert not lazy.context_wanted()  # nothing in flight: no copied context could have been meant


def test_nested_middlewares_on_one_thread_unwind_in_order(lazy: Any) -> None:
    trail: list[tuple[str, Any, Any]] = []

    def inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        trail.append(("inner", current_measurement(), environ[ENVIRON_KEY]))
        start_response("200 OK", [])
        return [b"in"]

    inner_app = MemoryMiddleware(inner, recorder=_recorder([]))

    def outer(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        trail.append(("outer before", current_measurement(), environ[ENVIRON_KEY]))
        _serve(inner_app, "/inner")  # a sub-request with its own environ, measured on its own
        trail.append(("outer after", current_measurement(), environ[ENVIRON_KEY]))
        start_response("200 OK", [])
        return [b"out"]

    _serve(MemoryMiddleware(outer, recorder=_recorder([])))
    for where, current, own in trail:
        assert current is own, where
    assert trail[0][2] is not trail[1][2]
    assert current_measurement() is None


def test_an_app_that_raises_leaves_no_request_on_the_thread(lazy: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        assert current_measurement() is environ[ENVIRON_KEY]
        raise LookupError("boom")

    with pytest.raises(LookupError):
        _serve(MemoryMiddleware(app, recorder=_recorder([])))
    assert current_measurement() is None


def test_threads_each_see_their_own_request(lazy: Any) -> None:
    barrier = threading.Barrier(4)
    wrong: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        barrier.wait(timeout=10)  # all four requests in flight at once
        for _ in range(200):
            if current_measurement() is not environ[ENVIRON_KEY]:
                wrong.append(environ["PATH_INFO"])
        start_response("200 OK", [])
        return [b""]

    middleware = MemoryMiddleware(app, recorder=_recorder([]))
    threads = [threading.Thread(target=_serve, args=(middleware, f"/t{i}")) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == [] and not lazy.context_wanted()


def test_under_gevent_or_eventlet_the_context_variable_is_used(
    lazy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gevent", types.ModuleType("gevent"))
    inside: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inside.append((_request._current.get(), environ[ENVIRON_KEY]))
        start_response("200 OK", [])
        return [b""]

    _serve(MemoryMiddleware(app, recorder=_recorder([])))  # built with gevent loaded: one thread, many
    assert lazy.context_wanted()
    assert inside[0][0] is inside[0][1]


def test_eventlet_loaded_after_the_middleware_was_built_is_not_trusted_to_the_slot(
    lazy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        monkeypatch.setitem(sys.modules, "eventlet", types.ModuleType("eventlet"))
        inside.append(current_measurement())
        start_response("200 OK", [])
        return [b""]

    middleware = MemoryMiddleware(app, recorder=_recorder([]))
    _serve(middleware)
    assert inside == [None] and lazy.context_wanted()  # possibly another greenlet's: not answered
    _serve(middleware)
    assert isinstance(inside[1], RequestMeasurement)


def test_the_python_reference_always_uses_the_context_variable(lazy: Any) -> None:
    inside: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        inside.append((_request._current.get(), environ[ENVIRON_KEY]))
        start_response("200 OK", [])
        return [b""]

    _serve(PyMemoryMiddleware(app, recorder=_recorder([])))
    assert inside[0][0] is inside[0][1]
