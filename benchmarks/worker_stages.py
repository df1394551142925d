"""Where a gunicorn worker spends the per-request microseconds that kotoba-memory adds.

Each stage of the request path (the recorder's begin and finish, the ``/proc`` RSS read, delivery to the
profiler and listeners, the GC optimizer's between-request hook) is wrapped with a timer inside a real
gunicorn worker (one sync worker, a bare Flask view, wrk on 127.0.0.1), and so are the whole middleware
call and the response's close, with the same wrappers around the bare app for the baseline. The
worker writes its totals when it exits; the table gives microseconds of the worker thread's CPU time
per request (``time.thread_time_ns``: preemption by other processes is not counted; each timed call
adds the cost of two clock reads, printed as "timer cost per timed call" and not subtracted). With the
C recorder (the default where built) its finish and delivery run inside the response's close and are
not timed apart; ``KOTOBA_MEMORY_PURE_PYTHON=1`` in the environment times the pure-Python stages.

    .venv/bin/python benchmarks/worker_stages.py            # ~1 minute
    .venv/bin/python benchmarks/worker_stages.py --seconds 5 --rounds 3
    .venv/bin/python benchmarks/worker_stages.py --delay-ms 5   # a worker below saturation (cold caches)

The module doubles as the gunicorn app and config (``KOTOBA_STAGES_MODE``: bare, metrics, defaults).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("bare", "metrics", "defaults")  # metrics: KotobaMemory(autostart=False), no optimizer
_clock = time.thread_time_ns
TOTALS: dict[str, list[int]] = {}


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    acc = TOTALS.setdefault(label, [0, 0])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = _clock()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += _clock() - t0
            acc[1] += 1

    return wrapper


class _Body:
    def __init__(self, result: Iterable[bytes], label: str) -> None:
        self.result, self.close_timer = result, TOTALS.setdefault(label, [0, 0])

    def __iter__(self) -> Any:
        return iter(self.result)

    def close(self) -> None:
        t0 = _clock()
        close = getattr(self.result, "close", None)
        if close is not None:
            close()
        self.close_timer[0] += _clock() - t0
        self.close_timer[1] += 1


def _wrap_app(app: Callable[..., Any], label: str) -> Callable[..., Any]:
    call = _timed(label, app)

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return _Body(call(environ, start_response), label + ".close")

    return wsgi


def _install_stage_timers() -> None:
    from kotoba_memory.gc_optimizer.optimizer import GcOptimizer
    from kotoba_memory.memory_profiler.profiler import MemoryProfiler
    from kotoba_memory.process.memory import RssReader
    from kotoba_memory_integrations import request

    if request.RequestRecorder is request.PyRequestRecorder:  # KOTOBA_MEMORY_PURE_PYTHON=1 or not built
        stages = [
            (request.PyRequestMeasurement, "__init__", "recorder begin"),
            (request.PyRequestMeasurement, "finish", "recorder finish"),
            (request.PyRequestRecorder, "deliver", "  of which deliver"),
        ]
    else:  # the C recorder: its finish and delivery run inside the C body's close, untimed apart
        stages = [(request.RequestRecorder, "begin", "recorder begin (C)")]
    for owner, name, label in (
        *stages,
        (RssReader, "rss", "  of which /proc RSS read"),
        (MemoryProfiler, "record_request", "    of which profiler.record_request"),
        (GcOptimizer, "request_ended", "  of which GC request_ended"),
    ):
        setattr(owner, name, _timed(label, getattr(owner, name)))


def create_app() -> Any:
    """gunicorn entry point: a one-view Flask app, as ``KOTOBA_STAGES_MODE`` says."""
    from flask import Flask

    mode = os.environ.get("KOTOBA_STAGES_MODE", "bare")
    app = Flask("stages")
    app.add_url_rule("/", "index", lambda: "ok")
    inner = app.wsgi_app
    if mode == "bare":
        app.wsgi_app = _wrap_app(_wrap_app(inner, "app"), "middleware")  # type: ignore[method-assign]
        return app
    from kotoba_memory_integrations.flask import KotobaMemory

    _install_stage_timers()
    KotobaMemory(app, autostart=mode == "defaults")
    middleware = app.wsgi_app
    middleware.app = _wrap_app(middleware.app, "app")  # type: ignore[attr-defined]
    app.wsgi_app = _wrap_app(middleware, "middleware")  # type: ignore[method-assign]
    return app


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: write this worker's totals (those of the app module, not of this config copy)."""
    import worker_stages

    with open(os.environ["KOTOBA_STAGES_OUT"], "w") as f:
        json.dump(worker_stages.TOTALS, f)


def run_mode(mode: str, seconds: int, connections: int, delay_ms: float = 0.0) -> dict[str, list[int]]:
    sys.path.insert(0, str(HERE))
    from middleware_overhead import _servers, run_wrk, stop_server, wrk_pacing

    servers = _servers()

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "totals.json")
        script = None
        if delay_ms > 0:  # each connection waits between requests: a worker below saturation
            script = os.path.join(tmp, "paced.lua")
            with open(script, "w") as f:
                f.write(wrk_pacing(delay_ms))
        port = servers.free_port()
        env = dict(os.environ, KOTOBA_STAGES_MODE=mode, KOTOBA_STAGES_OUT=out, PYTHONPATH=str(HERE))
        cmd = [
            sys.executable, "-m", "gunicorn", "-c", str(HERE / "worker_stages.py"), "--bind",
            f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "sync", "--log-level", "warning",
            "worker_stages:create_app()",
        ]
        proc = subprocess.Popen(cmd, env=env, cwd=HERE, start_new_session=True)
        try:
            servers.wait_ready(servers.Server(proc, port, Path(os.devnull)), timeout=30.0, status=None)
            run_wrk(port, 1, connections, script)  # warm-up (counted too; the table divides by all requests)
            run_wrk(port, seconds, connections, script)
        finally:
            stop_server(proc)
        with open(out) as f:
            totals: dict[str, list[int]] = json.load(f)
        return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three modes, interleaved")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="each wrk connection waits this long between requests (a paced worker)")
    args = parser.parse_args(argv)
    per_mode: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            totals = run_mode(mode, args.seconds, args.connections, args.delay_ms)
            n = max(1, totals["middleware"][1])
            per_mode[mode].append({k: ns / n / 1000 for k, (ns, _calls) in totals.items()})
    labels = list(dict.fromkeys(k for runs in per_mode.values() for run in runs for k in run))
    print(
        f"worker CPU us per request, median of {args.rounds} rounds "
        f"(one sync gunicorn worker, wrk -c{args.connections}"
        + (f", {args.delay_ms:g} ms between a connection's requests)" if args.delay_ms > 0 else ")")
    )
    print(f"{'stage':40} " + " ".join(f"{m:>9}" for m in MODES))
    for label in labels:
        cells = []
        for mode in MODES:
            values = [run[label] for run in per_mode[mode] if label in run]
            cells.append(f"{statistics.median(values):9.2f}" if values else f"{'-':>9}")
        print(f"{label:40} " + " ".join(cells))
    print("middleware = the whole call into the app's WSGI callable; app = the Flask app inside it")
    probe = _timed("probe", lambda: None)
    t0 = _clock()
    for _ in range(20000):
        probe()
    print(f"timer cost per timed call: {(_clock() - t0) / 20000 / 1000:.2f} us (in this process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
