"""Every fenced Python block in README.md, README.pypi.md and docs/**/*.md runs, so the docs cannot drift.

Blocks are collected from the files (new ones are picked up by themselves) and each runs in a fresh
interpreter in a temporary directory, compiled with its Markdown file and line as the filename so a
traceback points into the doc. The HTML comment on the line before a block (invisible on GitHub and
PyPI) picks how it runs:

* none: as is, in a module that defines the names the prose leaves to the reader (``run_my_workload()``,
  ``payload``, ``build_report``...; see ``PLACEHOLDERS``), with ``/var/cache/myapp`` a temporary directory;
* ``<!-- snippet: NAME -->``: with the setup ``NAME`` below, which supplies the names the prose leaves
  to the reader (``app``, ``run_my_workload()``, a live Redis or PostgreSQL in place of the URL shown,
  a temporary directory in place of ``/var/cache/myapp``), runs the block the way a user would (a
  Django ``settings.py`` in a new project that then passes ``manage.py check`` and serves a request; a
  test file under pytest) and checks what it promised;
* ``<!-- snippet: NAME continues -->``: also runs the blocks before it in the same file, back to one
  without ``continues`` (a page that builds on its previous block);
* ``<!-- snippet: not runnable (why) -->``: only compiled. Keep these few: ``MAX_NOT_RUNNABLE``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_NOT_RUNNABLE = 3
_FENCE = re.compile(r"^(\s*)```(\w+)?\s*$")
_MARKER = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository
    line: int  # the first code line (1-based)
    code: str
    setup: str  # "" = plain
    continues: bool = False
    not_runnable: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "README.pypi.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def collect(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        if (fence.group(2) or "").lower() in ("python", "py", "python3"):
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _MARKER.match(before)
            spec = marker.group(1) if marker else ""
            not_runnable = None
            if spec.startswith("not runnable"):
                not_runnable, spec = spec, ""
            continues = spec.endswith(" continues") or spec == "continues"
            setup = spec.removesuffix("continues").strip()
            rel = path.relative_to(ROOT).as_posix()
            blocks.append(Block(rel, i + 2, code, setup, continues, not_runnable))
        i = end + 1
    return blocks


BLOCKS = [block for path in doc_files() for block in collect(path)]


# -- setups -----------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one block's interpreter gets: code before and after the doc's code, replacements of the
    placeholder values it shows, files to create, and the command to run (default: the script)."""

    prelude: str = ""
    postlude: str = ""
    replace: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    mode: str = "script"  # "script", "django-settings" or "pytest-file"


PLACEHOLDERS = '''
import asyncio, decimal, os
from decimal import Decimal

def _work():
    kept = [bytearray(1024) for _ in range(200)]
    return sum(len(k) for k in kept)

run_my_workload = run_workload = run_my_database_operations = handle_request = _work

class Item: ...

today = "2026-12-03"
big_object = {"rows": list(range(10_000))}
draft = {"rows": []}
html = "<html>" + "x" * 2000 + "</html>"
profile = {"name": "Ada", "langs": ["en", "fr"]}
payload = b"kotoba " * 1000
data = b'{"user": 42}'
v = "value"

def build_report():
    return {"total": 42}

async def async_build():
    return {"total": 42}
'''

WSGI_ASGI_APPS = '''
from kotoba_memory_integrations.request import add_request_listener
_seen = []
add_request_listener(_seen.append)

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
'''

CALL_APPS = '''
import asyncio as _asyncio
_before = len(_seen)
if getattr(application, "__module__", "") != "__main__":   # the block wrapped the WSGI app
    _body = application({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *a: None)
    list(_body); _body.close()
if getattr(app, "__module__", "") != "__main__":           # the block wrapped the ASGI app
    async def _receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    async def _send(message):
        pass
    _asyncio.run(app({"type": "http", "method": "GET", "path": "/", "headers": []}, _receive, _send))
assert len(_seen) > _before, "the wrapped app measured no request"
'''

FLASK_APP = '''
import os
from flask import Flask
os.environ.setdefault("KOTOBA_REPORT_TOKEN", "docs-snippet-token-0123456789")
app = Flask("docs_app")

@app.route("/books/<int:book_id>")
def book(book_id):
    return str(book_id)
'''

FLASK_CHECK = '''
from kotoba_memory_integrations.runtime import stop_optimizer
with app.test_client() as client:
    assert client.get("/books/7").data == b"7"
assert "kotoba_memory" in app.extensions or "cache" in app.extensions
stop_optimizer()
'''

