"""A tiny request loop shared by the leak-suite workloads."""

from __future__ import annotations

import threading
from collections.abc import Callable


def serve(
    stop: threading.Event, handle: Callable[[int], object], *, interval: float = 0.002, threads: int = 1
) -> None:
    """Call ``handle(request_id)`` about every ``interval`` seconds per thread until ``stop`` is set."""

    def worker(offset: int) -> None:
        i = offset
        while not stop.is_set():
            handle(i)
            i += threads
            stop.wait(interval)

    helpers = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(1, threads)]
    for t in helpers:
        t.start()
    worker(0)
    for t in helpers:
        t.join(5)
