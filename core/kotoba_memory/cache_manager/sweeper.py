"""One shared daemon thread that reclaims expired entries of idle caches.

Caches with ttl'd entries register here; the thread holds them only weakly, wakes at the earliest
deadline any of them reports (at most every ``max_interval`` seconds, at least ``min_interval`` apart),
and asks each to drop a bounded batch of expired entries. It exits when no cache is registered and
restarts on the next registration. Errors are caught and counted, never raised into the host app.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Protocol

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
        self._wake = threading.Event()
        self._caches: weakref.WeakSet[Sweepable] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.errors = 0
        self.sweeps = 0

    def register(self, cache: Sweepable) -> None:
        """Watch ``cache`` until it is garbage collected or :meth:`unregister` is called."""
        with self._lock:
            self._caches.add(cache)
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="kotoba-cache-sweeper", daemon=True)
                self._thread.start()

    def unregister(self, cache: Sweepable) -> None:
        with self._lock:
            self._caches.discard(cache)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (it restarts on the next registration)."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping or not self._caches:
                    self._thread = None
                    return
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
            now = time.monotonic()
            wait = self.max_interval if deadline is None else deadline - now
            self._wake.wait(min(max(wait, self.min_interval), self.max_interval))
            self._wake.clear()


    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork and its lock may be held: start afresh.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        if len(self._caches):
            with self._lock:
                self._thread = threading.Thread(target=self._run, name="kotoba-cache-sweeper", daemon=True)
                self._thread.start()


sweeper = _Sweeper()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=sweeper._after_fork_in_child)
