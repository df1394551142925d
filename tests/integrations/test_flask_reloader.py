"""`flask run --debug` loads the app in a file-watching parent and a serving child: only the child
starts the optimizer."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flask")

APP = '''
import os, sys
from flask import Flask
from kotoba_memory.optimizer import get_active_optimizer
from kotoba_memory_integrations.flask import KotobaMemory

app = Flask(__name__)
KotobaMemory(app, enable_leak_detection=False)
role = "child" if os.environ.get("WERKZEUG_RUN_MAIN") == "true" else "parent"
started = get_active_optimizer() is not None
print(f"ROLE {role} pid={os.getpid()} optimizer={started}", file=sys.stderr, flush=True)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("before_run", "after_run"), [(["--debug"], []), ([], ["--reload"])], ids=["debug", "reload"]
)
def test_only_the_serving_child_starts_the_optimizer(
    tmp_path: Path, before_run: list[str], after_run: list[str]
) -> None:
    (tmp_path / "reloadapp.py").write_text(APP)
    flask = Path(sys.executable).parent / "flask"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("WERKZEUG_RUN_MAIN", None)
    env.pop("FLASK_DEBUG", None)
    proc = subprocess.Popen(
        [str(flask), "--app", "reloadapp", *before_run, "run", *after_run, "--port", str(_free_port()),
         "--host", "127.0.0.1"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        assert proc.stderr is not None
        while sum(line.startswith("ROLE") for line in lines) < 2 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    roles = dict(re.findall(r"^ROLE (\w+) pid=\d+ optimizer=(\w+)", "".join(lines), re.M))
    assert roles == {"parent": "False", "child": "True"}, "".join(lines)


def test_without_the_reloader_the_one_process_starts_it(tmp_path: Path) -> None:
    (tmp_path / "reloadapp.py").write_text(APP)
    code = "import reloadapp"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert "ROLE parent" in done.stderr and "optimizer=True" in done.stderr, done.stderr
