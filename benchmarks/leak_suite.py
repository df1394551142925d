"""Leak-detection accuracy: precision and recall of the profiler's leak verdicts and allocation sites.

Every workload in benchmarks/leak_workloads/ runs in a fresh subprocess with a MemoryProfiler started,
for a fixed time; then the verdict (any suspect at all?) and the reported sites are compared with the
ground truth the workload declares (``LEAKS`` and its ``# LEAK-SITE`` lines).

    .venv/bin/python benchmarks/leak_suite.py            # all workloads, 15 s each
    .venv/bin/python benchmarks/leak_suite.py --quick    # 8 s each
    .venv/bin/python benchmarks/leak_suite.py --workloads-dir DIR  # your own cases (same protocol)

The profiler runs with a diagnosis duty cycle (0.75 s windows every 1 s) so a run fits in seconds;
production defaults (0.5 s per minute) see the same traced time in about 90x the wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(__file__).resolve().parent / "leak_workloads"
MARKER = "# LEAK-SITE"

SUITE_PROFILER = {
    "sample_interval_s": 0.25,
    "window_s": 0.75,
    "window_interval_s": 1.0,
    "first_window_after_s": 1.0,
}


@dataclass
class Outcome:
    """One workload's ground truth and what the profiler said."""

    name: str
    leaks: bool
    description: str
    verdict: bool = False
    suspects: list[dict[str, Any]] = field(default_factory=list)
    marked_sites: list[str] = field(default_factory=list)
    windows: int = 0
    analysis_ms: float = 0.0
    max_window_ms: float = 0.0
    own_memory_bytes: int = 0
    error: str | None = None

    @property
    def top_site_correct(self) -> bool:
        return bool(self.suspects) and self.suspects[0]["allocation_site"] in self.marked_sites


def marked_sites(path: Path) -> list[str]:
    """``file:line`` of every line carrying the ``# LEAK-SITE`` marker."""
    resolved = path.resolve()
    return [
        f"{resolved}:{number}"
        for number, text in enumerate(resolved.read_text().splitlines(), 1)
        if MARKER in text
    ]


