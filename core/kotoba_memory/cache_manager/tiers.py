"""A two-level cache: a fast in-memory tier over a larger, persistent disk tier, behind one API.

Tiers are exclusive: a key lives in memory or on disk, never both, so ``len`` and ``bytes`` add up.
Values heavier than ``spill_threshold_bytes`` go straight to disk; entries the memory tier evicts for
size are written to disk with their remaining ttl (expired ones are not); a disk hit moves the entry back
to memory (``promote_on_hit``) unless it is over the threshold. Large values are compressed by the disk
tier when it was built with ``compression=``; the ratio shows in :meth:`TieredCache.stats`.
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
from kotoba_memory.cache_manager.disk import DiskCache, DiskCacheStats
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
from kotoba_memory.validation import check_non_negative_int

__all__ = ["TieredCache", "TieredCacheStats"]

log = logging.getLogger(__name__)

_MISSING: Any = object()
# Memory hits are timed one call in SAMPLE_EVERY: a clock read costs a good share of a memory hit.
SAMPLE_EVERY = 64
_SAMPLE_MASK = SAMPLE_EVERY - 1
_live: weakref.WeakSet[TieredCache] = weakref.WeakSet()


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
    ) -> None:
        if not isinstance(memory, CacheManager):  # spilling needs its eviction listeners and weigher
            raise TypeError(f"memory must be a CacheManager, got {type(memory).__name__}")
        if not isinstance(disk, DiskCache):
            raise TypeError(f"disk must be a DiskCache, got {type(disk).__name__}")
        check_non_negative_int(spill_threshold_bytes, "spill_threshold_bytes")
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

    def _on_memory_eviction(self, key: Hashable, value: Any, cause: EvictionCause) -> None:
        """Spill entries evicted for size to disk (the memory tier calls this outside its lock)."""
        with self._lock:
            deadline = self._forget_deadline(key, value)
            if cause is not EvictionCause.SIZE:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                stored = self.disk.put(key, value, remaining)
            except Exception as exc:  # e.g. an unpicklable value: it is lost from the cache, not the app
                self._spill_failures += 1
                log.warning("%s: could not spill %r to disk: %s", self.name, key, exc)
                return
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
            hit = self.disk.lookup(key, remove=self.promote_on_hit)
            if hit is None:
                self._misses += 1
                self._sample(self._miss_ns, started)
                return default
            self._disk_hits += 1
            if self.promote_on_hit:
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
            hits = self.disk.lookup_many(on_disk, remove=self.promote_on_hit)
            for key in on_disk:
                hit = hits.get(key)
                if hit is None:
                    self._misses += 1
                    continue
                self._disk_hits += 1
                found[key] = hit.value
            if self.promote_on_hit:
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
        self.disk.put(key, value, ttl)

    def __contains__(self, key: object) -> bool:
        return key in self.memory or key in self.disk

    def __len__(self) -> int:
        with self._lock:
            return len(self.memory) + len(self.disk)

    def ttl_remaining(self, key: Hashable) -> float | None:
        """Seconds the entry has left in whichever tier holds it; None: no expiry. KeyError if absent."""
        with self._lock:  # a promotion moves the key between the tiers under this lock
            try:
                return self.memory.ttl_remaining(key)
            except KeyError:
                return self.disk.ttl_remaining(key)

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
                self.disk.delete(key)  # the tiers are exclusive: drop an older copy on disk
                return True
            self._forget_deadline(key, value)
            if spilled is not None and spilled[0] == key and spilled[1] is value:
                return True  # refused at admission, then written to disk by our eviction listener
            return self._put_on_disk(key, value, seconds)

    def _put_on_disk(self, key: Hashable, value: Any, seconds: float | None) -> bool:
        stored = self.disk.put(key, value, seconds)  # raises TypeError (unpicklable) before any change
        self._direct += 1
        self.memory.delete(key)
        self._deadlines.pop(key, None)
        if not stored:
            self._rejections += 1
        return stored

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
            return self.disk.touch(key, seconds)

    def delete(self, key: Hashable) -> bool:
        """Remove ``key`` from both tiers; True if either held it."""
        with self._lock:
            in_memory = self.memory.delete(key)
            self._deadlines.pop(key, None)
            on_disk = self.disk.delete(key)
            if in_memory or on_disk:
                self._deletes += 1
                return True
            return False

    def clear(self) -> None:
        """Empty both tiers."""
        with self._lock:
            self.memory.clear()
            self._deadlines.clear()
            self.disk.clear()

    # -- introspection ----------------------------------------------------------------------------

    def stats(self) -> TieredCacheStats:
        """Whole-cache counters plus ``memory`` and ``disk`` stats and the disk compression ratio."""
        memory = self.memory.stats()
        disk = self.disk.stats()
        with self._lock:
            # read the itertools.counts without advancing them
            gets = int(repr(self._gets)[6:-1]) - int(repr(self._bad_keys)[6:-1])
            memory_hits = max(gets - self._slow_lookups, 0) + self._slow_memory_hits
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
                    stored = self.disk.put(key, value, remaining)
                except TypeError as exc:
                    self._spill_failures += 1
                    log.warning("%s: could not persist %r: %s", self.name, key, exc)
                    continue
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
