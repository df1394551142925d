"""A periodic report that builds ~8 MB of rows, renders them, and drops them."""

import threading
import time

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "bursts: 8 MB report every second, released within ~0.3 s"

_state = {"next": 0.0}


def handle(i: int) -> None:
    now = time.monotonic()
    if now >= _state["next"]:
        _state["next"] = now + 1.0
        rows = [(n, f"row-{n}", bytes(64)) for n in range(50_000)]
        time.sleep(0.3)  # rendering, holding the rows
        _ = sum(len(r[1]) for r in rows)
        del rows


def run(stop: threading.Event) -> None:
    serve(stop, handle)
