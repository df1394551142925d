"""Checks for scripts/check_dist.sh: what the built sdist and wheel contain, and what each extra imports.

    python tools/check_dist.py contents DIST.tar.gz DIST.whl
    python tools/check_dist.py imports EXTRA        # in a venv holding the wheel with that extra
"""

from __future__ import annotations

import email
import importlib
import importlib.metadata
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# What each extra makes importable (every extra also gets the core's modules).
CORE = [
    "kotoba_memory", "kotoba_memory.cache_manager", "kotoba_memory.memory_pool", "kotoba_memory.allocators",
    "kotoba_memory.memory_profiler", "kotoba_memory.gc_optimizer", "kotoba_memory.optimizer",
    "kotoba_memory.cli", "kotoba_memory_integrations.wsgi", "kotoba_memory_integrations.asgi",
    "kotoba_memory_integrations.runtime",
]
EXTRAS = {
    "core": [],
    "django": ["kotoba_memory_integrations.django", "kotoba_memory_integrations.django.cache",
               "kotoba_memory_integrations.django.middleware", "kotoba_memory_integrations.django.checks",
               "kotoba_memory_integrations.hooks"],
    "flask": ["kotoba_memory_integrations.flask", "kotoba_memory_integrations.flask.caching",
              "kotoba_memory_integrations.cachelib", "kotoba_memory_integrations.hooks"],
    "sqlalchemy": ["kotoba_memory_integrations.sqlalchemy"],
    "otel": ["kotoba_memory_integrations.otel", "opentelemetry.exporter.prometheus", "opentelemetry.distro"],
    "redis": ["kotoba_memory.cache_manager.redis_tier", "redis"],
    "compression": ["zstandard", "kotoba_memory.cache_manager.disk"],
    "hooks": ["kotoba_memory_integrations.hooks"],
}
EXTRAS["all"] = sorted({m for mods in EXTRAS.values() for m in mods})
SERVERS = ("gunicorn", "uvicorn", "psycopg")
LINK = re.compile(r"\]\(([^)]+)\)")


def fail(message: str) -> None:
    raise SystemExit(f"check_dist: {message}")


def contents(sdist: Path, wheel: Path) -> None:
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        names = {name.removeprefix(root + "/") for name in tar.getnames()}
    for needed in ("PKG-INFO", "LICENSE", "README.pypi.md", "pyproject.toml", "setup.py", "MANIFEST.in",
                   "core/kotoba_memory/__init__.py", "kotoba_memory_integrations/pytest_plugin.py"):
        if needed not in names:
            fail(f"{sdist.name} lacks {needed}")
    shipped_tests = sorted(n for n in names if n.startswith(("tests/", "tools/", "benchmarks/", "examples/")))
    if shipped_tests:
        fail(f"{sdist.name} ships {shipped_tests[:3]}...: its tests need the repository's tooling")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(whl.read(f"{info}/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    for needed in ("kotoba_memory/py.typed", "kotoba_memory_integrations/py.typed",
                   f"{info}/licenses/LICENSE"):
        if needed not in names:
            fail(f"{wheel.name} lacks {needed}")
    if metadata["License-Expression"] != "MIT":
        fail(f"License-Expression is {metadata['License-Expression']!r}")
    urls = metadata.get_all("Project-URL") or []
    if not any(u.startswith("Source, https://") for u in urls):
        fail(f"no Source Project-URL in {urls}")
    extras = set(metadata.get_all("Provides-Extra") or [])
    if "dev" in extras or not {"django", "flask", "otel", "all"} <= extras:
        fail(f"unexpected extras {sorted(extras)}")
    for requirement in metadata.get_all("Requires-Dist") or []:
        if 'extra == "all"' in requirement and requirement.startswith(SERVERS):
            fail(f"[all] pulls a server or driver: {requirement}")
    for group in ("[pytest11]", "[opentelemetry_instrumentor]", "[console_scripts]"):
        if group not in entry_points:
            fail(f"entry point group {group} missing")
    description = metadata.get_payload()
    assert isinstance(description, str)
    relative = [link for link in LINK.findall(description) if not link.startswith(("https://", "#"))]
    if relative:
        fail(f"the PyPI description has relative links (dead on PyPI): {relative}")
    print(f"check_dist: {sdist.name} and {wheel.name} contents ok")


def imports(extra: str) -> None:
    if extra not in EXTRAS:
        fail(f"unknown extra {extra!r}")
    repository = Path(__file__).resolve().parents[1]
    if "django" in EXTRAS[extra]:
        from django.conf import settings

        settings.configure()
    for name in CORE + EXTRAS[extra]:
        module = importlib.import_module(name)
        origin = Path(getattr(module, "__file__", "") or "").resolve()
        if repository in origin.parents:
            fail(f"{name} imported from the repository ({origin}), not the installed wheel")
    scripts = Path(sys.executable).parent
    version = subprocess.run([scripts / "kotoba-memory", "--version"], capture_output=True, text=True,
                             check=True)
    expected = importlib.metadata.version("kotoba-memory")
    if version.stdout.strip() != f"kotoba-memory {expected}":
        fail(f"kotoba-memory --version printed {version.stdout!r}")
    if extra in ("otel", "all"):
        [entry_point] = [ep for ep in importlib.metadata.entry_points(group="opentelemetry_instrumentor")
                         if ep.name == "kotoba_memory"]
        instrumentor = entry_point.load()()
        instrumentor.instrument()
        instrumentor.uninstrument()


def main(argv: list[str]) -> None:
    if argv[:1] == ["contents"] and len(argv) == 3:
        contents(Path(argv[1]), Path(argv[2]))
    elif argv[:1] == ["imports"] and len(argv) == 2:
        imports(argv[1])
    else:
        fail(__doc__ or "")


if __name__ == "__main__":
    main(sys.argv[1:])
