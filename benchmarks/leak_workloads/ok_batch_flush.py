"""A buffered writer: records accumulate and are flushed (cleared) every 0.7 s."""

import threading
import time

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "accumulate-then-flush buffer (sawtooth)"

_BUFFER: list[str] = []
_state = {"flushed": time.monotonic()}


def handle(i: int) -> None:
    _BUFFER.append(f"event {i} at {time.time():.3f}")
    now = time.monotonic()
    if now - _state["flushed"] >= 0.7:
        _ = "\n".join(_BUFFER)
        _BUFFER.clear()
        _state["flushed"] = now


def run(stop: threading.Event) -> None:
    serve(stop, handle)
