"""The example apps under a real server, for the server tests: their environment, and wrk on routes."""

from __future__ import annotations

import os
from pathlib import Path

import servers  # tools/servers.py (tests/conftest.py puts tools/ on sys.path)


def example_env(data_dir: Path, port: int, *, token: str, workers: int = 3) -> dict[str, str]:
    """The environment an example app reads: bind, workers, private data/report/fleet dirs, a token."""
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(
        KOTOBA_EXAMPLE_BIND=f"127.0.0.1:{port}",
        KOTOBA_EXAMPLE_WORKERS=str(workers),
        KOTOBA_EXAMPLE_DATA_DIR=str(data_dir),
        KOTOBA_EXAMPLE_REPORT_DIR=str(data_dir / "reports"),
        KOTOBA_EXAMPLE_REPORT_TOKEN=token,
        KOTOBA_EXAMPLE_METRICS="0",
        KOTOBA_MEMORY_FLEET_DIR=str(data_dir / "fleet"),
        PYTHONUNBUFFERED="1",
    )
    return env


def load_routes(
    base: str, paths: list[str], work_dir: Path, *, seconds: float = 3, connections: int = 6
) -> None:
    """wrk on routes picked at random; every response must be a 2xx and no socket may fail."""
    out = servers.wrk_routes(
        base, paths, seconds=seconds, work_dir=work_dir, connections=connections, threads=2
    )
    assert "Non-2xx" not in out and "Socket errors" not in out, out
