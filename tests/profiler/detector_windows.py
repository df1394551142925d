"""Synthetic window snapshots for the leak detector's tests: a site key, a process's growth, a feeder."""

from __future__ import annotations

from collections.abc import Callable

from kotoba_memory.memory_profiler._leaks import Growth, Key, LeakDetector, SiteChooser

APP: Key = (("/srv/app/cache.py", 42), ("/srv/app/views.py", 10))  # innermost frame first
LIB: Key = (("/usr/lib/python3.11/json/encoder.py", 200), ("/srv/app/views.py", 20))
CHOOSER = SiteChooser(["/usr/lib/python3.11"], ["/srv/kotoba_memory"])


class Flat:
    """A process whose heap and allocated blocks did not move (within a small error)."""

    def since(self, start: float) -> Growth:
        return Growth(bytes_per_s=0.0, bytes_stderr=100.0, blocks_per_s=0.0, blocks_stderr=1.0, span_s=100.0)


class Growing:
    def since(self, start: float) -> Growth:
        return Growth(bytes_per_s=5e5, bytes_stderr=1e4, blocks_per_s=1e4, blocks_stderr=10.0, span_s=100.0)


def feed(
    detector: LeakDetector,
    windows: int,
    size_at: Callable[[int, int], int],
    key: Key = APP,
    *,
    period: float = 10.0,
    snapshots: int = 6,
    routes: Callable[[int], dict[str, int]] | None = None,
    block: int = 100,
) -> float:
    """Feed ``windows`` windows where ``size_at(window, snapshot)`` is the key's traced bytes."""
    t = 1000.0
    for w in range(windows):
        shots = []
        for j in range(snapshots):
            size = size_at(w, j)
            shots.append((t + j * 0.1, {key: (size, max(size // block, 0))} if size else {}))
        detector.add_window(shots, routes(w) if routes else None)
        t += period
    return t


def make() -> LeakDetector:
    return LeakDetector(max_sites=16, max_windows=32, site_chooser=CHOOSER)
