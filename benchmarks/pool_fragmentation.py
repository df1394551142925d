"""Fragmentation of MemoryPool over a long alloc/free churn with a real object-size mix.

    .venv/bin/python benchmarks/pool_fragmentation.py            # full run
    .venv/bin/python benchmarks/pool_fragmentation.py --quick    # a few seconds
    .venv/bin/python benchmarks/pool_fragmentation.py --traces /path/to/traces

Sizes come, in request order, from ``adaptsize-request.sized.gz`` (AdaptSize CDN trace, ``key size`` per
line) in ``../shared/traces`` relative to the repo root. The churn keeps the live bytes near a target
share of the pool: before each allocation, random live blocks are freed until the new one fits.
Contenders are the same pool with 16, 8, 4 and 1 (power-of-two) size classes per octave, fed the same
sequence. Reported: internal and external fragmentation (median over samples, and at the end), failed
allocations, pool metadata and the cost of the callers' block handles, both as a share of the capacity.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
from pathlib import Path

from kotoba_memory.memory_pool import MemoryBlock, MemoryPool, PoolExhausted

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACE_NAME = "adaptsize-request.sized.gz"
CLASSES = [16, 8, 4, 1]


def load_sizes(traces_dir: Path, limit: int | None = None) -> list[int]:
    """Object sizes in request order from the AdaptSize trace."""
    sizes: list[int] = []
    with gzip.open(traces_dir / TRACE_NAME, "rt") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 2 and int(parts[1]) > 0:
                sizes.append(int(parts[1]))
                if limit is not None and len(sizes) >= limit:
                    break
    return sizes


def churn(
    sizes: list[int],
    *,
    capacity: int,
    occupancy: float,
    operations: int,
    per_octave: int,
    seed: int = 1,
    samples: int = 50,
) -> dict[str, float]:
    """Run ``operations`` allocations (cycling through ``sizes``) against one pool; returns figures."""
    pool = MemoryPool(capacity, classes_per_octave=per_octave)
    rng = random.Random(seed)
    target = int(capacity * occupancy)
    live: list[MemoryBlock] = []
    live_bytes = 0
    failures = 0
    internal: list[float] = []
    external: list[float] = []
    every = max(1, operations // samples)
    handle_bytes = sys.getsizeof(pool.allocate(1)) + sys.getsizeof(memoryview(b""))
    for i in range(operations):
        size = sizes[i % len(sizes)]
        if size > target:
            continue
        while live and live_bytes + size > target:
            j = rng.randrange(len(live))
            live[j], live[-1] = live[-1], live[j]
            block = live.pop()
            live_bytes -= block.size()
            block.release()
        try:
            block = pool.allocate(size)
        except PoolExhausted:
            failures += 1
            continue
        live.append(block)
        live_bytes += size
        if i % every == every - 1:
            stats = pool.stats()
            internal.append(stats.internal_fragmentation)
            external.append(stats.external_fragmentation)
    end = pool.stats()
    pool.defragment()
    after = pool.stats()
    return {
        "per_octave": per_octave,
        "operations": operations,
        "failed_allocations": failures,
        "internal_median": statistics.median(internal),
        "internal_end": end.internal_fragmentation,
        "external_median": statistics.median(external),
        "external_end": end.external_fragmentation,
        "external_after_defragment": after.external_fragmentation,
        "occupancy_end": end.allocation_efficiency,
        "metadata_ratio": end.metadata_ratio,
        "handles_ratio": end.live_blocks * handle_bytes / end.capacity,
        "live_blocks_end": end.live_blocks,
        "mean_allocation_ns": end.mean_allocation_ns,
    }


def run(sizes: list[int], *, capacity: int, occupancy: float, operations: int) -> list[dict[str, float]]:
    """Every contender on the same size sequence."""
    return [
        churn(sizes, capacity=capacity, occupancy=occupancy, operations=operations, per_octave=k)
        for k in CLASSES
    ]


def markdown(rows: list[dict[str, float]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| classes/octave | internal frag (median / end) | external frag (median / end / after defragment) "
        "| failed allocs | metadata / capacity | block handles / capacity |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"{int(r['per_octave'])}" + (" (power of two)" if r["per_octave"] == 1 else "")
        lines.append(
            f"| {name} | {r['internal_median']:.2%} / {r['internal_end']:.2%} "
            f"| {r['external_median']:.2%} / {r['external_end']:.2%} / {r['external_after_defragment']:.2%} "
            f"| {int(r['failed_allocations'])} | {r['metadata_ratio']:.3%} | {r['handles_ratio']:.3%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces", type=Path, default=REPO_ROOT.parent / "shared" / "traces")
    parser.add_argument("--quick", action="store_true", help="fewer operations")
    parser.add_argument(
        "--operations", type=int, help="allocations in the churn (default 300000, quick 30000)"
    )
    parser.add_argument("--capacity-mb", type=int, default=64)
    parser.add_argument("--occupancy", type=float, default=0.7, help="target live bytes / capacity")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    trace = args.traces / TRACE_NAME
    if not trace.is_file():
        print(
            f"trace {trace} is absent: pass --traces DIR (the directory holding {TRACE_NAME})",
            file=sys.stderr,
        )
        return 2
    operations = args.operations or (30_000 if args.quick else 300_000)
    sizes = load_sizes(args.traces)
    rows = run(sizes, capacity=args.capacity_mb << 20, occupancy=args.occupancy, operations=operations)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            f"{TRACE_NAME}: {len(sizes)} sizes (median {statistics.median(sizes):.0f} B), "
            f"{operations} allocations, pool {args.capacity_mb} MiB, live target {args.occupancy:.0%}"
        )
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
