"""What our periodic work may cost: a share of the process's own CPU time, not of wall time.

A web worker is often busy a few percent of the time. Work budgeted against wall time (say 0.5 ms
every second) is then a large share of what the worker spends on requests, which is the figure a user
sees (fewer requests per CPU-second). :class:`CpuShare` spaces a periodic job so that it stays under
a share of the CPU the process itself uses.
"""

from __future__ import annotations

import time

from kotoba_memory.validation import check_positive

__all__ = ["IDLE_CPU_RATE", "CpuShare", "gap_for"]

#: Below this CPU rate (cores) a process counts as idle: a share of its CPU would push periodic work
#: out for hours over a few milliseconds, so budgets are taken of at least this rate.
IDLE_CPU_RATE = 0.05
_MIN_SPAN_S = 0.05


def gap_for(cost_s: float, share: float, cpu_rate: float, min_gap_s: float, max_gap_s: float) -> float:
    """Seconds between runs that cost ``cost_s`` each so they take ``share`` of a process using
    ``cpu_rate`` cores (at least :data:`IDLE_CPU_RATE`), kept within ``[min_gap_s, max_gap_s]``."""
    needed = max(0.0, cost_s) / (share * max(cpu_rate, IDLE_CPU_RATE))
    return min(max_gap_s, max(min_gap_s, needed))


class CpuShare:
    """Spaces a periodic job's runs so what they cost stays under ``share`` of the process's CPU.

    The process's CPU rate is read between two consecutive :meth:`next_gap` calls (at least
    :data:`IDLE_CPU_RATE`). Not thread-safe: one job owns it. A fork is harmless: the child's CPU
    clock restarts, the first rate after it reads as idle, and the next is the child's own.
    """

    __slots__ = ("_last", "_rate", "max_gap_s", "min_gap_s", "share")

    def __init__(self, share: float, *, min_gap_s: float, max_gap_s: float) -> None:
        self.share = float(check_positive(share, "share", high=1.0))
        self.min_gap_s = float(min_gap_s)
        self.max_gap_s = max(self.min_gap_s, float(max_gap_s))
        self._last: tuple[float, float] | None = None
        self._rate = 0.0

    def cpu_rate(self) -> float:
        """The process's CPU seconds per second since the previous reading (0.0 before there is one)."""
        now, cpu = time.monotonic(), time.process_time()
        last = self._last
        if last is not None and now - last[0] < _MIN_SPAN_S:
            return self._rate  # too short a span to tell a rate from noise: keep the last one
        self._last = (now, cpu)
        self._rate = 0.0 if last is None else max(0.0, (cpu - last[1]) / (now - last[0]))
        return self._rate

    def next_gap(self, cost_s: float) -> float:
        """Seconds until the next run after one that cost ``cost_s`` seconds of CPU (or wall time)."""
        return gap_for(cost_s, self.share, self.cpu_rate(), self.min_gap_s, self.max_gap_s)
