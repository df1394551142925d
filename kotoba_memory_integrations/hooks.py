"""wrapt-based hooks: ``@cached``, ``@track_memory`` and runtime ``instrument``/``uninstrument``.

``@cached(cache, ttl=..., key=...)`` memoises a function, method, classmethod, staticmethod or coroutine
function in any kotoba-memory ``BaseCache``, with per-key stampede protection (the cache's
``get_or_set``/``aget_or_set``). ``@track_memory`` measures what each call allocates and keeps a bounded
per-function aggregate (``wrapper.memory_stats()``). ``instrument("pkg.module:Class.method", ...)`` applies
either of them (or any wrapt wrapper function) to code you do not own, and ``uninstrument`` puts back the
exact original object.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import os
import threading
import tracemalloc
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast, overload

import wrapt

from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory.validation import check_ttl

if TYPE_CHECKING:
    from kotoba_memory.cache_manager import BaseCache

__all__ = [
    "FunctionMemoryStats",
    "InstrumentationError",
    "Instrumentation",
    "cached",
    "instrument",
    "instrumented_targets",
    "iter_tracked_functions",
    "track_memory",
    "uninstrument",
]

F = TypeVar("F", bound=Callable[..., Any])
WrapperFunction = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]

_KEY_MARK = "kotoba_memory.cached"
_MISS: Any = object()
_local_ids = itertools.count(1)
_SAMPLE_WINDOW = 1024  # recent per-call samples kept for the percentiles; bounds our own memory


class InstrumentationError(KotobaMemoryError, ValueError):
    """A target path cannot be instrumented, or is already instrumented differently."""


# ---------------------------------------------------------------------------------------------------
# @cached


def _qualified_name(func: Callable[..., Any]) -> str:
    inner = getattr(func, "__func__", func)  # classmethod/staticmethod objects
    module = getattr(inner, "__module__", None) or "?"
    qualname = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None) or repr(inner)
    return f"{module}.{qualname}"


def _is_coroutine_function(func: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(func, "__func__", func))


class _CachedCall:
    """The wrapt wrapper function behind ``@cached``: builds the key and defers to ``get_or_set``."""

    def __init__(
        self,
        cache: BaseCache,
        ttl: float | None,
        key: Callable[..., Hashable] | None,
        name: str,
        is_async: bool,
    ) -> None:
        self.cache = cache
        self.ttl = ttl
        self.key = key
        self.name = name
        self.is_async = is_async

    def make_key(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        # functools.lru_cache convention: for methods the instance (or class, for classmethods) is part of
        # the arguments, so two instances never share a result. A user key sees the same arguments.
        call_args = args if instance is None else (instance, *args)
        if self.key is not None:
            return self.key(*call_args, **kwargs)
        # Keyword order does not matter; sorting compares only the (unique) names, never the values.
        return (_KEY_MARK, self.name, call_args, tuple(sorted(kwargs.items())) if kwargs else ())

    def _unhashable(self, exc: TypeError) -> TypeError:
        return TypeError(
            f"@cached {self.name}: the cache key must be hashable; pass hashable arguments or a "
            f"key= function ({exc})"
        )

    def _checked_key(self, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        key = self.make_key(instance, args, kwargs)
        try:
            hash(key)
        except TypeError as exc:
            raise self._unhashable(exc) from exc
        return key

    def __call__(
        self, wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        key = self.make_key(instance, args, kwargs)
        if self.is_async:
            return self._acall(key, wrapped, args, kwargs)
        # The hit path is one lookup; the stampede-safe get_or_set runs only on a miss.
        try:
            value = self.cache.get(key, _MISS)
        except TypeError as exc:  # unhashable arguments
            raise self._unhashable(exc) from exc
        if value is not _MISS:
            return value
        return self.cache.get_or_set(key, lambda: wrapped(*args, **kwargs), ttl=self.ttl)

    async def _acall(
        self, key: Hashable, wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            value = await self.cache.aget(key, _MISS)
        except TypeError as exc:
            raise self._unhashable(exc) from exc
        if value is not _MISS:
            return value

        async def factory() -> Any:
            return await wrapped(*args, **kwargs)

        return await self.cache.aget_or_set(key, factory, ttl=self.ttl)


class _BoundCachedFunction(wrapt.BoundFunctionWrapper):
    """What accessing a ``@cached`` method through an instance or class returns."""

    def cache_key(self, *args: Any, **kwargs: Any) -> Hashable:
        """The cache key a call with these arguments uses."""
        call = cast("_CachedCall", self._self_wrapper)
        return call._checked_key(self._self_instance, args, kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the cached result of a call with these arguments; True if one was cached."""
        call = cast("_CachedCall", self._self_wrapper)
        return bool(call.cache.delete(self.cache_key(*args, **kwargs)))

    @property
    def cache(self) -> BaseCache:
        """The cache results are stored in."""
        return cast("_CachedCall", self._self_wrapper).cache


