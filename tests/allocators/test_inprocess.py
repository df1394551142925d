"""In-process allocators: Layout, system/pool/arena allocators and monitoring."""

from __future__ import annotations

import ctypes
import threading

import pytest

from kotoba_memory.allocators import (
    Allocation,
    ArenaAllocator,
    Layout,
    LayoutError,
    MonitoredAllocator,
    PoolAllocator,
    SystemAllocator,
    create_custom_allocator,
    create_monitored_allocator,
)
from kotoba_memory.memory_pool import BlockReleasedError, MemoryPool, PoolExhausted


def _allocators() -> list[object]:
    return [SystemAllocator(), PoolAllocator(MemoryPool(4 << 20)), create_custom_allocator(64 * 1024)]


def test_reference_example() -> None:
    arena_allocator = create_custom_allocator()
    monitored = create_monitored_allocator(arena_allocator)
    layout = Layout.from_size_align(1024, 8)
    allocation = monitored.allocate(layout)
    assert allocation.size == 1024 and allocation.address % 8 == 0
    stats = monitored.stats()
    assert stats.allocations == 1 and stats.peak_usage == 1024


@pytest.mark.parametrize("kind", ["system", "pool", "arena"])
@pytest.mark.parametrize("align", [1, 8, 16, 64, 512, 4096])
def test_alignment_is_honoured_by_address(kind: str, align: int) -> None:
    allocator = dict(zip(["system", "pool", "arena"], _allocators()))[kind]
    allocations = [allocator.allocate(Layout(size, align)) for size in (1, 24, 1000, 70_000)]  # type: ignore[attr-defined]
    for a in allocations:
        assert a.address % align == 0
        assert a.view.nbytes == a.size
        a.view[:] = b"\x5a" * a.size
        assert ctypes.string_at(a.address, a.size) == b"\x5a" * a.size  # the view is at that address
    for a in allocations:
        allocator.deallocate(a)  # type: ignore[attr-defined]
        assert a.freed


def test_monitoring_counts_current_and_peak() -> None:
    monitored = MonitoredAllocator(PoolAllocator(MemoryPool(1 << 20)))
    a = monitored.allocate(Layout(1000))
    b = monitored.allocate(Layout(3000, 64))
    monitored.deallocate(a)
    c = monitored.allocate(Layout(500))
    stats = monitored.stats()
    assert (stats.allocations, stats.deallocations) == (3, 1)
    assert stats.current_usage == 3500 and stats.peak_usage == 4000 and stats.total_allocated == 4500
    assert stats.live_allocations == 2
    monitored.deallocate(b)
    monitored.deallocate(c)
    assert monitored.stats().current_usage == 0
    monitored.reset_peak()
    assert monitored.stats().peak_usage == 0


def test_failed_allocations_are_counted() -> None:
    monitored = MonitoredAllocator(PoolAllocator(MemoryPool(64 * 1024)))
    with pytest.raises(PoolExhausted):
        monitored.allocate(Layout(1 << 20))
    assert monitored.stats().failed_allocations == 1 and monitored.stats().current_usage == 0


@pytest.mark.parametrize("kind", ["system", "pool", "arena"])
def test_double_and_foreign_deallocation(kind: str) -> None:
    allocators = dict(zip(["system", "pool", "arena"], _allocators()))
    allocator = allocators[kind]
    a = allocator.allocate(Layout(64))  # type: ignore[attr-defined]
    allocator.deallocate(a)  # type: ignore[attr-defined]
    with pytest.raises(BlockReleasedError):
        allocator.deallocate(a)  # type: ignore[attr-defined]
    with pytest.raises(BlockReleasedError):
        _ = a.view
    other = SystemAllocator().allocate(Layout(8))
    with pytest.raises(ValueError, match="different allocator"):
        allocator.deallocate(other)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        allocator.deallocate("nope")  # type: ignore[attr-defined]


def test_monitored_rejects_double_free() -> None:
    monitored = create_monitored_allocator(SystemAllocator())
    a = monitored.allocate(Layout(8))
    monitored.deallocate(a)
    with pytest.raises(BlockReleasedError):
        monitored.deallocate(a)
    assert monitored.stats().deallocations == 1


def test_arena_allocator_reset_frees_everything() -> None:
    allocator = ArenaAllocator()
    a = allocator.allocate(Layout(100))
    allocator.reset()
    with pytest.raises(ValueError):
        a.view[0] = 1  # the arena released the view
    with pytest.raises(BlockReleasedError, match="reset"):
        allocator.deallocate(a)


def test_pool_allocator_returns_blocks() -> None:
    pool = MemoryPool(1 << 20)
    allocator = PoolAllocator(pool)
    allocations = [allocator.allocate(Layout(100, 256)) for _ in range(10)]
    assert pool.stats().live_blocks == 10
    for a in allocations:
        allocator.deallocate(a)
    assert pool.stats().live_blocks == 0


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((-1, 8), LayoutError),
        ((8, 3), LayoutError),
        ((8, 0), LayoutError),
        ((8, 8192), LayoutError),
        ((8.0, 8), TypeError),
        ((8, True), TypeError),
    ],
)
def test_bad_layouts(args: tuple, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        Layout(*args)
    assert issubclass(LayoutError, ValueError)


def test_layout_helpers() -> None:
    assert Layout.array(12, 10, 4) == Layout(120, 4)
    with pytest.raises(LayoutError):
        Layout.array(-1, 3)
    with pytest.raises(TypeError):
        SystemAllocator().allocate((8, 8))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MonitoredAllocator(object())  # type: ignore[arg-type]


def test_monitored_allocator_under_threads() -> None:
    monitored = create_monitored_allocator(PoolAllocator(MemoryPool(8 << 20)))
    done: list[int] = []

    def worker() -> None:
        mine: list[Allocation] = []
        for i in range(300):
            mine.append(monitored.allocate(Layout(100 + i, 16)))
            if len(mine) > 10:
                monitored.deallocate(mine.pop(0))
        for a in mine:
            monitored.deallocate(a)
        done.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = monitored.stats()
    assert len(done) == 4
    assert stats.allocations == stats.deallocations == 1200 and stats.current_usage == 0
    assert 10 * 100 <= stats.peak_usage <= 44 * 400
