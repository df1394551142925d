"""The one place that reads this process's memory: RSS, its peak, the cgroup limit and usage, the heap.

RSS comes from a kept ``/proc/self/statm`` descriptor read with one ``pread`` (about a microsecond),
with psutil as the fallback off Linux. Every reading updates the peak, so components that want "the
highest RSS seen" ask here instead of tracking it themselves.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kotoba_memory import _native
from kotoba_memory.process import forks

__all__ = [
    "CgroupMemory",
    "MemoryUsage",
    "PyRssReader",
    "RssReader",
    "cgroup_memory",
    "heap_in_use_bytes",
    "memory_limit_bytes",
    "memory_usage",
    "peak_rss_bytes",
    "reset_peak",
    "rss_bytes",
    "system_memory",
    "virtual_memory_bytes",
]

# cgroup v1 reports "no limit" as a huge page-aligned number rather than a keyword.
_CGROUP_V1_UNLIMITED = 1 << 60
_CGROUP_ROOT = Path("/sys/fs/cgroup")


class PyRssReader:
    """Reads this process's resident set size cheaply (the pure-Python reference of :class:`RssReader`).

    On Linux it keeps ``/proc/self/statm`` open and reads it with one ``pread``; a forked child reopens
    it (the inherited descriptor still reads the parent), so a pre-forking server measures each worker.
    A read that fails drops a descriptor that no longer names our statm and reopens. Elsewhere it falls
    back to psutil.
    """

    def __init__(self) -> None:
        self._page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._fd: int | None = None
        self._last: tuple[int, float] = (0, -1e18)
        self._peak = 0
        self._unavailable = False
        self._lock = threading.Lock()
        self._psutil_process: Any = None
        _readers.add(self)

    def _open(self) -> int | None:
        with self._lock:
            if self._fd is None and not self._unavailable:
                try:
                    self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    self._unavailable = True  # not Linux: psutil from now on
            return self._fd

    def rss(self) -> int:
        """Resident set size in bytes (0 if it cannot be read)."""
        fd = self._fd
        if fd is None:
            fd = self._open()
        value = -1
        if fd is not None:
            value = self._statm_bytes(fd, 1)
            if value < 0 and not self.descriptor_is_ours():
                fd = self._open()
                if fd is not None:
                    value = self._statm_bytes(fd, 1)
        if value < 0:
            value = self._rss_psutil()
        self._last = (value, time.monotonic())
        if value > self._peak:
            self._peak = value
        return value

    #: What the C reader falls back to while its descriptor is not open or does not read.
    _rss_uncached = rss

    def _statm_bytes(self, fd: int, field: int) -> int:
        """Bytes of statm field ``field`` (0 size, 1 resident) read from ``fd``, or -1 if it does not
        read as a statm line."""
        try:
            # "size resident shared ..." in pages; the first two fields fit in 64 bytes.
            return int(os.pread(fd, 64, 0).split(b" ", 2)[field]) * self._page_size
        except (OSError, ValueError, IndexError):
            return -1

    def descriptor_is_ours(self) -> bool:
        """Whether the kept descriptor (if any) still names this process's statm; if not, forget it.

        A descriptor closed by code that did not own it (a double ``close``) reads EBADF, and once its
        number is reused it reads someone else's file. It is then not ours to close: it is dropped,
        and the next read opens a fresh one.
        """
        with self._lock:
            fd = self._fd
            if fd is None or not os.path.isdir("/proc/self/fd"):
                return True
            try:
                ours = os.readlink(f"/proc/self/fd/{fd}") == f"/proc/{os.getpid()}/statm"
            except OSError:
                ours = False
            if not ours:
                self._fd = None
            return ours

    def vms(self) -> int:
        """Virtual memory size in bytes, from the same kept descriptor (0 if it cannot be read)."""
        fd = self._fd if self._fd is not None else self._open()
        value = -1 if fd is None else self._statm_bytes(fd, 0)
        return value if value >= 0 else self._psutil_field("vms")

    def recent(self, max_age_s: float) -> int:
        """The last reading if it is at most ``max_age_s`` old, else a fresh one.

        Under load a server finishes requests back to back, so the RSS at one request's end is, to
        within the server's own bookkeeping, the RSS at the next one's start: reusing it saves one of
        the two ``/proc`` reads per request, which on a busy machine is the middleware's largest cost.
        """
        value, at = self._last
        if time.monotonic() - at <= max_age_s:
            return value
        return self.rss()

    @property
    def peak(self) -> int:
        """The highest reading this reader has made (since it was created, reset or forked)."""
        return self._peak

    def reset_peak(self) -> None:
        """Start the peak afresh from the next reading."""
        self._peak = 0

    def _rss_psutil(self) -> int:
        return self._psutil_field("rss")

    def _psutil_field(self, name: str) -> int:
        """``psutil``'s reading of ``name`` (rss, vms), the fallback off Linux; 0 if unreadable."""
        try:
            if self._psutil_process is None:
                import psutil

                self._psutil_process = psutil.Process()
            return int(getattr(self._psutil_process.memory_info(), name))
        except Exception:
            return 0

    def close(self) -> None:
        """Close the kept descriptor (reopened on the next read)."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def reinit_after_fork(self) -> None:
        """Forget the parent: its descriptor, psutil handle, last reading and peak."""
        # The child's copy of the descriptor reads the parent's statm; it is the child's to close.
        self._lock = threading.Lock()
        self._psutil_process = None
        self._last = (0, -1e18)
        self._peak = 0
        self.close()


# Where built, RssReader keeps its descriptor, last reading and peak in C (_crecord.RssCore), which
# reads and answers rss()/recent() without a Python frame: the request recorder calls them per request.
_crecord = _native.load("_crecord")
if TYPE_CHECKING:  # both have this interface
    RssReader = PyRssReader
elif _crecord is not None:

    class RssReader(_crecord.RssCore, PyRssReader):
        __doc__ = (PyRssReader.__doc__ or "").replace(
            "(the pure-Python reference of :class:`RssReader`)", "(its state and reads in C)"
        )

else:
    RssReader = PyRssReader

_readers: weakref.WeakSet[PyRssReader] = weakref.WeakSet()


def _reinit_readers_after_fork() -> None:
    for reader in list(_readers):
        reader.reinit_after_fork()


forks.register(_reinit_readers_after_fork, name="process.memory")

_shared = RssReader()


def rss_bytes() -> int:
    """This process's resident set size in bytes, read now (0 if it cannot be read)."""
    return _shared.rss()


