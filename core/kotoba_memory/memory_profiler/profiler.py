"""The MemoryProfiler: periodic samples plus duty-cycled tracemalloc windows, run on the process
layer's scheduler thread."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import importlib.util
import logging
import math
import operator
import os
import sys
import sysconfig
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kotoba_memory import _native
from kotoba_memory.errors import ConfigError, KotobaMemoryError
from kotoba_memory.memory_profiler._budget import TraceBudget
from kotoba_memory.memory_profiler._leaks import Growth, Key, LeakDetector, SiteChooser, WindowSnapshot
from kotoba_memory.memory_profiler._models import (
    AllocationHotspot,
    HeldBackSite,
    LeakVerdictStatus,
    MemoryAnalysis,
    MemoryLeak,
    MemorySample,
    ProfilerStats,
    RouteStats,
)
from kotoba_memory.memory_profiler._ring import SampleRing
from kotoba_memory.memory_profiler._survival import Found
from kotoba_memory.memory_profiler._temporal import analyze_samples
from kotoba_memory.process import Task, forks, registry, scheduler
from kotoba_memory.process import memory as process_memory
from kotoba_memory.process.cpu import CpuShare
from kotoba_memory.validation import (
    check_int,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
)

logger = logging.getLogger(__name__)

_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)  # .../kotoba_memory
_PROFILER_DIR = str(Path(__file__).resolve().parent)
_MAX_GAUGES = 16
_HELD_BACK_SHOWN = 5  # sites under the threshold kept in an analysis, most confident first
#: How long leak_verdict() reuses its suspects while no window, census or survival check came since.
#: Longer than the fleet publisher's longest gap (60 s): in a worker whose judging costs more than the
#: publisher's CPU share allows every few seconds, a shorter reuse would expire before each publish.
VERDICT_REUSE_S = 120.0
_HEAP_READ_BUDGET = 0.0002  # share of the process's CPU the sampler may spend reading glibc's heap
_HEAP_READ_MAX_GAP = 60  # samples between two heap readings at most
# A window whose read-backs took this much of glibc's heap hands its free pages back when it closes.
_TRIM_AFTER_READ_BACKS = 1 << 20


class ProfilerError(KotobaMemoryError, RuntimeError):
    """The profiler was used in a way it cannot honour (e.g. a gauge on a full gauge table)."""


def get_active_profiler() -> MemoryProfiler | None:
    """The most recently started profiler that is still running, if any."""
    profiler: MemoryProfiler | None = registry.active("profiler")
    return profiler


@dataclass
class _Window:
    """A tracemalloc window in progress: when it opened and the raw traces read so far."""

    owned: bool
    opened: float
    gap: float
    pid: int
    raws: list[tuple[float, list[Any]]] = field(default_factory=list)
    raw_heap: int = 0  # bytes the raws take in glibc's heap (their arrays, and objects made outside pymalloc)
    # requests per route finished since the previous snapshot, one dict per snapshot
    step_routes: list[dict[str, int]] = field(default_factory=list)


def _own_prefixes() -> list[str]:
    """Directories of kotoba-memory's code: the core package and the integrations (not imported here)."""
    prefixes = [_PACKAGE_DIR + os.sep]
    spec = importlib.util.find_spec("kotoba_memory_integrations")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        prefixes.append(str(Path(location).resolve()) + os.sep)
    return prefixes


