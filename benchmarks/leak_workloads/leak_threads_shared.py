"""Several worker threads append results to a shared list that nobody trims."""

import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "four threads appending to a shared results list"

_RESULTS: list[bytes] = []
_LOCK = threading.Lock()


def handle(i: int) -> None:
    result = str(i).encode() * 30  # LEAK-SITE
    with _LOCK:
        _RESULTS.append(result)  # LEAK-SITE


def run(stop: threading.Event) -> None:
    serve(stop, handle, interval=0.006, threads=4)
