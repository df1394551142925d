"""Property tests: random operation sequences against simple reference models."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kotoba_memory.cache_manager import CacheManager, CachePolicy, EvictionCause

keys = st.integers(min_value=0, max_value=12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("put"), keys, st.integers(min_value=1, max_value=60)),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("add"), keys, st.integers(min_value=1, max_value=60)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, max_entries=st.integers(min_value=1, max_value=6))
def test_lru_matches_an_ordered_dict_model(ops: list[tuple[Any, ...]], max_entries: int) -> None:
    evicted: list[Any] = []
    cache = CacheManager(
        max_entries=max_entries, policy=CachePolicy.LRU, on_evict=lambda k, v, c: evicted.append(k)
    )
    model: OrderedDict[int, int] = OrderedDict()
    model_evicted: list[int] = []
    for op in ops:
        if op[0] == "get":
            expected = model.get(op[1])
            if op[1] in model:
                model.move_to_end(op[1])
            assert cache.get(op[1]) == expected
        elif op[0] in ("put", "add"):
            if op[0] == "add" and op[1] in model:
                assert cache.add(op[1], op[2]) is False
                continue
            model[op[1]] = op[2]
            model.move_to_end(op[1])
            while len(model) > max_entries:
                model_evicted.append(model.popitem(last=False)[0])
            stored = cache.put(op[1], op[2]) if op[0] == "put" else cache.add(op[1], op[2])
            assert stored is True
        else:
            assert cache.delete(op[1]) is (model.pop(op[1], None) is not None)
        assert list(cache.keys()) == list(model)
    assert evicted == model_evicted


@settings(max_examples=100, deadline=None)
@given(
    ops=ops, policy=st.sampled_from(list(CachePolicy)), max_bytes=st.integers(min_value=40, max_value=150)
)
def test_every_policy_keeps_bytes_and_contents_consistent(
    ops: list[tuple[Any, ...]], policy: CachePolicy, max_bytes: int
) -> None:
    events: list[tuple[Any, EvictionCause]] = []
    cache = CacheManager(
        max_bytes, policy, weigher=lambda v: v, on_evict=lambda k, v, c: events.append((k, c))
    )
    last_written: dict[int, int] = {}
    for op in ops:
        if op[0] == "get":
            got = cache.get(op[1])
            # a hit returns the latest value written for that key, never an older one
            assert got is None or got == last_written.get(op[1])
        elif op[0] == "put":
            cache.put(op[1], op[2])
            last_written[op[1]] = op[2]
        elif op[0] == "add":
            if cache.add(op[1], op[2]):
                last_written[op[1]] = op[2]
        else:
            cache.delete(op[1])
            last_written.pop(op[1], None)
        stats = cache.stats()
        held = {k: e.weight for k, e in list(cache._table.items())}
        assert stats.bytes == sum(held.values()) <= max_bytes
        assert stats.entries == len(held)
    assert all(cause is EvictionCause.SIZE for _, cause in events)
    assert cache.stats().evictions == len(events)


def test_listener_may_use_the_cache_without_deadlock() -> None:
    cache = CacheManager(max_entries=2, policy="lru")
    seen: list[Any] = []

    def listener(key: Any, value: Any, cause: EvictionCause) -> None:
        # runs outside the cache lock: reading and writing the same cache is allowed
        seen.append((key, cache.get("probe")))
        if not isinstance(key, tuple):
            cache.put(("evicted", key), value)

    cache.add_eviction_listener(listener)
    cache.put("probe", 1)
    cache.put("a", 2)
    cache.put("b", 3)
    assert seen and seen[0][0] == "probe"
    assert len(cache) <= 2
