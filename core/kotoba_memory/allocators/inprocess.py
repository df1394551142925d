"""In-process allocators taking a ``Layout`` (size + alignment): system heap, pool, arena, and monitoring."""

from __future__ import annotations

import abc
import ctypes
import threading
from dataclasses import dataclass

from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory.memory_pool import Arena, BlockReleasedError, MemoryBlock, MemoryPool, PoolExhausted

__all__ = [
    "Allocation",
    "Allocator",
    "AllocatorStats",
    "ArenaAllocator",
    "Layout",
    "LayoutError",
    "MonitoredAllocator",
    "PoolAllocator",
    "SystemAllocator",
    "create_custom_allocator",
    "create_monitored_allocator",
]

_MAX_ALIGN = 4096


class LayoutError(KotobaMemoryError, ValueError):
    """A size/alignment pair that no allocator can honour."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Size in bytes and a power-of-two alignment, like Rust's ``std::alloc::Layout``."""

    size: int
    align: int = 8

    def __post_init__(self) -> None:
        for field, value in (("size", self.size), ("align", self.align)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Layout.{field} must be an int, got {type(value).__name__}")
        if self.size < 0:
            raise LayoutError(f"Layout.size must be >= 0, got {self.size}")
        if self.align <= 0 or self.align & (self.align - 1):
            raise LayoutError(f"Layout.align must be a power of two, got {self.align}")
        if self.align > _MAX_ALIGN:
            raise LayoutError(f"Layout.align must be at most {_MAX_ALIGN}, got {self.align}")

    @classmethod
    def from_size_align(cls, size: int, align: int) -> Layout:
        """Same as ``Layout(size, align)``; the name the reference design uses."""
        return cls(size, align)

    @classmethod
    def array(cls, item_size: int, count: int, align: int = 8) -> Layout:
        """The layout of ``count`` items of ``item_size`` bytes."""
        if count < 0 or item_size < 0:
            raise LayoutError(f"item_size and count must be >= 0, got {item_size} and {count}")
        return cls(item_size * count, align)


class Allocation:
    """Memory handed out by an allocator: ``address``, ``size``, ``layout`` and a writable ``view``."""

    __slots__ = ("_owner", "_view", "address", "allocator", "layout")

    def __init__(
        self, allocator: Allocator, layout: Layout, address: int, view: memoryview, owner: object
    ) -> None:
        self.allocator = allocator
        self.layout = layout
        self.address = address
        self._view: memoryview | None = view
        self._owner = owner  # keeps the backing memory (block, bytearray) alive

    @property
    def size(self) -> int:
        """The requested size in bytes."""
        return self.layout.size

    @property
    def freed(self) -> bool:
        """True once deallocated."""
        return self._view is None

    @property
    def view(self) -> memoryview:
        """A writable memoryview of ``size`` bytes; invalid after deallocation."""
        if self._view is None:
            raise BlockReleasedError("allocation already deallocated")
        return self._view

    def __repr__(self) -> str:
        state = "freed" if self._view is None else f"0x{self.address:x}"
        return f"<Allocation size={self.layout.size} align={self.layout.align} {state}>"


@dataclass(frozen=True)
class AllocatorStats:
    """Counters kept by ``MonitoredAllocator``."""

    allocations: int
    deallocations: int
    failed_allocations: int
    current_usage: int  # bytes requested and not yet deallocated
    peak_usage: int
    total_allocated: int  # bytes requested since creation

    @property
    def live_allocations(self) -> int:
        """Allocations not yet deallocated."""
        return self.allocations - self.deallocations


class Allocator(abc.ABC):
    """The one interface every in-process allocator implements."""

    @abc.abstractmethod
    def allocate(self, layout: Layout) -> Allocation:
        """Memory for ``layout``, its address a multiple of ``layout.align``."""

    @abc.abstractmethod
    def deallocate(self, allocation: Allocation) -> None:
        """Give ``allocation`` back; deallocating twice raises ``BlockReleasedError``."""

    def _check_own(self, allocation: Allocation) -> memoryview:
        if not isinstance(allocation, Allocation):
            raise TypeError(f"expected an Allocation, got {type(allocation).__name__}")
        if allocation.allocator is not self:
            raise ValueError("allocation belongs to a different allocator")
        view = allocation._view
        if view is None:
            raise BlockReleasedError("allocation deallocated twice")
        return view


def _check_layout(layout: Layout) -> Layout:
    if not isinstance(layout, Layout):
        raise TypeError(f"expected a Layout, got {type(layout).__name__}")
    return layout


class SystemAllocator(Allocator):
    """The process heap (``bytearray``), over-allocating by ``align - 1`` to honour the alignment."""

    def allocate(self, layout: Layout) -> Allocation:
        """Heap memory for ``layout`` (zero-filled, as ``bytearray`` always is)."""
        _check_layout(layout)
        buf = bytearray(layout.size + layout.align - 1 or 1)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        pad = -base % layout.align
        view = memoryview(buf)[pad : pad + layout.size]
        return Allocation(self, layout, base + pad, view, buf)

    def deallocate(self, allocation: Allocation) -> None:
        """Drop the allocation's memory (freed by the heap once unreferenced)."""
        view = self._check_own(allocation)
        view.release()
        allocation._view = None
        allocation._owner = None


class PoolAllocator(Allocator):
    """Serves layouts from a ``MemoryPool`` (16-byte aligned natively; larger alignments over-allocate)."""

    def __init__(self, pool: MemoryPool) -> None:
        if not isinstance(pool, MemoryPool):
            raise TypeError(f"pool must be a MemoryPool, got {type(pool).__name__}")
        self.pool = pool

    def allocate(self, layout: Layout) -> Allocation:
        """A pool block for ``layout``; raises ``PoolExhausted`` when the pool is full."""
        _check_layout(layout)
        extra = layout.align - 1 if layout.align > 16 else 0
        block = self.pool.allocate(max(1, layout.size + extra))
        pad = -block.address % layout.align
        view = block.as_slice()[pad : pad + layout.size]
        return Allocation(self, layout, block.address + pad, view, block)

    def deallocate(self, allocation: Allocation) -> None:
        """Return the block to the pool."""
        view = self._check_own(allocation)
        block = allocation._owner
        assert isinstance(block, MemoryBlock)
        view.release()
        block.release()
        allocation._view = None
        allocation._owner = None


class ArenaAllocator(Allocator):
    """Bump allocation from an ``Arena``: deallocation is bookkeeping only, ``reset()`` frees everything."""

    def __init__(self, arena: Arena | None = None) -> None:
        if arena is not None and not isinstance(arena, Arena):
            raise TypeError(f"arena must be an Arena, got {type(arena).__name__}")
        self.arena = arena if arena is not None else Arena()
        self._lock = threading.Lock()
        self._live: set[int] = set()  # id() of live allocations, so reset can invalidate them

    def allocate(self, layout: Layout) -> Allocation:
        """Bump-allocate ``layout`` from the arena."""
        _check_layout(layout)
        view, address = self.arena.allocate_with_address(layout.size, layout.align)
        allocation = Allocation(self, layout, address, view, None)
        with self._lock:
            self._live.add(id(allocation))
        return allocation

    def deallocate(self, allocation: Allocation) -> None:
        """Mark ``allocation`` free; its bytes are reclaimed by the next ``reset()``."""
        self._check_own(allocation)
        with self._lock:
            if id(allocation) not in self._live:
                raise BlockReleasedError("allocation was invalidated by an arena reset")
            self._live.discard(id(allocation))
        allocation._view = None

    def reset(self) -> None:
        """Free every allocation at once (their views are invalidated)."""
        with self._lock:
            self._live.clear()
        self.arena.reset()


class MonitoredAllocator(Allocator):
    """Wraps any of our allocators and counts allocations, deallocations, current and peak usage."""

    def __init__(self, inner: Allocator) -> None:
        if not isinstance(inner, Allocator):
            raise TypeError(f"inner must be an Allocator, got {type(inner).__name__}")
        self.inner = inner
        self._lock = threading.Lock()
        self._allocations = 0
        self._deallocations = 0
        self._failed = 0
        self._current = 0
        self._peak = 0
        self._total = 0
        self._mine: dict[int, Allocation] = {}
        self._freeing: set[int] = set()  # ids being deallocated right now

    def allocate(self, layout: Layout) -> Allocation:
        """Allocate through the wrapped allocator, counting the request."""
        try:
            allocation = self.inner.allocate(layout)
        except (PoolExhausted, MemoryError):
            with self._lock:
                self._failed += 1
            raise
        with self._lock:
            self._allocations += 1
            self._current += layout.size
            self._total += layout.size
            if self._current > self._peak:
                self._peak = self._current
            self._mine[id(allocation)] = allocation
        return allocation

    def deallocate(self, allocation: Allocation) -> None:
        """Deallocate through the wrapped allocator, counting the release."""
        with self._lock:
            if self._mine.get(id(allocation)) is not allocation:
                if isinstance(allocation, Allocation) and (
                    allocation.freed or id(allocation) in self._freeing
                ):
                    raise BlockReleasedError("allocation deallocated twice")
                raise ValueError("allocation was not made by this allocator")
            del self._mine[id(allocation)]  # claimed: a concurrent second deallocate fails above
            self._freeing.add(id(allocation))
        try:
            self.inner.deallocate(allocation)
        except BaseException:
            with self._lock:
                self._freeing.discard(id(allocation))
                self._mine[id(allocation)] = allocation
            raise
        with self._lock:
            self._freeing.discard(id(allocation))
            self._deallocations += 1
            self._current -= allocation.layout.size

    def stats(self) -> AllocatorStats:
        """A snapshot of the counters."""
        with self._lock:
            return AllocatorStats(
                allocations=self._allocations,
                deallocations=self._deallocations,
                failed_allocations=self._failed,
                current_usage=self._current,
                peak_usage=self._peak,
                total_allocated=self._total,
            )

    def reset_peak(self) -> None:
        """Start peak tracking again from the current usage."""
        with self._lock:
            self._peak = self._current


def create_custom_allocator(chunk_size: int = 1 << 20, *, pool: MemoryPool | None = None) -> ArenaAllocator:
    """Our arena allocator (``AllocatorType.CUSTOM``): bump allocation, freed all at once by ``reset()``."""
    return ArenaAllocator(Arena(chunk_size, pool=pool))


def create_monitored_allocator(allocator: Allocator) -> MonitoredAllocator:
    """Wrap ``allocator`` so its allocations, deallocations, current and peak usage are counted."""
    return MonitoredAllocator(allocator)
