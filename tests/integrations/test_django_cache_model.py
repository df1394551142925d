"""Model-based check: random operation sequences give the same results on KotobaCache as on LocMemCache.

Django's own LocMemCache is the reference. Both run every generated sequence side by side and must
agree on every return value and exception, culling included (same MAX_ENTRIES/CULL_FREQUENCY, LRU).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("django")
pytest.importorskip("hypothesis")

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.locmem import LocMemCache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotoba_memory_integrations.django import KotobaCache
from kotoba_memory_integrations.django.cache import forget_location

KEYS = st.sampled_from([f"k{i}" for i in range(10)])
VERSIONS = st.sampled_from([None, 2])
VALUES = st.integers(min_value=-5, max_value=5)


def _operations(timeouts: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(
        st.tuples(st.just("set"), KEYS, VALUES, timeouts, VERSIONS),
        st.tuples(st.just("add"), KEYS, VALUES, timeouts, VERSIONS),
        st.tuples(st.just("get"), KEYS, VERSIONS),
        st.tuples(st.just("has_key"), KEYS, VERSIONS),
        st.tuples(st.just("delete"), KEYS, VERSIONS),
        st.tuples(st.just("incr"), KEYS, VALUES, VERSIONS),
        st.tuples(st.just("decr"), KEYS, VALUES, VERSIONS),
        st.tuples(st.just("touch"), KEYS, timeouts, VERSIONS),
        st.tuples(st.just("get_or_set"), KEYS, VALUES, timeouts, VERSIONS),
        st.tuples(st.just("get_many"), st.lists(KEYS, max_size=4), VERSIONS),
        st.tuples(st.just("set_many"), st.dictionaries(KEYS, VALUES, max_size=4), timeouts, VERSIONS),
        st.tuples(st.just("delete_many"), st.lists(KEYS, max_size=4), VERSIONS),
        st.tuples(st.just("incr_version"), KEYS, VERSIONS),
        st.tuples(st.just("clear")),
    )


def _apply(cache: Any, operation: tuple[Any, ...]) -> Any:
    name, *args = operation
    if name == "clear":
        return cache.clear()
    *positional, version = args
    if name in ("set", "add", "touch", "get_or_set", "set_many"):
        *values, timeout = positional
        return getattr(cache, name)(*values, timeout=timeout, version=version)
    if name in ("incr", "decr"):
        key, delta = positional
        return getattr(cache, name)(key, delta, version=version)
    return getattr(cache, name)(*positional, version=version)


def _outcome(cache: Any, operation: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        return ("ok", _apply(cache, operation))
    except (ValueError, TypeError) as exc:
        return ("error", type(exc).__name__)


@pytest.fixture
def pair() -> Iterator[Any]:
    made: list[tuple[str, str]] = []

    def build(**options: Any) -> tuple[LocMemCache, KotobaCache]:
        name = f"model-{uuid.uuid4().hex}"
        made.append((name, name))
        params = {"OPTIONS": options}
        return LocMemCache(name, params), KotobaCache(name, params)

    yield build
    from django.core.cache.backends import locmem

    for name, location in made:
        for registry in (locmem._caches, locmem._expire_info, locmem._locks):
            registry.pop(name, None)
        forget_location(location)


def _run_side_by_side(
    reference: LocMemCache,
    ours: KotobaCache,
    operations: list[tuple[Any, ...]],
    *,
    loose_delete: bool = False,
) -> None:
    for step, operation in enumerate(operations):
        expected, got = _outcome(reference, operation), _outcome(ours, operation)
        if loose_delete and operation[0] == "delete":
            # LocMemCache keeps an entry written with timeout <= 0 as a dead slot, and delete() of it
            # answers True; here nothing was stored, so it answers False. Only the answer differs.
            expected, got = (expected[0], None), (got[0], None)
        assert got == expected, f"step {step}: {operation!r}: LocMemCache {expected!r}, KotobaCache {got!r}"
    for key in [f"k{i}" for i in range(10)]:
        for version in (None, 2, 3):
            missing = "<missing>"
            assert ours.get(key, missing, version=version) == reference.get(key, missing, version=version)


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(
    operations=st.lists(_operations(st.sampled_from([None, 1000, DEFAULT_TIMEOUT])), max_size=60),
    cull_frequency=st.sampled_from([0, 1, 2, 3]),
)
def test_same_results_as_locmem_under_culling(pair: Any, operations: list[Any], cull_frequency: int) -> None:
    """Small MAX_ENTRIES, so culls happen; only live timeouts (LocMemCache keeps dead entries counted)."""
    reference, ours = pair(MAX_ENTRIES=6, CULL_FREQUENCY=cull_frequency)
    _run_side_by_side(reference, ours, operations)


@SETTINGS
@given(operations=st.lists(_operations(st.sampled_from([None, 1000, 0, -1, DEFAULT_TIMEOUT])), max_size=60))
def test_same_results_as_locmem_with_zero_and_negative_timeouts(pair: Any, operations: list[Any]) -> None:
    """No cull pressure; timeouts <= 0 mean "store nothing" and must read back as absent."""
    reference, ours = pair(MAX_ENTRIES=1000)
    _run_side_by_side(reference, ours, operations, loose_delete=True)
