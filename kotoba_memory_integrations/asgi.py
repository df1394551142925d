"""Pure ASGI middleware measuring each HTTP request's memory cost, GC pauses and route.

Works with any ASGI app (Starlette, FastAPI, Django's ASGI handler)::

    from kotoba_memory_integrations.asgi import MemoryMiddleware
    app = MemoryMiddleware(app)   # or Starlette(middleware=[Middleware(MemoryMiddleware)])

Only ``http`` scopes are measured; ``lifespan`` and ``websocket`` pass straight through. The request is
recorded once the app returns, i.e. after the last body chunk of a streaming response was sent, or
when it raises (re-raised untouched). The route is the framework's template: Starlette/FastAPI's
``scope["route"].path`` read at response time, or what Django's middleware set; never the raw path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kotoba_memory_integrations import runtime
from kotoba_memory_integrations.request import (
    DEFAULT_RSS_SAMPLE_BUDGET,
    DEFAULT_RSS_SAMPLE_EVERY,
    ENVIRON_KEY,
    RequestListener,
    RequestMeasurement,
    RequestRecorder,
)

__all__ = ["MemoryMiddleware", "route_from_scope"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_from_scope(scope: Scope) -> str | None:
    """The route template a router stored in ``scope`` (Starlette/FastAPI), if any."""
    route = scope.get("route")
    if route is None:
        return None
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if isinstance(path, str) and path:
        return path
    return route if isinstance(route, str) and route else None


class MemoryMiddleware:
    """Measures every HTTP request of the wrapped ASGI app (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        recorder: RequestRecorder | None = None,
        on_request: RequestListener | None = None,
        rss_sample_every: int = DEFAULT_RSS_SAMPLE_EVERY,
        rss_sample_budget: float | None = DEFAULT_RSS_SAMPLE_BUDGET,
    ) -> None:
        self.app = app
        self.recorder = recorder or RequestRecorder(
            on_request=on_request, rss_sample_every=rss_sample_every, rss_sample_budget=rss_sample_budget
        )
        runtime.serving()  # this process serves requests: it joins the fleet report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outer = scope.get(ENVIRON_KEY)
        if isinstance(outer, RequestMeasurement) and not outer.finished:
            await self.app(scope, receive, send)
            return
        measurement = self.recorder.begin(scope.get("method", "GET"))
        scope[ENVIRON_KEY] = measurement

        async def measured_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                measurement.status = int(message.get("status", 200))
            await send(message)

        measurement.activate()
        try:
            await self.app(scope, receive, measured_send)
        except BaseException as exc:
            measurement.fail(exc)
            raise
        finally:
            measurement.deactivate()
            if measurement.route is None:
                measurement.route = route_from_scope(scope)
            measurement.finish()
