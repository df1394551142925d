"""Reference cycles whose __del__ resurrects the object into a 'close later' list."""

import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "cycles with __del__ that parks self in a global list (resurrection)"

_TO_CLOSE: list["Connection"] = []


class Connection:
    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.peer: Connection | None = None
        self.buffer = bytes(400)  # LEAK-SITE

    def __del__(self) -> None:
        _TO_CLOSE.append(self)  # LEAK-SITE


def handle(i: int) -> None:
    a = Connection(i)  # LEAK-SITE
    b = Connection(i)  # LEAK-SITE
    a.peer, b.peer = b, a


def run(stop: threading.Event) -> None:
    serve(stop, handle)
