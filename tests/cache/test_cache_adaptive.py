"""ADAPTIVE on generated access patterns: survives loops and scans, follows recency, adapts its window."""

from __future__ import annotations

import random

from kotoba_memory.cache_manager import CacheManager, CachePolicy
from kotoba_memory.cache_manager.adaptive import FrequencySketch

_MISS = object()


def hit_rate(policy: CachePolicy, trace: list[int], capacity: int) -> tuple[float, CacheManager]:
    cache = CacheManager(max_entries=capacity, policy=policy)
    hits = 0
    for k in trace:
        if cache.get(k, _MISS) is _MISS:
            cache.put(k, k)
        else:
            hits += 1
    return hits / len(trace), cache


def test_loop_larger_than_the_cache() -> None:
    # A loop over 1.5x the capacity: LRU and FIFO score 0; a frequency filter keeps a fixed subset.
    trace = list(range(300)) * 40
    lru, _ = hit_rate(CachePolicy.LRU, trace, 200)
    adaptive, cache = hit_rate(CachePolicy.ADAPTIVE, trace, 200)
    assert lru == 0.0
    assert adaptive > 0.5
    assert cache.analyze().stats.entries == 200


def test_scan_does_not_flush_the_hot_set() -> None:
    rng = random.Random(5)
    hot = list(range(100))
    trace: list[int] = []
    scan_key = 10_000
    for _ in range(40):
        trace += [rng.choice(hot) for _ in range(300)]
        trace += list(range(scan_key, scan_key + 400))  # a one-off scan, 2x the cache
        scan_key += 400
    lru, _ = hit_rate(CachePolicy.LRU, trace, 200)
    adaptive, _ = hit_rate(CachePolicy.ADAPTIVE, trace, 200)
    assert adaptive > lru + 0.1


def test_recency_workload_grows_the_window_and_matches_lru() -> None:
    # A sliding working set: each key is used a few times soon after it appears, then never again.
    rng = random.Random(11)
    trace = []
    for i in range(30_000):
        base = i // 3
        trace.append(base + rng.randrange(150))
    lru, _ = hit_rate(CachePolicy.LRU, trace, 200)
    adaptive, cache = hit_rate(CachePolicy.ADAPTIVE, trace, 200)
    # the window starts at 1% and grows to most of the cache; the cost is the adaptation period
    assert adaptive >= lru - 0.04
    assert cache._describe()["window_fraction"] > 0.5


def test_frequency_workload_keeps_a_small_window_and_beats_lru() -> None:
    rng = random.Random(2)
    weights = [1.0 / (i + 1) for i in range(5000)]
    trace = rng.choices(range(5000), weights=weights, k=30_000)
    lru, _ = hit_rate(CachePolicy.LRU, trace, 100)
    adaptive, cache = hit_rate(CachePolicy.ADAPTIVE, trace, 100)
    assert adaptive > lru + 0.03
    assert cache._describe()["window_fraction"] < 0.3


def test_sketch_counts_saturate_and_age() -> None:
    # an int key: its hash is the same in every process, so which counters it shares with the
    # filler keys below (str hashes are salted per process and collided in ~1% of runs) is fixed
    hot = 1_000_003
    sketch = FrequencySketch(64)
    for _ in range(40):
        sketch.add(hot)
    assert sketch.frequency(hot) == 16  # 15 in the counters plus the doorkeeper bit
    assert sketch.frequency("cold") <= 1
    sketch.age()
    assert sketch.frequency(hot) == 7
    for i in range(sketch.sample_size):
        sketch.add(i)
    assert sketch.frequency(hot) <= 3


def test_sketch_ages_after_sample_size_requests_and_not_sooner() -> None:
    hot = 1_000_003
    sketch = FrequencySketch(64)
    sketch.add(hot, 3)
    assert sketch.additions == 3
    for _ in range(sketch.sample_size - 4):
        sketch.add(hot)
    # every request counts once, whether it reached the counters or only the doorkeeper
    assert sketch.additions == sketch.sample_size - 1
    assert sketch.frequency(hot) == 16
    sketch.add(hot)
    assert sketch.additions == sketch.sample_size // 2
    assert sketch.frequency(hot) == 7


def test_byte_bounded_adaptive_respects_the_bound() -> None:
    rng = random.Random(4)
    cache = CacheManager(50_000, CachePolicy.ADAPTIVE, weigher=len)
    for _ in range(20_000):
        k = int(rng.paretovariate(1.0)) % 3000
        if cache.get(k) is None:
            cache.put(k, bytes(rng.randint(10, 2000)))
        assert cache.stats().bytes <= 50_000 if rng.random() < 0.01 else True
    stats = cache.stats()
    assert stats.bytes <= 50_000
    assert stats.hit_rate > 0.2


def test_hill_climbing_alternative_also_adapts() -> None:
    rng = random.Random(11)
    trace = [i // 3 + rng.randrange(150) for i in range(30_000)]
    # the hill climber is kept for comparison in the pure-Python implementation only
    cache = CacheManager(max_entries=200, policy=CachePolicy.ADAPTIVE, implementation="python")
    cache._policy.adapt = "climb"  # type: ignore[attr-defined]
    for k in trace:
        if cache.get(k) is None:
            cache.put(k, k)
    details = cache._policy.describe()
    assert details["adjustments"] > 0
    assert details["window_fraction"] > 0.05  # grew from 1% on a recency-friendly trace