HOOK_MODULES = {
    "myapp/__init__.py": "",
    "myapp/reports.py": "class ReportBuilder:\n    def render(self):\n        return 'report'\n",
    "myapp/geo.py": "def lookup_country(ip):\n    return 'FR'\n",
    "thirdparty/__init__.py": "",
    "thirdparty/client.py": "class Client:\n    def send(self, data):\n        return len(data)\n",
}
HOOK_NAMES = '''
from kotoba_memory.cache_manager import CacheManager
geo_cache = CacheManager(max_bytes=1 << 20)

def my_wrapt_wrapper(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)
'''


def _plain(block: Block, tmp: Path) -> Run:
    return Run(prelude=PLACEHOLDERS, replace={"/var/cache/myapp": str(tmp / "cache")})


def _asgi_app(block: Block, tmp: Path) -> Run:
    return Run(prelude=WSGI_ASGI_APPS, postlude=CALL_APPS)


def _flask_app(block: Block, tmp: Path) -> Run:
    return Run(prelude=FLASK_APP, postlude=FLASK_CHECK)


def _django_settings(block: Block, tmp: Path) -> Run:
    return Run(mode="django-settings")


def _otel(block: Block, tmp: Path) -> Run:
    prelude = PLACEHOLDERS + (
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
        "mp = MeterProvider(metric_readers=[InMemoryMetricReader()])\n"
    )
    return Run(prelude=prelude)


def _hooks(block: Block, tmp: Path) -> Run:
    return Run(prelude=PLACEHOLDERS + HOOK_NAMES, files=HOOK_MODULES)


def _gunicorn_conf(block: Block, tmp: Path) -> Run:
    post = (
        "import types\nworker = types.SimpleNamespace()\npost_fork(None, worker)\n"
        "assert worker.trimmer is not None\nworker.trimmer.stop()\n"
    )
    return Run(postlude=post)


def _pytest_file(block: Block, tmp: Path) -> Run:
    return Run(mode="pytest-file")


SETUPS: dict[str, Callable[[Block, Path], Run]] = {
    "": _plain,
    "workload": _plain,
    "placeholders": _plain,
    "asgi-app": _asgi_app,
    "flask-app": _flask_app,
    "django-settings": _django_settings,
    "otel": _otel,
    "hooks": _hooks,
    "gunicorn-conf": _gunicorn_conf,
    "pytest-file": _pytest_file,
    "redis": _plain,  # + the live server's URL, below
    "sqlalchemy": _plain,  # + a fresh PostgreSQL database, below
}
NEEDS_REDIS = {"redis"}
NEEDS_POSTGRES = {"sqlalchemy"}

DJANGO_PROJECT = '''
SECRET_KEY = "docs-snippet-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"}}
ROOT_URLCONF = "docs_urls"
_BASE = {"INSTALLED_APPS": list(INSTALLED_APPS), "MIDDLEWARE": list(MIDDLEWARE)}
'''
DJANGO_AFTER_BLOCK = '''
for _name, _base in _BASE.items():   # `[..., "x"]` in the docs: the project's own entries, then x
    _value = globals()[_name]
    if Ellipsis in _value:
        _at = _value.index(Ellipsis)
        globals()[_name] = _value[:_at] + _base + _value[_at + 1:]
'''
DJANGO_URLS = '''
from django.http import HttpResponse
from django.urls import path
urlpatterns = [path("books/<int:book_id>/", lambda request, book_id: HttpResponse(str(book_id)))]
'''
DJANGO_RUN = '''
import django
django.setup()
from django.conf import settings
from django.core.cache import caches
from django.core.management import call_command
from django.test import Client
from kotoba_memory.optimizer import get_active_optimizer
from kotoba_memory_integrations.request import add_request_listener

call_command("check", fail_level="WARNING")
seen = []
add_request_listener(seen.append)
assert Client().get("/books/7/").content == b"7"
if "kotoba_memory_integrations.django.middleware.MemoryMiddleware" in settings.MIDDLEWARE:
    assert [m.route for m in seen] == ["/books/<int:book_id>/"], seen
if getattr(settings, "KOTOBA_MEMORY", None) is not None:
    assert get_active_optimizer() is not None, "KOTOBA_MEMORY is set but no optimizer started"
for alias in settings.CACHES:
    caches[alias].set("docs", 1)
    assert caches[alias].get("docs") == 1
from kotoba_memory_integrations.runtime import stop_optimizer
stop_optimizer()
'''


def _compile_line(path: str, line: int, code: str) -> str:
    """Python source that runs ``code`` as if it sat at ``path:line`` (tracebacks point into the doc)."""
    return (
        f"exec(compile({chr(10) * (line - 1) + code!r}, {path!r}, 'exec', flags=__flags), globals())\n"
    )


