"""Callbacks (closures over request data) stored in a registry keyed by request id."""

import threading
from collections.abc import Callable

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "closures capturing request payloads kept in a registry"

_CALLBACKS: dict[int, Callable[[], int]] = {}


def handle(i: int) -> None:
    payload = [i] * 40  # LEAK-SITE

    def callback() -> int:  # LEAK-SITE
        return len(payload)

    _CALLBACKS[i] = callback  # LEAK-SITE


def run(stop: threading.Event) -> None:
    serve(stop, handle)
