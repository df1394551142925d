"""C-extension objects whose big native state is invisible to tracemalloc (zstd contexts), kept forever."""

import threading

import zstandard

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "zstandard compressor per tenant id that is unique per request: C memory held"

_COMPRESSORS: dict[int, zstandard.ZstdCompressor] = {}


def handle(i: int) -> None:
    compressor = _COMPRESSORS.get(i)
    if compressor is None:
        compressor = _COMPRESSORS[i] = zstandard.ZstdCompressor(level=3)  # LEAK-SITE
    compressor.compress(b"payload %d" % i)


def run(stop: threading.Event) -> None:
    serve(stop, handle, interval=0.005)
