"""Every request builds a small graph with reference cycles; the cyclic GC frees them."""

import threading

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "cyclic garbage (parent<->child) collected by the GC"


class Node:
    def __init__(self, parent: "Node | None") -> None:
        self.parent = parent
        self.children: list[Node] = []
        self.data = bytes(100)
        if parent is not None:
            parent.children.append(self)


def handle(i: int) -> None:
    root = Node(None)
    for _ in range(10):
        Node(root)


def run(stop: threading.Event) -> None:
    serve(stop, handle)
