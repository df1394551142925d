"""The GC optimizer: observes every collection and tunes CPython's collector from what it sees."""

from __future__ import annotations

import contextlib
import datetime
import gc
import itertools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kotoba_memory import _native
from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory.gc_optimizer.analysis import AnalysisInput, GcAnalysis, build_analysis, time_share_of
from kotoba_memory.gc_optimizer.events import NUM_GENERATIONS, GcEvent, GcRecorder
from kotoba_memory.gc_optimizer.memory import MemoryCeiling, malloc_trim
from kotoba_memory.process import Task, activity, forks, registry, scheduler
from kotoba_memory.validation import (
    check_bool,
    check_int,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)

logger = logging.getLogger("kotoba_memory.gc")

# Yield (objects collected / young objects examined) of an automatic young collection below which
# it mostly traversed live objects (raise threshold0), and above which garbage is piling up (lower it).
_LOW_YIELD = 0.05
_HIGH_YIELD = 0.25
_MIN_EXAMINED = 64
_PRESSURE_HYSTERESIS_PERCENT = 5.0
_MAX_PRESSURE_BACKOFF = 64
_MAX_CHECK_GAP = 32
# After this many checks in a row found (almost) nothing left behind, on_request_end() becomes a bare
# C-level counter and the monitor thread watches the young generation instead (microsecond endpoints).
_QUIET_CHECKS_FOR_COUNTING = 4
_NEVER = 1 << 62
# Inside a long request the monitor checks the budget this often (seconds, at most its interval).
_LONG_REQUEST_POLL_S = 0.1
# Automatic collections in a row with a request in flight and none ending: a long request.
_LONG_REQUEST_COLLECTIONS = 8

# threshold0 of this interpreter's collector as this module found it, and the documented defaults
# when the app had set 0 (automatic collection off) before importing us. Never assume one version's.
_IMPORT_THRESHOLD0 = gc.get_threshold()[0]
_DEFAULT_THRESHOLD0 = {(3, 11): 700, (3, 12): 700, (3, 13): 2000}
# Objects frozen when this module was imported: on 3.12+ the interpreter's own immortal objects, which
# its collector keeps in the permanent generation. More than this when found means the app froze some.
_IMPORT_FREEZE_COUNT = gc.get_freeze_count()


def default_young_threshold(found: int = 0) -> int:
    """The young-generation threshold to collect at: ``found`` if set, else this interpreter's own."""
    if found > 0:
        return found
    if _IMPORT_THRESHOLD0 > 0:
        return _IMPORT_THRESHOLD0
    return _DEFAULT_THRESHOLD0.get(sys.version_info[:2], 2000)


#: Modes :meth:`GcOptimizer.analyze` names (``GcAnalysis.mode``).
MODES = ("stopped", "recording", "warming_up", "between_requests", "long_request_stepping", "budget")
_MODE_CAUSES = {
    "stopped": "stopped",
    "recording": "adaptive_off",
    "warming_up": "warmup",
    "between_requests": "request_boundaries",
    "long_request_stepping": "long_request",
    "budget": "rss_budget",
}


class GcOptimizerError(KotobaMemoryError, RuntimeError):
    """The GC optimizer cannot do what was asked (e.g. a second one started in the same process)."""


@dataclass(frozen=True, slots=True)
class GcChange:
    """One change the optimizer made to the collector's settings, kept so it can be explained."""

    timestamp: float
    action: str  # set_threshold, freeze, unfreeze, collect, malloc_trim, enable, disable, restore
    before: Any
    after: Any
    reason: str


@dataclass(frozen=True, slots=True)
class _FoundState:
    thresholds: tuple[int, int, int]
    enabled: bool
    freeze_count: int


def _profiler_holding_objects() -> bool:
    profiler = registry.active("profiler")
    return profiler is not None and getattr(profiler, "holding_objects", False) is True


def get_active_gc_optimizer() -> GcOptimizer | None:
    """The started :class:`GcOptimizer` of this process, if any."""
    optimizer: GcOptimizer | None = registry.active("gc_optimizer")
    return optimizer


def _count_value(counter: itertools.count[int]) -> int:
    """The next value ``counter`` would return, read without advancing it."""
    return int(repr(counter)[6:-1])


class PyGcHooks:
    """The optimizer's per-request counters and hooks (pure Python: the reference of
    ``_crecord.GcHooks``, whose fields the request recorder reads and counts without a Python frame)."""

    _recorder: GcRecorder
    #: ``requests_seen`` at which :meth:`request_ended` runs ``_check_at_boundary(n)``.
    _next_check: int = _NEVER

    def __init__(self) -> None:
        self._ended = itertools.count(1)  # next() on it is atomic: no end is lost to a racing thread

    def _check_at_boundary(self, n: int) -> None:
        raise NotImplementedError

    @property
    def requests_seen(self) -> int:
        """Requests ended since the count began."""
        return _count_value(self._ended) - 1

    def _reset_requests(self) -> None:
        self._ended = itertools.count(1)

    def pause_total_ns(self) -> int:
        """Cumulative GC pause observed through ``gc.callbacks`` since :meth:`start`, in nanoseconds."""
        return self._recorder.pause_total_ns

    def request_ended(self) -> object:
        """The between-request hook alone, for a caller that counts requests in flight itself (the
        middleware does, through the process layer); collects young garbage when enough has piled up."""
        n = next(self._ended)
        if n >= self._next_check:
            self._check_at_boundary(n)
        return n


_crecord = _native.load("_crecord")
_Hooks: Any = _crecord.GcHooks if _crecord is not None else PyGcHooks
if TYPE_CHECKING:
    _Hooks = PyGcHooks


