r"""Overhead of kotoba-memory at production defaults on a realistic app, in steady state.

The plain-WSGI field app (benchmarks/field_apps/wsgi_catalog.py, its leak switched off: seven routes
of caches, sessions, templates, logging and JSON) runs under gunicorn, ``--workers`` gthread workers each:
``off`` is the bare app, ``on`` the app in kotoba-memory's WSGI middleware with ``MemoryConfig()``'s
defaults untouched (profiling with a 0.5 s tracing window every 60 s or further apart under the trace
budget, and survival censuses, the adaptive GC optimizer, the cache manager). After a warm-up
(start-up, the first tracing window, the GC optimizer's warm-up freeze) both are loaded at the same
moment by two wrk processes, round after round. The trace budget spaces a process's later windows
minutes apart, so they land in its rounds only now and then: the median of per-round ratios mostly
leaves them out, the position-cancelled mean counts those that land (with restarts, more often than
in steady state); field_uptime.py counts every window of servers that run for an hour. The
figure is the worker's CPU time per request (``/proc`` counters), which bounds a saturated worker's
requests per CPU-second and hardly depends on the machine's other load; reported as the median of the
per-round ratios on/off (goal: at most 2% fewer requests per CPU-second, i.e. a ratio <= 1.02) and, when
the starts make whole rotations of the start order, with each start position's offset cancelled (see
``position_balanced``).

    .venv/bin/python benchmarks/field_overhead.py                      # 60 s warm-up + 6 x 60 s
    .venv/bin/python benchmarks/field_overhead.py --rounds 3 --round-s 20 --warmup-s 20   # a quick look
    .venv/bin/python benchmarks/field_overhead.py --without-profiler   # + the defaults minus profiling
    .venv/bin/python benchmarks/field_overhead.py --without-profiler --delay-ms 10   # one unsaturated pace
    .venv/bin/python benchmarks/field_overhead.py --without-profiler --middleware-only --delay-ms 10
    .venv/bin/python benchmarks/field_overhead.py --middleware-only --fixed-rss --delay-ms 10
    .venv/bin/python benchmarks/field_overhead.py --delay-ms 10 \
        --variant 'nowin={"enable_leak_detection": false}'   # + the defaults with fields changed
    .venv/bin/python benchmarks/field_overhead.py --delay-ms 10 --workers 3 --rounds 8 --restart-every 2

Flat out, a server that gets less of the machine's two cores queues more requests per wake-up and so
spends less CPU on each; with ``--delay-ms`` every server serves the same pace below saturation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import psutil

REPO = Path(__file__).resolve().parent.parent
# The code beside this file, also when the environment has another checkout installed (editable).
sys.path[:0] = [str(REPO), str(REPO / "core")]

from benchmarks.field_suite import APPS, _wrk_script, stop_server  # noqa: E402
from benchmarks.middleware_overhead import wrk_pacing  # noqa: E402
from kotoba_memory.config import MemoryConfig  # noqa: E402

_REQUESTS = re.compile(r"(\d+) requests in")
# The servers the flags add; a variant needs another name.
_BUILT_IN = ("off", "on", "noprof", "mwonly", "mwfixed")


class Server:
    """gunicorn with ``workers`` gthread workers serving the catalogue, bare or with kotoba-memory."""

    def __init__(
        self, kotoba: bool, profiler: bool = True, out: Path | None = None, middleware_only: bool = False,
        overrides: dict[str, Any] | None = None, workers: int = 1, leaks: bool = False,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        env = dict(
            os.environ, FIELD_BIND=f"127.0.0.1:{self.port}", FIELD_WORKERS=str(workers),
            FIELD_LEAKS="1" if leaks else "0",
            FIELD_KOTOBA="1" if kotoba else "0", FIELD_PRODUCTION="1",
            PYTHONPATH=os.pathsep.join((str(REPO), str(REPO / "core"))),
            FIELD_PROFILE="1" if profiler else "0", FIELD_MIDDLEWARE_ONLY="1" if middleware_only else "0",
        )
        env.pop("FIELD_OUT", None)
        env.pop("FIELD_CONFIG", None)
        env.pop("FIELD_RSS_SAMPLE_BUDGET", None)
        if overrides is not None:  # MemoryConfig(**overrides): the defaults with some fields changed
            env["FIELD_CONFIG"] = json.dumps(overrides)
        if out is not None:  # the worker dumps its profiler's analysis there on exit
            env["FIELD_OUT"] = str(out)
        env.update(extra_env or {})
        conf = REPO / "benchmarks" / "field_apps" / "gunicorn_conf.py"
        cmd = [str(Path(sys.executable).parent / "gunicorn"), "-c", str(conf), APPS["wsgi_catalog"].target]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            children = psutil.Process(self.proc.pid).children()
            with socket.socket() as sock:
                if len(children) == workers and sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    self.workers = children
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("gunicorn did not come up")

    def cpu_seconds(self) -> float:
        """CPU seconds of every worker process (the arbiter does no request work)."""
        total = 0.0
        for worker in self.workers:
            if not worker.is_running():  # replaced by the arbiter (an hour-long run may see one)
                continue
            times = worker.cpu_times()
            total += times.user + times.system
        return total

    def stop(self) -> None:
        stop_server(self.proc, timeout=30)


def _profiler_own_measure(dumps: Path) -> dict[str, Any] | None:
    """The on worker's profiler stats from its exit dump: windows, their spacing and measured cost."""
    for path in sorted(dumps.glob("worker-*.json")):
        stats = json.loads(path.read_text(encoding="utf-8"))["stats"]
        return {k: stats.get(k) for k in ("windows", "window_interval_s", "window_cost_share", "censuses")}
    return None


