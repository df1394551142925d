"""ADAPTIVE: W-TinyLFU (the design of Caffeine) with an online-sized window, built for a lock-free hit path.

Layout: a small LRU *window* admits every new entry; the *main* area is a segmented LRU (*probation*,
*protected* = 80% of main). When the window overflows, its LRU entry (the candidate) competes with
main's LRU victim: the one a count-min *frequency sketch* says was requested more often stays. Popular
keys therefore survive scans and loops (where LRU scores 0), while the window keeps recency-friendly
workloads close to LRU. The sketch has saturating counters (max 15), halved every ``10 x width``
additions so old popularity decays, and a Bloom-filter doorkeeper that keeps one-hit wonders out.

Window size: two small sampled *ghost* lists remember what each side dropped recently (candidates the
window lost, victims main lost). A miss on a key the window side dropped grows the window; a miss on a
key main dropped shrinks it. Only drops within ``ghost_depth`` of the capacity count, so a loop longer
than the cache cannot drag the window open. ``adapt = "climb"`` switches to Caffeine-style hill
climbing on the sampled hit rate instead (kept for comparison; see docs/cache.md).

Lock-free hits: a hit bumps ``entry.hits`` and calls one C method: ``move_to_end`` in the window or the
protected segment, or ``deque.append`` into a promotion buffer for probation entries. Hit counts are
folded into the sketch and promotions applied under the lock, when the cache next writes or does upkeep.
"""

from __future__ import annotations

import random
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

from kotoba_memory.cache_manager.mrc import fingerprint
from kotoba_memory.cache_manager.policies import Entry, EvictionPolicy, register_policy
from kotoba_memory.cache_manager.types import CachePolicy

__all__ = ["AdaptivePolicy", "FrequencySketch"]

_WINDOW, _PROBATION, _PROTECTED = 0, 1, 2
_MIX1 = 0x9E3779B97F4A7C15
_MIX2 = 0xC2B2AE3D27D4EB4F
_MASK64 = (1 << 64) - 1
_MAX_COUNT = 15


class FrequencySketch:
    """A count-min sketch with 4 rows of saturating counters (max 15) and periodic halving (aging).

    ``width`` counters per row (a power of two >= the expected number of distinct hot keys). After
    ``sample_size`` additions every counter is halved, so the sketch tracks recent popularity. A
    doorkeeper (a small Bloom filter, cleared at each halving) absorbs each key's first addition, so
    one-hit wonders never reach the counters.
    """

    def __init__(self, expected_entries: int) -> None:
        self._resize(expected_entries)

    def _resize(self, expected_entries: int) -> None:
        width = 16
        while width < expected_entries:
            width <<= 1
        self.width = width
        self._mask = width - 1
        self._table = bytearray(4 * width)
        self._halve_mask = int.from_bytes(b"\x7f" * (4 * width), "little")
        self.sample_size = 10 * width
        self.additions = 0
        # doorkeeper: a Bloom filter of 32 bits per counter column, two probes
        self._door = bytearray(4 * width)
        self._door_mask = 32 * width - 1

    def ensure_capacity(self, expected_entries: int) -> None:
        """Grow (and reset) when the cache holds more keys than the sketch was sized for."""
        if expected_entries > self.width:
            self._resize(expected_entries)

    def _indexes(self, key: Hashable) -> tuple[int, int, int, int, int]:
        h = (hash(key) * _MIX1) & _MASK64
        h ^= h >> 31
        g = (h * _MIX2) & _MASK64
        g ^= g >> 29
        mask, width = self._mask, self.width
        return (
            h,
            h & mask,
            width + ((h >> 32) & mask),
            2 * width + (g & mask),
            3 * width + ((g >> 32) & mask),
        )

    def _in_door(self, h: int, insert: bool) -> bool:
        door, mask = self._door, self._door_mask
        i, j = (h >> 7) & mask, (h >> 41) & mask
        present = bool(door[i >> 3] & (1 << (i & 7))) and bool(door[j >> 3] & (1 << (j & 7)))
        if insert and not present:
            door[i >> 3] |= 1 << (i & 7)
            door[j >> 3] |= 1 << (j & 7)
        return present

    def frequency(self, key: Hashable) -> int:
        """The estimated number of recent additions of ``key`` (0..16)."""
        h, a, b, c, d = self._indexes(key)
        t = self._table
        return min(t[a], t[b], t[c], t[d]) + (1 if self._in_door(h, False) else 0)

    def add(self, key: Hashable, count: int = 1) -> None:
        """Record ``count`` requests of ``key``."""
        if count <= 0:
            return
        self.additions += count
        h, a, b, c, d = self._indexes(key)
        if not self._in_door(h, True):
            count -= 1  # the first request of a key only sets its doorkeeper bit
        if count:
            t = self._table
            for i in (a, b, c, d):
                v = t[i] + count
                t[i] = v if v < _MAX_COUNT else _MAX_COUNT
        if self.additions >= self.sample_size:
            self.age()

    def age(self) -> None:
        """Halve every counter and clear the doorkeeper."""
        n = int.from_bytes(self._table, "little")
        self._table[:] = ((n >> 1) & self._halve_mask).to_bytes(len(self._table), "little")
        self._door[:] = bytes(len(self._door))
        self.additions //= 2

    def memory_bytes(self) -> int:
        """Bytes held by the counters and the doorkeeper."""
        return sys.getsizeof(self._table) + sys.getsizeof(self._door)


