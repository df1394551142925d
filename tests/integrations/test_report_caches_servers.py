"""The examples under gunicorn with wrk load: the report names the caches each app really uses (Django
``CACHES``, Flask-Caching, ``@cached``, SQLAlchemy ``QueryCache``) with their real, nonzero hit counts,
and no idle cache of the optimizer's own when the app never asks for one."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
TOKEN = "report-caches-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _env(data_dir: Path, port: int) -> dict[str, str]:
    return example_servers.example_env(data_dir, port, token=TOKEN, workers=2)


def _load(base: str, paths: list[str], tmp: Path) -> None:
    example_servers.load_routes(base, paths, tmp, connections=8)


def _poll(server: servers.Server, check: Any, *, as_json: bool, timeout: float = 40.0) -> Any:
    """The report once ``check(report)`` holds: each request may reach another worker (and wrk's
    connections may all have landed on one), so ask until the worker that served the load answers."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        params = {"format": "json"} if as_json else {}
        answer = httpx.get(server.base + "/_kotoba/report", params=params, headers=AUTH, timeout=30)
        assert answer.status_code == 200, answer.text
        last = answer.json() if as_json else answer.text
        if check(last):
            return last
        time.sleep(0.2)
    pytest.fail(f"the report never listed the expected caches; last:\n{last}\n{server.log()}")


def _line_of(text: str, start: str) -> str:
    """The line of ``text`` that starts (after indentation) with ``start``; "" when there is none."""
    return next((line.strip() for line in text.splitlines() if line.strip().startswith(start)), "")


def _by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in data.get("caches") or []}


def test_flask_example_report_lists_flask_caching_cached_and_query_cache(tmp_path: Path) -> None:
    port = servers.free_port()
    cmd = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"]
    with servers.serve(cmd, cwd=EXAMPLES / "flask_app", env=_env(tmp_path, port), port=port) as server:
        _load(server.base, ["/books", "/books/7", "/books/42", "/stats", "/checksum/300"], tmp_path)

        def busy(data: dict[str, Any]) -> bool:
            caches = _by_name(data)
            names = ("flask-caching:app", "example-flask-queries", "kotoba-memory")
            return all(int(caches.get(n, {}).get("hits") or 0) > 0 for n in names)

        data = _poll(server, busy, as_json=True)
        line = "flask-caching:app (CacheManager): "
        text = _poll(server, lambda t: "lookups hit" in _line_of(t, line), as_json=False)
    caches = _by_name(data)
    assert caches["flask-caching:app"]["uses"] == ["Flask-Caching KotobaCache"]
    [view] = caches["example-flask-queries"]["views"]
    assert view["label"] == "SQLAlchemy QueryCache" and view["name"] == "example-flask" and view["hits"] > 0
    own = caches["kotoba-memory"]
    assert "MemoryOptimizer (optimizer.cache)" in own["uses"]
    assert "@cached app.checksum_chain" in own["uses"]
    for row in caches.values():  # the hit rate shown is the cache's own counters, not a placeholder
        lookups = row["hits"] + row["misses"]
        assert lookups == 0 or row["hit_rate"] == pytest.approx(row["hits"] / lookups)
    # The fleet totals sum each cache over the workers that have it.
    across = {row["name"]: row for row in data["fleet"]["caches"]}
    assert across["flask-caching:app"]["hits"] >= caches["flask-caching:app"]["hits"]
    assert _line_of(text, line).endswith("used by Flask-Caching KotobaCache")
    queries = _line_of(text, "example-flask-queries (CacheManager): ")
    assert "used by SQLAlchemy QueryCache 'example-flask' (" in queries and "queries hit" in queries


def test_django_example_report_lists_its_caches_backend_and_no_idle_cache(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=EXAMPLES / "django_app",
        env=_env(tmp_path, 0), check=True, timeout=120,
    )
    port = servers.free_port()
    cmd = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "exampleproject.wsgi"]
    with servers.serve(cmd, cwd=EXAMPLES / "django_app", env=_env(tmp_path, port), port=port) as server:
        _load(server.base, ["/books/", "/books/4/", "/books/9/", "/stats/", "/async/books/5/"], tmp_path)

        def busy(data: dict[str, Any]) -> bool:
            return int(_by_name(data).get("django:example-django", {}).get("hits") or 0) > 0

        data = _poll(server, busy, as_json=True)
        line = "django:example-django (CacheManager): "
        text = _poll(server, lambda t: "lookups hit" in _line_of(t, line), as_json=False)
    caches = _by_name(data)
    django_cache = caches["django:example-django"]
    assert django_cache["uses"] == ["Django CACHES 'default'"]
    assert django_cache["entries"] > 0 and django_cache["max_bytes"] > 0
    # The settings turn caching on but nothing uses optimizer.cache: no idle cache is built or shown.
    assert "kotoba-memory" not in caches and data["cache"] is None
    assert data["stats"]["efficiency_basis"] == "rss/peak"
    assert _line_of(text, line).endswith("used by Django CACHES 'default'")
    assert "kotoba-memory (CacheManager)" not in text


@pytest.mark.redis
def test_django_example_over_redis_counts_the_shared_store_once_across_workers(
    tmp_path: Path, restartable_redis: Any
) -> None:
    """Three workers share one near-cache namespace in Redis: the fleet view counts its keys once, not
    once per worker that uses it (at least two of the three, since the kernel picks who accepts)."""
    import redis

    port = servers.free_port()
    env = example_servers.example_env(tmp_path, port, token=TOKEN, workers=3)
    env.update(KOTOBA_EXAMPLE_REDIS_URL=restartable_redis.url)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=EXAMPLES / "django_app", env=env,
                   check=True, timeout=120)
    cmd = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "exampleproject.wsgi"]
    raw = redis.Redis.from_url(restartable_redis.url)
    try:
        with servers.serve(cmd, cwd=EXAMPLES / "django_app", env=env, port=port) as server:
            _load(server.base, [f"/books/{i}/" for i in range(1, 30)] + ["/books/", "/stats/"], tmp_path)
            for i in range(60):  # a new connection each: wrk's may all have landed on one worker
                answer = httpx.get(f"{server.base}/books/{1 + i % 29}/", headers={"Connection": "close"})
                assert answer.status_code == 200

            def book(i: int) -> int:
                with httpx.Client(headers={"Connection": "close"}) as client:
                    return client.get(f"{server.base}/books/{1 + i % 29}/").status_code

            def shared_by_several(data: dict[str, Any]) -> bool:
                rows = [r for r in (data.get("fleet") or {}).get("caches") or [] if r.get("shared")]
                if rows and rows[0]["processes"] >= 2 and rows[0]["entries"] > 0:
                    return True
                # Not yet: keep the books coming, twelve at once so that no one worker takes them all.
                # Under CI's load one worker once won none of the 60 sequential accepts above, nor of
                # those that followed (the kernel wakes the most recently active worker first), and
                # the namespace's keys expire meanwhile.
                with ThreadPoolExecutor(12) as pool:
                    assert set(pool.map(book, range(12))) == {200}
                return False

            data = _poll(server, shared_by_several, as_json=True, timeout=60)
            [shared] = [r for r in data["fleet"]["caches"] if r.get("shared")]
            namespace_keys = [k for k in raw.scan_iter(match=b"kotoba:*") if b"\x00\xff" not in k]
            # Each worker read the same keys; a sum would be at least twice as many.
            assert 0 < shared["entries"] <= len(namespace_keys) + 5, (shared, len(namespace_keys))
            assert shared["type"] == "NearCache" and shared["hits"] > 0
    finally:
        raw.close()
