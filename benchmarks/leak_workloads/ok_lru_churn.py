"""functools.lru_cache with a bound and a key space far larger than it: constant churn."""

import functools
import threading

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "bounded lru_cache(maxsize=256) under constant misses"


@functools.lru_cache(maxsize=256)
def quote(sku: str) -> tuple[str, float]:
    return (sku.upper() * 3, len(sku) * 1.5)


def run(stop: threading.Event) -> None:
    serve(stop, lambda i: quote(f"sku-{(i * 2654435761) % 1_000_003}"))
