"""The command line reads as plain text, and our options are ours even without ``--``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kotoba_memory._cli import plain

SCRIPTS = Path(sys.executable).parent


@pytest.mark.parametrize("argv", [["--help"], ["profile", "--help"], ["run", "--help"]])
def test_help_shows_no_restructuredtext_markup(argv: list[str]) -> None:
    done = subprocess.run([SCRIPTS / "kotoba-memory", *argv], capture_output=True, text=True, check=True)
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:", "`"):
        assert markup not in done.stdout, (markup, done.stdout)
    assert "kotoba-memory" in done.stdout


def test_plain_reduces_roles_and_literals() -> None:
    doc = "Run ``x --y``, see :class:`~kotoba_memory.config.MemoryConfig` and :func:`go <pkg.go>`::"
    assert plain(doc) == "Run x --y, see MemoryConfig and go:"


def test_profile_takes_its_own_options_given_after_the_command(tmp_path: Path) -> None:
    script = tmp_path / "work.py"
    script.write_text("import sys\nprint('argv', sys.argv[1:], flush=True)\n")
    out = tmp_path / "report"
    done = subprocess.run(
        [SCRIPTS / "kotoba-memory", "profile", sys.executable, str(script), "--keep", "--out", str(out),
         "--duration=60", "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    # --out, --duration and --quiet were ours (the workload never saw them, the report is where we
    # said); --keep is not one of ours and went to the workload.
    assert "argv ['--keep']" in done.stdout, done.stdout + done.stderr
    assert "applying --out" in done.stderr and "--duration=60 --quiet given after" in done.stderr
    assert (out / "report.json").exists()


def test_everything_after_the_separator_goes_to_the_workload(tmp_path: Path) -> None:
    done = subprocess.run(
        [SCRIPTS / "kotoba-memory", "run", "--dry-run", "--", "echo", "--allocator", "system"],
        capture_output=True, text=True, check=True,
    )
    assert done.stdout.strip().endswith("echo --allocator system")
    assert "KOTOBA_MEMORY_ALLOCATOR=jemalloc" in done.stdout and "applying" not in done.stderr
    done = subprocess.run(
        [SCRIPTS / "kotoba-memory", "run", "--dry-run", "echo", "hi", "--allocator", "system"],
        capture_output=True, text=True, check=True,
    )
    assert "KOTOBA_MEMORY_ALLOCATOR=system" in done.stdout and done.stdout.strip().endswith("echo hi")
