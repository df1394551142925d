r"""CPU of kotoba-memory's periodic jobs per run, in a fresh worker and in one an hour old.

A worker's periodic jobs (the scheduler's tasks) cost the same every second whatever the load, so in a
worker that is busy a small share of the time they are a large part of kotoba-memory's overhead; and
what a job reads can grow with uptime until a cap (the profiler keeps an hour of one-second samples),
so a server benchmark that runs for minutes does not see an hour-old worker's cost. This benchmark
builds the plain-WSGI field app (``benchmarks/field_apps/wsgi_catalog.py``, its leak off) at
``MemoryConfig()``'s defaults in one process, serves ``--requests`` requests from four threads, then
times each job's function with ``time.thread_time`` (median of ``--repeat`` calls) twice: as the
process is (its sample ring holds the seconds it has run, no tracing window has run yet), and as an
hour of uptime leaves it: the ring filled to its capacity with copies of its last sample spread over
the hour before, and the leak detector fed synthetic windows up to its caps (every site slot taken,
most of them churning, two of them growing with one route: suspects whose route is fitted).

    .venv/bin/python benchmarks/background_cost.py
    .venv/bin/python benchmarks/background_cost.py --requests 20000 --repeat 40

The jobs are called directly, so the figures are the jobs' own CPU: not the scheduler's wake-ups, and
not the tracing window (``memory_profiler.window``, whose cost the trace budget bounds; see
``field_overhead.py``). The share of a core assumes each job runs at its interval; the fleet publisher
stretches its own (up to 12 times) while a write costs more than 0.1% of the process's CPU, so a
costly write shows in a worker as a longer GIL hold and a staler fleet row more than as CPU.

To compare before and after a change, point ``PYTHONPATH`` at another checkout (with its C extensions
built): this script then measures that tree's code.

    git worktree add /tmp/before 0b8e0c6
    PYTHONPATH=/tmp/before:/tmp/before/core .venv/bin/python benchmarks/background_cost.py
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
    the hour before, growing as the two leaking sites of :func:`age_detector` make it grow (with a
    little jitter, so fits see a real series); glibc's heap read on one sample in 30."""
    ring = profiler._ring
    last = ring.samples()[-1]
    start = last.timestamp - ring.capacity
    heap = last.heap_bytes or 64 << 20
    with profiler._lock:  # the sample task appends under it: no real sample lands amid these
        _fill(ring, start, last, heap)
    return len(ring)


def _fill(ring: Any, start: float, last: Any, heap: int) -> None:
    for k in range(ring.capacity):
        grown = 60_000 * k
        ring.append(
            start + k, last.rss_bytes + grown + 4096 * (k % 7), last.traced_bytes,
            last.allocated_blocks + 600 * k + k % 11, heap + grown if k % 30 == 0 else None,
            last.gc_counts, {},
        )


def age_detector(profiler: Any, seed: int = 1) -> int:
    """Feed the leak detector an hour of windows at its caps (``max_windows`` windows, ``max_sites``
    tracked sites admitted over the first windows, eight routes counted per growth step): sites that
    churn inside every window, and two that grow steadily with one route's requests (suspects, whose
    route is fitted). Synthetic snapshots: no tracing runs. Returns the sites tracked."""
    detector = profiler._detector
    rng = random.Random(seed)
    routes = [f"/r{i}" for i in range(8)]
    sites = detector.max_sites
    keys = [((f"/srv/app/views_{i % 40}.py", 10 + i), ("/srv/app/h.py", 200 + i)) for i in range(sites)]
    leaking = set(keys[:2])
    windows = detector.max_windows
    end = time.time()
    leaked = 0
    for w in range(windows):
        t0 = end - (windows - w) * 3600.0 / windows
        steps = [{route: rng.randint(0, 6) * rng.choice((1, 3)) for route in routes} for _ in range(6)]
        shots = []
        for j in range(6):
            leaked += 512 * steps[j]["/r0"]
            stats = {}
            for i, key in enumerate(keys[: 32 * (w + 1)]):  # 32 admitted per window
                if key in leaking:
                    size = 100_000 + leaked
                else:  # a cache refilling its slots, an in-flight buffer: up and down within the window
                    size = 50_000 + (8192 * ((j + i + w) % 4) if (w + i) % 3 else 4096 * j)
                stats[key] = (size, size // 100)
            shots.append((t0 + 0.1 * j, stats))
        totals = {route: sum(step[route] for step in steps) for route in routes}
        detector.add_window(shots, totals, steps)
    return detector.sites_tracked


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
    from kotoba_memory.process.scheduler import scheduler
    from kotoba_memory_integrations import runtime

    app = create_app()
    optimizer = runtime.get_optimizer()
    if optimizer is None or optimizer.profiler is None:
        print("the field app did not start an optimizer with a profiler", file=sys.stderr)
        return 1
    # No real tracing window: one would slow the timed calls, and feed the detector alongside ours.
    for task in scheduler.tasks():
        if task.name == "memory_profiler.window":
            task.cancel()
    serve(app, args.requests)
    time.sleep(2.5)  # a few real samples in the ring
    found = jobs(optimizer)
    ring = optimizer.profiler._ring
    fresh_fill = len(ring)
    fresh = {name: cpu_us(fn, args.repeat) for name, (_, fn) in found.items()}
    aged_fill = age_ring(optimizer.profiler)
    sites = age_detector(optimizer.profiler)
    suspects = len(optimizer.profiler.leak_verdict()[0])
    aged = {name: cpu_us(fn, args.repeat) for name, (_, fn) in found.items()}
    runtime.stop_optimizer()

    print(f"kotoba-memory's periodic jobs, MemoryConfig() defaults, {args.requests} requests served; "
          f"median CPU per run of {args.repeat} calls")
    print(f"  an hour old: the sample ring full ({aged_fill} samples), the leak detector at its caps "
          f"({sites} sites tracked over {optimizer.profiler._detector.windows} windows, {suspects} suspects)")
    print(f"  {'job':<24} {'every':>6} {f'fresh ({fresh_fill} samples)':>22} "
          f"{'an hour old':>30} {'share of a core, old':>22}")
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
