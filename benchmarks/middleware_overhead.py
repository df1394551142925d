"""Per-request overhead of kotoba-memory's WSGI middleware under a real server and load generator.

A trivial endpoint is served by gunicorn (one sync worker per variant, all started up front) and
driven by ``wrk`` on 127.0.0.1 in interleaved rounds (variant order shuffled each round), so machine
noise hits every variant alike; each contender runs in baseline-V-V-baseline (ABBA) order so drifting
load cancels. Reports the median req/s per variant and the median of the per-round ratios to the
variant's baseline: the bare WSGI app, or bare Flask for the Flask pair (goal: the
middleware costs <= 3% of req/s). A second, in-process part times the middleware's own cost per
request in microseconds (median of repeats).

    .venv/bin/python benchmarks/middleware_overhead.py            # ~4 minutes
    .venv/bin/python benchmarks/middleware_overhead.py --quick    # ~1 minute

The module doubles as the gunicorn app: ``middleware_overhead:create_app()`` builds the variant named
by ``KOTOBA_BENCH_VARIANT``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# variant -> the baseline its req/s is compared with
VARIANTS = {
    "plain": "plain",
    "middleware": "plain",
    "middleware+otel-noop": "plain",
    "middleware+otel-sdk": "plain",
    "middleware+optimizer": "plain",
    "flask": "flask",
    "flask+kotoba": "flask",
}
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
    elif variant == "middleware+optimizer":
        from kotoba_memory.config import MemoryConfig
        from kotoba_memory_integrations.runtime import start_optimizer

        # Everything on, leak detection included (its tracing windows are part of the real cost).
        start_optimizer(MemoryConfig.from_mapping({"enable_profiling": True, "enable_gc_optimization": True}))
    return MemoryMiddleware(trivial_app)


def create_app() -> Callable[..., Iterable[bytes]]:
    """gunicorn entry point: the variant named by ``KOTOBA_BENCH_VARIANT``."""
    return build_variant(os.environ.get("KOTOBA_BENCH_VARIANT", "plain"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                if sock.recv(16).startswith(b"HTTP/1."):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not answer on port {port} within {timeout} s")


def start_server(variant: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, KOTOBA_BENCH_VARIANT=variant, PYTHONPATH=str(ROOT / "benchmarks"))
    cmd = [
        sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
        "--worker-class", "sync", "--log-level", "warning",
        "middleware_overhead:create_app()",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT / "benchmarks", start_new_session=True)
    try:
        wait_ready(port, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, port


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")


def run_wrk(port: int, seconds: int, connections: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
        check=True, capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    match = _RPS.search(out)
    if match is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk run failed or saw errors:\n{out}")
    return float(match.group(1))


def server_benchmark(
    variants: list[str], rounds: int, seconds: int, connections: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """ABBA-paired wrk runs against one gunicorn per variant.

    Each round measures every non-baseline variant V as baseline, V, V, baseline back to back, so
    load from other processes that drifts during the round cancels out of the pair's ratio. Returns
    (req/s samples per variant, per-round ratios to the baseline per variant).
    """
    servers = {}
    try:
        for variant in variants:
            servers[variant] = start_server(variant)
        for variant in variants:  # warm-up, discarded
            run_wrk(servers[variant][1], 1, connections)
        samples: dict[str, list[float]] = {v: [] for v in variants}
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        contenders = [v for v in variants if VARIANTS[v] != v]
        rng = random.Random(20240501)
        for r in range(rounds):
            rng.shuffle(contenders)
            for variant in contenders:
                base_port, port = servers[VARIANTS[variant]][1], servers[variant][1]
                b1 = run_wrk(base_port, seconds, connections)
                v1 = run_wrk(port, seconds, connections)
                v2 = run_wrk(port, seconds, connections)
                b2 = run_wrk(base_port, seconds, connections)
                samples[VARIANTS[variant]] += [b1, b2]
                samples[variant] += [v1, v2]
                ratios[variant].append((v1 + v2) / (b1 + b2))
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{v} x{ratios[v][-1]:.3f}" for v in contenders))
        for variant in variants:
            if VARIANTS[variant] == variant:
                ratios[variant] = [1.0]
        return samples, ratios
    finally:
        for proc, _ in servers.values():
            stop_server(proc)


def in_process_cost_us(repeats: int, calls: int) -> dict[str, float]:
    """Median microseconds per request added by the middleware, measured in this process."""
    from kotoba_memory_integrations._request import RequestRecorder
    from kotoba_memory_integrations.wsgi import MemoryMiddleware

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}

    def start_response(*args: Any) -> None:
        return None

    def drive(app: Callable[..., Iterable[bytes]]) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            result = app(dict(environ), start_response)
            for _chunk in result:
                pass
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return (time.perf_counter() - t0) / calls * 1e6

    wrapped = MemoryMiddleware(trivial_app, recorder=RequestRecorder())
    plain_times, wrapped_times = [], []
    for _ in range(repeats):
        plain_times.append(drive(trivial_app))
        wrapped_times.append(drive(wrapped))
    plain, mw = statistics.median(plain_times), statistics.median(wrapped_times)
    return {"plain_us": plain, "middleware_us": mw, "added_us": mw - plain}


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
    rounds = args.rounds or (2 if args.quick else 5)
    seconds = max(1, args.seconds or (1 if args.quick else 2))
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
        f" us/request -> middleware adds {cost['added_us']:.2f} us (median of repeats)"
    )
    if args.no_server:
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (bash scripts/bootstrap.sh installs it): skipping the server part")
        return 1
    setup = f"wrk -t1 -c{args.connections} -d{seconds}s, {rounds} ABBA rounds"
    print(f"gunicorn (1 sync worker per variant), {setup}")
    samples, ratios = server_benchmark(variants, rounds, seconds, args.connections)
    print(f"\n{'variant':24} {'median req/s':>12} {'baseline':>10} {'ratio':>7} {'overhead':>9}")
    for variant in variants:
        ratio = statistics.median(ratios[variant])
        rps = statistics.median(samples[variant])
        print(f"{variant:24} {rps:12.0f} {VARIANTS[variant]:>10} {ratio:7.3f} {100 * (1 - ratio):8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
