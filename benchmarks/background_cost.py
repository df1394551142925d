r"""CPU of kotoba-memory's periodic jobs per run, in a fresh worker and in one an hour old.

A worker's periodic jobs (the scheduler's tasks) cost the same every second whatever the load, so in a
worker that is busy a small share of the time they are a large part of kotoba-memory's overhead; and
what a job reads can grow with uptime until a cap (the profiler keeps an hour of one-second samples),
so a server benchmark that runs for minutes does not see an hour-old worker's cost. This benchmark
builds the plain-WSGI field app (``benchmarks/field_apps/wsgi_catalog.py``, its leak off) at
``MemoryConfig()``'s defaults in one process, serves ``--requests`` requests from four threads, then
times each job's function with ``time.thread_time`` (median of ``--repeat`` calls) twice: as the
process is (its sample ring holds the seconds it has run), and after filling the ring to its capacity
with copies of its last sample spread over the hour before (what an hour of uptime leaves in it).

    .venv/bin/python benchmarks/background_cost.py
    .venv/bin/python benchmarks/background_cost.py --requests 20000 --repeat 40

The jobs are called directly, so the figures are the jobs' own CPU: not the scheduler's wake-ups, and
not the tracing window (``memory_profiler.window``, whose cost the trace budget bounds; see
``field_overhead.py``). Run it in another checkout to compare before and after a change
(``PYTHONPATH`` decides which tree is measured):

    git worktree add /tmp/before 0b8e0c6
    PYTHONPATH=/tmp/before:/tmp/before/core .venv/bin/python /tmp/before/benchmarks/background_cost.py
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if not os.environ.get("PYTHONPATH"):  # this tree, unless the caller chose one
    sys.path[:0] = [str(REPO), str(REPO / "core")]
# The field app reads these when it is imported: kotoba-memory on, MemoryConfig() untouched, no leak.
os.environ.update(FIELD_KOTOBA="1", FIELD_PRODUCTION="1", FIELD_LEAKS="0", FIELD_PROFILE="1")
for name in ("FIELD_CONFIG", "FIELD_MIDDLEWARE_ONLY", "FIELD_OUT", "FIELD_FIRST_WINDOW_S"):
    os.environ.pop(name, None)

_PATHS = ("/", "/products/", "/recent", "/session/", "/render/", "/audit/", "/report/", "/lookup/")


def serve(app: Callable[..., Any], requests: int, threads: int = 4) -> None:
    """``requests`` requests to the catalogue's routes, split over ``threads`` threads."""

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        return None

    def worker(n: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(n):
            path = rng.choice(_PATHS)
            if path.endswith("/") and path != "/":
                path += str(rng.randrange(1_000_000_000))
            body = app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response)
            for _chunk in body:
                pass
            body.close()

    pool = [threading.Thread(target=worker, args=(requests // threads, i)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def age_ring(profiler: Any) -> int:
    """Fill the profiler's sample ring to capacity, its last sample copied at one-second steps over
    the hour before (the RSS and block counts drifting a little, so fits see a real series)."""
    ring = profiler._ring
    last = ring.samples()[-1]
    start = last.timestamp - ring.capacity
    for k in range(ring.capacity):
        ring.append(
            start + k, last.rss_bytes + 4096 * (k % 7), last.traced_bytes, last.allocated_blocks + k % 11,
            last.heap_bytes if k % 30 == 0 else None, last.gc_counts, {},
        )
    return len(ring)


def cpu_us(fn: Callable[[], object], repeat: int) -> float:
    """Median CPU µs of one call of ``fn`` (this thread's CPU time, one call at a time)."""
    fn()
    times = []
    for _ in range(repeat):
        started = time.thread_time_ns()
        fn()
        times.append((time.thread_time_ns() - started) / 1000)
    return statistics.median(times)


def jobs(optimizer: Any) -> dict[str, tuple[float, Callable[[], object]]]:
    """Each periodic job: (its interval in s, a call of what it runs)."""
    from kotoba_memory.process.scheduler import scheduler

    tasks = {task.name: task for task in scheduler.tasks()}
    out: dict[str, tuple[float, Callable[[], object]]] = {}
    publish = tasks.get("fleet.publish")
    if publish is not None:
        out["fleet.publish"] = (publish.interval_s, publish.fn)
    profiler = optimizer.profiler
    if profiler is not None:
        out["memory_profiler.sample"] = (tasks["memory_profiler.sample"].interval_s, profiler._sample)
    gc_optimizer = optimizer.gc_optimizer
    if gc_optimizer is not None:
        def monitor() -> object:
            gc_optimizer._next_full_tick = 0.0  # a whole tick (ceiling and budget), as once a second
            return gc_optimizer._monitor()

        out["gc_optimizer.monitor"] = (tasks["gc_optimizer.monitor"].interval_s, monitor)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8000, help="requests served before timing")
    parser.add_argument("--repeat", type=int, default=25, help="timed calls of each job per state")
    args = parser.parse_args(argv)
    if args.requests < 8 or args.repeat < 1:
        parser.error("--requests must be >= 8 and --repeat >= 1")

    from benchmarks.field_apps.wsgi_catalog import create_app
    from kotoba_memory_integrations import runtime

    app = create_app()
    optimizer = runtime.get_optimizer()
    if optimizer is None or optimizer.profiler is None:
        print("the field app did not start an optimizer with a profiler", file=sys.stderr)
        return 1
    serve(app, args.requests)
    time.sleep(2.5)  # a few real samples in the ring
    found = jobs(optimizer)
    ring = optimizer.profiler._ring
    fresh_fill = len(ring)
    fresh = {name: cpu_us(fn, args.repeat) for name, (_, fn) in found.items()}
    aged_fill = age_ring(optimizer.profiler)
    aged = {name: cpu_us(fn, args.repeat) for name, (_, fn) in found.items()}
    runtime.stop_optimizer()

    print(f"kotoba-memory's periodic jobs, MemoryConfig() defaults, {args.requests} requests served; "
          f"median CPU per run of {args.repeat} calls")
    print(f"  {'job':<24} {'every':>6} {f'fresh ({fresh_fill} samples)':>22} "
          f"{f'an hour old ({aged_fill} samples)':>30} {'share of a core, old':>22}")
    for name, (interval, _) in found.items():
        share = aged[name] / 1e6 / interval
        print(f"  {name:<24} {interval:>5g}s {fresh[name]:>19.1f} µs {aged[name]:>27.1f} µs "
              f"{100 * share:>21.4f}%")
    total = sum(aged[name] / 1e6 / interval for name, (interval, _) in found.items())
    print(f"  together, an hour old: {100 * total:.4f}% of one core "
          "(of a worker busy a tenth of the time: ten times that share of its CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
