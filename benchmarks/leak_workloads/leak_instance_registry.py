"""A class that tracks all its instances in a class attribute (instead of a WeakSet)."""

import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "class-level list of every instance ever created"


class Session:
    instances: list["Session"] = []

    def __init__(self, user: int) -> None:
        self.user = user
        self.headers = {"user": str(user), "agent": "bench"}  # LEAK-SITE
        Session.instances.append(self)  # LEAK-SITE


def run(stop: threading.Event) -> None:
    serve(stop, lambda i: Session(i))  # LEAK-SITE
