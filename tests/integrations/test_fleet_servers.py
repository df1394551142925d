"""The fleet under real servers: the examples with 3 gunicorn workers (booted repeatedly, under wrk load),
a killed worker, ``--preload`` with and without kotoba-memory's hooks, uvicorn ``--workers`` and the
management command run beside the server. The report must list exactly the server's live workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import example_servers  # tests/integrations/example_servers.py
import pytest
import servers  # tools/servers.py (tests/conftest.py puts tools/ on sys.path)

pytest.importorskip("gunicorn")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.usefixtures("wrk")]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
TOKEN = "fleet-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOOTS = 3


def example_env(data_dir: Path, port: int) -> dict[str, str]:
    return example_servers.example_env(data_dir, port, token=TOKEN, workers=3)


def load(base: str, paths: list[str], tmp: Path) -> None:
    example_servers.load_routes(base, paths, tmp)


def report(base: str) -> dict[str, Any]:
    answer = httpx.get(base + "/_kotoba/report", params={"format": "json"}, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def workers_of(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {int(row["pid"]): row for row in data["workers"] if row["role"] == "worker"}


def wait_for_report(server: servers.Server, check: Any, timeout: float = 40.0) -> dict[str, Any]:
    """Poll the report (each request may reach another worker) until ``check(data)`` holds."""
    deadline = time.monotonic() + timeout
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        data = report(server.base)
        if check(data):
            return data
        time.sleep(0.3)
    pytest.fail(f"report never satisfied the check; last workers: {data.get('workers')}\n{server.log()}")


def lists_exactly_the_live_workers(server: servers.Server, count: int = 3) -> Any:
    def check(data: dict[str, Any]) -> bool:
        live = server.workers()
        return len(live) == count and sorted(workers_of(data)) == live

    return check


def assert_sane_rows(data: dict[str, Any], count: int = 3) -> None:
    rows = workers_of(data)
    assert len(rows) == count
    for pid, row in rows.items():
        assert 20 << 20 < row["rss_bytes"] < 1 << 30, (pid, row["rss_bytes"])
        assert row["peak_rss_bytes"] >= row["rss_bytes"] * 0.5
        # A worker lists the caches it has built so far (Django builds CACHES on first use).
        assert row["optimizer"] is True and row["gc"] is not None and isinstance(row["caches"], list), row
    assert data["fleet"]["workers"] == count
    assert data["fleet"]["worker_rss_bytes"] == sum(r["rss_bytes"] for r in rows.values())


def test_flask_example_boots_and_serves_with_3_workers_every_time(tmp_path: Path) -> None:
    for boot in range(BOOTS):  # a fresh, empty database each time: the case where workers used to race
        data_dir = tmp_path / f"boot{boot}"
        data_dir.mkdir()
        port = servers.free_port()
        cmd = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"]
        env = example_env(data_dir, port)
        with servers.serve(cmd, cwd=EXAMPLES / "flask_app", env=env, port=port) as server:
            assert httpx.get(server.base + "/books/3", timeout=10).json()["id"] == 3
            load(server.base, ["/", "/books", "/books/7", "/stats", "/checksum/300"], tmp_path)
            data = wait_for_report(server, lists_exactly_the_live_workers(server))
            assert_sane_rows(data)
            text = httpx.get(server.base + "/_kotoba/report", headers=AUTH, timeout=30).text
            assert "workers: 3 (3 processes)" in text
            assert all(f"pid {pid} (worker)" in text for pid in server.workers())
            log = server.log()
        assert "Worker failed to boot" not in log and "already exists" not in log, log


def test_a_killed_worker_leaves_the_report_and_its_successor_joins(tmp_path: Path) -> None:
    port = servers.free_port()
    cmd = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"]
    with servers.serve(cmd, cwd=EXAMPLES / "flask_app", env=example_env(tmp_path, port), port=port) as server:
        before = wait_for_report(server, lists_exactly_the_live_workers(server))
        victim = sorted(workers_of(before))[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (victim in server.workers() or len(server.workers()) < 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert victim not in server.workers() and len(server.workers()) == 3  # the master respawned one
        after = wait_for_report(server, lists_exactly_the_live_workers(server))
        assert victim not in workers_of(after)
        assert_sane_rows(after)
        spool = Path(after["fleet"]["spool"])
        assert spool.parent == tmp_path / "fleet"
        assert not (spool / f"{victim}.json").exists()  # pruned, not merely hidden
        assert sorted(int(p.stem) for p in spool.glob("*.json")) == server.workers()


@pytest.fixture()
def django_data(tmp_path: Path) -> Path:
    return tmp_path


def migrate(data_dir: Path) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=EXAMPLES / "django_app",
        env=example_env(data_dir, 0), check=True, timeout=120,
    )


def test_django_example_boots_with_3_workers_every_time_and_the_command_sees_them(tmp_path: Path) -> None:
    for boot in range(BOOTS):
        data_dir = tmp_path / f"boot{boot}"
        data_dir.mkdir()
        migrate(data_dir)  # the schema before serving, as the example's README says
        port = servers.free_port()
        env = example_env(data_dir, port)
        cmd = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "exampleproject.wsgi"]
        with servers.serve(cmd, cwd=EXAMPLES / "django_app", env=env, port=port) as server:
            load(server.base, ["/", "/books/", "/books/4/", "/stats/", "/async/books/5/"], tmp_path)
            data = wait_for_report(server, lists_exactly_the_live_workers(server))
            assert_sane_rows(data)
            if boot == 0:
                command = subprocess.run(
                    [sys.executable, "manage.py", "kotoba_memory_report", "--json"],
                    cwd=EXAMPLES / "django_app", env=env, check=True, capture_output=True, text=True,
                    timeout=120,
                )
                outside = json.loads(command.stdout)
                assert sorted(workers_of(outside)) == server.workers()
                assert outside["fleet"]["servers"] == [server.proc.pid]
                assert all(row["server"] == server.proc.pid for row in outside["workers"])
            log = server.log()
        assert "Worker failed to boot" not in log and "Traceback" not in log, log


PRELOAD_CONF = """
import os, sys
sys.path.insert(0, {example!r})
bind = os.environ["KOTOBA_EXAMPLE_BIND"]
workers = 3
worker_class = "gthread"
threads = 4
preload_app = True
{hooks}

