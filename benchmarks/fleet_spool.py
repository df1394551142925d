"""What the fleet report costs: a worker's periodic snapshot write, and reading the spool for a report.

In one process with the optimizer running (profiling, GC optimizer, cache): the time of one
``FleetPublisher.publish()`` (build the report, make the snapshot, write it atomically), which every
worker does every 5 s, also with the leak detector at its caps; the time of ``FleetSpool.read()`` +
``fleet_view()`` for spools of 3, 32 and 256 live processes (rows written for pids of processes
running on this machine, so the liveness checks are real); and ``runtime.current_report()`` with the
workers against without, interleaved (median of the per-round ratios).

    .venv/bin/python benchmarks/fleet_spool.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from kotoba_memory import fleet
from kotoba_memory.config import MemoryConfig
from kotoba_memory.memory_profiler import profiler as profiler_module
from kotoba_memory_integrations import runtime


def timed(fn: object, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn``."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def fill(directory: Path, count: int, template: dict[str, object]) -> int:
    """Rows for ``count`` live processes of this machine (fewer if it runs fewer); returns how many."""
    written = 0
    for proc in psutil.process_iter(["pid", "create_time"]):
        if written == count:
            break
        row = dict(template, pid=proc.info["pid"], created_at=proc.info["create_time"], ppid=1)
        (directory / f"{proc.info['pid']}.json").write_text(json.dumps(row))
        written += 1
    return written


def at_caps(optimizer: object, publisher: fleet.FleetPublisher, rounds: int) -> tuple[float, float]:
    """publish() with the leak detector at its caps (256 tracked sites over 8 windows, two of them
    growing, the rest churning; an hour of samples): median ms with the verdict reused between windows,
    and judged afresh every time, the two interleaved round by round."""
    profiler = optimizer.profiler  # type: ignore[attr-defined]
    detector = profiler._detector
    rng = random.Random(7)
    sizes = {((f"/srv/app/m{i}.py", i), ("/srv/app/views.py", 10)): 0 for i in range(300)}
    t = time.time() - 3600.0
    for _ in range(8):
        shots = []
        for j in range(6):
            for n, key in enumerate(sizes):
                sizes[key] = sizes[key] + 1000 if n < 2 else max(0, sizes[key] + rng.randint(-900, 1000))
            shots.append((t + j * 0.1, {key: (size, size // 100) for key, size in sizes.items()}))
        detector.add_window(shots, {"/a": 10, "/b": 5})
        t += 400.0
    for _ in range(3600):
        profiler._sample()
    reused, judged = [], []
    for _ in range(rounds):
        publisher.publish()  # the verdict judged once, then reused
        reused.append(timed(publisher.publish, 10))
        saved, profiler_module.VERDICT_REUSE_S = profiler_module.VERDICT_REUSE_S, 0.0
        try:
            judged.append(timed(publisher.publish, 10))
        finally:
            profiler_module.VERDICT_REUSE_S = saved
    return statistics.median(reused), statistics.median(judged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kotoba-fleet-bench-") as tmp:
        os.environ["KOTOBA_MEMORY_FLEET_DIR"] = str(Path(tmp) / "fleet")  # every spool of the run in tmp
        runtime.stop_optimizer()
        optimizer = runtime.start_optimizer(MemoryConfig(enable_caching=True, monitoring_interval_ms=100))
        try:
            cache = optimizer.cache
            assert cache is not None
            for i in range(2000):
                cache.put(f"k{i}", b"x" * 200)
                cache.get(f"k{i % 500}")
            time.sleep(1.0)  # a few profiler samples, as in a running worker
            spool = fleet.FleetSpool(Path(tmp) / "own")
            publisher = fleet.FleetPublisher(spool)
            publish_ms = timed(publisher.publish, 200)
            print(f"publish() (report + snapshot + atomic write): {publish_ms:.3f} ms median")
            snapshot = fleet.snapshot_from_report(optimizer.report())
            reused_ms, judged_ms = at_caps(optimizer, publisher, args.rounds)
            print(f"publish() with the leak detector at its caps: {reused_ms:.3f} ms median with the verdict "
                  f"reused between windows, {judged_ms:.3f} ms judged afresh (every 120 s at most)")
            print(f"write() alone: {timed(lambda: spool.write(snapshot), 200):.3f} ms median")
            for count in (3, 32, 256):
                directory = Path(tmp) / f"n{count}"
                directory.mkdir(mode=0o700)
                got = fill(directory, count, snapshot)
                many = fleet.FleetSpool(directory)
                cost = timed(lambda s=many: fleet.fleet_view(s.read(), viewer_pid=None), max(20, args.rounds))
                print(f"read() + fleet_view() of {got} live rows: {cost:.3f} ms median")
            runtime.configure_fleet(str(Path(tmp) / "app"))
            runtime.serving()
            three = runtime.fleet_spool()
            assert three is not None
            three.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fill(three.directory, 3, snapshot)
            ratios, with_ms, without_ms = [], [], []
            for r in range(args.rounds):
                pair = [True, False] if r % 2 else [False, True]
                got_ms = {}
                for workers in pair:
                    got_ms[workers] = timed(lambda w=workers: runtime.current_report(workers=w), 10)
                with_ms.append(got_ms[True])
                without_ms.append(got_ms[False])
                ratios.append(got_ms[True] / got_ms[False])
            print(
                f"current_report(): {statistics.median(without_ms):.3f} ms alone, "
                f"{statistics.median(with_ms):.3f} ms with 4 rows; "
                f"median ratio {statistics.median(ratios):.2f}x over {args.rounds} rounds"
            )
        finally:
            runtime.stop_optimizer()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
