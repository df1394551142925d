"""A session store that expires sessions after 1 s of inactivity (swept on each request)."""

import threading
import time

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "session dict with expiry sweep: bounded by the active-user count"

_SESSIONS: dict[int, tuple[float, dict[str, str]]] = {}


def handle(i: int) -> None:
    now = time.monotonic()
    _SESSIONS[i] = (now, {"user": f"u{i}", "csrf": "t" * 32})
    if i % 20 == 0:
        for key in [k for k, (seen, _) in _SESSIONS.items() if now - seen > 1.0]:
            del _SESSIONS[key]


def run(stop: threading.Event) -> None:
    serve(stop, handle)
