"""Survival census on real objects: what a site keeps is seen alive later, what it churns is not."""

from __future__ import annotations

import datetime
import functools
import gc
import tracemalloc
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest

from kotoba_memory.memory_profiler._survival import Key, SurvivalSampler


class Entry:
    """A weak-referenceable cache entry (slots: CPython 3.11's tracemalloc cannot find the allocation of
    an instance with a managed ``__dict__``)."""

    __slots__ = ("__weakref__", "n")

    def __init__(self, n: int) -> None:
        self.n = n


def make_bytes(n: int) -> bytes:
    return bytes([n % 251]) * 200 + n.to_bytes(4, "little")  # the allocation the census samples


def make_entry(n: int) -> Entry:
    return Entry(n)  # the allocation the census samples


@pytest.fixture
def tracing(small_heap: None) -> Iterator[Callable[[SurvivalSampler, float], None]]:
    """Start tracing; the fixture value ends a window (survival check with tracing off) and opens the next."""
    def restart(sampler: SurvivalSampler, now: float) -> None:
        tracemalloc.stop()
        sampler.check(now)
        tracemalloc.start(1)

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start(1)
    yield restart
    if not was_tracing:
        tracemalloc.stop()


def key_of(obj: object) -> Key:
    tb = tracemalloc.get_object_traceback(obj)
    assert tb is not None
    return tuple((f.filename, f.lineno) for f in reversed(tb))


def make_churn_bytes(n: int) -> object:
    return bytes([n % 251]) * 200 + n.to_bytes(4, "little")  # churn site: a different line


def make_churn_entry(n: int) -> object:
    return Entry(n)  # churn site: a different line


@pytest.mark.parametrize(
    ("make_leak", "make_churn"), [(make_entry, make_churn_bytes), (make_bytes, make_churn_entry)]
)
def test_a_leak_is_fully_retained_and_a_churning_cache_is_not(
    tracing: Callable[[SurvivalSampler, float], None],
    make_leak: Callable[[int], object],
    make_churn: Callable[[int], object],
) -> None:
    kept: list[object] = []
    cache: deque[object] = deque(maxlen=30)  # bounded: replaces its contents every window
    sampler = SurvivalSampler(per_site=16, new_per_census=4)
    now = 0.0
    leak_key = churn_key = None
    for window in range(6):
        for i in range(5):
            kept.append(make_leak(window * 100 + i))
        for i in range(60):
            cache.append(make_churn(window * 100 + i))
        leak_key, churn_key = key_of(kept[-1]), key_of(cache[-1])
        sampler.census([leak_key, churn_key], now)
        now += 10.0
        tracing(sampler, now)
    assert leak_key is not None and churn_key is not None
    leak = sampler.retention(leak_key, 5.0)
    churn = sampler.retention(churn_key, 5.0)
    assert leak is not None and leak.fraction == 1.0
    assert churn is not None and churn.alive == 0 and churn.eligible >= 3
    assert sampler.sampled <= 2 * 16


def test_census_does_nothing_without_tracing() -> None:
    if tracemalloc.is_tracing():
        pytest.skip("someone else keeps tracemalloc on")
    sampler = SurvivalSampler()
    sampler.census([(("x.py", 1),)], 0.0)
    assert sampler.censuses == 0 and sampler.sampled == 0


