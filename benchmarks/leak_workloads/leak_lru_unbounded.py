"""functools.lru_cache(maxsize=None) on a function called with ever-new arguments."""

import functools
import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "lru_cache(maxsize=None) with unique arguments"


@functools.cache
def price_quote(sku: str) -> tuple[str, float]:
    return (sku.upper() * 3, len(sku) * 1.5)  # LEAK-SITE


def run(stop: threading.Event) -> None:
    serve(stop, lambda i: price_quote(f"sku-{i}-eu"))  # LEAK-SITE
