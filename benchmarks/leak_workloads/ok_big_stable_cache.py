"""A large lookup table built at start-up (about 30 MB) and only read afterwards."""

import threading

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "big but stable: 30 MB table loaded once, read-only afterwards"


def run(stop: threading.Event) -> None:
    table = {n: (f"sku-{n}", n * 1.25, bytes(200)) for n in range(100_000)}

    def handle(i: int) -> None:
        sku, price, blob = table[(i * 7919) % 100_000]
        _ = f"{sku}:{price:.2f}:{len(blob)}"

    serve(stop, handle)
