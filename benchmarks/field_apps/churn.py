"""Bounded-but-churning work the field apps do on their ordinary routes: none of it can grow forever.

An ``lru_cache`` at capacity, a ring buffer of recent requests, sessions that expire, a template
compiled per request, a ring-buffer log handler, a small connection pool and per-request temporaries.
Each function returns a JSON-serialisable result for the route that calls it.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
from collections import deque
from typing import Any

import jinja2

SESSION_TTL_S = 0.5


@functools.lru_cache(maxsize=256)
def _product(sku: int) -> dict[str, Any]:
    return {"sku": sku, "name": f"product {sku}" * 4, "tags": [f"t{sku % 7}", f"t{sku % 11}"]}


def product(sku: int) -> dict[str, Any]:
    """A catalogue lookup memoised by a bounded lru_cache (churns at capacity: the key space is huge)."""
    return _product(sku)


_recent: deque[dict[str, Any]] = deque(maxlen=200)


def remember(path: str) -> dict[str, Any]:
    """Keep the last 200 requests (a bounded ring buffer)."""
    _recent.append({"path": path, "at": time.time(), "note": path * 8})
    return {"recent": len(_recent)}


_sessions: dict[str, tuple[float, dict[str, Any]]] = {}
_sessions_lock = threading.Lock()


def session(sid: str) -> dict[str, Any]:
    """A session store whose entries expire after SESSION_TTL_S (purged on every access)."""
    now = time.monotonic()
    with _sessions_lock:
        for key in [k for k, (expires, _) in _sessions.items() if expires < now]:
            del _sessions[key]
        _sessions[sid] = (now + SESSION_TTL_S, {"sid": sid, "cart": [sid] * 10})
        return {"sessions": len(_sessions)}


_TEMPLATE = "<ul>{% for item in items %}<li>{{ item.name }}: {{ item.price }}</li>{% endfor %}</ul>"


def render(n: int) -> dict[str, Any]:
    """Compile a template per request (as careless apps do) and render it."""
    template = jinja2.Environment(autoescape=True).from_string(_TEMPLATE)
    html = template.render(items=[{"name": f"item {i}", "price": i * 1.5} for i in range(n % 20)])
    return {"length": len(html)}


class RingHandler(logging.Handler):
    """A log handler keeping the last ``capacity`` formatted records (a bounded ring buffer)."""

    def __init__(self, capacity: int = 200) -> None:
        super().__init__()
        self.records: deque[str] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


_log = logging.getLogger("field.audit")
_log.propagate = False
_log.setLevel(logging.INFO)
_log.addHandler(RingHandler())


def audit(user: int) -> dict[str, Any]:
    """Log a line per request into the ring-buffer handler."""
    _log.info("user %d did something with %s", user, "x" * 40)
    return {"logged": True}


class _Connection:
    """A pooled connection with its own buffer, reused across requests."""

    def __init__(self) -> None:
        self.buffer = bytearray(16 * 1024)
        self.queries = 0


_pool: queue.Queue[_Connection] = queue.Queue()
for _ in range(4):
    _pool.put(_Connection())


def query(n: int) -> dict[str, Any]:
    """Check a connection out of a fixed pool, use it, give it back."""
    conn = _pool.get(timeout=5)
    try:
        conn.queries += 1
        conn.buffer[: n % 100] = b"q" * (n % 100)
        return {"rows": n % 50}
    finally:
        _pool.put(conn)


def report(n: int) -> dict[str, Any]:
    """Per-request temporaries: build a large structure, serialise it, drop it."""
    rows = [{"id": i, "value": str(i) * 5} for i in range(200 + n % 100)]
    return {"bytes": len(json.dumps(rows))}
