"""TieredCache specifics: memory over disk, spills with remaining ttl, promotion, persist, stats, fork.

The BaseCache contract (get/put/ttl/stats/bad input/get_or_set/async twins/threads) is in
test_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kotoba_memory.cache_manager.disk import DiskCache
from kotoba_memory.cache_manager.memory import CacheManager
from kotoba_memory.cache_manager.tiers import TieredCache, TieredCacheStats
from kotoba_memory.cache_manager.types import CachedValue


def _doc(i: int, size: int = 400) -> str:
    """A JSON document of about ``size`` characters that names its key (self-checking values)."""
    body = json.dumps({"id": i, "items": [f"item-{i}-{j}" for j in range(size // 14)]})
    return body[:size] if len(body) > size else body


def _tiered(
    tmp_path: Path, *, memory_bytes: int = 6000, threshold: int = 2000, **kwargs: object
) -> TieredCache:
    memory = CacheManager(max_bytes=memory_bytes, policy="lru")
    disk = DiskCache(tmp_path / "l2.sqlite3", 1 << 22, compression="zstd", compress_min_bytes=256)
    return TieredCache(memory, disk, spill_threshold_bytes=threshold, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[TieredCache]:
    cache = _tiered(tmp_path)
    yield cache
    cache.close()


def _where(cache: TieredCache, key: object) -> str:
    in_memory, on_disk = key in cache.memory, key in cache.disk
    assert not (in_memory and on_disk), f"{key!r} is in both tiers"
    return "memory" if in_memory else "disk" if on_disk else "none"


def test_small_values_in_memory_large_ones_straight_to_disk(tiered: TieredCache) -> None:
    assert tiered.put("small", "s" * 100)
    assert tiered.put("large", "L" * 5000)
    assert _where(tiered, "small") == "memory"
    assert _where(tiered, "large") == "disk"
    assert tiered.get("large") == "L" * 5000
    assert _where(tiered, "large") == "disk"  # over the threshold: never promoted
    stats = tiered.stats()
    assert stats.direct_to_disk == 1 and stats.promotions == 0


def test_memory_evictions_spill_to_disk_and_hits_promote(tiered: TieredCache) -> None:
    for i in range(40):
        assert tiered.put(i, _doc(i))
    assert len(tiered.memory) < 40
    assert len(tiered) == 40
    assert all(tiered.get(i) == _doc(i) for i in range(40))  # nothing lost: every value from a tier
    stats = tiered.stats()
    assert stats.spills > 0 and stats.promotions > 0 and stats.disk_hits > 0
    assert stats.hits == 40 and stats.misses == 0
    assert stats.memory_hits + stats.disk_hits == 40
    for i in range(40):
        _where(tiered, i)
    # The last key read came from disk and now lives in memory only.
    assert _where(tiered, 39) == "memory"


def test_promote_on_hit_false_reads_in_place(tmp_path: Path) -> None:
    cache = _tiered(tmp_path, promote_on_hit=False)
    for i in range(40):
        cache.put(i, _doc(i))
    spilled = [i for i in range(40) if _where(cache, i) == "disk"]
    assert spilled
    assert cache.get(spilled[0]) == _doc(spilled[0])
    assert _where(cache, spilled[0]) == "disk"
    assert cache.stats().promotions == 0
    cache.close()


def test_spill_keeps_the_remaining_ttl_and_drops_expired(tiered: TieredCache) -> None:
    tiered.put("long", _doc(1), ttl=100)
    tiered.put("short", _doc(2), ttl=0.05)
    tiered.put("forever", _doc(3))
    time.sleep(0.1)
    for i in range(40):  # push the three out of memory
        tiered.put(f"filler{i}", _doc(i))
    assert _where(tiered, "long") == "disk"
    assert _where(tiered, "forever") == "disk"
    assert _where(tiered, "short") == "none"
    assert 95 < (tiered.disk.ttl("long") or 0) <= 100
    assert 95 < (tiered.ttl_remaining("long") or 0) <= 100  # read from whichever tier holds it
    assert tiered.disk.ttl("forever") is None
    assert tiered.get("long") == _doc(1)  # promoted with what is left of its ttl
    assert 95 < (tiered.memory.ttl_remaining("long") or 0) <= 100


def test_disk_entries_expire_and_cached_value_ttl_is_kept(tiered: TieredCache) -> None:
    tiered.put("big", "B" * 5000, ttl=0.05)
    tiered.put("cv", CachedValue("payload", ttl=0.05))
    time.sleep(0.1)
    assert tiered.get("big", "gone") == "gone"
    assert tiered.get("cv", "gone") == "gone"
    assert "big" not in tiered


def test_default_ttl_comes_from_the_memory_tier(tmp_path: Path) -> None:
    memory = CacheManager(max_bytes=4000, policy="lru", default_ttl=50)
    with DiskCache(tmp_path, 1 << 20) as disk:
        cache = TieredCache(memory, disk, spill_threshold_bytes=1000)
        assert cache.default_ttl == 50
        cache.put("big", "x" * 3000)
        assert 45 < (disk.ttl("big") or 0) <= 50


def test_overwrite_moves_between_tiers_without_leaving_a_copy(tiered: TieredCache) -> None:
    tiered.put("k", "x" * 5000)
    assert _where(tiered, "k") == "disk"
    tiered.put("k", "small")
    assert _where(tiered, "k") == "memory"
    assert tiered.get("k") == "small"
    tiered.put("k", "y" * 5000)
    assert _where(tiered, "k") == "disk"
    assert tiered.get("k") == "y" * 5000
    assert len(tiered) == 1


def test_delete_clear_contains_len_add_touch(tiered: TieredCache) -> None:
    tiered.put("m", "in memory")
    tiered.put("d", "D" * 5000)
    assert "m" in tiered and "d" in tiered and "x" not in tiered
    assert len(tiered) == 2
    assert tiered.add("m", "other") is False
    assert tiered.add("d", "other") is False
    assert tiered.add("new", "n") is True
    assert tiered.touch("m", 0.05) and tiered.touch("d", 0.05)
    assert not tiered.touch("absent", 1)
    time.sleep(0.1)
    assert "m" not in tiered and "d" not in tiered
    assert tiered.delete("new") is True
    assert tiered.delete("new") is False
    tiered.put("a", 1)
    tiered.put("b", "b" * 5000)
    tiered.clear()
    assert len(tiered) == 0 and len(tiered.memory) == 0 and len(tiered.disk) == 0


def test_bad_input_raises_and_keeps_what_was_stored(tiered: TieredCache) -> None:
    # Unhashable keys and bad ttls are in the contract suite; this is the disk-bound path.
    tiered.put("k", "kept")
    tiered.put("big", "B" * 5000)
    unpicklable_heavy = [threading.Lock() for _ in range(40)]
    with pytest.raises(TypeError, match="pickl"):
        tiered.put("big", unpicklable_heavy)
    assert tiered.get("k") == "kept"
    assert tiered.get("big") == "B" * 5000
    with pytest.raises(TypeError, match="DiskCache"):
        TieredCache(tiered.memory, tiered.memory)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spill_threshold_bytes"):
        TieredCache(tiered.memory, tiered.disk, spill_threshold_bytes=-1)


def test_unpicklable_small_value_lives_in_memory_and_is_dropped_on_spill(tiered: TieredCache) -> None:
    lock = threading.Lock()
    assert tiered.put("lock", lock)
    assert tiered.get("lock") is lock
    for i in range(40):
        tiered.put(i, _doc(i))
    assert "lock" not in tiered
    stats = tiered.stats()
    assert stats.spill_failures == 1
    assert stats.evictions >= 1


def test_admission_refusals_are_not_lost(tmp_path: Path) -> None:
    memory = CacheManager(max_bytes=8000, policy="adaptive")
    with DiskCache(tmp_path, 1 << 22) as disk:
        cache = TieredCache(memory, disk, spill_threshold_bytes=4000)
        rng = random.Random(3)
        keys = [rng.randrange(120) for _ in range(600)]
        for key in keys:
            if cache.get(key) is None:
                assert cache.put(key, _doc(key, 300))
        assert all(cache.get(k) == _doc(k, 300) for k in set(keys))
        for key in set(keys):
            _where(cache, key)
        assert len(cache) == len(set(keys))


def test_stats_follow_the_contract(tiered: TieredCache) -> None:
    for i in range(30):
        tiered.put(i, _doc(i, 1500))
    tiered.get(0)
    tiered.get("absent")
    stats = tiered.stats()
    assert isinstance(stats, TieredCacheStats)
    assert stats.hits == 1 and stats.misses == 1 and stats.hit_rate == 0.5
    assert stats.entries == stats.memory.entries + stats.disk.entries == 30
    assert stats.bytes == stats.memory.bytes + stats.disk.bytes
    assert stats.max_bytes == 6000 + (1 << 22)
    assert stats.compression_ratio is not None and stats.compression_ratio > 1.5
    assert stats.disk.compression is not None and stats.disk.compression.values_compressed > 0
    assert stats.to_dict()["memory"]["entries"] == stats.memory.entries
    for i in range(130):  # latencies are sampled one lookup in 64
        tiered.get(i % 30)
    for i in range(130):
        tiered.get(f"absent{i}")
    stats = tiered.stats()
    assert stats.hit_latency_ns > 0 and stats.miss_latency_ns > 0
    assert stats.hits == 131 and stats.misses == 131


def test_disk_tier_survives_restart(tmp_path: Path) -> None:
    first = _tiered(tmp_path)
    for i in range(40):
        first.put(i, _doc(i))
    on_disk = [i for i in range(40) if _where(first, i) == "disk"]
    first.close()
    second = _tiered(tmp_path)
    assert on_disk
    assert all(second.get(i) == _doc(i) for i in on_disk)
    second.close()


def test_apersist_and_aclose(tmp_path: Path) -> None:
    # The BaseCache async twins are in the contract suite; these two are TieredCache's own.
    cache = _tiered(tmp_path)

    async def main() -> int:
        await cache.aput("d", "D" * 5000)
        await cache.aput_many({"m": "small", "a": 1, "b": 2})
        moved = await cache.apersist()  # "m", "a", "b" moved to disk
        assert len(cache.memory) == 0 and cache.get("m") == "small"
        await cache.aclose()
        return moved

    assert asyncio.run(main()) == 3
    with pytest.raises(OSError, match="closed"):
        cache.disk.get("d")


def test_persist_moves_memory_entries_to_disk_for_a_restart(tmp_path: Path) -> None:
    first = _tiered(tmp_path)
    first.put("a", _doc(1), ttl=100)
    first.put("b", _doc(2))
    first.put("gone", _doc(3), ttl=0.05)
    time.sleep(0.1)
    assert _where(first, "a") == "memory"
    first.close(persist=True)
    second = _tiered(tmp_path)
    assert second.get("a") == _doc(1) and second.get("b") == _doc(2)
    assert second.get("gone") is None
    assert 95 < (second.memory.ttl_remaining("a") or 0) <= 100
    second.close()


def test_ttl_bookkeeping_stays_bounded(tmp_path: Path) -> None:
    cache = _tiered(tmp_path, memory_bytes=1 << 20)
    for i in range(200):
        cache.put(i, f"v{i}", ttl=0.05)
    cache.put("keep", "k", ttl=100)
    cache.put("keep", "k2")  # overwritten without a ttl: nothing to remember any more
    time.sleep(0.1)
    assert all(cache.get(i) is None for i in range(200))  # each read expires one entry
    assert len(cache._deadlines) == 0
    assert cache.stats().memory.expirations == 200
    cache.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_usable_in_a_forked_worker(tiered: TieredCache) -> None:
    import warnings

    tiered.put("m", "memory value")
    tiered.put("d", "D" * 5000)
    inside, release = threading.Event(), threading.Event()

    def busy() -> None:
        with tiered._lock:  # a request thread inside the cache when the server forks
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=busy)
    thread.start()
    assert inside.wait(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 3
        try:
            signal.alarm(20)
            ok = tiered.get("m") == "memory value" and tiered.get("d") == "D" * 5000
            ok = ok and tiered.put("from-child", "x" * 5000)
            code = 0 if ok else 1
        finally:
            os._exit(code)
    release.set()
    thread.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert tiered.get("from-child") == "x" * 5000  # written to the shared disk tier by the child


def test_value_the_memory_tier_rejects_replaces_the_disk_copy(tmp_path: Path) -> None:
    memory = CacheManager(max_bytes=2000, policy="lru")
    with DiskCache(tmp_path, 1 << 20) as disk:
        cache = TieredCache(memory, disk, spill_threshold_bytes=5000)  # threshold above memory's bound
        cache.put("k", "old" * 2000)  # over the threshold: disk
        cache.put("k", "n" * 3000)  # under the threshold, but more than the memory tier can hold
        assert cache.get("k") == "n" * 3000
        assert _where(cache, "k") == "disk"
        assert cache.stats().memory.rejections >= 1


def test_get_many_reads_memory_then_disk_in_one_batch(tiered: TieredCache) -> None:
    for i in range(40):
        tiered.put(i, _doc(i))
    tiered.put("big", "B" * 5000)
    on_disk = [i for i in range(40) if _where(tiered, i) == "disk"]
    in_memory = [i for i in range(40) if _where(tiered, i) == "memory"]
    assert on_disk and in_memory
    wanted = [*in_memory[:2], *on_disk[:3], "big", "absent"]
    got = tiered.get_many(wanted)
    assert got == {k: _doc(k) for k in [*in_memory[:2], *on_disk[:3]]} | {"big": "B" * 5000}
    stats = tiered.stats()
    assert stats.hits == 6 and stats.misses == 1
    assert stats.disk_hits == 4 and stats.memory_hits == 2
    assert _where(tiered, "big") == "disk"  # over the threshold: stays on disk
    for key in range(40):
        _where(tiered, key)  # never in both tiers
    assert asyncio.run(tiered.aget_many([on_disk[0], "absent"])) == {on_disk[0]: _doc(on_disk[0])}


def test_a_full_disk_degrades_to_memory_never_serves_a_stale_copy_and_recovers(
    small_disk: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11 item 6: a full disk made puts raise and lost the entries that could not be spilled."""
    memory = CacheManager(max_bytes=6000, policy="lru")
    disk = DiskCache(small_disk.root / "l2.sqlite3", 1 << 30, timeout=0.5)
    cache = TieredCache(memory, disk, spill_threshold_bytes=2000, disk_retry_interval=0)
    old_heavy = b"o" * 2500
    assert cache.put("heavy-old", old_heavy) and _where(cache, "heavy-old") == "disk"
    assert cache.put("k", b"old copy " * 300) and _where(cache, "k") == "disk"
    small_disk.fill()
    with caplog.at_level("WARNING", logger="kotoba_memory.cache_manager.tiers"):
        for i in range(100):  # heavy values go to disk until it refuses one (the WAL has some slack)
            assert cache.put(f"heavy{i}", bytes([i]) * 2500)  # never raises, never refuses
            if cache.stats().degraded:
                break
        assert cache.stats().degraded
        assert cache.get(f"heavy{i}") == bytes([i]) * 2500  # kept by the memory tier instead
        assert cache.put("k", "new value")  # its disk copy cannot be deleted: it becomes stale
        for j in range(30):  # push "k" out of memory: spills fail, the entries leave the cache
            assert cache.put(f"doc{j}", _doc(j))
        assert "k" not in memory
        assert cache.get("k") is None  # never the stale copy still on disk
        assert "k" not in cache
        assert cache.get("heavy-old") == old_heavy  # the disk is still read where its copy is good
        stats = cache.stats()
        assert stats.degraded and stats.disk_errors >= 1 and stats.spill_failures >= 1
        said = [r for r in caplog.records if "disk tier failed" in r.getMessage()]
        assert len(said) == 1  # said once for the outage, not once per failed operation
        small_disk.free()
        assert cache.put("after", b"a" * 2500)
        assert _where(cache, "after") == "disk"  # the disk tier is used again
        assert "k" not in disk  # the stale copy was deleted before the disk was trusted again
        assert not cache.stats().degraded
        assert any("works again" in r.getMessage() for r in caplog.records)
        cache.put("spilled", _doc(99))
        for j in range(30):
            cache.put(f"again{j}", _doc(j))
        assert cache.get("spilled") == _doc(99)  # spilled to disk and read back
    cache.close()