class GhostList:
    """Fingerprints of recently dropped keys, up to ``limit`` units of capacity, spatially sampled.

    Only keys whose fingerprint matches the sampling mask are kept; the rate halves whenever more than
    ``max_keys`` are held, and :meth:`take` scales a hit back up by the inverse rate.
    """

    max_keys = 4096

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.keys: OrderedDict[int, int] = OrderedDict()
        self.size = 0
        self.shift = 0
        self.mask = 0

    def add(self, fp: int, unit: int) -> None:
        if fp & self.mask:
            return
        keys = self.keys
        old = keys.pop(fp, None)
        if old is not None:
            self.size -= old
        keys[fp] = unit
        self.size += unit
        limit = self.limit >> self.shift
        while self.size > limit and keys:
            self.size -= keys.popitem(last=False)[1]
        if len(keys) > self.max_keys:
            self.shift += 1
            self.mask = (1 << self.shift) - 1
            for other in [k for k in keys if k & self.mask]:
                self.size -= keys.pop(other)

    def take(self, fp: int) -> int | None:
        """Remove ``fp`` if held and return its units scaled by the inverse sampling rate."""
        if fp & self.mask:
            return None
        unit = self.keys.pop(fp, None)
        if unit is None:
            return None
        self.size -= unit
        return unit << self.shift

    def clear(self) -> None:
        self.keys.clear()
        self.size = 0

    def memory_bytes(self) -> int:
        return sys.getsizeof(self.keys) + len(self.keys) * 2 * sys.getsizeof(1 << 40)


