"""cachetools.TTLCache with short expiry: entries come and go."""

import threading

import cachetools

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "cachetools.TTLCache(maxsize=2000, ttl=0.3): entries expire"

_CACHE: cachetools.TTLCache[int, bytes] = cachetools.TTLCache(maxsize=2000, ttl=0.3)


def handle(i: int) -> None:
    key = i % 5000
    if key not in _CACHE:
        _CACHE[key] = bytes(300)
    _CACHE.expire()


def run(stop: threading.Event) -> None:
    serve(stop, handle)