def on_starting(server):
    from app import init_db
    init_db()
"""


def test_flask_example_under_preload_runs_an_optimizer_in_every_worker_without_hooks(tmp_path: Path) -> None:
    """``--preload`` without kotoba-memory's server hooks: the workers resume at their first request
    and from then on each worker's own background thread keeps its snapshot fresh."""
    conf = tmp_path / "preload.conf.py"
    conf.write_text(PRELOAD_CONF.format(example=str(EXAMPLES / "flask_app"), hooks=""))
    port = servers.free_port()
    cmd = [str(BIN / "gunicorn"), "-c", str(conf), "app:create_app()"]
    with servers.serve(cmd, cwd=EXAMPLES / "flask_app", env=example_env(tmp_path, port), port=port) as server:
        load(server.base, ["/", "/books", "/books/7"], tmp_path)
        first = wait_for_report(server, lists_exactly_the_live_workers(server))
        assert_sane_rows(first)
        masters = [row for row in first["workers"] if row["role"] == "master"]
        assert [row["pid"] for row in masters] == [server.proc.pid]  # the optimizer loaded in the master
        assert all(row["forks"] >= 1 for row in workers_of(first).values())
        seen = {pid: row["written_at"] for pid, row in workers_of(first).items()}
        # No more load: a newer snapshot from every worker can only come from its own scheduler thread.
        wait_for_report(
            server,
            lambda data: sorted(workers_of(data)) == sorted(seen)
            and all(row["written_at"] > seen[pid] + 1 for pid, row in workers_of(data).items()),
            timeout=30,
        )
        log = server.log()
    assert "nothing in this worker resumes it" not in log, log


BARE_APP = """
from kotoba_memory.config import MemoryConfig
from kotoba_memory_integrations import runtime

runtime.start_optimizer(MemoryConfig(enable_caching=False, monitoring_interval_ms=100))


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


@pytest.mark.parametrize("hooked", [False, True], ids=["no-hooks", "post_fork-hook"])
def test_preload_without_middleware_or_hook_says_why_nothing_runs(tmp_path: Path, hooked: bool) -> None:
    (tmp_path / "bare_app.py").write_text(BARE_APP)
    conf = tmp_path / "conf.py"
    hooks = "from kotoba_memory_integrations.runtime import post_fork, pre_fork" if hooked else ""
    conf.write_text(f"preload_app = True\nworkers = 2\n{hooks}\n")
    port = servers.free_port()
    cmd = [str(BIN / "gunicorn"), "-c", str(conf), "-b", f"127.0.0.1:{port}", "bare_app:application"]
    env = dict(os.environ, PYTHONPATH=str(tmp_path), KOTOBA_MEMORY_FLEET_DIR=str(tmp_path / "fleet"))
    with servers.serve(cmd, cwd=tmp_path, env=env, port=port) as server:
        deadline = time.monotonic() + 20
        while len(server.workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the workers' fork callbacks have run by now; give their output time to land
        log = server.log()
        workers = server.workers()
    assert len(workers) == 2
    warnings = [line for line in log.splitlines() if "nothing in this worker resumes it" in line]
    if hooked:
        assert warnings == [], log
    else:
        assert len(warnings) == 2, log
        assert {int(line.split("gunicorn worker ")[1].split()[0]) for line in warnings} == set(workers)
        assert "post_fork" in warnings[0] and "MemoryMiddleware" in warnings[0]


def test_django_asgi_under_uvicorn_workers_lists_every_worker(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    migrate(tmp_path)
    port = servers.free_port()
    cmd = [str(BIN / "uvicorn"), "exampleproject.asgi:application", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "3", "--log-level", "warning", "--lifespan", "off"]
    with servers.serve(cmd, cwd=EXAMPLES / "django_app", env=example_env(tmp_path, port), port=port,
                       timeout=90) as server:
        for book_id in (1, 2, 3):
            assert httpx.get(f"{server.base}/async/books/{book_id}/", timeout=10).json()["id"] == book_id

        def three_of_the_children(data: dict[str, Any]) -> bool:
            return len(workers_of(data)) == 3 and set(workers_of(data)) <= set(server.workers())

        data = wait_for_report(server, three_of_the_children, timeout=60)
        assert_sane_rows(data)
