"""The near-cache under a real gunicorn with 3 workers (Django backend, ``REDIS_URL``) on a private Redis.

A write served by one worker reaches every worker; Redis paused (SIGSTOP) and killed mid-load costs no
request an error; after Redis restarts every worker serves what it holds. With and without
``--preload`` (the master's cache inherited by the workers).
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gunicorn")
httpx = pytest.importorskip("httpx")

from test_servers import free_port, serve  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(180)]

BIN = Path(sys.executable).parent
WORKERS = 3


def _ask(base: str, path: str, **params: str) -> dict[str, Any]:
    # a new connection per request spreads them over the workers
    response = httpx.get(base + path, params=params, timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _every_worker_serves(base: str, key: str, value: str, eventually: Callable[..., bool]) -> None:
    """Each worker (by pid) serves ``value`` eventually, and never an older value once it has."""
    converged: set[int] = set()
    seen: set[int] = set()

    def check() -> bool:
        answer = _ask(base, "/get", k=key)
        seen.add(answer["pid"])
        if answer["v"] == value:
            converged.add(answer["pid"])
        else:
            assert answer["pid"] not in converged, f"worker {answer['pid']} went back to {answer['v']!r}"
        return len(converged) == WORKERS

    assert eventually(check, timeout=60), (seen, converged)


@pytest.mark.parametrize("preload", [False, True], ids=["default", "preload"])
def test_three_workers_share_one_coherent_cache_through_faults(
    restartable_redis: Any, preload: bool, eventually: Callable[..., bool]
) -> None:
    port = free_port()
    cmd = [str(BIN / "gunicorn"), "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "near_app:application"]
    if preload:
        cmd.insert(1, "--preload")
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).parent),
        NEAR_REDIS_URL=restartable_redis.url,
        NEAR_NAMESPACE=f"gunicorn-{uuid.uuid4().hex[:8]}",
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    with serve(cmd, Path(__file__).parent, env, port) as base:
        _ask(base, "/set", k="k", v="v1")
        _every_worker_serves(base, "k", "v1", eventually)
        _ask(base, "/set", k="k", v="v2")  # one worker writes; the others hold v1 in L1
        _every_worker_serves(base, "k", "v2", eventually)

        restartable_redis.proc.send_signal(signal.SIGSTOP)
        try:
            answers = [_ask(base, "/getorset", k=f"paused-{i}") for i in range(40)]
        finally:
            restartable_redis.proc.send_signal(signal.SIGCONT)
        assert all(a["v"] in ("source",) for a in answers)

        restartable_redis.kill()
        answers = [_ask(base, "/getorset", k=f"down-{i % 5}") for i in range(40)]
        answers += [_ask(base, "/set", k="written-while-down", v="x") for _ in range(5)]
        assert all(a.get("v", "source") == "source" for a in answers)
        assert any(a["breaker_open"] for a in answers)
        restartable_redis.start()
        # v2 came back from the AOF: every worker serves it again (their L1s were flushed meanwhile)
        _every_worker_serves(base, "k", "v2", eventually)
        assert eventually(lambda: not _ask(base, "/get", k="k")["breaker_open"])


def test_django_example_with_redis_url_under_three_gunicorn_workers(
    tmp_path: Path, restartable_redis: Any
) -> None:
    """The Django example with ``KOTOBA_EXAMPLE_REDIS_URL``: its views' cache entries land in Redis, under
    the namespace derived from its SECRET_KEY, signed; every worker answers (sync and async views)."""
    import subprocess

    import redis
    from test_servers import EXAMPLES, example_env

    port = free_port()
    env = example_env(tmp_path, port)
    env.update(KOTOBA_EXAMPLE_REDIS_URL=restartable_redis.url, KOTOBA_EXAMPLE_WORKERS=str(WORKERS))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=EXAMPLES / "django_app", env=env,
                   check=True, timeout=90)
    cmd = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "exampleproject.wsgi"]
    with serve(cmd, EXAMPLES / "django_app", env, port) as base:
        for i in range(30):
            response = httpx.get(f"{base}/books/{4 + i % 3}/", timeout=20, headers={"Connection": "close"})
            assert response.status_code == 200 and response.json()["id"] == 4 + i % 3
            assert httpx.get(f"{base}/async/books/4/", timeout=20).status_code == 200
        assert httpx.get(f"{base}/stats/", timeout=20).status_code == 200
        raw = redis.Redis.from_url(restartable_redis.url)
        try:
            keys = [k for k in raw.scan_iter(match=b"kotoba:*") if b"book" in k]
            assert keys, "the example's cache entries are not in Redis"
            assert all(raw.get(k).startswith(b"\x00KS1") for k in keys)  # type: ignore[union-attr]
        finally:
            raw.close()
