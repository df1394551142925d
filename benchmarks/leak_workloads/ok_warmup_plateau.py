"""A per-user cache that fills while the user population is being seen, then only hits."""

import threading
import time

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "warm-up: cache over 600 users fills in ~2 s, then plateaus"

_PROFILES: dict[int, dict[str, object]] = {}


def handle(i: int) -> None:
    user = i % 600
    profile = _PROFILES.get(user)
    if profile is None:
        time.sleep(0.001)  # a "database" fetch
        profile = _PROFILES[user] = {"id": user, "name": f"user-{user}", "prefs": list(range(20))}
    _ = profile["name"]


def run(stop: threading.Event) -> None:
    serve(stop, handle)
