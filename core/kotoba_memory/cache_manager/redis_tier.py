"""A cache tier in Redis (redis-py) that every process of a deployment shares.

Keys live under one ``prefix`` so :meth:`RedisCache.clear` removes only ours (SCAN + UNLINK, never
FLUSHDB). Values are serialized with ``serializer`` (pickle by default); plain ints are stored as decimal
text, as Django's Redis backend does, so :meth:`RedisCache.incr` works on them from any process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import pickle
import threading
import time
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kotoba_memory.cache_manager.base import BaseCache
from kotoba_memory.cache_manager.latency import LatencyWindow
from kotoba_memory.cache_manager.types import CachedValue, CacheStats, UnhashableKeyError, check_ttl
from kotoba_memory.validation import check_non_negative, check_positive_int, check_str

__all__ = ["Occupancy", "PrefixOccupancy", "RedisCache", "RedisCacheStats", "Serializer"]

log = logging.getLogger(__name__)

_CHUNK = 500  # keys per MGET / UNLINK / pipeline round trip
#: Appended to the prefix for our own bookkeeping keys. 0xFF never occurs in UTF-8 and pickled keys
#: start with NUL + 0x80, so no user key can take this name.
_META = b"\x00\xff"


class Serializer(Protocol):
    """What ``serializer=`` needs: the ``pickle``/``json`` module shape."""

    def dumps(self, obj: Any, /) -> bytes | str: ...

    def loads(self, data: bytes, /) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class RedisCacheStats(CacheStats):
    """:class:`CacheStats` for a Redis tier: counters are this process's; entries/bytes the prefix's.

    ``bytes`` is the summed length of the serialized values under the prefix (Redis adds its own
    per-key overhead); ``corrupt`` counts values that could not be deserialized and were dropped.
    """

    corrupt: int = 0
    prefix: str = ""
    #: False when ``entries``/``bytes`` are lower bounds: the scan stopped at ``scan_max_keys``.
    occupancy_complete: bool = True
    #: Seconds since the occupancy was scanned (by this process or another one sharing the prefix).
    occupancy_age_s: float = 0.0
    #: Why the last rescan failed (the figures are then the last good ones), else None.
    occupancy_error: str | None = None


def _milliseconds(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


def redis_key(prefix: bytes, key: Hashable) -> bytes:
    """``prefix`` + text for str keys, ``prefix`` + NUL + pickle otherwise (so 42 and "42" differ)."""
    if type(key) is str:
        return prefix + key.encode("utf-8", "surrogatepass")
    try:
        hash(key)
    except TypeError:
        raise UnhashableKeyError(key) from None
    try:
        return prefix + b"\x00" + pickle.dumps(key, protocol=4)
    except Exception as exc:
        raise TypeError(f"Redis cache keys must be str or picklable, got {type(key).__name__}") from exc


def _escape_glob(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def scan_prefix(client: Any, prefix: str) -> Iterator[bytes]:
    """Every key under ``prefix`` (SCAN with an escaped MATCH pattern), our bookkeeping keys included."""
    pattern = _escape_glob(prefix).encode("utf-8") + b"*"
    yield from client.scan_iter(match=pattern, count=_CHUNK)


def user_keys(client: Any, prefix: str) -> Iterator[bytes]:
    """Every key under ``prefix`` but our own bookkeeping keys."""
    meta = prefix.encode("utf-8") + _META
    return (key for key in scan_prefix(client, prefix) if not key.startswith(meta))


def unlink_prefix(client: Any, prefix: str) -> None:
    """UNLINK every key under ``prefix``, a chunk per round trip (never FLUSHDB)."""
    batch: list[bytes] = []
    for key in scan_prefix(client, prefix):
        batch.append(key)
        if len(batch) >= _CHUNK:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


def prefix_occupancy(client: Any, prefix: str, max_keys: int | None = None) -> tuple[int, int, bool]:
    """(keys, summed value bytes, complete) under ``prefix``: one SCAN plus pipelined STRLENs.

    The scan stops after ``max_keys`` keys; ``complete`` is then False and the figures are lower bounds.
    """
    entries = stored = 0
    keys: list[bytes] = []
    for key in user_keys(client, prefix):
        if max_keys is not None and entries + len(keys) >= max_keys:
            return entries + len(keys), stored + (_value_bytes(client, keys) if keys else 0), False
        keys.append(key)
        if len(keys) >= _CHUNK:
            entries, stored = entries + len(keys), stored + _value_bytes(client, keys)
            keys = []
    if keys:
        entries, stored = entries + len(keys), stored + _value_bytes(client, keys)
    return entries, stored, True


def _value_bytes(client: Any, keys: list[bytes]) -> int:
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.strlen(key)
        return sum(int(n) for n in pipe.execute())


@dataclass(frozen=True)
class Occupancy:
    """What a prefix held at its last scan: ``complete`` False when the scan stopped at its key limit."""

    entries: int
    bytes: int
    complete: bool
    age_s: float
    error: str | None = None


class PrefixOccupancy:
    """The key count and value bytes under one Redis prefix, scanned at most once per ``interval``.

    Every process sharing the prefix shares the last scan through one bookkeeping key that expires
    after ``interval``, and a short lock lets only one of them rescan: a fleet of N workers sweeps the
    keyspace once per interval, not N times. A scan stops after ``max_keys`` keys. A failed rescan
    keeps the last good figures, with the error, and is not retried before ``interval`` has passed.
    """

    def __init__(
        self, client: Any, prefix: str, *, interval: float, max_keys: int, redis_error: type[Exception]
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.interval = interval
        self.max_keys = max_keys
        self._redis_error = redis_error
        self._key = prefix.encode("utf-8") + _META + b"occupancy"
        self._lock_key = prefix.encode("utf-8") + _META + b"occupancy-lock"
        self._lock = threading.Lock()
        # (monotonic time to rescan after, figures, unix time of the scan)
        self._last: tuple[float, Occupancy, float] | None = None

    def forget(self) -> None:
        """Drop the figures (after the prefix was cleared: the shared key went with it)."""
        with self._lock:
            self._last = None

    def read(self, refresh: bool = False, *, raise_errors: bool = False) -> Occupancy:
        """The occupancy, rescanned when older than ``interval`` or when ``refresh``.

        With ``refresh`` or ``raise_errors`` a Redis error propagates; else it is noted in ``error``.
        """
        with self._lock:
            now = time.monotonic()
            last = self._last
            if not refresh and last is not None and now < last[0]:
                return self._aged(last)
            try:
                if not refresh and (shared := self._shared()) is not None:
                    self._last = (now + self.interval, shared[0], shared[1])
                    return self._aged(self._last)
                if not refresh and last is not None and not self._may_scan():
                    return self._aged(last)  # another process is scanning: its figures come next time
                entries, stored, complete = prefix_occupancy(self.client, self.prefix, self.max_keys)
            except self._redis_error as exc:
                if refresh or raise_errors:
                    raise
                kept = last[1] if last is not None else Occupancy(0, 0, False, 0.0)
                error = f"{type(exc).__name__}: {exc}"
                failed = Occupancy(kept.entries, kept.bytes, kept.complete, 0.0, error)
                self._last = (now + self.interval, failed, last[2] if last is not None else time.time())
                return self._aged(self._last)
            scanned_at = time.time()
            self._last = (now + self.interval, Occupancy(entries, stored, complete, 0.0), scanned_at)
            self._publish(entries, stored, complete, scanned_at)
            return self._last[1]

    @staticmethod
    def _aged(last: tuple[float, Occupancy, float]) -> Occupancy:
        occ = last[1]
        return Occupancy(occ.entries, occ.bytes, occ.complete, max(0.0, time.time() - last[2]), occ.error)

    def _ttl_ms(self) -> int | None:
        return _milliseconds(self.interval) if 0 < self.interval < math.inf else None

    def _shared(self) -> tuple[Occupancy, float] | None:
        if self._ttl_ms() is None:
            return None
        raw = self.client.get(self._key)
        try:
            entries, stored, complete, at = raw.split()
            return Occupancy(int(entries), int(stored), complete == b"1", 0.0), float(at)
        except (AttributeError, ValueError):
            return None  # absent, or not ours to read: rescan and overwrite

    def _may_scan(self) -> bool:
        ttl = self._ttl_ms()
        return ttl is None or bool(self.client.set(self._lock_key, b"1", nx=True, px=ttl))

    def _publish(self, entries: int, stored: int, complete: bool, at: float) -> None:
        ttl = self._ttl_ms()
        if ttl is not None:
            try:
                self.client.set(self._key, b"%d %d %d %.3f" % (entries, stored, complete, at), px=ttl)
            except self._redis_error:
                pass  # the figures are ours already; the others rescan


class RedisCache(BaseCache):
    """A :class:`BaseCache` over a Redis server, shared by every process that uses the same prefix.

    ``url_or_client`` is a ``redis://`` URL or a ``redis.Redis`` client (created with the default
    ``decode_responses=False``). ``len()``, ``clear()`` and ``stats()`` walk the keys under ``prefix``
    with SCAN, so they cost time proportional to that key count (``stats()`` at most once per
    ``scan_interval`` seconds).
    """

    shared_storage = True

    def __init__(
        self,
        url_or_client: Any,
        *,
        prefix: str = "kotoba:",
        default_ttl: float | None = None,
        serializer: Serializer = pickle,
        name: str | None = None,
        scan_interval: float = 10.0,
        scan_max_keys: int = 100_000,
    ) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - the redis extra is part of the dev install
            raise ImportError("RedisCache needs redis-py: pip install 'kotoba-memory[redis]'") from exc
        check_str(prefix, "prefix", allow_empty=True)
        if not hasattr(serializer, "dumps") or not hasattr(serializer, "loads"):
            raise TypeError("serializer must have dumps() and loads(), like the pickle module")
        if isinstance(url_or_client, str):
            client = redis.Redis.from_url(url_or_client)
        elif isinstance(url_or_client, redis.Redis):
            client = url_or_client
        else:
            raise TypeError(
                f"url_or_client must be a redis:// URL or a redis.Redis, got {type(url_or_client).__name__}"
            )
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisCache needs a client with decode_responses=False (values are bytes)")
        self.client = client
        self.prefix = prefix
        self._prefix_bytes = prefix.encode("utf-8")
        self.default_ttl = check_ttl(default_ttl, "default_ttl")
        self.serializer = serializer
        self._redis_error: type[Exception] = redis.RedisError
        # inf: stats() never rescans by itself (stats(refresh=True) still does); nan is rejected.
        self.scan_interval = float(check_non_negative(scan_interval, "scan_interval", allow_inf=True))
        self._occupancy = PrefixOccupancy(
            client, prefix, interval=self.scan_interval, redis_error=redis.RedisError,
            max_keys=check_positive_int(scan_max_keys, "scan_max_keys"),
        )
        self._lock = threading.Lock()
        self._hits = self._misses = self._puts = self._deletes = self._corrupt = 0
        self._hit_ns, self._miss_ns = LatencyWindow(), LatencyWindow()
        super().__init__(name or f"redis:{prefix}")

    # -- encoding ---------------------------------------------------------------------------------

    def make_key(self, key: Hashable) -> bytes:
        """The Redis key for ``key``: prefix + text for str keys, prefix + NUL + pickle otherwise."""
        return redis_key(self._prefix_bytes, key)

    def _dumps(self, value: Any) -> bytes:
        if type(value) is int:
            return str(value).encode("ascii")
        try:
            data = (
                pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                if self.serializer is pickle
                else self.serializer.dumps(value)
            )
        except Exception as exc:
            raise TypeError(
                f"RedisCache cannot serialize a {type(value).__qualname__}: {exc}"
            ) from exc
        return data.encode("utf-8") if isinstance(data, str) else data

    def _loads(self, data: bytes) -> Any:
        try:
            return int(data)
        except ValueError:
            return self.serializer.loads(data)

    def _resolve_ttl(self, value: Any, ttl: float | None) -> float | None:
        ttl = check_ttl(ttl)
        if ttl is None and isinstance(value, CachedValue):
            ttl = value.ttl
        return self.default_ttl if ttl is None else ttl

    def _decode_hit(self, redis_key: bytes, data: Any, started: int | None) -> tuple[bool, Any]:
        """Count and decode one reply; ``started`` None: part of a batch, not a latency sample."""
        if data is None:
            with self._lock:
                self._misses += 1
                if started is not None:
                    self._miss_ns.add(started)
            return False, None
        try:
            value = self._loads(data)
        except Exception as exc:
            log.warning("%s: dropped a value that does not deserialize: %r", self.name, exc)
            self.client.delete(redis_key)
            with self._lock:
                self._corrupt += 1
                self._misses += 1
                if started is not None:
                    self._miss_ns.add(started)
            return False, None
        with self._lock:
            self._hits += 1
            if started is not None:
                self._hit_ns.add(started)
        return True, value

    # -- BaseCache --------------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value under ``key``, or ``default``."""
        started = time.perf_counter_ns()
        redis_key = self.make_key(key)
        data: Any = self.client.get(redis_key)
        found, value = self._decode_hit(redis_key, data, started)
        return value if found else default

    def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """The hits among ``keys``, fetched with MGET."""
        wanted = list(keys)
        result: dict[Hashable, Any] = {}
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            redis_keys = [self.make_key(k) for k in chunk]
            for key, redis_key, data in zip(chunk, redis_keys, self.client.mget(redis_keys)):
                found, value = self._decode_hit(redis_key, data, None)
                if found:
                    result[key] = value
        return result

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """SET ``key`` (with PX when there is a ttl). Raises TypeError for unserializable values."""
        redis_key = self.make_key(key)
        seconds = self._resolve_ttl(value, ttl)
        data = self._dumps(value)
        self.client.set(redis_key, data, px=None if seconds is None else _milliseconds(seconds))
        with self._lock:
            self._puts += 1
        return True

    def put_many(self, mapping: Mapping[Hashable, Any], ttl: float | None = None) -> None:
        """SET every item in one pipelined round trip per chunk; all are encoded before any is sent."""
        items = [
            (self.make_key(k), self._dumps(v), self._resolve_ttl(v, ttl)) for k, v in mapping.items()
        ]
        for start in range(0, len(items), _CHUNK):
            with self.client.pipeline(transaction=False) as pipe:
                for redis_key, data, seconds in items[start : start + _CHUNK]:
                    pipe.set(redis_key, data, px=None if seconds is None else _milliseconds(seconds))
                pipe.execute()
        with self._lock:
            self._puts += len(items)

    def add(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """SET NX: store only when absent, atomically across every process."""
        redis_key = self.make_key(key)
        seconds = self._resolve_ttl(value, ttl)
        data = self._dumps(value)
        stored = bool(
            self.client.set(redis_key, data, nx=True, px=None if seconds is None else _milliseconds(seconds))
        )
        if stored:
            with self._lock:
                self._puts += 1
        return stored

    def touch(self, key: Hashable, ttl: float | None = None) -> bool:
        """PEXPIRE a live key with a new ttl, or PERSIST it when the ttl resolves to None."""
        redis_key = self.make_key(key)
        seconds = check_ttl(ttl)
        if seconds is None:
            seconds = self.default_ttl
        if seconds is not None:
            return bool(self.client.pexpire(redis_key, _milliseconds(seconds)))
        # PERSIST answers 0 for a key that exists without a ttl: ask EXISTS in the same transaction.
        with self.client.pipeline(transaction=True) as pipe:
            pipe.exists(redis_key)
            pipe.persist(redis_key)
            exists, _ = pipe.execute()
        return bool(exists)

    def incr(self, key: Hashable, delta: int = 1) -> int:
        """Atomically add ``delta`` to an int value (absent counts as 0) and return the new value.

        The key keeps its ttl; a key holding a non-int value raises ValueError.
        """
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta must be an int, got {type(delta).__name__}")
        try:
            return int(self.client.incrby(self.make_key(key), delta))
        except self._redis_error as exc:
            if "not an integer" in str(exc):
                raise ValueError(f"the value under {key!r} is not an int") from exc
            raise

    def ttl_remaining(self, key: Hashable) -> float | None:
        """Seconds until ``key`` expires (PTTL); None when it never expires. KeyError when absent."""
        remaining = int(self.client.pttl(self.make_key(key)))
        if remaining == -2:
            raise KeyError(key)
        return None if remaining == -1 else remaining / 1000

    def ttl(self, key: Hashable) -> float | None:
        """Alias of :meth:`ttl_remaining` (the name this method had before it joined ``BaseCache``)."""
        return self.ttl_remaining(key)

    def delete(self, key: Hashable) -> bool:
        """DEL ``key``; True when it existed."""
        removed = bool(self.client.delete(self.make_key(key)))
        if removed:
            with self._lock:
                self._deletes += 1
        return removed

    def __contains__(self, key: object) -> bool:
        return bool(self.client.exists(self.make_key(key)))

    def __len__(self) -> int:
        return sum(1 for _ in user_keys(self.client, self.prefix))

    def clear(self) -> None:
        """UNLINK every key under the prefix (and nothing else)."""
        unlink_prefix(self.client, self.prefix)
        self._occupancy.forget()

    def stats(self, *, refresh: bool = False) -> RedisCacheStats:
        """This process's counters plus the prefix's key count and value bytes.

        The occupancy comes from one SCAN of the prefix (of at most ``scan_max_keys`` keys), redone at
        most every ``scan_interval`` seconds by one of the processes sharing the prefix (metrics
        exporters call this on every scrape), or when ``refresh`` is true. Without ``refresh`` a Redis
        error leaves the last figures in place and is reported in ``occupancy_error``.
        """
        occ = self._occupancy.read(refresh)
        with self._lock:
            hits, misses = self._hits, self._misses
            lookups = hits + misses
            return RedisCacheStats(
                hits=hits,
                misses=misses,
                hit_rate=hits / lookups if lookups else 0.0,
                evictions=0,
                expirations=0,
                rejections=0,
                puts=self._puts,
                deletes=self._deletes,
                bytes=occ.bytes,
                entries=occ.entries,
                max_bytes=None,
                max_entries=None,
                metadata_bytes=0,
                hit_latency_ns=self._hit_ns.median(),
                miss_latency_ns=self._miss_ns.median(),
                corrupt=self._corrupt,
                prefix=self.prefix,
                name=self.name,
                occupancy_complete=occ.complete,
                occupancy_age_s=occ.age_s,
                occupancy_error=occ.error,
            )

    def close(self) -> None:
        """Release the client's connections."""
        self.client.close()

    # -- async twins beyond BaseCache's (whose twins already run in a worker thread) ----------------

    async def aincr(self, key: Hashable, delta: int = 1) -> int:
        return await asyncio.to_thread(self.incr, key, delta)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        return f"RedisCache(prefix={self.prefix!r}, name={self.name!r})"
