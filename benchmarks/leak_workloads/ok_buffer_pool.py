"""A fixed pool of reusable buffers: acquire, fill, release."""

import threading
from queue import SimpleQueue

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "object pool of 32 bytearrays reused by every request"

_POOL: SimpleQueue[bytearray] = SimpleQueue()
for _ in range(32):
    _POOL.put(bytearray(8192))


def handle(i: int) -> None:
    buf = _POOL.get()
    try:
        buf[:8] = i.to_bytes(8, "little")
    finally:
        _POOL.put(buf)


def run(stop: threading.Event) -> None:
    serve(stop, handle)