def _what_ran(dumps: Path) -> dict[str, Any] | None:
    """One worker's exit dump of what it ran (the first by file name, with how many workers dumped): CPU per
    thread (busiest first) and the collector's state."""
    paths = sorted(dumps.glob("process-*.json"))
    for path in paths:
        process: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        process["workers_dumped"] = len(paths)
        process["threads_cpu_s"] = sorted(process["threads_cpu_s"].items(), key=lambda kv: -kv[1])
        process["collections"] = [generation["collections"] for generation in process["gc_stats"]]
        process["tasks_share"] = _tasks_share(paths)
        return process
    return None


def _tasks_share(paths: list[Path]) -> dict[str, float]:
    """Each scheduler task's CPU over all the dumped workers' CPU (their threads' user + system time)."""
    total = 0.0
    tasks: dict[str, float] = {}
    for path in paths:
        process = json.loads(path.read_text(encoding="utf-8"))
        total += sum(process["threads_cpu_s"].values())
        for name, cpu in process.get("tasks_cpu_s", {}).items():
            tasks[name] = tasks.get(name, 0.0) + cpu
    return {name: cpu / total for name, cpu in sorted(tasks.items(), key=lambda kv: -kv[1])} if total else {}


def wrk(port: int, seconds: float, script: Path, connections: int) -> int:
    """Requests completed in one wrk run over the app's routes."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "5s", "-s", str(script),
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    found = _REQUESTS.search(out)
    if found is None or "Non-2xx" in out:
        raise RuntimeError(f"wrk failed:\n{out}")
    return int(found.group(1))


def position_balanced(rounds: list[dict[str, float]], top: str, under: str, servers: int) -> float | None:
    """The ratio ``top``/``under`` with each start position's offset cancelled, or None when the starts
    do not put every server in every position equally often.

    A start boots the servers in a rotated order, and a server's CPU per request carries an offset of
    its position for as long as it lives (a few percent, larger than the effects measured). Over a
    whole number of rotations each server sits in each position equally often, so in the geometric
    mean over starts (each start the geometric mean of its rounds) the position factors cancel
    exactly; the median of per-round ratios keeps whatever the positions' spread leaves in it.
    """
    by_start: dict[int, list[float]] = {}
    for r in rounds:
        by_start.setdefault(int(r["start"]), []).append(math.log(r[f"{top}_cpu_us"] / r[f"{under}_cpu_us"]))
    if not by_start or len(by_start) % servers or len({len(v) for v in by_start.values()}) != 1:
        return None
    return math.exp(statistics.fmean(statistics.fmean(v) for v in by_start.values()))


class Loadable(Protocol):
    """A server paired_round can load: where it listens and its workers' CPU seconds so far."""

    port: int

    def cpu_seconds(self) -> float: ...


def paired_round(
    servers: Mapping[str, Loadable], seconds: float, script: Path, connections: int
) -> dict[str, float]:
    """Load every server at once; each worker's CPU microseconds per request and requests served."""
    cpu0 = {name: s.cpu_seconds() for name, s in servers.items()}
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        runs = {name: pool.submit(wrk, s.port, seconds, script, connections) for name, s in servers.items()}
        served = {name: run.result() for name, run in runs.items()}
    result: dict[str, float] = {}
    for name, server in servers.items():
        result[f"{name}_requests"] = served[name]
        result[f"{name}_cpu_us"] = (server.cpu_seconds() - cpu0[name]) / max(served[name], 1) * 1e6
    return result


