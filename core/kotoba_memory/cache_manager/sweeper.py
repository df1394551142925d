"""Reclaims expired entries of idle caches, as one task on the process layer's scheduler thread.

Caches with ttl'd entries register here; the task holds them only weakly, runs again at the earliest
deadline any of them reports (at most every ``max_interval`` seconds, at least ``min_interval`` apart),
and asks each to drop a bounded batch of expired entries. The task ends when no cache is registered
and is scheduled again on the next registration. Errors are caught and counted, never raised into
the host app.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Protocol

from kotoba_memory.process import Task, forks, scheduler

__all__ = ["Sweepable", "sweeper"]

log = logging.getLogger(__name__)


class Sweepable(Protocol):
    def sweep_expired(self, limit: int) -> float | None:
        """Drop up to ``limit`` expired entries; return the next deadline (monotonic) or None."""


class _Sweeper:
    min_interval = 0.05
    max_interval = 0.5
    batch = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._caches: weakref.WeakSet[Sweepable] = weakref.WeakSet()
        self._task: Task | None = None
        self.errors = 0
        self.sweeps = 0
        forks.register(self.reinit_after_fork, name="cache_manager.sweeper")

    def register(self, cache: Sweepable) -> None:
        """Watch ``cache`` until it is garbage collected or :meth:`unregister` is called."""
        with self._lock:
            self._caches.add(cache)
            if self._task is None:
                self._task = scheduler.every(
                    self.max_interval, self._sweep, name="cache.sweeper", delay_s=0.0
                )
        scheduler.resume()

    def unregister(self, cache: Sweepable) -> None:
        with self._lock:
            self._caches.discard(cache)

    def stop(self, timeout: float = 2.0) -> None:
        """Cancel the task (it is scheduled again on the next registration)."""
        with self._lock:
            task, self._task = self._task, None
        if task is not None:
            task.cancel()

    @property
    def running(self) -> bool:
        return self._task is not None

    def _sweep(self) -> float | None:
        with self._lock:
            if not self._caches:
                task, self._task = self._task, None
                if task is not None:
                    task.cancel(wait=False)
                return None
            caches = list(self._caches)
        deadline: float | None = None
        for cache in caches:
            try:
                nxt = cache.sweep_expired(self.batch)
            except Exception:  # never let one broken cache stop the sweeper
                self.errors += 1
                log.exception("cache sweeper: sweeping %r failed", cache)
                continue
            if nxt is not None:
                deadline = nxt if deadline is None else min(deadline, nxt)
        self.sweeps += 1
        del caches
        wait = self.max_interval if deadline is None else deadline - time.monotonic()
        return min(max(wait, self.min_interval), self.max_interval)

    def reinit_after_fork(self) -> None:
        """In a forked child: a new lock; the task itself survives and runs once the scheduler resumes."""
        self._lock = threading.Lock()


sweeper = _Sweeper()
