"""The one contract every cache implements, plus the conveniences built on it.

Subclasses implement ``get``, ``put``, ``delete``, ``__contains__``, ``__len__``, ``clear``, ``stats``
and ``ttl_remaining``, and set ``default_ttl``; ``get_many``, ``put_many``, ``add``, ``touch``,
``get_or_set`` and every ``a``-prefixed coroutine come for free. Adapters rely on this contract only
(``tests/cache/test_contract.py`` runs it against every cache we ship). The async twins run the
blocking method in a worker thread (``asyncio.to_thread``); an in-memory cache overrides them to run
inline.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

from kotoba_memory.cache_manager.types import CacheStats, UnhashableKeyError
from kotoba_memory.process import forks
from kotoba_memory.validation import check_str

__all__ = ["BaseCache", "iter_caches"]

_MISSING: Any = object()
_registry_lock = threading.Lock()
_registry: list[weakref.ref[BaseCache]] = []
_names = itertools.count(1)
# A waiter whose leader was cancelled retries as leader itself, at most this many times.
_MAX_FLIGHT_RETRIES = 8


def iter_caches() -> Iterator[BaseCache]:
    """Yield the caches alive in this process (held weakly: a cache no one uses is not kept alive)."""
    with _registry_lock:
        refs = list(_registry)
        _registry[:] = [ref for ref in refs if ref() is not None]
    for ref in refs:
        cache = ref()
        if cache is not None:
            yield cache


def _register(cache: BaseCache) -> None:
    with _registry_lock:
        if len(_registry) > 64:
            _registry[:] = [ref for ref in _registry if ref() is not None]
        _registry.append(weakref.ref(cache))


def _after_fork_in_child() -> None:
    """Locks held by a parent thread at fork time would stay held forever in the child: renew them."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for cache in iter_caches():
        try:
            cache._reinit_after_fork()
        except Exception:  # one broken cache must not break the forked worker
            pass


forks.register(_after_fork_in_child, name="cache_manager.base")


def _call_sync(factory: Callable[[], Any]) -> Any:
    """``factory()``, refusing an async one (its coroutine is closed, never left unawaited)."""
    value = factory()
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()
        raise TypeError("get_or_set got an async factory; use aget_or_set")
    return value


async def _call_async(factory: Callable[[], Any] | Callable[[], Awaitable[Any]]) -> Any:
    """Await an async factory, or run a sync one in a worker thread (awaiting what it returns)."""
    if inspect.iscoroutinefunction(factory):
        return await factory()
    value = await asyncio.to_thread(factory)
    if inspect.isawaitable(value):
        value = await value
    return value


class _LeaderCancelled(Exception):
    """The caller computing a value was cancelled; a waiter should compute it itself."""


def _settle(future: Future[Any] | None, value: Any = None, exc: BaseException | None = None) -> None:
    if future is None or future.done():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except Exception:  # InvalidStateError: settled concurrently, nothing left to do
        pass