def config_overrides(parser: argparse.ArgumentParser, flag: str, text: str) -> dict[str, Any]:
    """The JSON object of MemoryConfig fields ``text`` holds, checked here (a bad one exits through
    ``parser.error``), not in a worker that would fail to boot and leave only "did not come up"."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        parser.error(f"{flag}: not JSON ({exc})")
    if not isinstance(overrides, dict):
        parser.error(f"{flag}: wants a JSON object of MemoryConfig fields, got {text!r}")
    try:
        MemoryConfig(**overrides)
    except (TypeError, ValueError) as exc:
        parser.error(f"{flag}: {exc}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round-s", type=float, default=60.0, help="one window interval at the defaults")
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--workers", type=int, default=1,
        help="gunicorn workers per server: each is its own process with its own hash seed, address "
             "layout and adaptive GC state, which shift one process's CPU per request by a few percent "
             "for as long as it lives; several per server average that out",
    )
    parser.add_argument(
        "--restart-every", type=int, default=0, metavar="K",
        help="stop every server after each K rounds and start new ones (with a new warm-up): a process's "
             "offset then holds for K rounds only, and the median spans several processes per server; "
             "each start also rotates the order servers boot and are loaded in (the second server "
             "started read ~2%% dearer than identical ones started later), so run as many starts as "
             "servers",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--delay-ms", type=float, default=0.0,
        help="each wrk connection waits this long between requests: the same unsaturated rate for every "
             "server, as workers run in production, instead of as fast as each can go",
    )
    parser.add_argument(
        "--without-profiler", action="store_true",
        help="also serve the defaults without the profiler (a third server, loaded at the same time)",
    )
    parser.add_argument(
        "--middleware-only", action="store_true",
        help="also serve the middleware alone (no profiler, GC optimizer nor cache): one more server",
    )
    parser.add_argument(
        "--fixed-rss", action="store_true",
        help="also serve the middleware alone with RSS on one request in 8 whatever it costs (no "
        "rss_sample_budget): one more server, mwfixed",
    )
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=JSON",
        help="one more server: MemoryConfig's defaults with the fields of a JSON object changed, e.g. "
             "'nowin={\"enable_leak_detection\": false}' (repeatable; compared with off and with on)",
    )
    args = parser.parse_args(argv)
    if args.restart_every < 0:
        parser.error(f"--restart-every wants a whole number of rounds >= 0, got {args.restart_every}")
    variants: dict[str, dict[str, Any]] = {}
    for spec in args.variant:
        name, sep, text = spec.partition("=")
        if not sep or not name.isidentifier() or name in _BUILT_IN:
            parser.error(f"--variant wants NAME=JSON with a new identifier for NAME, got {spec!r}")
        variants[name] = config_overrides(parser, f"--variant {name}", text)
    servers: dict[str, Server] = {}
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="field-overhead-") as tmp:
        script = Path(tmp) / "routes.lua"
        _wrk_script(APPS["wsgi_catalog"], script)
        if args.delay_ms > 0:
            with script.open("a", encoding="utf-8") as lua:
                lua.write(wrk_pacing(args.delay_ms))
        try:
            dumps = {name: Path(tmp) / name for name in (*_BUILT_IN, *variants)}
            for folder in dumps.values():
                folder.mkdir()

            factories: dict[str, Callable[[], Server]] = {
                "off": lambda: Server(False, out=dumps["off"], workers=args.workers),
                "on": lambda: Server(True, out=dumps["on"], workers=args.workers),
            }
            if args.without_profiler:
                factories["noprof"] = lambda: Server(
                    True, profiler=False, out=dumps["noprof"], workers=args.workers
                )
            if args.middleware_only:
                factories["mwonly"] = lambda: Server(
                    True, profiler=False, middleware_only=True, out=dumps["mwonly"], workers=args.workers
                )
            if args.fixed_rss:
                factories["mwfixed"] = lambda: Server(
                    True, profiler=False, middleware_only=True, out=dumps["mwfixed"], workers=args.workers,
                    extra_env={"FIELD_RSS_SAMPLE_BUDGET": "none"},
                )
            for name, overrides in variants.items():
                factories[name] = partial(
                    Server, True, overrides=overrides, out=dumps[name], workers=args.workers
                )
            starts = 0

            def start_servers() -> None:
                # Each start rotates the order servers boot and their wrk is launched in: an A/A run
                # without it showed the second server started ~2% dearer than identical later ones.
                nonlocal starts
                names = list(factories)
                shift = starts % len(names)
                starts += 1
                servers.clear()
                for name in names[shift:] + names[:shift]:
                    servers[name] = factories[name]()
                print(f"warm-up {args.warmup_s:.0f} s (start-up, first tracing window, GC warm-up freeze); "
                      f"start order {', '.join(servers)}")
                paired_round(servers, args.warmup_s, script, args.connections)

            start_servers()
            for r in range(args.rounds):
                if args.restart_every and r and r % args.restart_every == 0:
                    for server in servers.values():
                        server.stop()  # fresh processes: new hash seeds, address layouts and GC paths
                    print(f"  restarting every server after round {r}", flush=True)
                    start_servers()
                result = paired_round(servers, args.round_s, script, args.connections)
                result["start"] = starts - 1
                for name in servers:
                    if name != "off":
                        result[f"{name}_ratio"] = result[f"{name}_cpu_us"] / result["off_cpu_us"]
                rounds.append(result)
                shown = ", ".join(
                    f"{name} {result[f'{name}_cpu_us']:.1f} us ({int(result[f'{name}_requests'])} requests)"
                    for name in servers
                )
                ratios = ", ".join(f"{n}/off {result[f'{n}_ratio']:.3f}" for n in servers if n != "off")
                print(f"  round {r + 1}/{args.rounds}: {shown}; {ratios}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
        own = _profiler_own_measure(dumps["on"])
        ran = {name: _what_ran(dumps[name]) for name in servers}
    summary: dict[str, Any] = {
        "rounds": rounds, "args": vars(args), "profiler_own_measure": own, "what_ran": ran,
    }
    for name in servers:
        if name == "off":
            continue
        ratio = statistics.median(r[f"{name}_ratio"] for r in rounds)
        summary[f"median_{name}_ratio"] = ratio
        per_round = ", ".join(f"{r[f'{name}_ratio']:.3f}" for r in rounds)
        print(f"{name}: median CPU per request vs off {ratio:.3f} -> {100 * (1 - 1 / ratio):.1f}% fewer "
              f"requests per CPU-second (goal <= 2%); per round: {per_round}")
        balanced = position_balanced(rounds, name, "off", len(servers))
        summary[f"balanced_{name}_ratio"] = balanced
        if balanced is not None:
            print(f"  {name}/off with the start positions cancelled (geometric mean over the rotated "
                  f"starts): {balanced:.3f} -> {100 * (1 - 1 / balanced):.1f}% fewer requests per CPU-second")
    if summary.get("balanced_on_ratio") is None:
        print(f"(no position-balanced figure: it needs a multiple of {len(servers)} starts with the same "
              "number of rounds each, e.g. --rounds 8 --restart-every 2)")
    for top, under, what in (("on", "noprof", "the profiler alone"),
                             ("noprof", "mwonly", "the GC optimizer and cache manager"),
                             ("mwfixed", "mwonly", "RSS on one in 8 against the budget"),
                             *((name, "on", f"variant {name} against the defaults") for name in variants)):
        if top in servers and under in servers:
            pair = [r[f"{top}_cpu_us"] / r[f"{under}_cpu_us"] for r in rounds]
            summary[f"median_{top}_over_{under}"] = statistics.median(pair)
            balanced = position_balanced(rounds, top, under, len(servers))
            summary[f"balanced_{top}_over_{under}"] = balanced
            print(f"{what} ({top}/{under}): median {statistics.median(pair):.3f}"
                  + (f", positions cancelled {balanced:.3f}" if balanced is not None else "")
                  + "; per round: " + ", ".join(f"{a:.3f}" for a in pair))
    if own:
        share = own["window_cost_share"]
        cost = ("no window measured yet" if share is None else
                f"the windows' extra CPU {100 * share:.2f}% of the process's CPU since it started")
        print(f"the profiler's own measure in the on worker: {own['windows']} windows, next window "
              f"{own['window_interval_s']:.0f} s after the last, {cost}")
    for name, process in ran.items():
        if process is None:
            continue
        busiest = ", ".join(f"{thread} {cpu:.1f} s" for thread, cpu in process["threads_cpu_s"][:4])
        gc_line = (f"gc threshold {process['gc_threshold']}, frozen {process['gc_freeze_count']}, "
                   f"collections per generation {process['collections']}")
        mode = process.get("gc_mode")
        tuned = (f"; GC optimizer {mode[0]} ({mode[1]}), {len(process['gc_changes'])} changes, "
                 f"{process.get('budget_collections')} budget collections" if mode else "")
        which = "worker" if process["workers_dumped"] == 1 else f"worker (one of {process['workers_dumped']})"
        gaps = process.get("rss_mean_gaps")
        gap_line = f"; RSS measured on one request in {', '.join(map(str, gaps))} on average" if gaps else ""
        print(f"what {name}'s {which} ran: {busiest}; {gc_line}{tuned}{gap_line}")
        if process["tasks_share"]:
            shares = ", ".join(f"{task} {100 * share:.2f}%" for task, share in process["tasks_share"].items())
            print(f"  {name}'s scheduler tasks, share of its workers' CPU: {shares}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
