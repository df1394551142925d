"""The fleet spool: one small snapshot file per worker process, so any process can report on the server.

A pre-forking server (gunicorn, uvicorn ``--workers``) runs one optimizer per worker, and a report
request reaches only one of them. Each worker therefore writes a compact snapshot of itself (pid, RSS,
GC, leak suspects, cache) to ``<pid>.json`` in a private per-host directory named after the app, from
a scheduler task every few seconds and whenever it builds a report. Any process of the app (another
worker, ``manage.py kotoba_memory_report``) reads the directory: files of dead processes (or of a
reused pid) are removed on read, so a killed worker disappears from the next report.

Snapshots are JSON (never pickle), each file at most :data:`MAX_FILE_BYTES`, at most :data:`MAX_FILES`
read; the directory is 0700 and refused when it is not ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory.process import Task, forks, memory, registry, scheduler
from kotoba_memory.process.cpu import CpuShare
from kotoba_memory.report import replace_private
from kotoba_memory.validation import check_positive, check_str

__all__ = [
    "DEFAULT_INTERVAL_S",
    "FleetError",
    "FleetPublisher",
    "FleetSpool",
    "default_base_dir",
    "fleet_view",
    "snapshot_from_report",
    "spool_dir",
]

logger = logging.getLogger("kotoba_memory.fleet")

SCHEMA = 1
DEFAULT_INTERVAL_S = 5.0
MAX_FILES = 256
MAX_FILE_BYTES = 64 * 1024
#: The largest share of the process's CPU the periodic snapshot may take (its interval stretches beyond
#: that, up to MAX_STRETCH intervals): a worker busy 5% of the time would pay a wall-time share 20 times.
MAX_SHARE = 0.001
MAX_STRETCH = 12
_TOP_LEAKS = 3
_STALE_TMP_S = 60.0
_ENV_DIR = "KOTOBA_MEMORY_FLEET_DIR"
_SHM_DIR = "/dev/shm"


class FleetError(KotobaMemoryError, OSError):
    """The spool directory cannot be used safely (not ours, writable by others, not a directory)."""


def default_base_dir() -> Path:
    """Where spools live: ``$KOTOBA_MEMORY_FLEET_DIR``, else ``$XDG_RUNTIME_DIR/kotoba-memory``, else
    ``/dev/shm/kotoba-memory-<uid>`` where there is one, else ``<tmp>/kotoba-memory-<uid>``."""
    explicit = os.environ.get(_ENV_DIR)
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "kotoba-memory"
    uid = os.geteuid() if hasattr(os, "geteuid") else os.getpid()
    # Memory, not disk: every worker replaces its file every few seconds, and on ext4 a rename over a
    # file flushes the new one's data (auto_da_alloc): ~0.6 ms and a disk write each time, 0.05 ms on tmpfs.
    if os.path.isdir(_SHM_DIR) and os.access(_SHM_DIR, os.W_OK | os.X_OK):
        return Path(_SHM_DIR) / f"kotoba-memory-{uid}"
    return Path(tempfile.gettempdir()) / f"kotoba-memory-{uid}"


def spool_dir(name: str, base: str | Path | None = None) -> Path:
    """The spool directory of the app called ``name`` (readable slug plus a hash of the whole name)."""
    check_str(name, "name")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:48].strip("-.") or "app"
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return Path(base if base is not None else default_base_dir()) / f"fleet-{slug}-{digest}"


def _private_directory(path: Path) -> Path:
    """Create ``path`` (and parents) 0700; refuse one that is not ours or that others may write into."""
    if not path.parent.exists():  # the per-user base too: makedirs gives parents the default mode
        os.makedirs(path.parent.parent, exist_ok=True)
        try:
            os.mkdir(path.parent, 0o700)
        except FileExistsError:
            pass
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_private(path, os.lstat(path))
    return path


def _check_private(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise FleetError(f"fleet spool {path} is not a directory")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise FleetError(f"fleet spool {path} belongs to uid {info.st_uid}, not to us")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FleetError(f"fleet spool {path} is writable by others (mode {info.st_mode:o})")


class FleetSpool:
    """One app's spool directory: write this process's snapshot, read every live process's."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        #: Files refused on read (too large, not JSON, wrong shape); they are never trusted.
        self.rejected = 0

    @classmethod
    def for_name(cls, name: str, base: str | Path | None = None) -> FleetSpool:
        """The spool of the app called ``name`` (see :func:`spool_dir`)."""
        return cls(spool_dir(name, base))

    def __repr__(self) -> str:
        return f"FleetSpool({str(self.directory)!r})"

    def write(self, snapshot: Mapping[str, Any]) -> Path:
        """Write ``snapshot`` as ``<pid>.json``: a fresh 0600 file renamed into place (atomic)."""
        pid = snapshot.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"snapshot needs a positive int 'pid', got {pid!r}")
        text = json.dumps(snapshot, separators=(",", ":"), default=str)
        if len(text) > MAX_FILE_BYTES:
            raise ValueError(f"snapshot of pid {pid} is {len(text)} bytes; the limit is {MAX_FILE_BYTES}")
        return replace_private(_private_directory(self.directory) / f"{pid}.json", text)

    def remove(self, pid: int | None = None) -> None:
        """Remove the snapshot of ``pid`` (default: this process), if there is one."""
        try:
            os.unlink(self.directory / f"{os.getpid() if pid is None else int(pid)}.json")
        except FileNotFoundError:
            pass

    def read(self, *, prune: bool = True) -> list[dict[str, Any]]:
        """Snapshots of live processes, newest first; with ``prune`` the files of dead ones are removed.

        Raises :class:`FleetError` when the directory is not ours or others may write into it (its
        files could be planted), ``OSError`` when it cannot be listed.
        """
        try:
            info = os.lstat(self.directory)
        except FileNotFoundError:
            return []
        _check_private(self.directory, info)
        entries = list(os.scandir(self.directory))
        files: list[tuple[float, int, str, float]] = []
        now = time.time()
        for entry in entries:
            name = entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if name.startswith(".") and name.endswith(".tmp"):
                if prune and now - info.st_mtime > _STALE_TMP_S:  # a writer died mid-write
                    _unlink(entry.path)
                continue
            stem, _, ext = name.partition(".")
            if ext != "json" or not stem.isdigit() or not stat.S_ISREG(info.st_mode):
                continue
            started = _process_created_at(int(stem))
            if started is None:  # the process is gone
                if prune:
                    _unlink(entry.path)
                continue
            files.append((info.st_mtime, int(stem), entry.path, started))
        files.sort(reverse=True)
        snapshots = []
        for _, pid, path, started in files[:MAX_FILES]:
            data = self._load(path, pid)
            if data is None:
                continue
            created_at = data.get("created_at")
            if started >= 0 and isinstance(created_at, int | float) and abs(started - created_at) >= 1.0:
                if prune:  # the pid was reused by another process since the snapshot was written
                    _unlink(path)
                continue
            snapshots.append(data)
        return snapshots

    def _load(self, path: str, pid: int) -> dict[str, Any] | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            raw = os.read(fd, MAX_FILE_BYTES + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            data = json.loads(raw) if len(raw) <= MAX_FILE_BYTES else None
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("pid") != pid or data.get("schema") != SCHEMA:
            self.rejected += 1
            return None
        return data


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


_boot_time: float | None = None


def _process_created_at(pid: int) -> float | None:
    """When process ``pid`` started (epoch s), None if it is gone or a zombie (dead, not yet reaped),
    -1.0 if it exists but cannot be inspected."""
    global _boot_time
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:  # Linux: one read, no psutil objects
            fields = handle.read().rpartition(b")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None if os.path.isdir("/proc/self") else _psutil_created_at(pid)
    except OSError:
        return _psutil_created_at(pid)
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):  # fields[0] is the state, fields[19] starttime
        return None
    if _boot_time is None:
        import psutil

        _boot_time = float(psutil.boot_time())
    return _boot_time + int(fields[19]) / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _psutil_created_at(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return float(proc.create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:  # e.g. AccessDenied: it exists, we cannot tell more
        return -1.0


# -- snapshots -------------------------------------------------------------------------------------
_own_start: tuple[int, float | None] = (0, None)


def _created_at() -> float | None:
    """When this process started (read once per pid: a forked child reads its own)."""
    global _own_start
    pid = os.getpid()
    if _own_start[0] != pid:
        started = _process_created_at(pid)
        _own_start = (pid, started if started is not None and started >= 0 else None)
    return _own_start[1]


_host: tuple[int, str] = (0, "")


def _hostname() -> str:
    """This host's name, asked once per process (``gethostname`` costs a system call every snapshot)."""
    global _host
    pid = os.getpid()
    if _host[0] != pid:
        _host = (pid, socket.gethostname())
    return _host[1]


def snapshot_from_report(report: Any | None, *, name: str = "") -> dict[str, Any]:
    """This process's compact fleet row, from its ``MemoryReport`` or ``MemoryBrief`` (None: no
    optimizer runs here)."""
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "name": name,
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "host": _hostname(),
        "created_at": _created_at(),
        "written_at": time.time(),
        "forks": forks.fork_count(),
        "optimizer": report is not None,
        "rss_bytes": memory.rss_bytes(),
        "peak_rss_bytes": memory.peak_rss_bytes(),
        "uptime_s": None,
        "requests": None,
        "gc": None,
        "leak_suspects": None,
        "leaks": [],
        "leak_verdict": None,
        "cache": None,
        "caches": [],
    }
    if report is None:
        return data
    stats = report.stats
    data.update(rss_bytes=stats.rss_bytes, peak_rss_bytes=stats.peak_rss_bytes, uptime_s=stats.uptime_s)
    data["requests"] = sum(int(route.get("requests") or 0) for route in report.routes) if report.routes else 0
    if report.gc is not None:
        data["gc"] = {
            "collections": report.gc.get("total_collections"),
            "pause_total_s": report.gc.get("total_pause_s"),
            "time_share": report.gc.get("gc_time_share"),
            "mode": report.gc.get("mode"),
        }
    if report.profiler is not None:
        data["leak_suspects"] = len(report.leaks)
        data["leaks"] = [
            {
                "allocation_site": leak.get("allocation_site"),
                "route": leak.get("route"),
                "growth_rate_bytes_per_s": leak.get("growth_rate_bytes_per_s"),
                "confidence": leak.get("confidence"),
            }
            for leak in report.leaks[:_TOP_LEAKS]
        ]
        status = report.leak_status
        if not report.leaks and status is not None and not status.get("ready"):
            data["leak_verdict"] = status.get("message")
    if report.cache is not None:
        cache = report.cache
        data["cache"] = {key: cache.get(key) for key in _CACHE_KEYS}
    data["caches"] = [
        {key: row.get(key) for key in (*_CACHE_KEYS, "type", "evictions", "uses", "shared")}
        for row in (getattr(report, "caches", None) or [])[:_TOP_CACHES]
    ]
    return data


_CACHE_KEYS = ("name", "hits", "misses", "hit_rate", "entries", "bytes", "max_bytes")
_TOP_CACHES = 12


def _row_caches(row: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The caches of one snapshot: its ``caches`` list, or (older snapshots) the optimizer's ``cache``."""
    caches = row.get("caches")
    if caches:
        return [c for c in caches if isinstance(c, Mapping)]
    cache = row.get("cache")
    return [cache] if isinstance(cache, Mapping) else []


def _caches_across(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each cache name's counters summed over the processes that have it, busiest first.

    A store the processes share (Redis, a cache file) is counted once: its ``entries``/``bytes`` are
    the largest reading of it, not the sum of every process's reading of the same keys.
    """
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        for cache in _row_caches(row):
            name = str(cache.get("name") or "?")
            into = merged.setdefault(
                name, {"name": name, "type": cache.get("type"), "processes": 0, "hits": 0, "misses": 0,
                       "entries": 0, "bytes": 0, "evictions": 0, "uses": cache.get("uses") or [],
                       "shared": False},
            )
            into["processes"] += 1
            for key in ("hits", "misses", "evictions"):
                into[key] += int(cache.get(key) or 0)
            if cache.get("shared"):
                into["shared"] = True
                for key in ("entries", "bytes"):
                    into[key] = max(into[key], int(cache.get(key) or 0))
            else:
                for key in ("entries", "bytes"):
                    into[key] += int(cache.get(key) or 0)
    for into in merged.values():
        lookups = into["hits"] + into["misses"]
        into["hit_rate"] = into["hits"] / lookups if lookups else None
    return sorted(merged.values(), key=lambda c: (-(c["hits"] + c["misses"]), c["name"]))


class FleetPublisher:
    """Keeps this process's snapshot in a spool: a scheduler task every ``interval_s`` and on demand.

    ``report`` returns the ``MemoryReport`` (or ``MemoryBrief``) a snapshot is made from (default: the
    running optimizer's brief, its counters without a full report);
    ``keep`` is asked before each periodic write, and a False ends publishing (the file is removed).

    The task survives ``fork()`` like every scheduler task, and each process writes ``<its pid>.json``,
    so under ``gunicorn --preload`` the master's publisher becomes each worker's.
    """

    def __init__(
        self,
        spool: FleetSpool,
        *,
        name: str = "",
        interval_s: float = DEFAULT_INTERVAL_S,
        report: Callable[[], Any | None] | None = None,
        keep: Callable[[], bool] | None = None,
    ) -> None:
        check_positive(interval_s, "interval_s")
        self.spool = spool
        self.name = name
        self.interval_s = float(interval_s)
        self._report = report or _active_brief
        self._keep = keep
        self._task: Task | None = None
        self._spacing = CpuShare(
            MAX_SHARE, min_gap_s=self.interval_s, max_gap_s=MAX_STRETCH * self.interval_s
        )
        self._written: set[int] = set()
        self.errors = 0
        self.last_error: str | None = None

    @property
    def running(self) -> bool:
        """Whether the periodic task is scheduled."""
        return self._task is not None

    def start(self) -> None:
        """Schedule the periodic write (the first one at once); no-op when already scheduled."""
        if self._task is None:
            self._task = scheduler.every(self.interval_s, self._tick, name="fleet.publish", delay_s=0.0)

    def stop(self) -> None:
        """Cancel the task and remove this process's snapshot."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        if os.getpid() in self._written:
            self.spool.remove()
            self._written.discard(os.getpid())

    def publish(self, report: Any | None = None) -> dict[str, Any] | None:
        """Write this process's snapshot now (from ``report`` when given); None if it could not be written."""
        try:
            if report is None:
                report = self._report()
            snapshot = snapshot_from_report(report, name=self.name)
            self.spool.write(snapshot)
        except (OSError, ValueError) as exc:
            self.errors += 1
            if self.last_error != str(exc):  # say it once per distinct cause, not every few seconds
                logger.warning("kotoba-memory: cannot write the fleet snapshot to %s: %s", self.spool, exc)
            self.last_error = str(exc)
            return None
        self._written.add(snapshot["pid"])
        return snapshot

    def _tick(self) -> float | None:
        """One periodic write; returns the delay to the next, stretched so that writing takes at most
        :data:`MAX_SHARE` of the process's CPU (a report is slow when tracemalloc traces everything)."""
        if self._keep is not None and not self._keep():
            self.stop()  # e.g. the optimizer stopped: this process leaves the fleet
            return None
        started = time.thread_time()
        self.publish()
        return self._spacing.next_gap(time.thread_time() - started)


def _active_brief() -> Any | None:
    """The running optimizer's counters (a ``MemoryBrief``: no full report every few seconds), or None."""
    optimizer = registry.active("optimizer")
    if optimizer is None or not getattr(optimizer, "running", False):
        return None
    return optimizer.brief()


# -- the fleet as one view -------------------------------------------------------------------------
def _server_of(row: Mapping[str, Any], parents: set[int]) -> int:
    """The pid a row's server is known by: its own pid for a master (another row's parent), else its ppid."""
    pid = int(row["pid"])
    return pid if pid in parents else int(row.get("ppid") or 0)


def fleet_view(
    snapshots: Iterable[Mapping[str, Any]], *, viewer_pid: int | None = None, now: float | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, totals)`` for a report: one row per process, workers first then masters, by pid.

    From inside a server (``viewer_pid``: the reporting process) only the processes of its own server
    are listed (same parent, or that parent itself); from outside, every server of the app, each row
    naming its ``server`` (the master's pid). A row's ``role`` is ``master`` when another listed
    process is its child (``gunicorn --preload`` keeps an optimizer in the master), else ``worker``.
    """
    rows = [dict(s) for s in snapshots]
    parents = {int(r.get("ppid") or 0) for r in rows} & {int(r["pid"]) for r in rows}
    for row in rows:
        row["server"] = _server_of(row, parents)
        row["role"] = "master" if int(row["pid"]) in parents else "worker"
    if viewer_pid is not None:
        mine = next((r for r in rows if int(r["pid"]) == viewer_pid), None)
        server = mine["server"] if mine is not None else os.getppid()
        rows = [r for r in rows if r["server"] == server]
    at = time.time() if now is None else now
    for row in rows:
        row["age_s"] = max(0.0, at - float(row.get("written_at") or at))
    rows.sort(key=lambda r: (r["role"] != "worker", r["server"], int(r["pid"])))
    workers = [r for r in rows if r["role"] == "worker"]
    caches = _caches_across(rows)
    hits = sum(c["hits"] for c in caches)
    misses = sum(c["misses"] for c in caches)
    totals: dict[str, Any] = {
        "workers": len(workers),
        "processes": len(rows),
        "servers": sorted({r["server"] for r in rows}),
        "rss_bytes": sum(int(r.get("rss_bytes") or 0) for r in rows),
        "worker_rss_bytes": sum(int(r.get("rss_bytes") or 0) for r in workers),
        "requests": sum(int(r.get("requests") or 0) for r in rows),
        "gc_collections": sum(int((r.get("gc") or {}).get("collections") or 0) for r in rows),
        "gc_pause_total_s": sum(float((r.get("gc") or {}).get("pause_total_s") or 0.0) for r in rows),
        "leak_suspects": sum(int(r.get("leak_suspects") or 0) for r in rows),
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
        "caches": caches,
    }
    return rows, totals
