"""@cached, @track_memory and instrument/uninstrument, against a real CacheManager and real threads."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import tracemalloc
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("wrapt")

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.hooks import (
    InstrumentationError,
    cached,
    instrument,
    instrumented_targets,
    iter_tracked_functions,
    track_memory,
    uninstrument,
)


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


@pytest.fixture
def cache() -> CacheManager:
    return CacheManager(max_entries=1000, policy="lru")


# --- @cached ---------------------------------------------------------------------------------------------


def test_cached_function_runs_once_per_argument_set(cache: CacheManager) -> None:
    calls: list[tuple[Any, ...]] = []

    @cached(cache)
    def add(a: int, b: int = 0) -> int:
        calls.append((a, b))
        return a + b

    assert add(1, 2) == 3
    assert add(1, 2) == 3
    assert add(a=1, b=5) == 6
    assert add(b=5, a=1) == 6  # keyword order does not matter
    assert add(2) == 2
    assert calls == [(1, 2), (1, 5), (2, 0)]
    assert add.__name__ == "add"
    assert add.__wrapped__(1, 2) == 3


def test_cached_none_result_is_cached(cache: CacheManager) -> None:
    calls = []

    @cached(cache)
    def nothing(x: int) -> None:
        calls.append(x)

    assert nothing(1) is None
    assert nothing(1) is None
    assert calls == [1]


def test_exceptions_are_not_cached(cache: CacheManager) -> None:
    attempts = []

    @cached(cache)
    def flaky(x: int) -> int:
        attempts.append(x)
        if len(attempts) == 1:
            raise RuntimeError("first call fails")
        return x

    with pytest.raises(RuntimeError):
        flaky(3)
    assert flaky(3) == 3
    assert flaky(3) == 3
    assert attempts == [3, 3]


def test_ttl_expires_results(cache: CacheManager) -> None:
    calls = []

    @cached(cache, ttl=0.2)
    def now(x: int) -> int:
        calls.append(x)
        return len(calls)

    assert now(1) == 1
    time.sleep(0.4)
    assert now(1) == 2
    assert calls == [1, 1]


def test_custom_key_and_invalidate(cache: CacheManager) -> None:
    calls = []

    @cached(cache, key=lambda user_id, verbose=False: f"user:{user_id}")
    def load(user_id: int, verbose: bool = False) -> dict[str, Any]:
        calls.append(user_id)
        return {"id": user_id}

    assert load(7) == {"id": 7}
    assert load(7, verbose=True) == {"id": 7}  # the key ignores verbose
    assert load.cache_key(7) == "user:7"
    assert cache.get("user:7") == {"id": 7}
    assert load.invalidate(7) is True
    assert load.invalidate(7) is False
    load(7)
    assert calls == [7, 7]


def test_unhashable_arguments_are_a_clear_type_error(cache: CacheManager) -> None:
    @cached(cache)
    def f(items: list[int]) -> int:
        return sum(items)

    with pytest.raises(TypeError, match="hashable"):
        f([1, 2])


def test_invalid_decorator_arguments(cache: CacheManager) -> None:
    with pytest.raises(ValueError, match="ttl"):
        cached(cache, ttl=0)
    with pytest.raises(TypeError, match="ttl"):
        cached(cache, ttl="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="kotoba-memory cache"):
        cached({})  # type: ignore[arg-type]

    class LooksLikeACache:  # e.g. Django's cache: same method names, other signatures
        def get_or_set(self, key: Any, default: Any, timeout: Any = None) -> Any: ...
        async def aget_or_set(self, key: Any, default: Any, timeout: Any = None) -> Any: ...
        def delete(self, key: Any) -> bool: ...

    with pytest.raises(TypeError, match="kotoba-memory cache"):
        cached(LooksLikeACache())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        cached(cache, key="name")  # type: ignore[arg-type]


class Repo:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Repo) and other.name == self.name


def test_methods_key_on_the_instance(cache: CacheManager) -> None:
    class Service:
        def __init__(self, factor: int) -> None:
            self.factor = factor
            self.calls = 0

        @cached(cache)
        def scale(self, x: int) -> int:
            self.calls += 1
            return x * self.factor

    two, three = Service(2), Service(3)
    assert two.scale(5) == 10
    assert two.scale(5) == 10
    assert three.scale(5) == 15
    assert Service.scale(two, 5) == 10  # the unbound call shares the bound call's key
    assert (two.calls, three.calls) == (1, 1)
    assert two.scale.invalidate(5) is True
    assert two.scale(5) == 10
    assert two.calls == 2
    assert three.scale.cache is cache


def test_classmethods_and_staticmethods(cache: CacheManager) -> None:
    calls: list[str] = []

    class Maths:
        @cached(cache)
        @classmethod
        def ident(cls, x: int) -> tuple[str, int]:
            calls.append("class")
            return (cls.__name__, x)

        @cached(cache)
        @staticmethod
        def double(x: int) -> int:
            calls.append("static")
            return 2 * x

    class Sub(Maths):
        pass

    assert Maths.ident(1) == ("Maths", 1)
    assert Maths().ident(1) == ("Maths", 1)
    assert Sub.ident(1) == ("Sub", 1)  # the class is part of the key
    assert Maths.double(4) == 8
    assert Maths().double(4) == 8
    assert calls == ["class", "class", "static"]


def test_concurrent_threads_compute_once(cache: CacheManager) -> None:
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    @cached(cache)
    def slow(x: int) -> int:
        calls.append(x)
        started.set()
        release.wait(timeout=10)
        return x * 10

    results: list[int] = []
    lock = threading.Lock()

    def caller() -> None:
        value = slow(4)
        with lock:
            results.append(value)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert started.wait(timeout=10)
    time.sleep(0.1)  # let the other callers queue up behind the first
    release.set()
    for thread in threads:
        thread.join(timeout=10)
    assert results == [40] * 8
    assert calls == [4]


def test_async_functions_are_awaited_and_computed_once(cache: CacheManager) -> None:
    calls: list[int] = []

    @cached(cache, ttl=30)
    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.05)
        return x + 1

    assert asyncio.iscoroutinefunction(fetch)

    async def scenario() -> list[int]:
        return list(await asyncio.gather(*(fetch(1) for _ in range(10)), fetch(2)))

    assert asyncio.run(scenario()) == [2] * 10 + [3]
    assert calls == [1, 2]
    assert asyncio.run(scenario()) == [2] * 10 + [3]
    assert calls == [1, 2]


def test_async_methods(cache: CacheManager) -> None:
    class Client:
        calls = 0

        @cached(cache)
        async def get(self, path: str) -> str:
            type(self).calls += 1
            return path.upper()

    client = Client()

    async def scenario() -> tuple[str, str]:
        return await client.get("/a"), await client.get("/a")

    assert asyncio.run(scenario()) == ("/A", "/A")
    assert Client.calls == 1


# --- @track_memory ---------------------------------------------------------------------------------------


def test_track_memory_with_tracemalloc_sees_retained_bytes() -> None:
    keep: list[bytearray] = []

    @track_memory
    def allocate(n: int) -> None:
        keep.append(bytearray(n))

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        for _ in range(3):
            allocate(200_000)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    stats = allocate.memory_stats()
    assert stats.calls == 3
    assert stats.tracemalloc_calls == 3
    assert stats.source == "tracemalloc"
    assert stats.min_bytes >= 200_000
    assert stats.total_bytes >= 600_000
    assert stats.p50_bytes >= 200_000
    assert stats.name.endswith("allocate")


def test_track_memory_without_tracing_uses_rss_and_counts_errors() -> None:
    @track_memory()
    def boom(fail: bool) -> int:
        if fail:
            raise ValueError("nope")
        return 1

    if tracemalloc.is_tracing():
        pytest.skip("another tracer is active")
    assert boom(False) == 1
    with pytest.raises(ValueError):
        boom(True)
    stats = boom.memory_stats()
    assert (stats.calls, stats.errors, stats.rss_calls, stats.source) == (2, 1, 2, "rss")
    boom.reset_memory_stats()
    assert boom.memory_stats().calls == 0


def test_track_memory_on_methods_async_and_threads() -> None:
    class Worker:
        @track_memory
        def run(self, n: int) -> list[int]:
            return list(range(n))

        @track_memory
        async def arun(self, n: int) -> int:
            await asyncio.sleep(0)
            return n

    worker = Worker()
    threads = [threading.Thread(target=lambda: [worker.run(10) for _ in range(25)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert worker.run.memory_stats().calls == 100
    assert Worker.run.memory_stats().calls == 100
    assert asyncio.run(worker.arun(3)) == 3
    assert worker.arun.memory_stats().calls == 1
    names = [s.name for s in iter_tracked_functions()]
    assert any(name.endswith("Worker.run") for name in names)


# --- instrument / uninstrument -----------------------------------------------------------------------------


@pytest.fixture
def target_module() -> Iterator[types.ModuleType]:
    """A throwaway importable module with functions and classes to patch."""
    name = f"kotoba_hooks_target_{uuid.uuid4().hex}"
    module = types.ModuleType(name)
    source = """
