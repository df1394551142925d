"""Runs inside a process launched by ``kotoba-memory profile``: starts the optimizer, writes the report.

The profile command puts a generated ``sitecustomize.py`` on ``PYTHONPATH`` that calls :func:`install`;
configuration arrives in environment variables, so every Python process of the workload is profiled
and writes its own report under ``$KOTOBA_MEMORY_PROFILE_DIR/proc-<pid>/``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from kotoba_memory.process import forks, scheduler
from kotoba_memory.report import private_dir, write_private

ENV_DIR = "KOTOBA_MEMORY_PROFILE_DIR"
ENV_CONFIG = "KOTOBA_MEMORY_PROFILE_CONFIG"
PROGRESS_EVERY_S = 2.0

_log = logging.getLogger(__name__)
_state: dict[str, Any] = {}


def process_dir(root: Path, pid: int) -> Path:
    """Where process ``pid`` writes its report and progress."""
    return root / f"proc-{pid}"


def install() -> None:
    """Start a MemoryOptimizer for this process if the profile command asked for one (once)."""
    root = os.environ.get(ENV_DIR)
    if not root or _state:
        return
    from kotoba_memory.config import MemoryConfig
    from kotoba_memory.optimizer import MemoryOptimizer

    config = MemoryConfig.from_mapping(json.loads(os.environ.get(ENV_CONFIG, "{}")))
    out = process_dir(Path(root), os.getpid())
    private_dir(out)
    optimizer = MemoryOptimizer(config)
    optimizer.start()
    _state.update(optimizer=optimizer, out=out, written=False)
    _state["task"] = scheduler.every(PROGRESS_EVERY_S, _progress, name="profile.progress")
    atexit.register(finish)
    # SIGTERM's default action skips atexit; turn it into a normal exit so the report gets written.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _progress() -> None:
    optimizer, out = _state.get("optimizer"), _state.get("out")
    if optimizer is None or out is None or _state.get("written"):
        return
    try:
        _write_progress(optimizer, out)
    except Exception:  # progress is best effort; never disturb the workload
        _log.debug("progress write failed", exc_info=True)


def _write_progress(optimizer: Any, out: Path) -> None:
    stats = optimizer.memory_stats()
    data: dict[str, Any] = {
        "time": time.time(),
        "rss_mb": stats.current_memory_mb,
        "peak_mb": stats.peak_memory_mb,
    }
    profiler = optimizer.profiler
    if profiler is not None:
        # The verdict alone, not analyze(): that also makes an object per sample of the ring (an hour
        # of them) and its trend analysis, every two seconds, for three fields.
        leaks, status = profiler.leak_verdict()
        data["windows"] = status.windows
        data["suspects"] = len(leaks)
        if leaks:
            top = leaks[0]
            data["top"] = f"{top.allocation_site} ({top.growth_rate_bytes_per_s / 1024:.1f} KiB/s)"
    write_private(out / "progress.json", json.dumps(data))


def finish() -> None:
    """Stop the optimizer and write report.html, report.json and summary.txt (once)."""
    optimizer = _state.get("optimizer")
    if optimizer is None or _state.get("written"):
        return
    _state["written"] = True
    task = _state.pop("task", None)
    if task is not None:
        task.cancel()
    out: Path = _state["out"]
    if not optimizer.running:
        return
    report = optimizer.stop()
    report.write_json(out / "report.json")
    report.write_html(out / "report.html")
    write_private(out / "summary.txt", report.summary() + "\n")


def _after_fork_in_child() -> None:
    # A forked worker (gunicorn, multiprocessing) reports on itself, into its own directory. Its
    # inherited optimizer was re-initialised by the components' own fork callbacks. The profile
    # command was asked to profile every process, so the child's scheduler resumes right away.
    root = os.environ.get(ENV_DIR)
    if not _state or not root:
        return
    _state["out"] = process_dir(Path(root), os.getpid())
    _state["written"] = False
    try:
        private_dir(_state["out"])
    except OSError:
        _log.debug("kotoba-memory profile: no report directory for the forked child", exc_info=True)
    scheduler.resume()


forks.register(_after_fork_in_child, name="profile")
