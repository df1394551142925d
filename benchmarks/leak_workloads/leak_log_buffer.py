"""A logging MemoryHandler whose flush level is never reached: every record stays buffered."""

import logging
import logging.handlers
import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "logging.MemoryHandler buffering records forever (huge capacity, CRITICAL flush)"

_log = logging.getLogger("bench.leak_log_buffer")
_log.propagate = False
_log.setLevel(logging.INFO)
_log.addHandler(logging.handlers.MemoryHandler(capacity=10**9, flushLevel=logging.CRITICAL))


def handle(i: int) -> None:
    _log.info("served request %d for user %s", i, f"user-{i % 1000}")  # LEAK-SITE


def run(stop: threading.Event) -> None:
    serve(stop, handle)
