"""Django cache backends through Django's own API: LocMemCache vs KotobaCache on real key traces.

Two questions, both answered through ``caches[...]``-style backend objects (``get``; on a miss ``set``):

1. Hit rate at a capacity of N entries. LocMemCache culls a third of its entries when full; KotobaCache
   with the same ``MAX_ENTRIES`` reproduces that, and KotobaCache bounded by bytes instead (``MAX_BYTES``
   sized for N equal-size values, ``MAX_ENTRIES`` out of the way) evicts one entry at a time by policy.
2. Per-call latency of a hit (``get``) and of a ``set``, LocMemCache vs KotobaCache, interleaved rounds,
   medians and ratios.

    .venv/bin/python benchmarks/framework_cache_backends.py            # all reference rows, 5 rounds
    .venv/bin/python benchmarks/framework_cache_backends.py --quick    # 2 rows, trace prefixes, 3 rounds
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import django
from django.conf import settings

if not settings.configured:
    settings.configure(USE_TZ=True)
    django.setup()

from django.core.cache.backends.locmem import LocMemCache

from kotoba_memory_integrations.django.cache import KotobaCache, forget_location

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path from a test
from _traces import REFERENCE_ROWS, load_keys

VALUE = b"v" * 100  # every cached value has this size, so a byte bound equals an entry bound
DEFAULT_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
def _entry_weight() -> int:
    probe = KotobaCache(f"probe-{uuid.uuid4().hex}", {"OPTIONS": {"MAX_BYTES": 1 << 20}})
    probe.set("k", VALUE)
    weight = probe.stats().bytes
    forget_location(probe._location)
    return weight


def contenders(capacity: int, weight: int) -> dict[str, Callable[[], Any]]:
    """Backend factories under test, each building a fresh, empty store."""

    def locmem() -> Any:
        return LocMemCache(f"locmem-{uuid.uuid4().hex}", {"OPTIONS": {"MAX_ENTRIES": capacity}})

    def kotoba(**options: Any) -> Callable[[], Any]:
        return lambda: KotobaCache(f"kotoba-{uuid.uuid4().hex}", {"OPTIONS": options})

    by_bytes = {"MAX_ENTRIES": 1 << 30, "MAX_BYTES": capacity * weight}
    return {
        "LocMemCache (cull 1/3)": locmem,
        "KotobaCache lru, MAX_ENTRIES (cull 1/3)": kotoba(MAX_ENTRIES=capacity, MAX_BYTES=1 << 30),
        "KotobaCache lru, MAX_BYTES": kotoba(POLICY="lru", **by_bytes),
        "KotobaCache adaptive, MAX_BYTES": kotoba(POLICY="adaptive", **by_bytes),
    }


def replay(cache: Any, keys: list[int]) -> float:
    """Hit rate of get-then-set-on-miss over ``keys``."""
    missing = object()
    hits = 0
    for key in keys:
        if cache.get(key, missing) is missing:
            cache.set(key, VALUE, None)
        else:
            hits += 1
    return hits / len(keys)


def _release(cache: Any) -> None:
    cache.clear()
    if isinstance(cache, KotobaCache):
        forget_location(cache._location)


def hit_rates(traces: Path, rows: list[tuple[str, int]], limit: int | None) -> None:
    weight = _entry_weight()
    print(f"\n## Hit rate (%), get + set-on-miss through the Django API (value {len(VALUE)} B)\n")
    names = list(contenders(1, weight))
    print("| trace @ capacity | requests | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for stem, capacity in rows:
        path = traces / f"{stem}.keys.gz"
        if not path.exists():
            print(f"| {stem} @ {capacity} | (missing) |" + " |" * len(names))
            continue
        keys = load_keys(path, limit)
        cells = []
        for factory in contenders(capacity, weight).values():
            cache = factory()
            cells.append(f"{100 * replay(cache, keys):.2f}")
            _release(cache)
        print(f"| {stem} @ {capacity} | {len(keys):,} | " + " | ".join(cells) + " |")


def _time_per_call(func: Callable[[int], Any], keys: range) -> float:
    start = time.perf_counter_ns()
    for key in keys:
        func(key)
    return (time.perf_counter_ns() - start) / len(keys)


def latencies(rounds: int, batch: int) -> None:
    """ns per get-hit and per set, both backends interleaved round by round (order alternates)."""
    keys = range(batch)
    backends: dict[str, Any] = {
        "LocMemCache": LocMemCache(f"lat-locmem-{uuid.uuid4().hex}", {"OPTIONS": {"MAX_ENTRIES": 2 * batch}}),
        "KotobaCache": KotobaCache(f"lat-kotoba-{uuid.uuid4().hex}", {"OPTIONS": {"MAX_ENTRIES": 2 * batch}}),
    }
    samples: dict[tuple[str, str], list[float]] = {(n, op): [] for n in backends for op in ("get", "set")}
    for round_no in range(rounds):
        order = list(backends.items()) if round_no % 2 == 0 else list(reversed(backends.items()))
        for name, cache in order:
            samples[(name, "set")].append(_time_per_call(lambda k, c=cache: c.set(k, VALUE, None), keys))
            samples[(name, "get")].append(_time_per_call(lambda k, c=cache: c.get(k), keys))
    print(f"\n## Latency (ns per call, median of {rounds} interleaved rounds of {batch:,} calls)\n")
    print("| operation | LocMemCache | KotobaCache | KotobaCache / LocMemCache |")
    print("|---|---|---|---|")
    for op in ("get", "set"):
        loc = statistics.median(samples[("LocMemCache", op)])
        kot = statistics.median(samples[("KotobaCache", op)])
        label = "get (hit)" if op == "get" else "set"
        print(f"| {label} | {loc:,.0f} | {kot:,.0f} | {kot / loc:.2f}x |")
    for cache in backends.values():
        _release(cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES, help="trace directory")
    parser.add_argument("--quick", action="store_true", help="2 rows on trace prefixes, 3 rounds")
    args = parser.parse_args(argv)
    versions = f"python {sys.version.split()[0]}, django {django.get_version()}"
    print(f"{versions}, pickle protocol {pickle.HIGHEST_PROTOCOL}")
    latencies(rounds=3 if args.quick else 7, batch=2_000 if args.quick else 20_000)
    traces = args.traces
    if not traces.is_dir() or not any(traces.glob("*.keys.gz")):
        print(f"\nNo traces in {traces}: hit rates not measured (pass --traces DIR).")
        return 0
    rows = [("lirs-2_pools", 100), ("cache2k-web07", 1000)] if args.quick else REFERENCE_ROWS
    hit_rates(traces, rows, limit=20_000 if args.quick else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
