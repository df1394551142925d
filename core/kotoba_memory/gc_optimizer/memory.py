"""The memory ceiling the GC optimizer obeys: which limit it judges by and how full that is.

The readings themselves (RSS, cgroup limit and usage, machine RAM) come from the process layer.
"""

from __future__ import annotations

from kotoba_memory.allocators.process import malloc_trim as allocators_malloc_trim
from kotoba_memory.process import memory as process_memory
from kotoba_memory.process.memory import MemoryUsage, memory_limit_bytes

__all__ = ["MemoryCeiling", "MemoryUsage", "malloc_trim", "memory_limit_bytes"]


class MemoryCeiling:
    """Measures memory use against ``target_percent`` of a limit.

    The limit is, in order: ``limit_bytes`` if given (judged against this process's RSS), the cgroup
    memory limit if the process runs in a limited cgroup (judged against the cgroup's usage, which
    counts every worker in the container), else total RAM (judged against system-wide use).
    """

    def __init__(self, target_percent: float, limit_bytes: int | None = None) -> None:
        self.target_percent = target_percent
        self._explicit = limit_bytes
        self._cgroup = None if limit_bytes is not None else process_memory.cgroup_memory()

    def process_rss(self) -> int:
        """This process's resident set size in bytes."""
        return process_memory.rss_bytes()

    def usage(self) -> MemoryUsage:
        """Read current use against the limit."""
        return process_memory.memory_usage(self._explicit, self._cgroup)

    def over_target(self, usage: MemoryUsage) -> bool:
        """Whether ``usage`` is at or above the target percentage."""
        return usage.percent >= self.target_percent


def malloc_trim() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); False where it does not apply."""
    return allocators_malloc_trim().supported
