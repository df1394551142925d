"""WSGI middleware measuring each request's memory cost, GC pauses and route.

Wrap any WSGI app (``app.wsgi_app`` for Flask, ``get_wsgi_application()`` for Django)::

    from kotoba_memory_integrations.wsgi import MemoryMiddleware
    application = MemoryMiddleware(application)

The request is recorded when the server closes the response iterable (so a streaming body is
measured to its end) or when the app raises (the exception is re-raised untouched). Frameworks tell
the measurement their route template through :func:`kotoba_memory_integrations.request.set_current_route`
or ``environ["kotoba_memory.request"].route``, or the middleware asks ``route_of(environ)`` when the
app calls ``start_response`` (the Flask integration does: no per-request hook inside Flask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kotoba_memory import _native
from kotoba_memory_integrations import runtime
from kotoba_memory_integrations.request import (
    DEFAULT_RSS_SAMPLE_BUDGET,
    DEFAULT_RSS_SAMPLE_EVERY,
    ENVIRON_KEY,
    RequestListener,
    RequestMeasurement,
    RequestRecorder,
)

__all__ = ["MemoryMiddleware", "PyMemoryMiddleware"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class _MeasuredBody:
    """The app's response iterable, finishing the measurement when closed or when iteration fails."""

    __slots__ = ("_iterator", "_measurement", "_result")

    def __init__(self, result: Iterable[bytes], measurement: RequestMeasurement) -> None:
        self._result = result
        self._measurement = measurement
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        if type(self._result) in (list, tuple):
            # Iterating a list cannot fail: skip the per-chunk Python frame (the common, fast case).
            return iter(self._result)
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._result)
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException as exc:
            self._measurement.fail(exc)
            raise

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            self._measurement.fail(exc)
            raise
        finally:
            self._measurement.finish()


# The C start_response wrapper and body (kotoba_memory._crecord) where built; the closure below and
# _MeasuredBody are the reference. Together they are about half of the middleware's warm cost.
_crecord = _native.load("_crecord")
_CStartResponse: Any = _crecord.StartResponse if _crecord is not None else None
_Body: Any = _crecord.Body if _crecord is not None else _MeasuredBody


class PyMemoryMiddleware:
    """Measures every request of the wrapped WSGI app (see the module docstring): the pure-Python
    reference of :class:`MemoryMiddleware`, whose ``__call__`` runs in C where the extension was built."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        recorder: RequestRecorder | None = None,
        on_request: RequestListener | None = None,
        rss_sample_every: int = DEFAULT_RSS_SAMPLE_EVERY,
        rss_sample_budget: float | None = DEFAULT_RSS_SAMPLE_BUDGET,
        route_of: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> None:
        self.app = app
        self.recorder = recorder or RequestRecorder(
            on_request=on_request, rss_sample_every=rss_sample_every, rss_sample_budget=rss_sample_budget
        )
        self.route_of = route_of
        if _crecord is not None and not _crecord.context_wanted() and _crecord.greenlets_loaded():
            _crecord.context_wanted(True)  # several requests share a thread: its slot cannot tell them apart
        runtime.serving()  # this process serves requests: it joins the fleet report

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        outer = environ.get(ENVIRON_KEY)
        if isinstance(outer, RequestMeasurement) and not outer.finished:
            # Already measured by an outer MemoryMiddleware: measuring twice would double-count.
            return self.app(environ, start_response)
        if not callable(start_response):  # refused before measuring: it must not stay in flight
            raise TypeError(f"start_response must be callable, not {type(start_response).__name__}")
        measurement = self.recorder.begin(environ.get("REQUEST_METHOD", "GET"))
        environ[ENVIRON_KEY] = measurement
        route_of = self.route_of
        measured_start_response: StartResponse
        if _CStartResponse is not None:
            measured_start_response = _CStartResponse(measurement, start_response, route_of, environ)
        else:

            def measured_start_response(
                status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
            ) -> Any:
                try:
                    measurement.status = int(status[:3])
                except ValueError:
                    pass
                if route_of is not None and measurement.route is None:
                    try:
                        measurement.route = route_of(environ)
                    except Exception:  # a route label is never worth failing the response
                        pass
                if exc_info is None:
                    return start_response(status, headers)
                return start_response(status, headers, exc_info)

        measurement.activate()
        try:
            result = self.app(environ, measured_start_response)
        except BaseException as exc:
            measurement.fail(exc)
            measurement.finish()
            raise
        finally:
            measurement.deactivate()
        return _Body(result, measurement)


if TYPE_CHECKING:  # both have this interface
    MemoryMiddleware = PyMemoryMiddleware
elif _crecord is not None:

    class MemoryMiddleware(_crecord.WSGICall, PyMemoryMiddleware):
        __doc__ = """Measures every request of the wrapped WSGI app (see the module docstring); its
        ``__call__`` runs in C (``_crecord.WSGICall``), :class:`PyMemoryMiddleware` is the reference."""

else:
    MemoryMiddleware = PyMemoryMiddleware
