"""Many real threads hammering one cache keep every invariant: bounds, byte accounting, stats.

Each test runs on every implementation in use: the compiled core (when built and not disabled) and
the pure-Python reference.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from kotoba_memory import _native
from kotoba_memory.cache_manager import CacheManager, CachePolicy, EvictionCause

IMPLEMENTATIONS = ["python"] if _native.load("_ccache") is None else ["c", "python"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("policy", list(CachePolicy))
def test_threaded_hammer_keeps_invariants(policy: CachePolicy, implementation: str) -> None:
    max_bytes = 20_000
    evicted: list[Any] = []
    cache = CacheManager(
        max_bytes,
        policy,
        max_entries=300,
        weigher=len,
        on_evict=lambda k, v, c: evicted.append(c),
        implementation=implementation,
    )
    errors: list[BaseException] = []
    gets = [0] * 8
    stop_at = time.monotonic() + 1.0

    def worker(idx: int) -> None:
        rng = random.Random(idx)
        try:
            for n in range(4000):
                if time.monotonic() > stop_at:
                    break
                key = int(rng.paretovariate(1.1)) % 2000
                op = rng.random()
                if op < 0.6:
                    value = cache.get(key)
                    gets[idx] += 1
                    assert value is None or value[:4] == key.to_bytes(4, "little")
                elif op < 0.9:
                    size = rng.randint(4, 400)
                    value = key.to_bytes(4, "little") + bytes(size - 4)
                    cache.put(key, value, ttl=rng.choice([None, 0.05, 5]))
                elif op < 0.97:
                    cache.delete(key)
                else:
                    cache.get_or_set(key, lambda k=key: k.to_bytes(4, "little") + b"gs")
                if n % 500 == 0:
                    stats = cache.stats()
                    assert stats.bytes <= max_bytes and stats.entries <= 300
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    stats = cache.stats()
    # byte accounting is exact: the counter equals the sum of what is held
    held = [cache._table[k] for k in list(cache._table)]
    assert stats.bytes == sum(e.weight for e in held) <= max_bytes
    assert stats.entries == len(held) <= 300
    # every lookup was counted exactly once as a hit or a miss (get_or_set adds its own lookups)
    assert stats.hits + stats.misses >= sum(gets)
    assert stats.evictions == evicted.count(EvictionCause.SIZE)
    assert stats.expirations >= evicted.count(EvictionCause.EXPIRED)
    if cache._core is not None:
        cache._core.check()  # index, links, segment sizes and byte total all consistent


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_stats_hits_plus_misses_equals_gets_under_threads(implementation: str) -> None:
    cache = CacheManager(max_entries=100, policy="adaptive", implementation=implementation)
    for k in range(100):
        cache.put(k, k)
    per_thread = 20_000

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(per_thread):
            cache.get(rng.randrange(200))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = cache.stats()
    assert stats.hits + stats.misses == 4 * per_thread
    assert 0.3 < stats.hit_rate < 0.7
