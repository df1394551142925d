"""The in-memory cache: byte and/or entry bounded, per-entry ttl, pluggable eviction policy.

Two implementations behave identically: the compiled core (``kotoba_memory._ccache``, used when built,
for the four built-in policies) and this pure-Python reference (used where the extension is not built,
for policies registered with ``register_policy``, or forced with ``KOTOBA_MEMORY_PURE_PYTHON=1``). The
compiled core holds the table, every policy's bookkeeping, the expiry heap, the MRC ghosts and the
counters; each of its operations runs whole under the GIL, so it needs no lock.

Thread-safety model of the reference: every mutation (put, delete, eviction, expiry, policy upkeep)
runs under one lock. The hit path of :meth:`CacheManager.get` takes no lock: it is a dict lookup, an
expiry check, a counter bump and at most one C-level policy call, each atomic under the GIL; a race
with a concurrent removal is tolerated (the reader may return the value that was just being removed,
as any concurrent read may). One call in ``SAMPLE_EVERY`` is timed for the latency stats and does the
amortized upkeep.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from kotoba_memory import _native
from kotoba_memory.cache_manager.base import BaseCache
from kotoba_memory.cache_manager.mrc import GhostMrc, mrc_curve
from kotoba_memory.cache_manager.policies import (
    Entry,
    EvictionPolicy,
    FifoPolicy,
    LfuPolicy,
    LruPolicy,
    policy_class,
)
from kotoba_memory.cache_manager.sweeper import sweeper
from kotoba_memory.cache_manager.types import (
    CacheAnalysis,
    CachedValue,
    CachePolicy,
    CacheStats,
    EntryTooLargeError,
    EvictionCause,
    UnhashableKeyError,
    check_ttl,
)
from kotoba_memory.cache_manager.weigher import Weigher, default_weigher
from kotoba_memory.errors import ConfigError
from kotoba_memory.validation import check_enum, check_positive_int
from kotoba_memory.validation import check_ttl as _check_ttl

if TYPE_CHECKING:
    from kotoba_memory import _ccache

__all__ = ["CacheManager", "EvictionListener"]

log = logging.getLogger(__name__)

EvictionListener = Callable[[Hashable, Any, EvictionCause], Any]

SAMPLE_EVERY = 64
_SAMPLE_MASK = SAMPLE_EVERY - 1
_MISSING: Any = object()
_monotonic = time.monotonic
_perf_ns = time.perf_counter_ns
_FLOAT_BYTES = sys.getsizeof(1.5)
_INT_BYTES = sys.getsizeof(10**6)
_HEAP_ITEM_BYTES = sys.getsizeof((0.0, 0, 0)) + _FLOAT_BYTES + _INT_BYTES
# Expired entries dropped per write, so a burst of expiries is reclaimed in amortized steps.
_EXPIRE_PER_OP = 8
# The heaviest entry a cache accepts (both implementations): byte totals stay exact in 64 bits.
MAX_WEIGHT = 1 << 48
# Bounds the compiled core takes; a larger max_bytes/max_entries runs on the reference.
_CORE_MAX_BOUND = 1 << 62


def _count(counter: itertools.count[int]) -> int:
    """Read an itertools.count (used as a GIL-atomic counter) without advancing it."""
    return int(repr(counter)[6:-1])


def _make_reader(cache: CacheManager, counted: bool, hooked: bool) -> Callable[..., Any]:
    """Build ``cache.get``: the lock-free hit path, specialised for the policy's hit bookkeeping."""
    table = cache._table
    gets, bad_keys = cache._gets, cache._bad_keys
    sampled, miss, expired = cache._sampled_get, cache._miss, cache._expired_read
    touch = cache._touch
    monotonic = cache._clock
    count = next
    mask = _SAMPLE_MASK

    if counted and hooked:  # ADAPTIVE: a per-entry hit counter and a per-entry C-level hook

        def get(key: Hashable, default: Any = None) -> Any:
            if not count(gets) & mask:
                return sampled(key, default)
            try:
                entry = table[key]
            except KeyError:
                return miss(key, default)
            except TypeError:
                count(bad_keys)
                raise UnhashableKeyError(key) from None
            expires = entry.expires
            if expires is not None and expires <= monotonic():
                return expired(key, entry, default)
            entry.hits += 1
            try:
                entry.on_hit(key)  # type: ignore[misc]  # set on every entry by this policy
            except KeyError:  # removed concurrently; the read still returns what it found
                pass
            return entry.value

    elif counted:  # LFU: a per-entry hit counter only

        def get(key: Hashable, default: Any = None) -> Any:
            if not count(gets) & mask:
                return sampled(key, default)
            try:
                entry = table[key]
            except KeyError:
                return miss(key, default)
            except TypeError:
                count(bad_keys)
                raise UnhashableKeyError(key) from None
            expires = entry.expires
            if expires is not None and expires <= monotonic():
                return expired(key, entry, default)
            entry.hits += 1
            return entry.value

    elif touch is not None:  # LRU: one shared C call (move_to_end)

        def get(key: Hashable, default: Any = None) -> Any:
            if not count(gets) & mask:
                return sampled(key, default)
            try:
                entry = table[key]
            except KeyError:
                return miss(key, default)
            except TypeError:
                count(bad_keys)
                raise UnhashableKeyError(key) from None
            expires = entry.expires
            if expires is not None and expires <= monotonic():
                return expired(key, entry, default)
            try:
                touch(key)
            except KeyError:
                pass
            return entry.value

    else:  # FIFO: a hit changes nothing

        def get(key: Hashable, default: Any = None) -> Any:
            if not count(gets) & mask:
                return sampled(key, default)
            try:
                entry = table[key]
            except KeyError:
                return miss(key, default)
            except TypeError:
                count(bad_keys)
                raise UnhashableKeyError(key) from None
            expires = entry.expires
            if expires is not None and expires <= monotonic():
                return expired(key, entry, default)
            return entry.value

    get.__doc__ = CacheManager.get.__doc__
    return get


