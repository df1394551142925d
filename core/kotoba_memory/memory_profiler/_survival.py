"""Retention evidence: do objects a site allocated in one window survive to later windows?

A window only sees what was allocated inside it, so a cache that churns at capacity (its old entries
freed between windows) grows in every window exactly like a leak. What separates them is survival: the
entries a leak allocated are all still alive minutes later, a churning cache's are gone. At the end of
a window, while tracemalloc still traces, a census finds live objects allocated at tracked sites
(``gc.get_objects()`` and their direct referents, whose allocation traceback tracemalloc knows) and
keeps a bounded sample of them — a weak reference when the type allows one, else the object's id, type
and a content fingerprint, never a strong reference. Later censuses check which samples are still alive.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from itertools import compress
from types import ModuleType
from typing import Any

Frame = tuple[str, int]
Key = tuple[Frame, ...]

_HASHABLE_BY_CONTENT = (bytes, str, int, float, complex, frozenset, tuple)


def _object_traceback_reader() -> Callable[[object], Key | None]:
    """tracemalloc's raw per-object traceback (innermost frame first, like its raw traces)."""
    reader = getattr(tracemalloc, "_get_object_traceback", None)
    if reader is not None:
        return reader

    def fallback(obj: object) -> Key | None:
        tb = tracemalloc.get_object_traceback(obj)
        return None if tb is None else tuple((f.filename, f.lineno) for f in reversed(tb))

    return fallback


def _referents(objects: list[Any]) -> list[Any]:
    """What ``objects`` refer to, modules left out (their dicts are listed by ``gc.get_objects()``).

    On CPython 3.12.1 traversing the ``_asyncio`` module visits its free-listed future iterators and
    revives them, corrupting the free list: the next traversal never ends (GBs of referents) and the
    interpreter hangs at exit. ``type()``, not ``isinstance()``: that reads ``__class__``, which a lazy
    proxy (Django's ``settings``) answers by setting itself up.
    """
    return gc.get_referents(*[obj for obj in objects if not issubclass(type(obj), ModuleType)])


def _fingerprint(obj: Any) -> int:
    """A cheap content digest telling an object from a newcomer that reused its address."""
    if isinstance(obj, _HASHABLE_BY_CONTENT):
        try:
            return hash(obj)
        except TypeError:  # a tuple holding something unhashable
            return len(obj) if isinstance(obj, tuple) else 0
    # Mutable containers: the identities of their first referents (a replacement entry holds new ones).
    return hash(tuple(id(r) for r in gc.get_referents(obj)[:4]))


@dataclass(slots=True)
class _Sample:
    """One sampled object: how to recognise it later, when it was taken and last seen."""

    taken_at: float
    ident: int
    kind: type
    fingerprint: int
    ref: weakref.ref[Any] | None
    last_seen: float
    alive: bool = True


@dataclass(frozen=True, slots=True)
class Retention:
    """Of ``eligible`` samples observed for at least ``min_age_s``, ``alive`` were still alive."""

    alive: int
    eligible: int
    min_age_s: float

    @property
    def fraction(self) -> float:
        """Share of eligible samples still alive."""
        return self.alive / self.eligible if self.eligible else 0.0


