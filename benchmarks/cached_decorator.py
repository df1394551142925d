"""``@cached`` (kotoba-memory hooks) vs functools.lru_cache and cachetools.cached: cost of a cache hit.

Every contender memoises the same two-argument function; after a warm-up that fills each cache with the
same keys, rounds of hit-only calls run interleaved (the contender order rotates each round). Reports the
median ns per call and the ratio to ``functools.lru_cache``; a plain call of the undecorated function is
the floor. Nothing here reads the traces: the keys are generated.

    .venv/bin/python benchmarks/cached_decorator.py           # 9 rounds of 50,000 calls
    .venv/bin/python benchmarks/cached_decorator.py --quick   # 3 rounds of 5,000 calls
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Callable

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.hooks import cached

KEYS = 512


def work(a: int, b: int) -> int:
    """The memoised function: cheap, so the figures are the caches' own cost."""
    return a * 31 + b


def contenders() -> dict[str, Callable[[int, int], int]]:
    """Each contender: a callable memoising ``work`` (None of them is shared)."""
    found: dict[str, Callable[[int, int], int]] = {
        "plain call (no cache)": work,
        "functools.lru_cache": functools.lru_cache(maxsize=4096)(work),
    }
    try:
        import cachetools

        found["cachetools.cached(LRUCache)"] = cachetools.cached(cachetools.LRUCache(maxsize=4096))(work)
    except ImportError:  # a dev-only peer
        print("cachetools not installed: that column is left out", file=sys.stderr)
    found["kotoba @cached(CacheManager lru)"] = cached(CacheManager(max_entries=4096, policy="lru"))(work)
    found["kotoba @cached(CacheManager adaptive)"] = cached(CacheManager(max_entries=4096))(work)
    return found


def _round(func: Callable[[int, int], int], calls: int) -> float:
    keys = [(i % KEYS, i % 7) for i in range(calls)]
    start = time.perf_counter_ns()
    for a, b in keys:
        func(a, b)
    return (time.perf_counter_ns() - start) / calls


def measure(rounds: int, calls: int) -> dict[str, float]:
    """Median ns per hit for each contender, interleaved with a rotating order."""
    funcs = contenders()
    for func in funcs.values():
        _round(func, KEYS * 7)  # fill every cache with every key
    samples: dict[str, list[float]] = {name: [] for name in funcs}
    names = list(funcs)
    for round_no in range(rounds):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_round(funcs[name], calls))
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_async(rounds: int, calls: int) -> float:
    """Median ns per hit of an ``async def`` under ``@cached`` (awaited in a running loop)."""

    async def awork(a: int, b: int) -> int:
        return a * 31 + b

    memoised = cached(CacheManager(max_entries=4096, policy="lru"))(awork)

    async def one_round() -> float:
        start = time.perf_counter_ns()
        for i in range(calls):
            await memoised(i % KEYS, i % 7)
        return (time.perf_counter_ns() - start) / calls

    async def run() -> list[float]:
        await one_round()  # warm-up fills the cache
        return [await one_round() for _ in range(rounds)]

    return statistics.median(asyncio.run(run()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5,000 calls")
    args = parser.parse_args(argv)
    rounds, calls = (3, 5_000) if args.quick else (9, 50_000)
    medians = measure(rounds, calls)
    baseline = medians["functools.lru_cache"]
    print(
        f"python {sys.version.split()[0]}; median ns per cache hit, {rounds} interleaved rounds of {calls:,}"
    )
    print("\n| contender | ns per hit | vs functools.lru_cache |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:,.0f} | {value / baseline:.2f}x |")
    print(f"| kotoba @cached on an async def (awaited) | {measure_async(rounds, calls):,.0f} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
