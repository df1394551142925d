"""Hit rates of our cache policies against OPT, ARC, cachetools, cachebox and theine on real traces.

Replay (per the traces README): for each key ``get``; on a miss ``put``. Every contender sees the same
requests in one run. "ours" is the implementation in use (the compiled core when built); the
implementation check replays every row with both implementations and requires identical hits,
evictions and policy state. Also: the byte-weighted CDN trace under a byte bound (object and byte hit rates),
and the miss-ratio-curve check: ``analyze()``'s estimate of the hit rate at twice the size against an
actual run at twice the size.

    .venv/bin/python benchmarks/cache_hit_rate.py            # every trace, every row (a few minutes)
    .venv/bin/python benchmarks/cache_hit_rate.py --quick    # first 30k requests, fewer rows
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _generated_traces import generated_traces
from _traces import (
    REFERENCE_ROWS,
    add_traces_argument,
    find_traces,
    load_keys,
    load_sized,
    require_traces_dir,
)

from kotoba_memory.cache_manager import CacheManager, CachePolicy

_MISS = object()
# Extra rows for traces the README table does not cover.
EXTRA_ROWS = [("cache2k-web12", 1000), ("cache2k-web12", 4000)]
QUICK_ROWS = [("lirs-multi1", 500), ("lirs-sprite", 500), ("lirs-loop", 500), ("cache2k-web07", 1000)]


# -- reference policies -----------------------------------------------------------------------------


def opt_hits(keys: Sequence[int], capacity: int) -> int:
    """Belady's MIN (evict the key needed farthest in the future; a new key may be the one bypassed)."""
    n = len(keys)
    next_use = [n] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        k = keys[i]
        next_use[i] = last.get(k, n + i)  # never again: distinct "infinite" times keep order stable
        last[k] = i
    resident: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), lazily invalidated
    hits = 0
    for i, k in enumerate(keys):
        nu = next_use[i]
        if k in resident:
            hits += 1
        resident[k] = nu
        heapq.heappush(heap, (-nu, k))
        while len(resident) > capacity:
            neg, victim = heapq.heappop(heap)
            if resident.get(victim) == -neg:
                del resident[victim]
    return hits


class Arc:
    """Adaptive Replacement Cache (Megiddo & Modha, FAST'03), straightforward reference version."""

    def __init__(self, capacity: int) -> None:
        self.c = capacity
        self.p = 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def _replace(self, in_b2: bool) -> None:
        if self.t1 and (len(self.t1) > self.p or (in_b2 and len(self.t1) == self.p)):
            k, _ = self.t1.popitem(last=False)
            self.b1[k] = None
        elif self.t2:
            k, _ = self.t2.popitem(last=False)
            self.b2[k] = None
        else:
            k, _ = self.t1.popitem(last=False)
            self.b1[k] = None

    def access(self, k: int) -> bool:
        c = self.c
        if k in self.t1:
            del self.t1[k]
            self.t2[k] = None
            return True
        if k in self.t2:
            self.t2.move_to_end(k)
            return True
        if k in self.b1:
            self.p = min(c, self.p + max(len(self.b2) / len(self.b1), 1))
            self._replace(False)
            del self.b1[k]
            self.t2[k] = None
            return False
        if k in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1))
            self._replace(True)
            del self.b2[k]
            self.t2[k] = None
            return False
        l1 = len(self.t1) + len(self.b1)
        if l1 == c:
            if len(self.t1) < c:
                self.b1.popitem(last=False)
                self._replace(False)
            else:
                self.t1.popitem(last=False)
        elif l1 < c:
            total = l1 + len(self.t2) + len(self.b2)
            if total >= c:
                if total == 2 * c:
                    self.b2.popitem(last=False)
                self._replace(False)
        self.t1[k] = None
        return False


def _replay_mapping(cache: Any, keys: Sequence[int]) -> int:
    get = cache.get
    hits = 0
    for k in keys:
        if get(k, _MISS) is _MISS:
            cache[k] = 1
        else:
            hits += 1
    return hits


