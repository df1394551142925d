"""The C pool (``CMemoryPool``) against the pure-Python reference (``PyMemoryPool``).

Differential: the same operation sequences on both must give the same blocks, errors and stats.
Hammer: threads sharing one pool of each kind. Fuzz: bad input to every C entry point raises, never
crashes.
"""

from __future__ import annotations

import gc
import os
import pickle
import random
import threading
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from kotoba_memory import _native
from kotoba_memory.memory_pool import (
    BlockInUseError,
    BlockReleasedError,
    PoolClosedError,
    PoolExhausted,
)
from kotoba_memory.memory_pool.pool import CMemoryPool, PyMemoryPool

if CMemoryPool is None:
    if _native.pure_python_forced() or not os.environ.get("CI"):
        pytest.skip("the C extension is not in use (not built, or pure Python forced)",
                    allow_module_level=True)
    pytest.fail("kotoba_memory._cpool is not built; CI must build it", pytrace=False)

from kotoba_memory import _cpool

IMPLEMENTATIONS = [PyMemoryPool, CMemoryPool]
KiB = 1024
# Timing and our own bookkeeping differ by design; everything else must match exactly.
_NOT_COMPARED = {"mean_allocation_ns", "metadata_bytes", "metadata_ratio"}


def _stats(pool: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(pool.stats()).items() if k not in _NOT_COMPARED}


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:  # the class is what must match
        return "error", type(exc).__name__


_common = st.sampled_from([16, 100, 1024, 5000, 20 * KiB, 64 * KiB, 64 * KiB + 1, 128 * KiB, 200 * KiB])
sizes = st.one_of(
    _common,  # a few classes, so free lists and the large cache are reused (and hold several blocks)
    _common,
    _common,
    st.integers(1, 8 * KiB),  # slabs
    st.integers(8 * KiB + 1, 300 * KiB),  # buddy blocks
    st.integers(2 * 1024 * KiB, 4 * 1024 * KiB),  # larger than the pool
)


class Differential(RuleBasedStateMachine):
    """One PyMemoryPool and one CMemoryPool driven through the same operations."""

    blocks = Bundle("blocks")

    def __init__(self) -> None:
        super().__init__()
        self.pools: list[Any] = []
        self.pins: list[Any] = []

    @rule(fallback=st.sampled_from(["raise", "heap"]), per_octave=st.sampled_from([4, 16]))
    @precondition(lambda self: not self.pools)
    def open(self, fallback: str, per_octave: int) -> None:
        self.pools = [
            impl(1024 * KiB, fallback=fallback, classes_per_octave=per_octave) for impl in IMPLEMENTATIONS
        ]

    @rule(target=blocks, size=sizes, zero=st.booleans(), fill=st.integers(0, 255))
    @precondition(lambda self: bool(self.pools))
    def allocate(self, size: int, zero: bool, fill: int) -> Any:
        outcomes = [_outcome(lambda p=p: p.allocate(size, zero=zero)) for p in self.pools]
        kinds = [o[0] for o in outcomes]
        assert kinds[0] == kinds[1], outcomes
        if kinds[0] == "error":
            assert outcomes[0][1] == outcomes[1][1]
            return None
        pair = [o[1] for o in outcomes]
        py, c = pair
        assert (py._offset, py.capacity, py.from_heap) == (c._offset, c.capacity, c.from_heap)
        assert len(py) == len(c) == size
        if zero:
            assert bytes(py.as_slice()) == bytes(c.as_slice()) == bytes(size)
        for b in pair:
            b.as_slice()[:] = bytes([fill]) * size if size <= 64 * KiB else b"\x00" * size
        return (pair, fill if size <= 64 * KiB else 0)

    @rule(burst=st.lists(sizes, min_size=2, max_size=8), data=st.data())
    @precondition(lambda self: bool(self.pools))
    def churn(self, burst: list[int], data: st.DataObject) -> None:
        """Allocate a burst of blocks, then release them in some order: free lists and the large cache
        end up holding several blocks of several classes."""
        held = [[_outcome(lambda p=p, n=n: p.allocate(n)) for p in self.pools] for n in burst]
        for py, c in held:
            assert py[0] == c[0] and (py[0] == "ok" or py[1] == c[1]), (py, c)
            if py[0] == "ok":
                assert py[1]._offset == c[1]._offset
        order = data.draw(st.permutations(range(len(held))))
        for i in order:
            for kind, block in held[i]:
                if kind == "ok":
                    block.release()

    @rule(entry=consumes(blocks))
    def release(self, entry: Any) -> None:
        if entry is None:
            return
        pair, fill = entry
        for b in pair:
            if not b.released:
                assert bytes(b.as_slice()[:8]) == bytes([fill]) * min(8, len(b))
        results = [_outcome(b.release) for b in pair]
        assert results[0] == results[1]

    @rule(entry=consumes(blocks))
    def drop(self, entry: Any) -> None:
        """Let both blocks be collected while live (they return through the pending queue)."""
        del entry

    @rule(entry=blocks)
    def release_twice(self, entry: Any) -> None:
        if entry is None:
            return
        pair = entry[0]
        first = [_outcome(b.release) for b in pair]
        assert first[0] == first[1]
        if all(b.released for b in pair):
            for b in pair:
                with pytest.raises(BlockReleasedError):
                    b.release()
                with pytest.raises(BlockReleasedError):
                    b.as_slice()

    @rule(entry=blocks)
    def pin(self, entry: Any) -> None:
        """Export each block's memory through its view; release must then refuse on both."""
        if entry is None or any(b.released for b in entry[0]):
            return
        self.pins.append([pickle.PickleBuffer(b.as_slice()) for b in entry[0]])
        results = [_outcome(b.release) for b in entry[0]]
        assert results == [("error", "BlockInUseError")] * 2

    @rule()
    def unpin(self) -> None:
        self.pins.clear()

    @rule()
    @precondition(lambda self: bool(self.pools))
    def defragment(self) -> None:
        py, c = (p.defragment() for p in self.pools)
        assert py.slabs_returned == c.slabs_returned
        assert py.cached_blocks_coalesced == c.cached_blocks_coalesced

    @invariant()
    def same_stats(self) -> None:
        if self.pools:
            py, c = (_stats(p) for p in self.pools)
            assert py == c

    def teardown(self) -> None:
        self.pins.clear()


