"""``@track_memory``: what each call leaves allocated, kept as a bounded per-function aggregate.
"""

from __future__ import annotations

import threading
import tracemalloc
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast, overload

import wrapt

from kotoba_memory.process import memory as process_memory
from kotoba_memory_integrations.hooks.cached import _is_coroutine_function, _qualified_name

if TYPE_CHECKING:
    pass


F = TypeVar("F", bound=Callable[..., Any])

_SAMPLE_WINDOW = 1024  # recent per-call samples kept for the percentiles; bounds our own memory


@dataclass(frozen=True, slots=True)
class FunctionMemoryStats:
    """What the calls of one ``@track_memory`` function allocated (net bytes still held when it returned)."""

    name: str
    calls: int
    errors: int
    total_bytes: int
    mean_bytes: float
    min_bytes: int
    max_bytes: int
    last_bytes: int
    p50_bytes: int
    p95_bytes: int
    tracemalloc_calls: int
    rss_calls: int

    @property
    def source(self) -> str:
        """How the deltas were measured: "tracemalloc", "rss", "mixed" or "none" (no calls yet)."""
        if self.tracemalloc_calls and self.rss_calls:
            return "mixed"
        if self.tracemalloc_calls:
            return "tracemalloc"
        return "rss" if self.rss_calls else "none"


def _rss_bytes() -> int:
    return process_memory.rss_bytes()


_Source = Literal["tracemalloc", "rss"]


class _MemoryTracker:
    """The wrapt wrapper function behind ``@track_memory``; holds the bounded aggregate."""

    def __init__(self, name: str, is_async: bool) -> None:
        self.name = name
        self.is_async = is_async
        self._lock = threading.Lock()
        self._calls = 0
        self._errors = 0
        self._total = 0
        self._min = 0
        self._max = 0
        self._last = 0
        self._by_source = {"tracemalloc": 0, "rss": 0}
        self._recent: deque[int] = deque(maxlen=_SAMPLE_WINDOW)

    @staticmethod
    def _snapshot() -> tuple[_Source, int]:
        # tracemalloc when someone traces (precise, per-allocation); otherwise the process RSS, which is
        # coarse (page granular, includes other threads) but costs nothing to keep enabled.
        if tracemalloc.is_tracing():
            return "tracemalloc", tracemalloc.get_traced_memory()[0]
        return "rss", _rss_bytes()

    def _record(self, before: tuple[_Source, int], failed: bool) -> None:
        source, start = before
        end: int | None = None
        if source == "tracemalloc" and tracemalloc.is_tracing():
            end = tracemalloc.get_traced_memory()[0]
        if end is None:
            if source == "tracemalloc":  # tracing stopped during the call: the delta is meaningless
                return
            end = _rss_bytes()
        delta = end - start
        with self._lock:
            if self._calls == 0:
                self._min = self._max = delta
            else:
                self._min = min(self._min, delta)
                self._max = max(self._max, delta)
            self._calls += 1
            self._errors += failed
            self._total += delta
            self._last = delta
            self._by_source[source] += 1
            self._recent.append(delta)

    def __call__(
        self, wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self.is_async:
            return self._acall(wrapped, args, kwargs)
        before = self._snapshot()
        failed = True
        try:
            result = wrapped(*args, **kwargs)
            failed = False
            return result
        finally:
            self._record(before, failed)

    async def _acall(self, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        before = self._snapshot()
        failed = True
        try:
            result = await wrapped(*args, **kwargs)
            failed = False
            return result
        finally:
            self._record(before, failed)

    def stats(self) -> FunctionMemoryStats:
        with self._lock:
            recent = sorted(self._recent)
            calls, total = self._calls, self._total
            snapshot = (self._errors, self._min, self._max, self._last, dict(self._by_source))
        errors, low, high, last, by_source = snapshot

        def percentile(q: float) -> int:
            if not recent:
                return 0
            return recent[min(len(recent) - 1, round(q * (len(recent) - 1)))]

        return FunctionMemoryStats(
            name=self.name,
            calls=calls,
            errors=errors,
            total_bytes=total,
            mean_bytes=total / calls if calls else 0.0,
            min_bytes=low,
            max_bytes=high,
            last_bytes=last,
            p50_bytes=percentile(0.5),
            p95_bytes=percentile(0.95),
            tracemalloc_calls=by_source["tracemalloc"],
            rss_calls=by_source["rss"],
        )

    def reset(self) -> None:
        with self._lock:
            self._calls = self._errors = self._total = self._min = self._max = self._last = 0
            self._by_source = {"tracemalloc": 0, "rss": 0}
            self._recent.clear()


class _BoundTrackedFunction(wrapt.BoundFunctionWrapper):
    """What accessing a ``@track_memory`` method through an instance or class returns."""

    def memory_stats(self) -> FunctionMemoryStats:
        """Aggregate allocation figures over every call so far (all instances)."""
        return cast("_MemoryTracker", self._self_wrapper).stats()

    def reset_memory_stats(self) -> None:
        """Forget the calls recorded so far."""
        cast("_MemoryTracker", self._self_wrapper).reset()


class TrackedFunction(wrapt.FunctionWrapper):
    """A function (or descriptor) whose calls' allocations are measured by ``@track_memory``."""

    __bound_function_wrapper__ = _BoundTrackedFunction

    def memory_stats(self) -> FunctionMemoryStats:
        """Aggregate allocation figures over every call so far."""
        return cast("_MemoryTracker", self._self_wrapper).stats()

    def reset_memory_stats(self) -> None:
        """Forget the calls recorded so far."""
        cast("_MemoryTracker", self._self_wrapper).reset()


_tracked: weakref.WeakSet[_MemoryTracker] = weakref.WeakSet()
_tracked_lock = threading.Lock()


def _track(func: F) -> F:
    if not callable(func) and not isinstance(func, classmethod | staticmethod):
        raise TypeError(f"@track_memory needs a function or method, got {type(func).__name__}")
    tracker = _MemoryTracker(_qualified_name(func), _is_coroutine_function(func))
    with _tracked_lock:
        _tracked.add(tracker)
    return cast(F, TrackedFunction(func, tracker))


@overload
def track_memory(func: F, /) -> F: ...
@overload
def track_memory(func: None = None, /) -> Callable[[F], F]: ...
def track_memory(func: F | None = None, /) -> F | Callable[[F], F]:
    """Measure the bytes each call leaves allocated; read them with ``wrapper.memory_stats()``.

    Uses tracemalloc's traced total when tracing is on (``tracemalloc.start()`` or the profiler), else the
    process RSS. Both are process-wide, so concurrent threads' allocations land in the delta too.
    """
    if func is None:
        return _track
    return _track(func)


_track_memory_decorator = track_memory


def iter_tracked_functions() -> Iterator[FunctionMemoryStats]:
    """The current figures of every live ``@track_memory`` function, most allocating first."""
    with _tracked_lock:
        trackers = list(_tracked)
    yield from sorted((t.stats() for t in trackers), key=lambda s: s.total_bytes, reverse=True)
