"""Latency statistics over a sliding window (deque with maxlen)."""

import threading
import time
from collections import deque

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "deque(maxlen=500) of recent latencies: bounded"

_RECENT: deque[tuple[float, float]] = deque(maxlen=500)


def handle(i: int) -> None:
    _RECENT.append((time.time(), (i % 17) * 0.001))
    if i % 50 == 0:
        _ = sorted(v for _, v in _RECENT)[len(_RECENT) // 2]


def run(stop: threading.Event) -> None:
    serve(stop, handle)
