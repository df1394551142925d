"""A near-cache: this process's in-memory cache (L1) in front of a Redis every process shares (L2).

Reads are answered from L1 when they can be; a miss reads Redis and keeps the value in L1. Every write
goes to Redis with an invalidation published on the cache's channel *in the same Lua script*, so the
messages reach every process in the order Redis applied the writes; each process listens on one
connection of its own (a daemon thread) and drops its L1 copy of a key another process changed. Why a
channel and not RESP3 ``CLIENT TRACKING``, the ordering argument and the fault behaviour are in
``docs/near-cache.md``.

Values in Redis are signed (:mod:`kotoba_memory.cache_manager.signing`): a value that fails the check
is refused and counted, never unpickled. Redis being stopped, paused or slow costs a request at most one
short socket timeout: the first failure opens a circuit breaker, L1 and the caller's ``get_or_set``
factory serve meanwhile, and the listener thread closes the breaker once Redis answers again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import pickle
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kotoba_memory.cache_manager.base import BaseCache, _call_async, _call_sync
from kotoba_memory.cache_manager.memory import CacheManager
from kotoba_memory.cache_manager.redis_tier import PrefixOccupancy, redis_key, unlink_prefix, user_keys
from kotoba_memory.cache_manager.signing import Signer
from kotoba_memory.cache_manager.tiers import TieredCache
from kotoba_memory.cache_manager.types import CachedValue, CacheError, CachePolicy, CacheStats, check_ttl
from kotoba_memory.errors import ConfigError
from kotoba_memory.process import forks
from kotoba_memory.validation import check_non_negative, check_positive, check_positive_int, check_str

__all__ = ["CacheUnavailableError", "NearCache", "NearCacheStats"]

log = logging.getLogger(__name__)

_MISSING: Any = object()
_WID = 16  # bytes of a write id: 8 random per process + an 8-byte counter
_LOG_MAX = 8192  # recent invalidations remembered for in-flight fills
_OWN_MAX = 8192  # own writes whose invalidation has not come back yet
_PENDING_MAX = 10_000  # keys whose write could not reach Redis; beyond: clear the namespace on recovery
_CHUNK = 500
_LOCK_POLL = 0.005
# One read in 64 checks the invalidation channel on the caller's thread (a poll() of a few microseconds).
_POLL_MASK = 63

# KEYS[1] the key; ARGV: value, px ("" = none), nx ("1"), channel, message. 1 when written.
_SET = """
local r
if ARGV[2] == '' then
  if ARGV[3] == '1' then r = redis.call('SET', KEYS[1], ARGV[1], 'NX')
  else r = redis.call('SET', KEYS[1], ARGV[1]) end
else
  if ARGV[3] == '1' then r = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
  else r = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
