"""Eviction policies: each is a small strategy class behind :class:`EvictionPolicy`.

A policy owns the key -> :class:`Entry` table and whatever order it keeps. The cache calls it under
its lock for every insert, removal and eviction. The read path runs without the lock: it bumps
``entry.hits`` and calls ``entry.on_hit(key)`` if set, which a policy points at one C-level operation
(``OrderedDict.move_to_end`` for LRU); anything heavier is deferred to the locked path.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar

from kotoba_memory.cache_manager.types import CachePolicy

__all__ = [
    "Entry",
    "EvictionPolicy",
    "FifoPolicy",
    "LfuPolicy",
    "LruPolicy",
    "policy_class",
    "register_policy",
    "TrackedEntry",
]


class Entry:
    """One cached value with its weight and absolute expiry (monotonic seconds)."""

    if TYPE_CHECKING:  # hits/on_hit/seg exist on TrackedEntry only; declared here for the type checker
        __slots__ = ("expires", "hits", "on_hit", "seg", "value", "weight")
        hits: int
        on_hit: Callable[[Hashable], Any] | None
        seg: Any
    else:
        __slots__ = ("expires", "value", "weight")

    def __init__(self, value: Any, weight: int, expires: float | None) -> None:
        self.value = value
        self.weight = weight
        self.expires = expires


class TrackedEntry(Entry):
    """An entry that also counts its hits and carries its policy's read hook and segment."""

    if not TYPE_CHECKING:
        __slots__ = ("hits", "on_hit", "seg")

    def __init__(self, value: Any, weight: int, expires: float | None) -> None:
        self.value = value
        self.weight = weight
        self.expires = expires
        self.hits = 0
        self.on_hit = None
        self.seg = None


