"""The compiled cache core against the pure-Python reference: same operations, same everything.

Hypothesis state machines drive one cache of each implementation (same policy, bounds, weigher and a
shared fake clock) through the same operation sequence and require identical return values, eviction
and expiry events (same victims in the same order), stats and contents after every step. The sweeper
is replaced by a recorder so no background thread touches either cache mid-sequence.
``KOTOBA_DIFF_EXAMPLES`` (default 100 per policy, sized for CI) raises the search; run several hundred
after changing either implementation.
"""

from __future__ import annotations

import os
import random
from collections.abc import Hashable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kotoba_memory import _native
from kotoba_memory.cache_manager import CacheManager, CachePolicy, EvictionCause
from kotoba_memory.cache_manager import memory as memory_module

CORE = _native.load("_ccache")
if CORE is None:
    if os.environ.get("CI") and not _native.pure_python_forced():
        raise RuntimeError("CI must build kotoba_memory._ccache (scripts/bootstrap.sh compiles it)")
    pytest.skip(
        "the compiled cache core is not in use (not built, or pure Python forced)", allow_module_level=True
    )


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingSweeper:
    """Stands in for the shared sweeper: remembers registrations, runs nothing in the background."""

    def __init__(self) -> None:
        self.registered: list[str] = []

    def register(self, cache: Any) -> None:
        self.registered.append(cache.implementation)

    def unregister(self, cache: Any) -> None:
        self.registered.append("-" + cache.implementation)


@pytest.fixture(autouse=True)
def _fake_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(memory_module, "sweeper", RecordingSweeper())
    yield


KEYS = st.one_of(st.integers(0, 24), st.sampled_from(["a", "b", "c", ("t", 1), 1.5, b"k"]))
TTLS = st.one_of(st.none(), st.none(), st.sampled_from([0.5, 1.0, 3.0, 10.0]))


def _value(n: int, size: int) -> bytes:
    return n.to_bytes(2, "little") + bytes(size)


