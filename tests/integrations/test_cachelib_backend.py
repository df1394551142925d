"""cachelib's behaviour contract (its common, has, clear, threshold and threaded suites) on KotobaCache."""

from __future__ import annotations

import datetime as dt
import inspect
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("cachelib")

import cachelib

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.cachelib import KotobaCache

SAMPLE_NUMBERS = [0, 10, 1024000, 9, 5000000000000, 99, 738, 2000000]
SAMPLE_PAIRS: dict[str, Any] = {
    "128": False,
    "beef": True,
    "crevettes": {},
    "1024": "spam",
    "bacon": "eggs",
    "sausage": 2048,
    "3072": [],
    "brandy": [{}, "fried eggs"],
    "lobster": ["baked beans", [512]],
    "4096": {"sauce": [], 256: "truffle"},
}


@pytest.fixture(autouse=True)
def _empty_caches_made_by_the_test() -> Iterator[None]:
    """Empty the kotoba caches a test created: ttl'd entries keep the engine's sweeper thread awake
    until the cache is garbage collected, which reference cycles can postpone indefinitely."""
    from kotoba_memory.cache_manager import iter_caches

    before = {id(cache) for cache in iter_caches()}
    yield
    for cache in iter_caches():
        if id(cache) not in before and hasattr(cache, "sweep_expired"):
            cache.clear()


class ReprSerializer:
    """A non-pickle serializer, to prove the backend goes through ``serializer``."""

    def dumps(self, value: Any) -> bytes:
        return repr(value).encode()

    def loads(self, payload: bytes) -> Any:
        return eval(payload.decode())  # test data only


class ReprCache(KotobaCache):
    serializer = ReprSerializer()


@pytest.fixture(params=[KotobaCache, ReprCache], ids=["pickle", "custom-serializer"])
def factory(request: pytest.FixtureRequest) -> Callable[..., KotobaCache]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def cache(factory: Callable[..., KotobaCache]) -> KotobaCache:
    return factory()


def test_is_a_cachelib_cache_with_every_public_method() -> None:
    cache = KotobaCache()
    assert isinstance(cache, cachelib.BaseCache)
    members = inspect.getmembers(cachelib.BaseCache, inspect.isfunction)
    public = [name for name, _ in members if not name.startswith("_")]
    assert public
    for name in public:
        assert callable(getattr(cache, name))
        # every method is implemented here or a working base one (``has`` raises in the base)
    assert KotobaCache.has is not cachelib.BaseCache.has


def test_set_get(cache: KotobaCache) -> None:
    for key, value in SAMPLE_PAIRS.items():
        assert cache.set(key, value) is True
        assert cache.get(key) == value


def test_set_get_many(cache: KotobaCache) -> None:
    assert cache.set_many(SAMPLE_PAIRS) == list(SAMPLE_PAIRS)
    assert cache.get_many(*SAMPLE_PAIRS) == list(SAMPLE_PAIRS.values())
    assert cache.get_many("missing", "bacon") == [None, "eggs"]


def test_get_dict(cache: KotobaCache) -> None:
    cache.set_many(SAMPLE_PAIRS)
    assert cache.get_dict(*SAMPLE_PAIRS) == SAMPLE_PAIRS


def test_delete(cache: KotobaCache) -> None:
    for key, value in SAMPLE_PAIRS.items():
        cache.set(key, value)
        assert cache.delete(key) is True
        assert not cache.get(key)
    assert cache.delete("does_not_exist") is False


def test_delete_many(cache: KotobaCache) -> None:
    cache.set_many(SAMPLE_PAIRS)
    assert cache.delete_many(*SAMPLE_PAIRS) == list(SAMPLE_PAIRS)
    assert not any(cache.get_many(*SAMPLE_PAIRS))


def test_delete_many_counts_missing_keys_as_deleted(cache: KotobaCache) -> None:
    cache.set("bacon", "spam")
    assert cache.delete_many("eggs", "bacon") == ["eggs", "bacon"]
    assert cache.get("bacon") is None


