"""Process RSS after a heap-fragmenting Python workload, under each malloc setting, side by side.

    .venv/bin/python benchmarks/allocator_rss.py            # full run (~2 min)
    .venv/bin/python benchmarks/allocator_rss.py --quick    # ~20 s

Each run is a fresh child started through ``kotoba-memory run`` (``python -m
kotoba_memory.allocators.launcher``) executing ``benchmarks/_fragment_workload.py``: build mixed-size objects,
free 90 % at random, allocate a new batch. Settings: glibc, glibc with ``MALLOC_ARENA_MAX=2``, glibc +
``malloc_trim(0)`` at the end, jemalloc and mimalloc. Shapes: one thread; N threads at once; N threads
taking turns (a thread pool whose bursts land on different threads). Rounds run every setting in a
shuffled order; medians are reported with ratios against plain glibc. Time is the child's CPU time (all
threads), which a shared machine's scheduling noise does not inflate the way it does wall-clock time.
The child reports the allocator it really ran on; a run that does not match its setting is an error.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kotoba_memory.allocators import AllocatorNotFoundError, find_allocator_library

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "_fragment_workload.py"


@dataclass(frozen=True)
class Setting:
    """One malloc configuration: launcher flags plus workload flags."""

    name: str
    allocator: str
    launcher_args: tuple[str, ...] = ()
    workload_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shape:
    """How the workload uses threads."""

    threads: int
    staggered: bool = False

    @property
    def label(self) -> str:
        if self.threads == 1:
            return "1 thread"
        return f"{self.threads} threads, " + ("taking turns" if self.staggered else "at once")


SETTINGS = [
    Setting("glibc", "system"),
    Setting("glibc MALLOC_ARENA_MAX=2", "system", ("--arena-max", "2")),
    Setting("glibc + malloc_trim(0)", "system", (), ("--trim",)),
    Setting("glibc MALLOC_ARENA_MAX=2 + malloc_trim(0)", "system", ("--arena-max", "2"), ("--trim",)),
    Setting("jemalloc", "jemalloc"),
    Setting("mimalloc", "mimalloc"),
]


def available(settings: list[Setting]) -> tuple[list[Setting], list[str]]:
    """The settings whose allocator is installed, and a note for each one that is not."""
    ok, notes = [], []
    for setting in settings:
        if setting.allocator in ("jemalloc", "mimalloc"):
            try:
                find_allocator_library(setting.allocator)
            except AllocatorNotFoundError as exc:
                notes.append(f"{setting.name} skipped: {exc}")
                continue
        ok.append(setting)
    return ok, notes


def run_once(setting: Setting, shape: Shape, objects: int, seed: int) -> dict[str, float]:
    """One child process; returns its JSON report."""
    cmd = [
        sys.executable, "-m", "kotoba_memory.allocators.launcher", "--allocator", setting.allocator,
        *setting.launcher_args, "--",
        sys.executable, str(WORKLOAD), "--threads", str(shape.threads), "--objects", str(objects),
        "--seed", str(seed), *setting.workload_args, *(["--staggered"] if shape.staggered else []),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting.name}: child failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if report["allocator"] != setting.allocator:
        raise RuntimeError(f"{setting.name}: child ran on {report['allocator']}, not {setting.allocator}")
    return report


def run(
    settings: list[Setting], shapes: list[Shape], objects: int, rounds: int, seed: int = 1
) -> list[dict[str, float | str]]:
    """Medians per (setting, shape), with RSS and CPU-time ratios against plain glibc."""
    rng = random.Random(seed)
    reports: dict[tuple[str, Shape], list[dict[str, float]]] = {}
    for r in range(rounds):
        order = [(s, sh) for s in settings for sh in shapes]
        rng.shuffle(order)
        for setting, shape in order:
            reports.setdefault((setting.name, shape), []).append(run_once(setting, shape, objects, seed + r))
    rows: list[dict[str, float | str]] = []
    for shape in shapes:
        base = reports.get(("glibc", shape))
        base_rss = statistics.median(x["rss_end"] for x in base) if base else None
        base_time = statistics.median(x["cpu_s"] for x in base) if base else None
        for setting in settings:
            runs = reports[(setting.name, shape)]
            rss = statistics.median(x["rss_end"] for x in runs)
            runtime = statistics.median(x["cpu_s"] for x in runs)
            rows.append(
                {
                    "setting": setting.name,
                    "shape": shape.label,
                    "rss_end_mib": rss / 2**20,
                    "rss_peak_mib": statistics.median(x["rss_peak"] for x in runs) / 2**20,
                    "rss_vs_glibc": rss / base_rss if base_rss else float("nan"),
                    "cpu_s": runtime,
                    "cpu_vs_glibc": runtime / base_time if base_time else float("nan"),
                    "runs": len(runs),
                }
            )
    return rows


def markdown(rows: list[dict[str, float | str]]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| workload | setting | RSS at end (MiB) | vs glibc | RSS at peak (MiB) | CPU time (s) | vs glibc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['setting']} | {r['rss_end_mib']:.0f} | {r['rss_vs_glibc']:.2f}x "
            f"| {r['rss_peak_mib']:.0f} | {r['cpu_s']:.2f} | {r['cpu_vs_glibc']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller workload, one round")
    parser.add_argument("--objects", type=int, help="objects per run (default 60000, quick 15000)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument(
        "--threads", type=int, default=4, help="threads of the multi-threaded shapes (default 4)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    objects = args.objects or (15_000 if args.quick else 60_000)
    rounds = args.rounds or (1 if args.quick else 3)
    settings, notes = available(SETTINGS)
    for note in notes:
        print(note, file=sys.stderr)
    shapes = [Shape(1), Shape(args.threads), Shape(args.threads, staggered=True)]
    rows = run(settings, shapes, objects, rounds)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{objects} objects per run, {rounds} round(s), medians; ratios against plain glibc")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
