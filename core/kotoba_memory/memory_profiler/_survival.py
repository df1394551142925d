"""Retention evidence: do objects a site allocated in one window survive to later windows?

A window only sees what was allocated inside it, so a cache that churns at capacity (its old entries
freed between windows) grows in every window exactly like a leak. What separates them is survival: the
entries a leak allocated are all still alive minutes later, a churning cache's are gone. At the end of
a window, while tracemalloc still traces, a census finds live objects allocated at tracked sites
(``gc.get_objects()`` less tuples, their referents and the contents of untracked containers among those, whose
allocation traceback tracemalloc knows) and
keeps a bounded sample of them. Later censuses check which samples are still alive:

- a weak reference when the type allows one;
- a small object that cannot refer to others (a str, bytes, bytearray, number, ``Decimal``, date or
  time value, or a tuple of those) is held
  and alive while anyone else still refers to it (its reference count): exact, and it cannot be part of
  a cycle we would keep alive; the bytes held this way are capped (``max_held_bytes``);
- anything else by id, type and a content fingerprint, looked up in the heap again (a newcomer at a
  reused address has other contents). An object with nothing to fingerprint (no referents) is
  *opaque*: its death counts, its survival does not (``lru_cache`` recycles its links in place, so a
  link lives on while what it held is replaced).

The heap scans only see what the collector lists: ``gc.freeze()`` hides the frozen objects, so the
caller thaws the heap first when the one who froze it freezes it again (see the profiler).
"""

from __future__ import annotations

import datetime
import decimal
import gc
import sys
import tracemalloc
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, compress, filterfalse, islice, repeat
from operator import indexOf, is_, is_not
from types import ModuleType
from typing import Any

Frame = tuple[str, int]
Key = tuple[Frame, ...]

# Immutable values that refer to nothing: held like atoms, else known by their hash (else they would be
# opaque, and a leak of them would get no retention from its samples).
_VALUES = (decimal.Decimal, datetime.date, datetime.datetime, datetime.time, datetime.timedelta)
_HASHABLE_BY_CONTENT = (bytes, str, int, float, complex, frozenset, tuple, *_VALUES)
_ATOMS = frozenset((str, bytes, bytearray, int, float, complex, *_VALUES))
_MAX_HELD_OBJECT = 4096  # bytes (with its referents) of one object held for its reference count
_TUPLE_DEPTH = 4  # levels of referents opened below the collector's list (tuples within tuples)


def _object_traceback_reader() -> Callable[[object], Key | None]:
    """tracemalloc's raw per-object traceback (innermost frame first, like its raw traces)."""
    reader = getattr(tracemalloc, "_get_object_traceback", None)
    if reader is not None:
        return reader

    def fallback(obj: object) -> Key | None:
        tb = tracemalloc.get_object_traceback(obj)
        return None if tb is None else tuple((f.filename, f.lineno) for f in reversed(tb))

    return fallback


def _referents(objects: Sequence[Any]) -> list[Any]:
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
        except Exception:  # a tuple holding something unhashable; a tzinfo whose utcoffset() fails
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
    held: Any = None  # the object itself, for small atoms checked by reference count
    held_bytes: int = 0
    died_at: float = 0.0  # when a check first found it gone
    opaque: bool = False  # known by id and type alone: its death is evidence, its survival is not


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


def _died_young(sample: _Sample, since: float | None) -> bool:
    """Dead, and (with ``since``) younger than its site was when it was born (see ``retention``)."""
    if sample.alive:
        return False
    return since is None or sample.died_at - sample.taken_at < sample.taken_at - since


Found = list[tuple[Key | None, Any]]  # (allocation traceback, live object) pairs a census scan found


def _listed_objects() -> list[Any]:
    """``gc.get_objects()`` without exact tuples, the list taken and filtered inside one C-level call.

    Another thread may be in the middle of ``tuple(iterable)``: that tuple is already listed by the
    collector, and CPython resizes it at the end only if nobody else refers to it (else SystemError
    "bad argument to internal function" in the host's thread). Holding the collector's list while
    any bytecode runs (where the GIL can pass to that thread) is therefore unsafe, so that list never
    reaches Python code: an iterator pipeline made only of C callables takes it, drops exact tuples
    (a tuple still alive later is found again as a referent of whatever holds it) and frees it
    before ``extend()`` returns. Before 3.12 a collection can run finalizers (Python code) inside an
    allocation, so the collector is paused for that one call.
    """
    listed: list[Any] = []
    twice = chain.from_iterable(map(repeat, islice(iter(gc.get_objects, None), 1), repeat(2)))
    keep = map(map, repeat(is_not), map(map, repeat(type), twice), repeat(repeat(tuple)))
    paused = sys.version_info < (3, 12) and gc.isenabled()
    if paused:
        gc.disable()
    try:
        list.extend(listed, chain.from_iterable(map(compress, twice, keep)))
    finally:
        if paused:
            gc.enable()
    # ``listed`` existed when the collector listed everything: out of itself, or it would hold itself
    # (and so the whole heap) in a cycle. Found by id: comparing objects could run their ``__eq__``.
    del listed[indexOf(map(id, listed), id(listed))]
    return listed