def test_too_many_stale_disk_copies_distrust_the_whole_disk_until_it_is_cleared(
    small_disk: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kotoba_memory.cache_manager import tiers as tiers_module

    monkeypatch.setattr(tiers_module, "_STALE_LIMIT", 2)  # the bound on remembered stale keys
    memory = CacheManager(max_bytes=1 << 20, policy="lru")
    disk = DiskCache(small_disk.root / "l2.sqlite3", 1 << 30, timeout=0.5)
    cache = TieredCache(memory, disk, spill_threshold_bytes=2000, disk_retry_interval=0)
    for i in range(4):
        assert cache.put(f"k{i}", bytes([i]) * 2500) and _where(cache, f"k{i}") == "disk"
    assert cache.put("untouched", b"u" * 2500)
    small_disk.fill()
    for i in range(100):  # use up the WAL's slack until the disk refuses
        cache.put(f"filler{i}", b"f" * 2500)
        if cache.stats().degraded:
            break
    for i in range(4):  # new values in memory; their disk copies cannot be deleted
        assert cache.put(f"k{i}", f"new {i}")
    for i in range(4):
        assert memory.delete(f"k{i}")  # as if evicted without a spill
    assert [cache.get(f"k{i}") for i in range(4)] == [None] * 4  # no stale copy served
    assert cache.get("untouched") is None  # past the bound the whole disk tier is distrusted
    small_disk.free()
    assert cache.put("after", b"a" * 2500)  # the disk is cleared, then used again
    assert not cache.stats().degraded
    assert "untouched" not in disk and "k0" not in disk
    assert cache.get("after") == b"a" * 2500
    cache.close()
