"""RedisCache against a real redis-server: the BaseCache contract, prefix isolation, and two processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from kotoba_memory.cache_manager.redis_tier import RedisCache, RedisCacheStats
from kotoba_memory.cache_manager.types import CachedValue

pytestmark = pytest.mark.redis


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[RedisCache]:
    c = RedisCache(redis_url, prefix=prefix)
    yield c
    c.clear()
    c.close()


def test_round_trip_and_contract(cache: RedisCache) -> None:
    assert cache.put("s", {"a": [1, 2]})
    assert cache.put(("tuple", 1), "t")
    assert cache.put(7, b"bytes")
    assert cache.get("s") == {"a": [1, 2]}
    assert cache.get(("tuple", 1)) == "t"
    assert cache.get(7) == b"bytes"
    assert cache.get("7", "different key") == "different key"
    assert "s" in cache and "nope" not in cache
    assert len(cache) == 3
    assert cache.delete("s") is True
    assert cache.delete("s") is False
    stats = cache.stats()
    assert isinstance(stats, RedisCacheStats)
    assert (stats.hits, stats.misses, stats.puts, stats.deletes) == (3, 1, 3, 1)
    assert stats.entries == 2 and stats.bytes > 0
    assert stats.hit_latency_ns > 0 and stats.name == cache.name


def test_get_many_put_many(cache: RedisCache) -> None:
    cache.put_many({f"k{i}": i * 10 for i in range(1200)}, ttl=60)
    got = cache.get_many([f"k{i}" for i in range(0, 1300, 100)])
    assert got == {f"k{i}": i * 10 for i in range(0, 1200, 100)}
    assert 59 < (cache.ttl("k5") or 0) <= 60


def test_add_is_set_nx_and_touch_uses_expire_persist(cache: RedisCache) -> None:
    assert cache.add("k", 1) is True
    assert cache.add("k", 2) is False
    assert cache.get("k") == 1
    assert cache.touch("k", 0.05)
    assert cache.ttl("k") is not None
    assert cache.touch("k")  # ttl None and no default: PERSIST
    assert cache.ttl("k") is None
    assert cache.touch("k") is True  # still true for a key without ttl
    assert cache.touch("absent") is False
    assert cache.touch("absent", 5) is False
    cache.put("short", "x", ttl=0.05)
    time.sleep(0.12)
    assert cache.get("short") is None
    assert cache.add("short", "y") is True
    with pytest.raises(KeyError):
        cache.ttl("absent")


def test_default_ttl_and_cached_value_ttl(redis_url: str, prefix: str) -> None:
    c = RedisCache(redis_url, prefix=prefix, default_ttl=30)
    try:
        c.put("d", 1)
        c.put("own", CachedValue("payload", ttl=5))
        c.put("explicit", 1, ttl=100)
        assert 29 < (c.ttl("d") or 0) <= 30
        assert 4 < (c.ttl("own") or 0) <= 5
        assert 99 < (c.ttl("explicit") or 0) <= 100
        got = c.get("own")
        assert isinstance(got, CachedValue) and got.data == "payload"
    finally:
        c.clear()


def test_clear_removes_only_its_prefix(cache: RedisCache, redis_url: str, prefix: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    neighbour = prefix.rstrip(":") + "-other:key"
    glob_lookalike = prefix + "*"
    raw.set(neighbour, b"keep me")
    try:
        cache.put_many({i: i for i in range(1100)})
        cache.put(glob_lookalike, 1)
        cache.clear()
        assert len(cache) == 0
        assert raw.get(neighbour) == b"keep me"
    finally:
        raw.delete(neighbour)
        raw.close()


def test_prefix_with_glob_characters_is_escaped(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    starred = RedisCache(redis_url, prefix=f"g*{tag}:")
    plain = RedisCache(redis_url, prefix=f"gX{tag}:")
    try:
        starred.put("a", 1)
        plain.put("a", 2)
        starred.clear()
        assert plain.get("a") == 2
        assert len(plain) == 1
    finally:
        plain.clear()
        starred.clear()


def test_incr_works_across_clients(cache: RedisCache, redis_url: str, prefix: str) -> None:
    other = RedisCache(redis_url, prefix=prefix)
    assert cache.incr("version") == 1
    assert other.incr("version", 5) == 6
    assert cache.get("version") == 6
    cache.put("count", 41)
    assert other.incr("count") == 42
    cache.put("text", "not a number")
    with pytest.raises(ValueError, match="not an int"):
        cache.incr("text")
    with pytest.raises(TypeError, match="delta"):
        cache.incr("version", 1.5)  # type: ignore[arg-type]
    other.close()


def test_bad_input_is_named_and_loses_nothing(cache: RedisCache, redis_url: str) -> None:
    cache.put("k", "kept")
    with pytest.raises(TypeError, match="lock"):
        cache.put("k", threading.Lock())
    with pytest.raises(TypeError, match="hashable"):
        cache.put(["list"], 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        cache.put("k", 1, ttl=0)
    with pytest.raises(TypeError, match="lock"):
        cache.put_many({"a": 1, "b": threading.Lock()})
    assert "a" not in cache
    assert cache.get("k") == "kept"
    with pytest.raises(TypeError, match="url_or_client"):
        RedisCache(12345)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisCache(redis.Redis.from_url(redis_url, decode_responses=True))
    with pytest.raises(TypeError, match="serializer"):
        RedisCache(redis_url, serializer=object())  # type: ignore[arg-type]


def test_json_serializer_and_corrupt_values(redis_url: str, prefix: str) -> None:
    c = RedisCache(redis_url, prefix=prefix, serializer=json)
    try:
        c.put("doc", {"a": [1, "b"]})
        raw = redis.Redis.from_url(redis_url)
        assert json.loads(raw.get(prefix + "doc") or b"") == {"a": [1, "b"]}
        raw.set(prefix + "broken", b"{not json")
        raw.close()
        assert c.get("broken", "miss") == "miss"
        assert "broken" not in c
        assert c.stats().corrupt == 1
    finally:
        c.clear()


def test_two_processes_see_each_others_writes(cache: RedisCache, redis_url: str, prefix: str) -> None:
    cache.put("from-parent", {"n": 1})
    code = textwrap.dedent(
        f"""
        import json
        from kotoba_memory.cache_manager.redis_tier import RedisCache
        c = RedisCache({redis_url!r}, prefix={prefix!r})
        print(json.dumps(c.get("from-parent")))
        c.put("from-child", [1, 2, 3])
        c.incr("table:users")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == {"n": 1}
    assert cache.get("from-child") == [1, 2, 3]
    assert cache.get("table:users") == 1


