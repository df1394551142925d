"""What pyproject.toml publishes: classifiers that exist and tell the truth, a PyPI page whose links
work off GitHub, development tools kept out of the published extras."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REPO_URL = PROJECT["urls"]["Source"]


def test_classifiers_exist() -> None:
    trove = pytest.importorskip("trove_classifiers")
    unknown = [c for c in PROJECT["classifiers"] if c not in trove.classifiers]
    assert unknown == []


def test_python_classifiers_match_requires_python_and_ci() -> None:
    pattern = re.compile(r"Programming Language :: Python :: 3\.\d+")
    named = sorted(c.rsplit(" ", 1)[1] for c in PROJECT["classifiers"] if pattern.fullmatch(c))
    assert PROJECT["requires-python"] == f">={named[0]}"
    # scripts/test.sh runs the suite on each of them (the main venv plus EXTRA_PYTHONS).
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert all(f"{version}" in test_sh for version in named[1:]), named


def test_linux_only_and_the_frameworks_we_test() -> None:
    classifiers = set(PROJECT["classifiers"])
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert not any(c.startswith("Operating System :: OS Independent") for c in classifiers)
    assert {"Framework :: Django :: 5.2", "Framework :: Flask", "Framework :: Pytest"} <= classifiers


def test_extras_publish_no_development_tools_or_servers() -> None:
    extras = PROJECT["optional-dependencies"]
    assert "dev" not in extras
    flat = " ".join(" ".join(reqs) for reqs in extras.values())
    for tool in ("pytest", "ruff", "mypy", "gunicorn", "uvicorn", "psycopg", "cachetools", "twine"):
        assert tool not in flat, tool
    assert any(r.startswith("opentelemetry-exporter-prometheus") for r in extras["otel"])
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]
    assert {"test", "lint", "release", "dev"} <= set(groups)


def test_license_file_is_the_mit_text() -> None:
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_pypi_readme_links_are_absolute_and_point_at_files_that_exist() -> None:
    readme = PROJECT["readme"]["file"]
    text = (ROOT / readme).read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    for link in links:
        assert link.startswith("https://"), f"{readme}: relative link {link!r} is dead on PyPI"
        if link.startswith(f"{REPO_URL}/blob/main/"):
            path = link.removeprefix(f"{REPO_URL}/blob/main/").split("#")[0]
            assert (ROOT / path).is_file(), f"{readme}: {link} names no file in the repository"
    # Install first, then the one-line setup; the repository's own commands stay in README.md.
    assert text.index("## Install") < text.index("## One line in your framework")
    assert "scripts/" not in text
    repo_readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in repo_readme and "bash scripts/test.sh" in repo_readme
