"""CacheManager specifics: bounds, config errors, listeners, sweeping, fork, strict mode.

The BaseCache contract (get/put/ttl/stats/bad input/get_or_set/async twins) is in test_contract.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kotoba_memory.cache_manager import (
    CachedValue,
    CacheManager,
    CacheMetadata,
    CachePolicy,
    EntryTooLargeError,
    EvictionCause,
    default_weigher,
    iter_caches,
)

POLICIES = list(CachePolicy)


def test_values_are_stored_by_reference() -> None:
    cache = CacheManager(max_entries=10, policy="lru")
    value = [1, 2]
    cache.put("k", value)
    assert cache.get("k") is value


def test_policy_accepts_strings_and_rejects_unknown() -> None:
    assert CacheManager(max_entries=1, policy="LRU").policy is CachePolicy.LRU
    with pytest.raises(ValueError, match="unknown cache policy"):
        CacheManager(max_entries=1, policy="mru")
    with pytest.raises(TypeError):
        CacheManager(max_entries=1, policy=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({}, ValueError),
        ({"max_bytes": 0}, ValueError),
        ({"max_bytes": -5}, ValueError),
        ({"max_entries": 0}, ValueError),
        ({"max_bytes": 1.5}, TypeError),
        ({"max_entries": "10"}, TypeError),
        ({"max_entries": True}, TypeError),
        ({"max_entries": 5, "default_ttl": 0}, ValueError),
        ({"max_entries": 5, "default_ttl": "1"}, TypeError),
        ({"max_entries": 5, "weigher": 3}, TypeError),
        ({"max_entries": 5, "on_evict": "x"}, TypeError),
    ],
)
def test_bad_config_raises_clear_errors(kwargs: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        CacheManager(**kwargs)


def test_bad_weigher_results_raise_without_storing() -> None:
    neg = CacheManager(1000, weigher=lambda v: -1)
    with pytest.raises(ValueError, match="negative"):
        neg.put("k", 1)
    wrong = CacheManager(1000, weigher=lambda v: "big")  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="weigher"):
        wrong.put("k", 1)
    assert len(neg) == 0 and len(wrong) == 0 and neg.stats().bytes == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_entry_bound_is_never_exceeded(policy: CachePolicy) -> None:
    cache = CacheManager(max_entries=50, policy=policy)
    for i in range(1000):
        cache.put(i, i)
        cache.get(i // 2)
        assert len(cache) <= 50
    stats = cache.stats()
    assert stats.entries == len(cache) <= 50
    assert stats.evictions == stats.puts - stats.entries


@pytest.mark.parametrize("policy", POLICIES)
def test_byte_bound_with_custom_weigher(policy: CachePolicy) -> None:
    cache = CacheManager(1000, policy, weigher=len)
    assert cache.weigher is len  # public: TieredCache weighs its spill threshold with it
    assert CacheManager(1000, policy).weigher is default_weigher
    for i in range(200):
        cache.put(i, b"x" * (i % 90 + 1))
        assert cache.stats().bytes <= 1000
    held = sum(len(cache.get(k, b"")) for k in list(cache.keys()))
    assert cache.stats().bytes == held


def test_lru_evicts_least_recently_used() -> None:
    cache = CacheManager(max_entries=3, policy=CachePolicy.LRU)
    for k in "abc":
        cache.put(k, k)
    cache.get("a")
    cache.put("d", "d")
    assert "b" not in cache and {"a", "c", "d"} <= set(cache.keys())


def test_fifo_ignores_hits() -> None:
    cache = CacheManager(max_entries=3, policy=CachePolicy.FIFO)
    for k in "abc":
        cache.put(k, k)
    for _ in range(5):
        cache.get("a")
    cache.put("d", "d")
    assert "a" not in cache


def test_lfu_keeps_frequent_and_ages() -> None:
    cache = CacheManager(max_entries=3, policy=CachePolicy.LFU)
    for k in "abc":
        cache.put(k, k)
    for _ in range(10):
        cache.get("a")
        cache.get("b")
    cache.put("d", "d")
    assert "c" not in cache and "a" in cache and "b" in cache


def test_eviction_callback_reports_size_and_not_delete_or_overwrite() -> None:
    events: list[tuple[Any, Any, EvictionCause]] = []
    cache = CacheManager(max_entries=2, policy="lru", on_evict=lambda k, v, c: events.append((k, v, c)))
    cache.put("a", 1)
    cache.put("a", 2)
    cache.put("b", 3)
    cache.delete("b")
    cache.put("c", 4)
    cache.put("d", 5)
    assert events == [("a", 2, EvictionCause.SIZE)]
    extra: list[Any] = []

    def listener(k: Any, v: Any, c: EvictionCause) -> None:
        extra.append(k)

    cache.add_eviction_listener(listener)
    cache.put("e", 6)
    cache.remove_eviction_listener(listener)
    cache.put("f", 7)
    assert extra == ["c"]
    cache.clear()
    assert len(events) == 3


def test_failing_listener_does_not_break_the_cache() -> None:
    def boom(k: Any, v: Any, c: EvictionCause) -> None:
        raise RuntimeError("listener bug")

    cache = CacheManager(max_entries=1, on_evict=boom, policy="lru")
    cache.put("a", 1)
    assert cache.put("b", 2) is True
    assert cache.get("b") == 2


def test_expiry_is_reported_to_eviction_listeners() -> None:
    # Expiry itself, default_ttl and ttl_remaining are in the contract suite (test_contract.py).
    events: list[Any] = []
    cache = CacheManager(max_entries=10, default_ttl=0.05, on_evict=lambda k, v, c: events.append((k, c)))
    cache.put("short", 1)
    cache.put("long", 2, ttl=60)
    time.sleep(0.08)
    assert cache.get("short") is None
    assert events == [("short", EvictionCause.EXPIRED)]


def test_idle_cache_reclaims_expired_memory() -> None:
    events: list[Any] = []
    cache = CacheManager(max_entries=100, policy="lru", on_evict=lambda k, v, c: events.append(c))
    for i in range(20):
        cache.put(i, b"x" * 100, ttl=0.05)
    deadline = time.monotonic() + 5
    while len(cache) and time.monotonic() < deadline:
        time.sleep(0.05)  # no cache calls: only the shared sweeper thread can reclaim
    assert len(cache) == 0
    assert cache.stats().bytes == 0
    assert events == [EvictionCause.EXPIRED] * 20


def test_cached_value_is_stored_as_is_and_weighed_by_its_metadata() -> None:
    # Its own ttl is honoured by every cache: see the contract suite (test_contract.py).
    cache = CacheManager(10_000, "lru")
    cv = CachedValue(b"payload", CacheMetadata("application/octet-stream", 7), ttl=0.05)
    assert cache.put("cv", cv)
    got = cache.get("cv")
    assert got is cv and got.metadata.size_bytes == 7
    assert cache.stats().bytes == 7
    derived = CachedValue("text")
    assert derived.metadata.content_type == "str" and derived.size_bytes > 4
    with pytest.raises(ValueError):
        CacheMetadata("x", -1)
    with pytest.raises(ValueError):
        CachedValue(b"", ttl=-1)


def test_iter_caches_holds_caches_weakly() -> None:
    cache = CacheManager(max_entries=1, name="registry-probe")
    assert any(c is cache for c in iter_caches())
    del cache
    import gc

    gc.collect()
    assert not any(c.name == "registry-probe" for c in iter_caches())


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_gets_fresh_locks_and_a_working_sweeper() -> None:
    import os

    cache = CacheManager(max_entries=100, policy="adaptive")
    cache.put("a", 1)
    cache.put("short", 2, ttl=0.05)
    held = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with cache._lock:
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:  # child: the parent's lock holder does not exist here
        code = 1
        try:
            ok = cache.put("b", 3) and cache.get("a") == 1 and cache.get("b") == 3
            # A ttl'd put schedules the sweeper, which resumes the child's scheduler thread.
            ok = ok and cache.put("c", 4, ttl=60)
            deadline = time.monotonic() + 5
            while "short" in cache._table and time.monotonic() < deadline:
                time.sleep(0.05)
            code = 0 if ok and "short" not in cache._table else 2
        finally:
            os._exit(code)
    release.set()
    holder.join(5)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_strict_mode_raises_for_an_entry_larger_than_the_cache() -> None:
    from kotoba_memory.cache_manager import EntryTooLargeError

    cache = CacheManager(100, "lru", weigher=len, strict=True)
    cache.put("k", b"x" * 10)
    with pytest.raises(EntryTooLargeError, match="max_bytes=100") as info:
        cache.put("k", b"y" * 101)
    assert isinstance(info.value, ValueError) and info.value.weight == 101
    assert cache.get("k") == b"x" * 10  # nothing changed
    assert cache.stats().rejections == 1


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "adaptive"])
def test_put_reclaims_expired_entries_before_evicting_live_ones(policy: str) -> None:
    cache = CacheManager(max_entries=20, policy=policy)
    for i in range(10):
        cache.put(("short", i), i, ttl=0.05)
    for i in range(10):
        cache.put(("long", i), i, ttl=60)
    time.sleep(0.1)
    for i in range(8):
        cache.put(("new", i), i, ttl=60)
    for i in range(10):
        assert cache.get(("long", i)) == i
    stats = cache.stats()
    assert stats.evictions == 0
    assert stats.expirations >= 8


class _Unweighable:
    """A value the test weigher refuses, standing for any value a weigher cannot size."""


def _weigh_or_refuse(value: Any) -> int:
    if isinstance(value, _Unweighable):
        raise TypeError("cannot weigh an _Unweighable")
    return default_weigher(value)


@pytest.mark.parametrize("policy", POLICIES)
def test_put_many_with_an_unweighable_value_stores_nothing(policy: CachePolicy) -> None:
    cache = CacheManager(max_bytes=1 << 20, policy=policy, weigher=_weigh_or_refuse)
    cache.put("a", "old a")
    with pytest.raises(TypeError, match="cannot weigh"):
        cache.put_many({"a": "new a", "bad": _Unweighable(), "c": "new c"})
    assert cache.get("a") == "old a"
    assert "bad" not in cache and "c" not in cache
    with pytest.raises(ValueError, match="ttl"):
        cache.put_many({"a": "newer a", "c": "c"}, ttl=-1)
    assert cache.get("a") == "old a" and "c" not in cache
    cache.put_many({"a": "new a", "c": "new c"})
    assert cache.get_many(["a", "c"]) == {"a": "new a", "c": "new c"}


def test_strict_put_many_refuses_the_whole_batch_when_one_entry_is_too_large() -> None:
    cache = CacheManager(max_bytes=1000, policy="lru", strict=True)
    cache.put("a", "old a")
    with pytest.raises(EntryTooLargeError):
        cache.put_many({"a": "new a", "huge": "x" * 5000})
    assert cache.get("a") == "old a" and "huge" not in cache