class SurvivalSampler:
    """Bounded samples of live objects per allocation traceback, re-checked at every census."""

    def __init__(self, *, per_site: int = 16, new_per_census: int = 4) -> None:
        self.per_site = per_site
        self.new_per_census = new_per_census
        self._samples: dict[Key, list[_Sample]] = {}
        self._read = _object_traceback_reader()
        self.censuses = 0
        self._last_check = 0.0
        # per traceback: censuses that looked for its objects and found none alive (reset when found)
        self._misses: dict[Key, int] = {}

    @property
    def sampled(self) -> int:
        """Number of samples held."""
        return sum(len(v) for v in self._samples.values())

    def footprint_bytes(self) -> int:
        """Rough bytes held by the samples (bounded by sites x per_site)."""
        return 200 * self.sampled + 100 * len(self._samples)

    def forget(self, keep: Collection[Key]) -> None:
        """Drop the samples of tracebacks no longer tracked."""
        for key in [k for k in self._samples if k not in keep]:
            del self._samples[key]
        for key in [k for k in self._misses if k not in keep]:
            del self._misses[key]

    def misses(self, key: Key) -> int:
        """Censuses in a row that found no live object allocated at ``key`` in their window (0 once any
        was found): memory tracemalloc still counts there belongs to no live object, e.g. objects
        parked on CPython's freelists after being freed."""
        return 0 if key in self._samples else self._misses.get(key, 0)

    def census(self, interest: Collection[Key], now: float) -> None:
        """Take new samples at ``interest`` sites; only while tracemalloc traces (it knows where objects
        were allocated). Allocates nothing per object scanned: every allocation is traced, and slow."""
        if not tracemalloc.is_tracing() or not interest:
            return
        self.censuses += 1
        objects = gc.get_objects()
        self._take((objects, _referents(objects)), frozenset(interest), now)

    def check(self, now: float) -> None:
        """Which samples are still alive; after tracing stopped (matching by id allocates an int each)."""
        if not any(self._samples.values()):
            return
        objects = gc.get_objects()
        self._check((objects, _referents(objects)), now)
        self._last_check = now

    def _check(self, pool: Iterable[list[Any]], now: float) -> None:
        wanted: dict[int, _Sample] = {}
        for samples in self._samples.values():
            for sample in samples:
                if not sample.alive:
                    continue
                if sample.ref is not None:
                    if sample.ref() is None:
                        sample.alive = False
                    else:
                        sample.last_seen = now
                else:
                    wanted[sample.ident] = sample
        if not wanted:
            return
        found: dict[int, bool] = {}
        for seq in pool:
            # All in C (list() does not let the GIL go between items): the objects whose id we sampled.
            for obj in list(compress(seq, map(wanted.__contains__, map(id, seq)))):
                sample = wanted[id(obj)]
                if found.get(id(obj)):
                    continue
                # A newcomer at a reused address has another type or other contents.
                found[id(obj)] = type(obj) is sample.kind and _fingerprint(obj) == sample.fingerprint
        for ident, sample in wanted.items():
            if found.get(ident):
                sample.last_seen = now
            else:
                sample.alive = False

    def _take(self, pool: Iterable[list[Any]], interest: frozenset[Key], now: float) -> None:
        added: dict[Key, int] = {}
        for wanted in interest:
            if wanted not in self._samples:
                self._misses[wanted] = self._misses.get(wanted, 0) + 1
        held = {s.ident for samples in self._samples.values() for s in samples if s.alive}
        for seq in pool:
            for obj in list(compress(seq, map(interest.__contains__, map(self._read, seq)))):
                key = self._read(obj)
                if key is None or id(obj) in held or added.get(key, 0) >= self.new_per_census:
                    continue
                held.add(id(obj))
                added[key] = added.get(key, 0) + 1
                kind = type(obj)
                ref = weakref.ref(obj) if kind.__weakrefoffset__ else None
                sample = _Sample(now, id(obj), kind, 0 if ref is not None else _fingerprint(obj), ref, now)
                self._misses.pop(key, None)
                samples = self._samples.setdefault(key, [])
                samples.append(sample)
                if len(samples) > self.per_site:
                    # Keep the oldest (most telling) and the newest; drop a middle-aged one.
                    del samples[len(samples) // 2]

    def retention(self, key: Key, min_age_s: float) -> Retention | None:
        """Survival of ``key``'s samples: every dead one, and the live ones seen alive for at least
        ``min_age_s`` and half the oldest sample's age (young samples prove nothing); None under 3."""
        samples = self._samples.get(key)
        if not samples:
            return None
        oldest = self._last_check - min(s.taken_at for s in samples)
        threshold = max(min_age_s, oldest / 2.0)
        dead = sum(1 for s in samples if not s.alive)
        alive = sum(1 for s in samples if s.alive and s.last_seen - s.taken_at >= threshold)
        if dead + alive < 3:
            return None
        return Retention(alive, dead + alive, threshold)
