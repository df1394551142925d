"""How far apart tracing windows go so that what they cost stays under a share of the process's CPU."""

from __future__ import annotations

from dataclasses import dataclass

from kotoba_memory.process.cpu import gap_for

# Requests finished in the gap before a window below which their mean CPU is too rough a baseline.
_MIN_GAP_REQUESTS = 20
# Weight of the newest window in the running cost: windows with a census cost several times others.
_SMOOTHING = 0.5


@dataclass(frozen=True, slots=True)
class WindowCost:
    """One window's measured cost: the CPU it added over what the same time or requests cost untraced."""

    extra_cpu_s: float
    cpu_rate: float  # the process's CPU seconds per second in the gap before the window
    share: float  # extra CPU over all CPU the process spent from the previous window's end to this one's


class TraceBudget:
    """Measures each tracing window's cost and spaces the next one so windows stay under ``share`` of CPU.

    A window's cost is the process's CPU time from its opening until the profiler finished with it
    (traced requests run several times slower; read-backs, census and grouping), minus what its
    requests cost untraced: their number times the CPU per request of the gap before it, or for a
    process that serves no requests (or too few to tell) the gap's CPU rate over the window's length.
    Not thread-safe: only the profiler's scheduler step calls it.
    """

    def __init__(self, share: float, interval_s: float, max_stretch: float = 16.0) -> None:
        self.share = share
        self.interval_s = interval_s
        self.max_interval_s = interval_s * max_stretch
        self.next_interval_s = interval_s
        self.last: WindowCost | None = None
        self._extra_total = 0.0  # over every measured window and the gap before it
        self._cpu_total = 0.0
        self._smoothed: float | None = None
        self._closed_at: tuple[float, float] | None = None
        self._opened: tuple[float, float, float, float, int] | None = None

    def restart(self, wall: float, cpu: float) -> None:
        """Measure the next gap from here (start, or a fork: the parent's figures are not ours)."""
        self._closed_at = (wall, cpu)
        self._opened = None
        self._smoothed = None
        self.last = None
        self._extra_total = self._cpu_total = 0.0
        self.next_interval_s = self.interval_s

    def share_until(self, cpu: float) -> float | None:
        """Extra CPU of every measured window over all the process's CPU from the start until ``cpu`` (the
        process CPU clock now); None before a window was measured. The CPU since the last window counts:
        a window early in a process's life would otherwise read as the share of a short gap."""
        if self._cpu_total <= 0:
            return None
        since = max(0.0, cpu - self._closed_at[1]) if self._closed_at is not None else 0.0
        return self._extra_total / (self._cpu_total + since)

    def opened(self, wall: float, cpu: float, gap_requests: int) -> None:
        """A window opened; ``gap_requests`` finished since the previous one closed (or since start)."""
        if self._closed_at is None:
            self._opened = None
            return
        gap_wall = wall - self._closed_at[0]
        gap_cpu = cpu - self._closed_at[1]
        self._opened = (wall, cpu, gap_wall, gap_cpu, gap_requests) if gap_wall > 0 else None

    def abandoned(self, wall: float, cpu: float) -> None:
        """A window gave up early: its cost is not measured; the next gap is measured from here."""
        self._opened = None
        self._closed_at = (wall, cpu)

    def closed(self, wall: float, cpu: float, window_requests: int) -> float:
        """The profiler is done with the window; returns the seconds from this window's start to the next."""
        opened, self._opened = self._opened, None
        self._closed_at = (wall, cpu)
        if opened is None:
            return self.next_interval_s
        open_wall, open_cpu, gap_wall, gap_cpu, gap_requests = opened
        window_wall = max(0.0, wall - open_wall)
        window_cpu = max(0.0, cpu - open_cpu)
        rate = max(0.0, gap_cpu) / gap_wall
        if gap_requests >= _MIN_GAP_REQUESTS and window_requests > 0:
            untraced = window_requests * max(0.0, gap_cpu) / gap_requests
        else:
            untraced = rate * window_wall
        extra = max(0.0, window_cpu - untraced)
        total = max(0.0, gap_cpu) + window_cpu
        self.last = WindowCost(extra, rate, extra / total if total > 0 else 0.0)
        self._extra_total += extra
        self._cpu_total += total
        smoothed = extra if self._smoothed is None else _SMOOTHING * extra + (1 - _SMOOTHING) * self._smoothed
        self._smoothed = smoothed
        # The interval at which `smoothed` is `share` of the process's CPU (at least an idle rate's).
        self.next_interval_s = gap_for(smoothed, self.share, rate, self.interval_s, self.max_interval_s)
        return self.next_interval_s