Differential.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
TestDifferential = Differential.TestCase


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=["python", "c"])
def test_hammer_threads_share_one_pool(impl: Any) -> None:
    """Threads allocate, write, check and release; no block is ever handed out twice."""
    pool = impl(8 * 1024 * KiB, fallback="heap")
    errors: list[BaseException] = []
    start = threading.Barrier(6)
    buffers = impl is CMemoryPool

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        live: list[tuple[Any, int]] = []
        try:
            start.wait()
            for i in range(3000):
                if live and (len(live) > 40 or rng.random() < 0.45):
                    block, tag = live.pop(rng.randrange(len(live)))
                    if buffers and rng.random() < 0.5:
                        with memoryview(block) as view:  # the C block is a buffer itself
                            assert view[0] == tag and view[len(block) - 1] == tag, "block shared"
                    else:
                        view = block.as_slice()
                        assert view[0] == tag and view[len(block) - 1] == tag, "block shared"
                    if rng.random() < 0.1:
                        del block  # collected, returns through the pending queue
                    else:
                        block.release()
                    continue
                size = rng.choice([rng.randint(1, 8 * KiB), rng.randint(8 * KiB, 200 * KiB)])
                block = pool.allocate(size)
                tag = (seed * 31 + i) % 251
                view = block.as_slice()
                view[0] = view[len(block) - 1] = tag
                live.append((block, tag))
            for block, _ in live:
                block.release()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    gc.collect()
    stats = pool.stats()
    assert (stats.live_blocks, stats.used_bytes, stats.requested_bytes) == (0, 0, 0)
    assert stats.allocations == stats.pool_hits + stats.fallbacks + stats.failures
    pool.close()


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(size=junk)
def test_fuzz_allocate_matches_the_reference(size: Any) -> None:
    """Whatever ``size`` is, both implementations raise the same error or hand out the same block."""
    pools = [impl(256 * KiB) for impl in IMPLEMENTATIONS]
    outcomes = [_outcome(lambda p=p: p.allocate(size)) for p in pools]
    assert [o[0] for o in outcomes] == [outcomes[0][0]] * 2
    if outcomes[0][0] == "error":
        assert outcomes[0][1] == outcomes[1][1]
    else:
        assert outcomes[0][1]._offset == outcomes[1][1]._offset


class _ReentrantSize(int):
    """An int whose conversion allocates from and releases to the same pool (re-entrancy)."""

    pool: Any = None

    def __int__(self) -> int:
        self.pool.allocate(100).release()
        kept = self.pool.allocate(20_000)
        del kept  # collected inside the outer call: goes through the pending queue
        return int.__int__(self)

    __index__ = __int__


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=["python", "c"])
def test_reentrant_size_conversion(impl: Any) -> None:
    pool = impl(1024 * KiB)
    _ReentrantSize.pool = pool
    block = pool.allocate(_ReentrantSize(300))
    assert len(block) == 300
    block.release()
    gc.collect()
    assert pool.stats().live_blocks == 0


def test_c_block_is_a_buffer_and_refuses_use_after_release() -> None:
    pool = CMemoryPool(1024 * KiB)
    block = pool.allocate(1000)
    with memoryview(block) as view:
        view[:3] = b"abc"
        with pytest.raises(BlockInUseError):  # exported: cannot go back to the pool
            block.release()
    assert bytes(block.as_slice()[:3]) == b"abc" == bytes(block)[:3]
    block.release()
    with pytest.raises(BlockReleasedError):
        memoryview(block)
    with pytest.raises(BlockReleasedError):
        bytes(block)
    stats = pool.stats()
    assert (stats.live_blocks, stats.used_bytes) == (0, 0)


