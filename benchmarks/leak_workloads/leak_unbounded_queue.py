"""A job queue (deque without maxlen) whose consumer falls behind the producer."""

import threading
from collections import deque

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "producer outpaces consumer on an unbounded deque"

_JOBS: deque[dict[str, object]] = deque()


def handle(i: int) -> None:
    _JOBS.append({"id": i, "body": b"j" * 200})  # LEAK-SITE
    if i % 3 == 0 and _JOBS:
        _JOBS.popleft()


def run(stop: threading.Event) -> None:
    serve(stop, handle)
