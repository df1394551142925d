"""A cachelib ``BaseCache`` backed by a kotoba-memory cache: byte-bounded, policy-driven, with stats.

Behaves as ``cachelib.SimpleCache`` does (values pickled through ``serializer``, ``timeout=None`` means
the default, ``0`` means never expire, ``threshold`` bounds the number of entries), plus ``max_bytes``,
an eviction ``policy`` and ``stats()``. Pass ``cache=`` to put the entries in a cache you built yourself
(a tiered or shared one), e.g. to share one store between several cachelib/Flask-Caching instances, or
``redis_url=`` (with ``secret=``) to use a near-cache shared by every process: an in-process L1 in
front of Redis, kept coherent across processes, values signed with ``secret``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

from cachelib.base import BaseCache
from cachelib.serializers import SimpleSerializer

from kotoba_memory.cache_manager.inventory import note_use
from kotoba_memory.process import forks
from kotoba_memory.validation import check_non_negative_int, check_str

if TYPE_CHECKING:
    from kotoba_memory.cache_manager import BaseCache as KotobaBaseCache
    from kotoba_memory.cache_manager import CachePolicy, CacheStats

__all__ = ["KotobaCache"]

_MISSING: Any = object()
Timeout = int | dt.timedelta | None

# One lock per store, so inc/dec stay atomic when several instances share a store.
_store_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_store_locks_guard = threading.Lock()


def _lock_for(store: Any) -> threading.Lock:
    with _store_locks_guard:
        lock = _store_locks.get(store)
        if lock is None:
            lock = _store_locks[store] = threading.Lock()
        return lock


def _reset_locks_after_fork() -> None:
    # Locks held by other threads at fork() would never be released in the child: start afresh.
    global _store_locks_guard
    _store_locks_guard = threading.Lock()
    _store_locks.clear()


forks.register(_reset_locks_after_fork, name="integrations.cachelib")


class KotobaCache(BaseCache):
    """cachelib cache storing pickled values in a kotoba-memory ``CacheManager`` (thread-safe).

    :param threshold: the most entries kept (0 means 500, as in ``SimpleCache``).
    :param default_timeout: seconds (or a timedelta) used when ``set`` gets ``timeout=None``; 0 = never.
    :param max_bytes: optional bound on the pickled bytes held.
    :param policy: which entries leave first when full: ``"lru"``, ``"lfu"``, ``"fifo"``, ``"adaptive"``.
    :param key_prefix: prepended to every key (useful when several caches share one ``cache``).
    :param cache: an existing kotoba-memory cache to store into instead of building a ``CacheManager``.
    :param redis_url: build a near-cache over this Redis instead (``max_bytes``/``policy`` size its L1);
        ``secret`` signs the values (required), ``namespace`` keeps apps apart (default: from the secret).
    """

    serializer = SimpleSerializer()
    #: What the memory report says stores into this backend's cache.
    report_label = "cachelib KotobaCache"

    def __init__(
        self,
        threshold: int = 500,
        default_timeout: int | dt.timedelta = 300,
        ignore_delete_many_errors: bool = True,
        *,
        max_bytes: int | None = None,
        policy: CachePolicy | str = "lru",
        key_prefix: str | None = None,
        cache: KotobaBaseCache | None = None,
        name: str | None = None,
        redis_url: str | None = None,
        secret: str | bytes | None = None,
        namespace: str | None = None,
    ) -> None:
        BaseCache.__init__(self, default_timeout)
        # Set here rather than passed: cachelib before 0.16 has no such parameter.
        self.ignore_delete_many_errors = ignore_delete_many_errors
        self.key_prefix = "" if key_prefix is None else check_str(key_prefix, "key_prefix", allow_empty=True)
        if redis_url is not None:
            if cache is not None:
                raise ValueError("give either cache= or redis_url=, not both")
            cache = _near_cache(redis_url, secret, namespace, max_bytes, policy, name)
            max_bytes = name = None
        elif secret is not None or namespace is not None:
            raise ValueError("secret/namespace configure the near-cache: give redis_url= too")
        if cache is None:
            from kotoba_memory.cache_manager import CacheManager

            self._threshold = check_non_negative_int(threshold, "threshold") or 500
            cache = CacheManager(max_bytes, policy, max_entries=self._threshold, default_ttl=None, name=name)
        else:
            from kotoba_memory.cache_manager import BaseCache as KotobaCacheBase

            if not isinstance(cache, KotobaCacheBase):
                raise TypeError(f"cache must be a kotoba-memory cache, got {type(cache).__name__}")
            if max_bytes is not None or name is not None:
                raise ValueError("max_bytes/name configure the cache built here; with cache= set them on it")
            self._threshold = threshold or 500
        self._store = cache
        note_use(cache, self.report_label)

    @property
    def _lock(self) -> threading.Lock:
        """Serialises the read-modify-write of inc/dec on this store (the store itself is thread-safe)."""
        return _lock_for(self._store)

    @property
    def store(self) -> KotobaBaseCache:
        """The kotoba-memory cache holding the pickled entries."""
        return self._store

    def stats(self) -> CacheStats:
        """Hit/miss/eviction counters and occupancy of the underlying store."""
        return self._store.stats()

    def _key(self, key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, got {type(key).__name__}")
        return self.key_prefix + key

    def _ttl(self, timeout: Timeout) -> float | None:
        """Seconds to live for the store: None = never expire, <= 0 = already expired."""
        seconds = self._normalize_timeout(timeout)
        if seconds == 0:
            return None
        return float(seconds) if seconds > 0 else 0.0

    def get(self, key: str) -> Any:
        """The value under ``key``, or None when missing, expired or unreadable."""
        payload = self._store.get(self._key(key))
        if payload is None:
            return None
        return self.serializer.loads(payload)

    def get_many(self, *keys: str) -> list[Any]:
        """The values of ``keys`` in order, None for each miss."""
        return [self.get(key) for key in keys]

    def _write(self, key: str, value: Any, timeout: Timeout, *, only_if_absent: bool) -> bool:
        store_key = self._key(key)
        ttl = self._ttl(timeout)
        payload = self.serializer.dumps(value)
        if payload is None:  # the serializer logged the pickling error; the old entry stays
            return False
        if ttl == 0.0:  # a negative timeout: the entry is born expired
            if only_if_absent:
                return store_key not in self._store
            self._store.delete(store_key)
            return True
        if only_if_absent:
            return bool(self._store.add(store_key, payload, ttl))
        if self._store.put(store_key, payload, ttl):
            return True
        # Rejected (e.g. larger than the whole cache): never serve the older value for this key.
        self._store.delete(store_key)
        return False

    def set(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        """Store ``value``; False when it could not be kept (unpicklable, or larger than the cache)."""
        return self._write(key, value, timeout, only_if_absent=False)

    def add(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        """Store ``value`` only if ``key`` holds no live entry (atomic); True if stored."""
        return self._write(key, value, timeout, only_if_absent=True)

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""
        return bool(self._store.delete(self._key(key)))

    def has(self, key: str) -> bool:
        """True if ``key`` holds a live entry (without unpickling it)."""
        return self._key(key) in self._store

    def clear(self) -> bool:
        """Remove every entry of the store (shared stores included)."""
        self._store.clear()
        return True

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Atomically add ``delta`` (a missing key counts as 0); the new value, or None on failure."""
        if _is_near(self._store):
            return self._near_inc(key, delta)
        with self._lock:
            value = (self.get(key) or 0) + delta
            return value if self.set(key, value) else None

    def dec(self, key: str, delta: int = 1) -> int | None:
        """Atomically subtract ``delta`` (a missing key counts as 0); the new value, or None on failure."""
        if _is_near(self._store):
            return self._near_inc(key, -delta)
        with self._lock:
            value = (self.get(key) or 0) - delta
            return value if self.set(key, value) else None

    def _near_inc(self, key: str, delta: int) -> int | None:
        """inc/dec on a near-cache: atomic across processes (local only while Redis is unavailable)."""
        from kotoba_memory.cache_manager.near import CacheUnavailableError

        store_key = self._key(key)
        result: list[int] = []

        def change(payload: Any) -> Any:
            result[:] = [(self.serializer.loads(payload) or 0) + delta]
            return self.serializer.dumps(result[0])

        for _ in range(8):
            try:
                self._store.update(store_key, change)  # type: ignore[attr-defined]
                return result[0]
            except KeyError:
                if self._store.add(store_key, self.serializer.dumps(delta)):
                    return delta
            except CacheUnavailableError:
                with self._lock:
                    value = (self.get(key) or 0) + delta
                    return value if self.set(key, value) else None
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(store={self._store.name!r})"


def _is_near(store: Any) -> bool:
    near = sys.modules.get("kotoba_memory.cache_manager.near")
    return near is not None and isinstance(store, near.NearCache)


def _near_cache(
    redis_url: str,
    secret: str | bytes | None,
    namespace: str | None,
    max_bytes: int | None,
    policy: CachePolicy | str,
    name: str | None,
) -> KotobaBaseCache:
    from kotoba_memory.cache_manager.near import NearCache
    from kotoba_memory.errors import ConfigError

    check_str(redis_url, "redis_url")
    if not secret:
        raise ConfigError("secret", "a near-cache signs what it writes to Redis: give secret= (SECRET_KEY)")
    if namespace is None:
        raw = secret.encode("utf-8") if isinstance(secret, str) else secret
        namespace = "cachelib:" + hashlib.sha256(b"kotoba-namespace:" + raw).hexdigest()[:12]
    options: dict[str, Any] = {"secret": secret, "namespace": namespace, "policy": policy}
    if max_bytes is not None:
        options["l1_max_bytes"] = max_bytes
    if name is not None:
        options["name"] = name
    return NearCache(redis_url, **options)