def _replay_theine(keys: Sequence[int], capacity: int) -> int:
    from theine import Cache

    cache = Cache(capacity)
    get, put = cache.get, cache.set
    hits = 0
    for k in keys:
        _, found = get(k)
        if found:
            hits += 1
        else:
            put(k, 1)
    return hits


def _replay_ours(
    policy: CachePolicy, keys: Sequence[int], capacity: int, implementation: str | None = None
) -> tuple[int, CacheManager]:
    cache = CacheManager(max_entries=capacity, policy=policy, implementation=implementation)
    get, put = cache.get, cache.put
    hits = 0
    for k in keys:
        if get(k, _MISS) is _MISS:
            put(k, 1)
        else:
            hits += 1
    return hits, cache


def contenders() -> dict[str, Callable[[Sequence[int], int], int]]:
    """Name -> function(keys, capacity) returning the hit count."""
    import cachebox
    import cachetools

    def arc(keys: Sequence[int], cap: int) -> int:
        a = Arc(cap)
        return sum(1 for k in keys if a.access(k))

    table: dict[str, Callable[[Sequence[int], int], int]] = {
        "OPT": opt_hits,
        "cachetools LRU": lambda keys, cap: _replay_mapping(cachetools.LRUCache(cap), keys),
        "cachetools LFU": lambda keys, cap: _replay_mapping(cachetools.LFUCache(cap), keys),
        "cachetools FIFO": lambda keys, cap: _replay_mapping(cachetools.FIFOCache(cap), keys),
        "cachebox LRU": lambda keys, cap: _replay_mapping(cachebox.LRUCache(cap), keys),
        "cachebox LFU": lambda keys, cap: _replay_mapping(cachebox.LFUCache(cap), keys),
        "ARC": arc,
        "theine W-TinyLFU": _replay_theine,
    }
    for policy in CachePolicy:
        table[f"ours {policy.value}"] = lambda keys, cap, p=policy: _replay_ours(p, keys, cap)[0]
    return table


# -- runs -------------------------------------------------------------------------------------------


def _row(table: dict[str, Callable[[Sequence[int], int], int]], trace: str, keys: Sequence[int],
         capacity: int) -> dict[str, Any]:
    row: dict[str, Any] = {"trace": trace, "capacity": capacity, "requests": len(keys)}
    started = time.perf_counter()
    for name, fn in table.items():
        row[name] = round(100.0 * fn(keys, capacity) / len(keys), 2)
    lru = row["cachetools LRU"]
    best = max(lru, row["ARC"], row["theine W-TinyLFU"])
    opt = row["OPT"]
    ours = row["ours adaptive"]
    row["adaptive - best(LRU,ARC,W-TinyLFU)"] = round(ours - best, 2)
    row["gap closed (LRU->OPT)"] = round((ours - lru) / (opt - lru), 3) if opt > lru else None
    row["seconds"] = round(time.perf_counter() - started, 1)
    print(f"  {trace} @ {capacity}: done in {row['seconds']} s", file=sys.stderr, flush=True)
    return row


def run_rows(traces_dir: Path, rows: list[tuple[str, int]], limit: int | None) -> list[dict[str, Any]]:
    """Hit rate (%) of every contender on every row."""
    names = {t.name: t for t in find_traces(traces_dir) if not t.sized}
    table = contenders()
    results = []
    cache: dict[str, list[int]] = {}
    for trace, capacity in rows:
        if trace not in names:
            print(f"  (trace {trace} not found, row skipped)", file=sys.stderr)
            continue
        keys = cache.get(trace) or cache.setdefault(trace, load_keys(names[trace].path, limit))
        results.append(_row(table, trace, keys, capacity))
    return results


def generated_rows(limit: int | None, capacities: Sequence[int] = (100, 200, 400)) -> list[dict[str, Any]]:
    """The same contenders on generated traces with strong short-term recency, at small sizes."""
    table = contenders()
    return [
        _row(table, name, keys, capacity)
        for name, keys in generated_traces(limit).items()
        for capacity in capacities
    ]