class CachedFunction(wrapt.FunctionWrapper):
    """A function (or descriptor) memoised by ``@cached``; behaves as the original otherwise."""

    __bound_function_wrapper__ = _BoundCachedFunction

    def cache_key(self, *args: Any, **kwargs: Any) -> Hashable:
        """The cache key a call with these arguments uses (pass the instance first for methods)."""
        call = cast("_CachedCall", self._self_wrapper)
        return call._checked_key(None, args, kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the cached result of a call with these arguments; True if one was cached."""
        call = cast("_CachedCall", self._self_wrapper)
        return bool(call.cache.delete(self.cache_key(*args, **kwargs)))

    @property
    def cache(self) -> BaseCache:
        """The cache results are stored in."""
        return cast("_CachedCall", self._self_wrapper).cache


class _CachedDecorator:
    """The decorator ``cached(cache, ...)`` returns; also accepted by ``instrument``."""

    def __init__(self, cache: BaseCache, ttl: float | None, key: Callable[..., Hashable] | None) -> None:
        self.cache = cache
        self.ttl = ttl
        self.key = key

    def __call__(self, func: F) -> F:
        if not callable(func) and not isinstance(func, classmethod | staticmethod):
            raise TypeError(f"@cached needs a function or method, got {type(func).__name__}")
        inner = getattr(func, "__func__", func)
        if inspect.isgeneratorfunction(inner) or inspect.isasyncgenfunction(inner):
            # A generator can be consumed once; caching it would hand an exhausted one to later callers.
            raise TypeError(f"@cached cannot cache generator function {_qualified_name(func)}")
        name, is_async = _qualified_name(func), _is_coroutine_function(func)
        if "<locals>" in name or "<lambda>" in name:
            # Closures made by one factory share a qualified name but not their results: keep them apart.
            name = f"{name}#{next(_local_ids)}"
        call = _CachedCall(self.cache, self.ttl, self.key, name, is_async)
        return cast(F, CachedFunction(func, call))

    def _identity(self) -> tuple[int, float | None, int]:
        return (id(self.cache), self.ttl, id(self.key))

    def __eq__(self, other: object) -> bool:
        # Equal when they would cache the same way, so instrument() with a fresh cached(...) is idempotent.
        return isinstance(other, _CachedDecorator) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        return f"cached({self.cache!r}, ttl={self.ttl!r}, key={self.key!r})"


def cached(
    cache: BaseCache, ttl: float | None = None, key: Callable[..., Hashable] | None = None
) -> Callable[[F], F]:
    """Memoise a function or method in ``cache`` for ``ttl`` seconds (None: the cache's default).

    Concurrent callers (threads or coroutines) of one key run the function once. The default key is the
    qualified name plus the arguments, with the instance (or class) included for methods, as
    ``functools.lru_cache`` does; ``key`` is called with the function's own arguments instead.
    """
    from kotoba_memory.cache_manager import BaseCache as KotobaBaseCache

    if not isinstance(cache, KotobaBaseCache):
        # e.g. a Django or cachelib cache: their get_or_set has another signature and no stampede guard
        raise TypeError(
            f"cached() needs a kotoba-memory cache (CacheManager, TieredCache...), got {type(cache).__name__}"
        )
    ttl = check_ttl(ttl, "ttl")
    if key is not None and not callable(key):
        raise TypeError(f"cached(): key must be callable, got {type(key).__name__}")
    return _CachedDecorator(cache, ttl, key)


# ---------------------------------------------------------------------------------------------------
# @track_memory


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


_process: Any = None


def _rss_bytes() -> int:
    global _process
    if _process is None or _process.pid != os.getpid():  # one handle per process (re-made after fork)
        import psutil  # a core dependency; imported lazily to keep module import cheap

        _process = psutil.Process()
    return int(_process.memory_info().rss)


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


# ---------------------------------------------------------------------------------------------------
# instrument / uninstrument


@dataclass(frozen=True, slots=True)
class Instrumentation:
    """Handle of one applied patch; ``remove()`` restores the original exactly."""

    target: str
    module: str
    path: str
    original: Any
    wrapper: Any  # the installed wrapt proxy, recognised by identity
    spec: tuple[Any, ...]
    parent: Any  # the object whose attribute was set (module, class or instance)
    attribute: str
    created: bool  # True when the attribute was inherited/served from elsewhere: removal deletes it

    def remove(self) -> bool:
        """Undo the patch; False if it was already removed."""
        return uninstrument(self.target)

    @property
    def active(self) -> bool:
        """Whether this patch is still installed."""
        with _installed_lock:
            return _installed.get(self.target) is self


_MISSING_ATTR: Any = object()
# Every wrapt wrapper derives from this (named BaseObjectProxy since wrapt 2, ObjectProxy before).
_PROXY_BASE: type = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)
_installed: dict[str, Instrumentation] = {}
_installed_lock = threading.RLock()


def _parse_target(target: str) -> tuple[str, str]:
    if not isinstance(target, str):
        kind = type(target).__name__
        raise TypeError(f"instrument target must be a 'pkg.module:Attr.path' string, got {kind}")
    module, sep, path = target.partition(":")
    if not sep or not module or not path or any(not part.isidentifier() for part in path.split(".")):
        raise InstrumentationError(
            f"instrument target {target!r} is not of the form 'pkg.module:Class.method'"
        )
    return module.strip(), path.strip()


def _build_decorator(
    wrapper: Any, cache: BaseCache | None, ttl: float | None, key: Any, track: bool
) -> Callable[[Any], Any] | None:
    decorators: list[Callable[[Any], Any]] = []
    if cache is not None:
        decorators.append(cached(cache, ttl=ttl, key=key))
    elif ttl is not None or key is not None:
        raise InstrumentationError("instrument(): ttl= and key= need cache=")
    if track:
        decorators.append(_track_memory_decorator)
    if wrapper is not None:
        if decorators:
            raise InstrumentationError("instrument(): pass either a wrapper or cache=/track=, not both")
        if wrapper is _track_memory_decorator or isinstance(wrapper, _CachedDecorator):
            return cast(Callable[[Any], Any], wrapper)
        if not callable(wrapper):
            raise TypeError(f"instrument(): wrapper must be callable, got {type(wrapper).__name__}")
        # Any other callable is a wrapt wrapper function: (wrapped, instance, args, kwargs) -> result.
        return functools.partial(wrapt.FunctionWrapper, wrapper=wrapper)
    if not decorators:
        return None

    def apply_all(original: Any) -> Any:
        # The cache is innermost, so tracked figures are those of the cached call as callers see it.
        for decorate in decorators:
            original = decorate(original)
        return original

    return apply_all


def instrument(
    target: str,
    wrapper: Callable[..., Any] | None = None,
    *,
    cache: BaseCache | None = None,
    ttl: float | None = None,
    key: Callable[..., Hashable] | None = None,
    track: bool = False,
) -> Instrumentation:
    """Patch ``"pkg.module:Class.method"`` (or a module function) at runtime.

    ``wrapper`` is ``track_memory``, a ``cached(...)`` decorator or a wrapt wrapper function
    ``(wrapped, instance, args, kwargs)``; or use the options ``cache=``/``ttl=``/``key=``/``track=``.
    Instrumenting an already instrumented target with the same arguments returns the existing handle.
    """
    module_name, path = _parse_target(target)
    spec = (wrapper, cache, ttl, key, track)
    decorate = _build_decorator(wrapper, cache, ttl, key, track)
    if decorate is None:
        raise InstrumentationError("instrument(): nothing to apply; pass a wrapper, cache= or track=True")
    canonical = f"{module_name}:{path}"
    with _installed_lock:
        current = _installed.get(canonical)
        if current is not None:
            if len(current.spec) == len(spec) and all(a is b or a == b for a, b in zip(current.spec, spec)):
                return current
            raise InstrumentationError(
                f"{canonical} is already instrumented differently; uninstrument it first"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InstrumentationError(f"instrument(): cannot import module {module_name!r}: {exc}") from exc
        try:
            # resolve_path reads a class attribute from the __dict__ that defines it (no binding), so
            # ``original`` is the very object to put back, be it a function, staticmethod or classmethod.
            parent, attribute, original = wrapt.resolve_path(module, path)
        except AttributeError as exc:  # wrapt's PathResolutionError is an AttributeError
            raise InstrumentationError(f"instrument(): {canonical} does not exist") from exc
        if not (callable(original) or isinstance(original, classmethod | staticmethod)):
            kind = type(original).__name__
            raise InstrumentationError(f"instrument(): {canonical} is not callable ({kind})")
        try:
            created = attribute not in vars(parent)
        except TypeError:  # an object without __dict__
            created = False
        installed = decorate(original)
        wrapt.apply_patch(parent, attribute, installed)
        handle = Instrumentation(
            canonical, module_name, path, original, installed, spec, parent, attribute, created
        )
        _installed[canonical] = handle
        return handle


def _chain(obj: Any, limit: int = 64) -> list[Any]:
    """``obj`` and what it wraps, following ``__wrapped__`` (outermost first, bounded, no cycles)."""
    chain: list[Any] = []
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen and len(chain) < limit:
        chain.append(obj)
        seen.add(id(obj))
        obj = getattr(obj, "__wrapped__", None)
    return chain


def _remove(handle: Instrumentation) -> bool:
    """Take ``handle``'s wrapper out; False when it is no longer there (replaced wholesale)."""
    parent, attribute = handle.parent, handle.attribute
    try:
        current = vars(parent).get(attribute, _MISSING_ATTR)
    except TypeError:
        current = getattr(parent, attribute, _MISSING_ATTR)
    if current is handle.wrapper:
        if handle.created:
            delattr(parent, attribute)  # the original is reachable again from where it was served
        else:
            setattr(parent, attribute, handle.original)
        return True
    chain = _chain(current) if current is not _MISSING_ATTR else []
    position = next((i for i, entry in enumerate(chain) if entry is handle.wrapper), None)
    if position is None:
        return False
    above = chain[position - 1]
    if not issubclass(type(above), _PROXY_BASE):
        # A plain closure's __wrapped__ is only metadata: rewiring it would not take ours out.
        raise InstrumentationError(
            f"cannot uninstrument {handle.target}: {type(above).__name__} was wrapped around it "
            "since; remove that first"
        )
    above.__wrapped__ = handle.original  # splice ours out from under a wrapt wrapper stacked on top
    return True


def uninstrument(target: str | Instrumentation | None = None) -> bool:
    """Restore the original of ``target`` (or of every instrumented target when None).

    Returns whether anything was restored; calling it again, or on a target never instrumented, is a
    no-op. A wrapt wrapper stacked on ours since stays (ours is spliced out beneath it); if someone
    replaced the attribute wholesale, their object is left alone.
    """
    if target is None:
        with _installed_lock:
            names = list(_installed)
        return any([uninstrument(name) for name in names])
    if isinstance(target, Instrumentation):
        target = target.target
    module_name, path = _parse_target(target)
    canonical = f"{module_name}:{path}"
    with _installed_lock:
        handle = _installed.get(canonical)
        if handle is None:
            return False
        removed = _remove(handle)  # raises (and keeps the record) if it cannot be removed
        del _installed[canonical]
        return removed


def instrumented_targets() -> list[str]:
    """The targets currently instrumented through ``instrument``."""
    with _installed_lock:
        return sorted(_installed)
