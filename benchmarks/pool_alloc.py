"""Allocate+release cost: MemoryPool (C and pure Python) vs ``bytearray(n)`` vs ``bytes(n)``, interleaved.

    .venv/bin/python benchmarks/pool_alloc.py            # full run (~1 min)
    .venv/bin/python benchmarks/pool_alloc.py --quick    # a few seconds

Every contender runs the same loop shape; rounds interleave the contenders in a shuffled order and the
medians over rounds are reported, with ratios against ``bytearray(n)`` (> 1 means faster than bytearray).
Both pool implementations run in the same process: ``CMemoryPool`` (the C hot paths; skipped when the
extension is not built) and ``PyMemoryPool`` (the pure-Python reference). "+memoryview" wraps the C
block itself in a memoryview (it exports the buffer protocol); "+as_slice" asks for the block's view.
Loops are timed in this thread's CPU time (``time.thread_time_ns``), not wall-clock time: on a shared,
overloaded machine wall-clock time charges the longer loops for the time they wait to be scheduled.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kotoba_memory.memory_pool.pool import CMemoryPool, PyMemoryPool

SIZES = [64, 1024, 64 * 1024, 1024 * 1024]
NAMES = [
    "c pool", "c pool+memoryview", "c pool+as_slice", "c pool with-block",
    "py pool", "py pool+as_slice", "bytearray(n)", "bytes(n)",
]
Loop = Callable[[int], None]


def pool_loops(pool: Any, size: int, prefix: str, buffer: bool) -> dict[str, Loop]:
    """name -> a loop running ``count`` allocate+release operations of ``size`` bytes from ``pool``."""
    allocate = pool.allocate

    def pool_loop(count: int) -> None:
        for _ in range(count):
            allocate(size).release()

    def pool_memoryview_loop(count: int) -> None:
        for _ in range(count):
            block = allocate(size)
            memoryview(block).release()
            block.release()

    def pool_view_loop(count: int) -> None:
        for _ in range(count):
            block = allocate(size)
            block.as_slice()
            block.release()

    def pool_with_loop(count: int) -> None:
        for _ in range(count):
            with allocate(size) as block:
                block.as_slice()

    loops = {f"{prefix} pool": pool_loop, f"{prefix} pool+as_slice": pool_view_loop}
    if buffer:
        loops[f"{prefix} pool+memoryview"] = pool_memoryview_loop
        loops[f"{prefix} pool with-block"] = pool_with_loop
    return loops


def contenders(pools: dict[str, Any], size: int) -> dict[str, Loop]:
    """name -> a loop running ``count`` allocate+release operations of ``size`` bytes."""

    def bytearray_loop(count: int) -> None:
        for _ in range(count):
            bytearray(size)

    def bytes_loop(count: int) -> None:
        for _ in range(count):
            bytes(size)

    loops: dict[str, Loop] = {}
    for prefix, pool in pools.items():
        loops.update(pool_loops(pool, size, prefix, buffer=prefix == "c"))
    loops["bytearray(n)"] = bytearray_loop
    loops["bytes(n)"] = bytes_loop
    return loops


def _ops_for(size: int, budget_bytes: int, floor: int, ceiling: int) -> int:
    return max(floor, min(ceiling, budget_bytes // size))


def run(sizes: list[int], rounds: int, ops: int, seed: int = 1) -> dict[str, dict[str, float]]:
    """Median ns/op per size and contender, plus ``ratio`` entries (bytearray time / contender time)."""
    rng = random.Random(seed)
    pools: dict[str, Any] = {"py": PyMemoryPool(64 * 1024 * 1024)}
    if CMemoryPool is not None:
        pools["c"] = CMemoryPool(64 * 1024 * 1024)
    samples: dict[int, dict[str, list[float]]] = {s: {} for s in sizes}
    loops = {s: contenders(pools, s) for s in sizes}
    # At least 2000 operations per timed loop: the C pool's ~40 ns loops are otherwise too short to time.
    counts = {s: _ops_for(s, ops * 1024, 2000, ops) for s in sizes}
    for loop in (lp for by_size in loops.values() for lp in by_size.values()):
        loop(50)  # warm up: slabs carved, large blocks split, heap primed
    gc_was_enabled = gc.isenabled()
    gc.disable()  # GC pauses would land on whichever contender happens to run
    try:
        for _ in range(rounds):
            order = [(s, name) for s in sizes for name in loops[s]]
            rng.shuffle(order)
            for size, name in order:
                count = counts[size]
                start = time.thread_time_ns()
                loops[size][name](count)
                samples[size].setdefault(name, []).append((time.thread_time_ns() - start) / count)
    finally:
        if gc_was_enabled:
            gc.enable()
    result: dict[str, dict[str, float]] = {}
    for size in sizes:
        medians = {name: statistics.median(v) for name, v in samples[size].items()}
        base = medians["bytearray(n)"]
        row = {f"{name} ns": round(ns, 1) for name, ns in medians.items()}
        row.update({f"{name} speedup": round(base / ns, 2) for name, ns in medians.items()})
        result[str(size)] = row
    return result


def _label(size: int) -> str:
    if size >= 1 << 20:
        return f"{size >> 20} MiB"
    if size >= 1 << 10:
        return f"{size >> 10} KiB"
    return f"{size} B"


def markdown(result: dict[str, dict[str, float]]) -> str:
    """The result as a markdown table: ns/op, then speedups against bytearray(n)."""
    first = next(iter(result.values()))
    names = [n for n in NAMES if f"{n} ns" in first]
    pools = [n for n in ("c pool", "c pool+memoryview", "py pool") if n in names]
    head = "| n | " + " | ".join(f"{n} ns/op" for n in names) + " | " + " | ".join(
        f"{n} vs bytearray" for n in pools
    ) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + len(pools))]
    for size, row in result.items():
        cells = " | ".join(f"{row[f'{n} ns']:,.0f}" for n in names)
        ratios = " | ".join(f"{row[f'{n} speedup']:.2f}x" for n in pools)
        lines.append(f"| {_label(int(size))} | {cells} | {ratios} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and operations")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 15, quick 5)")
    parser.add_argument("--ops", type=int, help="max operations per timed loop (default 20000, quick 3000)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)
    ops = args.ops or (3000 if args.quick else 20000)
    result = run(SIZES, rounds, ops)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"python {sys.version.split()[0]}, {rounds} interleaved rounds, thread CPU time, medians; "
            "speedup = bytearray / x"
        )
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