def mrc_check(traces_dir: Path, rows: list[tuple[str, int]], limit: int | None) -> list[dict[str, Any]]:
    """analyze()'s estimated hit rate at 2x the size vs an actual run at 2x, for LRU and ADAPTIVE."""
    names = {t.name: t for t in find_traces(traces_dir) if not t.sized}
    out = []
    for trace, capacity in rows:
        if trace not in names:
            continue
        keys = load_keys(names[trace].path, limit)
        for policy in (CachePolicy.LRU, CachePolicy.ADAPTIVE):
            _, cache = _replay_ours(policy, keys, capacity)
            curve = cache.analyze().miss_ratio_curve
            estimate = 100.0 * (1.0 - curve[max(curve)]) if curve else float("nan")
            actual_hits, _ = _replay_ours(policy, keys, 2 * capacity)
            out.append(
                {
                    "trace": trace,
                    "capacity": capacity,
                    "policy": policy.value,
                    "hit rate": round(100.0 * cache.stats().hit_rate, 2),
                    "estimated at 2x": round(estimate, 2),
                    "actual at 2x": round(100.0 * actual_hits / len(keys), 2),
                }
            )
    return out


def implementation_check(
    traces_dir: Path, rows: list[tuple[str, int]], limit: int | None
) -> list[dict[str, Any]]:
    """Every policy on every row with the compiled core and the reference: hits, evictions, state."""
    names = {t.name: t for t in find_traces(traces_dir) if not t.sized}
    out = []
    for trace, capacity in rows:
        if trace not in names:
            continue
        keys = load_keys(names[trace].path, limit)
        for policy in CachePolicy:
            seen = {}
            for impl in ("c", "python"):
                hits, cache = _replay_ours(policy, keys, capacity, impl)
                seen[impl] = (hits, cache.stats().evictions, cache._describe())
            out.append(
                {
                    "trace": trace,
                    "capacity": capacity,
                    "policy": policy.value,
                    "hit rate (c)": round(100.0 * seen["c"][0] / len(keys), 2),
                    "hit rate (python)": round(100.0 * seen["python"][0] / len(keys), 2),
                    "identical": seen["c"] == seen["python"],
                }
            )
    return out


def byte_weighted(
    traces_dir: Path, limit: int | None, fractions: Sequence[float], implementation: str | None = None
) -> list[dict[str, Any]]:
    """Object and byte hit rates of our policies on the sized trace under a byte bound."""
    sized = [t for t in find_traces(traces_dir) if t.sized]
    out: list[dict[str, Any]] = []
    for trace in sized:
        requests = load_sized(trace.path, limit)
        footprint = sum({k: s for k, s in requests}.values())
        total_bytes = sum(s for _, s in requests)
        for fraction in fractions:
            max_bytes = max(int(footprint * fraction), 1)
            for policy in CachePolicy:
                cache = CacheManager(max_bytes, policy, weigher=lambda v: v, implementation=implementation)
                get, put = cache.get, cache.put
                hits = hit_bytes = 0
                for k, size in requests:
                    if get(k, _MISS) is _MISS:
                        put(k, size)
                    else:
                        hits += 1
                        hit_bytes += size
                out.append(
                    {
                        "trace": trace.name,
                        "max_bytes": max_bytes,
                        "fraction of footprint": fraction,
                        "policy": policy.value,
                        "object hit rate": round(100.0 * hits / len(requests), 2),
                        "byte hit rate": round(100.0 * hit_bytes / total_bytes, 2),
                        "rejections": cache.stats().rejections,
                        "evictions": cache.stats().evictions,
                    }
                )
    return out


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


