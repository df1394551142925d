"""``kotoba-memory profile`` end to end on small scripts, one of which leaks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from kotoba_memory import profile_cli

LEAKY = """\
import time
REGISTRY = []
def handle(i):
    REGISTRY.append({"id": i, "payload": "x" * 500})  # LEAK-SITE
end = time.time() + {seconds}
i = 0
while time.time() < end:
    i += 1
    handle(i)
    time.sleep(0.002)
"""


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kotoba_memory.cli", "profile", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def test_profile_reports_the_leak_of_a_script_that_exits(tmp_path: Path) -> None:
    script = tmp_path / "leaky.py"
    script.write_text(LEAKY.replace("{seconds}", "4"))
    out = tmp_path / "out"
    done = _run_cli(
        ["--out", str(out), "--window", "0.25", "--window-interval", "0.4", "--interval-ms", "100",
         "--", sys.executable, str(script)],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert f"report: {out / 'report.html'}" in done.stdout
    assert "pid" in done.stderr  # progress lines
    report = json.loads((out / "report.json").read_text())
    assert report["leaks"], report["profiler"]
    assert report["leaks"][0]["allocation_site"] == f"{script.resolve()}:4"
    assert len(report["memory_series"]) >= 10
    # The last progress note (every 2 s, from the leak verdict): the windows so far and the top suspect.
    [progress_file] = out.glob("proc-*/progress.json")
    progress = json.loads(progress_file.read_text())
    assert progress["windows"] >= 1 and progress["rss_mb"] > 0
    if progress["suspects"]:
        assert progress["top"].startswith(f"{script.resolve()}:4 (")
    parser = HTMLParser()
    parser.feed((out / "report.html").read_text())
    assert "Leak suspects" in (out / "report.html").read_text()


def test_duration_stops_a_long_workload_and_still_reports(tmp_path: Path) -> None:
    script = tmp_path / "forever.py"
    script.write_text(LEAKY.replace("{seconds}", "600"))
    out = tmp_path / "out"
    args = ["--out", str(out), "--duration", "2", "--quiet", "--", sys.executable, str(script)]
    done = _run_cli(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "report.html").exists()
    assert json.loads((out / "report.json").read_text())["duration_s"] > 1.0


def test_child_exit_status_is_passed_through(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--out", str(out), "--quiet", "--", sys.executable, "-c", "raise SystemExit(3)"]
    done = _run_cli(args, tmp_path)
    assert done.returncode == 3
    assert (out / "report.json").exists()


def main(argv: list[str]) -> int:
    """The ``profile`` subcommand alone (the full CLI also loads other areas' subcommands)."""
    parser = argparse.ArgumentParser(prog="kotoba-memory")
    profile_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_usage_errors(tmp_path: Path) -> None:
    out = ["profile", "--out", str(tmp_path)]
    assert main(out) == 2
    assert main([*out, "--duration", "0", "--", "true"]) == 2
    assert main([*out, "--window", "5", "--window-interval", "1", "--", "true"]) == 2
    assert main([*out, "--", str(tmp_path / "missing-binary")]) == 127
