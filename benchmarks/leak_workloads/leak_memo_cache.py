"""An unbounded memoisation dict keyed by something unique per request."""

import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "memo dict keyed by (user, request id): grows forever"

_RENDERED: dict[tuple[int, int], str] = {}


def render(user: int, request_id: int) -> str:
    key = (user, request_id)  # LEAK-SITE
    if key not in _RENDERED:
        _RENDERED[key] = f"<li>{user}:{request_id}</li>" * 8  # LEAK-SITE
    return _RENDERED[key]


def run(stop: threading.Event) -> None:
    serve(stop, lambda i: render(i % 50, i))
