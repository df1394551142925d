"""GC benchmark: request loops of several shapes under default GC, gc.freeze, raised thresholds, a
fixed "collect between requests" recipe and kotoba-memory's adaptive GcOptimizer (with its defaults,
and with the memory-for-speed knob ``heap_growth_ceiling=0.5`` as ``adaptive_lax``).

Shapes: ``orm`` (ORM-like rows, acyclic), ``orm_cyclic`` (the same with a session identity map, so
cyclic garbage), ``micro`` (a ~20 us endpoint), ``long_cyclic`` / ``long_blob`` (ordinary requests, then
one request making cyclic garbage for seconds; ``long_blob`` rows also carry 1 KiB of text),
``idle_bursts`` (bursts of cyclic requests between idle gaps) and ``growing`` (a cache filling).

Every (workload, variant) runs in its own fresh subprocess (GC state is process-global); variants are
interleaved in a rotating order and repeated, and medians are reported with ratios to the default.

    .venv/bin/python benchmarks/gc_workload.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/gc_workload.py --quick    # small smoke run

This benchmark generates its own workload; it reads no traces (``--traces`` is accepted and ignored).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

VARIANTS = ("default", "freeze", "raised", "between", "adaptive", "adaptive_lax")
# adaptive_lax: the memory-for-speed knob, heap_growth_ceiling=0.5 (the budget before this release).
LAX_BUDGET = 0.5
WORKLOADS = ("orm", "orm_cyclic", "micro", "long_cyclic", "long_blob", "idle_bursts", "growing")
RAISED_THRESHOLDS = (50_000, 20, 20)


@dataclass(frozen=True)
class Size:
    heap_objects: int  # long-lived containers built at start-up (the app's heap)
    requests: int  # timed ORM requests
    micro_requests: int
    rows: int  # rows per ORM request
    long_iterations: int  # chunks of work in the long cyclic request
    warmup: int = 30
    bursts: int = 4  # idle_bursts: bursts of requests ...
    idle_s: float = 0.6  # ... separated by this much idle time


FULL = Size(heap_objects=800_000, requests=600, micro_requests=60_000, rows=600, long_iterations=300)
QUICK = Size(
    heap_objects=60_000, requests=120, micro_requests=8_000, rows=120, long_iterations=40, warmup=15,
    bursts=2, idle_s=0.05,
)


# --------------------------------------------------------------------------------------------------
# The workload (runs in the child)
# --------------------------------------------------------------------------------------------------
class Session:
    """A request-scoped unit of work, like an ORM session with its identity map."""

    def __init__(self) -> None:
        self.identity_map: dict[int, Model] = {}


class InstanceState:
    """Per-instance bookkeeping, like SQLAlchemy's InstanceState: committed values and change tracking."""

    def __init__(self, obj: Model, row: tuple[Any, ...]) -> None:
        self.obj = weakref.ref(obj)  # weak, as in SQLAlchemy, so rows are not cyclic by themselves
        self.committed = {"pk": row[0], "name": row[1], "email": row[2]}
        self.modified: set[str] = set()
        self.callables: dict[str, Any] = {}


class Model:
    """An ORM row: scalar fields, a dict of extra columns, a list relation and its state object."""

    def __init__(self, row: tuple[Any, ...], session: Session | None) -> None:
        self.pk, self.name, self.email = row[0], row[1], row[2]
        self.extra = {"score": row[0] % 97, "flags": row[0] & 7, "region": "eu"}
        self.tags = [row[0] % 5, row[0] % 7, row[0] % 11]
        self.state = InstanceState(self, row)
        self.session = session
        if session is not None:
            session.identity_map[row[0]] = self