def test_a_site_whose_objects_are_never_found_alive_counts_misses(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    sampler = SurvivalSampler()
    kept: list[object] = []
    now = 0.0
    for _ in range(3):
        temporary = make_churn_bytes(7)
        gone_key = key_of(temporary)
        del temporary  # freed before the census: nothing of it is alive
        kept.append(make_leak_bytes(len(kept)))
        leak_key = key_of(kept[-1])
        sampler.census([gone_key, leak_key], now)
        now += 10.0
        tracing(sampler, now)
    assert sampler.misses(gone_key) == 3
    assert sampler.misses(leak_key) == 0


def make_leak_bytes(n: int) -> bytes:
    return bytes([n % 251]) * 300  # a site whose objects stay alive


def make_atom(n: int) -> bytes:
    return bytes(300)  # identical contents every time: an address reused by the next one looks the same


def test_identical_atoms_reusing_a_freed_address_are_not_taken_for_survivors(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    """Atoms are held and judged by their reference count, so a new ``bytes(300)`` at a dead sample's
    address (pymalloc hands it straight back) is not mistaken for the sample."""
    cache: deque[object] = deque(maxlen=20)
    kept: list[object] = []
    sampler = SurvivalSampler(per_site=16, new_per_census=4)
    now = 0.0
    churn_key = leak_key = None
    for window in range(6):
        for i in range(50):
            cache.append(make_atom(i))
        kept.append(make_leak_bytes(window))
        churn_key, leak_key = key_of(cache[-1]), key_of(kept[-1])
        sampler.census([churn_key, leak_key], now)
        now += 10.0
        tracing(sampler, now)
    assert churn_key is not None and leak_key is not None
    churn = sampler.retention(churn_key, 5.0)
    leak = sampler.retention(leak_key, 5.0)
    assert churn is not None and churn.alive == 0 and churn.eligible >= 3
    assert leak is not None and leak.fraction == 1.0
    # what it holds is bounded and let go of once dead
    assert 0 < sampler.held_bytes <= sampler.max_held_bytes
    live_held = sum(s.held_bytes for samples in sampler._samples.values() for s in samples if s.alive)
    assert sampler.held_bytes == live_held


def test_held_bytes_stay_under_the_cap(tracing: Callable[[SurvivalSampler, float], None]) -> None:
    kept: list[object] = []
    sampler = SurvivalSampler(per_site=16, new_per_census=4, max_held_bytes=1000)
    for window in range(4):
        kept.extend(make_leak_bytes(window * 10 + i) for i in range(8))
        sampler.census([key_of(kept[-1])], float(window))
        tracing(sampler, float(window) + 0.5)
    assert sampler.held_bytes <= 1000
    assert sampler.sampled > 3  # past the cap it samples by id and fingerprint instead


class Store:
    """Keeps its entries in a dict of ints to bytes: such a dict is untracked by the collector."""

    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}


def test_contents_of_untracked_containers_are_found(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    store = Store()
    sampler = SurvivalSampler()
    key = None
    for window in range(4):
        for i in range(5):
            store.data[window * 10 + i] = make_leak_bytes(window * 10 + i)
        assert not gc.is_tracked(store.data)
        key = key_of(store.data[window * 10])
        sampler.census([key], float(window) * 10)
        tracing(sampler, float(window) * 10 + 5)
    assert key is not None and sampler.misses(key) == 0
    retention = sampler.retention(key, 5.0)
    assert retention is not None and retention.fraction == 1.0


def make_job(n: int) -> Entry:
    return Entry(n)  # a job queued; the consumer falls behind


def test_a_queue_falling_behind_is_retention_though_its_oldest_entries_die(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    """Three jobs in, one out per step: every job is dropped in the end, but ever older ones — the queue
    grows for good. A death counts against retention only when the object died younger than its site
    was at its birth (how a bounded cache replaces entries)."""
    jobs: deque[Entry] = deque()
    sampler = SurvivalSampler(per_site=16, new_per_census=2)
    now, key = 10.0, None
    for window in range(12):
        for i in range(30):
            jobs.append(make_job(window * 100 + i))
        for _ in range(10):
            jobs.popleft()
        key = key_of(jobs[-1])
        sampler.census([key], now)
        now += 10.0
        tracing(sampler, now)
    assert key is not None
    growing = sampler.retention(key, 5.0, since=0.0)
    assert growing is not None and growing.fraction >= 0.9


def test_a_long_churn_stays_churn_after_many_censuses(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    """Far more censuses than samples kept per site: the samples kept must still show the churn (the
    oldest deaths, which do not count once the site is older, make way for newer ones)."""
    cache: deque[object] = deque(maxlen=30)
    sampler = SurvivalSampler(per_site=16, new_per_census=4)
    now, key = 0.0, None
    for window in range(30):
        for i in range(60):
            cache.append(make_churn_entry(window * 100 + i))
        key = key_of(cache[-1])
        sampler.census([key], now, since={key: 0.0})
        now += 10.0
        tracing(sampler, now)
    assert key is not None
    churn = sampler.retention(key, 5.0, since=0.0)
    assert churn is not None and churn.alive == 0 and churn.eligible >= 3, churn


def test_a_slow_churn_stays_churn_after_many_censuses(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    """Turnover of several census intervals (an lru_cache at capacity): the deaths that count are
    kept, so the newest samples, still alive, cannot outvote them."""
    cache: deque[object] = deque(maxlen=100)
    sampler = SurvivalSampler(per_site=16, new_per_census=4)
    now, key = 0.0, None
    for window in range(40):
        for i in range(30):
            cache.append(make_churn_entry(window * 100 + i))
        key = key_of(cache[-1])
        sampler.census([key], now, since={key: 0.0})
        now += 10.0
        tracing(sampler, now)
    assert key is not None
    churn = sampler.retention(key, 5.0, since=0.0)
    assert churn is not None and churn.fraction < 0.5, churn


def store(cache: OrderedDict[int, bytes], n: int) -> None:
    cache[n] = make_leak_bytes(n)  # the OrderedDict's own nodes and table are allocated at this line


def test_a_structures_own_memory_is_never_found_alive_but_what_it_holds_is(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    """A bounded OrderedDict cache: its nodes and table grow at the line that inserts, yet no census finds
    a live object allocated there (they are not objects), while the values it holds are found."""
    cache: OrderedDict[int, bytes] = OrderedDict()
    sampler = SurvivalSampler()
    now, node_key, value_key = 0.0, None, None
    for window in range(4):
        for i in range(100):
            store(cache, window * 1000 + i)
            while len(cache) > 50:
                cache.popitem(last=False)
        value_key = key_of(next(reversed(cache.values())))
        line = store.__code__.co_firstlineno + 1
        node_key = next(
            key for key in (tuple((f.filename, f.lineno) for f in reversed(stat.traceback))
                            for stat in tracemalloc.take_snapshot().statistics("traceback"))
            if key[0] == (__file__, line)
        )
        sampler.census([node_key, value_key], now)
        now += 10.0
        tracing(sampler, now)
    assert node_key is not None and value_key is not None
    assert sampler.misses(node_key) >= 3
    assert sampler.misses(value_key) == 0 and sampler.retention(value_key, 5.0) is not None


def make_session(n: int) -> tuple[float, dict[str, str]]:
    return (float(n), {"user": f"user {n}" * 4})  # the session's data (an untracked dict of strs) and name


def test_what_tuples_hold_is_found_though_tuples_are_left_out_of_the_first_level(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    """A session store's values are (expiry, data) tuples and the data an untracked dict: the census
    opens the tuples it finds as referents, so a session that expired is seen dead, one kept alive."""
    sessions: dict[int, tuple[float, dict[str, str]]] = {}
    nested: dict[int, tuple[tuple[float, dict[str, str]], int]] = {}
    sampler = SurvivalSampler(per_site=16, new_per_census=4)
    now: float = 0.0
    key: Key | None = None
    for window in range(6):
        for i in range(40):
            n = window * 100 + i
            sessions[n] = make_session(n)
            nested[n] = (make_session(n), n)
        for old in [n for n in sessions if n < (window - 1) * 100]:
            del sessions[old]
            del nested[old]
        key = key or key_of(sessions[0][1]["user"])
        found = sampler.scan([key])
        assert found, "nothing allocated at the session line was found inside the tuples"
        sampler.add(found, [key], now, {key: -100.0})  # the site is older than its entries live
        now += 10.0
        tracing(sampler, now)
    assert key is not None
    churn = sampler.retention(key, 5.0, since=-100.0)
    assert churn is not None and churn.fraction < 0.5, churn


def test_a_census_keeps_only_enough_objects_per_site_to_sample(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    burst = [make_entry(n) for n in range(2000)]  # a burst's thousands of live objects at one site
    kept = [make_bytes(n) for n in range(3)]
    sampler = SurvivalSampler(per_site=16, new_per_census=4)
    found = sampler.scan([key_of(burst[0]), key_of(kept[0])])
    assert found is not None
    per_key: dict[Key | None, int] = {}
    for key, _obj in found:
        per_key[key] = per_key.get(key, 0) + 1
    assert per_key == {key_of(burst[0]): 16 + 4, key_of(kept[0]): 3}
    sampler.add(found, [key_of(burst[0]), key_of(kept[0])], 0.0)
    assert sampler.sampled == 4 + 3


@pytest.mark.parametrize("urls_first", [True, False])
def test_a_held_tuple_does_not_keep_another_sites_held_sample_alive(urls_first: bool) -> None:
    """A cache keyed by ``(url, str)`` (``functools.lru_cache(typed=True)``, as ``urllib.parse.urlsplit``
    is): the key tuple is one site's sample, the url inside it another's. Once the cache lets both go,
    both are dead at the next check; our own hold on the tuple must not keep the url "alive"."""
    sampler = SurvivalSampler(per_site=16, new_per_census=4)
    url_key: Key = (("/srv/gunicorn/util.py", 699),)
    tuple_key: Key = (("/srv/functools.py", 1),)
    cache: dict[tuple[str, type], str] = {}
    urls = ["/products/" + str(1000 + i) for i in range(4)]
    keys = [(url, str) for url in urls]
    for key, url in zip(keys, urls, strict=True):
        cache[key] = url
    gc.collect()  # the collector untracks tuples of atoms: the census finds them through the cache
    assert all(not gc.is_tracked(key) for key in keys)
    # Checked in the order the census found them: the url before the tuple was the order that failed.
    by_url, by_tuple = [(url_key, url) for url in urls], [(tuple_key, key) for key in keys]
    sampler.add(by_url + by_tuple if urls_first else by_tuple + by_url, [url_key, tuple_key], 0.0)
    assert all(s.held is not None for samples in sampler._samples.values() for s in samples)
    sampler.check(10.0)  # still in the cache: alive
    assert sampler.retention(url_key, 5.0) is None or sampler.retention(url_key, 5.0).alive == 4
    assert all(s.alive for samples in sampler._samples.values() for s in samples)
    cache.clear()
    del keys, urls, key, url, by_url, by_tuple
    sampler.check(20.0)
    assert not any(s.alive for samples in sampler._samples.values() for s in samples)
    assert sampler.held_bytes == 0


def test_what_a_live_held_tuple_refers_to_is_alive_through_it() -> None:
    sampler = SurvivalSampler(per_site=16, new_per_census=4)
    url_key: Key = (("/srv/app/urls.py", 3),)
    tuple_key: Key = (("/srv/app/keys.py", 4),)
    url = "/kept/" + str(12345)
    kept = [(url, str)]  # the tuple is kept; the url only through it
    gc.collect()
    sampler.add([(tuple_key, kept[0]), (url_key, url)], [url_key, tuple_key], 0.0)
    del url
    sampler.check(10.0)
    assert all(s.alive for samples in sampler._samples.values() for s in samples)
    kept.clear()
    sampler.check(20.0)
    assert not any(s.alive for samples in sampler._samples.values() for s in samples)


def make_product(n: int) -> dict[str, object]:
    return {"n": n, "name": f"product {n}" * 4}


def lookup(cache: Callable[[int], dict[str, object]], n: int) -> dict[str, object]:
    return cache(n)  # the cache's C code allocates its links at this line, then recycles them


def test_a_cache_link_recycled_in_place_is_found_but_never_proves_retention(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    """``lru_cache`` at capacity reuses its oldest link for each new key: the link lives on with new
    contents and nothing to fingerprint, so its survival proves nothing, and the censuses that find no
    new link count as misses."""
    catalogue = functools.lru_cache(maxsize=20)(make_product)  # made after the heap was frozen
    sampler = SurvivalSampler(per_site=8, new_per_census=4)
    for n in range(20):  # the cache fills in the first window: 20 links made at lookup's line
        lookup(catalogue, n)
    line = lookup.__code__.co_firstlineno + 1
    link_key = next(
        key for key in (tuple((f.filename, f.lineno) for f in reversed(stat.traceback))
                        for stat in tracemalloc.take_snapshot().statistics("traceback"))
        if key[0] == (__file__, line)
    )
    found = sampler.scan([link_key])
    assert {type(obj).__name__ for _, obj in found} == {"_lru_list_elem"}
    now = 0.0
    sampler.add(found, [link_key], now)
    assert sampler.misses(link_key) == 0 and sampler.retention(link_key, 5.0) is None
    for window in range(1, 5):  # at capacity: every new key takes the oldest link over
        now += 10.0
        tracing(sampler, now)
        for n in range(window * 100, window * 100 + 40):
            lookup(catalogue, n)
        sampler.add(sampler.scan([link_key]), [link_key], now)
    assert sampler.sampled == 4 and sampler.retention(link_key, 5.0) is None
    assert not sampler.unrefuted(link_key, 5.0) and sampler.misses(link_key) >= 3


def make_buffer(n: int) -> bytearray:
    # opaque: no weak reference, no hash, no referents, and over 4 KiB, too big to hold for its count
    return bytearray(n.to_bytes(4, "little") * 2048)


def test_a_ring_of_opaque_objects_is_not_read_as_retained(
    tracing: Callable[[SurvivalSampler, float], None],
) -> None:
    """A ring of large bytearrays at capacity: each is known by id and type alone, and a newcomer that
    takes a freed one's address looks just like it, so what is still there proves nothing."""
    ring: deque[bytearray] = deque(maxlen=10)
    sampler = SurvivalSampler(per_site=8, new_per_census=4)
    now, key = 0.0, None
    for window in range(6):
        for n in range(window * 100, window * 100 + 30):
            ring.append(make_buffer(n))
        key = key or key_of(ring[-1])
        sampler.add(sampler.scan([key]), [key], now, {key: -100.0})
        now += 10.0
        tracing(sampler, now)
    assert key is not None and sampler.sampled > 0
    churn = sampler.retention(key, 5.0, since=-100.0)
    assert churn is None or churn.fraction < 0.5, churn
    assert not sampler.unrefuted(key, 5.0, since=-100.0)


def keep_and_drop(
    tracing: Callable[[SurvivalSampler, float], None], sampler: SurvivalSampler,
    keep: Callable[[int], object], drop: Callable[[int], object],
) -> tuple[Key, Key]:
    """Six windows of 20 requests, each keeping one value (a leak) and dropping one (a ring of 5 at
    capacity), with a census after each; the two sites' keys."""
    kept: list[object] = []
    ring: deque[object] = deque(maxlen=5)
    now, sites = 0.0, None
    for window in range(6):
        for n in range(window * 100, window * 100 + 20):
            kept.append(keep(n))
            ring.append(drop(n))
        sites = sites or (key_of(kept[-1]), key_of(ring[-1]))
        sampler.add(sampler.scan(sites), sites, now, dict.fromkeys(sites, -100.0))
        now += 10.0
        tracing(sampler, now)
    assert sites is not None and sites[0] != sites[1]
    return sites


_EPOCH = datetime.datetime(2026, 1, 1)
_VALUES = {  # (kept, dropped): each on its own line, so each is its own allocation site
    # A bytearray refers to nothing, so holding a small one is exact (zeroed buffers, all alike).
    "bytearray": (
        lambda n: bytearray(1000),
        lambda n: bytearray(1000),
    ),
    # Decimals and datetimes have no weak reference and refer to nothing: held, or known by their hash.
    "decimal": (
        lambda n: Decimal(n) / 100,
        lambda n: Decimal(n + 10**6) / 100,
    ),
    "datetime": (
        lambda n: _EPOCH + datetime.timedelta(seconds=n),
        lambda n: _EPOCH + datetime.timedelta(seconds=n + 10**6),
    ),
}


@pytest.mark.parametrize(
    ("kind", "max_held_bytes"),
    [("bytearray", 256 * 1024), ("decimal", 256 * 1024), ("decimal", 0), ("datetime", 256 * 1024),
     ("datetime", 0)],
    ids=["bytearray-held", "decimal-held", "decimal-hashed", "datetime-held", "datetime-hashed"],
)
def test_a_leak_of_values_that_refer_to_nothing_reads_retained_and_a_ring_of_them_dead(
    tracing: Callable[[SurvivalSampler, float], None], kind: str, max_held_bytes: int,
) -> None:
    """Small bytearrays, Decimals and datetimes are held for their count (Decimals and datetimes past
    the held-bytes cap known by their content hash), never opaque: a leak of them reads retained,
    a ring of them at capacity dead (nobody but us refers to a dropped one)."""
    sampler = SurvivalSampler(per_site=8, new_per_census=4, max_held_bytes=max_held_bytes)
    leak, churn = keep_and_drop(tracing, sampler, *_VALUES[kind])
    assert sampler.held_bytes <= max_held_bytes
    assert not any(s.opaque for key in (leak, churn) for s in sampler._samples.get(key, []))
    retained = sampler.retention(leak, 5.0, since=-100.0)
    assert retained is not None and retained.fraction == 1.0, retained
    dropped = sampler.retention(churn, 5.0, since=-100.0)
    assert dropped is not None and dropped.fraction < 0.5, dropped


class _BrokenZone(datetime.tzinfo):
    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        raise RuntimeError("zone data missing")


def test_a_value_whose_hash_fails_is_sampled_and_checked_without_raising() -> None:
    """Past the held-bytes cap a datetime is known by its hash, which calls its tzinfo's utcoffset():
    a census must not fail on a zone that raises there."""
    stamp = datetime.datetime(2026, 1, 1, tzinfo=_BrokenZone())
    with pytest.raises(RuntimeError):
        hash(stamp)
    key: Key = ((__file__, 1),)
    kept = [stamp]  # a census finds it as a list's referent
    sampler = SurvivalSampler(max_held_bytes=0)
    sampler.add([(key, stamp)], [key], 0.0)
    sampler.check(10.0)
    (sample,) = sampler._samples[key]
    assert sample.alive and not sample.opaque and kept
