"""Process-level malloc: which one is in use, glibc heap statistics, ``malloc_trim`` and arena guidance."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kotoba_memory.allocators.types import AllocatorType
from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory.process import Task, scheduler
from kotoba_memory.process import memory as process_memory
from kotoba_memory.validation import check_int, check_non_negative_int, check_positive_int

__all__ = [
    "AllocatorInfo",
    "AllocatorNotFoundError",
    "ArenaAdvice",
    "HeapStats",
    "MallocTrimmer",
    "ProcessAllocatorStats",
    "TrimResult",
    "TrimmerStats",
    "allocator_stats",
    "amalloc_trim",
    "configure_glibc_malloc",
    "detect_allocator",
    "find_allocator_library",
    "heap_in_use_bytes",
    "heap_stats",
    "malloc_arena_advice",
    "malloc_trim",
]

# Debian/Ubuntu package that ships each preloadable malloc, and the file names to look for.
DEBIAN_PACKAGES = {AllocatorType.JEMALLOC: "libjemalloc2", AllocatorType.MIMALLOC: "libmimalloc2.0"}
_LIBRARY_NAMES = {
    AllocatorType.JEMALLOC: ("libjemalloc.so.2", "libjemalloc.so"),
    AllocatorType.MIMALLOC: ("libmimalloc.so.2", "libmimalloc.so.2.0", "libmimalloc.so"),
}
_MAPS_MARKERS = {AllocatorType.JEMALLOC: "libjemalloc", AllocatorType.MIMALLOC: "libmimalloc"}
_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


class AllocatorNotFoundError(KotobaMemoryError, FileNotFoundError):
    """The shared library of a preloadable malloc is not installed; the message names the package."""


@dataclass(frozen=True)
class AllocatorInfo:
    """The malloc a process runs on, read from its memory maps."""

    type: AllocatorType
    library: str | None  # path of the mapped jemalloc/mimalloc library, None for the system malloc
    libc: str  # "glibc", "musl" or "unknown"
    libc_version: str | None
    pid: int


@dataclass(frozen=True)
class HeapStats:
    """glibc ``mallinfo2()`` over all arenas, or ``supported=False`` with the ``reason``."""

    supported: bool
    reason: str | None = None
    arena_bytes: int = 0  # heap obtained with brk/sbrk and per-thread arenas
    mmap_bytes: int = 0  # large chunks mapped individually
    in_use_bytes: int = 0
    free_bytes: int = 0  # free inside the heap: fragmentation that RSS still pays for unless trimmed
    releasable_bytes: int = 0  # free at the very top of the main heap (trimmed automatically)
    free_chunks: int = 0
    mmap_chunks: int = 0

    @property
    def fragmentation(self) -> float:
        """Share of the non-mmapped heap that is free."""
        return self.free_bytes / self.arena_bytes if self.arena_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The statistics as a plain dict (including ``fragmentation``)."""
        return {**asdict(self), "fragmentation": self.fragmentation}


@dataclass(frozen=True)
class TrimResult:
    """The outcome of ``malloc_trim``."""

    supported: bool
    released: bool = False  # glibc returned 1: some memory went back to the OS
    rss_before: int = 0
    rss_after: int = 0
    reason: str | None = None

    @property
    def rss_saved(self) -> int:
        """Resident bytes the trim gave back (never negative)."""
        return max(0, self.rss_before - self.rss_after)


@dataclass(frozen=True)
class ArenaAdvice:
    """How glibc's per-thread arenas are bounded here, and what to set."""

    current: int | None  # MALLOC_ARENA_MAX from the environment, None if unset
    default_limit: int  # glibc's default: 8 x CPU count on 64-bit
    recommended: int | None  # None: nothing to change
    reason: str