def test_get_or_set_runs_factory_once_across_threads(cache: RedisCache) -> None:
    calls: list[int] = []
    barrier = threading.Barrier(4)
    results: list[object] = []

    def factory() -> str:
        calls.append(1)
        time.sleep(0.05)
        return "v"

    def worker() -> None:
        barrier.wait(timeout=10)
        results.append(cache.get_or_set("k", factory, ttl=30))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == ["v"] * 4 and len(calls) == 1


def test_async_twins(cache: RedisCache) -> None:
    async def main() -> list[object]:
        assert await cache.aput("a", 1)
        await cache.aput_many({"b": 2, "c": 3})
        assert await cache.aadd("a", 5) is False
        assert await cache.atouch("a", 10)
        out: list[object] = [await cache.aget("a"), await cache.aget_many(["b", "c", "x"])]
        assert await cache.adelete("b")
        out.append(await cache.aincr("n", 3))

        async def make() -> str:
            return "made"

        out.append(await cache.aget_or_set("m", make))
        await cache.aclear()
        out.append(len(cache))
        return out

    assert asyncio.run(main()) == [1, {"b": 2, "c": 3}, 3, "made", 0]


def test_stats_rescans_occupancy_at_most_every_scan_interval(redis_url: str, prefix: str) -> None:
    c = RedisCache(redis_url, prefix=prefix, scan_interval=3600)
    try:
        c.put_many({"a": 12345, "b": 1234567890})  # ints are stored as decimal text: 5 + 10 bytes
        first = c.stats()
        assert (first.entries, first.bytes) == (2, 15)
        c.put("c", 1)
        assert c.stats().entries == 2  # cached occupancy; counters stay live
        assert c.stats().puts == 3
        assert c.stats(refresh=True).entries == 3
        c.clear()
        assert c.stats().entries == 0
    finally:
        c.clear()
    with pytest.raises(ValueError, match="scan_interval"):
        RedisCache(redis_url, prefix=prefix, scan_interval=-1)


def test_threads_share_one_client(cache: RedisCache) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                cache.incr("counter")
                cache.put(f"t{n}-{i}", (n, i))
                assert cache.get(f"t{n}-{i}") == (n, i)
        except BaseException as exc:  # pragma: no cover - only on failure
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert cache.get("counter") == 200
    stats = cache.stats(refresh=True)
    assert stats.entries == 201 and stats.hits == 201 and stats.puts == 200


def test_module_import_does_not_load_redis() -> None:
    code = (
        "import sys\n"
        "import kotoba_memory.cache_manager.redis_tier, kotoba_memory.cache_manager.tiers\n"
        "print('redis' in sys.modules, 'zstandard' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]
