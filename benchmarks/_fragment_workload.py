"""A heap-fragmenting Python workload, run as a child of ``allocator_rss.py`` (one allocator per process).

Builds many mixed-size objects in ``--threads`` threads (so glibc hands out per-thread arenas), at once or,
with ``--staggered``, taking turns like a thread pool; frees 90 % of them at random; allocates a new batch;
optionally calls ``malloc_trim(0)``; prints one JSON line: resident set size at the peak and at the end,
wall-clock and CPU time, and the allocator the process really ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_object(rng: random.Random) -> object:
    """One object from a web-like mix: small containers/strings (pymalloc) and malloc-sized buffers."""
    roll = rng.random()
    if roll < 0.25:
        return {"id": rng.randrange(1 << 30), "name": "x" * rng.randrange(8, 200), "tags": [1, 2, 3]}
    if roll < 0.95:
        return bytes(min(16_384, int(rng.lognormvariate(7.3, 0.9)) + 513))  # 513 B+: goes to malloc
    return bytearray(rng.randrange(16_384, 120_000))  # below the mmap threshold: still on the heap


def worker(
    index: int,
    seed: int,
    count: int,
    keep_share: float,
    again: float,
    turns: list[threading.Event],
    kept: list[object],
    peak: list[int],
) -> None:
    """Build ``count`` objects, free all but ``keep_share`` at random, then allocate ``again`` x count more.

    Thread ``index`` starts when ``turns[index]`` is set and sets the next turn when done: all turns set up
    front gives concurrent threads; chained turns give a thread pool whose bursts land on different threads.
    """
    turns[index].wait(timeout=300)
    rng = random.Random(seed * 1000 + index)
    objs = [make_object(rng) for _ in range(count)]
    peak.append(rss_bytes())
    rng.shuffle(objs)
    survivors = objs[: int(count * keep_share)]
    del objs
    fresh = [make_object(rng) for _ in range(int(count * again))]
    kept.extend(survivors)
    kept.extend(fresh)
    if index + 1 < len(turns):
        turns[index + 1].set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--staggered",
        action="store_true",
        help="threads take turns (a thread pool) instead of running at once",
    )
    parser.add_argument("--objects", type=int, default=100_000, help="objects built in total")
    parser.add_argument("--keep", type=float, default=0.1, help="share kept after the random free")
    parser.add_argument("--again", type=float, default=0.3, help="new objects, as a share of --objects")
    parser.add_argument("--trim", action="store_true", help="call malloc_trim(0) at the end")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from kotoba_memory.allocators import detect_allocator, malloc_trim

    start = time.perf_counter()
    cpu_start = time.process_time()
    kept: list[object] = []
    peak: list[int] = []
    turns = [threading.Event() for _ in range(args.threads)]
    for i, turn in enumerate(turns):
        if i == 0 or not args.staggered:
            turn.set()
    per_thread = args.objects // args.threads
    threads = [
        threading.Thread(
            target=worker, args=(i, args.seed, per_thread, args.keep, args.again, turns, kept, peak)
        )
        for i in range(args.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    trimmed = None
    if args.trim:
        result = malloc_trim(0)
        trimmed = result.supported and result.released
    runtime = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    info = detect_allocator()
    print(
        json.dumps(
            {
                "allocator": info.type.value,
                "arena_max": os.environ.get("MALLOC_ARENA_MAX"),
                "threads": args.threads,
                "objects_kept": len(kept),
                "staggered": args.staggered,
                "rss_peak": max(peak, default=0),
                "rss_end": rss_bytes(),
                "runtime_s": runtime,
                "cpu_s": cpu,
                "trimmed": trimmed,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