def _print_generated(generated: list[dict[str, Any]], names: list[str]) -> None:
    print("\n### Generated traces with strong short-term recency, small caches: hit rate (%)\n")
    _print_table(generated, ["trace", "capacity", *names, "adaptive - best(LRU,ARC,W-TinyLFU)"])
    worst = min(r["adaptive - best(LRU,ARC,W-TinyLFU)"] for r in generated)
    print(f"\nADAPTIVE vs best of LRU/ARC/W-TinyLFU on generated traces, worst row: {worst:+.2f} points")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_traces_argument(parser)
    parser.add_argument("--quick", action="store_true", help="first 30k requests of a few rows")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--generated-only", action="store_true",
                        help="only the generated recency traces (no trace files needed)")
    args = parser.parse_args(argv)
    limit = 30_000 if args.quick else None
    if args.generated_only:  # the generated traces need no files
        _print_generated(generated_rows(limit), list(contenders()))
        return 0
    traces_dir = require_traces_dir(args.traces)
    if traces_dir is None:
        return 0
    rows = QUICK_ROWS if args.quick else REFERENCE_ROWS + EXTRA_ROWS
    results = run_rows(traces_dir, rows, limit)
    names = list(contenders())
    print("\n### Hit rate (%) per trace @ capacity (entries)\n")
    _print_table(
        results,
        ["trace", "capacity", *names, "adaptive - best(LRU,ARC,W-TinyLFU)", "gap closed (LRU->OPT)"],
    )
    ref = [r for r in results if (r["trace"], r["capacity"]) in set(REFERENCE_ROWS)] or results
    closed = [r["gap closed (LRU->OPT)"] for r in ref if r["gap closed (LRU->OPT)"] is not None]
    worst = min(r["adaptive - best(LRU,ARC,W-TinyLFU)"] for r in ref)
    mean_closed = f"{statistics.mean(closed):.1%}" if closed else "n/a"
    print(
        f"\nADAPTIVE vs best of LRU/ARC/W-TinyLFU, worst row: {worst:+.2f} points (goal >= -1); "
        f"mean LRU->OPT gap closed: {mean_closed} (goal >= 60%)"
    )
    generated = generated_rows(limit)
    _print_generated(generated, names)
    mrc = mrc_check(traces_dir, rows, limit)
    print("\n### Miss-ratio-curve estimate: hit rate at 2x the size, estimated online vs measured\n")
    _print_table(mrc, ["trace", "capacity", "policy", "hit rate", "estimated at 2x", "actual at 2x"])
    errors = [abs(r["estimated at 2x"] - r["actual at 2x"]) for r in mrc]
    if errors:
        print(f"\nmedian |estimate - actual|: {statistics.median(errors):.2f} points; max {max(errors):.2f}")
    sized = byte_weighted(traces_dir, 20_000 if args.quick else None, (0.01, 0.05, 0.2))
    print("\n### Byte-bounded (sized trace): object and byte hit rates (%)\n")
    _print_table(
        sized,
        ["trace", "max_bytes", "fraction of footprint", "policy", "object hit rate", "byte hit rate"],
    )
    check: list[dict[str, Any]] = []
    if CacheManager(max_entries=1).implementation == "c":
        check = implementation_check(traces_dir, rows, limit)
        sized_py = byte_weighted(traces_dir, 20_000 if args.quick else None, (0.01, 0.05, 0.2), "python")
        for c_row, py_row in zip(sized, sized_py, strict=True):
            check.append(
                {
                    "trace": c_row["trace"],
                    "capacity": c_row["max_bytes"],
                    "policy": c_row["policy"],
                    "hit rate (c)": c_row["object hit rate"],
                    "hit rate (python)": py_row["object hit rate"],
                    "identical": c_row == py_row,
                }
            )
        print("\n### Implementation check: compiled core vs pure-Python reference, same replay\n")
        _print_table(check, ["trace", "capacity", "policy", "hit rate (c)", "hit rate (python)", "identical"])
        print(f"\nidentical on {sum(r['identical'] for r in check)} of {len(check)} replays")
    else:
        print("\n(the compiled core is not in use: implementation check skipped)")
    if args.json:
        args.json.write_text(
            json.dumps({"rows": results, "generated": generated, "mrc": mrc, "sized": sized,
                        "implementations": check}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
