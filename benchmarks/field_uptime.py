r"""An hour of production defaults on a real server: do the verdicts and the cost hold as workers age?

The overhead benchmark (field_overhead.py) restarts its servers every few minutes, so no worker there
holds an hour of samples, windows and routes, and its rounds hold no tracing window in steady state.
Here three gunicorn servers of the plain-WSGI catalogue (``--workers`` gthread workers each) run side
by side for ``--minutes`` under the same paced wrk load, never restarted:

- ``off``: the bare app, its leak switched off;
- ``on``: the app in kotoba-memory's WSGI middleware with ``MemoryConfig()``'s defaults, leak off;
- ``leak``: the same defaults with the app's leak on (``/lookup/<key>`` memoises per key, unbounded).

Every ``--every`` minutes it prints each server's CPU per request over that stretch (workers' ``/proc``
counters over the requests wrk completed) and on/off, and what every worker's fleet row says: its top
suspects (checked against the ground truth, found by replaying each route alone under full tracing, as
field_suite.py does) or why there is no verdict yet. At the end the workers dump their analysis and
what they ran, and it prints the verdicts judged as the field suite judges them, the scheduler tasks'
share of the workers' CPU over the whole run, and the profiler's own measure of its windows.

    .venv/bin/python benchmarks/field_uptime.py                         # 60 min, a checkpoint every 10
    .venv/bin/python benchmarks/field_uptime.py --minutes 6 --every 2    # a quick look
    .venv/bin/python benchmarks/field_uptime.py --keep-dumps /tmp/uptime  # the workers' dumps kept

One draw of processes per server and no rotation: a process's offset (a few percent, see
field_overhead.py) stays in the on/off figure, which is why field_overhead.py is the overhead figure
and this run is the check that nothing grows with uptime.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "core")]

from benchmarks.field_overhead import Server, _tasks_share, paired_round  # noqa: E402
from benchmarks.field_suite import (  # noqa: E402
    APPS,
    CONFIDENT,
    Result,
    _ground_truth,
    _short,
    _wrk_script,
    judge,
    served,
)
from benchmarks.middleware_overhead import wrk_pacing  # noqa: E402
from kotoba_memory.fleet import FleetSpool, default_base_dir  # noqa: E402

# name -> (kotoba-memory on, the app's leak on)
SERVERS = {"off": (False, False), "on": (True, False), "leak": (True, True)}


def fleet_base() -> Path | None:
    """The directory the library's default spool base sits in (/dev/shm on Linux), None for tmp."""
    saved = os.environ.pop("KOTOBA_MEMORY_FLEET_DIR", None)
    try:
        parent = default_base_dir().parent
    finally:
        if saved is not None:
            os.environ["KOTOBA_MEMORY_FLEET_DIR"] = saved
    return parent if parent.is_dir() else None


class UptimeServer(Server):
    """field_overhead's server of the catalogue, its leak on or off, with its dump folder and its own
    fleet spool base (whose rows say each worker's verdict)."""

    def __init__(self, name: str, kotoba: bool, leaks: bool, workers: int, work: Path) -> None:
        self.name = name
        self.out = work / name
        # The spools where the library puts them by default (tmpfs, fleet.default_base_dir), one per server.
        self.fleet = Path(tempfile.mkdtemp(prefix=f"field-uptime-{name}-", dir=fleet_base()))
        self.out.mkdir()
        super().__init__(
            kotoba, out=self.out, workers=workers, leaks=leaks,
            extra_env={"KOTOBA_MEMORY_FLEET_DIR": str(self.fleet)},
        )

    def rows(self) -> list[dict[str, Any]]:
        """Every worker's latest fleet row (a spool per app name under this server's base)."""
        found: list[dict[str, Any]] = []
        for spool in sorted(p for p in self.fleet.iterdir() if p.is_dir()):
            found.extend(FleetSpool(spool).read(prune=False))
        return sorted(found, key=lambda row: row["pid"])


def describe_row(row: dict[str, Any], leak_sites: set[str]) -> str:
    """One worker's fleet row in a line: uptime, requests, top suspects (REAL or not) or its verdict note."""
    uptime = float(row.get("uptime_s") or 0) / 60
    head = f"pid {row['pid']} up {uptime:.0f} min, {row.get('requests')} requests"
    leaks = row.get("leaks") or []
    if not leaks:
        return f"{head}: {row.get('leak_verdict') or 'no suspect'}"
    shown = "; ".join(
        f"[{'REAL' if leak['allocation_site'] in leak_sites else 'not'}] {_short(leak['allocation_site'])} "
        f"{leak.get('route') or '(route not yet known)'} conf {leak['confidence']:.2f}"
        for leak in leaks[:3]
    )
    return f"{head}: {shown}"


def _heap_at_exit(out: Path, worker: dict[str, Any]) -> str:
    """What the worker's collector held frozen at exit, and the censuses that thawed it meanwhile."""
    path = out / f"process-{worker['pid']}.json"
    if not path.exists():
        return "no process dump"
    process = json.loads(path.read_text(encoding="utf-8"))
    stats = worker.get("stats") or {}
    return (f"heap frozen at exit: {process.get('gc_freeze_count')} objects; refreezes "
            f"{process.get('refreezes')}, census thaws {stats.get('heap_thaws')}, "
            f"censuses {stats.get('censuses')}")