def peak_rss_bytes() -> int:
    """The highest RSS read through this module since the process started (or forked, or a reset)."""
    return _shared.peak


def reset_peak() -> None:
    """Start :func:`peak_rss_bytes` afresh (the optimizer does at ``start()``)."""
    _shared.reset_peak()


def shared_reader() -> RssReader:
    """The process-wide reader behind :func:`rss_bytes` (its peak is :func:`peak_rss_bytes`)."""
    return _shared


def virtual_memory_bytes() -> int:
    """This process's virtual memory size in bytes (0 if it cannot be read)."""
    return _shared.vms()


# -- limits ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MemoryUsage:
    """One reading of memory use against the limit it is judged by."""

    used_bytes: int
    limit_bytes: int
    source: str  # "explicit", "cgroup-v2", "cgroup-v1" or "system"

    @property
    def percent(self) -> float:
        """Used memory as a percentage of the limit."""
        return 100.0 * self.used_bytes / self.limit_bytes if self.limit_bytes else 0.0


@dataclass(frozen=True, slots=True)
class CgroupMemory:
    """The memory cgroup this process is limited by: its kind, limit and where its usage is read."""

    kind: str  # "cgroup-v2" or "cgroup-v1"
    limit_bytes: int
    usage_file: Path

    def usage_bytes(self) -> int | None:
        """Bytes the whole cgroup uses now (every process in the container), or None if unreadable."""
        return _read_int(self.usage_file)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _own_cgroup_dirs(root: Path = _CGROUP_ROOT) -> list[tuple[str, Path]]:
    """Candidate (kind, directory) pairs for this process's memory cgroup, most specific first."""
    found: list[tuple[str, Path]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":
            found.append(("cgroup-v2", root / rel))
        elif "memory" in controllers.split(","):
            found.append(("cgroup-v1", root / "memory" / rel))
    found.append(("cgroup-v2", root))
    found.append(("cgroup-v1", root / "memory"))
    return found


def cgroup_memory(root: Path = _CGROUP_ROOT) -> CgroupMemory | None:
    """The memory cgroup limiting this process (v2 or v1, its own cgroup first), or None if unlimited."""
    for kind, directory in _own_cgroup_dirs(root):
        if kind == "cgroup-v2":
            limit = _read_int(directory / "memory.max")
            usage_file = directory / "memory.current"
        else:
            limit = _read_int(directory / "memory.limit_in_bytes")
            usage_file = directory / "memory.usage_in_bytes"
        if limit is not None and 0 < limit < _CGROUP_V1_UNLIMITED and usage_file.exists():
            return CgroupMemory(kind, limit, usage_file)
    return None


def system_memory() -> tuple[int, int]:
    """``(total, used)`` bytes of the machine's RAM, used meaning not available to new allocations."""
    found = _meminfo()
    if found is not None:
        return found
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.total - vm.available)


