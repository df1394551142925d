"""A plain WSGI catalogue (no framework) under gunicorn: six bounded-but-churning routes and, with
FIELD_LEAKS=1, one leak: ``/lookup/<key>`` memoises per key in a dict without a bound, and every
request asks for a new key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from benchmarks.field_apps import churn
from benchmarks.field_apps._profiling import KOTOBA_ON, LEAKS_ON, config, delay_first_window, recorders
from kotoba_memory_integrations import runtime
from kotoba_memory_integrations.request import set_current_route
from kotoba_memory_integrations.wsgi import MemoryMiddleware

StartResponse = Callable[..., Any]

_LOOKUPS: dict[str, dict[str, Any]] = {}


def _lookup(key: str) -> dict[str, Any]:
    cached = _LOOKUPS.get(key)
    if cached is None:
        cached = {"key": key, "expanded": [key.upper()] * 6, "score": float(len(key))}
        if LEAKS_ON:
            _LOOKUPS[key] = cached
    return cached


def _int(arg: str) -> int:
    return int(arg) if arg.isdigit() else 0


_ROUTES: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "products": ("/products/<sku>", lambda arg: churn.product(_int(arg))),
    "recent": ("/recent", lambda arg: churn.remember("/recent")),
    "session": ("/session/<sid>", churn.session),
    "render": ("/render/<n>", lambda arg: churn.render(_int(arg))),
    "audit": ("/audit/<user>", lambda arg: churn.audit(_int(arg))),
    "report": ("/report/<n>", lambda arg: churn.report(_int(arg))),
    "lookup": ("/lookup/<key>", _lookup),
}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Route on the first path segment; answer JSON."""
    parts = environ.get("PATH_INFO", "/").strip("/").split("/")
    if parts == [""]:
        body: dict[str, Any] = {"status": "ok"}
        set_current_route("/")
    elif parts[0] in _ROUTES:
        route, handler = _ROUTES[parts[0]]
        set_current_route(route)
        body = handler(parts[1] if len(parts) > 1 else "")
    else:
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b'{"error": "not found"}']
    payload = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


def create_app() -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The app wrapped in kotoba-memory's WSGI middleware, with the process's optimizer started (the bare
    app with ``FIELD_KOTOBA=0``)."""
    if not KOTOBA_ON:
        return app
    delay_first_window(runtime.start_optimizer(config()))
    # FIELD_RSS_SAMPLE_BUDGET=none: RSS on one request in 8 whatever it costs (field_overhead --fixed-rss).
    fixed = os.environ.get("FIELD_RSS_SAMPLE_BUDGET") == "none"
    wrapped = MemoryMiddleware(app, rss_sample_budget=None) if fixed else MemoryMiddleware(app)
    recorders.append(wrapped.recorder)
    return wrapped
