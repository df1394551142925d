"""Model-based check: random operation sequences give the same results on the cachelib KotobaCache as on
cachelib's own SimpleCache (below the threshold, where the two eviction strategies do not come in)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("cachelib")
pytest.importorskip("hypothesis")

from cachelib import SimpleCache
from hypothesis import given, settings
from hypothesis import strategies as st

from kotoba_memory_integrations.cachelib import KotobaCache


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


KEYS = st.sampled_from([f"k{i}" for i in range(8)])
VALUES = st.one_of(st.integers(-3, 3), st.none(), st.text(max_size=3), st.lists(st.integers(), max_size=2))
TIMEOUTS = st.sampled_from([None, 0, 100])

OPERATIONS = st.one_of(
    st.tuples(st.just("set"), KEYS, VALUES, TIMEOUTS),
    st.tuples(st.just("add"), KEYS, VALUES, TIMEOUTS),
    st.tuples(st.just("get"), KEYS),
    st.tuples(st.just("has"), KEYS),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("inc"), KEYS, st.integers(-3, 3)),
    st.tuples(st.just("dec"), KEYS, st.integers(-3, 3)),
    st.tuples(st.just("get_many"), st.lists(KEYS, max_size=4)),
    st.tuples(st.just("get_dict"), st.lists(KEYS, max_size=4)),
    st.tuples(st.just("set_many"), st.dictionaries(KEYS, VALUES, max_size=4), TIMEOUTS),
    st.tuples(st.just("delete_many"), st.lists(KEYS, max_size=4)),
    st.tuples(st.just("clear")),
)


def _apply(cache: Any, operation: tuple[Any, ...]) -> Any:
    name, *args = operation
    if name in ("get_many", "get_dict", "delete_many"):
        return getattr(cache, name)(*args[0])
    return getattr(cache, name)(*args)


def _outcome(cache: Any, operation: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        return ("ok", _apply(cache, operation))
    except (TypeError, ValueError) as exc:  # e.g. inc on a list value
        return ("error", type(exc).__name__)


@settings(max_examples=80, deadline=None)
@given(operations=st.lists(OPERATIONS, max_size=60))
def test_same_results_as_simplecache(operations: list[tuple[Any, ...]]) -> None:
    reference, ours = SimpleCache(threshold=1000), KotobaCache(threshold=1000)
    for step, operation in enumerate(operations):
        expected, got = _outcome(reference, operation), _outcome(ours, operation)
        assert got == expected, f"step {step}: {operation!r}: SimpleCache {expected!r}, KotobaCache {got!r}"
    for key in [f"k{i}" for i in range(8)]:
        assert (ours.has(key), ours.get(key)) == (reference.has(key), reference.get(key))
