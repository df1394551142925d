"""RedisCache specifics against a real redis-server: prefixes, incr, serializers, scans, two processes.

The BaseCache contract (get/put/ttl/stats/bad input/get_or_set/async twins/threads) is in
test_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from kotoba_memory.cache_manager.inventory import cache_inventory
from kotoba_memory.cache_manager.redis_tier import RedisCache, RedisCacheStats

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


def test_get_many_put_many(cache: RedisCache) -> None:
    cache.put_many({f"k{i}": i * 10 for i in range(1200)}, ttl=60)
    got = cache.get_many([f"k{i}" for i in range(0, 1300, 100)])
    assert got == {f"k{i}": i * 10 for i in range(0, 1200, 100)}
    assert 59 < (cache.ttl("k5") or 0) <= 60


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


def test_bad_config_is_named(redis_url: str) -> None:
    # Bad input to the methods (keys, ttls, unserializable values) is in the contract suite.
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


def test_aincr_and_aclose(redis_url: str, prefix: str) -> None:
    # The BaseCache async twins are in the contract suite; these two are RedisCache's own.
    c = RedisCache(redis_url, prefix=prefix)

    async def main() -> list[object]:
        out: list[object] = [await c.aincr("n", 3), await c.aincr("n")]
        c.clear()
        await c.aclose()
        return out

    assert asyncio.run(main()) == [3, 4]


def test_ttl_is_an_alias_of_ttl_remaining(cache: RedisCache) -> None:
    cache.put("later", 1, ttl=60)
    cache.put("forever", 2)
    assert 59 < (cache.ttl("later") or 0) <= 60
    assert cache.ttl("forever") is None
    with pytest.raises(KeyError):
        cache.ttl("absent")


def test_stats_rescans_occupancy_at_most_every_scan_interval(redis_url: str, prefix: str) -> None:
    c = RedisCache(redis_url, prefix=prefix, scan_interval=3600)
    try:
        c.put_many({"a": 12345, "b": 1234567890})  # ints are stored as decimal text: 5 + 10 bytes
        first = c.stats()
        assert isinstance(first, RedisCacheStats)
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


def test_incr_is_atomic_across_threads(cache: RedisCache) -> None:
    # The thread hammer over get/put/delete is in the contract suite; incr is RedisCache's own.
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(50):
                cache.incr("counter")
        except BaseException as exc:  # pragma: no cover - only on failure
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert cache.get("counter") == 200
    stats = cache.stats(refresh=True)
    assert stats.entries == 1 and stats.hits == 1 and stats.puts == 0  # incr is not a put


def test_module_import_does_not_load_redis() -> None:
    code = (
        "import sys\n"
        "import kotoba_memory.cache_manager.redis_tier, kotoba_memory.cache_manager.tiers\n"
        "print('redis' in sys.modules, 'zstandard' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def _scan_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_processes_sharing_a_prefix_share_one_scan_per_interval(restartable_redis: Any) -> None:
    # Four caches on their own connections stand for four workers; the private server counts SCANs.
    url = restartable_redis.url
    raw = redis.Redis.from_url(url)
    workers = [RedisCache(url, prefix="shared:", scan_interval=3600) for _ in range(4)]
    try:
        workers[0].put_many({f"k{i}": 1234567890 for i in range(1200)})
        raw.config_resetstat()
        first = workers[0].stats()
        one_scan = _scan_calls(raw)
        assert one_scan >= 3 and (first.entries, first.bytes) == (1200, 12000)
        for worker in workers[1:]:
            seen = worker.stats()
            assert (seen.entries, seen.bytes, seen.occupancy_complete) == (1200, 12000, True)
            assert seen.occupancy_age_s >= 0
        assert _scan_calls(raw) == one_scan  # the other three read the shared figures
        assert len(workers[1]) == 1200  # the bookkeeping key is not an entry
        rows = {row["name"]: row for row in cache_inventory(limit=1000)[0]}
        assert rows[workers[1].name]["shared"] is True  # a fleet view counts its entries once
        assert workers[1].stats(refresh=True).entries == 1200
        workers[0].clear()
        assert raw.keys("shared:*") == []  # clear() takes the bookkeeping keys with it
    finally:
        for worker in workers:
            worker.close()
        raw.close()


def test_an_occupancy_scan_stops_at_scan_max_keys(cache: RedisCache, redis_url: str, prefix: str) -> None:
    cache.put_many({f"k{i}": 1234567890 for i in range(1000)})
    cache.put("\x00\xffoccupancy", 1)  # a user key that looks like ours is still an entry
    capped = RedisCache(redis_url, prefix=prefix, scan_max_keys=100, scan_interval=0)
    try:
        stats = capped.stats()
        assert (stats.entries, stats.occupancy_complete) == (100, False)
        assert 100 * 10 - 10 <= stats.bytes <= 100 * 10
        full = cache.stats(refresh=True)
        assert (full.entries, full.occupancy_complete) == (1001, True)
    finally:
        capped.close()
    with pytest.raises(ValueError, match="scan_max_keys"):
        RedisCache(redis_url, prefix=prefix, scan_max_keys=0)


def test_stats_keep_the_last_occupancy_while_redis_is_paused(restartable_redis: Any) -> None:
    server = restartable_redis
    client = redis.Redis.from_url(server.url, socket_timeout=0.2)
    cache = RedisCache(client, prefix="paused:", scan_interval=0.3)
    commands = 0
    real_execute = client.execute_command

    def counted_execute(*args: Any, **kwargs: Any) -> Any:
        nonlocal commands
        commands += 1
        return real_execute(*args, **kwargs)

    client.execute_command = counted_execute  # type: ignore[method-assign]
    try:
        cache.put_many({f"k{i}": b"v" for i in range(50)})
        cache.get("k1")
        assert cache.stats(refresh=True).entries == 50
        server.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(0.35)
            before = commands
            stats = cache.stats()  # a rescan is due: it times out, and the last figures stay
            assert stats.entries == 50 and stats.hits == 1
            assert stats.occupancy_error is not None and "Timeout" in stats.occupancy_error
            again = cache.stats()
            assert again.occupancy_error == stats.occupancy_error
            assert commands == before + 1  # the failed rescan is not retried before scan_interval
            with pytest.raises(redis.TimeoutError):
                cache.stats(refresh=True)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        time.sleep(0.35)
        cache.put("k50", b"v")
        recovered = cache.stats()
        assert (recovered.entries, recovered.occupancy_error) == (51, None)
    finally:
        cache.clear()
        cache.close()