def test_add(cache: KotobaCache) -> None:
    cache.set_many(SAMPLE_PAIRS)
    for key in SAMPLE_PAIRS:
        assert cache.add(key, "updated") is False
    assert cache.get_many(*SAMPLE_PAIRS) == list(SAMPLE_PAIRS.values())
    for key, value in SAMPLE_PAIRS.items():
        assert cache.add(f"{key}-new", value) is True
        assert cache.get(f"{key}-new") == value


def test_inc_dec(cache: KotobaCache) -> None:
    for n in SAMPLE_NUMBERS:
        assert not cache.get(f"{n}-key-inc")
        assert cache.inc(f"{n}-key-inc", n) == n
        assert cache.get(f"{n}-key-inc") == n
        assert cache.dec(f"{n}-key-dec", n) == -n
        assert cache.get(f"{n}-key-dec") == -n
        assert cache.dec(f"{n}-key-inc", 5) == n - 5


def test_has(cache: KotobaCache) -> None:
    assert cache.has("foo") is False
    cache.set("foo", "bar")
    assert cache.has("foo") is True
    cache.set("none", None)
    assert cache.has("none") is True
    cache.delete("foo")
    assert cache.has("foo") is False


def test_clear(cache: KotobaCache) -> None:
    cache.set_many(SAMPLE_PAIRS)
    assert cache.clear() is True
    assert not any(cache.get_many(*SAMPLE_PAIRS))
    assert len(cache.store) == 0


def test_timeouts_zero_never_expires_and_positive_expires(cache: KotobaCache) -> None:
    for key, value in SAMPLE_PAIRS.items():
        cache.set(f"{key}-t0", value, timeout=0)
        cache.set(f"{key}-t1", value, timeout=1)
    cache.set("td", "x", timeout=dt.timedelta(milliseconds=300))  # rounded up to 1 s, as cachelib does
    assert cache.add("added", "x", timeout=1) is True
    time.sleep(1.3)
    for key, value in SAMPLE_PAIRS.items():
        assert cache.get(f"{key}-t0") == value
        assert not cache.get(f"{key}-t1")
        assert cache.has(f"{key}-t1") is False
    assert cache.get("td") is None
    assert cache.add("added", "again") is True  # add on an expired key succeeds
    assert cache.get("added") == "again"


def test_default_timeout_applies_when_timeout_is_none() -> None:
    cache = KotobaCache(default_timeout=1)
    forever = KotobaCache(default_timeout=0)
    cache.set("k", "v")
    forever.set("k", "v")
    cache.set("pinned", "v", timeout=0)
    time.sleep(1.3)
    assert cache.get("k") is None
    assert cache.get("pinned") == "v"
    assert forever.get("k") == "v"


def test_negative_timeout_stores_nothing(cache: KotobaCache) -> None:
    cache.set("k", "old")
    assert cache.set("k", "new", timeout=-1) is True
    assert cache.get("k") is None


def test_bad_timeout_type_is_a_type_error(cache: KotobaCache) -> None:
    cache.set("k", "v")
    with pytest.raises(TypeError):
        cache.set("k", "other", timeout="soon")  # type: ignore[arg-type]
    assert cache.get("k") == "v"


def test_values_are_isolated(cache: KotobaCache) -> None:
    value = {"a": [1]}
    cache.set("k", value)
    value["a"].append(2)
    assert cache.get("k") == {"a": [1]}


def test_unpicklable_value_returns_false_and_keeps_the_old_value() -> None:
    class Unpicklable:
        def __reduce__(self) -> Any:
            raise pickle.PicklingError("no")

    cache = KotobaCache()
    cache.set("k", "old")
    assert cache.set("k", Unpicklable()) is False
    assert cache.get("k") == "old"