class Differential(RuleBasedStateMachine):
    """One cache per implementation, driven in lockstep."""

    policy: CachePolicy = CachePolicy.LRU

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.events: dict[str, list[tuple[Any, Any, EvictionCause]]] = {"c": [], "python": []}
        self.n = 0

    @initialize(
        bound=st.sampled_from(["entries", "bytes", "both"]),
        size=st.one_of(st.integers(1, 12), st.integers(30, 150)),
        custom_weigher=st.booleans(),
        default_ttl=st.sampled_from([None, None, 2.0]),
        listening=st.booleans(),
    )
    def build(
        self, bound: str, size: int, custom_weigher: bool, default_ttl: float | None, listening: bool
    ) -> None:
        original = memory_module._monotonic
        memory_module._monotonic = self.clock  # type: ignore[assignment]
        try:
            self.caches = {
                impl: self._make(impl, bound, size, custom_weigher, default_ttl, listening)
                for impl in ("c", "python")
            }
        finally:
            memory_module._monotonic = original
        assert self.caches["c"].implementation == "c"
        assert self.caches["python"].implementation == "python"

    def _make(
        self,
        impl: str,
        bound: str,
        size: int,
        custom_weigher: bool,
        default_ttl: float | None,
        listening: bool,
    ) -> CacheManager:
        events = self.events[impl]
        kwargs: dict[str, Any] = {"implementation": impl, "default_ttl": default_ttl}
        if bound in ("entries", "both"):
            kwargs["max_entries"] = size
        max_bytes = None
        if bound in ("bytes", "both"):
            max_bytes = size * (40 if custom_weigher else 60)
        if custom_weigher:
            kwargs["weigher"] = lambda v: len(v) + 3
        cache = CacheManager(max_bytes, self.policy, **kwargs)
        if listening:
            cache.add_eviction_listener(lambda k, v, cause: events.append((k, v, cause)))
        return cache

    def both(self, method: str, *args: Any) -> Any:
        results = {}
        for impl, cache in self.caches.items():
            try:
                results[impl] = ("ok", getattr(cache, method)(*args))
            except Exception as exc:  # compared below: same type and message
                results[impl] = ("raised", (type(exc), str(exc)))
        assert results["c"] == results["python"], (method, args, results)
        return results["c"]

    # -- operations ---------------------------------------------------------------------------------

    @rule(key=KEYS, size=st.integers(0, 90), ttl=TTLS)
    def put(self, key: Hashable, size: int, ttl: float | None) -> None:
        self.n += 1
        self.both("put", key, _value(self.n, size), ttl)

    @rule(key=KEYS, size=st.integers(0, 90), ttl=TTLS)
    def add(self, key: Hashable, size: int, ttl: float | None) -> None:
        self.n += 1
        self.both("add", key, _value(self.n, size), ttl)

    @rule(items=st.dictionaries(KEYS, st.integers(0, 60), max_size=5), ttl=TTLS)
    def put_many(self, items: dict[Hashable, int], ttl: float | None) -> None:
        self.n += 1
        mapping = {k: _value(self.n, size) for k, size in items.items()}
        self.both("put_many", mapping, ttl)

    @rule(key=KEYS, repeat=st.integers(1, 70))
    def get(self, key: Hashable, repeat: int) -> None:
        for _ in range(repeat):  # repeats cross the 1-in-64 sampled reads and their upkeep
            self.both("get", key, "missing")

    @rule(keys=st.lists(KEYS, max_size=6))
    def get_many(self, keys: list[Hashable]) -> None:
        self.both("get_many", keys)

    @rule(seed=st.integers(0, 2**16), n=st.integers(50, 400), span=st.sampled_from([20, 60, 200]))
    def burst(self, seed: int, n: int, span: int) -> None:
        """A skewed stream of reads and writes: admission contests, window moves, heap compaction."""
        rng = random.Random(seed)
        for _ in range(n):
            key = int(rng.paretovariate(0.8)) % span
            if rng.random() < 0.6:
                self.both("get", key)
            else:
                self.n += 1
                self.both("put", key, _value(self.n, rng.randrange(40)), rng.choice([None, None, 0.5, 4.0]))
            if rng.random() < 0.02:
                self.clock.now += 0.3

    @rule(
        entries=st.one_of(st.none(), st.integers(1, 40)), nbytes=st.one_of(st.none(), st.integers(20, 3000))
    )
    def rebound(self, entries: int | None, nbytes: int | None) -> None:
        """Bounds may change between puts (the Django backend lowers max_entries for one culling put)."""
        for cache in self.caches.values():
            if entries is None and nbytes is None:
                nbytes = 1000
            cache.max_entries = entries
            cache.max_bytes = nbytes
        self.n += 1
        self.both("put", "rebound", _value(self.n, 5))

    @rule(key=KEYS)
    def contains(self, key: Hashable) -> None:
        self.both("__contains__", key)

    @rule(key=KEYS)
    def delete(self, key: Hashable) -> None:
        self.both("delete", key)

    @rule(key=KEYS, with_default=st.booleans())
    def pop(self, key: Hashable, with_default: bool) -> None:
        self.both("pop", key, *(("d",) if with_default else ()))

    @rule(key=KEYS, ttl=TTLS)
    def touch(self, key: Hashable, ttl: float | None) -> None:
        self.both("touch", key, ttl)

    @rule(key=KEYS)
    def ttl_remaining(self, key: Hashable) -> None:
        self.both("ttl_remaining", key)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.5, 5.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(limit=st.integers(1, 5))
    def sweep(self, limit: int) -> None:
        self.both("sweep_expired", limit)

    @precondition(lambda self: self.n % 7 == 0)
    @rule()
    def clear(self) -> None:
        self.both("clear")

    @rule(key=st.sampled_from([[1], {"a": 1}]))
    def unhashable(self, key: Any) -> None:
        self.both("get", key)
        self.both("put", key, b"x")

    @rule(ttl=st.sampled_from([-1, 0, float("nan"), "1", True]))
    def bad_ttl(self, ttl: Any) -> None:
        self.both("put", 1, b"x", ttl)

    # -- comparisons --------------------------------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        c, py = self.caches["c"], self.caches["python"]
        assert self.events["c"] == self.events["python"]
        sc, sp = c.stats(), py.stats()
        for field in (
            "hits",
            "misses",
            "evictions",
            "expirations",
            "rejections",
            "puts",
            "deletes",
            "bytes",
            "entries",
        ):
            assert getattr(sc, field) == getattr(sp, field), field
        if self.policy is CachePolicy.ADAPTIVE:
            assert sorted(map(repr, c.keys())) == sorted(map(repr, py.keys()))
        else:
            assert c.keys() == py.keys()
        assert c._describe() == py._describe()
        assert c.analyze().miss_ratio_curve == py.analyze().miss_ratio_curve
        c._core.check()


def _machine(policy: CachePolicy) -> type[Differential]:
    return type(f"Differential{policy.name.title()}", (Differential,), {"policy": policy})


_SETTINGS = settings(
    max_examples=int(os.environ.get("KOTOBA_DIFF_EXAMPLES", "100")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestLru = _machine(CachePolicy.LRU).TestCase
TestLru.settings = _SETTINGS
TestFifo = _machine(CachePolicy.FIFO).TestCase
TestFifo.settings = _SETTINGS
TestLfu = _machine(CachePolicy.LFU).TestCase
TestLfu.settings = _SETTINGS
TestAdaptive = _machine(CachePolicy.ADAPTIVE).TestCase
TestAdaptive.settings = _SETTINGS