@dataclass(frozen=True)
class ProcessAllocatorStats:
    """Everything about the process allocator in one snapshot."""

    allocator: AllocatorInfo
    heap: HeapStats
    arena: ArenaAdvice
    rss_bytes: int
    ld_preload: str | None
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict (JSON-friendly)."""
        data = asdict(self)
        data["allocator"]["type"] = self.allocator.type.value
        data["heap"] = self.heap.to_dict()
        return data


def detect_allocator(pid: int | None = None) -> AllocatorInfo:
    """Which malloc the process ``pid`` (default: this one) uses, from ``/proc/<pid>/maps``."""
    target = os.getpid() if pid is None else pid
    paths: set[str] = set()
    try:
        with open(f"/proc/{target}/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    paths.add(parts[5].strip())
    except FileNotFoundError:
        if pid is not None and not Path("/proc").is_dir():
            raise OSError("reading another process's allocator needs /proc (Linux)") from None
        if pid is not None:
            raise ProcessLookupError(f"no process {pid}") from None
    kind = AllocatorType.SYSTEM
    library = None
    for candidate, marker in _MAPS_MARKERS.items():
        hit = sorted(p for p in paths if marker in os.path.basename(p))
        if hit:
            kind, library = candidate, hit[0]
            break
    libc, version = _libc_of(paths)
    return AllocatorInfo(kind, library, libc, version, target)


def _libc_of(paths: set[str]) -> tuple[str, str | None]:
    names = {os.path.basename(p) for p in paths}
    if any(n.startswith("ld-musl") or n.startswith("libc.musl") for n in names):
        return "musl", None
    if "libc.so.6" in names or any(re.match(r"libc-2\.\d+\.so", n) for n in names):
        return "glibc", _glibc_version()
    if not paths:  # no /proc: fall back to what Python was linked against
        name, version = _platform_libc()
        return name, version
    return "unknown", None


def _glibc_version() -> str | None:
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return value.split()[-1] if value else None


def _platform_libc() -> tuple[str, str | None]:
    import platform

    name, version = platform.libc_ver()
    return ("glibc", version or None) if name == "glibc" else ("unknown", None)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _mallinfo2() -> Any:
    """glibc's ``mallinfo2`` with its result type set, or None where the C library lacks it."""
    fn = getattr(_libc(), "mallinfo2", None)
    if fn is not None:
        fn.restype = _MallInfo2
        fn.argtypes = []
    return fn


def heap_in_use_bytes() -> int | None:
    """Bytes glibc malloc has handed out and not had back (heap + mmapped chunks); None elsewhere.

    One ``mallinfo2`` call, which walks every arena's free chunks under the arena's lock: well under a
    millisecond on a small heap, 3-20 ms on a fragmented one in a multi-threaded worker, so a caller on
    a timer spaces its calls by their cost. Under jemalloc or mimalloc glibc's counters stay at zero,
    which reads as None.
    """
    fn = _mallinfo2()
    if fn is None:
        return None
    mi = fn()
    return int(mi.uordblks + mi.hblkhd) or None


def _glibc_unsupported(info: AllocatorInfo | None = None) -> str | None:
    """Why glibc heap calls do not apply here, or None if they do."""
    info = info or detect_allocator()
    if info.type is not AllocatorType.SYSTEM:
        return f"the process uses {info.type.value} ({info.library}), not glibc malloc"
    if info.libc != "glibc":
        return f"the C library is {info.libc}, not glibc"
    return None


def heap_stats() -> HeapStats:
    """glibc heap statistics (``mallinfo2``); ``supported=False`` under jemalloc, mimalloc or musl."""
    reason = _glibc_unsupported()
    if reason is not None:
        return HeapStats(False, reason)
    fn = _mallinfo2()
    if fn is None:
        return HeapStats(False, f"glibc {_glibc_version()} has no mallinfo2 (needs glibc 2.33+)")
    mi = fn()
    return HeapStats(
        supported=True,
        arena_bytes=mi.arena,
        mmap_bytes=mi.hblkhd,
        in_use_bytes=mi.uordblks,
        free_bytes=mi.fordblks,
        releasable_bytes=mi.keepcost,
        free_chunks=mi.ordblks,
        mmap_chunks=mi.hblks,
    )


def malloc_trim(pad: int = 0) -> TrimResult:
    """Hand free glibc heap pages back to the OS (``malloc_trim(pad)``); a no-op result elsewhere.

    It walks every arena, so it can take milliseconds on a big heap: call it between requests or from a
    background thread, not on a latency-critical path.
    """
    check_non_negative_int(pad, "pad")
    reason = _glibc_unsupported()
    if reason is not None:
        return TrimResult(False, reason=reason)
    fn = getattr(_libc(), "malloc_trim", None)
    if fn is None:
        return TrimResult(False, reason="malloc_trim is not available in this C library")
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    before = _rss()
    released = bool(fn(pad))
    return TrimResult(True, released, before, _rss())


