"""Regexes compiled on first use from a bounded set of route patterns (re's own cache warms up)."""

import re
import threading

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "lazy regex compilation over 150 route patterns: warm-up then stable"


def handle(i: int) -> None:
    pattern = re.compile(rf"^/api/v{i % 150}/items/(\d+)/detail$")
    _ = pattern.match(f"/api/v{i % 150}/items/{i}/detail")


def run(stop: threading.Event) -> None:
    serve(stop, handle)
