"""Overhead of the profiler (with leak detection) and GC optimizer on a request-handling workload.

One process, three contenders interleaved round after round, each for a fixed phase:

* ``off``: the bare workload;
* ``kotoba``: a MemoryOptimizer with profiling, leak detection and the adaptive GC optimizer on,
  plus the per-request hooks the web middleware calls (``on_request_start/end``, ``record_request``);
  its tracing duty cycle equals the production default (0.5 s per 60 s = 0.83%), scaled to the phase;
* ``tracemalloc``: tracemalloc on for the whole phase (6 frames), the naive always-on approach.

Throughput is requests per second of phase; we report the median over rounds of each contender's
ratio to the ``off`` phase of the same round.

    .venv/bin/python benchmarks/profiler_overhead.py           # 3 rounds x 30 s phases (~5 min)
    .venv/bin/python benchmarks/profiler_overhead.py --quick   # 2 rounds x 6 s phases
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))

from kotoba_memory.config import MemoryConfig
from kotoba_memory.optimizer import MemoryOptimizer

PRODUCTION_DUTY = 0.5 / 60.0

_SESSIONS: dict[int, dict[str, Any]] = {}


def handle(request_id: int) -> bytes:
    """A typical small JSON endpoint: session lookup, a query-ish loop, rendering."""
    session = _SESSIONS.get(request_id % 500)
    if session is None:
        session = _SESSIONS[request_id % 500] = {"user": request_id % 500, "roles": ["reader", "writer"]}
    rows = [{"id": n, "title": f"item {n}", "score": (n * 37) % 101} for n in range(30)]
    rows.sort(key=lambda r: r["score"], reverse=True)
    body = {"user": session["user"], "items": rows[:10], "count": len(rows)}
    return json.dumps(body).encode()


def flask_handler() -> Any:
    """The same view behind Flask routing, request/response objects and JSON encoding."""
    import flask

    app = flask.Flask("overhead")

    @app.get("/items/<int:request_id>")
    def items(request_id: int) -> Any:
        session = _SESSIONS.get(request_id % 500)
        if session is None:
            session = _SESSIONS[request_id % 500] = {"user": request_id % 500, "roles": ["reader"]}
        rows = [{"id": n, "title": f"item {n}", "score": (n * 37) % 101} for n in range(30)]
        rows.sort(key=lambda r: r["score"], reverse=True)
        return flask.jsonify(user=session["user"], items=rows[:10], count=len(rows))

    client = app.test_client()

    def call(request_id: int) -> bytes:
        return client.get(f"/items/{request_id}").data

    return call


HANDLER = handle


def run_phase(seconds: float, optimizer: MemoryOptimizer | None) -> int:
    """Serve requests for ``seconds``; returns how many were served."""
    gc_opt = optimizer.gc_optimizer if optimizer is not None else None
    profiler = optimizer.profiler if optimizer is not None else None
    served = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            if gc_opt is not None:
                gc_opt.on_request_start()
            started = time.perf_counter()
            HANDLER(served)
            if gc_opt is not None:
                gc_opt.on_request_end()
            if profiler is not None:
                profiler.record_request("/items", 0, None, time.perf_counter() - started)
            served += 1
    return served


def kotoba_config(phase: float) -> MemoryConfig:
    window = max(0.05, PRODUCTION_DUTY * phase)
    return MemoryConfig(
        enable_caching=False,
        enable_pooling=False,
        enable_gc_optimization=True,
        enable_profiling=True,
        enable_leak_detection=True,
        monitoring_interval_ms=1000,
        leak_window_s=window,
        leak_window_interval_s=phase,
        leak_trace_budget=None,  # the production duty cycle squeezed into a phase, not spaced out
    )


def measure(rounds: int, phase: float) -> dict[str, Any]:
    config = kotoba_config(phase)
    ratios: dict[str, list[float]] = {"kotoba": [], "tracemalloc": []}
    rates: dict[str, list[float]] = {"off": [], "kotoba": [], "tracemalloc": []}
    order = ["off", "kotoba", "tracemalloc"]
    for r in range(rounds):
        # rotate the order so no contender always runs right after another
        this_round = order[r % 3 :] + order[: r % 3]
        got: dict[str, float] = {}
        for name in this_round:
            if name == "off":
                got[name] = run_phase(phase, None) / phase
            elif name == "kotoba":
                optimizer = MemoryOptimizer(config)
                optimizer.start()
                assert optimizer.profiler is not None
                # one tracing window in the middle of the phase: the production duty cycle
                optimizer.profiler.stop()
                optimizer.profiler.first_window_after_s = phase / 2
                optimizer.profiler.start()
                try:
                    got[name] = run_phase(phase, optimizer) / phase
                    windows = optimizer.profiler.stats().windows
                finally:
                    optimizer.stop()
                if windows < 1:
                    print("  warning: no tracing window happened in the kotoba phase", file=sys.stderr)
            else:
                tracemalloc.start(6)
                try:
                    got[name] = run_phase(phase, None) / phase
                finally:
                    tracemalloc.stop()
        for name, value in got.items():
            rates[name].append(value)
        ratios["kotoba"].append(got["kotoba"] / got["off"])
        ratios["tracemalloc"].append(got["tracemalloc"] / got["off"])
        print(
            f"  round {r + 1}: off {got['off']:.0f} req/s, kotoba {got['kotoba']:.0f} "
            f"({got['kotoba'] / got['off']:.3f}x), tracemalloc {got['tracemalloc']:.0f} "
            f"({got['tracemalloc'] / got['off']:.3f}x)",
            flush=True,
        )
    return {
        "rounds": rounds,
        "phase_s": phase,
        "kotoba_window_s": config.leak_window_s,
        "kotoba_duty": config.leak_window_s / phase,
        "median_req_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "median_ratio": {k: statistics.median(v) for k, v in ratios.items()},
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workload", choices=("flask", "bare"), default="flask",
        help="flask: a JSON view through Flask's test client (default); bare: the view function alone",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 6 s phases")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--phase", type=float, default=None, help="seconds per contender per round")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    global HANDLER
    HANDLER = flask_handler() if args.workload == "flask" else handle
    rounds = args.rounds or (2 if args.quick else 3)
    phase = args.phase or (6.0 if args.quick else 30.0)
    print(f"{args.workload} workload, {rounds} rounds x {phase:.0f} s phases (off / kotoba / tracemalloc)")
    result = measure(rounds, phase)
    overhead = 1.0 - result["median_ratio"]["kotoba"]
    print(
        f"kotoba (profiler + leak detection at {result['kotoba_duty']:.2%} duty + GC optimizer): "
        f"median throughput ratio {result['median_ratio']['kotoba']:.3f} -> overhead {overhead:.1%}"
    )
    print(
        f"always-on tracemalloc: median throughput ratio {result['median_ratio']['tracemalloc']:.3f} "
        f"(slowdown {1 / result['median_ratio']['tracemalloc']:.2f}x)"
    )
    if args.json:
        result["workload"] = args.workload
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
