"""``KotobaCache`` with ``OPTIONS={"REDIS_URL": ...}``: a near-cache shared by every worker and host.

Each process keeps an L1 copy (ADAPTIVE policy, ``MAX_BYTES``) in front of Redis; a write or delete in
any worker reaches every other worker's L1 through the near-cache's invalidation channel. Values are
signed with a key derived from ``SECRET`` (default: ``settings.SECRET_KEY``) and keys live under
``NAMESPACE`` (default: derived from ``LOCATION`` and the secret, so two apps sharing a Redis do not
mix). With ``IGNORE_EXCEPTIONS`` (default True) a Redis outage never raises: reads miss, writes stay in
this process for at most ``OUTAGE_TTL`` seconds and are replayed as deletes when Redis answers again.
``incr``/``decr`` are atomic across processes; during an outage they count within this process only.
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from django.core.cache.backends.base import DEFAULT_TIMEOUT

from kotoba_memory.cache_manager import CachePolicy
from kotoba_memory.cache_manager.near import CacheUnavailableError, NearCache
from kotoba_memory.errors import ConfigError
from kotoba_memory.process import forks
from kotoba_memory.validation import (
    check_bool,
    check_enum,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_str,
)
from kotoba_memory_integrations.django.cache import _EXPIRED, _MISSING, DEFAULT_MAX_BYTES, KotobaCache

if TYPE_CHECKING:
    from kotoba_memory.cache_manager import BaseCache as KotobaBaseCache
    from kotoba_memory.cache_manager import CacheStats

T = TypeVar("T")

__all__ = ["KotobaNearCache", "forget_near_stores"]

_DJANGO_OPTIONS = frozenset({"MAX_ENTRIES", "CULL_FREQUENCY"})
_NEAR_OPTIONS = frozenset(
    {
        "REDIS_URL",
        "SECRET",
        "NAMESPACE",
        "IGNORE_EXCEPTIONS",
        "SOCKET_TIMEOUT",
        "MAX_BYTES",
        "POLICY",
        "OUTAGE_TTL",
        "LOCK_TIMEOUT",
        "NAME",
    }
)


@dataclass(frozen=True)
class _NearConfig:
    url: str
    namespace: str
    secret: str
    ignore_exceptions: bool
    socket_timeout: float
    max_bytes: int
    policy: CachePolicy
    outage_ttl: float
    lock_timeout: float
    name: str


_stores: dict[_NearConfig, NearCache] = {}
_stores_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    global _stores_lock
    _stores_lock = threading.Lock()


forks.register(_reset_lock_after_fork, name="integrations.django.near_cache")


def _parse(location: str, options: Mapping[str, Any]) -> _NearConfig:
    unknown = sorted(set(options) - _DJANGO_OPTIONS - _NEAR_OPTIONS)
    if unknown:
        known = ", ".join(sorted(_DJANGO_OPTIONS | _NEAR_OPTIONS))
        raise ConfigError(unknown[0], f"unknown KotobaCache OPTIONS key with REDIS_URL (known: {known})")
    url = check_str(options["REDIS_URL"], "REDIS_URL")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("REDIS_URL", f"must be a redis://, rediss:// or unix:// URL, got {url!r}")
    secret = options.get("SECRET")
    if secret is None:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured

        try:
            secret = settings.SECRET_KEY
        except (AttributeError, ImproperlyConfigured):  # Django refuses an empty SECRET_KEY itself
            secret = ""
        if not secret:
            raise ConfigError("SECRET", "set OPTIONS['SECRET'] or settings.SECRET_KEY (it signs values)")
    secret = check_str(secret, "SECRET")
    namespace = options.get("NAMESPACE")
    if namespace is None:
        # The secret's digest (never the secret) keeps apps that share a Redis apart by default.
        digest = hashlib.sha256(b"kotoba-namespace:" + secret.encode("utf-8")).hexdigest()[:12]
        namespace = f"kotoba:{digest}:{location or 'default'}"
    namespace = check_str(namespace, "NAMESPACE", allow_spaces=False)
    return _NearConfig(
        url=url,
        namespace=namespace,
        secret=secret,
        ignore_exceptions=check_bool(options.get("IGNORE_EXCEPTIONS", True), "IGNORE_EXCEPTIONS"),
        socket_timeout=float(check_positive(options.get("SOCKET_TIMEOUT", 0.1), "SOCKET_TIMEOUT")),
        max_bytes=check_positive_int(options.get("MAX_BYTES", DEFAULT_MAX_BYTES), "MAX_BYTES"),
        policy=check_enum(options.get("POLICY", CachePolicy.ADAPTIVE), "POLICY", CachePolicy,
                          label="cache policy"),
        outage_ttl=float(check_non_negative(options.get("OUTAGE_TTL", 1.0), "OUTAGE_TTL")),
        lock_timeout=float(check_positive(options.get("LOCK_TIMEOUT", 5.0), "LOCK_TIMEOUT")),
        name=check_str(options.get("NAME", f"django-near:{location or 'default'}"), "NAME"),
    )


def _store_for(location: str, options: Mapping[str, Any]) -> NearCache:
    config = _parse(location, options)
    with _stores_lock:
        store = _stores.get(config)
        if store is None:
            store = _stores[config] = NearCache(
                config.url,
                secret=config.secret,
                namespace=config.namespace,
                l1_max_bytes=config.max_bytes,
                policy=config.policy,
                ignore_exceptions=config.ignore_exceptions,
                socket_timeout=config.socket_timeout,
                outage_ttl=config.outage_ttl,
                lock_timeout=config.lock_timeout,
                name=config.name,
            )
        return store


def forget_near_stores() -> None:
    """Close every near-cache store of this process (tests; a process that re-reads its settings)."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


