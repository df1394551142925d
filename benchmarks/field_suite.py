"""Leak-detection field suite: realistic web apps under real servers and load, verdicts vs ground truth.

Each app in benchmarks/field_apps/ runs under gunicorn (several gthread workers) with kotoba-memory
attached, driven by wrk picking each request's route at random. On shutdown every worker dumps its
profiler analysis. Ground truth is not assumed: every route is replayed in a separate process under
full tracemalloc (three equal batches of requests, after a pause longer than the session expiry), and a
route leaks at the application lines whose retained bytes grow in both batches.

    .venv/bin/python benchmarks/field_suite.py                  # every app, 60 s of load each
    .venv/bin/python benchmarks/field_suite.py --duration 30 --only flask_shop --json out.json

Per app: is the top suspect of every worker a real leak, at its line and with its route; how many
suspects at confidence >= 0.8 are not real leaks; how many are sited in kotoba-memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
APPS_DIR = REPO / "benchmarks" / "field_apps"
OWN_DIRS = (str(REPO / "core" / "kotoba_memory") + os.sep, str(REPO / "kotoba_memory_integrations") + os.sep)
CONFIDENT = 0.8
REPLAY_BATCH = 150
CONNECTIONS = 16  # wrk connections: enough that every worker accepts some (keep-alive pins them)
REPLAY_WARM_UP = 400  # more requests than any size-bounded structure in the apps holds (at most 300)
# Bytes a line must retain per request in both batches to count as leaking. The catalogue's memo keeps
# the key string its routing line splits off (58 B a /lookup request); no churning route of the four
# apps retains even 8 B a request in both batches, so anything from 8 B up would separate them.
REPLAY_FLOOR_BYTES = 32


@dataclass(frozen=True)
class Route:
    """A route as the middleware names it, and how to make a request path for it."""

    template: str
    prefix: str
    arg: bool  # append a random number to the prefix


@dataclass(frozen=True)
class App:
    """One field app: its factory, its routes, whether its leaks are on, and the server it runs under."""

    name: str
    target: str  # module:factory() (a WSGI app for gunicorn, an ASGI app for uvicorn)
    routes: tuple[Route, ...]
    leaks_on: bool
    server: str = "gunicorn"  # or "uvicorn"
    default: bool = True  # run when no --only is given


_SHOP_ROUTES = (
    Route("/", "/", False),
    Route("/products/<int:sku>", "/products/", True),
    Route("/recent", "/recent", False),
    Route("/session/<sid>", "/session/", True),
    Route("/render/<int:n>", "/render/", True),
    Route("/audit/<int:user>", "/audit/", True),
    Route("/query/<int:n>", "/query/", True),
    Route("/report/<int:n>", "/report/", True),
    Route("/orders/<int:n>", "/orders/", True),
    Route("/subscribe/<int:n>", "/subscribe/", True),
)
_CATALOG_ROUTES = (
    Route("/", "/", False),
    Route("/products/<sku>", "/products/", True),
    Route("/recent", "/recent", False),
    Route("/session/<sid>", "/session/", True),
    Route("/render/<n>", "/render/", True),
    Route("/audit/<user>", "/audit/", True),
    Route("/report/<n>", "/report/", True),
    Route("/lookup/<key>", "/lookup/", True),
)
_FORUM_ROUTES = (
    Route("/", "/", False),
    Route("/products/<int:sku>", "/products/", True),
    Route("/recent", "/recent", False),
    Route("/session/<str:sid>", "/session/", True),
    Route("/render/<int:n>", "/render/", True),
    Route("/cache/<int:n>", "/cache/", True),
    Route("/audit/<int:user>", "/audit/", True),
    Route("/report/<int:n>", "/report/", True),
    Route("/notify/<int:n>", "/notify/", True),
)
_FEED_ROUTES = (
    Route("/", "/", False),
    Route("/products/{sku:int}", "/products/", True),
    Route("/recent", "/recent", False),
    Route("/session/{sid}", "/session/", True),
    Route("/render/{n:int}", "/render/", True),
    Route("/feed/{n:int}", "/feed/", True),
    Route("/fanout/{n:int}", "/fanout/", True),
    Route("/audit/{user:int}", "/audit/", True),
    Route("/report/{n:int}", "/report/", True),
)
APPS = {
    app.name: app
    for app in (
        App("flask_shop", "benchmarks.field_apps.flask_shop:create_app()", _SHOP_ROUTES, True),
        App("django_forum", "benchmarks.field_apps.django_forum:create_app()", _FORUM_ROUTES, True),
        App("asgi_feed", "benchmarks.field_apps.asgi_feed:create_app()", _FEED_ROUTES, False, "uvicorn"),
        App("wsgi_catalog", "benchmarks.field_apps.wsgi_catalog:create_app()", _CATALOG_ROUTES, True),
        App("wsgi_catalog_no_leak", "benchmarks.field_apps.wsgi_catalog:create_app()", _CATALOG_ROUTES,
            False, default=False),
    )
}


@dataclass
class Result:
    """What the profiler said in each worker, judged against the replayed ground truth."""

    app: str
    truth: dict[str, list[str]]  # route template -> leaking sites (file:line)
    workers: list[dict[str, Any]] = field(default_factory=list)
    top_right: bool = False
    confident_false: int = 0
    own_sited: int = 0
    requests: int = 0
    error: str | None = None


# ---------------------------------------------------------------------- ground truth
def _grouped() -> dict[str, int]:
    """Traced bytes now, by the innermost frame inside the field apps (raw traces: innermost first)."""
    apps = str(APPS_DIR)
    by_key: dict[Any, int] = {}
    for _domain, size, frames, *_ in tracemalloc._get_traces():  # type: ignore[attr-defined]
        by_key[frames] = by_key.get(frames, 0) + size
    sizes: dict[str, int] = {}
    for frames, size in by_key.items():
        for filename, lineno in frames:
            if filename.startswith(apps):
                site = f"{filename}:{lineno}"
                sizes[site] = sizes.get(site, 0) + size
                break
    return sizes


def replay(app: App, only: str | None = None) -> dict[str, list[str]]:
    """Ground truth, in this process: per route (``only``: that route template alone), the app lines
    retaining >= REPLAY_FLOOR_BYTES per request in both of two batches of REPLAY_BATCH requests after a
    warm-up (each snapshot after a pause past expiry and a full collection)."""
    os.environ["FIELD_PROFILE"] = "0"
    os.environ["FIELD_LEAKS"] = "1" if app.leaks_on else "0"
    sys.path.insert(0, str(REPO))
    from werkzeug.test import Client

    from benchmarks.field_apps import churn

    module_name, factory = app.target.split(":")
    module = __import__(module_name, fromlist=["_"])
    made = getattr(module, factory.rstrip("()"))()
    client = _AsgiClient(made) if app.server == "uvicorn" else Client(made)
    get = client.get
    rng = random.Random(1)
    tracemalloc.start(8)
    truth: dict[str, list[str]] = {}
    for route in app.routes:
        if only is not None and route.template != only:
            continue

        def batch(size: int = REPLAY_BATCH, route: Route = route) -> None:
            for _ in range(size):
                path = route.prefix + (str(rng.randrange(10**9)) if route.arg else "")
                response = get(path)
                assert response.status_code == 200, (path, response.status_code)
                response.close()
            time.sleep(max(churn.SESSION_TTL_S, 1.0) + 0.1)  # past every expiry (the feed's TTL: 1 s)
            get(route.prefix + ("0" if route.arg else "")).close()  # lets expiry purge
            gc.collect()  # cyclic garbage awaiting the collector is not retained

        batch(REPLAY_WARM_UP)
        snaps = [_grouped()]
        for _ in range(2):
            batch()
            snaps.append(_grouped())
        floor = REPLAY_FLOOR_BYTES * REPLAY_BATCH
        truth[route.template] = sorted(
            site
            for site in snaps[2]
            if snaps[1].get(site, 0) - snaps[0].get(site, 0) >= floor
            and snaps[2].get(site, 0) - snaps[1].get(site, 0) >= floor
        )
    tracemalloc.stop()
    if isinstance(client, _AsgiClient):
        client.close()
    return truth


class _AsgiResponse:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code

    def close(self) -> None:
        """Nothing to release: the body was consumed."""


class _AsgiClient:
    """Calls an ASGI app in this process, one GET at a time, on one event loop (lifespan included)."""

    def __init__(self, app: Any) -> None:
        import asyncio

        self.app = app
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._lifespan_startup())

    async def _lifespan_startup(self) -> None:
        import asyncio

        self._messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        messages = self._messages
        await messages.put({"type": "lifespan.startup"})
        started = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set()

        # The app serves lifespan until shutdown, which never comes here: run it as a task.
        self._lifespan = asyncio.ensure_future(
            self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, messages.get, send)
        )
        await asyncio.wait_for(started.wait(), 10)

    def get(self, path: str) -> _AsgiResponse:
        return self.loop.run_until_complete(self._get(path))

    def close(self) -> None:
        """Lifespan shutdown, then the loop closes."""
        self._messages.put_nowait({"type": "lifespan.shutdown"})
        self.loop.run_until_complete(self._lifespan)
        self.loop.close()

    async def _get(self, path: str) -> _AsgiResponse:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"host", b"replay")], "client": ("127.0.0.1", 1),
            "server": ("replay", 80),
        }
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, send)
        return _AsgiResponse(status)


# ---------------------------------------------------------------------- load run
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wrk_script(app: App, path: Path) -> None:
    entries = ", ".join(f'{{"{r.prefix}", {"true" if r.arg else "false"}}}' for r in app.routes)
    path.write_text(
        f"local routes = {{{entries}}}\n"
        "local counter = 0\n"
        "function init(args)\n  counter = counter + 1\n  math.randomseed(os.time() * 1000 + counter)\nend\n"
        "request = function()\n  local r = routes[math.random(#routes)]\n"
        "  local path = r[1]\n  if r[2] then path = path .. math.random(1000000000) end\n"
        # One request in 20 closes its connection: keep-alive would pin every connection to the worker
        # that accepted it first (one worker once served everything); reconnecting spreads the load.
        '  if math.random(20) == 1 then return wrk.format("GET", path, {["Connection"] = "close"}) end\n'
        '  return wrk.format("GET", path)\nend\n',
        encoding="utf-8",
    )


def run_app(app: App, duration: float, workers: int, truth: dict[str, list[str]]) -> Result:
    """Serve ``app`` under gunicorn, load it with wrk for ``duration`` s, collect and judge the dumps."""
    result = Result(app.name, truth)
    with tempfile.TemporaryDirectory(prefix="field-") as tmp:
        work = Path(tmp)
        port = _free_port()
        env = dict(os.environ)
        env.update(
            FIELD_BIND=f"127.0.0.1:{port}", FIELD_WORKERS=str(workers), FIELD_OUT=str(work),
            FIELD_LEAKS="1" if app.leaks_on else "0", PYTHONPATH=str(REPO),
        )
        env.pop("FIELD_PROFILE", None)
        cmd = _server_command(app, port, workers)
        server = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_ready(server, port)
            script = work / "routes.lua"
            _wrk_script(app, script)
            wrk = subprocess.run(
                ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{int(duration)}s", "--timeout", "5s", "-s",
                 str(script), f"http://127.0.0.1:{port}/"],
                capture_output=True, text=True, check=True,
            )
            for line in wrk.stdout.splitlines():
                if "requests in" in line:
                    result.requests = int(line.split()[0])
        finally:
            stop_server(server)
            log = server.stdout.read().decode(errors="replace") if server.stdout else ""
        dumps = sorted(work.glob("worker-*.json"))
        if not dumps:
            result.error = f"no worker dumped its analysis; server log:\n{log[-2000:]}"
            return result
        for dump in dumps:
            result.workers.append(json.loads(dump.read_text(encoding="utf-8")))
    judge(result)
    return result


def _server_command(app: App, port: int, workers: int) -> list[str]:
    """gunicorn (gthread workers, see field_apps/gunicorn_conf.py) or uvicorn with worker processes."""
    bin_dir = Path(sys.executable).parent
    if app.server == "uvicorn":
        module, factory = app.target.split(":")
        return [
            str(bin_dir / "uvicorn"), "--factory", f"{module}:{factory.rstrip('()')}", "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning",
            "--lifespan", "on", "--timeout-graceful-shutdown", "20",
        ]
    return [str(bin_dir / "gunicorn"), "-c", str(APPS_DIR / "gunicorn_conf.py"), app.target]


def stop_server(server: subprocess.Popen[bytes], timeout: float = 40.0) -> None:
    """SIGTERM the server's process group (its workers dump on exit), SIGKILL it after ``timeout`` s."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_ready(server: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if server.poll() is not None:
            out = server.stdout.read().decode(errors="replace") if server.stdout else ""
            raise RuntimeError(f"server exited early ({server.returncode}):\n{out}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(1.0)  # every worker booted
                return
        time.sleep(0.2)
    raise RuntimeError("server did not come up in 45 s")


def is_own(leak: dict[str, Any]) -> bool:
    """Sited in kotoba-memory (core or integrations)?"""
    return str(leak.get("allocation_site", "")).startswith(OWN_DIRS)


def served(worker: dict[str, Any]) -> int:
    """Requests the worker's profiler saw."""
    return sum(int(route.get("requests", 0)) for route in worker.get("routes") or [])


def judge(result: Result) -> None:
    """Fill in top_right / confident_false / own_sited from the workers' suspects."""
    leak_sites = {site: route for route, sites in result.truth.items() for site in sites}
    tops: list[bool] = []
    for worker in result.workers:
        leaks = worker.get("memory_leaks") or []
        for leak in leaks:
            real = leak["allocation_site"] in leak_sites
            if leak["confidence"] >= CONFIDENT and not real:
                result.confident_false += 1
            if is_own(leak):
                result.own_sited += 1
        status = worker.get("leak_status") or {}
        if not status.get("ready") or not served(worker):
            continue  # no verdict, or a worker the load balancer left idle: nothing to judge
        if leak_sites:
            top = leaks[0] if leaks else None
            tops.append(
                top is not None
                and top["allocation_site"] in leak_sites
                and top.get("route") == leak_sites[top["allocation_site"]]
            )
        else:
            tops.append(not any(leak["confidence"] >= CONFIDENT for leak in leaks))
    result.top_right = bool(tops) and all(tops)


def _ground_truth(app: App) -> dict[str, list[str]]:
    """Each route replayed alone in a fresh process, twice as many at once as there are cores (each
    replay sleeps for about half its time, waiting out the apps' expiry)."""

    def one(route: Route) -> dict[str, list[str]]:
        out = subprocess.run(
            [sys.executable, __file__, "--replay", app.name, "--route", route.template], cwd=REPO,
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
        )
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    with ThreadPoolExecutor(max_workers=max(1, min(len(app.routes), 2 * (os.cpu_count() or 1)))) as pool:
        truth: dict[str, list[str]] = {}
        for part in pool.map(one, app.routes):
            truth.update(part)
    return truth


def _short(site: str) -> str:
    return site.replace(str(REPO) + os.sep, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per app")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--only", nargs="*", choices=sorted(APPS), help="run only these apps")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--replay", help=argparse.SUPPRESS)
    parser.add_argument("--route", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replay:
        print(json.dumps(replay(APPS[args.replay], args.route)))
        return 0
    results = []
    for name in args.only or [name for name, app in APPS.items() if app.default]:
        app = APPS[name]
        truth = _ground_truth(app)
        result = run_app(app, args.duration, args.workers, truth)
        results.append(result)
        leaking = {r: [_short(s) for s in sites] for r, sites in truth.items() if sites}
        print(f"{name}: {result.requests} requests; ground truth leaks: {leaking or 'none'}")
        if result.error:
            print(f"  ERROR {result.error}")
        for worker in result.workers:
            status = worker.get("leak_status") or {}
            print(f"  worker {worker['pid']}: {served(worker)} requests; {status.get('message')}")
            for leak in worker.get("memory_leaks", [])[:6]:
                mark = "REAL" if any(leak["allocation_site"] in s for s in truth.values()) else "not"
                print(f"    [{mark}] {_short(leak['allocation_site'])} route {leak.get('route')} "
                      f"conf {leak['confidence']:.2f}")
        print(f"  top suspect right: {result.top_right}; confident false positives: "
              f"{result.confident_false}; sited in kotoba-memory: {result.own_sited}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2), encoding="utf-8")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
