"""Hostile input at the compiled cache core's entry points: no crash, no corrupted state, clear errors.

Wrong argument types and counts, weighers returning nonsense, huge sizes, unhashable keys, and keys
whose ``__hash__``/``__eq__`` raise or re-enter the cache (put, delete, clear, read) in the middle of a
lookup, plus values whose ``__del__`` re-enters it while they are dropped. After every operation the
core's own invariant check (``Core.check``: index, links, segment sizes, byte total, bounds) must pass.
The pure-Python reference is not fuzzed for re-entrant writes: its lock is not re-entrant, so a key
whose ``__eq__`` writes to the same cache from inside a write deadlocks there (documented).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotoba_memory import _native
from kotoba_memory.cache_manager import CacheManager, CachePolicy, UnhashableKeyError
from kotoba_memory.errors import ConfigError, KotobaMemoryError

CORE = _native.load("_ccache")
if CORE is None:
    if os.environ.get("CI") and not _native.pure_python_forced():
        raise RuntimeError("CI must build kotoba_memory._ccache (scripts/bootstrap.sh compiles it)")
    pytest.skip("the compiled cache core is not in use", allow_module_level=True)


def _check(cache: CacheManager) -> None:
    assert cache._core is not None
    cache._core.check()
    stats = cache.stats()
    held = [cache._table[k] for k in list(cache._table)]
    assert stats.bytes == sum(e.weight for e in held)
    assert stats.entries == len(held) == len(cache)


class Boom(Exception):
    """Raised on purpose by a hostile key."""


class Hostile:
    """A key that collides with its peers and may raise or re-enter the cache from __hash__/__eq__."""

    cache: CacheManager | None = None
    busy = False  # one level of re-entry: a hostile call inside a hostile call only compares

    def __init__(self, ident: int, bucket: int, action: str) -> None:
        self.ident, self.bucket, self.action = ident, bucket, action

    def _act(self, where: str) -> None:
        cache = Hostile.cache
        if cache is None or Hostile.busy or not self.action.startswith(where):
            return
        Hostile.busy = True
        try:
            what = self.action.split("-", 1)[1]
            if what == "raise":
                raise Boom(f"{where} of key {self.ident}")
            if what == "put":
                cache.put(("reentrant", self.ident), b"v" * 10)
            elif what == "delete":
                for key in cache.keys()[:2]:
                    cache.delete(key)
            elif what == "clear":
                cache.clear()
            elif what == "read":
                cache.get(("reentrant", self.ident))
                len(cache)
                cache.stats()
            elif what == "fill":
                for i in range(20):
                    cache.put(("fill", self.ident, i), b"f" * 30)
        finally:
            Hostile.busy = False

    def __hash__(self) -> int:
        self._act("hash")
        return self.bucket

    def __eq__(self, other: object) -> bool:
        self._act("eq")
        return isinstance(other, Hostile) and other.ident == self.ident

    def __repr__(self) -> str:
        return f"Hostile({self.ident}, {self.action})"


class Haunted:
    """A value whose __del__ writes to the cache that just dropped it."""

    cache: CacheManager | None = None

    def __init__(self, n: int) -> None:
        self.n = n

    def __del__(self) -> None:
        cache = Haunted.cache
        if cache is not None and self.n % 3 == 0:
            cache.put(("ghost", self.n % 5), b"g" * 5)


ACTIONS = [
    "none",
    "hash-raise",
    "eq-raise",
    "eq-put",
    "eq-delete",
    "eq-clear",
    "eq-read",
    "eq-fill",
    "hash-put",
    "hash-clear",
    "hash-read",
]
KEY = st.one_of(
    st.builds(Hostile, st.integers(0, 12), st.integers(0, 2), st.sampled_from(ACTIONS)),
    st.integers(0, 12),
    st.sampled_from([[1], {"a": 1}, "s"]),
)
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["get", "put", "add", "delete", "pop", "touch", "contains", "put_many", "ttl", "haunt"]
        ),
        KEY,
        st.integers(0, 60),
    ),
    max_size=60,
)
EXPECTED = (Boom, UnhashableKeyError, KeyError, RuntimeError)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, policy=st.sampled_from(list(CachePolicy)), bytes_bound=st.booleans())
def test_hostile_keys_never_corrupt_the_core(
    ops: list[tuple[str, Any, int]], policy: CachePolicy, bytes_bound: bool
) -> None:
    events: list[Any] = []
    cache = CacheManager(
        400 if bytes_bound else None,
        policy,
        max_entries=None if bytes_bound else 6,
        weigher=lambda v: 8 if isinstance(v, Haunted) else len(v),
        on_evict=lambda k, v, c: events.append(k),
    )
    Hostile.cache = cache
    Haunted.cache = cache
    try:
        for n, (op, key, size) in enumerate(ops):
            try:
                if op == "get":
                    cache.get(key)
                elif op == "put":
                    cache.put(key, b"x" * size, 5.0 if size % 2 else None)
                elif op == "add":
                    cache.add(key, b"y" * size)
                elif op == "delete":
                    cache.delete(key)
                elif op == "pop":
                    cache.pop(key, None)
                elif op == "touch":
                    cache.touch(key, 1.0)
                elif op == "contains":
                    key in cache  # noqa: B015
                elif op == "put_many" and not isinstance(key, (list, dict)):
                    cache.put_many({key: b"z" * size, n: b"w"})
                elif op == "ttl":
                    cache.ttl_remaining(key)
                else:
                    cache.put(key, Haunted(n))
                    cache.put(key, Haunted(n + 1))  # the first one is dropped here
            except EXPECTED:
                pass
            Hostile.cache = None  # the checks below compare keys; no re-entry from them
            try:
                _check(cache)
            finally:
                Hostile.cache = cache
        cache.clear()
        gc.collect()
        _check(cache)
    finally:
        Hostile.cache = None
        Haunted.cache = None


def test_an_eq_that_always_mutates_ends_with_a_clear_error() -> None:
    cache = CacheManager(max_entries=1000, policy="lru")  # roomy: the colliding key is never evicted

    class Restless:
        def __hash__(self) -> int:
            return 7

        def __eq__(self, other: object) -> bool:
            cache.put(object(), 1)  # a new key every time: the table never holds still
            return False

    cache.put(Restless(), 1)
    with pytest.raises(RuntimeError, match="changed during every key comparison"):
        cache.get(Restless())
    _check(cache)


@pytest.mark.parametrize("policy", list(CachePolicy))
def test_wrong_types_and_counts_are_clear_errors(policy: CachePolicy) -> None:
    cache = CacheManager(1000, policy, max_entries=10)
    core = cache._core
    assert core is not None
    with pytest.raises(TypeError):
        core.get()
    with pytest.raises(TypeError):
        core.get(1, 2, 3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        core.get(1, dflt=2)
    with pytest.raises(TypeError, match="multiple values"):
        core.get(1, key=1)
    assert core.get(key=1, default="d") == "d"
    with pytest.raises(TypeError):
        core.put(1)
    with pytest.raises(TypeError):
        core.pop()
    with pytest.raises(TypeError):
        core.put_prepared("not a list")
    with pytest.raises(TypeError):
        core.put_prepared([("too", "short")])
    with pytest.raises(TypeError):
        core.sweep("many")
    with pytest.raises(KotobaMemoryError):
        cache.put(1, b"x", ttl="soon")
    with pytest.raises(KotobaMemoryError):
        cache.put(1, b"x", ttl=-1)
    with pytest.raises(KotobaMemoryError):
        cache.touch(1, ttl=float("inf"))
    with pytest.raises(UnhashableKeyError):
        cache.put([1], b"x")
    with pytest.raises(UnhashableKeyError):
        cache.get({})
    with pytest.raises(UnhashableKeyError):
        [] in cache  # noqa: B015
    with pytest.raises(RuntimeError):
        core.__init__(
            0, 1, 1, None, None, len, False, None, None, None, len, ValueError, TypeError, None, 1, 2
        )
    _check(cache)
    assert cache.stats().bytes == 0


@pytest.mark.parametrize("implementation", ["c", "python"])
@pytest.mark.parametrize(
    ("weight", "error", "match"),
    [
        ("12", TypeError, "must return an int, got str"),
        (1.5, TypeError, "got float"),
        (True, TypeError, "got bool"),
        (-1, ValueError, "negative weight"),
        (-(2**70), ValueError, "negative weight"),
        (2**48 + 1, ValueError, "largest weight"),
        (2**80, ValueError, "largest weight"),
    ],
)
def test_weigher_nonsense_is_refused_the_same_way(
    implementation: str, weight: Any, error: type, match: str
) -> None:
    cache = CacheManager(max_entries=4, weigher=lambda v: weight, implementation=implementation)
    with pytest.raises(error, match=match):
        cache.put("k", b"v")
    assert "k" not in cache and cache.stats().puts == 0


def test_huge_bounds_run_or_fall_back_cleanly() -> None:
    big = CacheManager(max_entries=2**62, policy="lru")
    assert big.implementation == "c"
    big.put(1, b"x")
    assert big.get(1) == b"x"
    huge = CacheManager(2**80, "adaptive")  # beyond what the core takes: the reference runs it
    assert huge.implementation == "python"
    huge.put(1, b"x")
    assert huge.get(1) == b"x"
    with pytest.raises(ConfigError, match="implementation"):
        CacheManager(2**80, "lru", implementation="c")
    with pytest.raises(ConfigError, match="implementation"):
        CacheManager(10, "lru", implementation="rust")
    heavy = CacheManager(2**48, "lru", weigher=lambda v: v)
    assert heavy.put("a", 2**48) is True
    assert heavy.put("b", 1) is True  # evicts "a"
    assert heavy.keys() == ["b"] and heavy.stats().bytes == 1


def test_probation_hits_beyond_the_buffer_keep_the_oldest_out() -> None:
    # More probation hits between writes than the promotion buffer holds (4096): both implementations
    # drop the oldest buffered hits the same way.
    results = {}
    for impl in ("c", "python"):
        cache = CacheManager(max_entries=200, policy="adaptive", implementation=impl)
        for k in range(400):
            cache.put(k, k)
        for _ in range(30):
            for k in range(400):
                cache.get(k)
        cache.put("w", 1)
        for k in range(400, 700):
            cache.put(k, k)
            cache.get(k - 200)
        results[impl] = (sorted(map(str, cache.keys())), cache._describe(), cache.stats().evictions)
    assert results["c"] == results["python"]


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        -5,
        2**30,
        2**64,
        -(2**200),
        "",
        "a",
        "é" * 10,
        "\U0001f600" * 3,
        1.5,
        float("inf"),
        b"",
        b"abc",
        bytearray(b"xy"),
        True,
        None,
        1j,
        range(10),
        memoryview(b"abcd"),
        [1, 2],
        {"a": (1, 2)},
        frozenset({1}),
    ],
)
def test_default_weights_match_the_reference(value: Any) -> None:
    caches = [CacheManager(max_entries=4, implementation=i) for i in ("c", "python")]
    for cache in caches:
        cache.put("k", value)
    weights = [cache.stats().bytes for cache in caches]
    assert weights[0] == weights[1] > 0
