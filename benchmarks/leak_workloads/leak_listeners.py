"""Per-request handlers subscribe to a process-wide event bus and never unsubscribe."""

import threading
from collections.abc import Callable

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "event listeners registered per request, never removed"


class EventBus:
    def __init__(self) -> None:
        self.listeners: list[Callable[[str], None]] = []

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self.listeners.append(listener)  # LEAK-SITE


BUS = EventBus()


class RequestContext:
    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.scratch = bytearray(512)  # LEAK-SITE

    def on_config_change(self, event: str) -> None:
        self.scratch[:1] = b"x"


def handle(i: int) -> None:
    ctx = RequestContext(i)  # LEAK-SITE
    BUS.subscribe(ctx.on_config_change)  # LEAK-SITE


def run(stop: threading.Event) -> None:
    serve(stop, handle)