def keep_dumps(outs: dict[str, Path], dest: Path) -> list[Path]:
    """Copy each server's worker dumps (``outs``: server name -> its dump folder) to ``dest/<name>/``,
    so a verdict can be examined after the run; returns the files copied."""
    copied: list[Path] = []
    for name, out in outs.items():
        target = dest / name
        target.mkdir(parents=True, exist_ok=True)
        for dump in sorted(out.glob("*.json")):
            copied.append(Path(shutil.copy2(dump, target / dump.name)))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=10.0, help="minutes between checkpoints")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--keep-dumps", type=Path, metavar="DIR",
        help="copy every worker's exit dump (its analysis, what it ran) to DIR/<server>/",
    )
    args = parser.parse_args(argv)
    if not 0 < args.every <= args.minutes:
        parser.error(f"--every must be in (0, --minutes], got {args.every}")
    app = APPS["wsgi_catalog"]
    truth = _ground_truth(app)
    leak_sites = {site for sites in truth.values() for site in sites}
    shown = {route: [_short(site) for site in sites] for route, sites in truth.items() if sites}
    print(f"ground truth: {shown or 'no leak'}", flush=True)
    checkpoints: list[dict[str, Any]] = []
    servers: dict[str, UptimeServer] = {}
    with tempfile.TemporaryDirectory(prefix="field-uptime-") as tmp:
        work = Path(tmp)
        script = work / "routes.lua"
        _wrk_script(app, script)
        script.write_text(script.read_text(encoding="utf-8") + wrk_pacing(args.delay_ms), encoding="utf-8")
        try:
            for name, (kotoba, leaks) in SERVERS.items():
                servers[name] = UptimeServer(name, kotoba, leaks, args.workers, work)
            started = time.monotonic()
            stretch = args.every * 60
            while time.monotonic() - started < args.minutes * 60 - 1:
                seconds = min(stretch, args.minutes * 60 - (time.monotonic() - started))
                point: dict[str, Any] = dict(paired_round(servers, seconds, script, args.connections))
                point["minute"] = round((time.monotonic() - started) / 60, 1)
                point["on_off"] = point["on_cpu_us"] / point["off_cpu_us"]
                point["leak_off"] = point["leak_cpu_us"] / point["off_cpu_us"]
                point["rows"] = {name: servers[name].rows() for name in ("on", "leak")}
                checkpoints.append(point)
                print(
                    f"minute {point['minute']:.0f}: CPU per request off {point['off_cpu_us']:.0f} us, "
                    f"on {point['on_cpu_us']:.0f} us (on/off {point['on_off']:.3f}), leak "
                    f"{point['leak_cpu_us']:.0f} us (leak/off {point['leak_off']:.3f})", flush=True,
                )
                for name in ("on", "leak"):
                    for row in point["rows"][name]:
                        print(f"  {name}: {describe_row(row, leak_sites)}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
                shutil.rmtree(server.fleet, ignore_errors=True)
        if args.keep_dumps is not None:
            kept = keep_dumps({name: server.out for name, server in servers.items()}, args.keep_dumps)
            print(f"kept {len(kept)} worker dumps in {args.keep_dumps}", flush=True)
        verdicts: dict[str, Any] = {}
        for name, leaks in (("on", False), ("leak", True)):
            result = Result(name, truth if leaks else {})
            for dump in sorted(servers[name].out.glob("worker-*.json")):
                result.workers.append(json.loads(dump.read_text(encoding="utf-8")))
            judge(result)
            shares = _tasks_share(sorted(servers[name].out.glob("process-*.json")))
            own = [
                {k: w.get("stats", {}).get(k) for k in ("windows", "window_interval_s", "window_cost_share")}
                for w in result.workers
            ]
            verdicts[name] = {
                "top_right": result.top_right, "confident_false": result.confident_false,
                "own_sited": result.own_sited, "tasks_share": shares, "profiler": own,
                "workers": [
                    {
                        "pid": w["pid"], "requests": served(w),
                        "status": (w.get("leak_status") or {}).get("message"),
                        "confident": [
                            _short(x["allocation_site"]) for x in w.get("memory_leaks", [])
                            if x["confidence"] >= CONFIDENT
                        ],
                    }
                    for w in result.workers
                ],
            }
            ready = sum(1 for w in result.workers if (w.get("leak_status") or {}).get("ready") and served(w))
            verdicts[name]["workers_with_a_verdict"] = ready
            print(f"{name} after {args.minutes:.0f} min: {ready} of {len(result.workers)} workers reached a "
                  f"verdict; top suspect right in every one: {result.top_right if ready else '-'}; confident "
                  f"false positives {result.confident_false}; sited in kotoba-memory {result.own_sited}")
            print("  scheduler tasks, share of the workers' CPU: "
                  + ", ".join(f"{task} {share:.2%}" for task, share in shares.items()))
            for worker, measure in zip(result.workers, own, strict=True):
                interval, share = measure["window_interval_s"], measure["window_cost_share"]
                print(f"  worker {worker['pid']}: {served(worker)} requests; windows {measure['windows']}, "
                      f"next after {interval or 0:.0f} s, their extra CPU {100 * (share or 0):.2f}% of the "
                      f"worker's; {(worker.get('leak_status') or {}).get('message')}")
                print(f"    {_heap_at_exit(servers[name].out, worker)}")
                held = worker.get("held_back") or []
                if held and not any(x["confidence"] >= CONFIDENT for x in worker.get("memory_leaks", [])):
                    top = held[0]  # why the worker is silent: its most confident site under the threshold
                    frames = [_short(frame) for frame in top.get("traceback", [])]
                    print(f"    held back: {_short(top['allocation_site'])} conf {top['confidence']:.2f}, "
                          f"limited by {top['limited_by']} ({top['evidence']}); bytes grown per window "
                          f"{top.get('window_growth')}; traceback {frames}")
    ratios = [point["on_off"] for point in checkpoints]
    if ratios:
        listed = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"on/off per checkpoint: {listed}; median {statistics.median(ratios):.3f}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoints": checkpoints, "verdicts": verdicts, "args": {
            k: str(v) for k, v in vars(args).items()}}, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
