"""What every field app shares: the profiler's settings from the environment and the per-worker dump."""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil

from kotoba_memory.config import MemoryConfig
from kotoba_memory.process.scheduler import scheduler
from kotoba_memory_integrations import runtime

LEAKS_ON = os.environ.get("FIELD_LEAKS", "1") != "0"
KOTOBA_ON = os.environ.get("FIELD_KOTOBA", "1") != "0"  # 0: the bare app (overhead baseline)
# The defaults without the profiler (FIELD_PROFILE=0), and the middleware's per-request path alone
# (FIELD_MIDDLEWARE_ONLY=1), as MemoryConfig fields.
NO_PROFILER: dict[str, Any] = {"enable_profiling": False, "enable_leak_detection": False}
MIDDLEWARE_ONLY: dict[str, Any] = {**NO_PROFILER, "enable_gc_optimization": False, "enable_caching": False}


def config() -> MemoryConfig:
    """Production components with a diagnosis duty cycle (the field suite runs for minutes, not hours);
    ``FIELD_PRODUCTION=1``: MemoryConfig's defaults, untouched (the overhead benchmark; with
    ``FIELD_PROFILE=0`` the same without the profiler; ``FIELD_CONFIG``, a JSON object, overrides some
    of the defaults: the overhead benchmark's variants)."""
    if os.environ.get("FIELD_PRODUCTION") == "1":
        if os.environ.get("FIELD_CONFIG"):
            return MemoryConfig(**json.loads(os.environ["FIELD_CONFIG"]))
        if os.environ.get("FIELD_MIDDLEWARE_ONLY") == "1":
            return MemoryConfig(**MIDDLEWARE_ONLY)
        if os.environ.get("FIELD_PROFILE", "1") == "0":
            return MemoryConfig(**NO_PROFILER)
        return MemoryConfig()
    profiling = os.environ.get("FIELD_PROFILE", "1") != "0"  # off while ground truth is replayed
    return MemoryConfig(
        enable_caching=False,
        enable_profiling=profiling,
        enable_leak_detection=profiling,
        monitoring_interval_ms=int(os.environ.get("FIELD_SAMPLE_MS", "250")),
        leak_window_s=float(os.environ.get("FIELD_WINDOW_S", "0.5")),
        leak_window_interval_s=float(os.environ.get("FIELD_WINDOW_INTERVAL_S", "2")),
        leak_trace_budget=None,
    )


def delay_first_window(optimizer: Any) -> None:
    """With ``FIELD_FIRST_WINDOW_S``, move the profiler's first tracing window that many seconds after
    start (a diagnostic for the overhead benchmark: past its rounds, the leak detector runs no window)."""
    text = os.environ.get("FIELD_FIRST_WINDOW_S")
    profiler = getattr(optimizer, "profiler", None)
    if not text or profiler is None or not profiler.leak_detection:
        return
    try:  # read before the profiler stops, so a bad value leaves it running as it was
        delay = float(text)
    except ValueError:
        delay = -1.0
    if not delay >= 0:  # also refuses nan
        raise ValueError(f"FIELD_FIRST_WINDOW_S must be a number of seconds >= 0, got {text!r}")
    profiler.stop()
    profiler.first_window_after_s = delay
    profiler.start()


#: The request recorders of this worker's middlewares (the apps add theirs): the dump tells their RSS gap.
recorders: list[Any] = []


def dump_analysis() -> Path | None:
    """Write this worker's profiler analysis to ``$FIELD_OUT/worker-<pid>.json`` (None when off), and
    what the process ran (CPU per thread, the collector's settings) to ``process-<pid>.json``."""
    out = os.environ.get("FIELD_OUT")
    optimizer = runtime.get_optimizer()
    if out:
        _dump_process(Path(out) / f"process-{os.getpid()}.json", optimizer)
    if not out or optimizer is None or optimizer.profiler is None:
        return None
    analysis = optimizer.profiler.analyze()
    data: dict[str, Any] = analysis.to_dict(include_samples=False)
    data["pid"] = os.getpid()
    path = Path(out) / f"worker-{os.getpid()}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


_POOL_ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")
_ARENAS = re.compile(r"^# arenas allocated current\s*=\s*([\d,]+)")


def pymalloc_stats() -> dict[str, Any] | None:
    """pymalloc's pools and blocks now (``sys._debugmallocstats``): how densely the in-use pools are
    filled, per size class and in all; None where the interpreter does not print them."""
    debug = getattr(sys, "_debugmallocstats", None)
    if debug is None:
        return None
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)  # it writes to the C-level stderr
            debug()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode("utf-8", "replace")
    classes: dict[str, list[int]] = {}
    arenas = None
    for line in text.splitlines():
        row = _POOL_ROW.match(line)
        if row is not None:
            _, size, pools, used, free = (int(x) for x in row.groups())
            classes[str(size)] = [pools, used, free]
        found = _ARENAS.match(line.strip())
        if found is not None:
            arenas = int(found.group(1).replace(",", ""))
    if not classes:
        return None
    used = sum(c[1] for c in classes.values())
    free = sum(c[2] for c in classes.values())
    return {
        "arenas": arenas, "pools": sum(c[0] for c in classes.values()), "blocks_in_use": used,
        "blocks_free_in_used_pools": free, "fill": round(used / max(1, used + free), 4),
        "classes": classes,  # size in bytes -> [pools, blocks in use, free blocks in those pools]
    }


def _dump_process(path: Path, optimizer: Any) -> None:
    """CPU seconds per thread (by Python thread name), the collector's settings and counts, and the GC
    optimizer's mode and changes: where a worker's CPU went besides the requests."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    threads = {
        f"{names.get(t.id, 'native')}-{t.id}": round(t.user_time + t.system_time, 3)
        for t in psutil.Process().threads()
    }
    data: dict[str, Any] = {
        "pid": os.getpid(), "threads_cpu_s": threads, "gc_threshold": gc.get_threshold(),
        "gc_freeze_count": gc.get_freeze_count(), "gc_stats": gc.get_stats(),
        "tasks_cpu_s": {task.name: round(task.cpu_s, 6) for task in scheduler.tasks()},
        "rss_mean_gaps": [round(recorder.mean_gap, 1) for recorder in recorders],
        "pymalloc": pymalloc_stats(),
    }
    gc_optimizer = getattr(optimizer, "gc_optimizer", None)
    if gc_optimizer is not None:
        data["gc_mode"] = list(gc_optimizer.mode)
        data["gc_changes"] = [
            [round(c.timestamp, 1), c.action, str(c.before), str(c.after), c.reason]
            for c in gc_optimizer.changes
        ]
        for counter in ("boundary_collections", "budget_collections", "long_request_steps", "refreezes"):
            data[counter] = getattr(gc_optimizer, counter)
        data["requests_seen"] = gc_optimizer.requests_seen
    path.write_text(json.dumps(data, default=str), encoding="utf-8")
