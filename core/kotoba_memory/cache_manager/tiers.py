"""A two-level cache: a fast in-memory tier over a larger, persistent disk tier, behind one API.

Tiers are exclusive: a key lives in memory or on disk, never both, so ``len`` and ``bytes`` add up.
Values heavier than ``spill_threshold_bytes`` go straight to disk; entries the memory tier evicts for
size are written to disk with their remaining ttl (expired ones are not); a disk hit moves the entry back
to memory (``promote_on_hit``) unless it is over the threshold. Large values are compressed by the disk
tier when it was built with ``compression=``; the ratio shows in :meth:`TieredCache.stats`.

When the disk tier fails (a full disk, an I/O error, a lock held too long) the cache degrades to its
memory tier instead of raising: writes go to memory, entries evicted meanwhile are dropped
(``spill_failures``), keys whose disk copy could not be updated are never read from disk again until
that copy is deleted, and the disk is tried again every ``disk_retry_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from kotoba_memory.cache_manager.base import BaseCache
from kotoba_memory.cache_manager.disk import DiskCache, DiskCacheError, DiskCacheStats
from kotoba_memory.cache_manager.latency import LatencyWindow
from kotoba_memory.cache_manager.memory import CacheManager
from kotoba_memory.cache_manager.types import (
    CachedValue,
    CacheStats,
    EvictionCause,
    UnhashableKeyError,
    check_ttl,
)
from kotoba_memory.cache_manager.weigher import Weigher
from kotoba_memory.process import forks
from kotoba_memory.validation import check_non_negative, check_non_negative_int

__all__ = ["TieredCache", "TieredCacheStats"]

log = logging.getLogger(__name__)

_MISSING: Any = object()
# Memory hits are timed one call in SAMPLE_EVERY: a clock read costs a good share of a memory hit.
SAMPLE_EVERY = 64
_SAMPLE_MASK = SAMPLE_EVERY - 1
_live: weakref.WeakSet[TieredCache] = weakref.WeakSet()
# Keys whose disk copy is stale that we remember one by one; beyond this the whole disk tier is distrusted
# (and cleared once it is usable again), so a long outage cannot grow the set without bound.
_STALE_LIMIT = 10_000


def _reset_locks_after_fork() -> None:
    # A parent thread may have held the lock at fork time; in the child it would never be released.
    for cache in list(_live):
        cache._lock = threading.RLock()


forks.register(_reset_locks_after_fork, name="cache_manager.tiers")


@dataclass(frozen=True, kw_only=True)
class TieredCacheStats(CacheStats):
    """:class:`CacheStats` for the whole two-level cache, plus each tier's own stats.

    ``hits``/``misses`` count lookups on the tiered cache (a disk hit is a hit); ``evictions`` counts
    entries that left both tiers for size (memory evictions that were spilled to disk are not
    evictions of the whole cache: they are ``spills``). ``compression_ratio`` is the disk tier's.
    ``degraded`` is True while the disk tier is failing and the cache runs on memory alone;
    ``disk_errors`` counts the disk operations that failed.
    """

    memory: CacheStats
    disk: DiskCacheStats
    memory_hits: int = 0
    disk_hits: int = 0
    promotions: int = 0
    spills: int = 0
    direct_to_disk: int = 0
    spill_failures: int = 0
    compression_ratio: float | None = None
    degraded: bool = False
    disk_errors: int = 0


class TieredCache(BaseCache):
    """One ``get``/``put`` API over ``memory`` (L1, a :class:`CacheManager`) and ``disk`` (L2).

    Give the tiers to the TieredCache and use only it afterwards: it listens to the memory tier's
    evictions to spill them. ``default_ttl`` defaults to the memory tier's. All operations are
    thread-safe; memory hits take no lock of ours, everything that touches the disk runs under one lock
    (SQLite serializes writers anyway), which keeps the two tiers consistent.
    """

    def __init__(
        self,
        memory: CacheManager,
        disk: DiskCache,
        *,
        spill_threshold_bytes: int = 256 * 1024,
        promote_on_hit: bool = True,
        default_ttl: float | None = None,
        name: str | None = None,
        disk_retry_interval: float = 5.0,
    ) -> None:
        if not isinstance(memory, CacheManager):  # spilling needs its eviction listeners and weigher
            raise TypeError(f"memory must be a CacheManager, got {type(memory).__name__}")
        if not isinstance(disk, DiskCache):
            raise TypeError(f"disk must be a DiskCache, got {type(disk).__name__}")
        check_non_negative_int(spill_threshold_bytes, "spill_threshold_bytes")
        self.disk_retry_interval = check_non_negative(disk_retry_interval, "disk_retry_interval")
        self.memory = memory
        self.disk = disk
        self.spill_threshold_bytes = spill_threshold_bytes
        self.promote_on_hit = bool(promote_on_hit)
        default = check_ttl(default_ttl, "default_ttl")
        self.default_ttl = default if default is not None else memory.default_ttl
        # The memory tier's own weigher, so "heavier than the threshold" means what its byte bound means.
        self._weigh: Weigher = memory.weigher
        self._lock = threading.RLock()
        # Monotonic deadline and value of each memory entry that has a ttl: an eviction event carries no
        # ttl, and a spilled entry must keep its remaining lifetime. The value tells whose deadline it is
        # when an event arrives late (e.g. from the sweeper thread after the key was written again). Holds
        # no value the memory tier does not hold; bounded by its entry count.
        self._deadlines: dict[Hashable, tuple[float, Any]] = {}
        # Lookups: a GIL-atomic counter on the lock-free path; memory hits = gets - slow lookups + the
        # slow lookups that found the key in memory after all (promoted meanwhile by another thread).
        self._gets = itertools.count()
        self._bad_keys = itertools.count()  # gets that raised UnhashableKeyError
        self._slow_lookups = self._slow_memory_hits = 0
        self._disk_hits = self._misses = self._puts = self._deletes = self._rejections = 0
        self._promotions = self._spills = self._direct = self._spill_failures = 0
        self._hit_ns, self._miss_ns = LatencyWindow(), LatencyWindow()
        # The last entry our eviction listener wrote to disk: tells put() that a value the memory tier
        # refused at admission did reach the disk. Only read and written under self._lock.
        self._spilled: tuple[Hashable, Any] | None = None
        # Degraded mode (the disk tier failing): when to try it again, the keys whose disk copy must not be
        # served, and whether the whole disk tier is distrusted (too many such keys, or a failed clear).
        self._degraded = False
        self._retry_at = 0.0
        self._disk_errors = 0
        self._stale: set[Hashable] = set()
        self._stale_all = False
        super().__init__(name or f"tiered:{memory.name}+{disk.name}")
        memory.add_eviction_listener(self._on_memory_eviction)
        _live.add(self)

    # -- helpers ----------------------------------------------------------------------------------

    def _resolve_ttl(self, value: Any, ttl: float | None) -> float | None:
        seconds = check_ttl(ttl)
        if seconds is None and isinstance(value, CachedValue):
            seconds = value.ttl
        return self.default_ttl if seconds is None else seconds

    def _remember_deadline(self, key: Hashable, value: Any, seconds: float | None) -> None:
        if seconds is None:
            self._deadlines.pop(key, None)
        else:
            self._deadlines[key] = (time.monotonic() + seconds, value)

    def _forget_deadline(self, key: Hashable, value: Any) -> float | None:
        """Drop and return the deadline recorded for ``key`` if it belongs to ``value``."""
        record = self._deadlines.get(key)
        if record is None or record[1] is not value:
            return None
        del self._deadlines[key]
        return record[0]

    # -- degraded mode: the disk tier failing ---------------------------------------------------------

    def _disk_usable(self) -> bool:
        """Whether to use the disk now: always when healthy; when degraded, once the retry time came and
        the stale disk copies could be deleted (the disk may be back)."""
        if not self._degraded:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            if self._stale_all:
                self.disk.clear()
                self._stale_all = False
                self._stale.clear()
            while self._stale:
                key = next(iter(self._stale))
                self.disk.delete(key)
                self._stale.discard(key)
        except DiskCacheError as exc:
            self._disk_failed(exc)
            return False
        return True

    def _disk_failed(self, exc: DiskCacheError) -> None:
        """Count a failed disk operation and degrade to memory (said once per outage)."""
        if self.disk.closed:
            raise exc
        self._disk_errors += 1
        self._retry_at = time.monotonic() + self.disk_retry_interval
        if not self._degraded:
            self._degraded = True
            log.warning(
                "%s: the disk tier failed (%s); serving from memory alone, retrying every %gs",
                self.name,
                exc,
                self.disk_retry_interval,
            )

    def _disk_ok(self) -> None:
        """A disk write succeeded: leave degraded mode (said once)."""
        if self._degraded and not self._stale and not self._stale_all:
            self._degraded = False
            log.warning("%s: the disk tier works again", self.name)

    def _mark_stale(self, key: Hashable) -> None:
        """The disk copy of ``key`` could not be updated or deleted: never read it until it is deleted."""
        if self._stale_all:
            return
        self._stale.add(key)
        if len(self._stale) > _STALE_LIMIT:
            self._stale_all = True
            self._stale.clear()

    def _readable_on_disk(self, key: Hashable) -> bool:
        return not self._stale_all and key not in self._stale

    def _drop_from_disk(self, key: Hashable) -> bool:
        """Delete the disk copy of ``key`` (True if a live one was there); remembered as stale on failure."""
        if self._disk_usable():
            try:
                removed = self.disk.delete(key)
            except DiskCacheError as exc:
                self._disk_failed(exc)
            else:
                self._disk_ok()
                return removed
        live = False
        if self._readable_on_disk(key):
            try:
                live = key in self.disk
            except DiskCacheError:
                live = False
        self._mark_stale(key)
        return live

    def _on_memory_eviction(self, key: Hashable, value: Any, cause: EvictionCause) -> None:
        """Spill entries evicted for size to disk (the memory tier calls this outside its lock)."""
        with self._lock:
            deadline = self._forget_deadline(key, value)
            if cause is not EvictionCause.SIZE:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            if not self._disk_usable():
                self._spill_failures += 1  # degraded: the entry leaves the cache
                return
            try:
                stored = self.disk.put(key, value, remaining)
            except DiskCacheError as exc:
                self._spill_failures += 1
                self._disk_failed(exc)
                return
            except Exception as exc:  # e.g. an unpicklable value: it is lost from the cache, not the app
                self._spill_failures += 1
                log.warning("%s: could not spill %r to disk: %s", self.name, key, exc)
                return
            self._disk_ok()
            if stored:
                self._spills += 1
                self._spilled = (key, value)
            else:
                self._spill_failures += 1

    # -- reads ------------------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value from memory, else from disk (moved to memory when ``promote_on_hit``)."""
        if next(self._gets) & _SAMPLE_MASK:
            try:
                value = self.memory.get(key, _MISSING)
            except UnhashableKeyError:
                next(self._bad_keys)  # not a lookup: counted as neither hit nor miss
                raise
            if value is not _MISSING:
                return value
            return self._slow_get(key, default, None)
        # One call in SAMPLE_EVERY is timed, memory hit or not, so the latency medians are unbiased.
        started = time.perf_counter_ns()
        try:
            value = self.memory.get(key, _MISSING)
        except UnhashableKeyError:
            next(self._bad_keys)
            raise
        if value is not _MISSING:
            self._hit_ns.add(started)
            return value
        return self._slow_get(key, default, started)

    def _slow_get(self, key: Hashable, default: Any, started: int | None) -> Any:
        """Memory missed: look on disk under the lock; ``started`` is set when this call is sampled."""
        with self._lock:
            self._slow_lookups += 1
            if key in self.memory:  # promoted by another thread since our miss
                value = self.memory.get(key, _MISSING)
                if value is not _MISSING:
                    self._slow_memory_hits += 1
                    self._sample(self._hit_ns, started)
                    return value
            promote = self.promote_on_hit and not self._degraded  # a promotion deletes from disk
            hit = None
            if self._readable_on_disk(key):
                try:
                    hit = self.disk.lookup(key, remove=promote)
                except DiskCacheError as exc:
                    self._disk_failed(exc)
            if hit is None:
                self._misses += 1
                self._sample(self._miss_ns, started)
                return default
            self._disk_hits += 1
            if promote:
                self._promote(key, hit.value, hit.ttl_remaining)
            self._sample(self._hit_ns, started)
            return hit.value

    def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """The hits among ``keys``: memory first, then the rest from disk in one batched read."""
        found: dict[Hashable, Any] = {}
        missing: list[Hashable] = []
        for key in keys:
            next(self._gets)
            try:
                value = self.memory.get(key, _MISSING)
            except UnhashableKeyError:
                next(self._bad_keys)
                raise
            if value is _MISSING:
                missing.append(key)
            else:
                found[key] = value
        if not missing:
            return found
        with self._lock:
            self._slow_lookups += len(missing)
            on_disk: list[Hashable] = []
            for key in missing:
                value = self.memory.get(key, _MISSING) if key in self.memory else _MISSING
                if value is _MISSING:
                    on_disk.append(key)
                else:  # promoted meanwhile by another thread
                    self._slow_memory_hits += 1
                    found[key] = value
            promote = self.promote_on_hit and not self._degraded
            readable = [key for key in on_disk if self._readable_on_disk(key)]
            self._misses += len(on_disk) - len(readable)  # not read: their copies on disk are stale
            on_disk = readable
            try:
                hits = self.disk.lookup_many(on_disk, remove=promote)
            except DiskCacheError as exc:
                self._disk_failed(exc)
                hits = {}
            for key in on_disk:
                hit = hits.get(key)
                if hit is None:
                    self._misses += 1
                    continue
                self._disk_hits += 1
                found[key] = hit.value
            if promote:
                for key, hit in hits.items():
                    self._promote(key, hit.value, hit.ttl_remaining)
        return found

    async def aget_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        return await asyncio.to_thread(self.get_many, list(keys))

    @staticmethod
    def _sample(window: LatencyWindow, started: int | None) -> None:
        if started is not None:
            window.add(started)

    def _promote(self, key: Hashable, value: Any, ttl: float | None) -> None:
        """Move a value taken off the disk into memory, or put it back if memory will not keep it."""
        if self._weigh(value) <= self.spill_threshold_bytes:
            self._remember_deadline(key, value, ttl)
            self._spilled = None
            kept = self.memory.put(key, value, ttl)
            spilled, self._spilled = self._spilled, None
            if kept:
                self._promotions += 1
                return
            self._forget_deadline(key, value)
            if spilled is not None and spilled[0] == key and spilled[1] is value:
                return  # refused at admission and already written back by our eviction listener
        # Too heavy for memory, or refused by it without a spill: back to disk.
        try:
            self.disk.put(key, value, ttl)
        except DiskCacheError as exc:
            self._spill_failures += 1  # taken off the disk and kept nowhere: it leaves the cache
            self._disk_failed(exc)

    def __contains__(self, key: object) -> bool:
        if key in self.memory:
            return True
        if not self._readable_on_disk(key):
            return False
        try:
            return key in self.disk
        except DiskCacheError:
            return False

    def __len__(self) -> int:
        with self._lock:
            if self._stale_all:
                return len(self.memory)
            try:
                return len(self.memory) + len(self.disk)
            except DiskCacheError as exc:
                self._disk_failed(exc)
                return len(self.memory)

    def ttl_remaining(self, key: Hashable) -> float | None:
        """Seconds the entry has left in whichever tier holds it; None: no expiry. KeyError if absent."""
        with self._lock:  # a promotion moves the key between the tiers under this lock
            try:
                return self.memory.ttl_remaining(key)
            except KeyError:
                if not self._readable_on_disk(key):
                    raise
                try:
                    return self.disk.ttl_remaining(key)
                except DiskCacheError:
                    raise KeyError(key) from None

    # -- writes -----------------------------------------------------------------------------------

    def put(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store ``value``: in memory, or on disk when heavier than ``spill_threshold_bytes``.

        Returns False when neither tier keeps it. Bad input (unhashable key, bad ttl, a heavy value
        that does not pickle) raises before anything stored is touched.
        """
        try:
            hash(key)
        except TypeError:
            raise UnhashableKeyError(key) from None
        seconds = self._resolve_ttl(value, ttl)
        weight = self._weigh(value)
        with self._lock:
            self._puts += 1
            if weight > self.spill_threshold_bytes:
                return self._put_on_disk(key, value, seconds)
            # Recorded first: an admission refusal evicts (and spills) the new entry inside put().
            self._remember_deadline(key, value, seconds)
            self._spilled = None
            kept = self.memory.put(key, value, seconds)
            spilled, self._spilled = self._spilled, None
            if kept:
                self._drop_from_disk(key)  # the tiers are exclusive: drop an older copy on disk
                return True
            self._forget_deadline(key, value)
            if spilled is not None and spilled[0] == key and spilled[1] is value:
                return True  # refused at admission, then written to disk by our eviction listener
            return self._put_on_disk(key, value, seconds)

    def _put_on_disk(self, key: Hashable, value: Any, seconds: float | None) -> bool:
        if self._disk_usable():
            try:
                # raises TypeError (unpicklable) before any change
                stored = self.disk.put(key, value, seconds)
            except DiskCacheError as exc:
                self._disk_failed(exc)
            else:
                self._disk_ok()
                self._direct += 1
                self.memory.delete(key)
                self._deadlines.pop(key, None)
                if not stored:
                    self._rejections += 1
                return stored
        # Degraded: memory keeps it if it can, whatever its weight; any copy on disk is now stale.
        self._mark_stale(key)
        self._remember_deadline(key, value, seconds)
        kept = self.memory.put(key, value, seconds)
        if not kept:
            self._forget_deadline(key, value)
            self._rejections += 1
        return kept

    def add(self, key: Hashable, value: Any, ttl: float | None = None) -> bool:
        """Store only if ``key`` is in neither tier (atomic within this process)."""
        with self._lock:
            if key in self:
                return False
            return self.put(key, value, ttl)

    def touch(self, key: Hashable, ttl: float | None = None) -> bool:
        """Give the live entry a new ttl in whichever tier holds it (None: the default ttl)."""
        seconds = check_ttl(ttl)
        if seconds is None:
            seconds = self.default_ttl
        with self._lock:
            if self.memory.touch(key, seconds):
                record = self._deadlines.get(key)
                value = record[1] if record is not None else self.memory.get(key, _MISSING)
                if value is not _MISSING:
                    self._remember_deadline(key, value, seconds)
                return True
            if not self._readable_on_disk(key) or not self._disk_usable():
                return False
            try:
                return self.disk.touch(key, seconds)
            except DiskCacheError as exc:
                self._disk_failed(exc)
                return False

    def delete(self, key: Hashable) -> bool:
        """Remove ``key`` from both tiers; True if either held it."""
        with self._lock:
            in_memory = self.memory.delete(key)
            self._deadlines.pop(key, None)
            on_disk = self._drop_from_disk(key)
            if in_memory or on_disk:
                self._deletes += 1
                return True
            return False

    def clear(self) -> None:
        """Empty both tiers."""
        with self._lock:
            self.memory.clear()
            self._deadlines.clear()
            if self._disk_usable():
                try:
                    self.disk.clear()
                except DiskCacheError as exc:
                    self._disk_failed(exc)
                else:
                    self._disk_ok()
                    return
            self._stale_all = True  # nothing on disk may be served until it is cleared
            self._stale.clear()

    # -- introspection ----------------------------------------------------------------------------

    def _memory_hits_locked(self) -> int:
        # read the itertools.counts without advancing them
        gets = int(repr(self._gets)[6:-1]) - int(repr(self._bad_keys)[6:-1])
        return max(gets - self._slow_lookups, 0) + self._slow_memory_hits

    def lookups(self) -> tuple[int, int]:
        """Whole-cache ``(hits, misses)`` from this cache's own counters (no tier's stats)."""
        with self._lock:
            return self._memory_hits_locked() + self._disk_hits, self._misses

    def stats(self) -> TieredCacheStats:
        """Whole-cache counters plus ``memory`` and ``disk`` stats and the disk compression ratio."""
        memory = self.memory.stats()
        disk = self.disk.stats()
        with self._lock:
            memory_hits = self._memory_hits_locked()
            hits = memory_hits + self._disk_hits
            lookups = hits + self._misses
            bounds = [b for b in (memory.max_bytes, disk.max_bytes) if b is not None]
            return TieredCacheStats(
                hits=hits,
                misses=self._misses,
                hit_rate=hits / lookups if lookups else 0.0,
                evictions=disk.evictions + self._spill_failures,
                expirations=memory.expirations + disk.expirations,
                rejections=self._rejections,
                puts=self._puts,
                deletes=self._deletes,
                bytes=memory.bytes + disk.bytes,
                entries=memory.entries + disk.entries,
                max_bytes=sum(bounds) if bounds else None,
                max_entries=None,
                metadata_bytes=memory.metadata_bytes + sys.getsizeof(self._deadlines),
                hit_latency_ns=self._hit_ns.median(),
                miss_latency_ns=self._miss_ns.median(),
                name=self.name,
                policy=f"{memory.policy}+{disk.policy}",
                memory=memory,
                disk=disk,
                memory_hits=memory_hits,
                disk_hits=self._disk_hits,
                promotions=self._promotions,
                spills=self._spills,
                direct_to_disk=self._direct,
                spill_failures=self._spill_failures,
                compression_ratio=disk.compression_ratio,
                degraded=self._degraded,
                disk_errors=self._disk_errors,
            )

    def persist(self) -> int:
        """Move every live memory entry to disk with its remaining ttl (e.g. before a restart).

        Returns how many were written; the memory tier is empty afterwards.
        """
        moved = 0
        with self._lock:
            snapshot = self.memory.keys()  # a list: the loop below empties the memory tier
            for key in snapshot:
                value = self.memory.pop(key, _MISSING)
                if value is _MISSING:
                    continue
                deadline = self._forget_deadline(key, value)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    continue
                try:
                    stored = self.disk.put(key, value, remaining) if self._disk_usable() else None
                except TypeError as exc:
                    self._spill_failures += 1
                    log.warning("%s: could not persist %r: %s", self.name, key, exc)
                    continue
                except DiskCacheError as exc:
                    self._disk_failed(exc)
                    stored = None
                if stored is None:  # the disk tier fails: this entry and the rest stay in memory
                    self._remember_deadline(key, value, remaining)
                    self.memory.put(key, value, remaining)
                    break
                moved += int(stored)
        return moved

    def close(self, *, persist: bool = False) -> None:
        """Stop listening to the memory tier and close the disk tier (after :meth:`persist` if asked)."""
        if persist:
            self.persist()
        try:
            self.memory.remove_eviction_listener(self._on_memory_eviction)
        except ValueError:
            pass
        self.disk.close()

    # -- async: a memory hit answers inline, anything that may touch the disk runs in a thread ------

    async def aget(self, key: Hashable, default: Any = None) -> Any:
        started = None if next(self._gets) & _SAMPLE_MASK else time.perf_counter_ns()
        try:
            value = self.memory.get(key, _MISSING)
        except UnhashableKeyError:
            next(self._bad_keys)
            raise
        if value is not _MISSING:
            if started is not None:
                self._hit_ns.add(started)
            return value
        return await asyncio.to_thread(self._slow_get, key, default, started)

    async def apersist(self) -> int:
        return await asyncio.to_thread(self.persist)

    async def aclose(self, *, persist: bool = False) -> None:
        await asyncio.to_thread(lambda: self.close(persist=persist))

    def __repr__(self) -> str:
        return (
            f"TieredCache(memory={self.memory!r}, disk={self.disk!r}, "
            f"spill_threshold_bytes={self.spill_threshold_bytes})"
        )
