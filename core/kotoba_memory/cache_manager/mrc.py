"""Online miss-ratio-curve estimation beyond the current size, from sampled ghost entries.

When an entry is evicted its key's fingerprint is remembered with the cumulative evicted capacity at that
moment (a ghost). A later miss on a ghost key at "depth" d (capacity evicted since) would have been a hit
in a cache larger by d. For LRU that is the exact stack distance; for other policies it estimates what
keeping evicted entries would gain. Ghosts are spatially sampled by key hash (SHARDS-style): the rate
halves whenever more than ``max_ghosts`` are held, and each ghost hit counts 1/rate, so memory stays
bounded at any cache size. Misses pay a dict lookup; hits pay nothing.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["GhostMrc", "fingerprint", "mrc_curve"]

_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_BUCKETS = 64


def fingerprint(key: Hashable) -> int:
    """A well-mixed 64-bit hash of ``key`` (Python hashes ints to themselves)."""
    h = (hash(key) * _MIX) & _MASK64
    return h ^ (h >> 29)


class GhostMrc:
    """Ghost-entry MRC estimator covering capacities from the current one up to ``(1 + span) x`` it."""

    max_ghosts = 4096

    def __init__(self, max_entries: int | None, max_bytes: int | None, span: float = 1.0) -> None:
        self._by_bytes = max_bytes is not None
        capacity = max_bytes if max_bytes is not None else max_entries
        assert capacity is not None
        self.capacity = capacity
        self.span = max(int(capacity * span), 1)
        self._ghosts: OrderedDict[int, int] = OrderedDict()
        self._evicted = 0
        self._shift = 0
        self._mask = 0
        self._hist = [0] * _BUCKETS
        self.ghost_hits = 0

    def on_evict(self, key: Hashable, weight: int) -> None:
        """Remember an evicted key (under the cache lock)."""
        evicted = self._evicted + (weight if self._by_bytes else 1)
        self._evicted = evicted
        h = (hash(key) * _MIX) & _MASK64
        fp = h ^ (h >> 29)  # fingerprint(), inlined: this runs on every eviction
        if fp & self._mask:
            return
        ghosts = self._ghosts
        ghosts.pop(fp, None)
        ghosts[fp] = evicted
        horizon = evicted - self.span
        while True:
            try:
                oldest = next(iter(ghosts))
            except (StopIteration, RuntimeError):  # empty, or a lock-free on_miss popped meanwhile
                break
            at = ghosts.get(oldest)
            if at is not None and at > horizon:
                break
            ghosts.pop(oldest, None)
        if len(ghosts) > self.max_ghosts:
            self._shift += 1
            self._mask = (1 << self._shift) - 1
            mask = self._mask
            for old_fp in [g for g in list(ghosts) if g & mask]:
                ghosts.pop(old_fp, None)

    def on_miss(self, key: Hashable) -> None:
        """A lookup missed (called without the lock; races only lose a sample)."""
        if not self._ghosts:
            return
        fp = fingerprint(key)
        if fp & self._mask:
            return
        at = self._ghosts.pop(fp, None)
        if at is None:
            return
        depth = self._evicted - at
        if 0 <= depth <= self.span:
            self._hist[min(_BUCKETS - 1, depth * _BUCKETS // (self.span + 1))] += 1 << self._shift
            self.ghost_hits += 1

    def curve(self, hits: int, requests: int, points: int = 8) -> dict[int, float]:
        """Estimated miss ratio at the current capacity and at ``points`` larger ones."""
        return mrc_curve(self.capacity, self.span, self._hist, hits, requests, points)

    def metadata_bytes(self) -> int:
        # an OrderedDict slot and node plus two ints per ghost
        return sys.getsizeof(self._ghosts) + len(self._ghosts) * 2 * sys.getsizeof(1 << 40)


def mrc_curve(
    capacity: int, span: int, hist: list[int], hits: int, requests: int, points: int = 8
) -> dict[int, float]:
    """The miss ratio at ``capacity`` and at ``points`` larger ones, from a ghost-hit histogram."""
    if requests <= 0:
        return {}
    out = {capacity: 1.0 - hits / requests}
    for i in range(1, points + 1):
        extra = span * i // points
        upto = min(_BUCKETS, -(-extra * _BUCKETS // (span + 1)))
        gained = sum(hist[:upto])
        out[capacity + extra] = max(0.0, 1.0 - (hits + gained) / requests)
    return out
