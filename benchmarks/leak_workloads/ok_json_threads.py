"""Four threads each parse and render JSON documents: lots of short-lived allocations."""

import json
import threading

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "request temporaries in four threads (json parse/render)"


def handle(i: int) -> None:
    body = json.dumps({"id": i, "items": [{"n": n, "name": f"item-{n}"} for n in range(40)]})
    doc = json.loads(body)
    _ = json.dumps({"count": len(doc["items"]), "first": doc["items"][0]})


def run(stop: threading.Event) -> None:
    serve(stop, handle, interval=0.004, threads=4)