class BaseCache(ABC):
    """Abstract cache: a bounded mapping from hashable keys to values with optional per-entry ttl."""

    name: str
    #: Seconds a put that gives no ttl lives (None: no expiry); set by each cache's constructor.
    default_ttl: float | None = None
    #: True when ``stats()``'s ``entries``/``bytes`` describe a store other processes share (Redis, a
    #: cache file), so a fleet view counts them once instead of summing them per process.
    shared_storage: bool = False

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = check_str(name, "name")
        elif not getattr(self, "name", None):
            self.name = f"{type(self).__name__.lower()}-{next(_names)}"
        self._flights: dict[Hashable, Future[Any]] = {}
        self._flights_lock = threading.Lock()
        self._add_lock = threading.RLock()
        _register(self)

    def _reinit_after_fork(self) -> None:
        """Renew locks and drop in-flight computations that belonged to the parent's threads."""
        self._flights = {}
        self._flights_lock = threading.Lock()
        self._add_lock = threading.RLock()

    # -- the abstract contract -------------------------------------------------------------------

    @abstractmethod
    def get(self, key: Hashable, default: Any = None) -> Any:
        """Return the live value stored under ``key``, or ``default``."""

    @abstractmethod
    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key``; ``ttl`` seconds (> 0) or None for the default.

        Returns False when the entry was not kept (e.g. larger than the whole cache).
        """

    @abstractmethod
    def delete(self, key: Hashable) -> bool:
        """Remove ``key``; True if it was present."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """True if ``key`` holds a live (unexpired) entry."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of entries held."""

    @abstractmethod
    def clear(self) -> None:
        """Remove every entry (no eviction callbacks)."""

    @abstractmethod
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""

    def lookups(self) -> tuple[int, int]:
        """Cumulative ``(hits, misses)``, as :meth:`stats` counts them: what a gauge read every second
        needs (backends override it when their stats() does more work than counting)."""
        stats = self.stats()
        return int(stats.hits), int(stats.misses)

    @abstractmethod
    def ttl_remaining(self, key: Hashable) -> float | None:
        """Seconds the live entry under ``key`` has left; None if it never expires.

        Raises KeyError when ``key`` holds no live entry.
        """

    # -- conveniences built on the contract ------------------------------------------------------

    def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """Return ``{key: value}`` for the keys that hit; misses are left out."""
        found: dict[Hashable, Any] = {}
        for key in keys:
            value = self.get(key, _MISSING)
            if value is not _MISSING:
                found[key] = value
        return found

    def put_many(self, mapping: Mapping[Hashable, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping`` with the same ``ttl``."""
        for key, value in mapping.items():
            self.put(key, value, ttl)

    def add(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` holds no live entry; True if it was stored.

        Atomic against other ``add`` calls on this cache; subclasses make it atomic against ``put``.
        """
        with self._add_lock:
            if key in self:
                return False
            return self.put(key, value, ttl)

    def touch(self, key: Hashable, ttl: float | None = None) -> bool:
        """Give the live entry under ``key`` a new ttl (None: the default); True if it existed."""
        with self._add_lock:
            value = self.get(key, _MISSING)
            if value is _MISSING:
                return False
            return self.put(key, value, ttl)

    def get_or_set(self, key: Hashable, factory: Callable[[], Any], ttl: float | None = None) -> Any:
        """Return the cached value, or compute it with ``factory()``, store it and return it.

        Concurrent callers for one key run the factory once; the others wait for its result (or its
        exception). Callers for different keys do not wait for each other.
        """
        if not callable(factory):
            raise TypeError(f"factory must be callable, got {type(factory).__name__}")
        for _ in range(_MAX_FLIGHT_RETRIES):
            value = self.get(key, _MISSING)
            if value is not _MISSING:
                return value
            future, leader = self._join_flight(key)
            if not leader:
                try:
                    return future.result()
                except _LeaderCancelled:
                    continue
            return self._lead_sync(key, future, factory, ttl)
        return self._lead_sync(key, None, factory, ttl)

    def _join_flight(self, key: Hashable) -> tuple[Future[Any], bool]:
        try:
            hash(key)
        except TypeError:
            raise UnhashableKeyError(key) from None
        with self._flights_lock:
            future = self._flights.get(key)
            if future is not None:
                return future, False
            future = Future()
            self._flights[key] = future
            return future, True

    def _end_flight(self, key: Hashable, future: Future[Any] | None) -> None:
        if future is None:
            return
        with self._flights_lock:
            if self._flights.get(key) is future:
                del self._flights[key]

    def _lead_sync(
        self, key: Hashable, future: Future[Any] | None, factory: Callable[[], Any], ttl: float | None
    ) -> Any:
        try:
            # Another leader may have stored the value between our miss and our election.
            value = self.get(key, _MISSING)
            if value is _MISSING:
                value = self._compute(key, factory, ttl)
        except BaseException as exc:
            _settle(future, exc=exc if isinstance(exc, Exception) else _LeaderCancelled())
            self._end_flight(key, future)
            raise
        _settle(future, value=value)
        self._end_flight(key, future)
        return value

    def _compute(self, key: Hashable, factory: Callable[[], Any], ttl: float | None) -> Any:
        """Run the factory of a ``get_or_set`` miss and store its value (a shared cache may first
        coordinate with other processes here)."""
        value = _call_sync(factory)
        self.put(key, value, ttl)
        return value

    async def _acompute(
        self, key: Hashable, factory: Callable[[], Any] | Callable[[], Awaitable[Any]], ttl: float | None
    ) -> Any:
        """:meth:`_compute` for ``aget_or_set``: ``factory`` may be async."""
        value = await _call_async(factory)
        await self.aput(key, value, ttl)
        return value

    # -- async twins -----------------------------------------------------------------------------

    async def aget(self, key: Hashable, default: Any = None) -> Any:
        """Async :meth:`get`."""
        return await asyncio.to_thread(self.get, key, default)

    async def aput(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Async :meth:`put`."""
        return await asyncio.to_thread(self.put, key, value, ttl)

    async def adelete(self, key: Hashable) -> bool:
        """Async :meth:`delete`."""
        return await asyncio.to_thread(self.delete, key)

    async def aget_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """Async :meth:`get_many`."""
        return await asyncio.to_thread(self.get_many, list(keys))

    async def aput_many(self, mapping: Mapping[Hashable, Any], ttl: float | None = None) -> None:
        """Async :meth:`put_many`."""
        await asyncio.to_thread(self.put_many, dict(mapping), ttl)

    async def aadd(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Async :meth:`add`."""
        return await asyncio.to_thread(self.add, key, value, ttl)

    async def atouch(self, key: Hashable, ttl: float | None = None) -> bool:
        """Async :meth:`touch`."""
        return await asyncio.to_thread(self.touch, key, ttl)

    async def aclear(self) -> None:
        """Async :meth:`clear`."""
        await asyncio.to_thread(self.clear)

    async def astats(self) -> CacheStats:
        """Async :meth:`stats`."""
        return await asyncio.to_thread(self.stats)

    async def alookups(self) -> tuple[int, int]:
        """Async :meth:`lookups`."""
        return await asyncio.to_thread(self.lookups)

    async def attl_remaining(self, key: Hashable) -> float | None:
        """Async :meth:`ttl_remaining`."""
        return await asyncio.to_thread(self.ttl_remaining, key)

    async def aget_or_set(
        self,
        key: Hashable,
        factory: Callable[[], Any] | Callable[[], Awaitable[Any]],
        ttl: float | None = None,
    ) -> Any:
        """Async :meth:`get_or_set`: ``factory`` may be sync (run in a worker thread) or async.

        Concurrent coroutines (and threads) asking for one key run the factory once.
        """
        if not callable(factory):
            raise TypeError(f"factory must be callable, got {type(factory).__name__}")
        for _ in range(_MAX_FLIGHT_RETRIES):
            value = await self.aget(key, _MISSING)
            if value is not _MISSING:
                return value
            future, leader = self._join_flight(key)
            if not leader:
                try:
                    # shield: a cancelled waiter must not cancel the leader's shared future
                    return await asyncio.shield(asyncio.wrap_future(future))
                except _LeaderCancelled:
                    continue
            return await self._lead_async(key, future, factory, ttl)
        return await self._lead_async(key, None, factory, ttl)

    async def _lead_async(
        self,
        key: Hashable,
        future: Future[Any] | None,
        factory: Callable[[], Any],
        ttl: float | None,
    ) -> Any:
        try:
            value = await self.aget(key, _MISSING)
            if value is _MISSING:
                value = await self._acompute(key, factory, ttl)
        except BaseException as exc:
            _settle(future, exc=exc if isinstance(exc, Exception) else _LeaderCancelled())
            self._end_flight(key, future)
            raise
        _settle(future, value=value)
        self._end_flight(key, future)
        return value