def _meminfo() -> tuple[int, int] | None:
    """``(total, used)`` from the head of Linux's ``/proc/meminfo``; None where it is not there.

    The GC monitor asks every second: psutil parses all ~55 lines into a namedtuple (~170 us), while
    ``MemTotal`` and ``MemAvailable`` are the first and third line (the same figures psutil reports).
    """
    try:
        with open("/proc/meminfo", "rb") as handle:
            head = handle.read(512)
    except OSError:
        return None
    total = available = None
    for line in head.split(b"\n", 4)[:4]:
        name, _, rest = line.partition(b":")
        if name == b"MemTotal":
            total = rest
        elif name == b"MemAvailable":
            available = rest
    try:
        total_kib = int(total.split()[0]) if total is not None else 0
        available_kib = int(available.split()[0]) if available is not None else -1
    except (ValueError, IndexError):
        return None
    if total_kib <= 0 or not 0 <= available_kib <= total_kib:
        return None  # e.g. a kernel before 3.14 has no MemAvailable: psutil estimates it
    return total_kib * 1024, (total_kib - available_kib) * 1024


def memory_limit_bytes() -> int:
    """The memory limit this process lives under: its cgroup's limit when one is set, else total RAM."""
    cgroup = cgroup_memory()
    return cgroup.limit_bytes if cgroup is not None else system_memory()[0]


def memory_usage(limit_bytes: int | None = None, cgroup: CgroupMemory | None = None) -> MemoryUsage:
    """Memory use against a limit: ``limit_bytes`` judged by this process's RSS when given, else the
    cgroup's usage against its limit, else the machine's use against its RAM."""
    if limit_bytes is not None:
        return MemoryUsage(rss_bytes(), limit_bytes, "explicit")
    if cgroup is not None:
        used = cgroup.usage_bytes()
        if used is not None:
            return MemoryUsage(used, cgroup.limit_bytes, cgroup.kind)
    total, used = system_memory()
    return MemoryUsage(used, total, "system")


def heap_in_use_bytes() -> int | None:
    """Bytes glibc malloc has handed out and not had back, via the allocators module; None elsewhere."""
    from kotoba_memory.allocators.process import heap_in_use_bytes as read_heap

    return read_heap()


def trim_heap() -> bool:
    """Hand glibc's free heap pages back to the OS (``malloc_trim(0)``); False where that does not apply."""
    from kotoba_memory.allocators.process import malloc_trim

    return malloc_trim().supported