class KotobaNearCache(KotobaCache):
    """What ``KotobaCache`` becomes when its OPTIONS name a ``REDIS_URL`` (one NearCache per config)."""

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        # Django's BaseCache reads TIMEOUT, KEY_PREFIX, VERSION, KEY_FUNCTION (and the culling options,
        # which Redis makes moot); KotobaCache.__init__ would build an in-memory store: skip it.
        super(KotobaCache, self).__init__(params)
        check_str(location, "LOCATION", allow_empty=True)
        self._location = location
        self._near = _store_for(location, params.get("OPTIONS") or {})
        self._cache = self._near
        self._disk = None

    @property
    def store(self) -> KotobaBaseCache:
        """The NearCache holding this LOCATION's pickled entries."""
        return self._near

    def stats(self) -> CacheStats:
        """The near-cache's counters: L1 and Redis hits, refused values, Redis errors, breaker state."""
        return self._near.stats()

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        payload = self._dumps(value)
        if ttl is _EXPIRED:
            return key not in self._near
        return bool(self._near.add(key, payload, ttl))

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        payload = self._near.get(key, _MISSING)
        return default if payload is _MISSING else pickle.loads(payload)

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        payload = self._dumps(value)
        if ttl is _EXPIRED:
            self._near.delete(key)
        else:
            self._near.put(key, payload, ttl)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is _EXPIRED:
            return bool(self._near.delete(key))
        return bool(self._near.touch(key, ttl))

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        result: list[Any] = []

        def change(payload: bytes) -> bytes:
            result[:] = [pickle.loads(payload) + delta]
            return self._dumps(result[0])

        try:
            self._near.update(key, change)
        except KeyError:
            raise ValueError(f"Key '{key}' not found") from None
        except CacheUnavailableError:
            if not self._near.ignore_exceptions:
                raise
            return self._incr_locally(key, delta)
        return result[0]

    def _incr_locally(self, key: str, delta: int) -> Any:
        """Redis unavailable: count on this process's copy (not atomic across processes meanwhile)."""
        payload = self._near.get(key, _MISSING)
        if payload is _MISSING:
            raise ValueError(f"Key '{key}' not found")
        new_value = pickle.loads(payload) + delta
        self._near.put(key, self._dumps(new_value))
        return new_value

    def has_key(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return key in self._near

    def delete(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return bool(self._near.delete(key))

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        made = {self.make_and_validate_key(key, version=version): key for key in keys}
        found = self._near.get_many(made)
        return {made[key]: pickle.loads(found[key]) for key in made if key in found}

    def set_many(
        self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        ttl = self._ttl(timeout)
        prepared = {self.make_and_validate_key(k, version=version): self._dumps(v) for k, v in data.items()}
        if ttl is _EXPIRED:
            for key in prepared:
                self._near.delete(key)
        else:
            self._near.put_many(prepared, ttl)
        return []

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        for key in [self.make_and_validate_key(key, version=version) for key in keys]:
            self._near.delete(key)

    def clear(self) -> None:
        self._near.clear()

    # -- async: an L1 hit answers inline; anything that may call Redis runs in a worker thread --------

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(func, *args)

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        payload = await self._near.aget(key, _MISSING)
        return default if payload is _MISSING else pickle.loads(payload)

    def __repr__(self) -> str:
        return f"<KotobaCache LOCATION={self._location!r} near-cache={self._near.namespace!r}>"