async def amalloc_trim(pad: int = 0) -> TrimResult:
    """Async twin of ``malloc_trim``, run in a worker thread."""
    return await asyncio.to_thread(malloc_trim, pad)


def configure_glibc_malloc(
    *, arena_max: int | None = None, trim_threshold: int | None = None, mmap_threshold: int | None = None
) -> dict[str, bool]:
    """Tune glibc malloc at run time with ``mallopt``; returns which settings glibc accepted.

    ``arena_max`` only bounds arenas created after the call, so call it early (or set ``MALLOC_ARENA_MAX``
    in the environment, e.g. with ``kotoba-memory run --arena-max``).
    """
    settings = {"arena_max": arena_max, "trim_threshold": trim_threshold, "mmap_threshold": mmap_threshold}
    for name, value in settings.items():
        if value is not None:
            check_int(value, name, low=1 if name == "arena_max" else 0)
    requested = {k: v for k, v in settings.items() if v is not None}
    reason = _glibc_unsupported()
    if reason is not None:
        return dict.fromkeys(requested, False)
    mallopt = _libc().mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    params = {
        "arena_max": _M_ARENA_MAX,
        "trim_threshold": _M_TRIM_THRESHOLD,
        "mmap_threshold": _M_MMAP_THRESHOLD,
    }
    return {name: bool(mallopt(params[name], value)) for name, value in requested.items()}


def malloc_arena_advice(threads: int | None = None) -> ArenaAdvice:
    """Whether to set ``MALLOC_ARENA_MAX`` for a process running ``threads`` threads (default: now)."""
    if threads is not None:
        check_positive_int(threads, "threads")
    raw = os.environ.get("MALLOC_ARENA_MAX")
    current = int(raw) if raw and raw.strip().isdigit() else None
    cpus = os.cpu_count() or 1
    default_limit = 8 * cpus if sys.maxsize > 2**32 else 2 * cpus
    if threads is None:
        threads = threading.active_count()
    info = detect_allocator()
    if info.type is not AllocatorType.SYSTEM or info.libc != "glibc":
        return ArenaAdvice(current, default_limit, None, f"not glibc malloc ({info.type.value}/{info.libc})")
    if threads <= 1 and current is None:
        return ArenaAdvice(
            current,
            default_limit,
            None,
            "single-threaded: glibc uses one arena; set MALLOC_ARENA_MAX=2 if you add threaded workers",
        )
    if current is not None and current <= 2:
        return ArenaAdvice(current, default_limit, None, f"MALLOC_ARENA_MAX={current} already bounds arenas")
    return ArenaAdvice(
        current,
        default_limit,
        2,
        f"{threads} threads may each get a glibc arena (up to {default_limit}); under the GIL few run at "
        "once, so MALLOC_ARENA_MAX=2 keeps most of the speed and cuts fragmented free memory held per arena",
    )


def allocator_stats() -> ProcessAllocatorStats:
    """One snapshot of the process allocator: type, glibc heap, arena advice, RSS and suggestions."""
    info = detect_allocator()
    heap = heap_stats()
    arena = malloc_arena_advice()
    advice: list[str] = []
    if arena.recommended is not None:
        advice.append(f"set MALLOC_ARENA_MAX={arena.recommended}: {arena.reason}")
    if heap.supported and heap.arena_bytes and heap.fragmentation > 0.25 and heap.free_bytes > 16 << 20:
        advice.append(
            f"{heap.free_bytes >> 20} MiB free inside the glibc heap ({heap.fragmentation:.0%}): call "
            "malloc_trim() between requests, or run under jemalloc (kotoba-memory run --allocator jemalloc)"
        )
    return ProcessAllocatorStats(info, heap, arena, _rss(), os.environ.get("LD_PRELOAD") or None, advice)


def _rss() -> int:
    return process_memory.rss_bytes()


