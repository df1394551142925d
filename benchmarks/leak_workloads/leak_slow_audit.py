"""A slow leak: an audit trail that keeps one small record every ~1.5 s (about 5 KB a minute)."""

import threading

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "slow leak, ~5 KB/min of audit records"

_AUDIT: list[str] = []


def handle(i: int) -> None:
    # Most requests are harmless; one in 300 (every ~1.5 s at 200 req/s) is audited forever.
    scratch = [str(n) for n in range(20)]
    if i % 300 == 0:
        _AUDIT.append(f"user={i % 97} action=login request={i} ok " + "-" * 60)  # LEAK-SITE
    del scratch


def run(stop: threading.Event) -> None:
    serve(stop, handle, interval=0.005)