class CacheManager(BaseCache):
    """A thread-safe in-memory cache bounded by bytes (``max_bytes``) and/or entries (``max_entries``).

    ``policy`` picks the eviction strategy (:class:`CachePolicy` or its name). ``ttl`` is seconds;
    ``default_ttl`` applies when a put gives none (None: never expires). ``weigher(value) -> int``
    overrides the byte weight of values. ``on_evict(key, value, cause)`` runs outside the lock when an
    entry leaves for size or expiry (not on delete, overwrite or clear).
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        policy: CachePolicy | str = CachePolicy.ADAPTIVE,
        *,
        max_entries: int | None = None,
        default_ttl: float | None = None,
        weigher: Weigher | None = None,
        on_evict: EvictionListener | None = None,
        name: str | None = None,
        strict: bool = False,
        implementation: str | None = None,
    ) -> None:
        self._core: _ccache.Core | None = None
        self._max_bytes = None if max_bytes is None else check_positive_int(max_bytes, "max_bytes")
        self.strict = bool(strict)
        self._max_entries = None if max_entries is None else check_positive_int(max_entries, "max_entries")
        if self.max_bytes is None and self.max_entries is None:
            raise ConfigError("max_bytes", "a cache needs a bound: give max_bytes and/or max_entries")
        self.policy = CachePolicy.coerce(policy)
        self.default_ttl = check_ttl(default_ttl, "default_ttl")
        if weigher is not None and not callable(weigher):
            raise TypeError(f"weigher must be callable, got {type(weigher).__name__}")
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable, got {type(on_evict).__name__}")
        self._weigher: Weigher = weigher or default_weigher
        # The clock the entries' expiry is judged by, read when the cache is built (tests swap it).
        self._clock: Callable[[], float] = _monotonic
        self._listeners: list[EvictionListener] = [on_evict] if on_evict is not None else []
        self._lock = threading.Lock()
        self._callback_errors = 0
        self._core = self._build_core(implementation)
        self.implementation = "python" if self._core is None else "c"
        if self._core is not None:
            core = self._core
            self._table: Mapping[Hashable, Entry] = _CoreTable(core)
            self._read = core.get
            # The hot paths are the core's own methods, bound on the instance (no Python frame per call);
            # a subclass overriding get() or put() keeps its override.
            if type(self).get is CacheManager.get:
                self.get = core.get  # type: ignore[method-assign]
            if type(self).put is CacheManager.put:
                self.put = core.put  # type: ignore[method-assign]
            super().__init__(name)
            return
        self._policy: EvictionPolicy = policy_class(self.policy)(self.max_entries, self.max_bytes)
        self._table = self._policy.table
        self._record_miss = (
            self._policy.record_miss
            if type(self._policy).record_miss is not EvictionPolicy.record_miss
            else None
        )
        self._bytes = 0
        self._expiry: list[tuple[float, int, Hashable]] = []
        self._expiry_seq = itertools.count()
        self._sweeping = False
        # GIL-atomic counters for the lock-free read path; the rest change under the lock.
        self._gets = itertools.count()
        self._misses = itertools.count()
        self._bad_keys = itertools.count()
        self._puts = self._deletes = self._evictions = self._expirations = self._rejections = 0
        self._hit_ns: deque[int] = deque(maxlen=512)
        self._miss_ns: deque[int] = deque(maxlen=512)
        self._mrc = GhostMrc(self.max_entries, self.max_bytes)
        self._touch = self._policy.hit_action()
        self._counted = self._policy.counts_hits
        self._maintain = (
            self._policy.maintain if type(self._policy).maintain is not EvictionPolicy.maintain else None
        )
        self._entry_class = self._policy.entry_class
        self._entry_bytes = sys.getsizeof(self._entry_class(None, 0, None))
        self._read = _make_reader(self, counted=self._counted, hooked=self._policy.hooks_every_entry)
        # The hot path as an instance attribute: a plain closure over locals, no bound-method creation and
        # no attribute lookups on ``self`` per call.
        if type(self).get is CacheManager.get:  # a subclass overriding get() keeps its override
            self.get = self._read  # type: ignore[method-assign]
        super().__init__(name)

    @property
    def max_entries(self) -> int | None:
        """The entry bound; may be changed (e.g. lowered for one put), later puts evict down to it."""
        return self._max_entries

    @max_entries.setter
    def max_entries(self, value: int | None) -> None:
        self._max_entries = None if value is None else check_positive_int(value, "max_entries")
        self._sync_bounds()

    @property
    def max_bytes(self) -> int | None:
        """The byte bound; may be changed, later puts are held to it (policy sizing stays as built)."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        self._max_bytes = None if value is None else check_positive_int(value, "max_bytes")
        self._sync_bounds()

    def _sync_bounds(self) -> None:
        if self._core is not None:
            # beyond the core's range a bound is effectively none
            self._core.set_bounds(
                *(-1 if b is None else min(b, _CORE_MAX_BOUND) for b in (self._max_entries, self._max_bytes))
            )

    def _build_core(self, implementation: str | None) -> _ccache.Core | None:
        """The compiled core for this cache, or None where the reference implementation runs."""
        wanted = None if implementation is None else check_enum(implementation, "implementation", _Impl).value
        if wanted == "python":
            return None
        module = _native.load("_ccache")
        kind = None if module is None else _core_kind(self.policy, module)
        if module is None or kind is None:
            if wanted == "c":
                reason = (
                    f"{_native.PURE_PYTHON_ENV} is set"
                    if _native.pure_python_forced()
                    else "the C extension is not built"
                    if module is None
                    else f"policy {self.policy.value!r} is replaced by a registered class or configured "
                    "beyond what the compiled core implements"
                )
                raise ConfigError("implementation", f"'c' is not available: {reason}")
            return None
        if any(bound is not None and bound > _CORE_MAX_BOUND for bound in (self.max_bytes, self.max_entries)):
            if wanted == "c":
                raise ConfigError("implementation", "'c' takes max_bytes/max_entries up to 2**62")
            return None
        from kotoba_memory.cache_manager.types import CachedValue

        extra: dict[str, Any] = {}
        if self.policy is CachePolicy.ADAPTIVE:
            import random

            from kotoba_memory.cache_manager.adaptive import AdaptivePolicy, GhostList

            extra = {
                "rng_random": random.Random(0x5EED).random,
                "initial_window": AdaptivePolicy.initial_window,
                "protected_share": AdaptivePolicy.protected_share,
                "ghost_depth": AdaptivePolicy.ghost_depth,
                "ghost_gain": AdaptivePolicy.ghost_gain,
                "max_ghost_keys": GhostList.max_keys,
            }
        core: _ccache.Core = module.Core(
            kind,
            -1 if self.max_entries is None else self.max_entries,
            -1 if self.max_bytes is None else self.max_bytes,
            self.default_ttl,
            None if self._weigher is default_weigher else self._weigher,
            default_weigher,
            self.strict,
            self._notify if self._listeners else None,
            self._start_sweeping,
            None if self._clock is time.monotonic else self._clock,
            _check_ttl,
            EntryTooLargeError,
            UnhashableKeyError,
            CachedValue,
            EvictionCause.SIZE,
            EvictionCause.EXPIRED,
            aging_factor=LfuPolicy.aging_factor,
            max_ghosts=GhostMrc.max_ghosts,
            **extra,
        )
        return core

    def _start_sweeping(self) -> None:
        sweeper.register(self)

    def _reinit_after_fork(self) -> None:
        super()._reinit_after_fork()
        self._lock = threading.Lock()
        # The next ttl'd put registers again, which resumes the child's scheduler for the sweeper.
        if self._core is not None:
            self._core.reset_after_fork()
        else:
            self._sweeping = False

    # -- reads ------------------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None) -> Any:
        """Return the live value under ``key`` (a CachedValue comes back as stored), else ``default``."""
        # Instances read through the closure installed in __init__ (``self.get``); this method is only
        # reached through an explicit ``CacheManager.get(cache, key)``.
        return self._read(key, default)

    def _miss(self, key: Hashable, default: Any) -> Any:
        next(self._misses)
        if self._record_miss is not None:
            self._record_miss(key)
        self._mrc.on_miss(key)
        return default

    def _expired_read(self, key: Hashable, entry: Entry, default: Any) -> Any:
        expired: list[tuple[Hashable, Any, EvictionCause]] = []
        with self._lock:
            if self._table.get(key) is entry:
                self._unlink(key, entry)
                self._expirations += 1
                expired.append((key, entry.value, EvictionCause.EXPIRED))
        self._notify(expired)
        return self._miss(key, default)

    def _sampled_get(self, key: Hashable, default: Any) -> Any:
        start = _perf_ns()
        try:
            entry = self._table[key]
        except KeyError:
            entry = None
        except TypeError:
            next(self._bad_keys)
            raise UnhashableKeyError(key) from None
        if entry is not None:
            expires = entry.expires
            if expires is not None and expires <= self._clock():
                value = self._expired_read(key, entry, default)
                self._miss_ns.append(_perf_ns() - start)
            else:
                on_hit = self._touch
                if self._counted:
                    entry.hits += 1
                    on_hit = entry.on_hit
                if on_hit is not None:
                    try:
                        on_hit(key)
                    except KeyError:
                        pass
                value = entry.value
                self._hit_ns.append(_perf_ns() - start)
        else:
            value = self._miss(key, default)
            self._miss_ns.append(_perf_ns() - start)
        self._upkeep_if_idle()
        return value

    def __contains__(self, key: object) -> bool:
        if self._core is not None:
            return key in self._core
        try:
            entry = self._table.get(key)
        except TypeError:
            raise UnhashableKeyError(key) from None
        if entry is None:
            return False
        return entry.expires is None or entry.expires > self._clock()

    def __len__(self) -> int:
        if self._core is not None:
            return len(self._core)
        return len(self._table)

    def ttl_remaining(self, key: Hashable) -> float | None:
        """Seconds until ``key`` expires; None if it never expires; raises KeyError if absent."""
        if self._core is not None:
            return self._core.ttl_remaining(key)
        try:
            entry = self._table.get(key)
        except TypeError:
            raise UnhashableKeyError(key) from None
        now = self._clock()
        if entry is None or (entry.expires is not None and entry.expires <= now):
            raise KeyError(key)
        return None if entry.expires is None else entry.expires - now

    @property
    def weigher(self) -> Weigher:
        """The ``weigher(value) -> int`` that gives values their byte weight against ``max_bytes``."""
        return self._weigher

    # -- writes -----------------------------------------------------------------------------------

    def _prepare(self, key: Hashable, value: Any, ttl: float | None) -> tuple[int, float | None]:
        """Validate a put outside the lock: the key's hash, the ttl and the value's weight."""
        try:
            hash(key)
        except TypeError:
            raise UnhashableKeyError(key) from None
        if ttl is None and type(value) is CachedValue:
            ttl = value.ttl
        ttl = self.default_ttl if ttl is None else check_ttl(ttl)
        weight = self._weigher(value)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise TypeError(f"weigher must return an int, got {type(weight).__name__} for key {key!r}")
        if weight < 0:
            raise ValueError(f"weigher returned a negative weight ({weight}) for key {key!r}")
        if weight > MAX_WEIGHT:
            raise ValueError(
                f"weigher returned {weight} for key {key!r}: more than the largest weight a cache "
                "accepts (2**48)"
            )
        self._check_strict(key, weight)
        return weight, (None if ttl is None else self._clock() + ttl)

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: the default ttl).

        Returns False if the entry is not kept: heavier than ``max_bytes`` (counted as a rejection; any
        older value under the key is dropped so no stale value survives the write) or refused by the
        adaptive policy's admission filter.
        """
        if self._core is not None:
            return self._core.put(key, value, ttl)
        weight, expires = self._prepare(key, value, ttl)
        with self._lock:
            kept, events = self._put_locked(key, value, weight, expires)
        self._notify(events)
        return kept

    def put_many(self, mapping: Mapping[Hashable, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping``: all are validated and weighed first, so a bad one stores none.

        The items are then written under one lock acquisition (eviction listeners run afterwards).
        """
        core = self._core
        if core is not None:
            core.put_prepared(
                [(key, value, *core.prepare(key, value, ttl)) for key, value in mapping.items()]
            )
            return
        prepared = [(key, value, *self._prepare(key, value, ttl)) for key, value in mapping.items()]
        events: list[tuple[Hashable, Any, EvictionCause]] = []
        with self._lock:
            for key, value, weight, expires in prepared:
                events.extend(self._put_locked(key, value, weight, expires)[1])
        self._notify(events)

    def _check_strict(self, key: Hashable, weight: int) -> None:
        if self.strict and self.max_bytes is not None and weight > self.max_bytes:
            with self._lock:
                self._rejections += 1
            raise EntryTooLargeError(key, weight, self.max_bytes)

    def add(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` has no live entry (atomic); True if stored."""
        if self._core is not None:
            return self._core.add(key, value, ttl)
        weight, expires = self._prepare(key, value, ttl)
        with self._lock:
            entry = self._table.get(key)
            if entry is not None and (entry.expires is None or entry.expires > self._clock()):
                return False
            kept, events = self._put_locked(key, value, weight, expires)
        self._notify(events)
        return kept

    def touch(self, key: Hashable, ttl: float | None = None) -> bool:
        """Give the live entry under ``key`` a new ttl (None: the default ttl); True if it existed."""
        if self._core is not None:
            return self._core.touch(key, ttl)
        ttl = self.default_ttl if ttl is None else check_ttl(ttl)
        try:
            hash(key)
        except TypeError:
            raise UnhashableKeyError(key) from None
        now = self._clock()
        with self._lock:
            entry = self._table.get(key)
            if entry is None or (entry.expires is not None and entry.expires <= now):
                return False
            entry.expires = None if ttl is None else now + ttl
            if entry.expires is not None:
                self._schedule(key, entry.expires)
            return True

    def _put_locked(
        self, key: Hashable, value: Any, weight: int, expires: float | None
    ) -> tuple[bool, list[tuple[Hashable, Any, EvictionCause]]]:
        events: list[tuple[Hashable, Any, EvictionCause]] = []
        table = self._table
        old = table.get(key)
        if self.max_bytes is not None and weight > self.max_bytes:
            self._rejections += 1
            if old is not None:
                self._unlink(key, old)
            return False, events
        entry = self._entry_class(value, weight, expires)
        if old is not None:
            self._policy.replace(key, old, entry)
            self._bytes += weight - old.weight
        else:
            self._policy.insert(key, entry)
            self._bytes += weight
        self._puts += 1
        if expires is not None:
            self._schedule(key, expires)
        if self._expiry:
            # Expired entries go first, so a put never evicts a live entry to make room that the dead
            # ones already hold.
            self._expire_some(_EXPIRE_PER_OP, events)
        self._evict_over_bound(events)
        if self._maintain is not None:
            self._maintain(self._counts)
        return table.get(key) is entry, events

    def _evict_over_bound(self, events: list[tuple[Hashable, Any, EvictionCause]]) -> None:
        table, max_bytes, max_entries = self._table, self.max_bytes, self.max_entries
        while table and (
            (max_bytes is not None and self._bytes > max_bytes)
            or (max_entries is not None and len(table) > max_entries)
        ):
            key, entry = self._policy.evict()
            self._bytes -= entry.weight
            self._evictions += 1
            self._mrc.on_evict(key, entry.weight)
            events.append((key, entry.value, EvictionCause.SIZE))

    def delete(self, key: Hashable) -> bool:
        """Remove ``key``; True if a live entry was removed."""
        if self._core is not None:
            return self._core.delete(key)
        try:
            hash(key)
        except TypeError:
            raise UnhashableKeyError(key) from None
        with self._lock:
            entry = self._policy.remove(key)
            if entry is None:
                return False
            self._bytes -= entry.weight
            if entry.expires is not None and entry.expires <= self._clock():
                self._expirations += 1
                return False
            self._deletes += 1
            return True

    def pop(self, key: Hashable, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its live value; ``default`` (or KeyError) if absent."""
        if self._core is not None:
            return self._core.pop(key) if default is _MISSING else self._core.pop(key, default)
        try:
            hash(key)
        except TypeError:
            raise UnhashableKeyError(key) from None
        with self._lock:
            entry = self._policy.remove(key)
            if entry is not None:
                self._bytes -= entry.weight
                if entry.expires is None or entry.expires > self._clock():
                    self._deletes += 1
                    return entry.value
                self._expirations += 1
        if default is _MISSING:
            raise KeyError(key)
        return default

    def clear(self) -> None:
        """Remove every entry; no eviction callbacks run."""
        if self._core is not None:
            self._core.clear()
            return
        with self._lock:
            self._policy.clear()
            self._bytes = 0
            self._expiry.clear()

    def _unlink(self, key: Hashable, entry: Entry) -> None:
        self._policy.remove(key)
        self._bytes -= entry.weight

    # -- expiry -----------------------------------------------------------------------------------

    def _schedule(self, key: Hashable, expires: float) -> None:
        heap = self._expiry
        heapq.heappush(heap, (expires, next(self._expiry_seq), key))
        if len(heap) > 2 * len(self._table) + 64:
            # Overwrites, touches and deletes leave stale items; keep those whose key still expires
            # at the item's time (their order, by expiry then scheduling sequence, is unchanged).
            table = self._table
            self._expiry = [item for item in heap if _expires_at(table.get(item[2]), item[0])]
            heapq.heapify(self._expiry)
        if not self._sweeping:
            self._sweeping = True
            sweeper.register(self)

    def _expire_some(self, limit: int, events: list[tuple[Hashable, Any, EvictionCause]]) -> None:
        heap = self._expiry
        if not heap:
            return
        now = self._clock()
        table = self._table
        while heap and limit > 0 and heap[0][0] <= now:
            _, _, key = heapq.heappop(heap)
            entry = table.get(key)
            if entry is None or entry.expires is None or entry.expires > now:
                continue  # stale item: deleted, overwritten or touched since
            self._unlink(key, entry)
            self._expirations += 1
            events.append((key, entry.value, EvictionCause.EXPIRED))
            limit -= 1

    def sweep_expired(self, limit: int = 256) -> float | None:
        """Drop up to ``limit`` expired entries now; return the next expiry deadline (monotonic) or None.

        The shared sweeper thread calls this so an idle cache frees expired memory too.
        """
        if self._core is not None:
            found, deadline, stop = self._core.sweep(limit)
            if stop:
                sweeper.unregister(self)
            if found:
                self._notify(found)
            return deadline
        events: list[tuple[Hashable, Any, EvictionCause]] = []
        with self._lock:
            self._expire_some(limit, events)
            deadline = self._expiry[0][0] if self._expiry else None
            if deadline is None and self._sweeping:
                self._sweeping = False
                sweeper.unregister(self)
        self._notify(events)
        return deadline

    def _upkeep_if_idle(self) -> None:
        """Amortized upkeep from the read path, skipped when a writer holds the lock."""
        if not self._lock.acquire(blocking=False):
            return
        events: list[tuple[Hashable, Any, EvictionCause]] = []
        try:
            self._expire_some(_EXPIRE_PER_OP * 4, events)
            if self._maintain is not None:
                self._maintain(self._counts)
        finally:
            self._lock.release()
        self._notify(events)

    # -- eviction listeners -----------------------------------------------------------------------

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Also call ``listener(key, value, cause)`` when an entry is evicted or expires."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        with self._lock:
            self._listeners = [*self._listeners, listener]
            if self._core is not None:
                self._core.notify = self._notify

    def remove_eviction_listener(self, listener: EvictionListener) -> None:
        """Stop calling ``listener``; ValueError if it was not added."""
        with self._lock:
            listeners = list(self._listeners)
            listeners.remove(listener)
            self._listeners = listeners
            if self._core is not None and not listeners:
                self._core.notify = None

    def _notify(self, events: list[tuple[Hashable, Any, EvictionCause]]) -> None:
        if not events:
            return
        listeners = self._listeners
        for key, value, cause in events:
            for listener in listeners:
                try:
                    listener(key, value, cause)
                except Exception:  # a listener's bug must not break the caller's put or get
                    self._callback_errors += 1
                    log.exception("%s: eviction listener %r failed", self.name, listener)

    # -- introspection ----------------------------------------------------------------------------

    def _counts(self) -> tuple[int, int]:
        """Cumulative (hits, requests), for policies that adapt to them."""
        gets, misses, bad = _count(self._gets), _count(self._misses), _count(self._bad_keys)
        return gets - misses - bad, gets - bad

    def lookups(self) -> tuple[int, int]:
        """Cumulative ``(hits, misses)``, as :meth:`stats` counts them, without its sampled latencies
        (two rings of 512 copied and their medians sorted, ~25 µs a cache)."""
        if self._core is not None:
            gets, misses, bad = self._core.lookups()
            hits, requests = gets - misses - bad, gets - bad
        else:
            with self._lock:
                hits, requests = self._counts()
        return max(hits, 0), requests - hits

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters, occupancy and sampled latencies."""
        if self._core is not None:
            raw = self._core.stats()
        else:
            with self._lock:
                raw = (
                    _count(self._gets),
                    _count(self._misses),
                    _count(self._bad_keys),
                    self._evictions,
                    self._expirations,
                    self._rejections,
                    self._puts,
                    self._deletes,
                    self._bytes,
                    len(self._table),
                    self._metadata_bytes_locked(),
                    list(self._hit_ns),
                    list(self._miss_ns),
                )
        gets, misses, bad, evictions, expirations, rejections, puts, deletes, nbytes, entries, meta = raw[:11]
        hit_ns, miss_ns = raw[11], raw[12]
        hits = max(gets - misses - bad, 0)
        requests = hits + misses
        return CacheStats(
            hits=hits,
            misses=misses,
            hit_rate=hits / requests if requests else 0.0,
            evictions=evictions,
            expirations=expirations,
            rejections=rejections,
            puts=puts,
            deletes=deletes,
            bytes=nbytes,
            entries=entries,
            max_bytes=self.max_bytes,
            max_entries=self.max_entries,
            metadata_bytes=meta,
            hit_latency_ns=int(statistics.median(hit_ns)) if hit_ns else 0,
            miss_latency_ns=int(statistics.median(miss_ns)) if miss_ns else 0,
            name=self.name,
            policy=self.policy.value,
        )

    def _metadata_bytes_locked(self) -> int:
        entries = len(self._table)
        big_weights = sum(1 for e in list(self._table.values()) if e.weight > 256) if entries else 0
        with_ttl = len(self._expiry)
        return (
            self._policy.metadata_bytes()
            + entries * self._entry_bytes
            + big_weights * _INT_BYTES
            + with_ttl * _HEAP_ITEM_BYTES
            + sys.getsizeof(self._expiry)
            + self._mrc.metadata_bytes()
        )

    def analyze(self) -> CacheAnalysis:
        """Stats, an effectiveness score in 0..1, numeric recommendations and the estimated MRC."""
        from kotoba_memory.cache_manager.analysis import analyze_cache

        stats = self.stats()
        if self._core is not None:
            hist, _, _, capacity, span = self._core.mrc()
            curve = mrc_curve(capacity, span, hist, stats.hits, stats.requests)
            details = self._core.describe()
        else:
            with self._lock:
                curve = self._mrc.curve(stats.hits, stats.requests)
                details = self._policy.describe()
        return analyze_cache(stats, curve, details, self._callback_errors)

    def _describe(self) -> dict[str, Any]:
        """The policy's internals (e.g. ADAPTIVE's window), whichever implementation runs."""
        if self._core is not None:
            return self._core.describe()
        with self._lock:
            return self._policy.describe()

    async def aanalyze(self) -> CacheAnalysis:
        """Async :meth:`analyze` (pure in-memory work, runs inline)."""
        return self.analyze()

    def keys(self) -> list[Hashable]:
        """A snapshot of the keys held (including expired ones not yet reclaimed).

        LRU and FIFO list them oldest first, LFU in insertion order; ADAPTIVE's order is unspecified.
        """
        if self._core is not None:
            return self._core.keys()
        return list(self._table)

    def __repr__(self) -> str:
        return (
            f"CacheManager(max_bytes={self.max_bytes}, policy={self.policy.name}, "
            f"max_entries={self.max_entries}, name={self.name!r}, implementation={self.implementation!r})"
        )

    # -- async twins: everything here is fast in-memory work, so it runs inline ---------------------

    async def aget(self, key: Hashable, default: Any = None) -> Any:
        return self.get(key, default)

    async def aput(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        return self.put(key, value, ttl)

    async def adelete(self, key: Hashable) -> bool:
        return self.delete(key)

    async def aget_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        return self.get_many(keys)

    async def aput_many(self, mapping: Mapping[Hashable, Any], ttl: float | None = None) -> None:
        self.put_many(mapping, ttl)

    async def aadd(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        return self.add(key, value, ttl)

    async def atouch(self, key: Hashable, ttl: float | None = None) -> bool:
        return self.touch(key, ttl)

    async def aclear(self) -> None:
        self.clear()

    async def astats(self) -> CacheStats:
        return self.stats()

    async def alookups(self) -> tuple[int, int]:
        return self.lookups()

    async def attl_remaining(self, key: Hashable) -> float | None:
        return self.ttl_remaining(key)


class _Impl(enum.Enum):
    C = "c"
    PYTHON = "python"


_BUILTIN_KINDS = {CachePolicy.LRU: "LRU", CachePolicy.LFU: "LFU", CachePolicy.FIFO: "FIFO"}


def _core_kind(policy: CachePolicy, module: Any) -> int | None:
    """The compiled core's code for ``policy``, or None when the policy runs only in Python."""
    cls = policy_class(policy)
    if policy is CachePolicy.ADAPTIVE:
        from kotoba_memory.cache_manager.adaptive import AdaptivePolicy

        # The hill-climbing alternative (adapt = "climb") and subclasses stay in Python.
        if cls is not AdaptivePolicy or AdaptivePolicy.adapt != "ghost":
            return None
        return int(module.ADAPTIVE)
    builtin = {CachePolicy.LRU: LruPolicy, CachePolicy.LFU: LfuPolicy, CachePolicy.FIFO: FifoPolicy}
    if cls is not builtin[policy]:
        return None
    return int(getattr(module, _BUILTIN_KINDS[policy]))


def _expires_at(entry: Entry | None, expires: float) -> bool:
    return entry is not None and entry.expires == expires


class _CoreTable(Mapping[Hashable, Entry]):
    """A read-only view of the compiled core's table as ``key -> Entry`` snapshots (tests, debugging)."""

    def __init__(self, core: Any) -> None:
        self._core = core

    def __getitem__(self, key: Hashable) -> Entry:
        found = self._core.entry(key)
        if found is None:
            raise KeyError(key)
        return Entry(*found)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._core.keys())

    def __len__(self) -> int:
        return len(self._core)

    def __contains__(self, key: object) -> bool:
        return self._core.entry(key) is not None
