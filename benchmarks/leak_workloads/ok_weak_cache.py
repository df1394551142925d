"""A WeakValueDictionary of per-request objects: entries vanish with their objects."""

import threading
import weakref

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "WeakValueDictionary cache whose values die after each request"


class Document:
    def __init__(self, doc_id: int) -> None:
        self.doc_id = doc_id
        self.text = "lorem ipsum " * 30


_OPEN: "weakref.WeakValueDictionary[int, Document]" = weakref.WeakValueDictionary()


def handle(i: int) -> None:
    doc = Document(i)
    _OPEN[i] = doc
    _ = len(_OPEN.get(i, doc).text)


def run(stop: threading.Event) -> None:
    serve(stop, handle)