def test_threshold_bounds_entries_and_zero_means_500() -> None:
    threshold = len(SAMPLE_PAIRS) // 2
    cache = KotobaCache(threshold=threshold)
    assert cache.set_many(SAMPLE_PAIRS)
    assert len(cache.store) <= threshold
    assert KotobaCache(threshold=0).stats().max_entries == 500
    with pytest.raises(ValueError, match="threshold"):
        KotobaCache(threshold=-1)


def test_max_bytes_bound_and_too_large_value() -> None:
    cache = KotobaCache(threshold=10_000, max_bytes=16 * 1024)
    for i in range(200):
        assert cache.set(f"k{i}", "x" * 500) is True
    assert cache.stats().bytes <= 16 * 1024
    assert cache.get("k199") == "x" * 500
    cache.set("big", "small")
    assert cache.set("big", "y" * 100_000) is False
    assert cache.get("big") is None


def test_policy_option() -> None:
    cache = KotobaCache(threshold=3, policy="fifo")
    for key in "abc":
        cache.set(key, key)
    cache.get("a")
    cache.set("d", "d")
    assert cache.get("a") is None
    assert cache.stats().policy in ("fifo", "FIFO", "CachePolicy.FIFO")
    with pytest.raises(ValueError):
        KotobaCache(policy="random")


def test_instances_can_share_a_store_with_prefixes() -> None:
    store = CacheManager(max_entries=100)
    one = KotobaCache(cache=store, key_prefix="one:")
    two = KotobaCache(cache=store, key_prefix="two:")
    one.set("k", 1)
    two.set("k", 2)
    assert (one.get("k"), two.get("k")) == (1, 2)
    assert len(store) == 2
    assert one.stats() == store.stats()


def test_non_str_key_is_a_type_error(cache: KotobaCache) -> None:
    with pytest.raises(TypeError, match="str"):
        cache.set(1, "v")  # type: ignore[arg-type]


def test_concurrent_inc_loses_no_update() -> None:
    cache = KotobaCache()
    cache.set("counter", 0)
    barrier = threading.Barrier(8)

    def incrementer() -> None:
        barrier.wait(timeout=10)
        for _ in range(50):
            cache.inc("counter", 1)

    threads = [threading.Thread(target=incrementer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert cache.get("counter") == 400


def test_concurrent_add_has_one_winner() -> None:
    cache = KotobaCache()
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def adder() -> None:
        barrier.wait(timeout=10)
        result = cache.add("race-key", 1)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=adder) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results.count(True) == 1


def test_concurrent_get_set_raise_nothing() -> None:
    cache = KotobaCache(threshold=20)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                cache.set(f"k{(n + i) % 40}", i)
                cache.get(f"k{i % 40}")
                cache.has(f"k{i % 40}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(cache.store) <= 20


@pytest.mark.redis
def test_instances_share_entries_through_the_redis_tier(redis_url: str) -> None:
    import uuid

    from kotoba_memory.cache_manager.redis_tier import RedisCache

    prefix = f"kotoba-test-{uuid.uuid4().hex}:"
    store = RedisCache(redis_url, prefix=prefix)
    other_process_view = RedisCache(redis_url, prefix=prefix)
    try:
        writer = KotobaCache(cache=store, key_prefix="app:")
        reader = KotobaCache(cache=other_process_view, key_prefix="app:")
        assert writer.set("k", {"v": [1, 2]}, timeout=30) is True
        assert reader.get("k") == {"v": [1, 2]}
        assert reader.add("k", "other") is False
        assert writer.inc("n", 3) == 3
        assert reader.get("n") == 3
        assert reader.delete("k") is True
        assert writer.has("k") is False
    finally:
        store.clear()


def test_bad_shared_store_arguments() -> None:
    with pytest.raises(TypeError, match="kotoba-memory cache"):
        KotobaCache(cache={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes"):
        KotobaCache(cache=CacheManager(max_entries=10), max_bytes=1000)
    with pytest.raises(TypeError, match="key_prefix"):
        KotobaCache(key_prefix=5)  # type: ignore[arg-type]