def build_heap(n: int) -> list[Any]:
    """The app's long-lived heap: n containers (half dicts, half lists)."""
    return [{"id": i, "tags": [i, i + 1]} for i in range(n // 2)]


def orm_request(
    rid: int, rows: int, cache: list[dict[str, Any]], cyclic: bool, keep_every: int = 50, blob: int = 0
) -> int:
    """Query rows, serialize them, render a body; keep a few serialized rows in a growing cache."""
    session = Session() if cyclic else None
    base = rid * rows
    result = [(pk, f"user-{pk}", f"user{pk}@example.com") for pk in range(base, base + rows)]
    objects = [Model(row, session) for row in result]
    if blob:
        for m in objects:
            m.extra["body"] = f"{m.pk:08d}" * (blob // 8)  # a text column: bytes the GC count cannot see
    payload = [
        {"id": m.pk, "name": m.name, "email": m.email, "extra": dict(m.extra), "tags": list(m.tags)}
        for m in objects
    ]
    for i in range(0, rows, keep_every):
        cache.append(payload[i])
    body = "".join(f"{p['id']}:{p['name']};" for p in payload)
    return len(body)


class MicroApp:
    """A microsecond endpoint: route lookup, a small response, a bounded session cache that churns."""

    def __init__(self) -> None:
        self.routes = {"/api/ping": "ping", "/api/user": "user", "/api/items": "items"}
        self.sessions: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def request(self, rid: int) -> int:
        path = ("/api/ping", "/api/user", "/api/items")[rid % 3]
        view = self.routes[path]
        items = [{"id": rid + i, "name": f"item-{i}", "tags": [i, i % 3]} for i in range(20)]
        response = {
            "status": 200, "view": view, "headers": [("content-type", "application/json")], "items": items,
        }
        self.sessions[rid] = {"user": rid % 1000, "seen": rid}
        if len(self.sessions) > 2000:
            self.sessions.popitem(last=False)
        return len(json.dumps(response))


# --------------------------------------------------------------------------------------------------
# Child process: one (workload, variant) run
# --------------------------------------------------------------------------------------------------
class PauseRecorder:
    """Pause per generation via gc.callbacks, stored in arrays so recording allocates no containers."""

    def __init__(self) -> None:
        self.pauses = [array("d"), array("d"), array("d")]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0:
            self.pauses[info["generation"]].append(time.perf_counter() - self._t0)
            self._t0 = 0.0

    def reset(self) -> None:
        self.pauses = [array("d"), array("d"), array("d")]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(q / 100.0 * len(values) + 0.5) - 1))
    return values[k]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(workload: str, variant: str, size: Size) -> dict[str, Any]:
    """Run one workload under one GC variant in this (fresh) process; return its measurements."""
    # Every variant imports the optimizer so peak RSS compares GC behaviour, not import footprint.
    from kotoba_memory.gc_optimizer import GcOptimizer

    heap = build_heap(size.heap_objects)
    cache: list[dict[str, Any]] = []
    micro = MicroApp()
    recorder = PauseRecorder()
    gc.callbacks.append(recorder)

    optimizer = None
    if variant == "freeze":
        gc.freeze()
    elif variant == "raised":
        gc.set_threshold(*RAISED_THRESHOLDS)
    elif variant == "between":
        gc.disable()
    elif variant == "adaptive":
        optimizer = GcOptimizer(adaptive=True)
        optimizer.start()
    elif variant == "adaptive_lax":
        optimizer = GcOptimizer(adaptive=True, heap_growth_ceiling=LAX_BUDGET)
        optimizer.start()

    counter = [0]

    def start() -> None:
        if optimizer is not None:
            optimizer.on_request_start()

    def end() -> None:
        counter[0] += 1
        if optimizer is not None:
            optimizer.on_request_end()
        elif variant == "between":
            gc.collect(1 if counter[0] % 10 == 0 else 0)

    body: Callable[[int], object]
    if workload in ("orm", "orm_cyclic"):
        cyclic = workload == "orm_cyclic"

        def body(rid: int) -> object:
            return orm_request(rid, size.rows, cache, cyclic)

        n = size.requests
    elif workload == "micro":
        body = micro.request
        n = size.micro_requests
    elif workload == "idle_bursts":
        per_burst = max(1, size.requests // (2 * size.bursts))

        def body(rid: int) -> object:
            # A mostly idle service: a burst of cyclic ORM requests, then idle time (no CPU used).
            if rid % per_burst == 0 and rid > size.warmup:
                time.sleep(size.idle_s)
            return orm_request(rid, size.rows, cache, True)

        n = per_burst * size.bursts
    elif workload == "growing":

        def body(rid: int) -> object:
            # A cache filling: every 5th serialized row is kept, so the live set grows all run long.
            return orm_request(rid, size.rows, cache, False, keep_every=5)

        n = size.requests
    elif workload in ("long_cyclic", "long_blob"):
        kept: list[int] = []
        blob = 1024 if workload == "long_blob" else 0

        def body(rid: int) -> object:
            # One request that never returns to the server loop while it makes cyclic garbage
            # (long_blob: each row also carries a 1 KiB text column the collector's counts do not see).
            for i in range(size.long_iterations):
                kept.append(orm_request(rid * 10_000 + i, size.rows, cache, True, blob=blob))
            return len(kept)

        n = 1
    else:
        raise ValueError(f"unknown workload {workload!r}")

    for rid in range(size.warmup):
        start()
        if workload in ("long_cyclic", "long_blob"):
            # Ordinary requests first, so the optimizer has tuned for them when the long one comes.
            orm_request(rid, size.rows, cache, False)
        else:
            body(rid)
        end()
    recorder.reset()
    rss_start = _rss_bytes()
    durations = array("d")
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for rid in range(size.warmup, size.warmup + n):
        r0 = time.perf_counter()
        start()
        body(rid)
        end()
        durations.append(time.perf_counter() - r0)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gc.callbacks.remove(recorder)
    own_kib, mode, long_requests, budget_collections = 0.0, "", 0, 0
    if optimizer is not None:
        analysis = optimizer.analyze()
        # getattr: the same script also measures older releases, whose analysis lacks these fields.
        own_kib = getattr(analysis, "own_memory_bytes", 0) / 1024
        mode = getattr(analysis, "mode", "")
        long_requests = getattr(analysis, "long_requests", 0)
        budget_collections = getattr(analysis, "budget_collections", 0)
        optimizer.stop()
    gc.enable()
    # Garbage still waiting to be reclaimed when the run ends (frozen cycles included).
    gc.unfreeze()
    garbage_left = gc.collect()
    pauses = [list(p) for p in recorder.pauses]
    total_pause = sum(sum(p) for p in pauses)
    all_pauses = [x for p in pauses for x in p]
    dur = list(durations)
    result: dict[str, Any] = {
        "workload": workload,
        "variant": variant,
        "requests": n,
        "elapsed_s": elapsed,
        "req_per_s": n / elapsed,
        "req_per_cpu_s": n / cpu if cpu > 0 else 0.0,
        "gc_share": total_pause / elapsed,
        "gc_cpu_share": min(1.0, total_pause / cpu) if cpu > 0 else 0.0,
        "request_p50_ms": _pct(dur, 50) * 1e3,
        "request_p99_ms": _pct(dur, 99) * 1e3,
        "peak_rss_mb": peak_rss / 2**20,
        "run_rss_growth_mb": (peak_rss - rss_start) / 2**20,
        "garbage_left": garbage_left,
        "pause_p99_ms": _pct(all_pauses, 99) * 1e3,
        "optimizer_own_kib": own_kib,
        "mode": mode,
        "long_requests": long_requests,
        "budget_collections": budget_collections,
        "heap_len": len(heap),
    }
    for g, p in enumerate(pauses):
        result[f"gen{g}_count"] = len(p)
        result[f"gen{g}_p50_ms"] = _pct(p, 50) * 1e3
        result[f"gen{g}_p95_ms"] = _pct(p, 95) * 1e3
        result[f"gen{g}_max_ms"] = max(p, default=0.0) * 1e3
    result["max_pause_ms"] = max(result[f"gen{g}_max_ms"] for g in range(3))
    return result


def measure_hook_cost(pairs: int = 200_000, repeats: int = 7) -> dict[str, Any]:
    """ns per on_request_start()+on_request_end() pair when nothing is due, minus a no-op pair."""
    from kotoba_memory.gc_optimizer import GcOptimizer

    class Noop:
        def on_request_start(self) -> None:
            pass

        def on_request_end(self) -> None:
            pass

    def loop(target: Any) -> float:
        start, end = target.on_request_start, target.on_request_end
        t0 = time.perf_counter()
        for _ in range(pairs):
            start()
            end()
        return (time.perf_counter() - t0) / pairs * 1e9

    optimizer = GcOptimizer(auto_freeze=False)
    optimizer.start()
    noop = Noop()
    ours: list[float] = []
    base: list[float] = []
    for _ in range(repeats):  # interleaved
        base.append(loop(noop))
        ours.append(loop(optimizer))
    optimizer.stop()
    return {
        "hooks_ns": statistics.median(ours),
        "noop_ns": statistics.median(base),
        "overhead_ns": statistics.median(o - b for o, b in zip(ours, base)),
    }


# --------------------------------------------------------------------------------------------------
# Parent: orchestration and reporting
# --------------------------------------------------------------------------------------------------
def spawn(workload: str, variant: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", workload, variant]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{variant} child failed:\n{out.stderr}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_all(
    workloads: list[str], variants: list[str], rounds: int, quick: bool, log: Callable[[str], None]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Run every (workload, variant) ``rounds`` times, interleaved with a rotating variant order."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {v: [] for v in variants} for w in workloads}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for workload in workloads:
            for variant in order:
                res = spawn(workload, variant, quick)
                results[workload][variant].append(res)
                log(f"round {r + 1}/{rounds} {workload:<12} {variant:<9} {res['req_per_s']:9.1f} req/s "
                    f"gc {res['gc_share']:6.1%} max pause {res['max_pause_ms']:7.2f} ms "
                    f"peak {res['peak_rss_mb']:6.1f} MB")
    return results


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def paired_ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> float:
    """Median over rounds of run/default for ``key``; pairing by round cancels slow load drift."""
    ratios = [r[key] / b[key] for r, b in zip(runs, base) if b[key]]
    return statistics.median(ratios) if ratios else float("nan")


def report(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Markdown tables of medians, per-round ratios to the default variant, and the goal checks."""
    lines: list[str] = []
    for workload, by_variant in results.items():
        med = {v: medians(runs) for v, runs in by_variant.items() if runs}
        base_runs = by_variant.get("default") or []
        lines.append(f"### {workload}")
        lines.append("")
        lines.append(
            "| variant | req/s | x default | req/CPU-s | x default | GC share | GC CPU share "
            "| gen0 p50/p95/max ms | gen1 p50/p95/max ms "
            "| gen2 p50/p95/max ms | pause p99 ms | request p99 ms | peak RSS MB | x default | garbage left |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        ratios: dict[str, dict[str, float]] = {}
        for variant, m in med.items():
            runs = by_variant[variant]
            ratios[variant] = {
                key: paired_ratio(runs, base_runs, key) if base_runs else float("nan")
                for key in ("req_per_s", "req_per_cpu_s", "peak_rss_mb", "max_pause_ms")
            }
            r = ratios[variant]
            gens = " | ".join(
                f"{m[f'gen{g}_p50_ms']:.2f} / {m[f'gen{g}_p95_ms']:.2f} / {m[f'gen{g}_max_ms']:.2f}"
                for g in range(3)
            )
            lines.append(
                f"| {variant} | {m['req_per_s']:.1f} | {r['req_per_s']:.2f} "
                f"| {m['req_per_cpu_s']:.1f} | {r['req_per_cpu_s']:.2f} "
                f"| {m['gc_share']:.1%} | {m['gc_cpu_share']:.1%} | {gens} "
                f"| {m.get('pause_p99_ms', 0.0):.2f} | {m['request_p99_ms']:.2f} "
                f"| {m['peak_rss_mb']:.1f} | {r['peak_rss_mb']:.3f} "
                f"| {m['garbage_left']:.0f} |"
            )
        lines.append("")
        if base_runs and "adaptive" in med:
            lines.extend(goal_lines(workload, med["default"], med["adaptive"], ratios["adaptive"]))
            lines.append("")
    return "\n".join(lines)


def goal_lines(
    workload: str, base: dict[str, float], ada: dict[str, float], ratio: dict[str, float]
) -> list[str]:
    """The issue's goals for the adaptive optimizer, judged on per-round ratios to the default."""
    checks: list[tuple[str, bool]] = []
    speed, cpu_speed, rss = ratio["req_per_s"], ratio["req_per_cpu_s"], ratio["peak_rss_mb"]
    if workload in ("orm", "orm_cyclic"):
        checks.append((f"req/s {speed:.2f}x default (goal >= 1.8x)", speed >= 1.8))
        checks.append((f"req per CPU-second {cpu_speed:.2f}x default (goal >= 1.8x)", cpu_speed >= 1.8))
        pause = ratio["max_pause_ms"]
        checks.append((f"max GC pause {pause:.3f}x default (goal <= 0.1x)", pause <= 0.1))
        if workload == "orm":
            checks.append((f"GC share {ada['gc_share']:.1%} (goal <= 5%)", ada["gc_share"] <= 0.05))
        checks.append((f"peak RSS {rss:.3f}x default (goal <= 1.10x)", rss <= 1.10))
        if workload == "orm_cyclic":
            left = ada["garbage_left"]
            text = f"cyclic garbage left at the end: {left:.0f} objects (default {base['garbage_left']:.0f})"
            checks.append((text, left <= max(base["garbage_left"], 1)))
    elif workload in ("micro", "long_cyclic", "long_blob"):
        checks.append((f"req per CPU-second {cpu_speed:.3f}x default (goal >= 1.0x)", cpu_speed >= 1.0))
        checks.append((f"peak RSS {rss:.3f}x default (goal <= 1.10x)", rss <= 1.10))
    else:
        checks.append((f"peak RSS {rss:.3f}x default (goal <= 1.10x)", rss <= 1.10))
    return [f"- {'PASS' if ok else 'MISS'} {text}" for text, ok in checks]


def hook_line(hooks: list[dict[str, Any]]) -> str:
    """One sentence on the request hooks' own cost."""
    if not hooks:
        return "Request hooks: not measured in this run."
    overhead = statistics.median(h["overhead_ns"] for h in hooks)
    total = statistics.median(h["hooks_ns"] for h in hooks)
    return (
        f"Request hooks: on_request_start()+on_request_end() cost {total:.0f} ns per request when nothing "
        f"is due, {overhead:.0f} ns more than two no-op method calls (median of {len(hooks)} processes x 7)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and one round (smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="repetitions (default 3, quick 1)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", dest="json_path", default=None, help="write raw results here")
    parser.add_argument("--traces", default=None, help="accepted for uniformity; this benchmark reads none")
    parser.add_argument("--from-json", default=None, help="re-render the report of a saved --json run")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.child:
        workload, variant = args.child
        if workload == "hooks":
            print(json.dumps(measure_hook_cost(20_000 if args.quick else 200_000)))
        else:
            print(json.dumps(run_child(workload, variant, size)))
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(report(saved["results"]))
        print(hook_line(saved.get("hooks") or []))
        return 0
    workloads = [w for w in args.workloads.split(",") if w]
    variants = [v for v in args.variants.split(",") if v]
    for name, allowed, given in (("workload", WORKLOADS, workloads), ("variant", VARIANTS, variants)):
        bad = [x for x in given if x not in allowed]
        if bad:
            parser.error(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    print("GC benchmark: no trace files are used; the workload is generated.", file=sys.stderr)
    results = run_all(workloads, variants, rounds, args.quick, lambda s: print(s, file=sys.stderr))
    hooks = [spawn("hooks", "adaptive", args.quick) for _ in range(rounds)]
    print(report(results))
    print(hook_line(hooks))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"results": results, "hooks": hooks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