calls = []

def compute(x):
    calls.append(x)
    return x * 2

class Base:
    def greet(self, who):
        calls.append(who)
        return "hi " + who

    @staticmethod
    def static(x):
        calls.append(x)
        return x + 100

    @classmethod
    def klass(cls, x):
        calls.append(x)
        return cls.__name__ + str(x)

class Child(Base):
    pass

NOT_CALLABLE = 42
"""
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    sys.modules[name] = module
    yield module
    uninstrument()
    sys.modules.pop(name, None)


def test_instrument_module_function_and_restore_identity(target_module: types.ModuleType) -> None:
    name = target_module.__name__
    original = target_module.compute
    handle = instrument(f"{name}:compute", track_memory)
    assert target_module.compute is not original
    assert target_module.compute(3) == 6
    assert target_module.compute.memory_stats().calls == 1
    assert instrumented_targets() == [f"{name}:compute"]
    assert handle.active
    assert uninstrument(f"{name}:compute") is True
    assert target_module.compute is original
    assert not handle.active
    assert uninstrument(f"{name}:compute") is False  # idempotent
    assert instrumented_targets() == []


def test_instrument_methods_with_a_cache(target_module: types.ModuleType, cache: CacheManager) -> None:
    name = target_module.__name__
    base = target_module.Base
    originals = {attr: vars(base)[attr] for attr in ("greet", "static", "klass")}
    for attr in originals:
        instrument(f"{name}:Base.{attr}", cache=cache, ttl=60)
    obj = base()
    assert obj.greet("ada") == "hi ada"
    assert obj.greet("ada") == "hi ada"
    assert base.static(1) == 101
    assert obj.static(1) == 101
    assert base.klass(2) == "Base2"
    assert target_module.Child.klass(2) == "Child2"
    assert target_module.calls == ["ada", 1, 2, 2]
    assert uninstrument() is True
    for attr, original in originals.items():
        assert vars(base)[attr] is original
    assert obj.greet("bob") == "hi bob"


def test_instrument_inherited_method_through_subclass_leaves_no_residue(
    target_module: types.ModuleType,
) -> None:
    name = target_module.__name__
    child, base = target_module.Child, target_module.Base
    original = vars(base)["greet"]
    instrument(f"{name}:Child.greet", track=True)
    assert "greet" in vars(child)
    assert child().greet("x") == "hi x"
    assert base().greet("y") == "hi y"
    assert vars(base)["greet"] is original
    uninstrument(f"{name}:Child.greet")
    assert "greet" not in vars(child)
    assert vars(base)["greet"] is original


def test_instrument_with_a_wrapt_wrapper_function(target_module: types.ModuleType) -> None:
    seen: list[tuple[Any, tuple[Any, ...]]] = []

    def spy(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seen.append((instance, args))
        return wrapped(*args, **kwargs)

    name = target_module.__name__
    handle = instrument(f"{name}:Base.greet", spy)
    obj = target_module.Base()
    assert obj.greet("z") == "hi z"
    assert seen == [(obj, ("z",))]
    assert handle.remove() is True
    assert handle.remove() is False


def test_instrument_is_idempotent_and_refuses_conflicts(
    target_module: types.ModuleType, cache: CacheManager
) -> None:
    name = target_module.__name__
    first = instrument(f"{name}:compute", track=True)
    assert instrument(f"{name}:compute", track=True) is first
    target_module.compute(1)
    assert target_module.compute.memory_stats().calls == 1  # not wrapped twice
    with pytest.raises(InstrumentationError, match="already instrumented"):
        instrument(f"{name}:compute", cache=cache)
    uninstrument(f"{name}:compute")
    second = instrument(f"{name}:compute", cache=cache)
    assert second is not first


def test_instrument_rejects_bad_targets(target_module: types.ModuleType, cache: CacheManager) -> None:
    name = target_module.__name__
    with pytest.raises(InstrumentationError, match="form"):
        instrument("no_colon_here", track=True)
    with pytest.raises(InstrumentationError, match="form"):
        instrument(f"{name}:1bad", track=True)
    with pytest.raises(InstrumentationError, match="import"):
        instrument("kotoba_no_such_module_xyz:f", track=True)
    with pytest.raises(InstrumentationError, match="does not exist"):
        instrument(f"{name}:missing", track=True)
    with pytest.raises(InstrumentationError, match="not callable"):
        instrument(f"{name}:NOT_CALLABLE", track=True)
    with pytest.raises(InstrumentationError, match="nothing to apply"):
        instrument(f"{name}:compute")
    with pytest.raises(InstrumentationError, match="need cache"):
        instrument(f"{name}:compute", ttl=5)
    with pytest.raises(TypeError):
        instrument(42, track=True)  # type: ignore[arg-type]
    assert instrumented_targets() == []
    assert uninstrument(f"{name}:compute") is False


def test_instrument_and_uninstrument_from_many_threads(target_module: types.ModuleType) -> None:
    name = target_module.__name__
    original = target_module.compute
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(50):
                instrument(f"{name}:compute", track=True)
                target_module.compute(1)
                uninstrument(f"{name}:compute")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert target_module.compute is original


def test_uninstrument_keeps_a_wrapt_wrapper_stacked_on_top(target_module: types.ModuleType) -> None:
    import wrapt

    name = target_module.__name__
    original = target_module.compute
    instrument(f"{name}:compute", track=True)
    outer_calls: list[int] = []

    def outer(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        outer_calls.append(1)
        return wrapped(*args, **kwargs)

    outer_handle = wrapt.wrap_function_wrapper(target_module, "compute", outer)
    assert uninstrument(f"{name}:compute") is True
    assert target_module.compute is outer_handle
    assert target_module.compute.__wrapped__ is original
    assert target_module.compute(2) == 4
    assert outer_calls == [1]


def test_uninstrument_refuses_when_a_plain_wrapper_sits_on_top(target_module: types.ModuleType) -> None:
    import functools

    name = target_module.__name__
    instrument(f"{name}:compute", track=True)
    ours = target_module.compute

    @functools.wraps(ours)
    def plain(*args: Any, **kwargs: Any) -> Any:
        return ours(*args, **kwargs)

    target_module.compute = plain
    with pytest.raises(InstrumentationError, match="wrapped around it"):
        uninstrument(f"{name}:compute")
    assert target_module.compute is plain
    assert instrumented_targets() == [f"{name}:compute"]
    target_module.compute = ours
    assert uninstrument(f"{name}:compute") is True


def test_cached_refuses_generators(cache: CacheManager) -> None:
    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        cached(cache)(numbers)


def test_instrument_with_an_equal_cached_decorator_is_idempotent(
    target_module: types.ModuleType, cache: CacheManager
) -> None:
    name = target_module.__name__
    first = instrument(f"{name}:compute", cached(cache, ttl=5))
    assert instrument(f"{name}:compute", cached(cache, ttl=5)) is first
    with pytest.raises(InstrumentationError):
        instrument(f"{name}:compute", cached(cache, ttl=6))
    assert target_module.compute(4) == 8
    assert target_module.compute(4) == 8
    assert target_module.calls == [4]


def test_closures_from_one_factory_do_not_share_results(cache: CacheManager) -> None:
    def make(factor: int) -> Any:
        @cached(cache)
        def scale(x: int) -> int:
            return x * factor

        return scale

    double, triple = make(2), make(3)
    assert double(5) == 10
    assert triple(5) == 15
    assert double.cache_key(5) != triple.cache_key(5)
