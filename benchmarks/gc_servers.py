"""The Flask and Django examples under gunicorn + wrk, with the GC optimizer off (``default``) and on
(``adaptive``): requests per CPU-second of the worker, latency p99 and the worker's peak RSS.

Each (app, variant) runs in its own fresh gunicorn (one gthread worker, 4 threads) on a private SQLite
file; variants are interleaved in a rotating order and repeated; ratios are medians of per-round
ratios to the default of the same round. Everything else the examples enable (profiling, leak
detection, caches, metrics) stays on in both variants, so the difference is the GC optimizer's.

    .venv/bin/python benchmarks/gc_servers.py                 # 3 rounds x 8 s per run
    .venv/bin/python benchmarks/gc_servers.py --quick         # 1 round x 3 s
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
APPS = {
    # app: (directory, gunicorn target, URL path under load)
    "flask": ("flask_app", "app:create_app()", "/books"),
    "django": ("django_app", "exampleproject.wsgi", "/books/"),
}
VARIANTS = ("default", "adaptive")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200 (or the server dies, or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def worker_readings(master: psutil.Process) -> tuple[float, int]:
    """The worker's CPU seconds and peak RSS (VmHWM) in bytes."""
    (worker,) = master.children()
    times = worker.cpu_times()
    with open(f"/proc/{worker.pid}/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return times.user + times.system, hwm


def run_wrk(url: str, seconds: int, connections: int) -> tuple[int, float]:
    """One wrk run; returns (requests completed, latency p99 in ms)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert p99 is not None, out
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    return requests, float(p99.group(1)) * scale


def run_one(app: str, variant: str, seconds: int, connections: int, data_dir: Path) -> dict[str, Any]:
    """Serve ``app`` with ``variant`` in a fresh gunicorn, load it, return the worker's figures."""
    directory, target, path = APPS[app]
    port = free_port()
    env = dict(
        os.environ, KOTOBA_EXAMPLE_BIND=f"127.0.0.1:{port}", KOTOBA_EXAMPLE_DATA_DIR=str(data_dir),
        KOTOBA_EXAMPLE_GC="1" if variant == "adaptive" else "0", KOTOBA_EXAMPLE_LOGLEVEL="error",
    )
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", target], cwd=EXAMPLES / directory, env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}{path}"
        wait_ready(url, proc)
        run_wrk(url, 1, connections)  # warm-up: imports, caches, the optimizer's warm-up requests
        master = psutil.Process(proc.pid)
        cpu0, _ = worker_readings(master)
        requests, p99_ms = run_wrk(url, seconds, connections)
        cpu1, peak = worker_readings(master)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    cpu = cpu1 - cpu0
    return {
        "app": app, "variant": variant, "requests": requests, "req_per_s": requests / seconds,
        "req_per_cpu_s": requests / cpu if cpu > 0 else 0.0, "latency_p99_ms": p99_ms,
        "peak_rss_mb": peak / 2**20,
    }


def migrate_django(data_dir: Path) -> None:
    """Create the Django example's SQLite schema in ``data_dir``."""
    env = dict(os.environ, KOTOBA_EXAMPLE_DATA_DIR=str(data_dir))
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=EXAMPLES / "django_app", env=env, check=True,
    )


def paired_ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> float:
    """Median over rounds of run/default for ``key``."""
    ratios = [r[key] / b[key] for r, b in zip(runs, base) if b[key]]
    return statistics.median(ratios) if ratios else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s per run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--apps", default=",".join(APPS))
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (bash scripts/bootstrap.sh installs it)")
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (3 if args.quick else 8)
    apps = [a for a in args.apps.split(",") if a]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {a: {v: [] for v in VARIANTS} for a in apps}
    with tempfile.TemporaryDirectory(prefix="kotoba-gc-servers-") as tmp:
        for r in range(rounds):
            order = list(VARIANTS[r % 2:] + VARIANTS[: r % 2])
            for app in apps:
                for variant in order:
                    data_dir = Path(tmp) / f"{app}-{variant}-{r}"
                    data_dir.mkdir()
                    if app == "django":
                        migrate_django(data_dir)
                    res = run_one(app, variant, seconds, args.connections, data_dir)
                    results[app][variant].append(res)
                    print(
                        f"round {r + 1}/{rounds} {app:<7} {variant:<9} "
                        f"{res['req_per_cpu_s']:8.1f} req/CPU-s p99 {res['latency_p99_ms']:7.2f} ms "
                        f"peak {res['peak_rss_mb']:6.1f} MB",
                        file=sys.stderr,
                    )
    print(
        f"gunicorn (1 gthread worker, 4 threads), wrk -t1 -c{args.connections} -d{seconds}s, "
        f"{rounds} rounds"
    )
    print()
    print("| app | variant | req/s | req/CPU-s | x default | latency p99 ms | peak RSS MB | x default |")
    print("|---|---|---|---|---|---|---|---|")
    for app in apps:
        base = results[app]["default"]
        for variant in VARIANTS:
            runs = results[app][variant]
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("req_per_s", "req_per_cpu_s", "latency_p99_ms", "peak_rss_mb")}
            print(f"| {app} | {variant} | {med['req_per_s']:.0f} | {med['req_per_cpu_s']:.0f} "
                  f"| {paired_ratio(runs, base, 'req_per_cpu_s'):.2f} | {med['latency_p99_ms']:.2f} "
                  f"| {med['peak_rss_mb']:.1f} | {paired_ratio(runs, base, 'peak_rss_mb'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