def _chain(block: Block) -> list[Block]:
    same_file = [b for b in BLOCKS if b.path == block.path and b.line <= block.line]
    chain = [block]
    for earlier in reversed(same_file[:-1]):
        if not chain[0].continues:
            break
        chain.insert(0, earlier)
    return chain


def _script(block: Block, run: Run) -> str:
    parts = ["import ast as __ast, asyncio as __asyncio, inspect as __inspect\n",
             "__flags = __ast.PyCF_ALLOW_TOP_LEVEL_AWAIT\n", run.prelude, "\n"]
    for part in _chain(block):
        code = part.code
        for placeholder, value in run.replace.items():
            code = code.replace(placeholder, value)
        # A block with top-level await compiles to a coroutine; run it the way an async app would.
        parts.append(
            f"__code = compile({chr(10) * (part.line - 1) + code!r}, {part.path!r}, 'exec', flags=__flags)\n"
            "__result = eval(__code, globals())\n"
            "if __inspect.iscoroutine(__result):\n    __asyncio.run(__result)\n"
        )
    parts.append(run.postlude)
    return "".join(parts)


@pytest.fixture()
def docs_services(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Live Redis / a fresh PostgreSQL database for the blocks that show one."""
    block: Block = request.param
    replace: dict[str, str] = {}
    database = None
    admin = None
    if block.setup in NEEDS_REDIS:
        url = request.getfixturevalue("redis_url")
        replace["redis://127.0.0.1:6379/0"] = url
    if block.setup in NEEDS_POSTGRES:
        import sqlalchemy

        url = request.getfixturevalue("postgres_url")
        admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
        database = f"docs_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {database}")
        replace["postgresql+psycopg://app@db/app"] = str(
            sqlalchemy.make_url(url).set(database=database).render_as_string(hide_password=False)
        )
    try:
        yield replace
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            admin.dispose()


def _runnable() -> list[Block]:
    return [b for b in BLOCKS if b.not_runnable is None]


@pytest.mark.parametrize("docs_services", _runnable(), ids=[b.where for b in _runnable()], indirect=True)
def test_doc_block_runs(
    docs_services: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    block: Block = request.node.callspec.params["docs_services"]
    assert block.setup in SETUPS, f"{block.where}: unknown snippet setup {block.setup!r}: {sorted(SETUPS)}"
    run = SETUPS[block.setup](block, tmp_path)
    run.replace.update(docs_services)
    for name, text in run.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    if run.mode == "django-settings":
        settings = "".join(
            [DJANGO_PROJECT, "import ast as __ast\n__flags = 0\n",
             *(_compile_line(b.path, b.line, b.code) for b in _chain(block)), DJANGO_AFTER_BLOCK]
        )
        (tmp_path / "docs_settings.py").write_text(settings)
        (tmp_path / "docs_urls.py").write_text(DJANGO_URLS)
        env["DJANGO_SETTINGS_MODULE"] = "docs_settings"
        command = [sys.executable, "-c", DJANGO_RUN]
    elif run.mode == "pytest-file":
        (tmp_path / "test_docs_block.py").write_text("\n" * (block.line - 1) + block.code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_docs_block.py"]
    else:
        (tmp_path / "docs_block.py").write_text(_script(block, run))
        command = [sys.executable, "docs_block.py"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        setup = f" (setup {block.setup!r})" if block.setup else ""
        output = f"{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
        pytest.fail(f"{block.where}: the documented example failed{setup}:\n{output}", pytrace=False)


def test_not_runnable_blocks_still_compile() -> None:
    for block in BLOCKS:
        if block.not_runnable is None:
            continue
        try:
            compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as exc:
            pytest.fail(f"{block.where}: {exc}", pytrace=False)


def test_the_collection_sees_every_doc_and_few_blocks_are_exempt() -> None:
    files = {b.path for b in BLOCKS}
    assert {"README.md", "README.pypi.md", "docs/otel.md", "docs/sqlalchemy.md"} <= files
    exempt = [b.where for b in BLOCKS if b.not_runnable]
    assert len(exempt) <= MAX_NOT_RUNNABLE, f"too many blocks marked not runnable: {exempt}"
    unknown = [f"{b.where}: {b.setup!r}" for b in BLOCKS if b.setup not in SETUPS]
    assert unknown == [], f"unknown snippet setups: {unknown} (known: {sorted(SETUPS)})"
    starts = [b for b in BLOCKS if b.continues and _chain(b)[0] is b]
    assert starts == [], f"'continues' on the first block of a page: {[b.where for b in starts]}"
    json.dumps([b.where for b in BLOCKS])  # ids are plain strings