end
if r then redis.call('PUBLISH', ARGV[4], ARGV[5]) return 1 end
return 0
"""
# Always published: another process may hold a copy of a key Redis itself dropped (maxmemory eviction).
_DEL = """
local n = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""
# ARGV: px ("" = persist), channel, message. 1 when the key exists.
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '' then redis.call('PERSIST', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
_GET = "return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}"
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

_live: weakref.WeakSet[NearCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_live):
        cache._reinit_near_after_fork()


forks.register(_after_fork_in_child, name="cache_manager.near")


class CacheUnavailableError(CacheError):
    """Redis could not be reached (or the breaker is open) and the cache was told not to hide it."""


@dataclass(frozen=True, kw_only=True)
class NearCacheStats(CacheStats):
    """:class:`CacheStats` of the whole near-cache plus L1's own stats and the fault counters.

    ``hits`` counts L1 hits and Redis hits; ``entries``/``bytes`` are what Redis holds under the
    namespace (L1's are in ``l1``; while the breaker is open, L1's are reported, as ``len()`` does).
    ``refused`` counts values that failed the signature check; ``redis_errors`` failed Redis calls
    absorbed; ``breaker_open`` whether Redis is being bypassed now; ``coherent`` whether the
    invalidation channel is subscribed (L1 copies are then kept without the outage cap); ``flushes``
    how often L1 was emptied because the channel was lost.
    """

    l1: CacheStats
    l1_hits: int = 0
    redis_hits: int = 0
    redis_errors: int = 0
    refused: int = 0
    breaker_open: bool = False
    breaker_trips: int = 0
    coherent: bool = False
    invalidations: int = 0
    forged_messages: int = 0
    flushes: int = 0
    subscriptions: int = 0
    pending_writes: int = 0
    lock_waits: int = 0
    lock_wins: int = 0
    namespace: str = ""


class NearCache(BaseCache):
    """L1 (a :class:`CacheManager`, ADAPTIVE by default) over Redis, coherent across processes.

    ``l1`` may be a :class:`TieredCache` (memory over a disk file) for an L1 larger than RAM; its disk
    file must be this process's own (build the DiskCache with ``secret=``: its values are signed too).

    ``redis`` is a ``redis://`` URL or a ``redis.Redis`` (``decode_responses=False``; a URL gets short
    timeouts and no retries, a client is used as given). ``secret`` signs every value written to Redis;
    processes sharing a ``namespace`` must share it. ``ignore_exceptions`` (default True): Redis failures
    are counted and absorbed (a read is a miss, a write stays local); False raises
    :class:`CacheUnavailableError`. ``outage_ttl`` caps the life of L1 copies made while the channel is
    not subscribed (0: none are kept); ``lock_timeout`` bounds the cross-process ``get_or_set`` lock.
    The listener PINGs an idle channel every ``health_interval`` seconds and counts it lost (L1 flushed)
    when no answer comes within ``health_timeout``; ``socket_timeout`` bounds every request's call.
    """

    shared_storage = True

    def __init__(
        self,
        redis: Any,
        *,
        secret: str | bytes,
        namespace: str = "kotoba",
        l1: CacheManager | TieredCache | None = None,
        l1_max_bytes: int = 64 * 1024 * 1024,
        policy: CachePolicy | str = CachePolicy.ADAPTIVE,
        default_ttl: float | None = None,
        ignore_exceptions: bool = True,
        socket_timeout: float = 0.1,
        health_interval: float = 0.5,
        health_timeout: float = 1.0,
        retry_interval: float = 0.05,
        outage_ttl: float = 1.0,
        lock_timeout: float = 5.0,
        scan_interval: float = 10.0,
        scan_max_keys: int = 100_000,
        name: str | None = None,
    ) -> None:
        try:
            import redis as redis_py
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # pragma: no cover - the redis extra is part of the dev install
            raise ImportError("NearCache needs redis-py: pip install 'kotoba-memory[redis]'") from exc
        check_str(namespace, "namespace", allow_spaces=False)
        self.socket_timeout = float(check_positive(socket_timeout, "socket_timeout"))
        self.health_interval = float(check_positive(health_interval, "health_interval"))
        self.health_timeout = float(check_positive(health_timeout, "health_timeout"))
        self.retry_interval = float(check_positive(retry_interval, "retry_interval"))
        self.outage_ttl = float(check_non_negative(outage_ttl, "outage_ttl"))
        self.lock_timeout = float(check_positive(lock_timeout, "lock_timeout"))
        self.scan_interval = float(check_non_negative(scan_interval, "scan_interval", allow_inf=True))
        self.scan_max_keys = check_positive_int(scan_max_keys, "scan_max_keys")
        self.default_ttl = check_ttl(default_ttl, "default_ttl")
        self.ignore_exceptions = bool(ignore_exceptions)
        if isinstance(redis, str):
            client = redis_py.Redis.from_url(
                redis,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
        elif isinstance(redis, redis_py.Redis):
            client = redis
        else:
            raise TypeError(f"redis must be a redis:// URL or a redis.Redis, got {type(redis).__name__}")
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigError("redis", "needs a client with decode_responses=False (values are bytes)")
        if l1 is None:
            l1 = CacheManager(check_positive_int(l1_max_bytes, "l1_max_bytes"), policy,
                              name=f"{name or 'near:' + namespace}:l1")
        elif not isinstance(l1, CacheManager | TieredCache):
            raise TypeError(f"l1 must be a CacheManager or a TieredCache, got {type(l1).__name__}")
        self.client = client
        self.l1 = l1
        self.namespace = namespace
        self._signer = Signer(secret, "near-cache")
        self._prefix_str = f"{namespace}:"
        self._prefix = self._prefix_str.encode("utf-8")
        self._lock_prefix = f"{namespace}\x01lock:".encode()
        db = client.connection_pool.connection_kwargs.get("db", 0)
        # pub/sub channels ignore the database number: put it in the name
        self.channel = f"kotoba-near:{db}:{namespace}".encode()
        self._connection_errors: tuple[type[BaseException], ...] = (
            redis_py.ConnectionError,
            redis_py.TimeoutError,
            OSError,
        )
        self._redis_error: type[Exception] = redis_py.RedisError
        self._watch_error: type[Exception] = redis_py.WatchError
        self._set = client.register_script(_SET)
        self._del = client.register_script(_DEL)
        self._touch = client.register_script(_TOUCH)
        self._get = client.register_script(_GET)
        self._unlock = client.register_script(_UNLOCK)
        self._l1_get = l1.get
        self._init_state()
        super().__init__(name or f"near:{namespace}")
        _live.add(self)

    def _init_state(self) -> None:
        """Per-process state: locks, counters, the listener (none yet), coherence bookkeeping."""
        self._pid = os.getpid()
        # write ids: a forked child must not mint its parent's (the parent would keep its copy on
        # the child's invalidation, taking it for its own write)
        self._wid_prefix = os.urandom(8)
        self._wids = itertools.count(1)
        self._state_lock = threading.Lock()  # coherence: the log, the own-write table, L1 fills and drops
        self._counter_lock = threading.Lock()
        self._seq = 0
        self._floor = 0
        self._log: OrderedDict[Hashable, tuple[int, bytes]] = OrderedDict()
        self._own: OrderedDict[Hashable, bytes] = OrderedDict()
        self._coherent = False
        self._open_since: float | None = None
        self._pending: OrderedDict[bytes, None] = OrderedDict()
        self._pending_all = False
        self._thread: threading.Thread | None = None
        self._read_lock = threading.Lock()  # one reader of the channel at a time (listener or caller)
        self._conn: Any = None
        self._last_seen = 0.0
        self._ping_sent: float | None = None
        self._pong = False
        self._polls = itertools.count(1)
        self._stop = threading.Event()
        self._closed = getattr(self, "_closed", False)
        self._redis_hits = self._puts = self._deletes = 0
        self._errors = self._refused = self._trips = self._messages = self._forged = 0
        self._flushes = self._subscriptions = self._lock_waits = self._lock_wins = 0
        self._occupancy_reader = PrefixOccupancy(
            self.client, self._prefix_str, interval=self.scan_interval, max_keys=self.scan_max_keys,
            redis_error=self._redis_error,
        )

    def _reinit_near_after_fork(self) -> None:
        # The parent's listener does not exist here and its invalidations stop reaching this process:
        # forget L1 (it may miss them from now on) and start a listener of our own at the next call.
        self._init_state()
        self.l1.clear()

    # -- keys, values, messages ---------------------------------------------------------------------

    def _keys(self, key: Hashable) -> tuple[Hashable, bytes]:
        """(L1 key, Redis key): str keys stay themselves in L1; others are keyed by their Redis key."""
        rkey = redis_key(self._prefix, key)
        return (key if type(key) is str else rkey), rkey

    def _l1_key_of(self, rkey: bytes) -> Hashable | None:
        if not rkey.startswith(self._prefix):
            return None
        rest = rkey[len(self._prefix) :]
        if rest[:1] == b"\x00":
            return rkey
        try:
            return rest.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None

    def _new_wid(self) -> bytes:
        return self._wid_prefix + next(self._wids).to_bytes(8, "big")

    def _encode(self, rkey: bytes, value: Any, wid: bytes) -> bytes:
        try:
            payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"NearCache cannot serialize a {type(value).__qualname__}: {exc}") from exc
        return self._signer.sign(rkey, wid + payload)

    def _decode(self, rkey: bytes, data: bytes) -> tuple[bool, Any, bytes]:
        """(ok, value, write id); a value whose signature fails is refused, never unpickled."""
        body = self._signer.verify(rkey, data)
        if body is not None and len(body) >= _WID:
            try:
                return True, pickle.loads(body[_WID:]), body[:_WID]
            except Exception as exc:  # signed by us, but its class moved or went away since
                reason = f"a signed value that no longer loads ({exc!r})"
        else:
            reason = "a value not signed with our secret"
        with self._counter_lock:
            self._refused += 1
            refused = self._refused
        if refused == 1 or refused % 1000 == 0:  # said once, then every 1000th: an attack must not flood logs
            log.warning("%s: refused %s (%d refused so far)", self.name, reason, refused)
        return False, None, b""

    def _message(self, rkey: bytes | None, wid: bytes) -> bytes:
        body = b"F" + wid if rkey is None else b"K" + wid + rkey
        return self._signer.sign(self.channel, body)

    def _resolve_ttl(self, value: Any, ttl: float | None) -> float | None:
        seconds = check_ttl(ttl)
        if seconds is None and isinstance(value, CachedValue):
            seconds = value.ttl
        return self.default_ttl if seconds is None else seconds

    @staticmethod
    def _px(seconds: float | None) -> str:
        return "" if seconds is None else str(max(1, math.ceil(seconds * 1000)))

    # -- coherence ------------------------------------------------------------------------------------

    def _fill(self, l1key: Hashable, value: Any, wid: bytes, ttl: float | None, since: int) -> None:
        """Keep a copy read (or written) since ``since`` unless an invalidation overtook it."""
        with self._state_lock:
            if self._floor > since:
                return
            record = self._log.get(l1key)
            if record is not None and record[0] > since and record[1] != wid:
                return
            if not self._coherent:
                if self.outage_ttl <= 0:
                    return
                ttl = self.outage_ttl if ttl is None else min(ttl, self.outage_ttl)
            self.l1.put(l1key, (value, wid), ttl)
            if self._own.get(l1key, wid) != wid:
                # L1 now holds another write than our pending one: when that one's message comes back,
                # it must drop this copy, not keep it as "ours"
                del self._own[l1key]

    def _note_own(self, l1key: Hashable, wid: bytes) -> None:
        with self._state_lock:
            self._own[l1key] = wid
            self._own.move_to_end(l1key)
            if len(self._own) > _OWN_MAX:
                self._own.popitem(last=False)

    def _drop_local(self, l1key: Hashable) -> None:
        """Drop our copy and make any fill in flight for it fail (a write of ours is under way)."""
        with self._state_lock:
            self._seq += 1
            self._record(l1key, self._seq, b"")
            self.l1.delete(l1key)

    def _record(self, l1key: Hashable, seq: int, wid: bytes) -> None:
        self._log[l1key] = (seq, wid)
        self._log.move_to_end(l1key)
        if len(self._log) > _LOG_MAX:
            _, (oldest, _) = self._log.popitem(last=False)
            self._floor = max(self._floor, oldest)

    def _on_message(self, data: bytes) -> None:
        body = self._signer.verify(self.channel, data)
        if body is None or len(body) < 1 + _WID:
            with self._counter_lock:
                self._forged += 1
            return
        kind, wid, rkey = body[:1], body[1 : 1 + _WID], body[1 + _WID :]
        with self._state_lock:
            self._messages += 1
            if kind == b"F":
                self._flush_locked()
                return
            l1key = self._l1_key_of(rkey)
            if l1key is None:
                return
            self._seq += 1
            self._record(l1key, self._seq, wid)
            if self._own.get(l1key) == wid:
                del self._own[l1key]  # our own write coming back: our copy is that write
                return
            self.l1.delete(l1key)

    def _flush_locked(self) -> None:
        self.l1.clear()
        self._seq += 1
        self._floor = self._seq
        self._log.clear()
        self._own.clear()

    def _set_coherent(self, coherent: bool) -> None:
        """Subscribed or lost: either way L1 is emptied (its copies were kept under the other rule)."""
        with self._state_lock:
            self._flush_locked()
            if not coherent and self._coherent:
                self._flushes += 1
            self._coherent = coherent

    # -- the circuit breaker ----------------------------------------------------------------------------

    @property
    def breaker_open(self) -> bool:
        """True while Redis is bypassed after a failure (until the listener sees it answer)."""
        return self._open_since is not None

    def _failed(self, exc: BaseException, *, quiet: bool = False) -> None:
        """Count a failed Redis call; connection faults and timeouts open the breaker. Raises
        :class:`CacheUnavailableError` unless ``ignore_exceptions`` (or ``quiet``: the caller raises)."""
        with self._counter_lock:
            self._errors += 1
            trip = isinstance(exc, self._connection_errors) and self._open_since is None
            if trip:
                self._open_since = time.monotonic()
                self._trips += 1
        if trip:
            log.warning("%s: Redis failed (%s); serving from L1 and the caller until it answers",
                        self.name, exc)
        if not self.ignore_exceptions and not quiet:
            raise CacheUnavailableError(f"{self.name}: Redis failed: {exc}") from exc

    def _closed_breaker(self) -> None:
        with self._counter_lock:
            was_open, self._open_since = self._open_since is not None, None
        if was_open:
            log.warning("%s: Redis answers again", self.name)

    def _usable(self) -> bool:
        """Whether to call Redis now; starts this process's listener on first use (and after fork)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._pid != os.getpid():
            self._ensure_listener()
        if self._open_since is None:
            return True
        if not self.ignore_exceptions:
            raise CacheUnavailableError(f"{self.name}: Redis is unavailable (breaker open)")
        return False

    def _remember_pending(self, rkey: bytes) -> None:
        """A write that may not have reached Redis: delete the key there as soon as it answers."""
        with self._counter_lock:
            if self._pending_all:
                return
            self._pending[rkey] = None
            if len(self._pending) > _PENDING_MAX:
                self._pending_all = True
                self._pending.clear()

    def _redeliver(self) -> bool:
        """Apply the writes Redis missed (as deletes); True when none is left."""
        with self._counter_lock:
            everything, keys = self._pending_all, list(self._pending)
        try:
            if everything:
                self._clear_redis()
                with self._counter_lock:
                    self._pending_all = False
            for rkey in keys:
                self._del(keys=[rkey], args=[self.channel, self._message(rkey, self._new_wid())])
                with self._counter_lock:
                    self._pending.pop(rkey, None)
        except self._redis_error as exc:
            log.debug("%s: redelivery failed: %s", self.name, exc)
            return False
        return True

    # -- the listener thread ---------------------------------------------------------------------------

    def _ensure_listener(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            thread = threading.Thread(target=self._listen, name=f"kotoba-near:{self.namespace}", daemon=True)
            self._thread = thread
        thread.start()

    def _listen(self) -> None:
        """Subscribe, apply invalidations, check Redis' health; on any loss flush L1 and start over."""
        backoff = self.retry_interval
        stop = self._stop
        while not stop.is_set() and not self._closed:
            conn = None
            subscribed = False
            try:
                pool = self.client.connection_pool
                kwargs = dict(pool.connection_kwargs)
                kwargs.update(socket_timeout=self.socket_timeout, socket_connect_timeout=self.socket_timeout)
                kwargs.pop("retry", None)
                conn = pool.connection_class(**kwargs)
                conn.connect()
                conn.send_command("SUBSCRIBE", self.channel)
                reply = conn.read_response(push_request=True)
                if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                    raise ConnectionError(f"unexpected reply to SUBSCRIBE: {reply!r}")
                self._set_coherent(True)
                subscribed = True
                with self._counter_lock:
                    self._subscriptions += 1
                backoff = self.retry_interval
                if self._redeliver():
                    self._closed_breaker()
                self._serve(conn, stop)
            except Exception as exc:  # never let the thread die: any failure is a lost channel
                if not subscribed and isinstance(exc, self._connection_errors) and self._open_since is None:
                    # the channel cannot even be opened: Redis is down, stop sending requests there
                    with self._counter_lock:
                        if self._open_since is None:
                            self._open_since = time.monotonic()
                            self._trips += 1
                log.debug("%s: invalidation channel lost: %r", self.name, exc)
            finally:
                if self._coherent:
                    self._set_coherent(False)
                if conn is not None:
                    try:
                        conn.disconnect()
                    except Exception:
                        pass
            stop.wait(backoff)
            backoff = min(backoff * 2, 0.25)

    def _serve(self, conn: Any, stop: threading.Event) -> None:
        self._last_seen = time.monotonic()
        self._ping_sent = None
        self._pong = False
        self._conn = conn
        try:
            while not stop.is_set() and not self._closed:
                busy = self._open_since is not None or self._pending or self._pending_all
                if self._pong:
                    self._pong = False
                    if busy and self._redeliver():
                        self._closed_breaker()
                now = time.monotonic()
                if self._ping_sent is not None:
                    wait = self._ping_sent + self.health_timeout - now
                    if wait <= 0:
                        raise TimeoutError("Redis did not answer PING on the invalidation channel")
                else:
                    wait = self._last_seen + (self.retry_interval if busy else self.health_interval) - now
                    if wait <= 0:
                        with self._read_lock:
                            conn.send_command("PING")
                            self._ping_sent = now
                        continue
                if conn.can_read(timeout=min(wait, 0.25)):
                    with self._read_lock:
                        self._drain(conn)
        finally:
            with self._read_lock:  # no caller may use the connection once it is being torn down
                self._conn = None

    def _drain(self, conn: Any) -> None:
        """Apply every message already received (caller holds ``_read_lock``)."""
        while conn.can_read(timeout=0):
            reply = conn.read_response(push_request=True)
            self._last_seen = time.monotonic()
            # a PING on a subscribed connection answers [b"pong", b""] (redis-py may hand over b"PONG")
            kind = reply[0] if isinstance(reply, list) and reply else reply
            if kind == b"message" and len(reply) == 3:
                self._on_message(reply[2])
            elif kind in (b"pong", b"PONG"):
                self._ping_sent = None
                self._pong = True

    def _poll_channel(self) -> None:
        """Apply waiting invalidations on the caller's thread: a thread that keeps the GIL busy with L1
        hits would otherwise hold the listener back for a whole switch interval (5 ms by default)."""
        conn = self._conn
        if conn is None or not self._read_lock.acquire(blocking=False):
            return
        try:
            if self._conn is not conn:  # torn down meanwhile: redis-py would reconnect it on can_read()
                return
            self._drain(conn)
        except Exception:  # the listener finds the broken connection and starts over (L1 flushed)
            try:
                conn.disconnect()
            except Exception:
                pass
        finally:
            self._read_lock.release()

    def close(self) -> None:
        """Stop the listener and release the client's connections (the cache is unusable afterwards)."""
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
        self.l1.clear()
        self.client.close()

    def wait_coherent(self, timeout: float = 5.0) -> bool:
        """Start the listener if needed and wait until it is subscribed; True if it is."""
        self._ensure_listener()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._coherent:
                return True
            time.sleep(0.002)
        return self._coherent

    # -- reads ------------------------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value from L1, else from Redis (then kept in L1), else ``default``."""
        l1key = key if type(key) is str else redis_key(self._prefix, key)
        if not next(self._polls) & _POLL_MASK:
            self._poll_channel()
        entry = self._l1_get(l1key, _MISSING)
        if entry is not _MISSING:
            return entry[0]
        return self._slow_get(key, default)

    def _slow_get(self, key: Hashable, default: Any) -> Any:
        value = self._fetch(key)
        if value is _MISSING:
            return default
        with self._counter_lock:
            self._redis_hits += 1
        return value

    def _fetch(self, key: Hashable) -> Any:
        """Read ``key`` from Redis and keep it in L1 (not counted as a lookup); ``_MISSING`` if absent."""
        l1key, rkey = self._keys(key)
        if not self._usable():
            return _MISSING
        since = self._seq
        try:
            data, pttl = self._get(keys=[rkey])
        except self._redis_error as exc:
            self._failed(exc)
            return _MISSING
        if data is None:
            return _MISSING
        ok, value, wid = self._decode(rkey, data)
        if not ok:
            return _MISSING
        self._fill(l1key, value, wid, pttl / 1000 if pttl > 0 else None, since)
        return value

    def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """The hits among ``keys``: L1 first, the rest in one pipelined round trip per chunk."""
        found: dict[Hashable, Any] = {}
        missing: list[tuple[Hashable, Hashable, bytes]] = []
        for key in keys:
            l1key, rkey = self._keys(key)
            entry = self._l1_get(l1key, _MISSING)
            if entry is _MISSING:
                missing.append((key, l1key, rkey))
            else:
                found[key] = entry[0]
        if not missing or not self._usable():
            return found
        for start in range(0, len(missing), _CHUNK):
            chunk = missing[start : start + _CHUNK]
            since = self._seq
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    for _, _, rkey in chunk:
                        pipe.get(rkey)
                        pipe.pttl(rkey)
                    replies = pipe.execute()
            except self._redis_error as exc:
                self._failed(exc)
                return found
            for i, (key, l1key, rkey) in enumerate(chunk):
                data, pttl = replies[2 * i], replies[2 * i + 1]
                if data is None:
                    continue
                ok, value, wid = self._decode(rkey, data)
                if not ok:
                    continue
                with self._counter_lock:
                    self._redis_hits += 1
                found[key] = value
                self._fill(l1key, value, wid, pttl / 1000 if pttl > 0 else None, since)
        return found

    def fresh_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """The values Redis holds for ``keys`` now, bypassing L1 (nothing kept, nothing counted).

        For values that must never lag a write by even the invalidation delay (the QueryCache's version
        tokens). Raises :class:`CacheUnavailableError` when Redis cannot answer, whatever
        ``ignore_exceptions`` says: the caller has no safe default.
        """
        wanted = [(key, self._keys(key)[1]) for key in keys]
        if self._open_since is not None or not self._usable():
            raise CacheUnavailableError(f"{self.name}: Redis is unavailable")
        found: dict[Hashable, Any] = {}
        try:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                replies: list[Any] = self.client.mget([rkey for _, rkey in chunk])
                for (key, rkey), data in zip(chunk, replies):
                    if data is not None:
                        ok, value, _ = self._decode(rkey, data)
                        if ok:
                            found[key] = value
        except self._redis_error as exc:
            self._failed(exc, quiet=True)
            raise CacheUnavailableError(f"{self.name}: Redis failed: {exc}") from exc
        return found

    def __contains__(self, key: object) -> bool:
        l1key, rkey = self._keys(key)
        if l1key in self.l1:
            return True
        if not self._usable():
            return False
        try:
            return bool(self.client.exists(rkey))
        except self._redis_error as exc:
            self._failed(exc)
            return False

    def ttl_remaining(self, key: Hashable) -> float | None:
        """Seconds until ``key`` expires in Redis (L1's copy while Redis is down); KeyError if absent."""
        l1key, rkey = self._keys(key)
        if self._usable():
            try:
                remaining = int(self.client.pttl(rkey))
            except self._redis_error as exc:
                self._failed(exc)
            else:
                if remaining == -2:
                    raise KeyError(key)
                return None if remaining == -1 else remaining / 1000
        return self.l1.ttl_remaining(l1key)

    def __len__(self) -> int:
        if not self._usable():
            return len(self.l1)
        try:
            return sum(1 for _ in user_keys(self.client, self._prefix_str))
        except self._redis_error as exc:
            self._failed(exc)
            return len(self.l1)

    # -- writes -----------------------------------------------------------------------------------------

    def _write(
        self, key: Hashable, value: Any, ttl: float | None, *, only_if_absent: bool, fill: bool = False
    ) -> bool:
        """SET (NX) + invalidation; ``fill``: a value just read from the application's source by
        ``get_or_set``, which needs no replay when Redis cannot take it (Redis' copy is not older)."""
        l1key, rkey = self._keys(key)
        seconds = self._resolve_ttl(value, ttl)
        wid = self._new_wid()
        data = self._encode(rkey, value, wid)  # raises TypeError before anything changes
        if not self._usable():
            return self._write_locally(l1key, rkey, value, seconds, only_if_absent, replay=not fill)
        self._drop_local(l1key)
        since = self._seq
        self._note_own(l1key, wid)
        try:
            stored = self._set(
                keys=[rkey],
                args=[data, self._px(seconds), "1" if only_if_absent else "0", self.channel,
                      self._message(rkey, wid)],
            )
        except self._redis_error as exc:
            if not fill:
                self._remember_pending(rkey)
            self._failed(exc)
            return self._write_locally(l1key, rkey, value, seconds, only_if_absent, replay=not fill)
        if not stored:
            with self._state_lock:
                if self._own.get(l1key) == wid:  # no invalidation will come back for a write not made
                    del self._own[l1key]
            return False
        with self._counter_lock:
            self._puts += 1
        self._fill(l1key, value, wid, seconds, since)
        return True

    def _write_locally(
        self,
        l1key: Hashable,
        rkey: bytes,
        value: Any,
        seconds: float | None,
        only_if_absent: bool,
        *,
        replay: bool = True,
    ) -> bool:
        """Redis unavailable: keep the value in L1 under the outage rules (and, for a write of the
        application's, delete Redis' older copy once it answers)."""
        if replay:
            self._remember_pending(rkey)
        with self._state_lock:
            if only_if_absent and l1key in self.l1:
                return False
            self._seq += 1
            self._record(l1key, self._seq, b"")
            self.l1.delete(l1key)
        with self._counter_lock:
            self._puts += 1
        self._fill(l1key, value, b"", seconds, self._seq)
        return True

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` in Redis (and L1); every other process drops its copy. TypeError if unpicklable."""
        return self._write(key, value, ttl, only_if_absent=False)

    def add(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """SET NX across every process; while Redis is unavailable, only within this one."""
        return self._write(key, value, ttl, only_if_absent=True)

    def put_many(self, mapping: Mapping[Hashable, Any], ttl: float | None = None) -> None:
        """Store every item; all are encoded before the first is written."""
        items = []
        for key, value in mapping.items():
            l1key, rkey = self._keys(key)
            seconds = self._resolve_ttl(value, ttl)
            wid = self._new_wid()
            items.append((l1key, rkey, value, seconds, wid, self._encode(rkey, value, wid)))
        if not items:
            return
        if not self._usable():
            for l1key, rkey, value, seconds, _, _ in items:
                self._write_locally(l1key, rkey, value, seconds, False)
            return
        for l1key, _, _, _, wid, _ in items:
            self._drop_local(l1key)
            self._note_own(l1key, wid)
        since = self._seq
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for _, rkey, _, seconds, wid, data in items:
                    self._set(
                        keys=[rkey],
                        args=[data, self._px(seconds), "0", self.channel, self._message(rkey, wid)],
                        client=pipe,
                    )
                pipe.execute()
        except self._redis_error as exc:
            self._failed(exc)
            for l1key, rkey, value, seconds, _, _ in items:
                self._write_locally(l1key, rkey, value, seconds, False)
            return
        with self._counter_lock:
            self._puts += len(items)
        for l1key, _, value, seconds, wid, _ in items:
            self._fill(l1key, value, wid, seconds, since)

    def delete(self, key: Hashable) -> bool:
        """Delete ``key`` in Redis and in every process's L1; True when it existed."""
        l1key, rkey = self._keys(key)
        local = l1key in self.l1
        self._drop_local(l1key)
        if not self._usable():
            self._remember_pending(rkey)
            return local
        try:
            removed = bool(self._del(keys=[rkey], args=[self.channel, self._message(rkey, self._new_wid())]))
        except self._redis_error as exc:
            self._remember_pending(rkey)
            self._failed(exc)
            return local
        if removed:
            with self._counter_lock:
                self._deletes += 1
        return removed

    def touch(self, key: Hashable, ttl: float | None = None) -> bool:
        """Give the live entry a new ttl (None: the default); every L1 copy is dropped and re-read."""
        seconds = check_ttl(ttl)
        if seconds is None:
            seconds = self.default_ttl
        l1key, rkey = self._keys(key)
        if not self._usable():
            return l1key in self.l1  # a local copy keeps its outage-capped ttl
        self._drop_local(l1key)
        try:
            message = self._message(rkey, self._new_wid())
            return bool(self._touch(keys=[rkey], args=[self._px(seconds), self.channel, message]))
        except self._redis_error as exc:
            self._failed(exc)
            return False

    def update(self, key: Hashable, change: Callable[[Any], Any]) -> Any:
        """Atomically replace the value under ``key`` with ``change(value)`` (keeping its ttl); returns it.

        Optimistic (WATCH/MULTI) across every process. KeyError when absent; needs Redis: raises
        :class:`CacheUnavailableError` while it is unavailable, whatever ``ignore_exceptions`` says.
        """
        l1key, rkey = self._keys(key)
        if self._open_since is not None or not self._usable():
            raise CacheUnavailableError(f"{self.name}: Redis is unavailable; an atomic update needs it")
        self._drop_local(l1key)
        try:
            for _ in range(64):
                with self.client.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(rkey)
                        data: Any = pipe.get(rkey)
                        if data is None:
                            raise KeyError(key)
                        ok, value, _ = self._decode(rkey, data)
                        if not ok:
                            raise KeyError(key)
                        new_value = change(value)
                        wid = self._new_wid()
                        pipe.multi()
                        pipe.set(rkey, self._encode(rkey, new_value, wid), keepttl=True)
                        pipe.publish(self.channel, self._message(rkey, wid))
                        pipe.execute()
                    except self._watch_error:
                        continue
                with self._counter_lock:
                    self._puts += 1
                return new_value
        except self._redis_error as exc:
            with self._counter_lock:
                self._errors += 1
            raise CacheUnavailableError(f"{self.name}: update of {key!r} failed: {exc}") from exc
        raise CacheUnavailableError(f"{self.name}: update of {key!r} kept losing races")

    def incr(self, key: Hashable, delta: int = 1) -> int:
        """Atomically add ``delta`` to an int value; KeyError when absent, ValueError when not an int."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta must be an int, got {type(delta).__name__}")

        def add(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"the value under {key!r} is not an int")
            return value + delta

        return int(self.update(key, add))

    def clear(self) -> None:
        """Remove every key of the namespace in Redis and every process's L1 (SCAN + UNLINK, no FLUSHDB)."""
        with self._state_lock:
            self._flush_locked()
        if not self._usable():
            with self._counter_lock:
                self._pending_all = True
                self._pending.clear()
            return
        try:
            self._clear_redis()
        except self._redis_error as exc:
            with self._counter_lock:
                self._pending_all = True
                self._pending.clear()
            self._failed(exc)

    def _clear_redis(self) -> None:
        unlink_prefix(self.client, self._prefix_str)
        self.client.publish(self.channel, self._message(None, self._new_wid()))
        self._occupancy_reader.forget()

    # -- get_or_set across processes --------------------------------------------------------------------

    def _lock_key(self, key: Hashable) -> bytes:
        return self._lock_prefix + redis_key(b"", key)

    def _acquire_or_wait(self, key: Hashable) -> tuple[bytes | None, Any]:
        """Take the key's Redis lock, or wait for its holder's value: (token or None, value or _MISSING)."""
        if not self._usable():
            return None, _MISSING
        lock_key = self._lock_key(key)
        token = os.urandom(16)
        px = max(1, int(self.lock_timeout * 1000))
        deadline = time.monotonic() + self.lock_timeout
        waited = False
        try:
            while True:
                if self.client.set(lock_key, token, nx=True, px=px):
                    # the previous holder may have stored the value and released just now
                    value = self._fetch(key) if waited else _MISSING
                    if value is not _MISSING:
                        self._release(key, token)
                        return None, value
                    with self._counter_lock:
                        self._lock_wins += 1
                    return token, _MISSING
                if not waited:
                    waited = True
                    with self._counter_lock:
                        self._lock_waits += 1
                value = self._fetch(key)
                if value is not _MISSING:
                    return None, value
                if time.monotonic() >= deadline or not self._usable():
                    return None, _MISSING  # the holder is too slow or gone: compute it ourselves
                time.sleep(_LOCK_POLL)
        except self._redis_error as exc:
            self._failed(exc)
            return None, _MISSING

    def _release(self, key: Hashable, token: bytes | None) -> None:
        if token is None:
            return
        try:
            self._unlock(keys=[self._lock_key(key)], args=[token])
        except self._redis_error as exc:
            try:
                self._failed(exc)
            except CacheUnavailableError:
                pass  # the lock expires by itself; the value is already stored

    def _compute(self, key: Hashable, factory: Callable[[], Any], ttl: float | None) -> Any:
        """Under the key's Redis lock: run the factory once across processes (or take the winner's)."""
        token, value = self._acquire_or_wait(key)
        try:
            if value is _MISSING:
                value = _call_sync(factory)
                self._write(key, value, ttl, only_if_absent=False, fill=True)
        finally:
            self._release(key, token)
        return value

    async def _acompute(
        self, key: Hashable, factory: Callable[[], Any] | Callable[[], Awaitable[Any]], ttl: float | None
    ) -> Any:
        token, value = await asyncio.to_thread(self._acquire_or_wait, key)
        try:
            if value is _MISSING:
                value = await _call_async(factory)
                await asyncio.to_thread(self._write, key, value, ttl, only_if_absent=False, fill=True)
        finally:
            await asyncio.to_thread(self._release, key, token)
        return value

    # -- async: an L1 hit answers inline, anything that may call Redis runs in a thread -----------------

    async def aget(self, key: Hashable, default: Any = None) -> Any:
        l1key = key if type(key) is str else redis_key(self._prefix, key)
        if not next(self._polls) & _POLL_MASK:
            self._poll_channel()
        entry = self._l1_get(l1key, _MISSING)
        if entry is not _MISSING:
            return entry[0]
        return await asyncio.to_thread(self._slow_get, key, default)

    async def aupdate(self, key: Hashable, change: Callable[[Any], Any]) -> Any:
        return await asyncio.to_thread(self.update, key, change)

    async def aincr(self, key: Hashable, delta: int = 1) -> int:
        return await asyncio.to_thread(self.incr, key, delta)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # -- introspection ----------------------------------------------------------------------------------

    def _lookups_locked(self, l1_hits: int, l1_misses: int) -> tuple[int, int]:
        # An L1 miss that Redis answered is a hit of the whole cache.
        return l1_hits + self._redis_hits, max(l1_misses - self._redis_hits, 0)

    def lookups(self) -> tuple[int, int]:
        """Whole-cache ``(hits, misses)`` from L1's counters and ours (no Redis scan, no latencies)."""
        l1_hits, l1_misses = self.l1.lookups()
        with self._counter_lock:
            return self._lookups_locked(l1_hits, l1_misses)

    def stats(self, *, refresh: bool = False) -> NearCacheStats:
        """Whole-cache counters, L1's stats, and the fault counters; Redis occupancy rescanned at most
        every ``scan_interval`` seconds (or when ``refresh``)."""
        l1 = self.l1.stats()
        entries, stored = self._occupancy(refresh, l1)
        with self._counter_lock:
            hits, misses = self._lookups_locked(l1.hits, l1.misses)
            lookups = hits + misses
            return NearCacheStats(
                hits=hits,
                misses=misses,
                hit_rate=hits / lookups if lookups else 0.0,
                evictions=l1.evictions,
                expirations=l1.expirations,
                rejections=0,
                puts=self._puts,
                deletes=self._deletes,
                bytes=stored,
                entries=entries,
                max_bytes=None,
                max_entries=None,
                metadata_bytes=l1.metadata_bytes,
                hit_latency_ns=l1.hit_latency_ns,
                miss_latency_ns=l1.miss_latency_ns,
                name=self.name,
                policy=f"{l1.policy}+redis",
                l1=l1,
                l1_hits=l1.hits,
                redis_hits=self._redis_hits,
                redis_errors=self._errors,
                refused=self._refused,
                breaker_open=self._open_since is not None,
                breaker_trips=self._trips,
                coherent=self._coherent,
                invalidations=self._messages,
                forged_messages=self._forged,
                flushes=self._flushes,
                subscriptions=self._subscriptions,
                pending_writes=len(self._pending) + (1 if self._pending_all else 0),
                lock_waits=self._lock_waits,
                lock_wins=self._lock_wins,
                namespace=self.namespace,
            )

    def _occupancy(self, refresh: bool, l1: CacheStats) -> tuple[int, int]:
        """(entries, bytes) under the namespace in Redis; L1's while Redis is unavailable (as ``len``)."""
        if self._open_since is not None:
            return l1.entries, l1.bytes
        try:
            occ = self._occupancy_reader.read(refresh, raise_errors=True)
        except self._redis_error as exc:
            self._failed(exc, quiet=True)
            return l1.entries, l1.bytes
        return occ.entries, occ.bytes

    def __repr__(self) -> str:
        return f"NearCache(namespace={self.namespace!r}, name={self.name!r})"
