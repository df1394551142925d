"""MemoryPool: slab + buddy allocation inside one reservation."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import os
import pickle
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory.memory_pool import (
    BlockInUseError,
    BlockReleasedError,
    MemoryBlock,
    MemoryPool,
    PoolClosedError,
    PoolCorruptedError,
    PoolExhausted,
    SizeClasses,
    iter_pools,
)

MiB = 1024 * 1024


def _sizes(rng: random.Random, count: int, limit: int = 512 * 1024) -> list[int]:
    """A heavy-tailed web-like size mix (median ~2 KB), generated here."""
    return [min(limit, int(rng.lognormvariate(7.7, 1.3)) + 1) for _ in range(count)]


def test_readme_example() -> None:
    pool = MemoryPool(64 * MiB)
    with pool.allocate(1024) as block:
        assert isinstance(block, MemoryBlock)
        assert block.size() == 1024 == len(block)
        view = block.as_slice()
        assert isinstance(view, memoryview) and not view.readonly and view.nbytes == 1024
        view[:5] = b"hello"
        # zero-copy: the bytes live at the block's address inside the pool
        assert ctypes.string_at(block.address, 5) == b"hello"
    assert block.released
    assert pool.stats().live_blocks == 0


@pytest.mark.parametrize("size", [1, 15, 16, 17, 1000, 8192, 8193, 65536, 100_000, 1 * MiB, 3 * MiB + 7])
def test_sizes_and_capacity(size: int) -> None:
    pool = MemoryPool(16 * MiB)
    block = pool.allocate(size)
    assert block.size() == size
    assert size <= block.capacity <= size + max(16, size // 16) + 512
    assert pool.stats().requested_bytes == size
    assert pool.stats().used_bytes == block.capacity
    block.release()
    assert pool.stats().used_bytes == 0


def test_blocks_never_overlap_and_keep_their_data_under_churn() -> None:
    pool = MemoryPool(32 * MiB)
    rng = random.Random(7)
    live: dict[int, tuple[MemoryBlock, bytes]] = {}
    for i, size in enumerate(_sizes(rng, 3000)):
        if live and rng.random() < 0.45:
            key = rng.choice(list(live))
            block, payload = live.pop(key)
            assert bytes(block.as_slice()) == payload
            block.release()
        block = pool.allocate(size)
        payload = rng.randbytes(size)
        block.as_slice()[:] = payload
        live[i] = (block, payload)
    spans = sorted((b.address, b.address + b.capacity) for b, _ in live.values())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    base = pool._address
    assert all(base <= s and e <= base + pool.capacity for s, e in spans)
    for block, payload in live.values():
        assert bytes(block.as_slice()) == payload
    stats = pool.stats()
    assert stats.live_blocks == len(live)
    assert stats.requested_bytes == sum(len(p) for _, p in live.values())


def test_double_release_and_use_after_release_raise() -> None:
    pool = MemoryPool(1 * MiB)
    block = pool.allocate(100)
    view = block.as_slice()
    block.release()
    with pytest.raises(BlockReleasedError, match="twice"):
        block.release()
    with pytest.raises(BlockReleasedError):
        block.as_slice()
    with pytest.raises(BlockReleasedError):
        _ = block.address
    with pytest.raises(BlockReleasedError):
        _ = block.capacity
    assert "released" in repr(block)
    with pytest.raises(ValueError, match="released"):
        view[0] = 1  # the view handed out is invalidated
    assert isinstance(BlockReleasedError("x"), KotobaMemoryError)


def test_context_manager_tolerates_explicit_release_inside() -> None:
    pool = MemoryPool(1 * MiB)
    with pool.allocate(64) as block:
        block.release()
    assert pool.stats().live_blocks == 0


def test_garbage_collected_block_returns_to_pool() -> None:
    pool = MemoryPool(1 * MiB)
    block = pool.allocate(5000)
    view = block.as_slice()
    del block
    gc.collect()
    with pytest.raises(ValueError):
        view[0] = 1  # collection invalidated the view too
    stats = pool.stats()
    assert stats.live_blocks == 0 and stats.used_bytes == 0


def test_blocks_not_zeroed_unless_asked() -> None:
    pool = MemoryPool(1 * MiB)
    block = pool.allocate(4096)
    block.as_slice()[:] = b"\xff" * 4096
    offset = block._offset
    block.release()
    reused = pool.allocate(4096)
    assert reused._offset == offset  # LIFO reuse of the same slot
    assert bytes(reused.as_slice()[8:]) == b"\xff" * 4088  # not zeroed: no memset cost
    reused.release()
    zeroed = pool.allocate(4096, zero=True)
    assert zeroed._offset == offset
    assert bytes(zeroed.as_slice()) == bytes(4096)


def test_exhaustion_raises_and_nothing_is_lost() -> None:
    pool = MemoryPool(256 * 1024)
    blocks = [pool.allocate(60_000) for _ in range(4)]
    for i, b in enumerate(blocks):
        b.as_slice()[:] = bytes([i]) * 60_000
    with pytest.raises(PoolExhausted, match="cannot serve 70000 bytes") as info:
        pool.allocate(70_000)
    assert isinstance(info.value, MemoryError)
    for i, b in enumerate(blocks):
        assert bytes(b.as_slice()) == bytes([i]) * 60_000
    stats = pool.stats()
    assert stats.failures == 1 and stats.live_blocks == 4 and stats.hit_rate == pytest.approx(4 / 5)


def test_large_block_spans_adjacent_free_blocks_that_are_not_buddies() -> None:
    pool = MemoryPool(256 * 1024)
    a, b, c, d = (pool.allocate(64 * 1024) for _ in range(4))
    assert [x._offset for x in (a, b, c, d)] == [0, 65536, 131072, 196608]
    a.as_slice()[:] = b"a" * 65536
    d.as_slice()[:] = b"d" * 65536
    b.release()
    c.release()  # free: [64K, 128K) and [128K, 192K), whose buddies (A and D) are live
    assert pool.stats().largest_free_block == 128 * 1024
    big = pool.allocate(128 * 1024)
    assert big._offset == 65536
    big.as_slice()[:] = b"x" * 131072
    assert bytes(a.as_slice()) == b"a" * 65536 and bytes(d.as_slice()) == b"d" * 65536
    for x in (a, big, d):
        x.release()
    pool.defragment()
    assert pool.stats().largest_free_block == 256 * 1024


def test_heap_fallback_is_counted() -> None:
    pool = MemoryPool(64 * 1024, fallback="heap")
    inside = pool.allocate(60_000)
    outside = pool.allocate(60_000)
    assert not inside.from_heap and outside.from_heap
    outside.as_slice()[:3] = b"abc"
    assert bytes(outside.as_slice()[:3]) == b"abc"
    stats = pool.stats()
    assert stats.fallbacks == 1 and stats.pool_hits == 1 and stats.hit_rate == 0.5
    outside.release()
    inside.release()
    assert pool.stats().releases == 2


def test_exhaustion_reclaims_empty_slabs_before_failing() -> None:
    pool = MemoryPool(256 * 1024)
    small = [pool.allocate(100) for _ in range(2000)]  # spreads slabs across the pool
    for b in small:
        b.release()
    big = pool.allocate(200_000)  # needs the empty slabs back
    assert big.capacity >= 200_000
    big.release()


def test_defragment_returns_slabs_and_coalesces() -> None:
    pool = MemoryPool(8 * MiB)
    rng = random.Random(3)
    blocks = [pool.allocate(s) for s in _sizes(rng, 500)]
    for b in blocks:
        b.release()
    before = pool.stats()
    assert before.empty_slabs > 0 and before.external_fragmentation > 0
    result = pool.defragment()
    assert result.slabs_returned == before.empty_slabs
    assert result.bytes_advised == pool.capacity
    after = pool.stats()
    assert after.slabs == 0
    assert after.largest_free_block == pool.capacity
    assert after.external_fragmentation == 0.0
    # still fully usable afterwards
    again = pool.allocate(4 * MiB)
    again.release()


def test_internal_fragmentation_and_metadata_on_a_realistic_mix() -> None:
    fine = MemoryPool(64 * MiB)
    pow2 = MemoryPool(64 * MiB, classes_per_octave=1)
    rng = random.Random(11)
    sizes = _sizes(rng, 4000)
    kept = [fine.allocate(s) for s in sizes], [pow2.allocate(s) for s in sizes]
    f, p = fine.stats(), pow2.stats()
    assert f.internal_fragmentation < 0.05
    assert p.internal_fragmentation > 0.15  # the classic power-of-two scheme, for contrast
    assert f.metadata_ratio < 0.01
    assert f.allocation_efficiency == pytest.approx(sum(sizes) / f.capacity)
    assert len(kept[0]) == len(kept[1])


def test_exported_buffer_blocks_release() -> None:
    pool = MemoryPool(1 * MiB)
    block = pool.allocate(256)
    pinned = pickle.PickleBuffer(block.as_slice())  # holds a buffer export
    with pytest.raises(BlockInUseError):
        block.release()
    assert not block.released and pool.stats().live_blocks == 1
    del pinned
    block.release()
    assert pool.stats().live_blocks == 0


def test_exported_buffer_on_collected_block_is_never_reused() -> None:
    pool = MemoryPool(1 * MiB)
    block = pool.allocate(256)
    pinned = pickle.PickleBuffer(block.as_slice())  # holds a buffer export
    del block
    gc.collect()
    stats = pool.stats()
    assert stats.leaked_exported == 1 and stats.live_blocks == 1
    del pinned


def test_writes_through_a_kept_sub_slice_are_detected() -> None:
    pool = MemoryPool(1 * MiB)
    block = pool.allocate(64)
    sub = block.as_slice()[0:8]  # Python's buffer rules: a sub-slice outlives the block's view
    block.release()
    sub[:] = (2**62).to_bytes(8, "little")  # clobbers the free-list link
    with pytest.raises(PoolCorruptedError):
        pool.allocate(64)


def test_close() -> None:
    pool = MemoryPool(1 * MiB)
    block = pool.allocate(10)
    with pytest.raises(BlockInUseError):
        pool.close()
    block.release()
    pool.close()
    assert pool.closed
    with pytest.raises(PoolClosedError):
        pool.allocate(10)
    pool.close()  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"capacity": 1024}, ValueError),
        ({"capacity": 1.5e6}, TypeError),
        ({"capacity": True}, TypeError),
        ({"capacity": 1 * MiB, "fallback": "disk"}, ValueError),
        ({"capacity": 1 * MiB, "classes_per_octave": 3}, ValueError),
    ],
)
def test_bad_construction(kwargs: dict, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        MemoryPool(**kwargs)


@pytest.mark.parametrize(
    ("size", "exc"), [(0, ValueError), (-5, ValueError), (1.0, TypeError), (True, TypeError)]
)
def test_bad_sizes(size: object, exc: type[Exception]) -> None:
    pool = MemoryPool(1 * MiB)
    keep = pool.allocate(10)
    with pytest.raises(exc):
        pool.allocate(size)  # type: ignore[arg-type]
    assert pool.stats().live_blocks == 1 and not keep.released


def test_threads_share_a_pool_safely() -> None:
    pool = MemoryPool(32 * MiB)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[tuple[MemoryBlock, int]] = []
        try:
            for size in _sizes(rng, 600, limit=200_000):
                block = pool.allocate(size)
                tag = rng.randrange(256)
                block.as_slice()[:] = bytes([tag]) * size
                mine.append((block, tag))
                if len(mine) > 20:
                    old, old_tag = mine.pop(rng.randrange(len(mine)))
                    assert bytes(old.as_slice()) == bytes([old_tag]) * old.size()
                    old.release()
            for block, tag in mine:
                assert bytes(block.as_slice()) == bytes([tag]) * block.size()
                block.release()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    stats = pool.stats()
    assert stats.live_blocks == 0 and stats.used_bytes == 0 and stats.requested_bytes == 0


def test_async_twins() -> None:
    async def main() -> None:
        pool = MemoryPool(1 * MiB)
        block = await pool.aallocate(100)
        assert block.size() == 100
        block.release()
        result = await pool.adefragment()
        assert result.slabs_returned == 1

    asyncio.run(main())


def test_size_classes() -> None:
    fine = SizeClasses(16)
    assert fine.round(1) == 16 and fine.round(16) == 16 and fine.round(17) == 32
    assert fine.round(1000) == 1024 and fine.round(1025) == 1088
    assert SizeClasses(1).round(1025) == 2048
    for n in range(1, 70_000, 37):
        assert n <= fine.round(n) <= n + max(15, n // 16)
    with pytest.raises(TypeError):
        SizeClasses(2.0)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300_000)), min_size=1, max_size=120))
def test_accounting_matches_a_model(ops: list[tuple[bool, int]]) -> None:
    pool = MemoryPool(4 * MiB)
    live: list[MemoryBlock] = []
    for do_release, size in ops:
        if do_release and live:
            live.pop(size % len(live)).release()
            continue
        try:
            live.append(pool.allocate(size))
        except PoolExhausted:
            pass
    stats = pool.stats()
    assert stats.live_blocks == len(live)
    assert stats.used_bytes == sum(b.capacity for b in live)
    assert stats.requested_bytes == sum(b.size() for b in live)
    spans = sorted((b._offset, b._offset + b.capacity) for b in live)
    assert all(e <= s for (_, e), (s, _) in itertools.pairwise(spans))
    for b in live:
        b.release()
    pool.defragment()
    assert pool.stats().largest_free_block == pool.capacity


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_copy() -> None:
    pool = MemoryPool(1 * MiB)
    block = pool.allocate(4096)
    block.as_slice()[:] = b"p" * 4096
    pid = os.fork()
    if pid == 0:  # child: allocate and overwrite; exit code tells the parent what it saw
        code = 0
        try:
            mine = pool.allocate(4096)
            mine.as_slice()[:] = b"c" * 4096
            block.as_slice()[:] = b"c" * 4096
            code = 0 if mine._offset != block._offset else 3
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert bytes(block.as_slice()) == b"p" * 4096  # the child's writes stayed in the child
    again = pool.allocate(4096)
    assert bytes(again.as_slice()[8:]) != b"c" * 4088


def test_iter_pools_sees_live_pools_only() -> None:
    pool = MemoryPool(1 * MiB, name="observed")
    assert pool in list(iter_pools())
    pool.close()
    assert pool not in list(iter_pools())


def test_zero_applies_after_reclaiming_memory() -> None:
    pool = MemoryPool(256 * 1024)
    dirty = [pool.allocate(8000) for _ in range(24)]  # fills slabs of one class
    for b in dirty:
        b.as_slice()[:] = b"\xee" * 8000
        b.release()  # empty slabs stay carved until the pool needs the room
    big = pool.allocate(200_000, zero=True)  # served only after the empty slabs are returned
    assert bytes(big.as_slice()) == bytes(200_000)


def test_concurrent_as_slice_and_release_leave_no_live_view() -> None:
    pool = MemoryPool(1 * MiB)
    seen: list[memoryview] = []
    guard = threading.Lock()
    for _ in range(150):
        block = pool.allocate(64)
        start = threading.Barrier(4)

        def reader(b: MemoryBlock = block, barrier: threading.Barrier = start) -> None:
            barrier.wait(10)
            try:
                v = b.as_slice()
            except BlockReleasedError:
                return
            with guard:
                seen.append(v)

        def releaser(b: MemoryBlock = block, barrier: threading.Barrier = start) -> None:
            barrier.wait(10)
            try:
                b.release()
            except BlockReleasedError:
                pass

        threads = [threading.Thread(target=reader) for _ in range(2)] + [
            threading.Thread(target=releaser) for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert block.released
    for v in seen:  # every view ever handed out was invalidated by the release
        with pytest.raises(ValueError):
            v[0]
    assert pool.stats().live_blocks == 0 and pool.stats().releases == 150


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_defragment_gives_pages_back_to_the_os() -> None:
    pool = MemoryPool(32 * MiB)
    blocks = [pool.allocate(1 * MiB) for _ in range(24)]
    for b in blocks:
        b.as_slice()[:] = b"\x01" * MiB  # commit the pages
    touched = _rss()
    for b in blocks:
        b.release()
    result = pool.defragment()
    assert result.bytes_advised == pool.capacity
    assert touched - _rss() >= 20 * MiB
    again = pool.allocate(1 * MiB)
    assert bytes(again.as_slice()[:16]) == bytes(16)  # fresh zero pages after MADV_DONTNEED
