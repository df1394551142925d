"""The BaseCache contract, run against every cache we ship.

One suite instead of a hand-written copy per backend: ``CacheManager`` under each policy, ``DiskCache``,
``TieredCache`` (memory over disk), ``RedisCache`` and ``NearCache`` (a private redis-server from the
test tooling; a missing server skips locally and fails under ``CI``, as every Redis test does).
Backend-specific behaviour (persistence, crashes, compression, spills, policies, Redis commands)
stays in the backend's own test file. Expiry uses short ttls (a few tens of milliseconds) and short sleeps.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kotoba_memory.cache_manager import (
    BaseCache,
    CachedValue,
    CacheManager,
    CacheMetadata,
    CachePolicy,
    CacheStats,
    UnhashableKeyError,
    iter_caches,
)
from kotoba_memory.cache_manager.disk import DiskCache
from kotoba_memory.cache_manager.near import NearCache
from kotoba_memory.cache_manager.redis_tier import RedisCache
from kotoba_memory.cache_manager.tiers import TieredCache
from kotoba_memory.errors import KotobaMemoryError

SHORT = 0.1  # a ttl that has passed after sleep(PAST_SHORT); long enough for a few calls
PAST_SHORT = 0.2
DEFAULT_MAX_BYTES = 1 << 20
TIER_THRESHOLD = 2000  # TieredCache: values heavier than this go straight to its disk tier

Make = Callable[..., BaseCache]


@dataclass(frozen=True)
class Backend:
    """How to build one kind of cache, and which optional parts of the contract it has."""

    name: str
    build: Callable[[pytest.FixtureRequest, Path, int | None, float | None], BaseCache]
    byte_bound: bool = True  # put() refuses a value heavier than max_bytes; stats().bytes <= max_bytes
    serializes: bool = False  # stores a copy: a value that cannot be serialized raises TypeError
    atomic_put_many: bool = False  # put_many() encodes every item before writing any
    counts_expirations: bool = True  # stats().expirations counts entries that expired
    keeps_bookkeeping: bool = True  # stats().metadata_bytes > 0 once entries are held
    invariants: Callable[[Any], None] | None = None  # backend-specific checks after the thread hammer


def _memory(policy: CachePolicy, implementation: str | None = None) -> Callable[..., BaseCache]:
    def build(
        request: pytest.FixtureRequest, tmp: Path, max_bytes: int | None, default_ttl: float | None
    ) -> BaseCache:
        return CacheManager(
            max_bytes or DEFAULT_MAX_BYTES, policy, default_ttl=default_ttl, implementation=implementation
        )

    return build


def _exact_byte_accounting(cache: CacheManager) -> None:
    held = [cache._table[k] for k in list(cache._table)]
    assert cache.stats().bytes == sum(entry.weight for entry in held)
    if cache._core is not None:
        cache._core.check()


# The memory backends run on the implementation in use (the compiled core when built) and, when that is
# the compiled core, on the pure-Python reference too, so both meet the contract in every run.
_REFERENCE_TOO = CacheManager(max_entries=1).implementation == "c"


def _disk(
    request: pytest.FixtureRequest, tmp: Path, max_bytes: int | None, default_ttl: float | None
) -> BaseCache:
    path = tmp / f"disk-{uuid.uuid4().hex[:8]}.sqlite3"
    cache = DiskCache(path, max_bytes or DEFAULT_MAX_BYTES, default_ttl=default_ttl)
    request.addfinalizer(cache.close)
    return cache


def _tiered(
    request: pytest.FixtureRequest, tmp: Path, max_bytes: int | None, default_ttl: float | None
) -> BaseCache:
    bound = max_bytes or DEFAULT_MAX_BYTES
    memory = CacheManager(bound, "lru")
    disk = DiskCache(tmp / f"tier-{uuid.uuid4().hex[:8]}.sqlite3", bound)
    cache = TieredCache(
        memory, disk, spill_threshold_bytes=min(TIER_THRESHOLD, bound // 4), default_ttl=default_ttl
    )
    request.addfinalizer(cache.close)
    return cache


def _tiers_are_exclusive(cache: TieredCache) -> None:
    for key in list(cache.memory.keys()):
        assert key not in cache.disk, f"{key!r} is in both tiers"
    stats = cache.stats()
    assert stats.memory.bytes <= stats.memory.max_bytes  # type: ignore[operator]


def _redis(
    request: pytest.FixtureRequest, tmp: Path, max_bytes: int | None, default_ttl: float | None
) -> BaseCache:
    url = request.getfixturevalue("redis_url")
    # scan_interval=0: stats() rescans the prefix on every call, so occupancy is exact here.
    prefix = f"contract-{uuid.uuid4().hex[:10]}:"
    cache = RedisCache(url, prefix=prefix, default_ttl=default_ttl, scan_interval=0)

    def cleanup() -> None:
        cache.clear()
        cache.close()

    request.addfinalizer(cleanup)
    return cache


def _near(
    request: pytest.FixtureRequest, tmp: Path, max_bytes: int | None, default_ttl: float | None
) -> BaseCache:
    url = request.getfixturevalue("redis_url")
    namespace = f"contract-near-{uuid.uuid4().hex[:10]}"
    # a generous timeout: the contract is about semantics; faults are test_near_cache.py's
    cache = NearCache(url, secret="contract", namespace=namespace, default_ttl=default_ttl,
                      scan_interval=0, socket_timeout=2.0)
    assert cache.wait_coherent(10), "the near-cache never subscribed to its invalidation channel"

    def cleanup() -> None:
        cache.clear()
        cache.close()

    request.addfinalizer(cleanup)
    return cache


def _near_l1_holds_only_what_redis_holds(cache: NearCache) -> None:
    for key in list(cache.l1.keys()):
        entry = cache.l1.get(key)
        if entry is not None:
            assert cache.client.exists(key if isinstance(key, bytes) else cache._keys(key)[1])


BACKENDS = [
    *(
        Backend(f"memory-{policy.value}", _memory(policy), invariants=_exact_byte_accounting)
        for policy in CachePolicy
    ),
    *(
        Backend(
            f"memory-{policy.value}-python", _memory(policy, "python"), invariants=_exact_byte_accounting
        )
        for policy in (CachePolicy if _REFERENCE_TOO else ())
    ),
    Backend("disk", _disk, serializes=True, atomic_put_many=True),
    Backend("tiered", _tiered, invariants=_tiers_are_exclusive),
    Backend(
        "redis",
        _redis,
        byte_bound=False,
        serializes=True,
        atomic_put_many=True,
        counts_expirations=False,
        keeps_bookkeeping=False,
    ),
    Backend(
        "near",
        _near,
        byte_bound=False,
        serializes=True,
        atomic_put_many=True,
        counts_expirations=False,
        invariants=_near_l1_holds_only_what_redis_holds,
    ),
]


def _params(wanted: Callable[[Backend], bool] = lambda b: True) -> list[Any]:
    return [
        pytest.param(b, id=b.name, marks=[pytest.mark.redis] if b.name in ("redis", "near") else [])
        for b in BACKENDS
        if wanted(b)
    ]


@pytest.fixture(params=_params())
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param  # type: ignore[no-any-return]


# Tests of an optional part of the contract run only against the backends that have it.
byte_bounded = pytest.mark.parametrize("backend", _params(lambda b: b.byte_bound))
counting_expirations = pytest.mark.parametrize("backend", _params(lambda b: b.counts_expirations))


@pytest.fixture
def make(backend: Backend, request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    """``make(max_bytes=None, default_ttl=None)`` builds a fresh cache of the backend under test."""

    def factory(*, max_bytes: int | None = None, default_ttl: float | None = None) -> BaseCache:
        return backend.build(request, tmp_path, max_bytes, default_ttl)

    return factory


@pytest.fixture
def cache(make: Make) -> BaseCache:
    return make()


# -- the basic operations -------------------------------------------------------------------------


def test_put_get_delete_contains_len_clear(cache: BaseCache) -> None:
    assert isinstance(cache, BaseCache)
    assert cache.get("a") is None
    assert cache.get("a", "dflt") == "dflt"
    assert cache.put("a", {"x": 1}) is True
    assert cache.get("a") == {"x": 1}
    assert "a" in cache and "b" not in cache
    assert len(cache) == 1
    assert cache.put("a", {"x": 2}) is True  # overwrite
    assert cache.get("a") == {"x": 2} and len(cache) == 1
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert "a" not in cache and len(cache) == 0
    cache.put_many({"p": 1, "q": 2})
    cache.clear()
    assert len(cache) == 0 and "p" not in cache and cache.get("q") is None
    assert cache.stats().entries == 0 and cache.stats().bytes == 0


def test_none_value_is_distinguishable_with_a_default(cache: BaseCache) -> None:
    cache.put("k", None)
    sentinel = object()
    assert cache.get("k", sentinel) is None
    assert cache.get("missing", sentinel) is sentinel
    assert "k" in cache


def test_common_key_and_value_types_round_trip(cache: BaseCache) -> None:
    values: dict[Hashable, Any] = {
        "text": "héllo",
        b"raw": b"\x00\x01",
        42: [1, 2, {"a": (3, 4)}],
        "42": "a str key is not the int key",
        ("tuple", 1): {"nested": {"x": 1.5}},
        frozenset({1, 2}): None,
        -7: 10**30,
    }
    for key, value in values.items():
        assert cache.put(key, value) is True
    for key, value in values.items():
        assert key in cache
        assert cache.get(key, "missing") == value
    assert len(cache) == len(values)
    assert cache.get_many(values) == values


def test_get_many_put_many(cache: BaseCache) -> None:
    cache.put_many({"a": 1, "b": 2}, ttl=60)
    assert cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
    assert cache.get_many([]) == {}
    assert 59 < (cache.ttl_remaining("a") or 0) <= 60
    stats = cache.stats()
    assert stats.hits == 2 and stats.misses == 1 and stats.puts == 2


def test_add_stores_only_when_absent(cache: BaseCache) -> None:
    assert cache.add("k", 1) is True
    assert cache.add("k", 2) is False
    assert cache.get("k") == 1
    cache.put("exp", 1, ttl=SHORT)
    time.sleep(PAST_SHORT)
    assert cache.add("exp", 2) is True  # an expired entry does not block add
    assert cache.get("exp") == 2


def test_touch_sets_a_new_ttl_on_live_entries_only(cache: BaseCache) -> None:
    cache.put("k", "v", ttl=SHORT)
    assert cache.touch("k", 60) is True
    time.sleep(PAST_SHORT)
    assert cache.get("k") == "v"  # outlived its first ttl
    assert 55 < (cache.ttl_remaining("k") or 0) <= 60
    assert cache.touch("k") is True  # None: the default ttl, here no expiry
    assert cache.ttl_remaining("k") is None
    assert cache.touch("k") is True  # still true for an entry without a ttl
    assert cache.touch("absent") is False
    assert cache.touch("absent", 5) is False
    assert "absent" not in cache
    assert cache.touch("k", SHORT) is True
    time.sleep(PAST_SHORT)
    assert "k" not in cache
    assert cache.touch("k", 60) is False  # expired: nothing to touch


def test_registered_for_metrics(cache: BaseCache) -> None:
    assert any(c is cache for c in iter_caches())
    assert isinstance(cache.name, str) and cache.name


# -- ttl -------------------------------------------------------------------------------------------


def test_ttl_expiry_and_ttl_remaining(cache: BaseCache) -> None:
    cache.put("short", 1, ttl=SHORT)
    cache.put("long", 2, ttl=60)
    cache.put("forever", 3)
    assert cache.get("short") == 1
    assert 0 < (cache.ttl_remaining("short") or 0) <= SHORT
    assert 59 < (cache.ttl_remaining("long") or 0) <= 60
    assert cache.ttl_remaining("forever") is None
    with pytest.raises(KeyError):
        cache.ttl_remaining("absent")
    time.sleep(PAST_SHORT)
    assert "short" not in cache
    assert cache.get("short") is None
    assert cache.get("short", "gone") == "gone"
    with pytest.raises(KeyError):
        cache.ttl_remaining("short")
    assert cache.get("long") == 2 and cache.get("forever") == 3
    assert len(cache) == 2


@counting_expirations  # not Redis: the server drops expired keys on its own
def test_expirations_are_counted(cache: BaseCache) -> None:
    cache.put("short", 1, ttl=SHORT)
    cache.put("long", 2, ttl=60)
    time.sleep(PAST_SHORT)
    assert cache.get("short") is None
    assert cache.stats().expirations == 1


def test_default_ttl_applies_when_a_put_gives_none(make: Make) -> None:
    cache = make(default_ttl=SHORT)
    assert cache.default_ttl == SHORT
    cache.put("default", 1)
    cache.put("explicit", 2, ttl=60)
    cache.put_many({"many": 3})
    meta = CacheMetadata("application/json", 10)
    cache.put("own", CachedValue(b'{"a": 1}', meta, ttl=60))  # a CachedValue brings its own ttl
    assert 0 < (cache.ttl_remaining("default") or 0) <= SHORT
    assert 59 < (cache.ttl_remaining("own") or 0) <= 60
    time.sleep(PAST_SHORT)
    assert "default" not in cache and "many" not in cache
    assert cache.get("explicit") == 2
    got = cache.get("own")
    assert isinstance(got, CachedValue) and got.data == b'{"a": 1}' and got.metadata == meta
    assert cache.add("default", 4) is True
    assert cache.touch("explicit") is True  # None: back to the default ttl
    assert 0 < (cache.ttl_remaining("explicit") or 0) <= SHORT
    assert make().default_ttl is None


def test_cached_value_round_trips_with_its_own_ttl(cache: BaseCache) -> None:
    cv = CachedValue(b"payload", CacheMetadata("application/octet-stream", 7), ttl=SHORT)
    assert cache.put("cv", cv)
    got = cache.get("cv")
    assert got == cv and got.metadata.size_bytes == 7 and got.ttl == SHORT
    assert cache.put("cv-explicit", cv, ttl=60)  # an explicit ttl wins over the value's own
    time.sleep(PAST_SHORT)
    assert cache.get("cv") is None
    assert cache.get("cv-explicit") == cv


# -- stats -----------------------------------------------------------------------------------------


def test_stats_count_hits_misses_puts_deletes_and_latency(cache: BaseCache, backend: Backend) -> None:
    for i in range(50):
        cache.put(i, i)
    for i in range(100):
        cache.get(i)
    for _ in range(30):  # enough lookups that a cache timing 1 call in 64 has sampled hits and misses
        for i in (0, 99):
            cache.get(i)
    cache.delete(0)
    cache.delete("absent")
    stats = cache.stats()
    assert isinstance(stats, CacheStats)
    assert (stats.hits, stats.misses) == (80, 80)
    assert stats.requests == 160 and stats.hit_rate == pytest.approx(0.5)
    assert stats.puts == 50 and stats.deletes == 1
    assert stats.entries == len(cache) == 49
    assert stats.hit_latency_ns > 0 and stats.miss_latency_ns > 0
    assert stats.bytes > 0
    if backend.keeps_bookkeeping:
        assert stats.metadata_bytes > 0
    assert stats.name == cache.name
    assert stats.to_dict()["hits"] == 80


def test_lookups_are_the_hits_and_misses_stats_counts(cache: BaseCache) -> None:
    assert cache.lookups() == (0, 0)
    for i in range(20):
        cache.put(i, i)
    for i in range(35):
        cache.get(i)
    with pytest.raises(TypeError):
        cache.get(["unhashable"])  # a refused key is neither a hit nor a miss
    cache.get(3)
    stats = cache.stats()
    assert cache.lookups() == (stats.hits, stats.misses) == (21, 15)
    assert asyncio.run(cache.alookups()) == (21, 15)


def test_astats_matches_stats(cache: BaseCache) -> None:
    cache.put("a", 1)
    cache.get("a")
    cache.get("b")
    sync, async_ = cache.stats(), asyncio.run(cache.astats())
    assert type(async_) is type(sync)
    assert (async_.hits, async_.misses, async_.puts, async_.entries, async_.bytes) == (
        sync.hits,
        sync.misses,
        sync.puts,
        sync.entries,
        sync.bytes,
    )


# -- the byte bound -------------------------------------------------------------------------------


@byte_bounded
def test_entry_larger_than_the_cache_is_rejected_without_evicting_others(make: Make) -> None:
    cache = make(max_bytes=1000)
    for i in range(5):
        assert cache.put(i, b"y" * 100)
    held = cache.stats().bytes
    assert held % 5 == 0  # five entries of one weight
    assert cache.put("huge", b"z" * 1001) is False
    assert "huge" not in cache
    assert len(cache) == 5
    stats = cache.stats()
    assert stats.rejections == 1 and stats.evictions == 0 and stats.bytes == held
    # A refused overwrite drops the old value rather than leaving it stale.
    assert cache.put(0, b"z" * 5000) is False
    assert 0 not in cache and cache.get(0) is None
    stats = cache.stats()
    assert stats.rejections == 2 and stats.entries == 4 and stats.bytes == held // 5 * 4


@byte_bounded
def test_bytes_never_exceed_the_bound(make: Make) -> None:
    cache = make(max_bytes=20_000)
    rng = random.Random(7)
    for i in range(150):
        cache.put(i, rng.randbytes(rng.randint(10, 3000)))
        stats = cache.stats()
        assert stats.max_bytes is not None and stats.bytes <= stats.max_bytes
    assert stats.entries == len(cache) > 0
    assert stats.evictions > 0


# -- bad input ------------------------------------------------------------------------------------


class _Items:
    """A mapping-like argument for put_many whose keys need not be hashable."""

    def __init__(self, *pairs: tuple[Any, Any]) -> None:
        self._pairs = pairs

    def items(self) -> tuple[tuple[Any, Any], ...]:
        return self._pairs



def test_bad_input_raises_the_documented_errors_and_loses_nothing(cache: BaseCache, backend: Backend) -> None:
    cache.put("k", "kept")
    for call in (
        lambda: cache.put(["unhashable"], 1),
        lambda: cache.get({}),
        lambda: cache.delete([]),
        lambda: [] in cache,
        lambda: cache.add([], 1),
        lambda: cache.touch([], 5),
        lambda: cache.ttl_remaining([]),
        lambda: cache.get_many([[], "k"]),
        lambda: cache.get_or_set([], lambda: 1),
    ):
        with pytest.raises(UnhashableKeyError, match="hashable") as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, KotobaMemoryError)
    for bad_ttl in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            cache.put("k", "x", ttl=bad_ttl)
        with pytest.raises(ValueError, match="ttl"):
            cache.add("new", "x", ttl=bad_ttl)
        with pytest.raises(ValueError, match="ttl"):
            cache.touch("k", bad_ttl)
        with pytest.raises(ValueError, match="ttl"):
            cache.put_many({"a": 1}, ttl=bad_ttl)
    for wrong_type in ("soon", True, [1]):
        with pytest.raises(TypeError, match="ttl"):
            cache.put("k", "x", ttl=wrong_type)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        cache.get_or_set("z", 5)  # type: ignore[arg-type]
    if backend.serializes:
        with pytest.raises(TypeError, match="lock"):
            cache.put("k", threading.Lock())
        with pytest.raises(TypeError, match="lock"):
            cache.add("new", threading.Lock())
    if backend.atomic_put_many:  # every item is encoded before the first is written
        with pytest.raises(UnhashableKeyError):
            cache.put_many(_Items(("a", 1), (("b", []), 2)))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="lock"):
            cache.put_many({"a": 1, "b": threading.Lock()})
    assert "a" not in cache and "new" not in cache and "z" not in cache
    assert cache.get("k") == "kept"
    assert cache.ttl_remaining("k") is None
    assert len(cache) == 1
    stats = cache.stats()
    assert stats.puts == 1 and stats.entries == 1
    # The bad lookups counted as neither hits nor misses.
    assert stats.hits == 1 and stats.misses == 0


def test_bad_input_to_the_async_twins_raises_the_same_errors(cache: BaseCache) -> None:
    async def main() -> None:
        await cache.aput("k", "kept")
        with pytest.raises(UnhashableKeyError):
            await cache.aget([])
        with pytest.raises(UnhashableKeyError):
            await cache.aput([], 1)
        with pytest.raises(UnhashableKeyError):
            await cache.attl_remaining([])
        with pytest.raises(ValueError, match="ttl"):
            await cache.aput("k", "x", ttl=0)
        with pytest.raises(ValueError, match="ttl"):
            await cache.atouch("k", -1)
        with pytest.raises(TypeError, match="callable"):
            await cache.aget_or_set("z", 5)  # type: ignore[arg-type]
        with pytest.raises(KeyError):
            await cache.attl_remaining("absent")

    asyncio.run(main())
    assert cache.get("k") == "kept" and len(cache) == 1


# -- get_or_set -----------------------------------------------------------------------------------


def test_get_or_set_runs_the_factory_once_across_threads(cache: BaseCache) -> None:
    calls: list[int] = []
    barrier = threading.Barrier(8)
    results: list[Any] = []
    big = "v" * 5000  # a TieredCache writes it to its disk tier

    def factory() -> str:
        calls.append(1)
        time.sleep(0.1)
        return big

    def worker() -> None:
        barrier.wait(timeout=10)
        results.append(cache.get_or_set("k", factory, ttl=30))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [big] * 8
    assert len(calls) == 1
    assert cache.get("k") == big
    assert 25 < (cache.ttl_remaining("k") or 0) <= 30
    assert cache.get_or_set("k", lambda: "not called") == big


def test_get_or_set_runs_the_factory_once_across_coroutines(cache: BaseCache) -> None:
    async def main() -> None:
        calls = 0

        async def factory() -> str:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return "v"

        got = await asyncio.gather(*(cache.aget_or_set("k", factory) for _ in range(10)))
        assert got == ["v"] * 10 and calls == 1
        sync_calls: list[int] = []

        def sync_factory() -> str:
            sync_calls.append(1)
            time.sleep(0.05)
            return "sync"

        got = await asyncio.gather(*(cache.aget_or_set("s", sync_factory, ttl=30) for _ in range(5)))
        assert got == ["sync"] * 5 and len(sync_calls) == 1
        assert 25 < (await cache.attl_remaining("s") or 0) <= 30

    asyncio.run(main())
    assert cache.get("k") == "v" and cache.get("s") == "sync"


def test_get_or_set_propagates_the_factory_error_and_stores_nothing(cache: BaseCache) -> None:
    def bad() -> Any:
        raise LookupError("backend down")

    with pytest.raises(LookupError):
        cache.get_or_set("k", bad)
    assert "k" not in cache
    assert cache.get_or_set("k", lambda: 5) == 5

    async def abad() -> Any:
        raise LookupError("backend down")

    with pytest.raises(LookupError):
        asyncio.run(cache.aget_or_set("a", abad))
    assert "a" not in cache

    async def afactory() -> int:
        return 1

    with pytest.raises(TypeError, match="aget_or_set"):
        cache.get_or_set("a", afactory)
    assert "a" not in cache


def test_async_waiter_cancellation_does_not_break_the_leader(cache: BaseCache) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def factory() -> str:
            await release.wait()
            return "done"

        leader = asyncio.create_task(cache.aget_or_set("k", factory))
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(cache.aget_or_set("k", factory))
        await asyncio.sleep(0.05)
        waiter.cancel()
        release.set()
        assert await leader == "done"
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
    assert cache.get("k") == "done"


# -- async twins ----------------------------------------------------------------------------------


def _script(cache: BaseCache) -> list[tuple[str, tuple[Any, ...]]]:
    """One sequence of calls that touches every method that has an async twin."""
    big = "B" * 5000
    return [
        ("put", ("a", 1)),
        ("put", ("big", big, 60)),  # a TieredCache keeps the big values on its disk tier
        ("put", ("big2", big)),
        ("get", ("a",)),
        ("get", ("big",)),
        ("get", ("x", "dflt")),
        ("put_many", ({"b": 2, "c": [3]},)),
        ("put_many", ({"t": 1}, 30)),
        ("get_many", (["a", "b", "c", "big", "zz"],)),
        ("add", ("a", 5)),
        ("add", ("new", 6)),
        ("touch", ("a", 30)),
        ("touch", ("zz", 30)),
        ("touch", ("big", 30)),
        ("delete", ("big2",)),
        ("get", ("big2",)),
        ("ttl_remaining", ("b",)),
        ("delete", ("b",)),
        ("delete", ("b",)),
        ("get_or_set", ("made", lambda: "yes")),
        ("get_or_set", ("made", lambda: "no")),
    ]


def test_every_async_twin_behaves_like_its_sync_method(make: Make) -> None:
    sync_cache, async_cache = make(), make()
    expected = [getattr(sync_cache, name)(*args) for name, args in _script(sync_cache)]

    async def run() -> list[Any]:
        out = []
        for name, args in _script(async_cache):
            out.append(await getattr(async_cache, "a" + name)(*args))
        return out

    got = asyncio.run(run())
    big = "B" * 5000
    # puts, gets, put_many, get_many, add, touch, delete/get, ttl_remaining, delete, get_or_set
    assert expected == [
        *(True, True, True),
        *(1, big, "dflt"),
        *(None, None),
        {"a": 1, "b": 2, "c": [3], "big": big},
        *(False, True),
        *(True, False, True),
        *(True, None),
        None,
        *(True, False),
        *("yes", "yes"),
    ]
    assert got == expected
    for key in ("a", "c", "big", "t", "new", "made"):
        assert asyncio.run(async_cache.aget(key)) == sync_cache.get(key)
        sync_ttl, async_ttl = sync_cache.ttl_remaining(key), asyncio.run(async_cache.attl_remaining(key))
        assert (sync_ttl is None) == (async_ttl is None), key
        if sync_ttl is not None and async_ttl is not None:
            assert abs(sync_ttl - async_ttl) < 5
    assert len(async_cache) == len(sync_cache)
    sync_stats, async_stats = sync_cache.stats(), asyncio.run(async_cache.astats())
    assert (async_stats.hits, async_stats.misses, async_stats.puts, async_stats.deletes) == (
        sync_stats.hits,
        sync_stats.misses,
        sync_stats.puts,
        sync_stats.deletes,
    )
    sync_cache.clear()
    asyncio.run(async_cache.aclear())
    assert len(async_cache) == len(sync_cache) == 0


def test_every_sync_method_has_an_async_twin() -> None:
    contract = [
        "get",
        "put",
        "delete",
        "get_many",
        "put_many",
        "add",
        "touch",
        "clear",
        "stats",
        "ttl_remaining",
        "get_or_set",
    ]
    for name in contract:
        assert asyncio.iscoroutinefunction(getattr(BaseCache, "a" + name)), name
    assert {"get", "put", "delete", "__contains__", "__len__", "clear", "stats", "ttl_remaining"} == set(
        BaseCache.__abstractmethods__
    )


# -- threads --------------------------------------------------------------------------------------


def test_threads_hammering_one_cache_keep_its_invariants(make: Make, backend: Backend) -> None:
    cache = make(max_bytes=40_000 if backend.byte_bound else None)
    errors: list[BaseException] = []
    counts = [[0, 0] for _ in range(6)]  # per thread: gets, puts

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                key = rng.randrange(60)
                roll = rng.random()
                if roll < 0.45:
                    size = 5000 if rng.random() < 0.1 else rng.randint(100, 1200)
                    cache.put(key, (key, size, "p" * size), ttl=rng.choice([None, 30]))
                    counts[seed][1] += 1
                elif roll < 0.9:
                    got = cache.get(key)
                    counts[seed][0] += 1
                    assert got is None or (got[0] == key and len(got[2]) == got[1])
                else:
                    cache.delete(key)
        except BaseException as exc:  # pragma: no cover - only on failure
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    stats = cache.stats()
    gets, puts = sum(c[0] for c in counts), sum(c[1] for c in counts)
    assert stats.hits + stats.misses == gets  # every lookup counted exactly once
    assert stats.puts == puts
    if backend.byte_bound:
        assert stats.max_bytes is not None and stats.bytes <= stats.max_bytes
    assert stats.entries == len(cache)
    for key in range(60):
        got = cache.get(key)
        assert got is None or (got[0] == key and len(got[2]) == got[1])
    if backend.invariants is not None:
        backend.invariants(cache)


@pytest.fixture(autouse=True)
def _no_leftover_flights(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    cache = request.node.funcargs.get("cache")
    if isinstance(cache, BaseCache):
        assert not cache._flights, "get_or_set left an in-flight computation behind"