class EvictionPolicy(ABC):
    """Chooses which entry leaves when the cache is over its bound.

    ``max_entries``/``max_bytes`` are the cache's bounds; a policy that sizes internal segments uses
    bytes when the cache is byte bounded, else entry counts.
    """

    kind: ClassVar[CachePolicy]
    # False: hits need no per-entry counter, only hit_action(); entries are the slimmer ``Entry``.
    counts_hits: ClassVar[bool] = True
    # True: every entry's ``on_hit`` is set (the read path may call it unchecked).
    hooks_every_entry: ClassVar[bool] = False
    entry_class: ClassVar[type[Entry]] = TrackedEntry
    table: MutableMapping[Hashable, Entry]

    def __init__(self, max_entries: int | None, max_bytes: int | None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def unit(self, entry: Entry) -> int:
        """The capacity an entry uses in this policy's accounting."""
        return entry.weight if self.max_bytes is not None else 1

    @property
    def capacity(self) -> int:
        """The bound in this policy's unit (bytes when byte bounded, else entries)."""
        if self.max_bytes is not None:
            return self.max_bytes
        assert self.max_entries is not None
        return self.max_entries

    @abstractmethod
    def insert(self, key: Hashable, entry: Entry) -> None:
        """Add a new key (absent from the table)."""

    @abstractmethod
    def remove(self, key: Hashable) -> Entry | None:
        """Remove ``key`` if present (delete, overwrite, expiry) and return its entry."""

    @abstractmethod
    def evict(self) -> tuple[Hashable, Entry]:
        """Choose a victim, remove it and return it; the table is not empty."""

    def replace(self, key: Hashable, old: Entry, new: Entry) -> None:
        """Overwrite ``key`` (present with ``old``) with ``new``; by default a remove then insert."""
        self.remove(key)
        self.insert(key, new)

    def clear(self) -> None:
        """Forget every entry."""
        self.table.clear()

    def hit_action(self) -> Callable[[Hashable], Any] | None:
        """The one C-level call a hit makes when every entry shares it (``counts_hits`` False)."""
        return None

    def record_miss(self, key: Hashable) -> None:
        """A lookup of ``key`` missed (called without the lock; must be cheap and race-tolerant)."""
        return None

    def maintain(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Periodic upkeep under the lock; ``counts()`` gives the cache's cumulative (hits, requests)."""
        return None

    def metadata_bytes(self) -> int:
        """Bytes of this policy's own structures (tables, queues, sketches), entries excluded."""
        return sys.getsizeof(self.table)

    def describe(self) -> dict[str, Any]:
        """Policy internals worth reporting (e.g. an adaptive window size)."""
        return {}


class LruPolicy(EvictionPolicy):
    """Least recently used: a hit moves the entry to the back of an OrderedDict (one C call)."""

    kind = CachePolicy.LRU
    counts_hits = False
    entry_class = Entry

    def hit_action(self) -> Callable[[Hashable], Any] | None:
        return self._touch

    def __init__(self, max_entries: int | None, max_bytes: int | None) -> None:
        super().__init__(max_entries, max_bytes)
        self._order: OrderedDict[Hashable, Entry] = OrderedDict()
        self.table = self._order
        self._touch = self._order.move_to_end

    def insert(self, key: Hashable, entry: Entry) -> None:
        self._order[key] = entry

    def remove(self, key: Hashable) -> Entry | None:
        return self._order.pop(key, None)

    def evict(self) -> tuple[Hashable, Entry]:
        return self._order.popitem(last=False)


class FifoPolicy(EvictionPolicy):
    """First in, first out: hits change nothing; an overwrite keeps the entry's place."""

    kind = CachePolicy.FIFO
    counts_hits = False
    entry_class = Entry

    def __init__(self, max_entries: int | None, max_bytes: int | None) -> None:
        super().__init__(max_entries, max_bytes)
        self._order: OrderedDict[Hashable, Entry] = OrderedDict()
        self.table = self._order

    def insert(self, key: Hashable, entry: Entry) -> None:
        self._order[key] = entry

    def remove(self, key: Hashable) -> Entry | None:
        return self._order.pop(key, None)

    def replace(self, key: Hashable, old: Entry, new: Entry) -> None:
        self._order[key] = new

    def evict(self) -> tuple[Hashable, Entry]:
        return self._order.popitem(last=False)


class LfuPolicy(EvictionPolicy):
    """Least frequently used with aging: counts halve every ``aging_factor`` x capacity requests.

    A hit only bumps ``entry.hits``; a lazy min-heap of (count, sequence) snapshots finds the victim,
    re-queuing entries whose count grew since they were queued. Ties go to the oldest queued.
    """

    kind = CachePolicy.LFU
    aging_factor = 8

    def __init__(self, max_entries: int | None, max_bytes: int | None) -> None:
        super().__init__(max_entries, max_bytes)
        self.table: dict[Hashable, Entry] = {}
        self._heap: list[tuple[int, int, Hashable]] = []
        self._seq = itertools.count()
        self._next_aging = 0

    def insert(self, key: Hashable, entry: Entry) -> None:
        entry.hits = 1
        seq = next(self._seq)
        entry.seg = seq
        self.table[key] = entry
        heapq.heappush(self._heap, (1, seq, key))
        if len(self._heap) > 2 * len(self.table) + 64:
            self._rebuild()

    def replace(self, key: Hashable, old: Entry, new: Entry) -> None:
        new.hits = old.hits + 1
        new.seg = old.seg
        self.table[key] = new

    def remove(self, key: Hashable) -> Entry | None:
        return self.table.pop(key, None)

    def evict(self) -> tuple[Hashable, Entry]:
        heap, table = self._heap, self.table
        while heap:
            count, seq, key = heapq.heappop(heap)
            entry = table.get(key)
            if entry is None or entry.seg != seq:
                continue  # stale: deleted, or re-queued under a newer sequence
            hits = entry.hits
            if hits != count:
                seq = next(self._seq)
                entry.seg = seq
                heapq.heappush(heap, (hits, seq, key))
                continue
            del table[key]
            return key, entry
        # Only reachable if the heap lost track of entries; fall back to any entry.
        self._rebuild()
        key = next(iter(table))
        return key, table.pop(key)

    def clear(self) -> None:
        self.table.clear()
        self._heap.clear()

    def maintain(self, counts: Callable[[], tuple[int, int]]) -> None:
        _, requests = counts()
        if requests < self._next_aging:
            return
        period = self.aging_factor * max(len(self.table), 16)
        if self._next_aging:
            for entry in self.table.values():
                entry.hits >>= 1
            self._rebuild()
        self._next_aging = requests + period

    def _rebuild(self) -> None:
        heap = []
        for key, entry in self.table.items():
            seq = next(self._seq)
            entry.seg = seq
            heap.append((entry.hits, seq, key))
        heapq.heapify(heap)
        self._heap = heap

    def metadata_bytes(self) -> int:
        # each heap item: a 3-tuple plus its sequence int (counts are small cached ints)
        per_item = sys.getsizeof((0, 0, 0)) + 32
        return sys.getsizeof(self.table) + sys.getsizeof(self._heap) + per_item * len(self._heap)

    def describe(self) -> dict[str, Any]:
        return {"heap_items": len(self._heap)}


_POLICIES: dict[CachePolicy, type[EvictionPolicy]] = {
    CachePolicy.LRU: LruPolicy,
    CachePolicy.FIFO: FifoPolicy,
    CachePolicy.LFU: LfuPolicy,
}


def register_policy(policy: CachePolicy, cls: type[EvictionPolicy]) -> None:
    """Make ``cls`` the implementation of ``policy``."""
    _POLICIES[policy] = cls


def policy_class(policy: CachePolicy) -> type[EvictionPolicy]:
    """The class implementing ``policy``."""
    if policy is CachePolicy.ADAPTIVE and policy not in _POLICIES:
        import kotoba_memory.cache_manager.adaptive  # noqa: F401  # registers itself

    return _POLICIES[policy]
