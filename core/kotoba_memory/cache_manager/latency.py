"""A sliding window of operation latencies, for the hit/miss latency medians the cache stats report."""

from __future__ import annotations

import statistics
import time
from collections import deque

__all__ = ["LatencyWindow"]


class LatencyWindow:
    """The median of the last ``size`` recorded durations; callers serialize access with their lock."""

    def __init__(self, size: int = 512) -> None:
        self._samples: deque[int] = deque(maxlen=size)

    def add(self, started_ns: int) -> None:
        """Record the time elapsed since ``started_ns`` (a ``perf_counter_ns`` reading)."""
        self._samples.append(time.perf_counter_ns() - started_ns)

    def median(self) -> int:
        """The median recorded duration in nanoseconds, 0 before the first sample."""
        return int(statistics.median(self._samples)) if self._samples else 0