class AdaptivePolicy(EvictionPolicy):
    """W-TinyLFU admission with an adaptive window size; see the module docstring."""

    kind = CachePolicy.ADAPTIVE
    hooks_every_entry = True
    initial_window = 0.01
    protected_share = 0.8
    # The hill climber (adapt = "climb"): Caffeine's step and restart threshold; the period and decay
    # are the best of the settings tried on the shipped traces.
    step_percent = 0.0625
    step_decay = 0.9
    restart_threshold = 0.05
    # Hill-climber sample period, in requests per unit of capacity (entries).
    period_factor = 2.0
    # How the window size adapts: "ghost" (default; see _ghost_feedback) or "climb" (hill climbing).
    adapt = "ghost"
    # Ghost lists remember this share of the capacity; each ghost hit moves the window by gain x its size.
    ghost_depth = 0.1
    ghost_gain = 0.5

    def __init__(self, max_entries: int | None, max_bytes: int | None) -> None:
        super().__init__(max_entries, max_bytes)
        self.table: dict[Hashable, Entry] = {}
        self._window: OrderedDict[Hashable, Entry] = OrderedDict()
        self._probation: OrderedDict[Hashable, Entry] = OrderedDict()
        self._protected: OrderedDict[Hashable, Entry] = OrderedDict()
        self._window_hit = self._window.move_to_end
        self._protected_hit = self._protected.move_to_end
        self._promotions: deque[Hashable] = deque(maxlen=4096)
        self._promote_hit = self._promotions.append
        self._window_size = self._probation_size = self._protected_size = 0
        cap = self.capacity
        self._max_window = max(1, int(cap * self.initial_window)) if max_bytes is None else int(
            cap * self.initial_window
        )
        self._window_target = float(self._max_window)
        self._set_main_limits()
        self.sketch = FrequencySketch(max_entries if max_entries is not None else 1024)
        self._rng = random.Random(0x5EED)
        self._step = self.step_percent * cap
        self._prev_rate: float | None = None
        self._sample_start: tuple[int, int] | None = None
        self.adjustments = 0
        depth = max(int(cap * self.ghost_depth), 1)
        self._rejected = GhostList(depth)
        self._evicted = GhostList(depth)

    # -- structure ----------------------------------------------------------------------------------

    def _set_main_limits(self) -> None:
        main = self.capacity - self._max_window
        self._max_protected = int(main * self.protected_share)

    def _entries_capacity(self) -> int:
        if self.max_entries is not None and self.max_bytes is None:
            return self.max_entries
        return max(len(self.table), 16)

    def insert(self, key: Hashable, entry: Entry) -> None:
        # Hook first, table last: a lock-free reader may call on_hit as soon as the key is visible.
        entry.seg = _WINDOW
        entry.on_hit = self._window_hit
        self._window[key] = entry
        self.table[key] = entry
        self._window_size += self.unit(entry)
        self.sketch.add(key)
        if self.adapt == "ghost":
            self._ghost_feedback(key)
        if self.max_bytes is not None:
            self.sketch.ensure_capacity(len(self.table))
        if self._window_size > self._max_window and self._total() <= self.capacity:
            self._spill_window()  # still filling up: the overflow moves to main without a contest

    def _total(self) -> int:
        return self._window_size + self._probation_size + self._protected_size

    def _spill_window(self) -> None:
        window = self._window
        while self._window_size > self._max_window and window:
            key, entry = window.popitem(last=False)
            self._window_size -= self.unit(entry)
            self._to_probation(key, entry)

    def _to_probation(self, key: Hashable, entry: Entry) -> None:
        entry.seg = _PROBATION
        entry.on_hit = self._promote_hit
        self._probation[key] = entry
        self._probation_size += self.unit(entry)

    def _segment_remove(self, key: Hashable, entry: Entry) -> None:
        unit = self.unit(entry)
        seg = entry.seg
        if seg == _WINDOW:
            del self._window[key]
            self._window_size -= unit
        elif seg == _PROBATION:
            del self._probation[key]
            self._probation_size -= unit
        else:
            del self._protected[key]
            self._protected_size -= unit

    def remove(self, key: Hashable) -> Entry | None:
        entry = self.table.pop(key, None)
        if entry is not None:
            self._segment_remove(key, entry)
        return entry

    def replace(self, key: Hashable, old: Entry, new: Entry) -> None:
        """An overwrite keeps the key's segment and counts as a request."""
        seg = old.seg
        delta = self.unit(new) - self.unit(old)
        new.seg, new.on_hit, new.hits = seg, old.on_hit, old.hits + 1
        self.table[key] = new
        if seg == _WINDOW:
            self._window[key] = new
            self._window.move_to_end(key)
            self._window_size += delta
        elif seg == _PROBATION:
            self._probation[key] = new
            self._probation_size += delta
        else:
            self._protected[key] = new
            self._protected.move_to_end(key)
            self._protected_size += delta

    def clear(self) -> None:
        self.table.clear()
        self._window.clear()
        self._probation.clear()
        self._protected.clear()
        self._promotions.clear()
        self._rejected.clear()
        self._evicted.clear()
        self._window_size = self._probation_size = self._protected_size = 0

    # -- deferred hit work ----------------------------------------------------------------------------

    def _drain_promotions(self) -> None:
        buffer = self._promotions
        if not buffer:
            return
        table = self.table
        protected = self._protected
        while buffer:
            try:
                key = buffer.popleft()
            except IndexError:
                break
            entry = table.get(key)
            if entry is None or entry.seg != _PROBATION:
                continue
            del self._probation[key]
            unit = self.unit(entry)
            self._probation_size -= unit
            entry.seg = _PROTECTED
            entry.on_hit = self._protected_hit
            protected[key] = entry
            self._protected_size += unit
        while self._protected_size > self._max_protected and protected:
            key, entry = protected.popitem(last=False)
            self._protected_size -= self.unit(entry)
            self._to_probation(key, entry)

    def _frequency(self, key: Hashable, entry: Entry) -> int:
        hits = entry.hits
        if hits:
            entry.hits = 0
            self.sketch.add(key, hits)
        return self.sketch.frequency(key)

    def _admit(self, cand_key: Hashable, cand: Entry, victim_key: Hashable, victim: Entry) -> bool:
        cand_freq = self._frequency(cand_key, cand)
        victim_freq = self._frequency(victim_key, victim)
        if cand_freq > victim_freq:
            return True
        # A warm candidate sometimes wins a tie-or-loss, so a hash-flooding attack cannot pin the victim.
        return cand_freq >= 6 and self._rng.random() < 1 / 128

    # -- eviction --------------------------------------------------------------------------------------

    def _main_victim(self) -> tuple[Hashable, Entry] | None:
        for segment in (self._probation, self._protected):
            if segment:
                key = next(iter(segment))
                return key, segment[key]
        return None

    def evict(self) -> tuple[Hashable, Entry]:
        self._drain_promotions()
        if self._window_size > self._max_window and self._window:
            cand_key, cand = self._window.popitem(last=False)
            self._window_size -= self.unit(cand)
            found = self._main_victim()
            if found is None:
                del self.table[cand_key]
                return cand_key, cand
            victim_key, victim = found
            if self._admit(cand_key, cand, victim_key, victim):
                self._segment_remove(victim_key, victim)
                del self.table[victim_key]
                self._to_probation(cand_key, cand)
                self._remember(False, victim_key, victim)
                return victim_key, victim
            del self.table[cand_key]
            self._remember(True, cand_key, cand)
            return cand_key, cand
        found = self._main_victim()
        if found is None:
            key, entry = self._window.popitem(last=False)
            self._window_size -= self.unit(entry)
            self._remember(True, key, entry)
        else:
            key, entry = found
            self._segment_remove(key, entry)
            self._remember(False, key, entry)
        del self.table[key]
        return key, entry

    # -- ghost feedback --------------------------------------------------------------------------------

    def _remember(self, rejected: bool, key: Hashable, entry: Entry) -> None:
        """Note a key the window side (``rejected``) or the main side just dropped."""
        if self.adapt == "ghost":
            (self._rejected if rejected else self._evicted).add(fingerprint(key), self.unit(entry))

    def _ghost_feedback(self, key: Hashable) -> None:
        """A re-requested key that one side dropped recently votes to give that side more room."""
        fp = fingerprint(key)
        units = self._rejected.take(fp)
        if units is not None:
            self._resize_window(self._window_target + units * self.ghost_gain)
            return
        units = self._evicted.take(fp)
        if units is not None:
            self._resize_window(self._window_target - units * self.ghost_gain)

    # -- adaptation ------------------------------------------------------------------------------------

    def maintain(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._drain_promotions()
        if self.adapt != "climb":
            return
        hits, requests = counts()
        start = self._sample_start
        if start is None:
            # Climb only once the cache is full: while it warms up the hit rate rises whatever the
            # window does, which would read as "keep going".
            if self._total() >= self.capacity * 0.95:
                self._sample_start = (hits, requests)
            return
        period = max(int(self.period_factor * self._entries_capacity()), 256)
        done = requests - start[1]
        if done < period:
            return
        rate = (hits - start[0]) / done
        self._sample_start = (hits, requests)
        self._climb(rate)

    def _climb(self, rate: float) -> None:
        """Move the window size by the step; reverse direction when the hit rate got worse."""
        prev = self._prev_rate
        self._prev_rate = rate
        if prev is None:
            amount = self._step
        else:
            change = rate - prev
            amount = self._step if change >= 0 else -self._step
            if abs(change) >= self.restart_threshold:
                self._step = self.step_percent * self.capacity * (1 if amount >= 0 else -1)
            else:
                self._step = self.step_decay * amount
        self._resize_window(self._window_target + amount)

    def _resize_window(self, target: float) -> None:
        cap = self.capacity
        self._window_target = min(max(target, 0.0), float(cap))
        new_window = int(self._window_target)
        if new_window == self._max_window:
            return
        self.adjustments += 1
        self._max_window = new_window
        self._set_main_limits()
        # Shrinking the window moves its LRU entries to probation; growing it takes main's LRU
        # entries back into the window. Total occupancy is unchanged either way.
        self._spill_window()
        while self._window_size < self._max_window and (self._probation or self._protected):
            segment = self._probation if self._probation else self._protected
            key, entry = segment.popitem(last=False)
            unit = self.unit(entry)
            if entry.seg == _PROBATION:
                self._probation_size -= unit
            else:
                self._protected_size -= unit
            entry.seg = _WINDOW
            entry.on_hit = self._window_hit
            self._window[key] = entry
            self._window.move_to_end(key, last=False)
            self._window_size += unit
        while self._protected_size > self._max_protected and self._protected:
            key, entry = self._protected.popitem(last=False)
            self._protected_size -= self.unit(entry)
            self._to_probation(key, entry)

    # -- introspection -----------------------------------------------------------------------------------

    def metadata_bytes(self) -> int:
        return (
            sys.getsizeof(self.table)
            + sys.getsizeof(self._window)
            + sys.getsizeof(self._probation)
            + sys.getsizeof(self._protected)
            + sys.getsizeof(self._promotions)
            + self.sketch.memory_bytes()
            + self._rejected.memory_bytes()
            + self._evicted.memory_bytes()
        )

    def describe(self) -> dict[str, Any]:
        cap = self.capacity
        return {
            "window_fraction": self._max_window / cap if cap else 0.0,
            "window": self._window_size,
            "probation": self._probation_size,
            "protected": self._protected_size,
            "adjustments": self.adjustments,
            "sketch_width": self.sketch.width,
        }


register_policy(CachePolicy.ADAPTIVE, AdaptivePolicy)