def test_c_lock_reentry_raises_instead_of_deadlocking() -> None:
    pool = CMemoryPool(1024 * KiB)
    block = pool.allocate(100)
    with pool._lock:
        with pytest.raises(RuntimeError, match="re-entrant"):
            pool.allocate(100)  # the fast path sees the lock taken; the Python path would wait on itself
        with pytest.raises(RuntimeError, match="re-entrant"):
            block.release()
    block.release()
    lock = _cpool.Lock()
    with pytest.raises(RuntimeError):
        lock.release()
    with pytest.raises(ValueError):
        lock.acquire(False, 1)
    with pytest.raises(ValueError):
        lock.acquire(timeout=-5)
    assert lock.acquire() and lock.locked() and not lock.acquire(timeout=0.01)
    lock.release()
    with pytest.raises(TypeError):
        _cpool.Lock(1)


def test_c_private_entry_points_check_their_arguments() -> None:
    pool = CMemoryPool(1024 * KiB)
    cap = pool.capacity
    bad_blocks = [(-1, 10, 0), (0, 0, 0), (cap, 1, 0), (cap - 8, 16, 0), (0, 10**6, -1), (0, 16, 10**6)]
    bad_blocks.append((2**62, 16, 0))
    for args in bad_blocks:
        with pytest.raises((ValueError, OverflowError)):
            pool._new_block(*args)
    with pytest.raises(OverflowError):
        pool._new_block(2**70, 1, 1)
    with pytest.raises(TypeError):
        pool._new_block("0", 1, 1)
    for args in [(10**6, -1), (1 << 40, 0), (16, cap)]:
        with pytest.raises(ValueError):
            pool._lc_push(*args)
    for size in (0, -1):
        with pytest.raises(ValueError):
            pool._heap_block(size)
    with pytest.raises(RuntimeError):
        pool._bind_core(pool._mm, pool._base, pool._heads, pool._slab_live, pool._class_of,
                        pool._slab_sizes, pool._slab_bytes, 4)
    core = _cpool.PoolCore()
    with pytest.raises(ValueError):
        core._bind_core(b"readonly", memoryview(b""), [], [], [], [], [], 0)
    with pytest.raises(BufferError):  # read-only mapping
        core._bind_core(b"readonly", memoryview(b""), [], [], [], [16], [16384], 0)
    with pytest.raises(TypeError):  # heads not an array('q')
        core._bind_core(bytearray(1 << 16), memoryview(b""), [], [], [], [16], [16384], 0)
    with pytest.raises(AttributeError):
        core.allocate(10)  # unbound: the fast path defers to a Python path a bare core does not have
    with pytest.raises(TypeError):
        pool._lock = "not a lock"
    with pytest.raises(TypeError):
        pool.allocate()
    with pytest.raises(TypeError):
        pool.allocate(10, colour="red")
    assert pool._lc_pop(12345) == -1


def test_c_pool_closed_under_a_live_block_does_not_crash() -> None:
    """Counters are writable from Python; lying to close() must leave blocks failing, not crashing."""
    pool = CMemoryPool(1024 * KiB)
    block = pool.allocate(100)
    with memoryview(block):
        pool._allocs -= 1  # close() now believes nothing is live
        with pytest.raises(BlockInUseError):
            pool.close()  # but a buffer export of a block is still alive
    pool._allocs -= 0
    pool.close()
    with pytest.raises(PoolClosedError):
        memoryview(block)
    with pytest.raises(PoolClosedError):
        block.as_slice()
    with pytest.raises(PoolClosedError):
        _ = block.address
    with pytest.raises(Exception):  # noqa: B017 - the Python path raises on the released words
        block.release()
    with pytest.raises(PoolClosedError):
        pool.allocate(10)


def test_c_pending_queue_of_the_wrong_type_fails_cleanly() -> None:
    pool = CMemoryPool(1024 * KiB)
    pool._pending = [1]  # not a deque: the Python path's popleft fails
    with pytest.raises(AttributeError):
        pool.allocate(10)
    pool._pending = None
    block = pool.allocate(10)
    del block  # nowhere to queue it: dropped, never reused
    gc.collect()


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["alloc", "release", "view", "slice", "drop", "lc", "heap"]), junk),
        max_size=30,
    )
)
def test_fuzz_c_entry_points_never_crash(ops: list[tuple[str, Any]]) -> None:
    pool = CMemoryPool(256 * KiB, fallback="heap")
    live: list[Any] = []
    for op, arg in ops:
        try:
            if op == "alloc":
                live.append(pool.allocate(arg))
            elif op == "heap":
                live.append(pool._heap_block(arg))
            elif op == "lc":
                pool._lc_pop(arg)
            elif live:
                block = live[hash(str(arg)) % len(live)]
                if op == "release":
                    block.release()
                elif op == "view":
                    with memoryview(block) as view:
                        view[-1:] = b"x"
                elif op == "slice":
                    block.as_slice()[:1] = b"y"
                else:
                    live.remove(block)
        except (TypeError, ValueError, OverflowError, PoolExhausted, BufferError, RuntimeError, MemoryError):
            pass
    live.clear()
    stats = pool.stats()
    assert stats.used_bytes >= 0 and stats.live_blocks >= 0