def _search_dirs() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = []
    for prefix in ("/usr/local/lib", "/usr/lib", "/lib"):
        if multiarch:
            dirs.append(f"{prefix}/{multiarch}")
        dirs.append(prefix)
    dirs += ["/usr/lib64", "/lib64"]
    return dirs


def _ldconfig_paths() -> dict[str, str]:
    """Library name -> path from the dynamic linker cache (``ldconfig -p``), for this architecture."""
    exe = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None
    )
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    want_64 = sys.maxsize > 2**32
    found: dict[str, str] = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)", line)
        if match and ("64" in match.group(2)) == want_64:
            found.setdefault(match.group(1), match.group(3))
    return found


def find_allocator_library(kind: AllocatorType | str) -> str:
    """The path of the jemalloc/mimalloc shared library to preload; raises ``AllocatorNotFoundError``."""
    kind = AllocatorType.parse(kind)
    if not kind.preloadable:
        raise ValueError(f"{kind.value} is not a preloadable malloc; choose jemalloc or mimalloc")
    names = _LIBRARY_NAMES[kind]
    cache = _ldconfig_paths()
    for name in names:
        path = cache.get(name)
        if path and os.path.isfile(path):
            return path
    for directory in _search_dirs():
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    package = DEBIAN_PACKAGES[kind]
    raise AllocatorNotFoundError(
        f"{kind.value} is not installed (looked for {', '.join(names)}): install the Debian/Ubuntu package "
        f"{package} (apt-get install {package}), or pass --library PATH"
    )


@dataclass(frozen=True)
class TrimmerStats:
    """Counters of a ``MallocTrimmer``."""

    running: bool
    supported: bool
    reason: str | None
    checks: int  # heap inspections
    trims: int  # malloc_trim calls made
    errors: int  # exceptions caught in the thread
    rss_saved_bytes: int  # total resident memory the trims gave back


class MallocTrimmer:
    """Calls ``malloc_trim(0)`` every ``interval`` seconds when the heap has free memory.

    A task on the process layer's scheduler thread; cheap when idle (one ``mallinfo2`` call per
    interval); never raises into the host application.
    """

    def __init__(self, interval: float = 30.0, *, min_free_bytes: int = 8 << 20) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        if isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, int) or min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be a non-negative int, got {min_free_bytes!r}")
        self.interval = float(interval)
        self.min_free_bytes = min_free_bytes
        self._task: Task | None = None
        self._lock = threading.Lock()
        self._reason = _glibc_unsupported()
        self._checks = 0
        self._trims = 0
        self._errors = 0
        self._saved = 0

    def start(self) -> MallocTrimmer:
        """Start the thread (idempotent); off glibc it stays stopped and ``stats().reason`` says why."""
        with self._lock:
            if self._reason is not None or self._task is not None:
                return self
            self._task = scheduler.every(self.interval, self._run, name="allocators.malloc_trim")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop trimming, waiting for a trim in progress to finish."""
        with self._lock:
            task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def astart(self) -> MallocTrimmer:
        """Async twin of ``start``."""
        return self.start()

    async def astop(self, timeout: float = 5.0) -> None:
        """Async twin of ``stop`` (the join runs in a worker thread)."""
        await asyncio.to_thread(self.stop, timeout)

    def trim_now(self) -> TrimResult | None:
        """One check: trim if the heap holds at least ``min_free_bytes`` free; the result, or None."""
        with self._lock:
            self._checks += 1
        heap = heap_stats()
        if not heap.supported or heap.free_bytes < self.min_free_bytes:
            return None
        result = malloc_trim(0)
        with self._lock:
            self._trims += 1
            self._saved += result.rss_saved
        return result

    def stats(self) -> TrimmerStats:
        """A snapshot of the counters."""
        with self._lock:
            return TrimmerStats(
                running=self._task is not None,
                supported=self._reason is None,
                reason=self._reason,
                checks=self._checks,
                trims=self._trims,
                errors=self._errors,
                rss_saved_bytes=self._saved,
            )

    def _run(self) -> None:
        try:
            self.trim_now()
        except Exception:  # the host application must never see our failure
            with self._lock:
                self._errors += 1
