"""The memory ceiling the GC optimizer obeys: which limit it judges by and how full that is.

The readings themselves (RSS, cgroup limit and usage, machine RAM) come from the process layer.
"""

from __future__ import annotations

import math

from kotoba_memory.process import memory as process_memory
from kotoba_memory.process.memory import MemoryUsage, memory_limit_bytes

__all__ = ["MemoryCeiling", "MemoryUsage", "malloc_trim", "memory_limit_bytes"]

# A machine or cgroup reading is a file read the kernel builds afresh: /proc/meminfo cost ~130 us of
# CPU in a worker thread that slept since the last one (13 us in a warm loop), ~0.1% of a worker busy a
# tenth of the time when read every second. Far under the target, use cannot reach it in a few seconds,
# so readings are spaced by the headroom: one interval per this many percentage points of it...
_POINTS_PER_INTERVAL = 5.0
# ...at most this many intervals apart,
_MAX_INTERVALS = 10
# and read again early once this process alone grew by this share of the headroom (in bytes).
_OWN_GROWTH_SHARE = 0.5


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
        self._next_at = -math.inf  # monotonic time of the next due reading (see due_usage)
        self._early_rss = 0  # this process's RSS at which a reading is due early

    def process_rss(self) -> int:
        """This process's resident set size in bytes."""
        return process_memory.rss_bytes()

    def usage(self) -> MemoryUsage:
        """Read current use against the limit."""
        return process_memory.memory_usage(self._explicit, self._cgroup)

    def due_usage(self, now: float, rss: int, interval_s: float) -> MemoryUsage | None:
        """A fresh reading when one is due at monotonic time ``now`` (this process's RSS ``rss``), else None.

        An explicit limit is judged by ``rss`` itself, so it is always due. A machine or cgroup
        reading waits one ``interval_s`` per 5 points of headroom under the target (at most 10), and
        comes early once this process alone grew by half the headroom since the last one.
        """
        if self._explicit is not None:
            return MemoryUsage(rss, self._explicit, "explicit")
        if now < self._next_at and rss < self._early_rss:
            return None
        usage = self.usage()
        headroom = self.target_percent - usage.percent
        intervals = min(_MAX_INTERVALS, headroom / _POINTS_PER_INTERVAL)
        if intervals <= 1.0:
            self._next_at, self._early_rss = -math.inf, 0  # near or over the target: every interval
        else:
            self._next_at = now + intervals * interval_s
            self._early_rss = rss + int(_OWN_GROWTH_SHARE * headroom / 100.0 * usage.limit_bytes)
        return usage

    def over_target(self, usage: MemoryUsage) -> bool:
        """Whether ``usage`` is at or above the target percentage."""
        return usage.percent >= self.target_percent


def malloc_trim() -> bool:
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); False where it does not apply."""
    return process_memory.trim_heap()
