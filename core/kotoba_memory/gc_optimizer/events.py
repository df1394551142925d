"""Recording collections: the lock-free ``gc.callbacks`` hook and its bounded ring of events."""

from __future__ import annotations

import gc
import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from kotoba_memory import _native

NUM_GENERATIONS = 3
_T = TypeVar("_T")


class GcEvent(NamedTuple):
    """One garbage collection, observed through ``gc.callbacks`` or reported by hand."""

    seq: int
    generation: int
    pause_s: float
    collected: int
    uncollectable: int
    timestamp: float  # time.time() when the collection ended
    explicit: bool = False  # started by kotoba-memory itself (between requests, idle time, optimize)
    manual: bool = False  # reported through record_collection() rather than observed
    bytes_reclaimed: int = 0  # only known for manual records
    examined: int = 0  # young objects pending when the collection started (observed events only)


# Events memory_bytes() sizes one by one; the rest of the ring is counted at their mean.
_SIZED_EVENTS = 32


def _event_bytes(event: GcEvent) -> int:
    """One event's bytes: the tuple and the floats and ints it holds alone (not the shared small ones)."""
    size = sys.getsizeof(event)
    for value in event:
        if isinstance(value, float) or (isinstance(value, int) and not -5 <= value <= 256):
            size += sys.getsizeof(value)
    return size


# (generation, collected, examined, explicit) -> None; called inside the gc callback, must not lock.
CollectionListener = Callable[[int, int, int, bool], None]


class PyGcTally:
    """The cumulative pause total (pure Python: the reference of ``_crecord.GcTally``, which the request
    recorder reads without a Python call)."""

    pause_total_ns: int = 0


_crecord = _native.load("_crecord")
_Tally: Any = _crecord.GcTally if _crecord is not None else PyGcTally
if TYPE_CHECKING:
    _Tally = PyGcTally


class GcRecorder(_Tally):
    """Keeps a bounded ring of :class:`GcEvent` plus cumulative per-generation totals.

    The gc callback takes no lock: CPython runs one collection at a time, so the callback is the only
    writer of the observed totals, and ``deque.append`` / ``next(itertools.count)`` are atomic.
    Manual records go to separate totals under a lock.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._events: deque[GcEvent] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._installed = False
        self._t0 = 0
        self._examined = 0
        self.explicit_thread: int | None = None
        self.listener: CollectionListener | None = None
        self.callback_errors = 0
        self.pause_total_ns = 0
        self.counts = [0] * NUM_GENERATIONS
        self.pause_ns = [0] * NUM_GENERATIONS
        self.collected = [0] * NUM_GENERATIONS
        self.uncollectable = [0] * NUM_GENERATIONS
        self.explicit_count = 0
        self.manual_counts = [0] * NUM_GENERATIONS
        self.manual_pause_ns = [0] * NUM_GENERATIONS
        self.manual_bytes = 0

    def reset_totals(self) -> None:
        """Forget events and totals (seq and ``pause_total_ns`` keep counting); only while uninstalled."""
        if self._installed:
            raise RuntimeError("reset_totals() while the gc callback is installed")
        with self._lock:
            self._events.clear()
            for totals in (self.counts, self.pause_ns, self.collected, self.uncollectable,
                           self.manual_counts, self.manual_pause_ns):
                totals[:] = [0] * NUM_GENERATIONS
            self.explicit_count = 0
            self.manual_bytes = 0

    # -- gc.callbacks -----------------------------------------------------------------------------
    def install(self) -> None:
        """Append the callback to ``gc.callbacks`` (idempotent)."""
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        """Remove the callback from ``gc.callbacks`` (idempotent)."""
        if self._installed:
            try:
                gc.callbacks.remove(self._callback)
            except ValueError:
                pass
            self._installed = False
            self._t0 = 0

    @property
    def installed(self) -> bool:
        """Whether the callback is in ``gc.callbacks``."""
        return self._installed

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # No locks, no logging, no raising here: this runs inside the collector of whatever thread
        # happened to allocate.
        try:
            if phase == "start":
                self._examined = gc.get_count()[0]
                self._t0 = time.perf_counter_ns()
                return
            t0 = self._t0
            if not t0:
                return
            pause = time.perf_counter_ns() - t0
            self._t0 = 0
            generation = info["generation"]
            collected = info["collected"]
            uncollectable = info["uncollectable"]
            explicit = self.explicit_thread == threading.get_ident()
            examined = self._examined
            self._events.append(
                GcEvent(
                    next(self._seq), generation, pause / 1e9, collected, uncollectable, time.time(),
                    explicit, False, 0, examined,
                )
            )
            self.pause_total_ns += pause
            self.counts[generation] += 1
            self.pause_ns[generation] += pause
            self.collected[generation] += collected
            self.uncollectable[generation] += uncollectable
            if explicit:
                self.explicit_count += 1
            listener = self.listener
            if listener is not None:
                listener(generation, collected, examined, explicit)
        except Exception:
            self.callback_errors += 1

    # -- manual records ---------------------------------------------------------------------------
    def record_manual(self, pause_ns: int, bytes_reclaimed: int, generation: int) -> GcEvent:
        """Store a collection reported by hand (e.g. from another runtime or a replayed log)."""
        event = GcEvent(
            next(self._seq), generation, pause_ns / 1e9, 0, 0, time.time(), False, True, bytes_reclaimed, 0
        )
        with self._lock:
            self._events.append(event)
            self.manual_counts[generation] += 1
            self.manual_pause_ns[generation] += pause_ns
            self.manual_bytes += bytes_reclaimed
        return event

    def reset_lock(self) -> None:
        """Replace the manual-record lock (after fork, when another thread may have held it)."""
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------------------
    def _read(self, read: Callable[[Sequence[GcEvent]], _T]) -> _T:
        """``read(ring)``, again when the gc callback appended while it walked (the deque raises
        RuntimeError), up to eight times; then over a list copy of the ring."""
        for _ in range(8):
            try:
                return read(self._events)
            except RuntimeError:
                continue
        return read(list(self._events))

    def snapshot(self) -> tuple[GcEvent, ...]:
        """A consistent copy of the ring, oldest first."""
        return self._read(tuple)

    def memory_bytes(self) -> int:
        """Bytes the ring and its events hold now (shared small ints and bools not counted): the newest
        events' mean size times the count. Events all have one shape, and sizing each of a full ring
        (2048) cost ~2.3 ms at every OpenTelemetry collection."""
        size = sys.getsizeof(self._events) + sys.getsizeof(self)
        newest = self._read(lambda ring: list(itertools.islice(reversed(ring), _SIZED_EVENTS)))
        if not newest:
            return size
        sized = sum(_event_bytes(event) for event in newest)
        return size + round(sized * len(self._events) / len(newest))

    def events_since(self, cursor: int) -> tuple[int, list[GcEvent]]:
        """Events with ``seq > cursor`` still in the ring, and the cursor to pass next time."""
        # From the newest back to the cursor: a request thread drains about once a second, and copying
        # the whole ring (2048 events) each time cost ~60 µs where the few new ones cost ~1 µs.
        def newer_than_cursor(ring: Sequence[GcEvent]) -> list[GcEvent]:
            newer: list[GcEvent] = []
            for event in reversed(ring):
                if event.seq <= cursor:
                    break
                newer.append(event)
            newer.reverse()
            return newer

        newer = self._read(newer_than_cursor)
        return (newer[-1].seq if newer else cursor), newer
