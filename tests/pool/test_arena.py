"""Arena: bump allocation freed all at once."""

from __future__ import annotations

import pickle
import threading

import pytest

from kotoba_memory.memory_pool import Arena, BlockInUseError, MemoryPool, PoolExhausted


@pytest.mark.parametrize("align", [1, 8, 16, 64, 256, 4096])
def test_alignment_is_honoured_by_address(align: int) -> None:
    arena = Arena(64 * 1024)
    for size in (1, 3, 17, 100, 1000):
        view, address = arena.allocate_with_address(size, align)
        assert address % align == 0
        assert view.nbytes == size


def test_buffers_are_distinct_and_writable() -> None:
    arena = Arena(4096)
    views = [arena.allocate(100) for _ in range(100)]  # spills over several chunks
    for i, v in enumerate(views):
        v[:] = bytes([i]) * 100
    for i, v in enumerate(views):
        assert bytes(v) == bytes([i]) * 100
    stats = arena.stats()
    assert stats.allocations == 100 and stats.chunks > 1 and stats.bytes_in_use >= 100 * 100


def test_reset_invalidates_every_view_and_reuses_memory() -> None:
    arena = Arena(4096)
    first, addr1 = arena.allocate_with_address(64)
    arena.allocate(10_000)  # oversized request gets its own chunk
    arena.reset()
    with pytest.raises(ValueError, match="released"):
        first[0] = 1
    again, addr2 = arena.allocate_with_address(64)
    assert addr2 == addr1  # first chunk kept and reused
    stats = arena.stats()
    assert stats.chunks == 1 and stats.resets == 1 and stats.peak_bytes >= 10_064
    again[0] = 7


def test_with_block_frees_everything() -> None:
    with Arena(1024) as arena:
        view = arena.allocate(100, zero=True)
        assert bytes(view) == bytes(100)
    with pytest.raises(ValueError):
        view[0] = 1
    assert arena.stats().reserved_bytes == 0


def test_limit_raises_pool_exhausted() -> None:
    arena = Arena(1024, max_bytes=2048)
    arena.allocate(1000)
    arena.allocate(1000)
    with pytest.raises(PoolExhausted, match="arena limit"):
        arena.allocate(1000)


def test_pool_backed_chunks_go_back_to_the_pool() -> None:
    pool = MemoryPool(1024 * 1024)
    with Arena(64 * 1024, pool=pool) as arena:
        for _ in range(10):
            arena.allocate(10_000)
        assert pool.stats().live_blocks == 2
    assert pool.stats().live_blocks == 0


def test_exported_buffer_retires_its_chunk() -> None:
    pool = MemoryPool(1024 * 1024)
    arena = Arena(4096, pool=pool)
    view = arena.allocate(100)
    pinned = pickle.PickleBuffer(view)
    with pytest.raises(BlockInUseError):
        arena.reset()
    assert pool.stats().live_blocks == 1  # the pinned chunk is not handed back
    fresh, _ = arena.allocate_with_address(100)
    fresh[:] = b"x" * 100
    assert bytes(pinned.raw()[:1]) != b"x"
    del pinned
    arena.close()
    assert pool.stats().live_blocks == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "exc"),
    [
        ((10,), {}, ValueError),
        (("big",), {}, TypeError),
        ((4096,), {"max_bytes": 10}, ValueError),
        ((4096,), {"pool": object()}, TypeError),
    ],
)
def test_bad_construction(args: tuple, kwargs: dict, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        Arena(*args, **kwargs)


@pytest.mark.parametrize(
    ("size", "align", "exc"),
    [(-1, 8, ValueError), (8, 3, ValueError), (8, 8192, ValueError), (1.5, 8, TypeError)],
)
def test_bad_requests(size: object, align: object, exc: type[Exception]) -> None:
    arena = Arena(4096)
    with pytest.raises(exc):
        arena.allocate(size, align)  # type: ignore[arg-type]
    assert arena.stats().allocations == 0


def test_threads() -> None:
    arena = Arena(16 * 1024)
    results: list[tuple[memoryview, int]] = []
    lock = threading.Lock()

    def worker(tag: int) -> None:
        for _ in range(200):
            v = arena.allocate(33, 16)
            v[:] = bytes([tag]) * 33
            with lock:
                results.append((v, tag))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 800
    for v, tag in results:
        assert bytes(v) == bytes([tag]) * 33
