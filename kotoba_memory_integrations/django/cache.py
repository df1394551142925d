"""Django cache backend on kotoba-memory: ``BACKEND = "kotoba_memory_integrations.django.KotobaCache"``.

With ``OPTIONS={"REDIS_URL": "redis://..."}`` it is a near-cache shared by every worker (see
``near_cache.py``). Otherwise it behaves as Django's ``LocMemCache`` (same keys, versions, timeouts,
culling, warnings, pickled values isolated from later mutation, aliases with one ``LOCATION`` sharing
data) and adds, from ``OPTIONS``: an eviction ``POLICY``, a byte bound ``MAX_BYTES``, an optional disk
tier (``DISK_PATH``...) and ``stats()``.
Key prefixes, versions, key functions, key validation and ``incr_version`` come from Django's own
``BaseCache``.
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache

from kotoba_memory.cache_manager import CacheManager, CachePolicy
from kotoba_memory.cache_manager.disk import DiskCache
from kotoba_memory.cache_manager.tiers import TieredCache
from kotoba_memory.errors import ConfigError
from kotoba_memory.process import forks
from kotoba_memory.validation import check_enum, check_non_negative_int, check_positive_int, check_str
from kotoba_memory_integrations.django._uses import note_store

if TYPE_CHECKING:
    from kotoba_memory.cache_manager import BaseCache as KotobaBaseCache
    from kotoba_memory.cache_manager import CacheStats

T = TypeVar("T")

__all__ = ["KotobaCache", "forget_location"]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_DISK_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_SPILL_THRESHOLD_BYTES = 256 * 1024
_MISSING: Any = object()
_EXPIRED: Any = object()  # a timeout <= 0: Django stores nothing (and drops the old value)

# OPTIONS read by Django's BaseCache itself, and the ones this backend adds.
_DJANGO_OPTIONS = frozenset({"MAX_ENTRIES", "CULL_FREQUENCY"})
_DISK_OPTIONS = frozenset({"DISK_MAX_BYTES", "DISK_COMPRESSION", "SPILL_THRESHOLD_BYTES"})
_STORE_OPTIONS = frozenset({"MAX_BYTES", "POLICY", "NAME", "DISK_PATH"}) | _DISK_OPTIONS


@dataclass(frozen=True)
class _StoreConfig:
    max_bytes: int
    policy: CachePolicy
    name: str
    disk_path: str | None = None
    disk_max_bytes: int = DEFAULT_DISK_MAX_BYTES
    disk_compression: str | None = None
    spill_threshold_bytes: int = DEFAULT_SPILL_THRESHOLD_BYTES


@dataclass
class _Store:
    """The data of one LOCATION, shared by every alias and thread that names it."""

    cache: CacheManager | TieredCache
    memory: CacheManager  # the in-memory tier (``cache`` itself when there is no disk tier)
    disk: DiskCache | None
    lock: threading.Lock  # makes add/incr/touch/set+cull atomic across aliases, as locmem's lock does
    config: _StoreConfig


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _reset_locks_after_fork() -> None:
    # A lock held by another thread at fork() would stay held forever in the child (which has only
    # the forking thread): give the child fresh ones. The stored data itself is inherited as is.
    global _stores_lock
    _stores_lock = threading.Lock()
    for store in _stores.values():
        store.lock = threading.Lock()


forks.register(_reset_locks_after_fork, name="integrations.django.cache")


def _parse_options(location: str, options: Mapping[str, Any]) -> _StoreConfig:
    unknown = sorted(set(options) - _DJANGO_OPTIONS - _STORE_OPTIONS)
    if unknown:
        known = ", ".join(sorted(_DJANGO_OPTIONS | _STORE_OPTIONS))
        raise ConfigError(unknown[0], f"unknown KotobaCache OPTIONS key (known: {known})")
    max_bytes = check_positive_int(options.get("MAX_BYTES", DEFAULT_MAX_BYTES), "MAX_BYTES")
    # LRU, not the core's ADAPTIVE: culling must pick what LocMemCache picks (docs/cache.md, Default policy)
    policy = check_enum(options.get("POLICY", CachePolicy.LRU), "POLICY", CachePolicy, label="cache policy")
    name = check_str(options.get("NAME", f"django:{location}" if location else "django"), "NAME")
    disk_path = options.get("DISK_PATH")
    if disk_path is None:
        stray = sorted(_DISK_OPTIONS & set(options))
        if stray:
            raise ConfigError(stray[0], "only applies with a disk tier; set DISK_PATH too")
        return _StoreConfig(max_bytes=max_bytes, policy=policy, name=name)
    if not isinstance(disk_path, str | os.PathLike) or not os.fspath(disk_path):
        raise ConfigError("DISK_PATH", f"must be a file or directory path, got {disk_path!r}")
    compression = options.get("DISK_COMPRESSION")
    if compression not in (None, "zlib", "zstd"):
        raise ConfigError("DISK_COMPRESSION", f"must be None, 'zlib' or 'zstd', got {compression!r}")
    spill = check_non_negative_int(
        options.get("SPILL_THRESHOLD_BYTES", DEFAULT_SPILL_THRESHOLD_BYTES), "SPILL_THRESHOLD_BYTES"
    )
    disk_max = check_positive_int(options.get("DISK_MAX_BYTES", DEFAULT_DISK_MAX_BYTES), "DISK_MAX_BYTES")
    return _StoreConfig(
        max_bytes=max_bytes,
        policy=policy,
        name=name,
        disk_path=os.fspath(disk_path),
        disk_max_bytes=disk_max,
        disk_compression=compression,
        spill_threshold_bytes=spill,
    )


def _build_store(config: _StoreConfig) -> _Store:
    memory = CacheManager(config.max_bytes, config.policy, default_ttl=None, name=config.name)
    if config.disk_path is None:
        return _Store(memory, memory, None, threading.Lock(), config)
    try:
        disk = DiskCache(
            config.disk_path,
            config.disk_max_bytes,
            compression=config.disk_compression,
            name=f"{config.name}:disk",
        )
    except (OSError, ValueError) as exc:
        raise ConfigError("DISK_PATH", f"cannot open the disk tier at {config.disk_path!r}: {exc}") from exc
    tiered = TieredCache(
        memory, disk, spill_threshold_bytes=config.spill_threshold_bytes, name=f"{config.name}:tiered"
    )
    return _Store(tiered, memory, disk, threading.Lock(), config)


def _store_for(location: str, options: Mapping[str, Any]) -> _Store:
    config = _parse_options(location, options)
    with _stores_lock:
        store = _stores.get(location)
        if store is None:
            store = _stores[location] = _build_store(config)
            note_store(store.cache, location)
        elif store.config != config:
            raise ConfigError(
                "OPTIONS",
                f"LOCATION {location!r} is already in use with {store.config}; aliases sharing a LOCATION "
                "share one store and must agree on MAX_BYTES/POLICY/NAME/DISK_*",
            )
        return store


def forget_location(location: str) -> bool:
    """Drop the store behind ``location`` (its data goes with it); True if there was one."""
    with _stores_lock:
        store = _stores.pop(location, None)
    if store is None:
        return False
    store.cache.clear()
    if isinstance(store.cache, TieredCache):
        store.cache.close()
    return True


class _Misconfigured:
    """Stands in for the store of a cache whose OPTIONS are invalid: any use raises the ConfigError."""

    def __init__(self, error: ConfigError) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Any:
        raise type(self._error)(self._error.field, self._error.reason)


class KotobaCache(BaseCache):
    """Thread-safe in-memory Django cache on a kotoba-memory ``CacheManager`` (one per ``LOCATION``)."""

    pickle_protocol = pickle.HIGHEST_PROTOCOL

    def __new__(cls, location: str, params: dict[str, Any]) -> KotobaCache:
        # OPTIONS={"REDIS_URL": ...} switches the backend to the near-cache over Redis (near_cache.py).
        if cls is KotobaCache and "REDIS_URL" in (params.get("OPTIONS") or {}):
            from kotoba_memory_integrations.django.near_cache import KotobaNearCache

            return super().__new__(KotobaNearCache)
        return super().__new__(cls)

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        check_str(location, "LOCATION", allow_empty=True)
        self._location = location
        options = params.get("OPTIONS") or {}
        try:
            if not isinstance(options, Mapping):
                raise ConfigError("OPTIONS", f"must be a dict, got {type(options).__name__}")
            self._shared = _store_for(location, options)
        except ConfigError as exc:
            # Django's own cache checks build every cache, so raising here would crash `manage.py check`
            # with a traceback; kotoba_memory.E006 reports the error there and any use raises it.
            misconfigured: Any = _Misconfigured(exc)
            self._shared = self._cache = self._memory = misconfigured
            self._disk = None
            return
        self._cache = self._shared.cache
        self._memory = self._shared.memory
        self._disk = self._shared.disk

    @property
    def _lock(self) -> threading.Lock:
        """The LOCATION's lock (read through the store, so a fork's fresh lock is picked up)."""
        return self._shared.lock

    # -- kotoba-memory extras ---------------------------------------------------------------------------

    @property
    def store(self) -> KotobaBaseCache:
        """The kotoba-memory cache holding this LOCATION's pickled entries."""
        return self._cache

    def stats(self) -> CacheStats:
        """Hits, misses, evictions, bytes and entries of this LOCATION's store."""
        return self._cache.stats()

    # -- helpers ---------------------------------------------------------------------------------------

    def _ttl(self, timeout: Any) -> Any:
        """Django's timeout as the store's ttl: None (forever), seconds > 0, or ``_EXPIRED``."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
        if math.isnan(timeout):
            raise ValueError("timeout must be a number of seconds or None, got nan")
        if timeout <= 0:
            return _EXPIRED
        return None if math.isinf(timeout) else float(timeout)

    def _remaining_ttl(self, key: str) -> float | None:
        """Seconds the live entry under ``key`` has left (None: forever); KeyError when absent."""
        return self._cache.ttl_remaining(key)  # part of every kotoba-memory cache, tiered or not

    def _dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, self.pickle_protocol)

    def _put_culling(self, key: str, payload: bytes, ttl: float | None) -> bool:
        """Put, culling first as locmem does: at MAX_ENTRIES drop 1/CULL_FREQUENCY of the entries (0: all).

        The victims are chosen by the store's own policy: for the duration of this one put (under the
        LOCATION lock, which every writer of the store holds) the store's entry bound is lowered so that
        its eviction removes exactly the culled count, in policy order, and the new entry stays. With a
        disk tier the bound applies to the memory tier, whose culled entries spill to disk.
        """
        cache, memory = self._cache, self._memory
        size = len(memory)
        if size < self._max_entries:
            return bool(cache.put(key, payload, ttl))
        if self._cull_frequency == 0:
            cache.clear()
            return bool(cache.put(key, payload, ttl))
        count = size // self._cull_frequency
        if count <= 0:
            return bool(cache.put(key, payload, ttl))
        room = 1  # the bound leaves room for the written key ...
        if key in memory:
            if self._cull_would_take(key, count):
                # ... which locmem culls and then re-adds: drop it first, then it is a new key.
                cache.delete(key)
            else:
                room = 0  # ... unless it stays: an overwrite does not grow the store
        saved = memory.max_entries
        memory.max_entries = max(1, size - count + room)
        try:
            return bool(cache.put(key, payload, ttl))
        finally:
            memory.max_entries = saved

    def _cull_would_take(self, key: str, count: int) -> bool:
        """Whether ``key`` is among the next ``count`` victims (known for LRU/FIFO, whose key order is it)."""
        if self._memory.policy not in (CachePolicy.LRU, CachePolicy.FIFO):
            return False
        return key in self._memory.keys()[:count]

    def _set_locked(self, key: str, payload: bytes, ttl: Any) -> bool:
        """Store (caller holds the lock); False when the entry cannot be kept."""
        if ttl is _EXPIRED:
            self._cache.delete(key)
            return True
        if self._put_culling(key, payload, ttl):
            return True
        # Rejected (larger than the whole store): never serve the older value for this key.
        self._cache.delete(key)
        return False

    # -- Django's cache API ----------------------------------------------------------------------------

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        payload = self._dumps(value)  # outside the lock: pickling runs arbitrary code
        with self._lock:
            if key in self._cache:
                return False
            self._set_locked(key, payload, ttl)
            return True

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        payload = self._cache.get(key, _MISSING)
        if payload is _MISSING:
            return default
        return pickle.loads(payload)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        payload = self._dumps(value)
        with self._lock:
            self._set_locked(key, payload, ttl)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        with self._lock:
            if key not in self._cache:
                return False
            if ttl is _EXPIRED:
                self._cache.delete(key)
                return True
            return bool(self._cache.touch(key, ttl))

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        with self._lock:
            payload = self._cache.get(key, _MISSING)
            if payload is _MISSING:
                raise ValueError(f"Key '{key}' not found")
            new_value = pickle.loads(payload) + delta
            # Like memcached and locmem, incr keeps the entry's expiry.
            try:
                remaining = self._remaining_ttl(key)
            except KeyError:  # expired between the read and now
                raise ValueError(f"Key '{key}' not found") from None
            # No culling here: locmem's incr replaces the value in place.
            if not self._cache.put(key, self._dumps(new_value), remaining):
                self._cache.delete(key)
        return new_value

    def has_key(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return key in self._cache

    def delete(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        with self._lock:
            return bool(self._cache.delete(key))

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        made = {self.make_and_validate_key(key, version=version): key for key in keys}
        found = self._cache.get_many(made)
        return {made[key]: pickle.loads(found[key]) for key in made if key in found}

    def set_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        ttl = self._ttl(timeout)
        prepared = [
            (original, self.make_and_validate_key(original, version=version), self._dumps(value))
            for original, value in data.items()
        ]
        failed: list[Any] = []
        with self._lock:
            for original, key, payload in prepared:
                if not self._set_locked(key, payload, ttl):
                    failed.append(original)
        return failed

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        made = [self.make_and_validate_key(key, version=version) for key in keys]
        with self._lock:
            for key in made:
                self._cache.delete(key)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- async twins: the in-memory store is fast, so they run inline (no thread hop); with a disk tier
    # -- they run in a worker thread so SQLite I/O never blocks the event loop.

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        if self._disk is None:
            return func(*args)
        return await asyncio.to_thread(func, *args)

    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        return await self._run(self.add, key, value, timeout, version)

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return await self._run(self.get, key, default, version)

    async def aset(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        await self._run(self.set, key, value, timeout, version)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return await self._run(self.touch, key, timeout, version)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        return await self._run(self.delete, key, version)

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        return await self._run(self.get_many, list(keys), version)

    async def aget_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        value = await self.aget(key, _MISSING, version=version)
        if value is not _MISSING:
            return value
        if callable(default):
            default = default()
            if asyncio.iscoroutine(default):
                default = await default
        await self.aadd(key, default, timeout=timeout, version=version)
        # Read again: another caller may have added a value between our get() and add().
        return await self.aget(key, default, version=version)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return await self._run(self.has_key, key, version)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return await self._run(self.incr, key, delta, version)

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return await self._run(self.decr, key, delta, version)

    async def aset_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        return await self._run(self.set_many, data, timeout, version)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        await self._run(self.delete_many, list(keys), version)

    async def aclear(self) -> None:
        await self._run(self.clear)

    async def aincr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return await self._run(self.incr_version, key, delta, version)

    async def adecr_version(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return await self._run(self.decr_version, key, delta, version)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} LOCATION={self._location!r} store={self._cache.name!r}>"
