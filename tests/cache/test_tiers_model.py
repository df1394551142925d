"""Property test: with a disk tier large enough, a TieredCache behaves exactly like a dict.

Whatever the memory tier's size and policy, spills, promotions and overwrites across tiers must neither
lose a value nor resurrect an old one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotoba_memory.cache_manager.disk import DiskCache
from kotoba_memory.cache_manager.memory import CacheManager
from kotoba_memory.cache_manager.tiers import TieredCache

_keys = st.integers(min_value=0, max_value=12)
_values = st.builds(lambda n, c: c * n, st.integers(min_value=1, max_value=3000), st.sampled_from("abc"))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _keys, _values),
        st.tuples(st.just("get"), _keys, st.none()),
        st.tuples(st.just("delete"), _keys, st.none()),
        st.tuples(st.just("add"), _keys, _values),
        st.tuples(st.just("get_many"), _keys, st.none()),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=_ops,
    policy=st.sampled_from(["lru", "lfu", "fifo", "adaptive"]),
    promote=st.booleans(),
    memory_bytes=st.sampled_from([1500, 6000, 20000]),  # 1500: below the spill threshold
)
def test_tiered_cache_matches_a_dict(
    ops: list[tuple[str, int, str | None]], policy: str, promote: bool, memory_bytes: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = TieredCache(
            CacheManager(max_bytes=memory_bytes, policy=policy),
            DiskCache(Path(tmp), 1 << 24),
            spill_threshold_bytes=2000,
            promote_on_hit=promote,
        )
        model: dict[int, str] = {}
        try:
            for op, key, value in ops:
                if op == "put":
                    assert value is not None
                    assert cache.put(key, value)
                    model[key] = value
                elif op == "add":
                    assert value is not None
                    assert cache.add(key, value) == (key not in model)
                    model.setdefault(key, value)
                elif op == "delete":
                    assert cache.delete(key) == (key in model)
                    model.pop(key, None)
                elif op == "get_many":
                    wanted = [key, (key + 3) % 13, (key + 7) % 13, key]
                    assert cache.get_many(wanted) == {k: model[k] for k in wanted if k in model}
                else:
                    assert cache.get(key) == model.get(key)
                assert len(cache) == len(model)
            for key in range(13):
                assert (key in cache) == (key in model)
                assert not (key in cache.memory and key in cache.disk)
                assert cache.get(key) == model.get(key)
        finally:
            cache.close()