class GcOptimizer(_Hooks):
    """Records every collection via ``gc.callbacks`` and, when ``adaptive``, tunes the collector.

    Adaptive mode collects young garbage between requests (``on_request_end``) once enough objects
    have accumulated, raises the young threshold while automatic collections find only live objects
    (and lowers it again when they find garbage, so a long request cannot pile it up), freezes the
    long-lived heap after warm-up, moves full collections into idle time, and forces collection when
    memory use crosses ``target_memory_usage_percent``. Every change is logged and undone by
    :meth:`restore`.
    """

    def __init__(
        self,
        *,
        target_memory_usage_percent: float = 75.0,
        adaptive: bool = True,
        monitoring_interval_s: float = 1.0,
        max_young_threshold: int = 50_000,
        auto_freeze: bool = True,
        warmup_requests: int = 10,
        idle_after_s: float = 2.0,
        pause_target_ms: float = 10.0,
        heap_growth_ceiling: float = 0.05,
        memory_limit_bytes: int | None = None,
        event_capacity: int = 2048,
    ) -> None:
        check_positive(target_memory_usage_percent, "target_memory_usage_percent", high=100.0)
        check_positive(monitoring_interval_s, "monitoring_interval_s", high=3600.0)
        check_positive_int(max_young_threshold, "max_young_threshold", high=10_000_000)
        check_non_negative_int(warmup_requests, "warmup_requests", high=10**9)
        check_non_negative(idle_after_s, "idle_after_s", high=86_400.0)
        check_positive(pause_target_ms, "pause_target_ms", high=60_000.0)
        check_positive(heap_growth_ceiling, "heap_growth_ceiling", high=100.0)
        check_int(event_capacity, "event_capacity", low=16, high=10_000_000)
        if memory_limit_bytes is not None:
            check_positive_int(memory_limit_bytes, "memory_limit_bytes", high=1 << 62)
        check_bool(adaptive, "adaptive")
        check_bool(auto_freeze, "auto_freeze")
        self.target_memory_usage_percent = float(target_memory_usage_percent)
        self.adaptive = adaptive
        self.monitoring_interval_s = float(monitoring_interval_s)
        self.max_young_threshold = max_young_threshold
        self.auto_freeze = auto_freeze
        self.warmup_requests = warmup_requests
        self.idle_after_s = float(idle_after_s)
        self.pause_target_s = pause_target_ms / 1e3
        self.heap_growth_ceiling = float(heap_growth_ceiling)
        self.memory_limit_bytes = memory_limit_bytes

        super().__init__()
        self._recorder = GcRecorder(event_capacity)
        self._ceiling = MemoryCeiling(self.target_memory_usage_percent, memory_limit_bytes)
        self._lock = threading.RLock()
        self._changes: deque[GcChange] = deque(maxlen=256)
        self._unlogged: deque[GcChange] = deque(maxlen=256)
        self._found: _FoundState | None = None
        self._running = False
        self._tuning = False
        self._pressure = False
        self._we_froze = False
        self._freeze_active = False
        self._warmed_up = False
        self._base: tuple[int, int, int] = gc.get_threshold()
        self._valve = self._base[0]
        self._boundary_threshold = default_young_threshold(self._base[0])
        self._gen1_every = max(1, self._base[1])
        self._mode = "stopped"
        self._mode_reason = "not started"
        self._mode_cause = "stopped"
        self._long_request = False
        self._long_request_reason = ""
        self._young_at_tick = 0
        self._ended_at_collection = 0
        self._ended_at_long = 0
        self._collections_without_end = 0
        self._freeze_refused = False
        self._frozen_were_immortal = False
        # A census thaws the heap we froze (thawed()); none is refrozen meanwhile, and the next request's
        # end after it collects the young generations and freezes again.
        self._thaw_depth = 0
        self._refreeze_due = False
        self._last_budget_was_step = False
        self._budget_due = False
        self._next_full_tick = 0.0
        self._no_end_since_poll = True
        self.long_request_steps = 0
        self.budget_collections = 0
        self._warmup_at = -1
        # on_request_end() reads gc.get_count() (~0.1 us) only every few requests, as far apart as the
        # measured young-object growth per request allows; _NEVER while not tuning.
        self._next_check = _NEVER
        self._check_gap = 1
        self._checked_at = 0
        self._count_after_check = 0
        self._quiet_checks = 0
        self._counting_only = False
        self._young_collections_at_counting = 0
        self._start_wall = time.monotonic()
        self._start_cpu = time.process_time()
        self._task: Task | None = None
        self._last_activity = time.monotonic()
        self._ended_seen = 0
        self._ended_at_maintenance = 0
        self._rss_at_full = 0
        self._pressure_backoff = 1
        self._next_pressure_collect = 0.0
        self._last_usage_percent: float | None = None
        self.refreezes = 0
        self.boundary_collections = 0
        self.monitor_errors = 0
        forks.register(self.reinit_after_fork, name="gc_optimizer")

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin recording collections (and tuning, when adaptive). Calling it twice is harmless."""
        with self._lock:
            if self._running:
                return
            if registry.claim("gc_optimizer", self, replace=False) not in (None, self):
                raise GcOptimizerError(
                    "another GcOptimizer is already active in this process; stop() it first "
                    "(get_active_gc_optimizer() returns it)"
                )
            self._capture_found()
            self._base = gc.get_threshold()
            self._valve = self._base[0]
            self._boundary_threshold = default_young_threshold(self._base[0])
            self._gen1_every = max(1, self._base[1])
            self._long_request = False
            self._refreeze_due = False  # a thaw of an earlier run: that run's freeze was undone by stop()
            self._start_wall = time.monotonic()
            self._start_cpu = time.process_time()
            self._recorder.reset_totals()  # analyze() covers this run only
            self._recorder.install()
            self._running = True
            if self.adaptive:
                self._recorder.listener = self._on_collection
                self._warmed_up = False
                self._warmup_at = self.requests_seen + max(1, self.warmup_requests)
                self._tuning = True
                self._checked_at = self.requests_seen
                self._count_after_check = gc.get_count()[0]
                self._check_gap = 1
                self._next_check = self._checked_at + 1
                self._rss_at_full = self._ceiling.process_rss()
                self._set_mode("warming_up", f"collecting as found until {self.warmup_requests} requests end")
                self._start_monitor()
            else:
                self._set_mode("recording", "adaptive=False: records and analyses; optimize() on demand")
        self._flush_change_log()

    def stop(self) -> None:
        """Stop recording and tuning and put the collector back as :meth:`start` found it."""
        with self._lock:
            self._tuning = False
            self._leave_counting_mode()
            self._recorder.listener = None
            task, self._task = self._task, None
        if task is not None:
            task.cancel()  # waits for a check in progress
        with self._lock:
            self._recorder.uninstall()
            self.restore()
            self._running = False
            self._set_mode("stopped", "stop() restored the collector as found")
            registry.release("gc_optimizer", self)
        self._flush_change_log()

    async def astart(self) -> None:
        """Async twin of :meth:`start` (fast, runs inline)."""
        self.start()

    async def astop(self) -> None:
        """Async twin of :meth:`stop` (joins the monitor thread off the event loop)."""
        import asyncio  # lazily: it pulls in ssl, several MB of RSS for sync-only apps

        await asyncio.to_thread(self.stop)

    def __enter__(self) -> GcOptimizer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether :meth:`start` has been called and :meth:`stop` has not."""
        return self._running

    @property
    def refreezes_heap(self) -> bool:
        """Whether it froze the heap itself and freezes it again after young collections between
        requests (so :meth:`thawed` can hand the whole heap to a census for a moment)."""
        return self._running and self._tuning and self._freeze_active and self._we_froze

    @contextlib.contextmanager
    def thawed(self) -> Iterator[bool]:
        """Unfreeze the heap it froze for the length of the block (``gc.get_objects()`` must list every
        object for a census); yields whether it did. Nothing is frozen during the block, and the first
        request to end after it collects the young generations and freezes the heap again."""
        with self._lock:
            thaw = self.refreezes_heap and gc.get_freeze_count() > 0
            if thaw:
                gc.unfreeze()
            self._thaw_depth += 1
        try:
            yield thaw
        finally:
            with self._lock:
                self._thaw_depth = max(0, self._thaw_depth - 1)
                if thaw:
                    self._refreeze_due = True
                self._check_refreeze_soon()

    def _check_refreeze_soon(self) -> None:
        """Make the next request's end run the boundary check while a refreeze is due (a request
        ending in another thread may have set a later check, or none, meanwhile)."""
        if self._refreeze_due and self._thaw_depth == 0 and self._tuning:
            soon = self.requests_seen + 1
            if self._next_check > soon:
                self._next_check = soon

    # -- recording -------------------------------------------------------------------------------
    def record_collection(
        self, pause: float | datetime.timedelta, bytes_reclaimed: int, generation: int
    ) -> GcEvent:
        """Record a collection by hand (pause in seconds or a timedelta); returns the stored event."""
        if isinstance(pause, datetime.timedelta):
            pause_s = pause.total_seconds()
        elif isinstance(pause, int | float) and not isinstance(pause, bool):
            pause_s = float(pause)
        else:
            raise TypeError(
                f"pause must be seconds (float) or a datetime.timedelta, got {type(pause).__name__}"
            )
        if not pause_s >= 0.0 or pause_s == float("inf"):
            raise ValueError(f"pause must be a finite, non-negative duration, got {pause!r}")
        if not isinstance(bytes_reclaimed, int) or isinstance(bytes_reclaimed, bool):
            raise TypeError(f"bytes_reclaimed must be an int, got {type(bytes_reclaimed).__name__}")
        if bytes_reclaimed < 0:
            raise ValueError(f"bytes_reclaimed must be >= 0, got {bytes_reclaimed}")
        if not isinstance(generation, int) or isinstance(generation, bool):
            raise TypeError(f"generation must be an int, got {type(generation).__name__}")
        if not 0 <= generation < NUM_GENERATIONS:
            raise ValueError(f"generation must be 0, 1 or 2, got {generation}")
        return self._recorder.record_manual(round(pause_s * 1e9), bytes_reclaimed, generation)

    def events_since(self, cursor: int) -> tuple[int, list[GcEvent]]:
        """Events newer than ``cursor`` (start with 0) still in the ring, and the next cursor."""
        if not isinstance(cursor, int) or isinstance(cursor, bool):
            raise TypeError(f"cursor must be an int, got {type(cursor).__name__}")
        return self._recorder.events_since(cursor)

    @property
    def changes(self) -> list[GcChange]:
        """The most recent changes made to the collector, oldest first (bounded)."""
        return list(self._changes)

    @property
    def in_flight(self) -> int:
        """Requests started and not yet ended in this process (the process layer's one count)."""
        return activity.in_flight()

    # -- request hooks (hot path) ----------------------------------------------------------------
    #: Mark the start of a unit of work (a request) by hand. Cheap and thread-safe: a C-level call
    #: that counts the request in flight in the process layer. Middleware calls ``activity.begin``.
    on_request_start: Callable[[], object] = staticmethod(activity.mark_start)

    def on_request_end(self) -> None:
        """Mark its end by hand; collects young garbage here when enough has accumulated. Thread-safe."""
        activity.mark_end()
        self.request_ended()

    def _check_at_boundary(self, n: int) -> None:
        if not self._tuning:
            self._next_check = _NEVER
            return
        if self._long_request:
            # A request ended: the monitor's own rule ends the long request; apply it now, not at the
            # monitor's next tick, or a refreeze due after a census's thaw waits for that tick.
            self._end_long_request()
        young = gc.get_count()[0]
        # After a census's thaw, freeze again at once: automatic collections inside requests can leave
        # the boundary nothing to collect for good (a field worker ran 87k requests without one).
        refreeze = self._refreeze_due and self._thaw_depth == 0 and not self._long_request
        if refreeze or young >= self._boundary_threshold:
            self._collect_at_boundary(1 if refreeze else None)
            after = gc.get_count()[0]
            self._check_gap = 1
        else:
            # Young objects left behind per request since the last check: check again before twice that
            # rate could reach the boundary threshold (at most _MAX_CHECK_GAP requests later).
            per_request = max(0, young - self._count_after_check) / max(1, n - self._checked_at)
            room = self._boundary_threshold - young
            gap = int(room / (2.0 * per_request)) if per_request > 0 else _MAX_CHECK_GAP
            self._check_gap = max(1, min(_MAX_CHECK_GAP, gap, 2 * self._check_gap))
            after = young
            quiet = self._check_gap == _MAX_CHECK_GAP and per_request * 32 * _MAX_CHECK_GAP < room
            self._quiet_checks = self._quiet_checks + 1 if quiet else 0
        self._checked_at = n
        self._count_after_check = after
        self._next_check = n + self._check_gap
        if n >= self._warmup_at and not self._warmed_up:
            self._finish_warmup()
        elif self._quiet_checks >= _QUIET_CHECKS_FOR_COUNTING and self._warmed_up:
            self._enter_counting_mode()
        self._check_refreeze_soon()

    def _enter_counting_mode(self) -> None:
        # Requests leave nothing for the collector: even the check costs more than it can save, so
        # request_ended only counts until the monitor sees growth.
        self._young_collections_at_counting = self._recorder.counts[0]
        self._counting_only = True
        self._next_check = _NEVER

    def _leave_counting_mode(self) -> None:
        self._counting_only = False
        self._quiet_checks = 0
        self._check_gap = 1
        self._checked_at = self.requests_seen
        self._count_after_check = gc.get_count()[0]
        self._next_check = self._checked_at + 1 if self._tuning else _NEVER

    def _collect_at_boundary(self, generation: int | None = None) -> None:
        if generation is None:
            generation = 1 if gc.get_count()[1] + 1 >= self._gen1_every else 0
        recorder = self._recorder
        recorder.explicit_thread = threading.get_ident()
        try:
            gc.collect(generation)
        finally:
            recorder.explicit_thread = None
        self.boundary_collections += 1
        if generation != 1 or self._thaw_depth:
            return
        if self._freeze_active and not self._pressure and not self._long_request:
            # What survived a young-generation collection between requests is long-lived: move it to the
            # permanent generation too, so full collections keep scanning almost nothing.
            gc.freeze()
            self.refreezes += 1
            self._refreeze_due = False
        elif not self._freeze_active:
            self._refreeze_due = False  # e.g. memory pressure thawed the heap for good

    def _finish_warmup(self) -> None:
        self._warmed_up = True
        if not self._long_request and not self._pressure:
            self._set_mode("between_requests", "young garbage is collected when requests end")
        if not self.auto_freeze or self._pressure or self._freeze_active:
            return
        with self._lock:
            if not self._tuning or self._freeze_active or not self._may_freeze("warm-up freeze"):
                return
            # A full collection first: garbage frozen now would stay until the next full collection.
            self._explicit_collect(2)
            before = gc.get_freeze_count()
            gc.freeze()
            self._we_froze = True
            self._freeze_active = True
            self._note(
                "freeze", before, gc.get_freeze_count(),
                f"warm-up done after {self.warmup_requests} requests: full collections skip the heap",
            )

    # -- the gc callback listener (no locks) ------------------------------------------------------
    def _on_collection(self, generation: int, collected: int, examined: int, explicit: bool) -> None:
        # While our own background work holds many new objects (a profiler window's read-backs: tens of
        # thousands of live tuples), a young collection, on whichever thread it runs, finds those: it
        # says nothing of the app's requests, so it neither tunes the valve nor counts towards a long
        # request. So does any collection on the scheduler's thread (only our work runs there).
        if explicit or not self._tuning or scheduler.on_own_thread() or _profiler_holding_objects():
            return
        if not self._long_request:
            self._watch_for_long_request()
        over_budget = self._over_budget_in_collection()
        if generation != 0 or self._pressure or examined < _MIN_EXAMINED:
            return
        current = self._valve
        if current <= 0:
            return
        ratio = collected / examined
        if ratio < _LOW_YIELD:
            if over_budget:
                return  # no more room for young objects until the budget collection ran
            new = min(current * 2, self.max_young_threshold)
            why = f"automatic young collection found {ratio:.1%} garbage: objects were still live"
        elif ratio > _HIGH_YIELD:
            new = max(current // 2, self._base[0])
            why = f"automatic young collection found {ratio:.0%} garbage: collect sooner"
        else:
            return
        if new != current:
            self._set_young_threshold(new, why)

    def _rss_budget(self, rss_at_full: int) -> int:
        """The RSS past which a budget collection is due: the last full collection's plus the ceiling."""
        return int(rss_at_full * (1.0 + self.heap_growth_ceiling))

    def _over_budget_in_collection(self) -> bool:
        """Whether RSS is past the budget, read once (a pread) in the gc callback; no locks.

        Over the budget threshold0 stops rising and the monitor (polling every 0.1 s while a collection
        is due) collects. Dropping threshold0 to the found value here was measured to be worse: live
        rows get promoted into the old generations and die there (long_blob: 250 MB against 199 MB).
        """
        rss_at_full = self._rss_at_full
        if not rss_at_full:
            return False
        rss = self._ceiling.process_rss()
        if rss <= self._rss_budget(rss_at_full):
            return self._budget_due
        if not self._budget_due:
            self._budget_due = True
            if not self._pressure:
                self._set_mode(
                    "budget",
                    f"RSS {rss / rss_at_full - 1.0:.1%} over the last full collection's, past the "
                    f"{self.heap_growth_ceiling:.0%} budget: threshold0 held, budget collection due",
                )
        return True

    def _watch_for_long_request(self) -> None:
        """In the gc callback (no locks): automatic collections keep coming while a request is in
        flight and none ends, so switch to long-request mode now; the monitor ends it later."""
        ended = self.requests_seen
        if ended != self._ended_at_collection:
            self._ended_at_collection = ended
            self._collections_without_end = 0
            return
        self._collections_without_end += 1
        if self._collections_without_end >= _LONG_REQUEST_COLLECTIONS and activity.in_flight() > 0:
            self._collections_without_end = 0
            self._enter_long_request(
                f"{_LONG_REQUEST_COLLECTIONS} automatic collections ran while a request was in flight "
                "and none ended"
            )

    def _set_young_threshold(self, new: int, why: str) -> None:
        """Set threshold0 (the valve) and note why; lock-free, so the gc callback may call it.

        threshold1 stays as found: scaling it down as threshold0 rises was measured to promote live
        rows into gen 2 sooner, where they die and wait for a full collection (long_blob: 245 MB
        against 203 MB).
        """
        before = gc.get_threshold()
        after = (new, before[1], before[2])
        self._valve = new
        if after != before:
            gc.set_threshold(*after)
            self._note("set_threshold", before, after, why)

    # -- background monitor ------------------------------------------------------------------------
    def _start_monitor(self) -> None:
        self._last_activity = time.monotonic()
        self._ended_seen = self.requests_seen
        self._ended_at_maintenance = self._ended_seen
        if self._task is None:
            # The first check comes soon: the budget must hold in a short run or a first long request.
            self._task = scheduler.every(
                self.monitoring_interval_s, self._monitor, name="gc_optimizer.monitor",
                delay_s=min(self.monitoring_interval_s, _LONG_REQUEST_POLL_S),
            )

    def _monitor(self) -> float | None:
        """One check of the ceiling, the budget, long requests, idle time and counting mode (a
        scheduler task); returns the delay to the next check. Never raises into the host."""
        delay: float | None = None
        try:
            delay = self._tick()
        except Exception:
            self.monitor_errors += 1
            logger.debug("GC monitor tick failed", exc_info=True)
        try:
            self._flush_change_log()
        except Exception:
            self.monitor_errors += 1
        return delay

    def _poll_delay(self) -> float | None:
        """0.1 s while a request may be a long one (in flight, none ended since the last check), in a
        long request or over the budget; else None (the monitoring interval): a busy server of short
        requests is not woken ten times a second."""
        if self._long_request or self._budget_due or (activity.in_flight() > 0 and self._no_end_since_poll):
            return min(self.monitoring_interval_s, _LONG_REQUEST_POLL_S)
        return None

    def _tick(self) -> float | None:
        """The ceiling and counting mode every interval, the budget and long requests every call."""
        if not self._tuning:
            return None
        now = time.monotonic()
        rss = self._ceiling.process_rss()  # one reading for the ceiling and the budget
        if now >= self._next_full_tick:
            self._next_full_tick = now + self.monitoring_interval_s * 0.95
            if self._full_tick(now, rss):
                return None
        return self._budget_tick(now, rss)

    def _full_tick(self, now: float, rss: int) -> bool:
        """Counting mode and the memory ceiling, every monitoring interval; True under pressure."""
        if self._counting_only and (
            gc.get_count()[0] >= self._boundary_threshold // 2
            or self._recorder.counts[0] != self._young_collections_at_counting
        ):
            self._leave_counting_mode()  # requests leave garbage again: check at boundaries
        usage = self._ceiling.due_usage(now, rss, self.monitoring_interval_s)
        if usage is None:  # far under the target (so no pressure): the last reading stands
            return False
        self._last_usage_percent = usage.percent
        if self._ceiling.over_target(usage):
            self._relieve_pressure(usage.percent, now)
            return True
        if self._pressure and usage.percent < self.target_memory_usage_percent - _PRESSURE_HYSTERESIS_PERCENT:
            with self._lock:
                self._pressure = False
                self._pressure_backoff = 1
                self._freeze_active = self._we_froze
                if not self._we_froze and self.auto_freeze:
                    # Freeze again after a fresh warm-up (which starts with a full collection).
                    self._warmed_up = False
                    self._warmup_at = self.requests_seen + max(1, self.warmup_requests)
                self._note("pressure_end", None, round(usage.percent, 1), "memory use back under target")
                self._set_mode(*self._steady_mode())
        return False

    def _budget_tick(self, now: float, rss: int) -> float | None:
        """Long requests, the RSS budget and idle time: every interval, and every 0.1 s while a request
        may be a long one (one RSS pread and a few comparisons)."""
        ended = self.requests_seen
        request_ended = ended != self._ended_seen
        self._no_end_since_poll = not request_ended
        if request_ended:
            self._ended_seen = ended
            self._last_activity = now
        young_collections = self._recorder.counts[0]
        collected_since = young_collections != self._young_at_tick
        self._young_at_tick = young_collections
        in_flight = self.in_flight
        if self._long_request and (ended != self._ended_at_long or in_flight == 0):
            self._end_long_request()
        elif (
            not self._long_request
            and not request_ended
            and in_flight > 0
            and (collected_since or gc.get_count()[0] >= self._boundary_threshold)
        ):
            self._begin_long_request(now)
        if self._rss_at_full and (self._budget_due or rss > self._rss_budget(self._rss_at_full)):
            self._budget_collection(rss)
            return self._poll_delay()
        if self._mode == "budget":
            self._set_mode(*self._steady_mode())  # back within budget
        idle = in_flight == 0 and now - self._last_activity >= self.idle_after_s
        if idle and ended > self._ended_at_maintenance:
            self._ended_at_maintenance = ended
            self._full_collection(f"idle for {now - self._last_activity:.1f} s")
        return self._poll_delay()

    def _steady_mode(self) -> tuple[str, str]:
        """The mode (and why) when no budget or ceiling action is under way."""
        if self._long_request:
            return "long_request_stepping", self._long_request_reason
        if self._warmed_up:
            return "between_requests", "young garbage is collected when requests end"
        return "warming_up", f"collecting as found until {self.warmup_requests} requests end"

    def _begin_long_request(self, now: float) -> None:
        """Seen by the monitor: a request is in flight, none ended since the last check, and garbage
        keeps coming."""
        with self._lock:
            if not self._tuning or self._long_request:
                return
            self._enter_long_request(
                f"a request has run {now - self._last_activity:.1f} s with no request ending while "
                "young garbage kept coming"
            )

    def _enter_long_request(self, seen: str) -> None:
        """Hold the RSS budget inside the request: check it at every collection and every 0.1 s and
        collect in steps when it is crossed; freeze nothing new. Lock-free: also called from the gc
        callback."""
        self._long_request = True
        self._ended_at_long = self.requests_seen
        self.long_request_steps += 1
        why = (
            f"{seen}: RSS budget ({self.heap_growth_ceiling:.0%} over the last full collection) checked "
            f"at every collection and every {min(self.monitoring_interval_s, _LONG_REQUEST_POLL_S):g} s, "
            "collected in steps when crossed (unfrozen heap first); nothing new is frozen until a "
            "request ends"
        )
        self._long_request_reason = why
        if not self._pressure:
            self._set_mode("long_request_stepping", why)

    def _end_long_request(self) -> None:
        """A request ended (or none is in flight): back to the steady mode."""
        with self._lock:
            self._long_request = False
            if not self._pressure:
                self._set_mode(*self._steady_mode())

    def _budget_collection(self, rss: int) -> None:
        """RSS grew past the budget since the last full collection: collect in two steps. First the
        unfrozen heap only (cheap); if the budget is crossed again, everything, the frozen heap too."""
        with self._lock:
            if not self._tuning:
                return
            grown = rss / self._rss_at_full - 1.0
            self._budget_due = False
            frozen = self._freeze_active
            step = frozen and self._last_budget_was_step is False
            why = (
                f"RSS grew {grown:.1%} since the last full collection, over the "
                f"{self.heap_growth_ceiling:.0%} budget"
            )
            if step:
                self._explicit_collect(2)  # the frozen heap is skipped: a pause of the young heap only
                trimmed = malloc_trim()
                self._rss_at_full = self._ceiling.process_rss()
                self._last_budget_was_step = True
                self._note(
                    "collect", None, 2,
                    f"budget step: collected the unfrozen heap{' + malloc_trim' if trimmed else ''}: {why}",
                )
            else:
                self._last_budget_was_step = False
                self._full_collection(f"budget: {why}")
            self._set_mode("budget", why + (" (unfrozen heap)" if step else " (full collection)"))
            self.budget_collections += 1  # last: readers that see it also see the change noted

    def _full_collection(self, reason: str) -> None:
        """Collect every generation, the frozen heap included, then re-freeze and trim."""
        with self._lock:
            if not self._tuning:
                return
            refreeze = self._freeze_active
            if refreeze:
                gc.unfreeze()
            self._explicit_collect(2)
            if refreeze:
                gc.freeze()
            trimmed = malloc_trim()
            self._rss_at_full = self._ceiling.process_rss()
            self._note("collect", None, 2, f"full collection{' + malloc_trim' if trimmed else ''}: {reason}")

    def _relieve_pressure(self, percent: float, now: float) -> None:
        with self._lock:
            if not self._tuning:
                return
            if not self._pressure:
                self._pressure = True
                why = f"memory use {percent:.1f}% >= target {self.target_memory_usage_percent:.0f}%"
                self._note("pressure_start", None, round(percent, 1), why)
                self._set_mode(
                    "budget", f"memory ceiling: {why}; thresholds as found, heap unfrozen", "memory_ceiling"
                )
                base0 = self._base[0]
                if base0 > 0 and self._valve != base0:
                    self._set_young_threshold(base0, "memory ceiling beats speed")
            if now < self._next_pressure_collect:
                return
            rss_before = self._ceiling.process_rss()
            if self._freeze_active or self._we_froze:
                self._freeze_active = False
                if self._we_froze:
                    gc.unfreeze()
                    self._we_froze = False
                    self._note("unfreeze", None, None, "memory ceiling: frozen objects must be collectable")
            self._explicit_collect(2)
            trimmed = malloc_trim()
            rss_after = self._ceiling.process_rss()
            self._rss_at_full = rss_after
            self._note(
                "collect", None, 2,
                f"memory ceiling: full collection{' + malloc_trim' if trimmed else ''} "
                f"freed {max(0, rss_before - rss_after)} bytes of RSS",
            )
            if rss_before - rss_after < 0.01 * rss_before:
                self._pressure_backoff = min(self._pressure_backoff * 2, _MAX_PRESSURE_BACKOFF)
            else:
                self._pressure_backoff = 1
            self._next_pressure_collect = now + self.monitoring_interval_s * self._pressure_backoff

    # -- analysis and one-shot optimisation ---------------------------------------------------------
    def analyze(self) -> GcAnalysis:
        """Score the collector's cost since :meth:`start` and list bottlenecks and opportunities."""
        rec = self._recorder
        events = rec.snapshot()
        counts, pause_ns = self._per_generation()
        try:
            percent: float | None = self._ceiling.usage().percent
        except Exception:
            percent = self._last_usage_percent
        data = AnalysisInput(
            events=events,
            counts=counts,
            pause_ns=pause_ns,
            collected=list(rec.collected),
            uncollectable=list(rec.uncollectable),
            bytes_reclaimed=rec.manual_bytes,
            elapsed_s=time.monotonic() - self._start_wall,
            cpu_s=time.process_time() - self._start_cpu,
            thresholds=gc.get_threshold(),
            base_thresholds=self._base,
            max_young_threshold=self.max_young_threshold,
            frozen_objects=gc.get_freeze_count(),
            memory_usage_percent=percent,
            target_memory_usage_percent=self.target_memory_usage_percent,
            pause_target_s=self.pause_target_s,
            requests_seen=self.requests_seen,
            explicit_collections=rec.explicit_count,
            adaptive=self.adaptive,
            changes_made=len(self._changes),
            callback_errors=rec.callback_errors,
            monitor_errors=self.monitor_errors,
            mode=self._mode,
            mode_reason=self._mode_reason,
            mode_cause=self._mode_cause,
            own_memory_bytes=self.own_memory_bytes(),
            rss_budget_bytes=(
                self._rss_budget(self._rss_at_full) if self._tuning and self._rss_at_full else None
            ),
            budget_collections=self.budget_collections,
            long_requests=self.long_request_steps,
        )
        return build_analysis(data)

    def _per_generation(self) -> tuple[list[int], list[int]]:
        """Collections and pause (ns) per generation, automatic and explicit together."""
        rec = self._recorder
        return (
            [rec.counts[g] + rec.manual_counts[g] for g in range(NUM_GENERATIONS)],
            [rec.pause_ns[g] + rec.manual_pause_ns[g] for g in range(NUM_GENERATIONS)],
        )

    def summary(self) -> dict[str, Any]:
        """The headline counters of :meth:`analyze` (collections, pause, time share, mode), read cheaply
        enough for a task that runs every few seconds."""
        counts, pause_ns = self._per_generation()
        pause_s = sum(pause_ns) / 1e9
        return {
            "total_collections": sum(counts),
            "total_pause_s": pause_s,
            "gc_time_share": time_share_of(pause_s, time.monotonic() - self._start_wall),
            "mode": self._mode,
        }

    async def aanalyze(self) -> GcAnalysis:
        """Async twin of :meth:`analyze`."""
        import asyncio  # lazily: it pulls in ssl, several MB of RSS for sync-only apps

        return await asyncio.to_thread(self.analyze)

    def optimize(self) -> list[GcChange]:
        """Apply the low-risk opportunities :meth:`analyze` finds now; returns the changes made."""
        analysis = self.analyze()
        made: list[GcChange] = []
        with self._lock:
            for opportunity in analysis.optimization_opportunities:
                if not opportunity.auto_apply:
                    continue
                kind, why = opportunity.optimization_type, opportunity.description
                if kind in ("raise_young_threshold", "lower_young_threshold"):
                    assert opportunity.suggested_thresholds is not None
                    self._capture_found()
                    before = gc.get_threshold()
                    gc.set_threshold(*opportunity.suggested_thresholds)
                    self._valve = opportunity.suggested_thresholds[0]
                    made.append(self._note("set_threshold", before, gc.get_threshold(), why))
                elif kind == "freeze_long_lived_heap":
                    self._capture_found()
                    if not self._may_freeze("freeze_long_lived_heap"):
                        continue
                    self._explicit_collect(2)
                    frozen_before = gc.get_freeze_count()
                    gc.freeze()
                    self._we_froze = True
                    self._freeze_active = self.adaptive and self._running
                    made.append(self._note("freeze", frozen_before, gc.get_freeze_count(), why))
                elif kind == "reduce_memory_pressure":
                    self._capture_found()
                    if self._we_froze:
                        gc.unfreeze()
                        self._we_froze = False
                        self._freeze_active = False
                        made.append(self._note("unfreeze", None, None, why))
                    self._explicit_collect(2)
                    trimmed = malloc_trim()
                    made.append(self._note("collect", None, 2, f"{why} (malloc_trim: {trimmed})"))
        self._flush_change_log()
        return made

    async def aoptimize(self) -> list[GcChange]:
        """Async twin of :meth:`optimize` (collections run off the event loop)."""
        import asyncio  # lazily: it pulls in ssl, several MB of RSS for sync-only apps

        return await asyncio.to_thread(self.optimize)

    def freeze_for_fork(self, *, collect: bool = True) -> int:
        """Collect, then ``gc.freeze()`` the heap so forked workers share it copy-on-write.

        Call it in the master once the app is loaded (gunicorn ``preload_app`` / uWSGI) just before
        forking. Returns the number of frozen objects. Undone by :meth:`restore`.
        """
        with self._lock:
            self._capture_found()
            # Asked for explicitly, so it freezes either way; this only learns whether restore() can thaw.
            probed = self._found is not None and self._found.freeze_count > 0 and self._may_freeze(
                "freeze_for_fork"
            )
            if collect and not probed:
                self._explicit_collect(2)
            before = gc.get_freeze_count()
            gc.freeze()
            self._we_froze = True
            after = gc.get_freeze_count()
            self._note("freeze", before, after, "freeze_for_fork: share the heap with forked workers")
        self._flush_change_log()
        return after

    def restore(self) -> list[GcChange]:
        """Put thresholds, enabled state and freeze state back as first found; stops adaptive tuning."""
        with self._lock:
            self._tuning = False
            self._leave_counting_mode()
            found = self._found
            if found is None:
                return []
            made: list[GcChange] = []
            now_thresholds = gc.get_threshold()
            if now_thresholds != found.thresholds:
                gc.set_threshold(*found.thresholds)
                made.append(self._note("set_threshold", now_thresholds, found.thresholds, "restore"))
            if self._we_froze and found.freeze_count == 0:
                gc.unfreeze()
                made.append(self._note("unfreeze", None, 0, "restore"))
            elif self._we_froze and self._frozen_were_immortal:
                gc.unfreeze()
                self._explicit_collect(2)  # the collector moves its immortal objects back (3.12+)
                made.append(self._note(
                    "unfreeze", None, gc.get_freeze_count(),
                    "restore: thawed, then a full collection gave the interpreter's immortal objects "
                    "back to the permanent generation",
                ))
            elif self._we_froze:
                made.append(self._note(
                    "restore", None, None,
                    "objects were already frozen when found: left frozen (gc cannot tell them apart)",
                ))
            if gc.isenabled() != found.enabled:
                (gc.enable if found.enabled else gc.disable)()
                action = "enable" if found.enabled else "disable"
                made.append(self._note(action, not found.enabled, found.enabled, "restore"))
            self._we_froze = False
            self._freeze_active = False
            self._pressure = False
            self._long_request = False
            self._budget_due = False
            self._freeze_refused = False
            self._frozen_were_immortal = False
            self._valve = found.thresholds[0]
            self._found = None
            if self._running:
                self._set_mode("recording", "restore() put the collector back as found; tuning stopped")
        self._flush_change_log()
        return made

    # -- helpers ---------------------------------------------------------------------------------
    def _may_freeze(self, what: str) -> bool:
        """Whether freezing can be undone exactly; runs a full collection when it has to find out.

        ``gc.unfreeze()`` thaws everything. From 3.12 the collector itself moves immortal objects (a few
        hundred static tuples at start-up) to the permanent generation, and puts them back there at the
        next full collection after a thaw; objects the app froze would not go back. So: nothing frozen
        when found, or only immortal objects (thaw, collect, compare), and restore() can be exact.
        """
        found = self._found
        if found is None or found.freeze_count == 0 or self._frozen_were_immortal:
            return True
        if self._freeze_refused:
            return False
        if sys.version_info >= (3, 12) and found.freeze_count <= _IMPORT_FREEZE_COUNT:
            gc.unfreeze()
            for _ in range(20):  # at most ~0.1 s, once per run, and only on 3.12+
                # gc.collect() does nothing while another thread's collection is under way (its
                # callbacks can release the GIL): try again shortly.
                self._explicit_collect(2)
                if gc.get_freeze_count() >= found.freeze_count:
                    self._frozen_were_immortal = True
                    return True
                time.sleep(0.005)
            gc.freeze()  # the app had frozen objects of its own: give them back (with the rest)
            self._we_froze = True
        self._freeze_refused = True
        self._note(
            "skip_freeze", found.freeze_count, gc.get_freeze_count(),
            f"{what} skipped: {found.freeze_count} objects were already frozen by the app when found, "
            "and gc.unfreeze() could not give back exactly that set",
        )
        return False

    def _set_mode(self, mode: str, reason: str, cause: str | None = None) -> None:
        """Record the mode, the sentence why, and its short cause token (lock-free)."""
        self._mode = mode
        self._mode_reason = reason
        self._mode_cause = cause or _MODE_CAUSES.get(mode, mode)

    @property
    def mode_cause(self) -> str:
        """A short, fixed token for why it is in its mode (for metrics attributes): e.g. ``rss_budget``,
        ``memory_ceiling``, ``long_request``, ``request_boundaries``, ``warmup``, ``adaptive_off``."""
        return self._mode_cause

    @property
    def mode(self) -> tuple[str, str]:
        """The mode the optimizer is in (one of :data:`MODES`) and why."""
        return self._mode, self._mode_reason

    def own_memory_bytes(self) -> int:
        """Bytes held by the optimizer's own bookkeeping (event ring, change logs), measured now."""
        size = sys.getsizeof(self) + sys.getsizeof(self.__dict__)
        size += self._recorder.memory_bytes()
        for changes in (self._changes, self._unlogged):
            size += sys.getsizeof(changes)
            for change in list(changes):
                size += sys.getsizeof(change) + sys.getsizeof(change.reason)
        return size

    def _capture_found(self) -> None:
        if self._found is None:
            self._found = _FoundState(gc.get_threshold(), gc.isenabled(), gc.get_freeze_count())

    def _explicit_collect(self, generation: int) -> int:
        recorder = self._recorder
        recorder.explicit_thread = threading.get_ident()
        try:
            return gc.collect(generation)
        finally:
            recorder.explicit_thread = None

    def _note(self, action: str, before: Any, after: Any, reason: str) -> GcChange:
        # Called from the gc callback too, so only lock-free appends here; logging happens later.
        change = GcChange(time.time(), action, before, after, reason)
        self._changes.append(change)
        self._unlogged.append(change)
        return change

    def _flush_change_log(self) -> None:
        while True:
            try:
                change = self._unlogged.popleft()
            except IndexError:
                return
            logger.info("gc %s: %r -> %r (%s)", change.action, change.before, change.after, change.reason)

    def reinit_after_fork(self) -> None:
        """In a forked child: fresh locks and request counts; the monitor task resumes with the
        process scheduler (threads do not survive fork())."""
        self._lock = threading.RLock()
        self._recorder.reset_lock()
        self._reset_requests()
        self._leave_counting_mode()
        if self._thaw_depth:  # forked mid-census: the thread that would end the thaw is not in the child
            self._thaw_depth = 0
            self._refreeze_due = True
        self._long_request = False
        if self._running and self._tuning:
            self._warmup_at = max(1, self.warmup_requests)
            self._checked_at = 0
            self._next_check = 1
            self._last_activity = time.monotonic()
            self._ended_seen = self._ended_at_maintenance = 0


