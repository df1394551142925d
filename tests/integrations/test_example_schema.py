"""The Flask example never creates its schema in a worker: ``create_app`` runs no DDL (concurrent
``create_all`` calls in several gunicorn workers raced: "table author already exists"), and
``init_db`` (gunicorn's ``on_starting``, ``flask init-db``) creates and seeds it once."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("flask_caching")
pytest.importorskip("sqlalchemy")

APP_PY = Path(__file__).resolve().parents[2] / "examples" / "flask_app" / "app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kotoba_flask_example_app", APP_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(row[0] for row in db.execute("select name from sqlite_master where type = 'table'"))


def test_create_app_runs_no_ddl_and_init_db_creates_the_schema_once(tmp_path: Path) -> None:
    example = load_example()
    db = tmp_path / "example.sqlite3"
    url = f"sqlite:///{db}"
    example.create_app({"DATABASE_URL": url, "KOTOBA_MEMORY_ENABLED": False, "EXAMPLE_METRICS": False})
    assert not db.exists() or tables(db) == []  # a worker's app factory leaves the schema alone
    example.init_db(url)
    example.init_db(url)  # a second run (another deploy) is harmless: no error, no duplicate rows
    assert tables(db) == ["author", "book"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from book").fetchone() == (200,)


def test_flask_cli_init_db_command(tmp_path: Path) -> None:
    example = load_example()
    db = tmp_path / "cli.sqlite3"
    app = example.create_app(
        {"DATABASE_URL": f"sqlite:///{db}", "KOTOBA_MEMORY_ENABLED": False, "EXAMPLE_METRICS": False}
    )
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert tables(db) == ["author", "book"]
