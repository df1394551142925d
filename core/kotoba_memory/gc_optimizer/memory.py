"""The memory ceiling the GC optimizer obeys: where the limit comes from and how full it is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from kotoba_memory.allocators.process import malloc_trim as allocators_malloc_trim

# cgroup v1 reports "no limit" as a huge page-aligned number rather than a keyword.
_CGROUP_V1_UNLIMITED = 1 << 60


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


def _own_cgroup_dirs(root: Path = Path("/sys/fs/cgroup")) -> list[tuple[str, Path]]:
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


class MemoryCeiling:
    """Measures memory use against ``target_percent`` of a limit.

    The limit is, in order: ``limit_bytes`` if given (judged against this process's RSS), the cgroup
    memory limit if the process runs in a limited cgroup (judged against the cgroup's usage, which
    counts every worker in the container), else total RAM (judged against system-wide use).
    """

    def __init__(self, target_percent: float, limit_bytes: int | None = None) -> None:
        self.target_percent = target_percent
        self._explicit = limit_bytes
        self._process = psutil.Process(os.getpid())
        self._cgroup = None if limit_bytes is not None else self._detect_cgroup()

    @staticmethod
    def _detect_cgroup() -> tuple[str, int, Path] | None:
        for kind, directory in _own_cgroup_dirs():
            if kind == "cgroup-v2":
                limit = _read_int(directory / "memory.max")
                usage_file = directory / "memory.current"
            else:
                limit = _read_int(directory / "memory.limit_in_bytes")
                usage_file = directory / "memory.usage_in_bytes"
            if limit is not None and 0 < limit < _CGROUP_V1_UNLIMITED and usage_file.exists():
                return kind, limit, usage_file
        return None

    def process_rss(self) -> int:
        """This process's resident set size in bytes."""
        if self._process.pid != os.getpid():  # after fork
            self._process = psutil.Process(os.getpid())
        return int(self._process.memory_info().rss)

    def usage(self) -> MemoryUsage:
        """Read current use against the limit."""
        if self._explicit is not None:
            return MemoryUsage(self.process_rss(), self._explicit, "explicit")
        if self._cgroup is not None:
            kind, limit, usage_file = self._cgroup
            used = _read_int(usage_file)
            if used is not None:
                return MemoryUsage(used, limit, kind)
        vm = psutil.virtual_memory()
        return MemoryUsage(int(vm.total - vm.available), int(vm.total), "system")

    def over_target(self, usage: MemoryUsage) -> bool:
        """Whether ``usage`` is at or above the target percentage."""
        return usage.percent >= self.target_percent


def memory_limit_bytes() -> int:
    """The memory limit this process lives under: its cgroup's limit when one is set, else total RAM."""
    cgroup = MemoryCeiling._detect_cgroup()
    return cgroup[1] if cgroup is not None else int(psutil.virtual_memory().total)


def malloc_trim() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); False where it does not apply."""
    return allocators_malloc_trim().supported
