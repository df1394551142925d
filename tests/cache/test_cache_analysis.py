"""analyze(): the online miss-ratio-curve estimate matches a real run at twice the size; recommendations."""

from __future__ import annotations

import itertools
import random

import pytest

from kotoba_memory.cache_manager import CacheManager, CachePolicy

_MISS = object()


def zipf_trace(n_keys: int, requests: int, alpha: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(n_keys)]
    keys = list(range(n_keys))
    rng.shuffle(keys)
    return rng.choices(keys, weights=weights, k=requests)


def replay(cache: CacheManager, trace: list[int]) -> float:
    hits = 0
    for k in trace:
        if cache.get(k, _MISS) is _MISS:
            cache.put(k, k)
        else:
            hits += 1
    return hits / len(trace)


@pytest.mark.parametrize(("policy", "tolerance"), [(CachePolicy.LRU, 0.02), (CachePolicy.ADAPTIVE, 0.05)])
def test_mrc_estimate_at_twice_the_size_matches_a_real_run(policy: CachePolicy, tolerance: float) -> None:
    trace = zipf_trace(10_000, 30_000, 0.8, seed=7)
    small = CacheManager(max_entries=500, policy=policy)
    replay(small, trace)
    analysis = small.analyze()
    curve = analysis.miss_ratio_curve
    assert min(curve) == 500 and max(curve) == 1000
    estimated_hit_rate = 1.0 - curve[1000]
    actual = replay(CacheManager(max_entries=1000, policy=policy), trace)
    assert abs(estimated_hit_rate - actual) <= tolerance, (estimated_hit_rate, actual)
    # the curve is monotone: more room never misses more
    ratios = [curve[c] for c in sorted(curve)]
    assert all(a >= b for a, b in itertools.pairwise(ratios))
    assert any("2.0x the size" in r and "%" in r for r in analysis.recommendations)


def test_mrc_for_byte_bounded_cache() -> None:
    trace = zipf_trace(5000, 30_000, 0.9, seed=3)
    cache = CacheManager(200 * 100, CachePolicy.LRU, weigher=lambda v: 100)
    replay(cache, trace)
    curve = cache.analyze().miss_ratio_curve
    actual = replay(CacheManager(400 * 100, CachePolicy.LRU, weigher=lambda v: 100), trace)
    assert abs((1.0 - curve[max(curve)]) - actual) <= 0.02


def test_analysis_scores_and_recommends_with_numbers() -> None:
    cache = CacheManager(max_entries=100, policy="lru", default_ttl=60)
    for i in range(300):
        cache.put(i, b"v" * 10)
    assert cache.put("big", b"x", ttl=1) is True
    analysis = cache.analyze()
    assert analysis.stats.entries == 100
    assert 0.0 <= analysis.cache_effectiveness <= 1.0
    tiny = CacheManager(100, "lru")
    tiny.put("too-big", b"x" * 500)
    recs = tiny.analyze().recommendations
    assert any("1 puts were refused" in r for r in recs)


def test_effectiveness_reflects_hit_rate() -> None:
    good = CacheManager(max_entries=1000, policy="lru")
    bad = CacheManager(max_entries=10, policy="lru")
    trace = zipf_trace(2000, 20_000, 1.0, seed=1)
    replay(good, trace)
    replay(bad, trace)
    assert good.analyze().cache_effectiveness > bad.analyze().cache_effectiveness


def test_bookkeeping_advice_needs_many_entries_and_memory_worth_saving() -> None:
    # Two tiny values: the per-entry figure would be the cache's fixed tables split two ways.
    few = CacheManager(max_entries=1000, policy="adaptive")
    for k in range(2):
        few.put(k, b"x" * 100)
    assert not any("Bookkeeping" in r for r in few.analyze().recommendations)
    # Many tiny values: bookkeeping dwarfs them and adds up to megabytes.
    many = CacheManager(max_entries=50_000, policy="adaptive")
    for k in range(20_000):
        many.put(k, b"x")
    stats = many.stats()
    assert stats.metadata_bytes >= 1 << 20 and stats.metadata_overhead > 0.25
    advice = many.analyze().recommendations
    assert any("Bookkeeping" in r and "cache fewer, larger values" in r for r in advice)