def _heap() -> Generator[Sequence[Any], None, None]:
    """What the collector lists, their referents, and what untracked containers and tuples among those hold.

    Untracked containers (a dict or tuple of atoms: a cache's inner dict of ints to bytes) are not
    listed themselves, so their contents are one level further down. Tuples are left out of the first
    level (see ``_listed_objects``): found as referents, they are opened a level further down too, or
    what they hold (a session store's ``(expiry, data)`` values) would never be seen; tuples within
    tuples a level further each, up to ``_TUPLE_DEPTH``. Built in C, a level at a time.
    """
    objects = _listed_objects()
    yield objects
    level = _referents(objects)
    del objects
    for _ in range(_TUPLE_DEPTH):
        yield level
        opened = list(chain(filterfalse(gc.is_tracked, level), _tuples(level)))
        del level
        if not opened:
            return
        level = gc.get_referents(*opened)
        del opened
    yield level


def _tuples(objects: Sequence[Any]) -> Iterator[Any]:
    """The tracked exact tuples among ``objects`` (untracked ones are opened as untracked containers)."""
    tuples = compress(objects, map(is_, map(type, objects), repeat(tuple)))
    return filter(gc.is_tracked, tuples)


def _opaque(obj: Any) -> bool:
    """Whether a later check would know ``obj`` by id and type alone: no weak reference, no content hash,
    no referents to fingerprint. Such an object may be recycled in place with new contents
    (``functools.lru_cache``'s links are), so that it is still there proves nothing."""
    if type(obj).__weakrefoffset__ or isinstance(obj, _HASHABLE_BY_CONTENT):
        return False
    return not gc.get_referents(obj)


def _holdable(obj: Any) -> int:
    """Bytes held by keeping ``obj`` for its reference count; 0 when it is not held that way: only
    exact atoms (numbers, strings, ``Decimal``, date and time values; a ``bytearray`` too: it refers to
    nothing, and its contents may change) and flat tuples of them (never a container that could join a
    cycle), up to 4 KiB."""
    kind = type(obj)
    if kind is tuple:
        if gc.is_tracked(obj) or any(type(item) is tuple for item in obj):
            return 0  # flat only: check() discounts what our held tuples refer to one level down
        size = sys.getsizeof(obj) + sum(map(sys.getsizeof, obj))
    elif kind in _ATOMS and not gc.is_tracked(obj):  # tracked: a pure-Python build's value with slots
        size = sys.getsizeof(obj)
    else:
        return 0
    return size if size <= _MAX_HELD_OBJECT else 0


def _held_alive(held: Sequence[_Sample]) -> set[int]:
    """Ids of the held samples someone other than us still refers to, directly or through a held tuple
    that is itself alive. A tuple we hold keeps its items alive: a cache's key ``(url, str)`` held as
    one site's sample kept the url, another site's sample, "alive" until the next check (minutes at
    production spacing), long after the cache had let both go."""
    by_id = {id(s.held): s.held for s in held}
    dead = object()  # referred to here as a sample's object is by its ``held``: the count of a dead one
    by_id[id(dead)] = dead
    counts = {ident: sys.getrefcount(obj) for ident, obj in by_id.items()}
    baseline = counts.pop(id(dead))
    del by_id[id(dead)], dead
    ours = Counter(  # references from the held tuples to other held objects
        id(item) for obj in by_id.values() if type(obj) is tuple for item in obj if id(item) in by_id
    )
    alive = {ident for ident, count in counts.items() if count - ours[ident] > baseline}
    # What a live tuple refers to is alive through it (held tuples are flat: one level is all there is).
    through = (by_id[ident] for ident in alive if type(by_id[ident]) is tuple)
    return alive | {id(item) for obj in through for item in obj if id(item) in by_id}


