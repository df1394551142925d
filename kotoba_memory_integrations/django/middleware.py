"""Django middleware: per-request memory metrics with the URL pattern as the route.

Add it to ``MIDDLEWARE`` (anywhere; first is best so it also measures the other middleware)::

    MIDDLEWARE = ["kotoba_memory_integrations.django.middleware.MemoryMiddleware", ...]

If the WSGI/ASGI application is already wrapped in kotoba-memory's WSGI or ASGI middleware (see
:func:`wrap_wsgi` / :func:`wrap_asgi`), this middleware only tells that measurement the route;
otherwise it measures the request itself, up to the end of a streaming body. Works under WSGI and
ASGI (sync and async capable).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import FileResponse, HttpRequest, HttpResponseBase, StreamingHttpResponse

from kotoba_memory_integrations import runtime
from kotoba_memory_integrations.request import (
    DEFAULT_RSS_SAMPLE_BUDGET,
    DEFAULT_RSS_SAMPLE_EVERY,
    ENVIRON_KEY,
    RequestMeasurement,
    RequestRecorder,
    current_measurement,
)

__all__ = ["MemoryMiddleware", "route_of", "wrap_asgi", "wrap_wsgi"]

_recorders: dict[tuple[int, float | None], RequestRecorder] = {}


def _recorder_for_settings() -> RequestRecorder:
    """One recorder per ``KOTOBA_MEMORY_RSS_SAMPLE_EVERY`` and ``_BUDGET`` (read at startup)."""
    from kotoba_memory.errors import ConfigError
    from kotoba_memory_integrations.django.apps import rss_sampling_from_settings

    try:
        key = rss_sampling_from_settings()
    except ConfigError:  # invalid: the system check kotoba_memory.E004 says why
        key = (DEFAULT_RSS_SAMPLE_EVERY, DEFAULT_RSS_SAMPLE_BUDGET)
    if key not in _recorders:
        _recorders[key] = RequestRecorder(rss_sample_every=key[0], rss_sample_budget=key[1])
    return _recorders[key]


def route_of(request: HttpRequest) -> str | None:
    """The matched URL pattern of ``request`` (e.g. ``"books/<int:pk>/"``), or None before resolving."""
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None) if match is not None else None
    if route is None:
        return None
    # Django's resolver_match.route has no leading slash; ours follow the other frameworks ("/x").
    return route if route.startswith("/") else "/" + route


def _outer_measurement(request: HttpRequest) -> RequestMeasurement | None:
    measurement = request.META.get(ENVIRON_KEY)
    if measurement is None:
        scope = getattr(request, "scope", None)
        if isinstance(scope, dict):
            measurement = scope.get(ENVIRON_KEY)
    if measurement is None:
        measurement = current_measurement()
    if isinstance(measurement, RequestMeasurement) and not measurement.finished:
        return measurement
    return None


class _SyncBody:
    """A streaming body that finishes the measurement when Django closes the response."""

    def __init__(self, content: Iterator[bytes], measurement: RequestMeasurement) -> None:
        self._content = content
        self._measurement = measurement

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._content)
        except StopIteration:
            raise
        except BaseException as exc:
            self._measurement.fail(exc)
            raise

    def close(self) -> None:
        self._measurement.finish()


class _AsyncBody:
    """Async twin of :class:`_SyncBody` (Django calls the sync ``close`` on responses)."""

    def __init__(self, content: AsyncIterator[bytes], measurement: RequestMeasurement) -> None:
        self._content = content
        self._measurement = measurement

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._content.__anext__()
        except StopAsyncIteration:
            raise
        except BaseException as exc:
            self._measurement.fail(exc)
            raise

    def close(self) -> None:
        self._measurement.finish()


class MemoryMiddleware:
    """Records each request's memory cost under its URL pattern (see the module docstring)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.recorder = _recorder_for_settings()
        runtime.serving()  # this process serves requests: it joins the fleet report
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        outer = _outer_measurement(request)
        if outer is not None:
            response = self.get_response(request)
            outer.route = route_of(request) or outer.route
            return response
        measurement = self.recorder.begin(request.method or "GET")
        request._kotoba_measurement = measurement
        try:
            response = self.get_response(request)
        except BaseException as exc:  # only when DEBUG_PROPAGATE_EXCEPTIONS lets it escape
            measurement.route = route_of(request)
            measurement.fail(exc)
            measurement.finish()
            raise
        return self._complete(request, response, measurement)

    async def __acall__(self, request: HttpRequest) -> Any:
        get_response: Callable[[HttpRequest], Awaitable[Any]] = self.get_response
        outer = _outer_measurement(request)
        if outer is not None:
            response = await get_response(request)
            outer.route = route_of(request) or outer.route
            return response
        measurement = self.recorder.begin(request.method or "GET")
        request._kotoba_measurement = measurement
        try:
            response = await get_response(request)
        except BaseException as exc:
            measurement.route = route_of(request)
            measurement.fail(exc)
            measurement.finish()
            raise
        return self._complete(request, response, measurement)

    def process_exception(self, request: HttpRequest, exception: Exception) -> None:
        """Note the view's exception (Django turns it into a 500 response afterwards)."""
        outer = _outer_measurement(request)
        measurement = outer if outer is not None else getattr(request, "_kotoba_measurement", None)
        if isinstance(measurement, RequestMeasurement):
            measurement.fail(exception)

    def _complete(
        self, request: HttpRequest, response: HttpResponseBase, measurement: RequestMeasurement
    ) -> HttpResponseBase:
        measurement.route = route_of(request)
        measurement.status = response.status_code
        # A FileResponse is left alone: wrapping it would lose the server's sendfile path, and
        # sending a file costs no Python memory worth measuring.
        if isinstance(response, StreamingHttpResponse) and not isinstance(response, FileResponse):
            if response.is_async:
                response.streaming_content = _AsyncBody(response.streaming_content, measurement)
            else:
                response.streaming_content = _SyncBody(response.streaming_content, measurement)
        else:
            measurement.finish()
        return response


def wrap_wsgi(application: Any) -> Any:
    """Wrap a Django WSGI application in kotoba-memory's WSGI middleware (whole-request measuring)."""
    from kotoba_memory_integrations.wsgi import MemoryMiddleware as WSGIMemoryMiddleware

    return WSGIMemoryMiddleware(application, recorder=_recorder_for_settings())


def wrap_asgi(application: Any) -> Any:
    """Wrap a Django ASGI application in kotoba-memory's ASGI middleware (whole-request measuring)."""
    from kotoba_memory_integrations.asgi import MemoryMiddleware as ASGIMemoryMiddleware

    return ASGIMemoryMiddleware(application, recorder=_recorder_for_settings())
