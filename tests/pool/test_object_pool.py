"""ObjectPool: reuse of expensive objects."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kotoba_memory.memory_pool import BlockReleasedError, ObjectPool, PoolClosedError, PoolExhausted


class Parser:
    made = 0

    def __init__(self) -> None:
        Parser.made += 1
        self.buffer: list[str] = []
        self.broken = False


def _reset(p: Parser) -> None:
    if p.broken:
        raise RuntimeError("cannot reset")
    p.buffer.clear()


def test_objects_are_reused_and_reset() -> None:
    pool: ObjectPool[Parser] = ObjectPool(Parser, _reset, max_size=2)
    a = pool.acquire()
    a.buffer.append("x")
    pool.release(a)
    b = pool.acquire()
    assert b is a and b.buffer == []
    pool.release(b)
    stats = pool.stats()
    assert stats.created == 1 and stats.reused == 1 and stats.hit_rate == 0.5 and stats.idle == 1


def test_borrow_context_manager_releases_on_error() -> None:
    pool: ObjectPool[Parser] = ObjectPool(Parser, _reset, max_size=1)
    with pytest.raises(KeyError), pool.borrow() as p:
        p.buffer.append("y")
        raise KeyError
    assert pool.stats().in_use == 0
    with pool.borrow() as again:
        assert again is p and again.buffer == []


def test_max_size_and_timeout() -> None:
    pool: ObjectPool[Parser] = ObjectPool(Parser, max_size=2, timeout=0)
    a, b = pool.acquire(), pool.acquire()
    with pytest.raises(PoolExhausted, match="all 2 pooled objects"):
        pool.acquire()
    assert pool.stats().timeouts == 1 and len(pool) == 2
    pool.release(a)
    assert pool.acquire() is a
    pool.release(b)


def test_waiter_gets_a_released_object() -> None:
    pool: ObjectPool[Parser] = ObjectPool(Parser, max_size=1)
    held = pool.acquire()
    got: list[Parser] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=10)))
    waiter.start()
    for _ in range(200):  # until the waiter is blocked (bounded)
        if pool.stats().waits:
            break
        threading.Event().wait(0.005)
    pool.release(held)
    waiter.join(10)
    assert got == [held]
    assert pool.stats().waits == 1


def test_failing_reset_discards_and_disposes() -> None:
    disposed: list[Parser] = []
    pool: ObjectPool[Parser] = ObjectPool(Parser, _reset, max_size=1, dispose=disposed.append)
    p = pool.acquire()
    p.broken = True
    pool.release(p)
    assert disposed == [p]
    stats = pool.stats()
    assert stats.discarded == 1 and stats.reset_errors == 1 and stats.idle == 0
    fresh = pool.acquire()  # room for a new one
    assert fresh is not p


def test_release_errors() -> None:
    pool: ObjectPool[Parser] = ObjectPool(Parser)
    p = pool.acquire()
    pool.release(p)
    with pytest.raises(BlockReleasedError):
        pool.release(p)
    with pytest.raises(BlockReleasedError, match="not acquired"):
        pool.release(Parser())
    assert pool.stats().idle == 1


def test_factory_failure_frees_the_slot() -> None:
    calls = 0

    def flaky() -> Parser:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("connect failed")
        return Parser()

    pool: ObjectPool[Parser] = ObjectPool(flaky, max_size=1, timeout=0)
    with pytest.raises(OSError):
        pool.acquire()
    assert isinstance(pool.acquire(), Parser)


def test_close() -> None:
    disposed: list[Parser] = []
    pool: ObjectPool[Parser] = ObjectPool(Parser, dispose=disposed.append)
    idle, out = pool.acquire(), pool.acquire()
    pool.release(idle)
    pool.close()
    assert disposed == [idle]
    with pytest.raises(PoolClosedError):
        pool.acquire()
    pool.release(out)
    assert disposed == [idle, out]


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"factory": 3}, TypeError),
        ({"factory": Parser, "max_size": 0}, ValueError),
        ({"factory": Parser, "timeout": -1}, ValueError),
        ({"factory": Parser, "reset": "x"}, TypeError),
        ({"factory": Parser, "max_size": 2.0}, TypeError),
    ],
)
def test_bad_construction(kwargs: dict, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        ObjectPool(**kwargs)


def test_threads_never_share_an_object() -> None:
    pool: ObjectPool[Parser] = ObjectPool(Parser, _reset, max_size=3)
    owners: dict[int, int] = {}
    guard = threading.Lock()
    errors: list[str] = []

    def worker(n: int) -> None:
        for _ in range(300):
            with pool.borrow(timeout=10) as p:
                with guard:
                    if id(p) in owners:
                        errors.append("shared")
                    owners[id(p)] = n
                p.buffer.append("z")
                with guard:
                    del owners[id(p)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    stats = pool.stats()
    assert stats.created <= 3 and stats.in_use == 0 and stats.created + stats.reused == 1800


def test_async_twins() -> None:
    async def main() -> None:
        pool: ObjectPool[Parser] = ObjectPool(Parser, _reset, max_size=1)
        a = await pool.aacquire()
        waiter = asyncio.create_task(pool.aacquire(timeout=10))
        await asyncio.sleep(0.01)
        await pool.arelease(a)
        b = await asyncio.wait_for(waiter, 10)
        assert b is a
        await pool.arelease(b)

    asyncio.run(main())


def test_concurrent_double_release_is_reported_once() -> None:
    gate = threading.Event()
    resets: list[Parser] = []

    def slow_reset(p: Parser) -> None:
        resets.append(p)
        gate.wait(5)

    pool: ObjectPool[Parser] = ObjectPool(Parser, slow_reset, max_size=1, timeout=0)
    obj = pool.acquire()
    first = threading.Thread(target=pool.release, args=(obj,))
    first.start()
    for _ in range(500):  # until the first release is inside reset (bounded)
        if resets:
            break
        threading.Event().wait(0.005)
    with pytest.raises(BlockReleasedError):
        pool.release(obj)  # the object is already being returned
    with pytest.raises(PoolExhausted):
        pool.acquire()  # still counted against max_size while it is reset
    gate.set()
    first.join(10)
    assert pool.acquire() is obj and len(resets) == 1