class SurvivalSampler:
    """Bounded samples of live objects per allocation traceback, re-checked at every census.

    One thread takes censuses and checks; others may read :meth:`retention` meanwhile. Only
    :meth:`add` and :meth:`forget` change which samples exist (callers hold their lock around them);
    :meth:`scan` and :meth:`check` only read them or flip a sample's state.
    """

    def __init__(
        self, *, per_site: int = 16, new_per_census: int = 4, max_held_bytes: int = 256 * 1024
    ) -> None:
        self.per_site = per_site
        self.new_per_census = new_per_census
        self.max_held_bytes = max_held_bytes
        self.held_bytes = 0
        self._samples: dict[Key, list[_Sample]] = {}
        self._read = _object_traceback_reader()
        self.censuses = 0
        #: Bumped whenever the evidence changes (a census, a check, a forget): readers can reuse a verdict.
        self.changes = 0
        self._last_check = 0.0
        # per traceback: censuses that looked for its objects and found none alive (reset when found);
        # every census counts, not only growth windows' (those are the detector's _Track.dry)
        self._misses: dict[Key, int] = {}

    @property
    def sampled(self) -> int:
        """Number of samples held."""
        return sum(len(v) for v in list(self._samples.values()))

    def footprint_bytes(self) -> int:
        """Rough bytes held by the samples (bounded by sites x per_site, plus the objects held)."""
        return 200 * self.sampled + 100 * len(self._samples) + self.held_bytes

    def forget(self, keep: Collection[Key]) -> None:
        """Drop the samples of tracebacks no longer tracked."""
        self.changes += 1
        for key in [k for k in self._samples if k not in keep]:
            for sample in self._samples.pop(key):
                self._release(sample)
        for key in [k for k in self._misses if k not in keep]:
            del self._misses[key]

    def misses(self, key: Key) -> int:
        """Censuses in a row that found no live object allocated at ``key`` in their window (0 once any
        was found): memory tracemalloc still counts there belongs to no live object, e.g. objects
        parked on CPython's freelists after being freed."""
        return 0 if self._vouched(key) else self._misses.get(key, 0)

    def _vouched(self, key: Key) -> bool:
        """Whether ``key`` has a sample whose survival would count (one that is not opaque)."""
        return any(not s.opaque for s in self._samples.get(key, ()))

    def census(self, interest: Collection[Key], now: float, since: Mapping[Key, float] | None = None) -> None:
        """:meth:`scan` then :meth:`add` (for a caller with no readers on other threads)."""
        found = self.scan(interest)
        if found is not None:
            self.add(found, interest, now, since)

    def scan(self, interest: Collection[Key]) -> Found | None:
        """Live objects allocated at ``interest`` sites (None unless tracemalloc traces: it knows where
        objects were allocated). Changes nothing; allocates little per object scanned (each allocation
        is traced, and slow)."""
        if not tracemalloc.is_tracing() or not interest:
            return None
        wanted = set(interest)  # a site leaves it once it has enough objects: later levels skip them
        read = self._read
        found: Found = []
        # Per site, enough objects for choose() to find new_per_census not sampled yet (at most per_site
        # of its samples are alive); a burst's tens of thousands of live objects are not all kept.
        room: dict[Key | None, int] = dict.fromkeys(wanted, self.per_site + self.new_per_census)
        heap = _heap()
        try:
            for seq in heap:
                # All in C (list() does not let the GIL go between items): the objects allocated there.
                hits = list(compress(seq, map(wanted.__contains__, map(read, seq))))
                for obj in hits:
                    key = read(obj)
                    left = room.get(key, 0)
                    if left:
                        room[key] = left - 1
                        found.append((key, obj))
                    elif key in wanted:
                        wanted.discard(key)
                del hits
                if not wanted:
                    break
        finally:
            # Left early, the generator would keep its level of the heap alive: the collector's list
            # holds the generator itself, a cycle only a collection would free (samples read "alive").
            heap.close()
        return found

    def choose(self, found: Found) -> Found:
        """Up to ``new_per_census`` objects per site from a :meth:`scan` that are not sampled yet
        (changes nothing: the caller can do it outside its lock and hold it only for :meth:`add`)."""
        held = {s.ident for samples in list(self._samples.values()) for s in samples if s.alive}
        chosen: Found = []
        added: dict[Key, int] = {}
        for key, obj in found:
            if key is None or id(obj) in held or added.get(key, 0) >= self.new_per_census:
                continue
            held.add(id(obj))
            added[key] = added.get(key, 0) + 1
            chosen.append((key, obj))
        return chosen

    def add(
        self, found: Found, interest: Collection[Key], now: float, since: Mapping[Key, float] | None = None
    ) -> None:
        """Take up to ``new_per_census`` new samples per site from a :meth:`scan` (or its :meth:`choose`);
        ``since``: when each site started growing (see :meth:`retention`)."""
        self.censuses += 1
        self.changes += 1
        for wanted in interest:
            if not self._vouched(wanted):
                self._misses[wanted] = self._misses.get(wanted, 0) + 1
        for key, obj in self.choose(found):
            assert key is not None  # choose() drops objects without a traceback
            self._misses.pop(key, None)
            samples = self._samples.setdefault(key, [])
            samples.append(self._sample(obj, now))
            if len(samples) > self.per_site:
                # First a death that does not count (see retention(): it died older than its site was
                # at its birth, e.g. an entry taken while the cache was still filling): it says nothing.
                # Else keep the oldest (most telling) and the newest, and drop a middle-aged one.
                start = None if since is None else since.get(key)
                idle = next(
                    (i for i, x in enumerate(samples) if not x.alive and not _died_young(x, start)), None
                )
                self._release(samples.pop(len(samples) // 2 if idle is None else idle))

    def _sample(self, obj: Any, now: float) -> _Sample:
        kind = type(obj)
        if kind.__weakrefoffset__:
            return _Sample(now, id(obj), kind, 0, weakref.ref(obj), now)
        size = _holdable(obj)
        if size and self.held_bytes + size <= self.max_held_bytes:
            self.held_bytes += size
            return _Sample(now, id(obj), kind, 0, None, now, held=obj, held_bytes=size)
        return _Sample(now, id(obj), kind, _fingerprint(obj), None, now, opaque=_opaque(obj))

    def _release(self, sample: _Sample) -> None:
        if sample.held is not None:
            sample.held = None
            self.held_bytes -= sample.held_bytes

    def check(self, now: float) -> None:
        """Which samples are still alive; after tracing stopped (matching by id allocates an int each)."""
        self.changes += 1
        wanted: dict[int, _Sample] = {}
        held: list[_Sample] = []
        for samples in list(self._samples.values()):
            for sample in samples:
                if not sample.alive:
                    continue
                if sample.ref is not None:
                    if sample.ref() is None:
                        sample.alive, sample.died_at = False, now
                    else:
                        sample.last_seen = now
                elif sample.held is not None:
                    held.append(sample)
                else:
                    wanted[sample.ident] = sample
        alive = _held_alive(held)
        for sample in held:
            if id(sample.held) in alive:
                sample.last_seen = now
            else:  # held by us alone: nobody else refers to it any more, so it would have been freed
                sample.alive, sample.died_at = False, now
                self._release(sample)
        self._last_check = now
        if not wanted:
            return
        self._find(wanted, _heap(), now)

    @staticmethod
    def _find(wanted: dict[int, _Sample], pool: Iterable[Sequence[Any]], now: float) -> None:
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
                sample.alive, sample.died_at = False, now

    def unrefuted(self, key: Key, min_age_s: float, since: float | None = None) -> bool:
        """A sample alive for ``min_age_s`` and none dead (as :meth:`retention` counts the dead): weaker
        than a retention verdict, enough to lift the doubt on tiny or intermittent growth."""
        samples = self._samples.get(key) or []
        if any(_died_young(s, since) for s in samples):
            return False
        return any(s.alive and not s.opaque and s.last_seen - s.taken_at >= min_age_s for s in samples)

    def retention(self, key: Key, min_age_s: float, since: float | None = None) -> Retention | None:
        """Survival of ``key``'s samples: the dead ones, and the live ones seen alive for at least
        ``min_age_s`` and half the oldest sample's age (young samples prove nothing); None under 3.

        With ``since`` (when the site started growing), a death counts only when the object died
        younger than the site was at its birth: a bounded cache replaces its entries at a steady age,
        while a queue that falls behind drops ever older ones and grows all the same.
        """
        # Deaths at an old age are left out altogether (also from the age the live ones must reach).
        samples = [
            s for s in self._samples.get(key) or () if (s.alive and not s.opaque) or _died_young(s, since)
        ]
        if not samples:
            return None
        oldest = self._last_check - min(s.taken_at for s in samples)
        threshold = max(min_age_s, oldest / 2.0)
        dead = sum(1 for s in samples if not s.alive)
        alive = sum(1 for s in samples if s.alive and s.last_seen - s.taken_at >= threshold)
        if dead + alive < 3:
            return None
        return Retention(alive, dead + alive, threshold)