def discover(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.py") if not p.name.startswith("_"))


# ---------------------------------------------------------------------- child side
def child(path: Path, duration: float) -> dict[str, Any]:
    """Run one workload under the profiler for ``duration`` seconds and return the analysis."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "core"))
    from kotoba_memory.memory_profiler import MemoryProfiler

    spec = importlib.util.spec_from_file_location(f"leak_workload_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    profiler = MemoryProfiler(**SUITE_PROFILER)  # type: ignore[arg-type]
    profiler.start()
    spec.loader.exec_module(module)  # import-time work happens while profiling, as in a real app
    stop = threading.Event()
    timer = threading.Timer(duration, stop.set)
    timer.start()
    try:
        module.run(stop)
    finally:
        timer.cancel()
    started = time.perf_counter()
    analysis = profiler.analyze()
    elapsed = (time.perf_counter() - started) * 1000
    profiler.stop()
    return {
        "suspects": [leak.to_dict() for leak in analysis.memory_leaks],
        "windows": analysis.stats.windows,
        "analysis_ms": elapsed,
        "max_window_ms": analysis.stats.max_window_analysis_ms,
        "own_memory_bytes": analysis.stats.own_memory_bytes,
        "skipped_windows": analysis.stats.skipped_windows,
    }


# ---------------------------------------------------------------------- parent side
def run_one(path: Path, duration: float) -> Outcome:
    truth = _declared(path)
    outcome = Outcome(path.stem, truth["leaks"], truth["description"], marked_sites=marked_sites(path))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--duration", str(duration)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, cwd=REPO)
    except subprocess.TimeoutExpired:
        outcome.error = "timed out"
        return outcome
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        outcome.error = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return outcome
    data = json.loads(lines[-1])
    outcome.suspects = data["suspects"]
    outcome.verdict = bool(outcome.suspects)
    outcome.windows = data["windows"]
    outcome.analysis_ms = data["analysis_ms"]
    outcome.max_window_ms = data["max_window_ms"]
    outcome.own_memory_bytes = data["own_memory_bytes"]
    return outcome


def _declared(path: Path) -> dict[str, Any]:
    """Read LEAKS / DESCRIPTION without importing the workload (it may need the child's setup)."""
    leaks, description = None, ""
    for text in path.read_text().splitlines():
        if text.startswith("LEAKS ="):
            leaks = text.split("=", 1)[1].strip() == "True"
        elif text.startswith("DESCRIPTION ="):
            description = text.split("=", 1)[1].strip().strip("\"'")
    if leaks is None:
        raise SystemExit(f"{path}: no LEAKS = True/False line")
    return {"leaks": leaks, "description": description}


def score(outcomes: list[Outcome]) -> dict[str, Any]:
    """Precision/recall of verdicts and of sites."""
    ran = [o for o in outcomes if o.error is None]
    tp = sum(1 for o in ran if o.leaks and o.verdict)
    fp = sum(1 for o in ran if not o.leaks and o.verdict)
    fn = sum(1 for o in ran if o.leaks and not o.verdict)
    leaking = [o for o in ran if o.leaks]
    all_suspects = [(o, s) for o in ran for s in o.suspects]
    right_sites = sum(1 for o, s in all_suspects if s["allocation_site"] in o.marked_sites)
    return {
        "workloads": len(outcomes),
        "errors": len(outcomes) - len(ran),
        "verdict_precision": tp / (tp + fp) if tp + fp else 1.0,
        "verdict_recall": tp / (tp + fn) if tp + fn else 1.0,
        "site_precision": right_sites / len(all_suspects) if all_suspects else 1.0,
        "site_recall": sum(1 for o in leaking if o.top_site_correct) / len(leaking) if leaking else 1.0,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "median_analysis_ms": statistics.median(o.analysis_ms for o in ran) if ran else 0.0,
        "max_window_ms": max((o.max_window_ms for o in ran), default=0.0),
        "median_max_window_ms": statistics.median(o.max_window_ms for o in ran) if ran else 0.0,
        "max_own_memory_bytes": max((o.own_memory_bytes for o in ran), default=0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8 s per workload instead of 15")
    parser.add_argument("--duration", type=float, default=None, help="seconds per workload")
    parser.add_argument("--workloads-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--only", nargs="*", help="run only these workload names")
    parser.add_argument("--json", type=Path, help="write per-workload results and scores here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    duration = args.duration or (8.0 if args.quick else 15.0)
    if args.child is not None:
        print(json.dumps(child(args.child, duration)))
        return 0
    paths = discover(args.workloads_dir)
    if args.only:
        paths = [p for p in paths if p.stem in set(args.only)]
    if not paths:
        print(f"no workloads in {args.workloads_dir}", file=sys.stderr)
        return 1
    print(f"{len(paths)} workloads, {duration:.0f} s each, profiler {SUITE_PROFILER}")
    outcomes: list[Outcome] = []
    for path in paths:
        outcome = run_one(path, duration)
        outcomes.append(outcome)
        top = outcome.suspects[0] if outcome.suspects else None
        where = f"{Path(top['allocation_site']).name} conf {top['confidence']:.2f}" if top else "-"
        mark = "ok " if outcome.verdict == outcome.leaks else "BAD"
        site = "" if not outcome.leaks or not outcome.verdict else (
            " site ok" if outcome.top_site_correct else " SITE WRONG"
        )
        status = (
            f"error: {outcome.error}" if outcome.error else f"{len(outcome.suspects)} suspects, top {where}"
        )
        print(f"  {mark} {outcome.name:<24} leaks={outcome.leaks!s:<5} {status}{site}", flush=True)
    scores = score(outcomes)
    print(
        f"verdicts: precision {scores['verdict_precision']:.0%}, recall {scores['verdict_recall']:.0%} "
        f"(tp {scores['true_positives']}, fp {scores['false_positives']}, fn {scores['false_negatives']})"
    )
    print(f"sites: precision {scores['site_precision']:.0%}, top-site recall {scores['site_recall']:.0%}")
    print(
        f"analysis: median {scores['median_analysis_ms']:.1f} ms per analyze(); slowest snapshot read-back "
        f"per run: median {scores['median_max_window_ms']:.1f} ms, worst {scores['max_window_ms']:.1f} ms; "
        f"profiler memory <= {scores['max_own_memory_bytes'] / 1024:.0f} KiB"
    )
    if args.json:
        results = {"scores": scores, "outcomes": [asdict(o) for o in outcomes]}
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