def _library_prefixes() -> list[str]:
    paths = sysconfig.get_paths()
    prefixes = {paths.get(name, "") for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    prefixes.update({sys.base_prefix, sys.prefix, sys.exec_prefix})
    return sorted(p for p in prefixes if p)


class _RouteTable:
    """Bounded per-route aggregates; the middleware feeds it from many threads (the pure-Python reference
    of ``kotoba_memory._crecord.RouteTable``, which the C request recorder writes to without a frame)."""

    def __init__(self, max_routes: int) -> None:
        self.max_routes = max_routes
        self.clear()

    def clear(self) -> None:
        """Forget every route (also in a forked child: a new lock, which no parent's thread can hold)."""
        self._lock = threading.Lock()
        # route -> [requests, rss_delta, traced_delta, traced_requests, duration, rss_requests]
        self._totals: dict[str, list[float]] = {}
        self._window_counts: dict[str, int] = {}

    def record(self, route: str, rss_delta: int | None, traced_delta: int | None, duration_s: float) -> None:
        """Add one finished request to ``route``'s row (past ``max_routes`` routes, to ``"<other>"``'s)."""
        if not isinstance(route, str):
            raise TypeError(f"route must be a str, got {type(route).__name__}")
        rss = None if rss_delta is None else int(rss_delta)
        traced = None if traced_delta is None else int(traced_delta)
        duration = float(duration_s)
        with self._lock:
            row = self._totals.get(route)
            if row is None:
                if len(self._totals) >= self.max_routes:
                    route = "<other>"
                    row = self._totals.get(route)
                if row is None:
                    row = self._totals[route] = [0, 0, 0, 0, 0.0, 0]
            row[0] += 1
            if rss is not None:
                row[1] += rss
                row[5] += 1
            if traced is not None:
                row[2] += traced
                row[3] += 1
            row[4] += duration
            self._window_counts[route] = self._window_counts.get(route, 0) + 1

    def take_window_counts(self) -> dict[str, int]:
        """Requests per route since the last call, and start counting anew."""
        with self._lock:
            counts, self._window_counts = self._window_counts, {}
            return counts

    def rows(self) -> list[tuple[str, int, int, int, int, float, int]]:
        """Per route: ``(route, requests, rss_delta, traced_delta, traced_requests, duration_s,
        rss_requests)``."""
        with self._lock:
            return [(k, int(v[0]), int(v[1]), int(v[2]), int(v[3]), float(v[4]), int(v[5]))
                    for k, v in self._totals.items()]

    def __len__(self) -> int:
        return len(self._totals)


# The C table where built: the C request recorder then adds each request to it directly.
_crecord = _native.load("_crecord")
# Trace read-backs made outside pymalloc's pools where built (see _raw_traces).
_cunpooled = _native.load("_cunpooled")
_new_route_table: Callable[[int], Any] = _crecord.RouteTable if _crecord is not None else _RouteTable


def _route_stats(table: Any) -> list[RouteStats]:
    """A route table's rows as :class:`RouteStats`, busiest route first."""
    return [RouteStats(*row) for row in sorted(table.rows(), key=lambda row: row[1], reverse=True)]


class MemoryProfiler:
    """Samples process memory in the background and finds leaks with short tracemalloc windows.

    Tracing costs several times the work of untraced code, so it runs only ``window_s`` out of every
    ``window_interval_s`` seconds (about 1% by default); in each window a few snapshots of what was
    allocated since the window opened show which allocation sites keep growing. With ``trace_budget``
    the windows are spaced further apart (up to 16 intervals) while each one's measured cost exceeds
    that share of the process's CPU.
    """

    def __init__(
        self,
        *,
        sample_interval_s: float = 1.0,
        history_size: int = 3600,
        leak_detection: bool = True,
        window_s: float = 0.5,
        window_interval_s: float = 60.0,
        first_window_after_s: float | None = None,
        snapshots_per_window: int = 6,
        trace_frames: int = 6,
        max_sites: int = 256,
        max_windows: int = 64,
        max_routes: int = 256,
        min_confidence: float = 0.6,
        memory_limit_bytes: int | None = None,
        top_hotspots: int = 10,
        max_trace_memory_bytes: int = 8 * 1024 * 1024,
        census_budget: float | None = None,
        trace_budget: float | None = None,
    ) -> None:
        check_positive(sample_interval_s, "sample_interval_s")
        check_positive(window_s, "window_s")
        check_positive(window_interval_s, "window_interval_s")
        if window_interval_s < window_s:
            raise ConfigError(
                "window_interval_s", f"must be >= window_s ({window_s}), got {window_interval_s}"
            )
        if first_window_after_s is not None:
            check_non_negative(first_window_after_s, "first_window_after_s")
        check_int(history_size, "history_size", low=2)
        check_int(snapshots_per_window, "snapshots_per_window", low=4)
        check_positive_int(trace_frames, "trace_frames")
        check_positive_int(max_sites, "max_sites")
        check_int(max_windows, "max_windows", low=2)
        check_positive_int(max_routes, "max_routes")
        check_positive_int(top_hotspots, "top_hotspots")
        check_positive_int(max_trace_memory_bytes, "max_trace_memory_bytes")
        check_number(min_confidence, "min_confidence", low=0.0, high=1.0)
        if census_budget is not None:
            check_number(census_budget, "census_budget", low=0.0, high=1.0)
        if trace_budget is not None:
            check_positive(trace_budget, "trace_budget", high=1.0)
        if memory_limit_bytes is not None:
            check_positive_int(memory_limit_bytes, "memory_limit_bytes")
        self.sample_interval_s = float(sample_interval_s)
        self.leak_detection = bool(leak_detection)
        self.window_s = float(window_s)
        self.window_interval_s = float(window_interval_s)
        self.first_window_after_s = (
            min(self.window_interval_s, 10.0) if first_window_after_s is None else float(first_window_after_s)
        )
        self.snapshots_per_window = snapshots_per_window
        self.trace_frames = trace_frames
        self.min_confidence = float(min_confidence)
        self.memory_limit_bytes = (
            memory_limit_bytes if memory_limit_bytes is not None else process_memory.memory_limit_bytes()
        )
        self.top_hotspots = top_hotspots

        self._lock = threading.RLock()
        self._ring = SampleRing(history_size, _MAX_GAUGES)
        self._gauges: dict[str, tuple[int, Callable[[], float]]] = {}
        self._routes = _new_route_table(max_routes)
        # The C request recorder adds requests to this table itself, skipping record_request, unless a
        # subclass changed what record_request does. The table is never replaced (a fork clears it).
        self._request_sink = (
            self._routes if type(self).record_request is MemoryProfiler.record_request else None
        )
        own = _own_prefixes()
        self._detector = LeakDetector(
            max_sites=max_sites,
            max_windows=max_windows,
            site_chooser=SiteChooser(_library_prefixes(), own),
            steps_per_window=snapshots_per_window - 2,
        )
        self._hotspots: list[AllocationHotspot] = []
        self._hotspots_by_count: list[AllocationHotspot] = []
        self._ignored_files = frozenset(
            {
                tracemalloc.__file__,
                "<frozen importlib._bootstrap>",
                "<frozen importlib._bootstrap_external>",
                "<unknown>",
            }
        )
        self.max_trace_memory_bytes = max_trace_memory_bytes
        # Survival censuses may take a quarter of the time tracing already takes (tracing slows the app
        # several times over, a census only holds it for its own CPU time), and at least 0.5% of wall
        # time: at production defaults one census per window up to ~300 ms of census work.
        self.census_budget = (
            max(0.005, 0.25 * self.window_s / self.window_interval_s) if census_budget is None
            else float(census_budget)
        )
        self._next_census = 0.0
        # None: windows on the fixed schedule (a diagnosis duty cycle); else spaced by their measured cost.
        self._budget = (
            None if trace_budget is None else TraceBudget(float(trace_budget), self.window_interval_s)
        )
        self._census_due = False
        # The last census took new samples that no check has seen since: the next window checks them
        # whatever the budget says (see _survival_check).
        self._recheck_due = False
        self._census_cost = 0.0
        self._last_census_ms = 0.0
        self._max_census_ms = 0.0
        self._skipped_windows = 0
        self._thaws = 0
        self._rechecks = 0
        self._census_keys: list[Key] = []
        self._census_found: Found | None = None
        self._own_heap = 0
        self._next_heap_read = 0.0
        self._heap_reads = CpuShare(
            _HEAP_READ_BUDGET, min_gap_s=0.0, max_gap_s=_HEAP_READ_MAX_GAP * self.sample_interval_s
        )
        self._tasks: tuple[Task, ...] = ()
        self._window: _Window | None = None
        self._started_at = 0.0
        self._last_opened: float | None = None  # when the latest window opened (monotonic)
        self._tick_errors = 0
        self._last_window_ms = 0.0
        self._max_window_ms = 0.0
        self._tracing_mode = "off"
        self._in_window = False
        self._holding = False  # from a window's opening until its read-backs are grouped and dropped
        self._grouping = False  # while a closed window is grouped, before the detector counts it
        self._verdict_memo: tuple[tuple[int, int], float, tuple[MemoryLeak, ...]] | None = None
        forks.register(self.reinit_after_fork, name="memory_profiler")

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (its tasks are on the process scheduler)."""
        return bool(self._tasks)

    def start(self) -> None:
        """Schedule sampling and leak windows (no-op when already running); becomes the active profiler."""
        with self._lock:
            if self._tasks:
                return
            self._started_at = time.monotonic()
            self._last_opened = None
            if self._budget is not None:
                self._budget.restart(self._started_at, time.process_time())
            self._sample()
            tasks = [
                scheduler.every(self.sample_interval_s, self._sample_task, name="memory_profiler.sample")
            ]
            if self.leak_detection:
                tasks.append(scheduler.every(
                    self.window_interval_s, self._window_step, name="memory_profiler.window",
                    delay_s=self.first_window_after_s,
                ))
            self._tasks = tuple(tasks)
        registry.claim("profiler", self)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sampling (waiting for a step in progress); a window in progress is abandoned."""
        with self._lock:
            tasks, self._tasks = self._tasks, ()
        for task in tasks:
            task.cancel()
        with self._lock:
            self._abandon_window()
        registry.release("profiler", self)

    async def astart(self) -> None:
        """Async twin of :meth:`start`."""
        self.start()

    async def astop(self, timeout: float = 5.0) -> None:
        """Async twin of :meth:`stop` (joins the thread off the event loop)."""
        await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> MemoryProfiler:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inputs
    def record_request(
        self, route: str, rss_delta: int | None, traced_delta: int | None, duration_s: float
    ) -> None:
        """Add one finished request to ``route``'s aggregates (cheap, thread-safe, bounded).

        ``rss_delta`` is None for a request whose RSS was not measured (the middleware samples it)."""
        self._routes.record(route, rss_delta, traced_delta, duration_s)

    def add_gauge(self, name: str, read: Callable[[], float]) -> None:
        """Record ``read()`` with every sample under ``name`` (e.g. pool or cache bytes)."""
        if not callable(read):
            raise TypeError("read must be callable")
        with self._lock:
            column = self._ring.gauge_column(name)
            if column < 0:
                raise ProfilerError(f"at most {_MAX_GAUGES} gauges; cannot add {name!r}")
            self._gauges[name] = (column, read)

    def remove_gauge(self, name: str) -> None:
        """Stop recording gauge ``name`` (no error when absent)."""
        with self._lock:
            self._gauges.pop(name, None)
            self._ring.release_gauge(name)

    # ------------------------------------------------------------------ scheduled steps
    def _sample_task(self) -> None:
        self._guarded(self._sample)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # a profiler must never take the host app down; count and carry on
            self._tick_errors += 1
            logger.debug("kotoba-memory profiler step failed", exc_info=True)

    def _sample(self) -> None:
        rss = process_memory.rss_bytes()
        traced: int | None = None
        if tracemalloc.is_tracing():
            traced = tracemalloc.get_traced_memory()[0]
            # Tracing's own bookkeeping inflates RSS during our windows; leave it out of the trend.
            if self._tracing_mode == "window" and self._in_window:
                rss -= tracemalloc.get_tracemalloc_memory()
        heap = self._read_heap()
        if heap is not None:
            heap -= self._own_heap
            window = self._window
            if window is not None:
                heap -= window.raw_heap
            if self._in_window and self._tracing_mode == "window":
                heap -= tracemalloc.get_tracemalloc_memory()
        gauges: dict[int, float] = {}
        for column, read in list(self._gauges.values()):
            try:
                gauges[column] = float(read())
            except Exception:
                self._tick_errors += 1
        count = gc.get_count()
        with self._lock:
            blocks = sys.getallocatedblocks() - self._detector.own_blocks
            self._ring.append(time.time(), rss, traced, blocks, heap, (count[0], count[1], count[2]), gauges)

    def _read_heap(self) -> int | None:
        """glibc's in-use heap, read only as often as its cost allows (None for the samples in between).

        ``mallinfo2`` walks every free chunk of every malloc arena under that arena's lock: 0.3-20 ms in a
        multi-threaded worker with a fragmented heap, which at one sample a second was ~2% of a core
        (and stalled the app's mallocs meanwhile). Readings are spaced to cost ``_HEAP_READ_BUDGET`` of the
        process's CPU (a worker busy 5% of the time pays a wall-time budget twenty times over), but
        never more than ``_HEAP_READ_MAX_GAP`` samples apart, so trends over minutes keep their points.
        """
        now = time.monotonic()
        if now < self._next_heap_read:
            return None
        started = time.perf_counter()
        heap = process_memory.heap_in_use_bytes()
        self._next_heap_read = now + self._heap_reads.next_gap(time.perf_counter() - started)
        return heap

    def _window_step(self) -> float:
        """Open a tracemalloc window, take its next snapshot, or close it; returns when to step next.

        Snapshot times are fixed from the window's start, so slow read-backs do not stretch the time
        the app spends traced; the next window opens ``window_interval_s - window_s`` after one closes
        (more under a trace budget).
        """
        try:
            return self._window_step_unguarded()
        except Exception:
            self._tick_errors += 1
            logger.debug("kotoba-memory profiler window failed", exc_info=True)
            with self._lock:
                self._abandon_window()
            return self._interval_s() - self.window_s

    def _window_step_unguarded(self) -> float:
        window = self._window
        if window is not None and window.pid != os.getpid():
            self._abandon_window()  # opened in the parent before fork(): its traces are not ours
            window = None
        if window is None:
            owned = not tracemalloc.is_tracing()
            self._tracing_mode = "window" if owned else "shared"
            if owned:
                tracemalloc.start(self.trace_frames)
            self._in_window = self._holding = True
            gap_counts = self._routes.take_window_counts()
            opened = self._last_opened = time.monotonic()
            if self._budget is not None:
                self._budget.opened(opened, time.process_time(), sum(gap_counts.values()))
            window = self._window = _Window(
                owned, opened, self.window_s / (self.snapshots_per_window - 1), os.getpid()
            )
        if window.owned and tracemalloc.get_tracemalloc_memory() > self.max_trace_memory_bytes:
            # A huge allocation burst inside the window: reading it back would cost more than the
            # window is worth. Give this window up.
            self._skipped_windows += 1
            self._abandon_window()
            return self._interval_s() - self.window_s
        started = time.perf_counter()
        window.raws.append((time.time(), self._read_traces(window)))
        window.step_routes.append(self._routes.take_window_counts())
        self._note_window_cost(time.perf_counter() - started)
        self._guarded(self._sample)
        taken = len(window.raws)
        if taken < self.snapshots_per_window:
            return max(0.0, window.opened + taken * window.gap - time.monotonic())
        self._census()
        self._close_window(window)
        return self._interval_s() - self.window_s

    def _census(self) -> None:
        """While tracing is still on: find live objects allocated at tracked sites in this window.

        Only the lookup that needs tracing happens here (allocations made now are traced, and slow);
        :meth:`_survival_check` samples what was found and checks earlier samples once tracing has
        stopped. Their cost (GIL time, well under 1 us per live object and referent) is kept under
        ``census_budget`` of wall time by spacing censuses out; neither holds the profiler's lock
        while it scans the heap, so ``analyze()`` does not wait for them.
        """
        now = time.monotonic()
        self._census_due = self.census_budget > 0 and now >= self._next_census
        if not self._census_due:
            return
        started = time.thread_time()  # this thread's CPU time: the GIL time the census takes
        with self._lock:
            self._census_keys = self._detector.tracked_keys()
        if not self._census_keys and not self._detector.survival.sampled:
            self._census_due = False  # nothing to look for nor to check: no cost, no budget used
            return
        with self._heap_thawed():
            self._census_found = self._detector.survival.scan(self._census_keys)
        self._census_cost = time.thread_time() - started

    def _survival_check(self) -> tuple[list[Key], set[Key]] | None:
        """After tracing stopped: which sampled objects are still alive, then new samples from the census.

        Samples a census just took are checked again after the next window even when the budget puts
        the next census further off: a burst's leftovers (alive at the census, freed a moment later)
        would otherwise stay "survival unknown" for as long as the site keeps growing in windows that
        catch a burst, and reach a confident verdict first. A check looks nothing up in tracemalloc and
        samples nothing, but samples known by id still need a walk of the heap, so on a large heap it
        costs about what a census does; it is charged to the budget (fewer censuses, same share).
        """
        if not self._census_due:
            if self._recheck_due:
                self._recheck()
            return None
        self._census_due = False
        found, keys, self._census_found, self._census_keys = self._census_found, self._census_keys, None, []
        census = None if found is None else (keys, {key for key, _ in found if key is not None})
        now = time.monotonic()
        started = time.thread_time()
        sampler = self._detector.survival
        with self._heap_thawed():
            sampler.check(time.time())
        if found is not None:
            chosen = sampler.choose(found)  # the bulk of the work, outside the lock
            with self._lock:
                if sampler is self._detector.survival:  # not replaced by a fork meanwhile
                    sampler.add(chosen, keys, time.time(), self._detector.first_seen())
            self._recheck_due = bool(chosen)
        del found
        cost = self._census_cost + time.thread_time() - started
        self._last_census_ms = cost * 1000.0
        self._max_census_ms = max(self._max_census_ms, self._last_census_ms)
        self._next_census = now + cost / self.census_budget
        return census

    def _recheck(self) -> None:
        """Check the samples the last census took (sampling nothing new); its cost defers the next census."""
        self._recheck_due = False
        started = time.thread_time()
        with self._heap_thawed():
            self._detector.survival.check(time.time())
        self._rechecks += 1
        self._next_census += (time.thread_time() - started) / self.census_budget

    @contextlib.contextmanager
    def _heap_thawed(self) -> Iterator[None]:
        """Let the census see the whole heap when the GC optimizer keeps it frozen, for the block.

        ``gc.get_objects()`` does not list frozen objects, and the GC optimizer freezes everything that
        outlives a young collection: a ring buffer's entries and a leak's dicts would be invisible (a
        leak's samples would even look dead). Thawing is cheap (one list splice); the optimizer freezes
        nothing during the block and the heap again at the next request's end after it. A heap someone
        else froze (e.g. for copy-on-write) is left frozen.
        """
        thawed = getattr(registry.active("gc_optimizer"), "thawed", None)
        if thawed is None:
            yield
            return
        with thawed() as thawed_now:
            if thawed_now:
                self._thaws += 1
            yield

    @property
    def holding_objects(self) -> bool:
        """True while a tracing window's read-backs are alive (from its opening until they are grouped):
        young collections meanwhile find our objects, not the app's garbage."""
        return self._holding

    def _interval_s(self) -> float:
        """Seconds from one window's start to the next: the configured interval, or more under a budget."""
        return self.window_interval_s if self._budget is None else self._budget.next_interval_s

    def _abandon_window(self) -> None:
        window, self._window = self._window, None
        self._in_window = self._holding = False
        self._census_due, self._census_found, self._census_keys = False, None, []
        if window is not None:
            if window.owned and tracemalloc.is_tracing():
                tracemalloc.stop()
            self._drop_read_backs(window)
        if self._budget is not None:  # after the drop: the next gap's CPU rate leaves its trim out
            self._budget.abandoned(time.monotonic(), time.process_time())

    def _drop_read_backs(self, window: _Window) -> None:
        """Free a window's trace read-backs; after big ones, hand glibc's free pages back to the OS."""
        window.raws = []
        if _cunpooled is not None and window.raw_heap >= _TRIM_AFTER_READ_BACKS:
            # The read-backs' small blocks, freed, sit in glibc's fast bins, which it never returns to
            # the OS by itself: the worker's RSS would keep a window's read-backs for good. The trim's
            # cost is the window's, under its budget.
            process_memory.trim_heap()
        window.raw_heap = 0

    def _close_window(self, window: _Window) -> None:
        self._grouping = True  # before the window goes: the status counts it as good as counted
        try:
            self._close_window_grouping(window)
        finally:
            self._grouping = False

    def _close_window_grouping(self, window: _Window) -> None:
        self._window = None
        self._in_window = False
        if window.owned and tracemalloc.is_tracing():
            tracemalloc.stop()
        census = self._survival_check()
        # Grouping is Python work: done once tracing has stopped, it does not prolong the window.
        started = time.perf_counter()
        raws, window.raws = window.raws, []
        snapshots: list[WindowSnapshot] = [(t, self._group(raw)) for t, raw in raws]
        del raws
        steps, window.step_routes = window.step_routes, []
        routes: dict[str, int] = {}
        for counts in steps:
            for name, n in counts.items():
                routes[name] = routes.get(name, 0) + n
        # Not under the lock: analyze() reads the detector without it (see there); only this thread
        # changes it.
        self._detector.add_window(snapshots, routes, steps, census)
        if snapshots:
            self._update_hotspots(snapshots[-1][1])  # replaces two lists at once: no lock needed
        self._holding = False
        self._drop_read_backs(window)
        self._note_window_cost(time.perf_counter() - started)
        if self._budget is not None:
            self._budget.closed(time.monotonic(), time.process_time(), sum(routes.values()))

    def reinit_after_fork(self) -> None:
        """In a forked child: new locks and no history of the parent's (a worker reports on itself).

        A window the parent had open is closed at the child's first window step, once the scheduler
        resumes: stopping tracemalloc inside the fork hook could meet a lock the parent held.
        """
        self._lock = threading.RLock()
        self._ring = SampleRing(self._ring.capacity, _MAX_GAUGES)
        for name, (_, read) in list(self._gauges.items()):
            self._gauges[name] = (self._ring.gauge_column(name), read)
        self._routes.clear()
        self._verdict_memo = None
        old = self._detector
        self._detector = LeakDetector(
            max_sites=old.max_sites, max_windows=old.max_windows, site_chooser=old.site_chooser,
            steps_per_window=old.steps_per_window,
        )
        self._hotspots = []
        self._hotspots_by_count = []
        self._own_heap = 0
        self._next_heap_read = 0.0
        self._next_census = 0.0
        self._census_due, self._census_found, self._census_keys = False, None, []
        self._recheck_due = False
        self._started_at = time.monotonic()
        self._last_opened = None
        if self._budget is not None:
            self._budget.restart(self._started_at, time.process_time())

    def _read_traces(self, window: _Window) -> list[Any]:
        """tracemalloc's raw traces now (one C call); its leftover heap is counted as ours."""
        before = process_memory.heap_in_use_bytes()
        raw, objects_heap = _raw_traces()
        after = process_memory.heap_in_use_bytes()
        held = objects_heap + sys.getsizeof(raw)  # its objects (if made in glibc's heap) and its array
        window.raw_heap += held  # ours until the window drops its raws
        if before is not None and after is not None:
            # CPython keeps a couple of hundred bytes of malloc memory per trace read-back; count it
            # as ours so it is not mistaken for growth of the process.
            self._own_heap += max(0, after - before - held)
        return raw

    def _group(self, raw: list[Any]) -> dict[Key, tuple[int, int]]:
        """Traced blocks grouped by traceback, minus our own and the import system's."""
        grouped: dict[Key, list[int]] = {}
        own = _PROFILER_DIR
        ignored = self._ignored_files
        for _domain, size, frames, *_ in raw:
            if not frames or frames[0][0] in ignored:
                continue
            if any(filename.startswith(own) for filename, _ in frames):
                continue
            row = grouped.get(frames)
            if row is None:
                grouped[frames] = [size, 1]
            else:
                row[0] += size
                row[1] += 1
        return {key: (row[0], row[1]) for key, row in grouped.items()}

    def _note_window_cost(self, seconds: float) -> None:
        ms = seconds * 1000.0
        self._last_window_ms = ms
        self._max_window_ms = max(self._max_window_ms, ms)

    def _update_hotspots(self, traces: Mapping[Key, tuple[int, int]]) -> None:
        per_site: dict[str, list[int]] = {}
        tracebacks: dict[str, tuple[str, ...]] = {}
        chooser = self._detector.site_chooser
        for key, (size, count) in traces.items():
            site = chooser.site(key)
            row = per_site.setdefault(site, [0, 0])
            row[0] += size
            row[1] += count
            tracebacks.setdefault(site, tuple(f"{f}:{n}" for f, n in key))
        spots = [AllocationHotspot(s, v[0], v[1], tracebacks[s]) for s, v in per_site.items()]
        self._hotspots = sorted(spots, key=lambda h: h.size, reverse=True)[: self.top_hotspots]
        self._hotspots_by_count = sorted(spots, key=lambda h: h.count, reverse=True)[: self.top_hotspots]

    # ------------------------------------------------------------------ outputs
    def samples(self) -> list[MemorySample]:
        """A copy of the sample ring buffer, oldest first."""
        with self._lock:
            return self._ring.samples()

    @property
    def peak_rss_bytes(self) -> int:
        """Highest RSS seen in this process since the optimizer started (the process layer's peak)."""
        return process_memory.peak_rss_bytes()

    def routes(self) -> list[RouteStats]:
        """Per-route aggregates recorded so far, busiest first."""
        return _route_stats(self._routes)

    def stats(self) -> ProfilerStats:
        """The profiler's own footprint and health."""
        with self._lock:
            return ProfilerStats(
                running=self.running,
                samples=len(self._ring),
                windows=self._detector.windows,
                sites_tracked=self._detector.sites_tracked,
                routes_tracked=len(self._routes),
                own_memory_bytes=self._own_memory(),
                tick_errors=self._tick_errors,
                last_window_analysis_ms=self._last_window_ms,
                max_window_analysis_ms=self._max_window_ms,
                tracing_mode=self._tracing_mode,
                skipped_windows=self._skipped_windows,
                censuses=self._detector.survival.censuses,
                sampled_objects=self._detector.survival.sampled,
                last_census_ms=self._last_census_ms,
                max_census_ms=self._max_census_ms,
                heap_thaws=self._thaws,
                survival_rechecks=self._rechecks,
                window_interval_s=self._interval_s(),
                window_cost_share=(
                    None if self._budget is None else self._budget.share_until(time.process_time())
                ),
            )

    def _own_memory(self) -> int:
        return self._ring.footprint_bytes() + self._detector.footprint_bytes() + 400 * len(self._routes)

    def analyze(self) -> MemoryAnalysis:
        """Leak suspects (and the sites held back under the threshold), hotspots, the RSS trend and route
        aggregates as of now."""
        started = time.perf_counter()
        routes = _route_stats(self._routes)
        with self._lock:
            samples = self._ring.samples()
            hotspots = list(self._hotspots)
            by_count = list(self._hotspots_by_count)
            detector = self._detector
        temporal = analyze_samples(samples, self.memory_limit_bytes)
        held_back: list[HeldBackSite] = []
        leaks = self._suspects(detector, _SampleGrowth.of_samples(samples), held_back)
        held_back.sort(key=lambda h: h.confidence, reverse=True)
        stats = self.stats()
        status = self._leak_status(stats.windows)
        return MemoryAnalysis(
            memory_leaks=leaks,
            hotspots=hotspots,
            hotspots_by_count=by_count,
            temporal=temporal,
            routes=routes,
            stats=stats,
            analysis_time_s=time.perf_counter() - started,
            samples=samples,
            leak_status=status,
            held_back=held_back[:_HELD_BACK_SHOWN],
        )

    def leak_verdict(self) -> tuple[list[MemoryLeak], LeakVerdictStatus]:
        """The leak suspects of :meth:`analyze` and the evidence behind them, without its other parts.

        The fleet publisher asks every few seconds. Between two windows the evidence only moves at a
        census or a survival check, so the suspects are reused for up to :data:`VERDICT_REUSE_S`
        while neither came (their ``age_seconds`` and ``size`` are then that much older).
        """
        now = time.monotonic()
        with self._lock:
            detector = self._detector
            windows = detector.windows
            state = (windows, detector.survival.changes)
            memo = self._verdict_memo
            if memo is not None and memo[0] == state and 0.0 <= now - memo[1] < VERDICT_REUSE_S:
                return list(memo[2]), self._leak_status(windows)
            # The four columns the growth fit reads, not a MemorySample per sample: a full ring (an
            # hour of samples) made that ~10 ms and ~15,000 objects of garbage each time.
            growth = _SampleGrowth(*self._ring.growth_columns())
        suspects = self._suspects(detector, growth)
        with self._lock:
            if detector is self._detector:
                self._verdict_memo = (state, now, tuple(suspects))
        return suspects, self._leak_status(windows)

    def _suspects(
        self, detector: LeakDetector, growth: _SampleGrowth, held_back: list[HeldBackSite] | None = None
    ) -> list[MemoryLeak]:
        # Outside the lock: only the scheduler thread changes the detector, and a window it adds
        # meanwhile must not hold up the caller (suspects() reads snapshots of what it iterates).
        return detector.suspects(
            now=time.time(),
            window_interval_s=self.window_interval_s,
            global_growth=growth,
            min_confidence=self.min_confidence,
            held_back=held_back,
        )

    def windows_needed(self) -> int:
        """Growth windows a suspect needs to reach ``min_confidence`` (its persistence factor alone)."""
        needed = 2
        while 1.0 - 0.5 ** (needed - 1) < self.min_confidence and needed < 64:
            needed += 1
        return needed

    def _leak_status(self, windows: int) -> LeakVerdictStatus:
        needed = self.windows_needed()
        interval = self._interval_s()
        if not self.leak_detection:
            return LeakVerdictStatus(False, windows, needed, None, "leak detection is off")
        if windows >= needed:
            return LeakVerdictStatus(True, windows, needed, None, f"verdict from {windows} tracing windows")
        if not self.running:
            eta = None
        else:
            # When the next window to count ends: the one under way, else the one after the latest.
            window, last, grouping = self._window, self._last_opened, self._grouping
            to_come = needed - windows - 1
            if window is not None:
                soonest = window.opened + self.window_s
            elif last is not None:
                soonest = last + interval + self.window_s
                if grouping and to_come:  # closed, not yet counted: it counts in a moment
                    to_come -= 1
                elif grouping:  # and it is the last one needed
                    soonest = 0.0
            else:
                soonest = self._started_at + self.first_window_after_s + self.window_s
            eta = max(0.0, soonest - time.monotonic()) + to_come * interval
        when = f"; the first verdict can come in ~{eta:.0f} s" if eta is not None else ""
        if eta is not None and self._budget is not None and interval > self.window_interval_s:
            when += (
                f" (windows {interval:.0f} s apart: each costs more than the trace budget of "
                f"{100 * self._budget.share:g}% of CPU at {self.window_interval_s:g} s)"
            )
        return LeakVerdictStatus(
            False, windows, needed, eta,
            f"not enough evidence for a leak verdict yet: {windows} of {needed} tracing windows{when}",
        )

    async def aanalyze(self) -> MemoryAnalysis:
        """Async twin of :meth:`analyze` (runs in a worker thread)."""
        return await asyncio.to_thread(self.analyze)


def _raw_traces() -> tuple[list[Any], int]:
    """tracemalloc's raw traces ``(domain, size, frames innermost-first, ...)``, and the bytes they take
    in glibc's heap (0 when they were made in pymalloc's pools).

    ``take_snapshot().statistics()`` builds Python objects per trace and costs several times more;
    the private reader is what ``take_snapshot`` itself uses, so fall back to it only if it vanishes.
    Its tens of thousands of small objects are made outside pymalloc's pools where the C extension is
    built: made there, they leave the pools sparse for good and cost the app's own allocations cache
    misses ever after (docs/performance.md, rounds ten and eleven). Not while another interpreter
    exists: the swap of the process-wide allocator is atomic only under one GIL.
    """
    reader = getattr(tracemalloc, "_get_traces", None)
    if reader is None:
        return [
            (trace.domain, trace.size, tuple((f.filename, f.lineno) for f in reversed(trace.traceback)))
            for trace in tracemalloc.take_snapshot().traces
        ], 0
    if _cunpooled is None or not _cunpooled.alone():
        return list(reader()), 0
    raw, _blocks, heap = _cunpooled.call(reader)
    return raw, heap


class _SampleGrowth:
    """Process growth read off the sample columns by least squares (memoised per start time).

    The columns are oldest first; ``heap`` holds -1 where glibc's heap was not read at that sample. A
    verdict asks for one fit per distinct start among the tracked sites (dozens, each over up to an
    hour of samples), so every fit is read off running sums in O(1) after one pass. A wall clock that
    stepped back leaves the samples out of time order: they are put in time order first (a fit does
    not depend on the order of its points, and the span is then from the earliest to the latest).
    """

    def __init__(
        self, timestamps: Sequence[float], rss: Sequence[int], heap: Sequence[int], blocks: Sequence[int]
    ) -> None:
        self._timestamps = timestamps
        self._rss = rss
        self._heap = heap
        self._blocks = blocks
        self._memo: dict[float, Growth | None] = {}
        # Made by the first fit: the heap's readings alone (times, values), then running sums per series.
        self._heap_series: tuple[list[float], list[int]] | None = None
        self._sums: dict[str, _RunningFit] = {}

    @classmethod
    def of_samples(cls, samples: Sequence[MemorySample]) -> _SampleGrowth:
        """The growth of samples already made (``analyze()`` has them for its report anyway)."""
        return cls(
            [s.timestamp for s in samples], [s.rss_bytes for s in samples],
            [-1 if s.heap_bytes is None else s.heap_bytes for s in samples],
            [s.allocated_blocks for s in samples],
        )

    def since(self, start: float) -> Growth | None:
        if start not in self._memo:
            self._memo[start] = self._fit(start)
        return self._memo[start]

    def _prepare(self) -> tuple[list[float], list[int]]:
        """Put the samples in time order (once) and pick out the heap's readings."""
        ts = self._timestamps
        if not all(map(operator.le, ts, ts[1:])):
            order = sorted(range(len(ts)), key=ts.__getitem__)
            self._timestamps = ts = [ts[i] for i in order]
            self._rss = [self._rss[i] for i in order]
            self._heap = [self._heap[i] for i in order]
            self._blocks = [self._blocks[i] for i in order]
        heap_at = [i for i, h in enumerate(self._heap) if h >= 0]
        return [ts[i] for i in heap_at], [self._heap[i] for i in heap_at]

    def _fit(self, start: float) -> Growth | None:
        if self._heap_series is None:
            self._heap_series = self._prepare()
        heap_ts, heap_values = self._heap_series
        ts = self._timestamps
        first = bisect.bisect_left(ts, start)
        if len(ts) - first < 4:
            return None
        span = ts[-1] - ts[first]
        # glibc's heap where it was read (not at every sample: see _read_heap) across most of the span;
        # else RSS, which a free does not always lower.
        heap_first = bisect.bisect_left(heap_ts, start)
        if len(heap_ts) - heap_first >= 4 and heap_ts[-1] - heap_ts[heap_first] >= 0.5 * span:
            bytes_slope, bytes_err = self._running("heap", heap_ts, heap_values).fit(heap_first)
        else:
            bytes_slope, bytes_err = self._running("rss", ts, self._rss).fit(first)
        block_slope, block_err = self._running("blocks", ts, self._blocks).fit(first)
        return Growth(bytes_slope, bytes_err, block_slope, block_err, span)

    def _running(self, name: str, xs: Sequence[float], ys: Sequence[float]) -> _RunningFit:
        """The running sums of one series, made when a fit first needs them (one pass each)."""
        made = self._sums.get(name)
        if made is None:
            made = self._sums[name] = _RunningFit(xs, ys)
        return made


class _RunningFit:
    """Least-squares fits of ``ys`` on ``xs`` over every suffix ``[i:]``, each in O(1) from running sums.

    The values are centred on their first element first: the sums of squares of raw timestamps (~1e9 s)
    or byte counts would cancel away the digits a slope needs.
    """

    def __init__(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        n = len(xs)
        x0 = float(xs[0]) if n else 0.0
        y0 = float(ys[0]) if n else 0.0
        # Suffix sums: index i holds the sums over [i:], index n the empty suffix.
        sx, sy, sxx, sxy, syy = ([0.0] * (n + 1) for _ in range(5))
        ax = ay = axx = axy = ayy = 0.0
        for i in range(n - 1, -1, -1):
            x = xs[i] - x0
            y = ys[i] - y0
            ax += x
            ay += y
            axx += x * x
            axy += x * y
            ayy += y * y
            sx[i] = ax
            sy[i] = ay
            sxx[i] = axx
            sxy[i] = axy
            syy[i] = ayy
        self._n = n
        self._xs = xs
        self._sums = (sx, sy, sxx, sxy, syy)

    def fit(self, first: int) -> tuple[float, float]:
        """Slope and its standard error over ``[first:]``, as :func:`linear_fit` gives them."""
        m = self._n - first
        if m < 3 or self._xs[first] == self._xs[-1]:
            return 0.0, math.inf
        sx, sy, sxx, sxy, syy = (column[first] for column in self._sums)
        dxx = sxx - sx * sx / m
        if dxx <= 0.0:
            return 0.0, math.inf
        dxy = sxy - sx * sy / m
        slope = dxy / dxx
        residual = max(0.0, (syy - sy * sy / m) - dxy * slope)
        return slope, math.sqrt(residual / (m - 2) / dxx)


