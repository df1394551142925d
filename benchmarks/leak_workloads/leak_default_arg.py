"""The mutable-default-argument trap: a 'fresh' list that is the same list on every call."""

import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "mutable default argument accumulating every call's data"


def collect_tags(request_id: int, tags: list[tuple[int, str]] = []) -> list[tuple[int, str]]:  # noqa: B006
    tags.append((request_id, f"tag-{request_id}"))  # LEAK-SITE
    return tags


def run(stop: threading.Event) -> None:
    serve(stop, lambda i: collect_tags(i))
