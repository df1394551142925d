"""Per-request overhead of kotoba-memory's WSGI middleware under a real server and load generator.

A trivial endpoint is served by gunicorn (one sync worker per variant, all started up front) and
driven by ``wrk`` on 127.0.0.1; so is the Flask example app (``examples/flask_app``: SQLAlchemy with the
query cache, Flask-Caching, ``@cached``), with ``KotobaMemory`` at the example's settings (middleware and
the full optimizer: profiling, leak detection, GC optimization, cache) against the same app with
``KOTOBA_MEMORY_ENABLED=False``, wrk cycling through its read endpoints. Each contender is loaded at
the same moment as its baseline (two wrk processes side by side, contender order shuffled each round),
so load from other processes on this shared machine hits both alike and cancels out of their ratio.
Reports the median req/s per variant, the worker's CPU time per request (from its own /proc counters)
and the median of the per-round ratios to the variant's baseline: the bare WSGI app, bare Flask, or
the example without kotoba-memory (goal: <= 3% more worker CPU per request on the examples). A
second, in-process part times the middleware's own cost per request in microseconds (median of
interleaved repeats; goal <= 2 us).

    .venv/bin/python benchmarks/middleware_overhead.py            # ~6 minutes
    .venv/bin/python benchmarks/middleware_overhead.py --quick    # ~2 minutes

The module doubles as the gunicorn app: ``middleware_overhead:create_app()`` builds the variant named
by ``KOTOBA_BENCH_VARIANT``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# variant -> the baseline its req/s is compared with
VARIANTS = {
    "plain": "plain",
    "middleware": "plain",
    "middleware+rss-every-1": "plain",
    "middleware+otel-noop": "plain",
    "middleware+otel-sdk": "plain",
    "middleware+optimizer": "plain",
    "flask": "flask",
    "flask+kotoba": "flask",
    "example": "example",
    "example+kotoba": "example",
}
EXAMPLE_DIR = ROOT / "examples" / "flask_app"
# wrk cycles through the example's read endpoints (cached and uncached queries, a memoised function).
_EXAMPLE_WRK_SCRIPT = """
local paths = {"/", "/books", "/stats", "/checksum/%d", "/books/%d", "/books/%d", "/books/%d"}
local n = 0
request = function()
  n = n + 1
  local p = paths[(n % #paths) + 1]
  if string.find(p, "%%d") then p = string.format(p, (n * 7919) % 200 + 1) end
  return wrk.format("GET", p)
end
"""
DEFAULT_VARIANTS = tuple(VARIANTS)
_BODY = b"ok"


def trivial_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The benchmark endpoint: no work at all, so the middleware's cost is as visible as it gets."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [_BODY]


def build_variant(variant: str) -> Callable[..., Iterable[bytes]]:
    """The trivial app wrapped as ``variant`` says."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if variant == "plain":
        return trivial_app
    if variant.startswith("example"):
        import app as example  # examples/flask_app/app.py (on PYTHONPATH for these servers)

        enabled = variant == "example+kotoba"
        return example.create_app({"KOTOBA_MEMORY_ENABLED": enabled})
    if variant.startswith("flask"):
        from flask import Flask

        app = Flask("bench")
        app.add_url_rule("/", "index", lambda: "ok")
        if variant == "flask+kotoba":
            from kotoba_memory_integrations.flask import KotobaMemory

            KotobaMemory(app, autostart=False)  # per-request metrics and route labels only
        return app
    from kotoba_memory_integrations import otel
    from kotoba_memory_integrations.wsgi import MemoryMiddleware

    if variant == "middleware+otel-noop":
        otel.instrument()  # no SDK provider configured: the API's proxy instruments
    elif variant == "middleware+otel-sdk":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        otel.instrument(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    elif variant == "middleware+rss-every-1":  # RSS on every request (the default samples 1 in 8)
        return MemoryMiddleware(trivial_app, rss_sample_every=1)
    elif variant == "middleware+optimizer":
        from kotoba_memory.config import MemoryConfig
        from kotoba_memory_integrations.runtime import start_optimizer

        # Everything on, leak detection included (its tracing windows are part of the real cost).
        start_optimizer(MemoryConfig.from_mapping({"enable_profiling": True, "enable_gc_optimization": True}))
    return MemoryMiddleware(trivial_app)


def create_app() -> Callable[..., Iterable[bytes]]:
    """gunicorn entry point: the variant named by ``KOTOBA_BENCH_VARIANT``."""
    return build_variant(os.environ.get("KOTOBA_BENCH_VARIANT", "plain"))


def _servers() -> Any:
    """tools/servers.py: the start/stop helpers the server tests use too."""
    tools = str(ROOT / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import servers

    return servers


def start_server(variant: str, data_dir: str) -> tuple[subprocess.Popen[bytes], int]:
    servers = _servers()
    port = servers.free_port()
    path = [str(ROOT / "benchmarks"), str(EXAMPLE_DIR)]
    env = dict(
        os.environ, KOTOBA_BENCH_VARIANT=variant, PYTHONPATH=os.pathsep.join(path),
        # The example's own data (SQLite) per server; no Prometheus exporter (an app choice, not ours).
        KOTOBA_EXAMPLE_DATA_DIR=data_dir, KOTOBA_EXAMPLE_METRICS="0",
    )
    cmd = [
        sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
        "--worker-class", "sync", "--log-level", "warning",
        "middleware_overhead:create_app()",
    ]
    if variant.startswith("example"):
        # The example seeds its database once before the workers start (its gunicorn on_starting hook).
        subprocess.run([sys.executable, "-c", "import app; app.init_db()"], env=env, check=True)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT / "benchmarks", start_new_session=True)
    try:
        # Output goes to our stdout (nothing to log here): any HTTP answer means it is up.
        servers.wait_ready(servers.Server(proc, port, Path(os.devnull)), timeout=30.0, status=None)
    except BaseException:
        stop_server(proc)
        raise
    return proc, port


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    _servers().stop(proc, timeout=10.0)


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_REQUESTS = re.compile(r"(\d+) requests in")


class Server:
    """One gunicorn (one sync worker) serving a variant; knows its worker's CPU time."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self._data = tempfile.TemporaryDirectory(prefix=f"kotoba-bench-{variant}-")
        self.script: str | None = None
        if variant.startswith("example"):
            self.script = os.path.join(self._data.name, "paths.lua")
            with open(self.script, "w") as f:
                f.write(_EXAMPLE_WRK_SCRIPT)
        self.proc, self.port = start_server(variant, self._data.name)
        import psutil

        deadline = time.monotonic() + 10
        while not psutil.Process(self.proc.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        [self.worker] = psutil.Process(self.proc.pid).children()

    def cpu_seconds(self) -> float:
        times = self.worker.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        stop_server(self.proc)
        self._data.cleanup()


def wrk_pacing(delay_ms: float) -> str:
    """Lua that makes each wrk connection wait ``delay_ms`` before every request: a fixed pace below
    saturation, whatever the latency (wrk calls ``delay()`` before each request)."""
    return f"function delay()\n  return {delay_ms:g}\nend\n"


def run_wrk(port: int, seconds: int, connections: int, script: str | None = None) -> tuple[float, int]:
    """One wrk run; returns (req/s, requests completed)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"] + (["-s", script] if script else [])
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/"],
        check=True, capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    rps, requests = _RPS.search(out), _REQUESTS.search(out)
    if rps is None or requests is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk run failed or saw errors:\n{out}")
    return float(rps.group(1)), int(requests.group(1))


def run_pair(base: Server, contender: Server, seconds: int, connections: int) -> dict[str, float]:
    """Load baseline and contender at the same time; req/s and worker CPU microseconds per request."""
    cpu0 = (base.cpu_seconds(), contender.cpu_seconds())
    with ThreadPoolExecutor(max_workers=2) as pool:
        base_run = pool.submit(run_wrk, base.port, seconds, connections, base.script)
        contender_run = pool.submit(run_wrk, contender.port, seconds, connections, contender.script)
        (base_rps, base_n), (rps, n) = base_run.result(), contender_run.result()
    cpu1 = (base.cpu_seconds(), contender.cpu_seconds())
    return {
        "base_rps": base_rps,
        "rps": rps,
        "base_cpu_us": (cpu1[0] - cpu0[0]) / max(base_n, 1) * 1e6,
        "cpu_us": (cpu1[1] - cpu0[1]) / max(n, 1) * 1e6,
    }


Pair = dict[str, float]


def server_benchmark(
    variants: list[str], rounds: int, seconds: int, connections: int
) -> dict[str, list[Pair]]:
    """Paired wrk runs against one gunicorn per variant; returns each contender's per-round pairs.

    Each contender is loaded at the same moment as its baseline (two wrk processes side by side), so
    load from the other processes on the machine, which comes and goes, hits both alike; the pair
    competes for the CPUs symmetrically. Besides req/s, the workers' CPU time per request is recorded:
    it is what bounds a saturated worker's throughput and hardly depends on the machine's other load.
    """
    servers: dict[str, Server] = {}
    try:
        for variant in variants:
            servers[variant] = Server(variant)
        for server in servers.values():  # warm-up, discarded
            run_wrk(server.port, 1, connections, server.script)
        pairs: dict[str, list[Pair]] = {v: [] for v in variants if VARIANTS[v] != v}
        contenders = list(pairs)
        rng = random.Random(20240501)
        for r in range(rounds):
            rng.shuffle(contenders)
            for variant in contenders:
                base = servers[VARIANTS[variant]]
                pairs[variant].append(run_pair(base, servers[variant], seconds, connections))
            shown = []
            for v in contenders:
                last = pairs[v][-1]
                rps, cpu = last["rps"] / last["base_rps"], last["cpu_us"] / last["base_cpu_us"]
                shown.append(f"{v} rps x{rps:.3f} cpu x{cpu:.3f}")
            print(f"  round {r + 1}/{rounds}: " + ", ".join(shown))
        return pairs
    finally:
        for server in servers.values():
            server.stop()


@contextlib.contextmanager
def _pure_python_wrappers() -> Iterator[None]:
    """wsgi.py's pure-Python start_response closure and body for the time of the block (the reference)."""
    from kotoba_memory_integrations import wsgi

    saved = wsgi._CStartResponse, wsgi._Body
    wsgi._CStartResponse, wsgi._Body = None, wsgi._MeasuredBody
    try:
        yield
    finally:
        wsgi._CStartResponse, wsgi._Body = saved


def in_process_cost_us(repeats: int, calls: int) -> dict[str, Any]:
    """Median CPU microseconds per request added by the middleware, measured in this process.

    The default middleware (the C recorder and wrappers where built) and the pure-Python one
    (``PyRequestRecorder`` and wsgi.py's Python wrappers) run interleaved in every repeat, each at the
    default RSS sampling (1 request in 8) and with RSS on every request; ``c_over_pure`` is the median of
    the per-repeat ratios of their added costs.
    """
    from kotoba_memory.__about__ import implementations
    from kotoba_memory_integrations.request import PyRequestRecorder, RequestRecorder
    from kotoba_memory_integrations.wsgi import MemoryMiddleware

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}

    def start_response(*args: Any) -> None:
        return None

    def drive(app: Callable[..., Iterable[bytes]]) -> float:
        t0 = time.thread_time()  # CPU time of this thread: preemption by other processes is not counted
        for _ in range(calls):
            result = app(dict(environ), start_response)
            for _chunk in result:
                pass
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return (time.thread_time() - t0) / calls * 1e6

    def drive_pure(app: Callable[..., Iterable[bytes]]) -> float:
        with _pure_python_wrappers():
            return drive(app)

    contenders: dict[str, Callable[[], float]] = {
        "plain": lambda: drive(trivial_app),
        "default": lambda: drive(MemoryMiddleware(trivial_app, recorder=RequestRecorder())),
        "default_every": lambda: drive(
            MemoryMiddleware(trivial_app, recorder=RequestRecorder(rss_sample_every=1))
        ),
        "pure": lambda: drive_pure(MemoryMiddleware(trivial_app, recorder=PyRequestRecorder())),
        "pure_every": lambda: drive_pure(
            MemoryMiddleware(trivial_app, recorder=PyRequestRecorder(rss_sample_every=1))
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: list[float] = []
    for r in range(repeats):
        names = list(contenders)
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no contender always first
        this_round = {name: contenders[name]() for name in order}
        for name, value in this_round.items():
            times[name].append(value)
        pure_added = this_round["pure"] - this_round["plain"]
        if pure_added > 0:
            ratios.append((this_round["default"] - this_round["plain"]) / pure_added)
    med = {name: statistics.median(values) for name, values in times.items()}
    plain = med["plain"]
    return {
        "plain_us": plain, "middleware_us": med["default"], "added_us": med["default"] - plain,
        "every_request_us": med["default_every"], "every_request_added_us": med["default_every"] - plain,
        "pure_added_us": med["pure"] - plain, "pure_every_request_added_us": med["pure_every"] - plain,
        "c_over_pure": statistics.median(ratios) if ratios else float("nan"),
        "recorder": implementations()["_crecord"],
    }


def otel_record_cost_us(repeats: int, calls: int) -> dict[str, float]:
    """Median CPU microseconds the OpenTelemetry listener adds per request: no SDK vs the SDK."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from kotoba_memory_integrations.otel import _Instruments
    from kotoba_memory_integrations.request import RequestMetrics

    sample = RequestMetrics("/items/<int:id>", "GET", 200, 0.001, 4096, None, 0, None, False)
    noop = _Instruments(metrics.NoOpMeterProvider())
    sdk = _Instruments(MeterProvider(metric_readers=[InMemoryMetricReader()]))

    def drive(instruments: Any) -> float:
        t0 = time.thread_time()
        for _ in range(calls):
            instruments.on_request(sample)
        return (time.thread_time() - t0) / calls * 1e6

    noop_times, sdk_times = [], []
    for _ in range(repeats):
        noop_times.append(drive(noop))
        sdk_times.append(drive(sdk))
    noop.active = sdk.active = False
    return {"noop_us": statistics.median(noop_times), "sdk_us": statistics.median(sdk_times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds (~30 s)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=int, default=None, help="wrk duration per run (whole seconds)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"from: {', '.join(VARIANTS)}")
    parser.add_argument("--no-server", action="store_true", help="only the in-process part")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 9)
    seconds = max(1, args.seconds or (2 if args.quick else 3))
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}")
    for v in variants:
        if VARIANTS[v] not in variants:
            parser.error(f"variant {v!r} needs its baseline {VARIANTS[v]!r} in --variants")

    cost = in_process_cost_us(repeats=5 if args.quick else 11, calls=5000 if args.quick else 20000)
    print(
        f"in-process: plain {cost['plain_us']:.2f} us/request, with middleware {cost['middleware_us']:.2f}"
        f" us/request -> middleware adds {cost['added_us']:.2f} us (recorder: {cost['recorder']}; median"
        f" of interleaved repeats; RSS on every request: adds {cost['every_request_added_us']:.2f} us)"
    )
    print(
        f"in-process: pure-Python recorder and wrappers, same repeats: adds {cost['pure_added_us']:.2f} us"
        f" (RSS on every request: {cost['pure_every_request_added_us']:.2f} us); default/pure added cost:"
        f" x{cost['c_over_pure']:.2f} (median of per-repeat ratios)"
    )
    otel_cost = otel_record_cost_us(repeats=5 if args.quick else 11, calls=2000 if args.quick else 10000)
    print(
        f"in-process: OpenTelemetry per request: {otel_cost['noop_us']:.2f} us with no SDK (no-op provider),"
        f" {otel_cost['sdk_us']:.2f} us with the SDK (median of repeats)"
    )
    if args.no_server:
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (bash scripts/bootstrap.sh installs it): skipping the server part")
        return 1
    setup = f"contender + baseline together, 2x wrk -t1 -c{args.connections} -d{seconds}s, {rounds} rounds"
    print(f"gunicorn (1 sync worker per variant), {setup}")
    pairs = server_benchmark(variants, rounds, seconds, args.connections)
    print(
        f"\n{'variant':22} {'baseline':>9} {'req/s':>7} {'base req/s':>10} {'req/s ratio':>11}"
        f" {'CPU us/req':>10} {'base CPU us':>11} {'CPU ratio':>9} {'overhead':>8} {'CPU ratios min-max':>18}"
    )
    for variant, runs in pairs.items():
        med = statistics.median
        rps_ratio = med(p["rps"] / p["base_rps"] for p in runs)
        ratios = [p["cpu_us"] / p["base_cpu_us"] for p in runs]
        cpu_ratio = med(ratios)
        print(
            f"{variant:22} {VARIANTS[variant]:>9} {med(p['rps'] for p in runs):7.0f}"
            f" {med(p['base_rps'] for p in runs):10.0f} {rps_ratio:11.3f}"
            f" {med(p['cpu_us'] for p in runs):10.1f} {med(p['base_cpu_us'] for p in runs):11.1f}"
            f" {cpu_ratio:9.3f} {100 * (1 - 1 / cpu_ratio):7.1f}% {min(ratios):8.3f}-{max(ratios):.3f}"
        )
    print("overhead = req/s a saturated worker loses from the extra CPU per request: 1 - 1/(CPU ratio)")
    if "middleware" in pairs:
        base_cpu = statistics.median(p["base_cpu_us"] for p in pairs["middleware"])
        estimate = cost["added_us"] / (base_cpu + cost["added_us"])
        print(
            f"model: middleware's in-process {cost['added_us']:.2f} us on the bare app's {base_cpu:.0f} us"
            f" of worker CPU per request -> {100 * estimate:.1f}% fewer req/s for a saturated worker"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
