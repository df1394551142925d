"""``MemoryPool``: one reserved ``mmap`` carved into slabs (small sizes) and buddy blocks (large sizes).

Two implementations share everything but the hot paths: ``PyMemoryPool`` / ``PyMemoryBlock`` (pure
Python, the reference) and ``CMemoryPool`` / ``kotoba_memory._cpool.Block`` (the size-class free lists,
the deferred large-block cache and the block handle in C). ``MemoryPool`` and ``MemoryBlock`` name the
one in use: C where it was built, unless ``KOTOBA_MEMORY_PURE_PYTHON=1``.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import heapq
import mmap
import sys
import threading
import time
import weakref
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Self

from kotoba_memory import _native
from kotoba_memory.errors import ConfigError
from kotoba_memory.memory_pool.errors import (
    BlockInUseError,
    BlockReleasedError,
    PoolClosedError,
    PoolCorruptedError,
    PoolExhausted,
)
from kotoba_memory.memory_pool.size_classes import SizeClasses
from kotoba_memory.process import forks
from kotoba_memory.validation import check_enum, check_int

__all__ = [
    "CMemoryPool",
    "DefragmentResult",
    "FallbackPolicy",
    "MemoryBlock",
    "MemoryPool",
    "PoolStats",
    "PyMemoryBlock",
    "PyMemoryPool",
    "iter_pools",
]

MIN_BLOCK_SHIFT = 9
MIN_BLOCK = 1 << MIN_BLOCK_SHIFT  # smallest buddy block; large requests are rounded to a multiple of it
SLAB_MAX = 8 * 1024  # requests up to this size are served from slabs
_SLAB_MIN_SHIFT = 14
_SLAB_MIN = 1 << _SLAB_MIN_SHIFT  # smallest slab; slabs are power-of-two buddy blocks
_SLAB_MIN_SLOTS = 4
_LARGE_CACHE_MAX_BLOCKS = 32  # freed large blocks kept un-coalesced for fast reuse of the same size
_TIME_SAMPLE_MASK = 31  # time one allocation in 32 for ``mean_allocation_ns``

_MIN_CAPACITY = 64 * 1024
_LEAKED = -2  # pending-queue marker: a collected block whose buffer was still exported


_cpool = _native.load("_cpool")
if _cpool is not None:
    _cpool.configure(BlockReleasedError, BlockInUseError, PoolClosedError)

_LIVE_POOLS: weakref.WeakSet[_PoolImpl] = weakref.WeakSet()


def iter_pools() -> Iterator[_PoolImpl]:
    """The live (not closed) memory pools of this process, weakly held, for metrics and reports."""
    for pool in list(_LIVE_POOLS):
        if not pool.closed:
            yield pool


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would stay locked forever in the child.
    for pool in list(_LIVE_POOLS):
        pool._lock = type(pool._lock)()


forks.register(_after_fork_in_child, name="memory_pool")


class FallbackPolicy(enum.Enum):
    """What ``allocate`` does when the pool is full."""

    RAISE = "raise"  # raise PoolExhausted
    HEAP = "heap"  # hand out an ordinary bytearray, counted in ``stats().fallbacks``

    @classmethod
    def _missing_(cls, value: object) -> FallbackPolicy | None:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        return None


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a pool's counters and fragmentation figures."""

    capacity: int  # bytes reserved
    used_bytes: int  # bytes of slots/blocks handed out (class sizes)
    requested_bytes: int  # bytes callers asked for, for live blocks
    free_bytes: int
    live_blocks: int
    allocations: int
    releases: int
    pool_hits: int  # allocations served from the reserved memory
    fallbacks: int  # allocations served from the heap because the pool was full
    failures: int  # PoolExhausted raised
    hit_rate: float  # pool_hits / (pool_hits + fallbacks + failures)
    allocation_efficiency: float  # requested_bytes / capacity
    internal_fragmentation: float  # 1 - requested_bytes / used_bytes
    external_fragmentation: float  # 1 - largest_free_block / free_bytes
    largest_free_block: int
    mean_allocation_ns: float  # sampled
    metadata_bytes: int  # the pool's own bookkeeping (excludes the callers' block handles)
    metadata_ratio: float  # metadata_bytes / capacity
    slabs: int
    empty_slabs: int
    leaked_exported: int  # blocks collected while a buffer export pinned them; never reused

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict (for JSON or metrics)."""
        return asdict(self)


@dataclass(frozen=True)
class DefragmentResult:
    """What one ``defragment()`` call did."""

    slabs_returned: int
    cached_blocks_coalesced: int
    bytes_advised: int  # free bytes handed back to the OS with madvise(MADV_DONTNEED)


class PyMemoryBlock:
    """A block of pool memory; use ``as_slice()`` for a writable zero-copy memoryview.

    Released by ``release()``, on leaving a ``with`` block, or when collected. The pure-Python
    reference; the C block (``kotoba_memory._cpool.Block``) also exports the buffer protocol.
    """

    # _cls >= 0: slab class index; _cls < 0: buddy block of capacity -_cls. _offset -1: heap fallback.
    # _pool is None once released.
    __slots__ = ("_cls", "_offset", "_pool", "_size", "_view")

    def __init__(self, pool: PyMemoryPool, offset: int, size: int, cls: int) -> None:
        self._pool: PyMemoryPool | None = pool
        self._offset = offset
        self._size = size
        self._cls = cls
        self._view: memoryview | None = None

    def size(self) -> int:
        """The requested size in bytes."""
        return self._size

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        """Bytes actually reserved for this block (its size class)."""
        pool = self._pool
        if pool is None:
            raise BlockReleasedError("block already released")
        cls = self._cls
        return -cls if cls < 0 else pool._slab_sizes[cls]

    @property
    def released(self) -> bool:
        """True once the block has been given back to the pool."""
        return self._pool is None

    @property
    def from_heap(self) -> bool:
        """True when the pool was full and this block came from the heap fallback."""
        return self._offset < 0

    @property
    def address(self) -> int:
        """The block's memory address (for ctypes or alignment checks)."""
        pool = self._pool
        if pool is None:
            raise BlockReleasedError("block already released")
        if self._offset < 0:
            return ctypes.addressof(ctypes.c_char.from_buffer(self.as_slice()))
        return pool._address + self._offset

    def as_slice(self) -> memoryview:
        """A writable memoryview of exactly ``size()`` bytes, invalidated when the block is released.

        Sub-slices taken from it follow Python's buffer rules: they stay usable after release, so do not
        keep them beyond the block's lifetime.
        """
        view = self._view
        if view is None:
            pool = self._pool
            if pool is None:
                raise BlockReleasedError("block already released; its memory may belong to another block")
            # Under the pool lock, so a concurrent release() always sees (and releases) this view.
            lock = pool._lock
            lock.acquire()
            try:
                if self._pool is None:
                    raise BlockReleasedError("block already released; its memory may belong to another block")
                view = self._view
                if view is None:
                    off = self._offset
                    view = self._view = pool._base[off : off + self._size]
            finally:
                lock.release()
        return view

    def release(self) -> None:
        """Give the block back to the pool; raises ``BlockReleasedError`` if already released."""
        pool = self._pool
        if pool is None:
            raise BlockReleasedError("block released twice")
        off = self._offset
        cls = self._cls
        lock = pool._lock
        lock.acquire()  # explicit acquire/release: half the cost of ``with`` on the hot path
        try:
            if self._pool is None:  # another thread released it first
                raise BlockReleasedError("block released twice")
            view = self._view
            if view is not None:
                try:
                    view.release()
                except BufferError as exc:
                    raise BlockInUseError(
                        "cannot release block: its buffer is still exported (numpy, PickleBuffer, ...); "
                        "drop those references first"
                    ) from exc
                self._view = None
            self._pool = None
            if off < 0:
                pool._free_block(off, cls, self._size)
            elif cls >= 0:  # inlined slab push
                pool._releases += 1
                pool._used -= pool._slab_sizes[cls]
                pool._requested -= self._size
                pool._words[off >> 3] = pool._heads[cls]
                pool._heads[cls] = off
                pool._slab_live[(off & pool._slab_masks[cls]) >> _SLAB_MIN_SHIFT] -= 1
            elif pool._large_cached < _LARGE_CACHE_MAX_BLOCKS:  # inlined deferred-coalescing push
                pool._releases += 1
                pool._used += cls
                pool._requested -= self._size
                cached = pool._large_cache.get(-cls)
                if cached is None:
                    pool._large_cache[-cls] = [off]
                else:
                    cached.append(off)
                pool._large_cached += 1
            else:
                pool._free_block(off, cls, self._size)
        finally:
            lock.release()

    def __enter__(self) -> PyMemoryBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self.release()

    def __del__(self) -> None:
        pool = self._pool
        if pool is None:
            return
        try:
            view = self._view
            if view is not None:
                try:
                    view.release()
                except BufferError:
                    # Something still points into this memory: never reuse it.
                    pool._pending.append((_LEAKED, 0, 0))
                    return
            # Never take the pool lock here: a collection can run while this thread holds it.
            pool._pending.append((self._offset, self._cls, self._size))
        except Exception:  # interpreter shutdown: the pool may already be gone
            pass

    def __repr__(self) -> str:
        if self._pool is None:
            return f"<MemoryBlock size={self._size} released>"
        state = "heap" if self._offset < 0 else f"@{self._offset}"
        return f"<MemoryBlock size={self._size} capacity={self.capacity} {state}>"


class _PoolImpl:
    """A fixed reservation of ``capacity`` bytes handing out ``MemoryBlock`` s without per-call malloc.

    Small requests (<= 8 KiB) come from slabs of one size class; larger ones from a buddy allocator whose
    unused tails are split off and freed, so a request wastes at most its size class rounding.
    Thread-safe.
    """

    # Supplied by the fast-path base (PyFastPaths or the C PoolCore); declared for the type checker.
    _lock_type: Any
    _lock: Any
    _pending: deque[tuple[int, int, int]]
    _heads: array[int]
    _slab_live: array[int]
    _used: int
    _requested: int
    _allocs: int
    _releases: int
    _failures: int
    _timed_ns: int
    _timed: int

    if TYPE_CHECKING:

        @property
        def _large_cached(self) -> int: ...
        def _lc_pop(self, cap: int) -> int: ...
        def _lc_push(self, cap: int, off: int) -> None: ...
        def _lc_drain(self) -> list[tuple[int, int]]: ...
        def _lc_entries(self) -> list[tuple[int, int]]: ...
        def _lc_metadata_bytes(self) -> int: ...
        def _new_block(self, off: int, size: int, cls: int) -> PyMemoryBlock: ...
        def _heap_block(self, size: int) -> PyMemoryBlock: ...
        def _bind(self) -> None: ...
        def _unbind(self) -> None: ...
        def allocate(self, size: int, *, zero: bool = False) -> PyMemoryBlock:
            """A block of ``size`` bytes; contents are left as they were unless ``zero=True``."""

    def __init__(
        self,
        capacity: int,
        *,
        fallback: FallbackPolicy | str = FallbackPolicy.RAISE,
        classes_per_octave: int = 16,
        name: str | None = None,
    ) -> None:
        # bytes: at least one page of slabs, below the 2**48 bytes this pool addresses
        check_int(capacity, "capacity", low=_MIN_CAPACITY, high=(1 << 48) - 1)
        self._fallback = check_enum(fallback, "fallback", FallbackPolicy, label="fallback policy")
        self._classes = SizeClasses(classes_per_octave)
        self._octave_shift = classes_per_octave.bit_length() - 1
        self.name = name or f"pool-{id(self):x}"

        page = mmap.PAGESIZE
        capacity = -(-capacity // page) * page
        self._capacity = capacity
        # Private, not the default MAP_SHARED: a forked worker must get its own copy-on-write pages, or
        # parent and children would hand out the same bytes.
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                -1, capacity, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except (OSError, OverflowError, ValueError) as exc:
            # Valid by type and range, yet more than this machine (or its address-space limit) maps.
            raise ConfigError(
                "capacity", f"cannot map {capacity} bytes on this machine ({exc}); choose a smaller pool"
            ) from exc
        self._base = memoryview(self._mm)
        self._words = self._base.cast("q")  # intrusive free-list links live in free slab slots
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        self._lock = self._lock_type()
        self._pending = deque()  # releases from __del__ (collected blocks), any thread

        # Buddy allocator: per order a set (membership) and an address-ordered heap (lowest first).
        self._orders = max(1, (capacity - 1).bit_length() - MIN_BLOCK_SHIFT + 1)
        self._free_sets: list[set[int]] = [set() for _ in range(self._orders)]
        self._free_heaps: list[list[int]] = [[] for _ in range(self._orders)]
        for off, order in _pieces(0, capacity):
            self._push_free(order, off)

        # Slabs: one intrusive free chain per class; live counts per 16 KiB slab granule.
        self._slab_sizes = self._classes.classes_up_to(SLAB_MAX)
        self._class_of = array("h", [0]) * ((SLAB_MAX >> 4) + 1)  # index: (n + 15) >> 4
        ci = 0
        for i in range(1, len(self._class_of)):
            while self._slab_sizes[ci] < (i << 4):
                ci += 1
            self._class_of[i] = ci
        self._slab_bytes = [
            max(_SLAB_MIN, 1 << (s * _SLAB_MIN_SLOTS - 1).bit_length()) for s in self._slab_sizes
        ]
        self._slab_masks = [~(b - 1) for b in self._slab_bytes]
        self._heads = array("q", [-1]) * len(self._slab_sizes)
        self._slab_live = array("q", [0]) * ((capacity >> _SLAB_MIN_SHIFT) + 1)
        # class index of the slab starting at each 16 KiB granule, -1 where no slab starts
        self._slab_class = array("h", [-1]) * len(self._slab_live)
        self._slab_count = 0

        self._used = 0
        self._requested = 0
        self._heap_releases = 0
        self._allocs = 0
        self._releases = 0
        self._fallbacks = 0
        self._failures = 0
        self._timed_ns = 0
        self._timed = 0
        self._leaked_exported = 0
        self._bind()
        _LIVE_POOLS.add(self)

    # -- public API ----------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Bytes reserved (rounded up to whole pages)."""
        return self._capacity

    @property
    def size_classes(self) -> SizeClasses:
        """The size-class grid this pool rounds requests to."""
        return self._classes

    def _allocate_slow(self, size: int, zero: bool = False) -> PyMemoryBlock:
        """``allocate`` in pure Python: the whole of it for PyMemoryPool, the C fast path's fallback."""
        if type(size) is not int:
            if isinstance(size, bool) or not isinstance(size, int):
                raise TypeError(f"size must be an int, got {type(size).__name__}")
            size = int(size)
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        lock = self._lock
        lock.acquire()
        try:
            if self._pending:
                self._drain_pending()
            self._allocs = n = self._allocs + 1
            t0 = 0 if n & _TIME_SAMPLE_MASK else time.perf_counter_ns()
            if size <= SLAB_MAX:
                cls = self._class_of[(size + 15) >> 4]
                off = self._heads[cls]
                if off < 0:
                    off = self._new_slab(cls)
                if off >= 0:
                    nxt = self._words[off >> 3]
                    if nxt >= self._capacity or nxt < -1:
                        self._failures += 1
                        raise PoolCorruptedError(
                            f"free-list of pool {self.name!r} overwritten at offset {off}: a view into "
                            "released memory was written to"
                        )
                    self._heads[cls] = nxt
                    self._slab_live[(off & self._slab_masks[cls]) >> _SLAB_MIN_SHIFT] += 1
                    self._used += self._slab_sizes[cls]
            else:
                # inlined _large_size: size class step for this power of two, then a 512-byte multiple
                step = 1 << ((size - 1).bit_length() - 1 - self._octave_shift)
                cap = -(-size // step) * step
                if cap & (MIN_BLOCK - 1):
                    cap = (cap | (MIN_BLOCK - 1)) + 1
                cls = -cap
                off = self._lc_pop(cap)
                if off < 0:
                    off = self._large_take(cap)
                if off >= 0:
                    self._used += cap
            if off < 0:
                block = self._exhausted(size)
            else:
                self._requested += size
                block = self._new_block(off, size, cls)
            if t0:
                self._timed_ns += time.perf_counter_ns() - t0
                self._timed += 1
        finally:
            lock.release()
        if zero and not block.from_heap:
            ctypes.memset(block.address, 0, size)
        return block

    async def aallocate(self, size: int, *, zero: bool = False) -> PyMemoryBlock:
        """Async twin of ``allocate`` (pure in-memory work, runs inline)."""
        return self.allocate(size, zero=zero)

    def stats(self) -> PoolStats:
        """A snapshot of counters, fragmentation and metadata figures."""
        with self._lock:
            if self._pending:
                self._drain_pending()
            # Copy what the slow figures need; they are computed after the lock is released.
            blocks = self._free_block_list(include_cache=True)
            slab_class = self._slab_class[:]
            slab_live = self._slab_live[:]
            capacity, used, requested = self._capacity, self._used, self._requested
            allocs, fallbacks, failures = self._allocs, self._fallbacks, self._failures
            releases, heap_releases = self._releases, self._heap_releases
            timed_ns, timed = self._timed_ns, self._timed
            slabs, leaked = self._slab_count, self._leaked_exported
            metadata = self._metadata_bytes()
        hits = allocs - fallbacks - failures
        free = capacity - used
        largest = max((end - start for start, end, _ in _runs(blocks)), default=0)
        return PoolStats(
            capacity=capacity,
            used_bytes=used,
            requested_bytes=requested,
            free_bytes=free,
            live_blocks=hits - releases,
            allocations=allocs,
            releases=releases + heap_releases,
            pool_hits=hits,
            fallbacks=fallbacks,
            failures=failures,
            hit_rate=hits / allocs if allocs else 1.0,
            allocation_efficiency=requested / capacity,
            internal_fragmentation=1.0 - requested / used if used else 0.0,
            external_fragmentation=1.0 - largest / free if free else 0.0,
            largest_free_block=largest,
            mean_allocation_ns=timed_ns / timed if timed else 0.0,
            metadata_bytes=metadata,
            metadata_ratio=metadata / capacity,
            slabs=slabs,
            empty_slabs=sum(1 for i, cls in enumerate(slab_class) if cls >= 0 and not slab_live[i]),
            leaked_exported=leaked,
        )

    def defragment(self) -> DefragmentResult:
        """Coalesce cached free blocks, return empty slabs, and give free pages back to the OS."""
        with self._lock:
            if self._pending:
                self._drain_pending()
            coalesced = self._flush_large_cache()
            returned = self._return_empty_slabs()
            advised = self._advise_free()
        return DefragmentResult(returned, coalesced, advised)

    async def adefragment(self) -> DefragmentResult:
        """Async twin of ``defragment`` (runs in a worker thread: madvise is a system call per block)."""
        return await asyncio.to_thread(self.defragment)

    def close(self) -> None:
        """Unmap the reservation; raises ``BlockInUseError`` while blocks are still live."""
        with self._lock:
            if self._mm is None:
                return
            if self._pending:
                self._drain_pending()
            live = self._allocs - self._fallbacks - self._failures - self._releases
            if live:
                raise BlockInUseError(f"pool {self.name!r} still has {live} live blocks")
            self._unbind()
            self._words.release()
            self._base.release()
            try:
                self._mm.close()
            except BufferError as exc:
                raise BlockInUseError(
                    f"pool {self.name!r}: a sub-slice of a released block is still referenced"
                ) from exc
            self._mm = None
            # Empty every free structure so the allocation fast path falls through to _exhausted, which
            # raises PoolClosedError, without a closed-check of its own.
            self._heads = array("q", [-1]) * len(self._heads)
            self._free_sets = [set() for _ in self._free_sets]
            self._free_heaps = [[] for _ in self._free_heaps]
            self._lc_drain()
            self._slab_class = array("h", [-1]) * len(self._slab_live)
            self._slab_count = 0

    @property
    def closed(self) -> bool:
        """True once ``close()`` succeeded."""
        return self._mm is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        live = self._allocs - self._fallbacks - self._failures - self._releases
        return f"<MemoryPool {self.name!r} capacity={self._capacity} live={live} used={self._used}>"

    # -- internals (called with the lock held unless noted) -------------------------------------------

    def _large_size(self, size: int) -> int:
        cap = self._classes.round(size)
        return -(-cap // MIN_BLOCK) * MIN_BLOCK

    def _exhausted(self, size: int) -> PyMemoryBlock:
        # Reclaim what deferred work holds, then retry once before giving up.
        if self._mm is None:
            self._failures += 1
            raise PoolClosedError(f"pool {self.name!r} is closed")
        self._flush_large_cache()
        self._return_empty_slabs()
        off, cls = self._retry(size)
        if off >= 0:
            self._requested += size
            return self._new_block(off, size, cls)
        if self._fallback is FallbackPolicy.HEAP:
            self._fallbacks += 1
            return self._heap_block(size)
        self._failures += 1
        raise PoolExhausted(
            f"pool {self.name!r} cannot serve {size} bytes: {self._capacity - self._used} of "
            f"{self._capacity} bytes free, largest free block {self._largest_free()} bytes"
        )

    def _retry(self, size: int) -> tuple[int, int]:
        if size <= SLAB_MAX:
            cls = self._class_of[(size + 15) >> 4]
            off = self._heads[cls]
            if off < 0:
                off = self._new_slab(cls)
            if off >= 0:
                self._heads[cls] = self._words[off >> 3]
                self._slab_live[(off & self._slab_masks[cls]) >> _SLAB_MIN_SHIFT] += 1
                self._used += self._slab_sizes[cls]
            return off, cls
        cap = self._large_size(size)
        off = self._large_take(cap)
        if off < 0:
            off = self._take_run(cap)
        if off >= 0:
            self._used += cap
        return off, -cap

    def _free_block(self, offset: int, cls: int, size: int) -> None:
        if offset < 0:
            if offset == _LEAKED:
                self._leaked_exported += 1
            else:
                self._heap_releases += 1
            return
        self._releases += 1
        self._requested -= size
        if cls >= 0:
            self._used -= self._slab_sizes[cls]
            self._words[offset >> 3] = self._heads[cls]
            self._heads[cls] = offset
            self._slab_live[(offset & self._slab_masks[cls]) >> _SLAB_MIN_SHIFT] -= 1
            return
        cap = -cls
        self._used -= cap
        if self._large_cached < _LARGE_CACHE_MAX_BLOCKS:
            self._lc_push(cap, offset)
        else:
            self._large_release(offset, cap)

    def _drain_pending(self) -> None:
        pending = self._pending
        while pending:
            self._free_block(*pending.popleft())

    def _new_slab(self, cls: int) -> int:
        slab_bytes = self._slab_bytes[cls]
        off = self._buddy_take((slab_bytes >> MIN_BLOCK_SHIFT).bit_length() - 1)
        if off < 0:
            return -1
        slot = self._slab_sizes[cls]
        words = self._words
        last = off + (slab_bytes // slot - 1) * slot
        for pos in range(off, last, slot):
            words[pos >> 3] = pos + slot
        words[last >> 3] = self._heads[cls]
        self._heads[cls] = off
        self._slab_class[off >> _SLAB_MIN_SHIFT] = cls
        self._slab_count += 1
        return off

    def _iter_slabs(self, empty_only: bool) -> Iterator[tuple[int, int]]:
        live = self._slab_live
        for granule, cls in enumerate(self._slab_class):
            if cls >= 0 and not (empty_only and live[granule]):
                yield granule << _SLAB_MIN_SHIFT, cls

    def _return_empty_slabs(self) -> int:
        empty: dict[int, set[int]] = {}
        for off, cls in self._iter_slabs(empty_only=True):
            empty.setdefault(cls, set()).add(off)
        if not empty:
            return 0
        words = self._words
        cap = self._capacity
        for cls, slabs in empty.items():
            mask = self._slab_masks[cls]
            # Rebuild the class chain without the slots of the slabs being returned.
            keep: list[int] = []
            pos = self._heads[cls]
            for _ in range(cap // self._slab_sizes[cls] + 1):
                if pos < 0:
                    break
                if (pos & mask) not in slabs:
                    keep.append(pos)
                pos = words[pos >> 3]
            else:
                raise PoolCorruptedError(f"free-list cycle in pool {self.name!r}")
            head = -1
            for pos in reversed(keep):
                words[pos >> 3] = head
                head = pos
            self._heads[cls] = head
            order = (self._slab_bytes[cls] >> MIN_BLOCK_SHIFT).bit_length() - 1
            for off in slabs:
                self._slab_class[off >> _SLAB_MIN_SHIFT] = -1
                self._slab_count -= 1
                self._buddy_free(off, order)
        return sum(len(s) for s in empty.values())

    def _flush_large_cache(self) -> int:
        drained = self._lc_drain()
        for cap, off in drained:
            self._large_release(off, cap)
        return len(drained)

    def _advise_free(self) -> int:
        page = mmap.PAGESIZE
        advised = 0
        mm = self._mm
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        for order, offsets in enumerate(self._free_sets):
            size = MIN_BLOCK << order
            if size < page:
                continue
            for off in offsets:
                mm.madvise(mmap.MADV_DONTNEED, off, size)
                advised += size
        return advised

    def _free_block_list(self, include_cache: bool) -> list[tuple[int, int]]:
        """Every free buddy block as (offset, order); with ``include_cache`` also the deferred ones."""
        blocks = [(off, order) for order, free in enumerate(self._free_sets) for off in free]
        if include_cache:  # cached large blocks are free too: any allocation failure flushes them
            for cap, off in self._lc_entries():
                blocks += _pieces(off, off + cap)
        return blocks

    def _largest_free(self) -> int:
        """The largest contiguous free run: the biggest large block that can still be served."""
        return max((end - start for start, end, _ in _runs(self._free_block_list(True))), default=0)

    def _take_run(self, cap: int) -> int:
        """Slow path: serve ``cap`` bytes from adjacent free blocks that are not buddies of each other.

        A large block is released as its aligned pieces, so it need not start on a power-of-two boundary;
        this finds space plain buddy coalescing cannot merge.
        """
        for start, end, members in _runs(self._free_block_list(include_cache=False)):
            if end - start < cap:
                continue
            used_end = start + cap
            for off, order in members:
                if off >= used_end:
                    break
                self._free_sets[order].remove(off)
                block_end = off + (MIN_BLOCK << order)
                if block_end > used_end:  # give back the part of the last block we do not need
                    for pos, piece in _pieces(used_end, block_end):
                        self._buddy_free(pos, piece)
            return start
        return -1

    def _metadata_bytes(self) -> int:
        getsizeof = sys.getsizeof
        total = sum(getsizeof(s) for s in self._free_sets) + sum(getsizeof(h) for h in self._free_heaps)
        # int objects: the sets' (shared with the heaps) plus the heaps' stale ones
        total += 32 * sum(len(h) for h in self._free_heaps)
        total += self._lc_metadata_bytes()
        total += getsizeof(self._slab_class)
        total += getsizeof(self._class_of) + getsizeof(self._slab_live) + getsizeof(self._heads)
        total += getsizeof(self._slab_sizes) + getsizeof(self._slab_bytes) + getsizeof(self._slab_masks)
        total += 32 * 3 * len(self._slab_sizes) + getsizeof(self._pending)
        return total

    # -- buddy allocator ------------------------------------------------------------------------------

    def _push_free(self, order: int, off: int) -> None:
        self._free_sets[order].add(off)
        heapq.heappush(self._free_heaps[order], off)

    def _buddy_take(self, order: int) -> int:
        """The lowest-addressed free block of ``order`` (split from a larger one if needed), or -1."""
        sets = self._free_sets
        for j in range(order, self._orders):
            free = sets[j]
            if not free:
                continue
            heap = self._free_heaps[j]
            off = heapq.heappop(heap)
            while off not in free:  # stale entry of a block taken or coalesced away
                off = heapq.heappop(heap)
            free.remove(off)
            while j > order:
                j -= 1
                self._push_free(j, off + (MIN_BLOCK << j))
            return off
        return -1

    def _buddy_free(self, off: int, order: int) -> None:
        sets = self._free_sets
        top = self._orders - 1
        while order < top:
            buddy = off ^ (MIN_BLOCK << order)
            free = sets[order]
            if buddy not in free:
                break
            free.remove(buddy)
            off = min(off, buddy)
            order += 1
        self._push_free(order, off)
        heap = self._free_heaps[order]
        if len(heap) > 2 * len(sets[order]) + 64:
            heap[:] = sorted(sets[order])

    def _large_take(self, cap: int) -> int:
        order = ((cap - 1) >> MIN_BLOCK_SHIFT).bit_length()
        if order >= self._orders:
            return -1
        off = self._buddy_take(order)
        if off < 0:
            return -1
        # Split off the unused tail: it decomposes into aligned free buddies whose partners are in use,
        # so they go straight onto the free lists.
        for pos, piece in _pieces(off + cap, off + (MIN_BLOCK << order)):
            self._push_free(piece, pos)
        return off

    def _large_release(self, off: int, cap: int) -> None:
        for pos, piece in _pieces(off, off + cap):
            self._buddy_free(pos, piece)


class _PyFastPaths:
    """The hot paths in pure Python: the reference ``allocate``, the block handle and the large cache."""

    _lock_type: Any = threading.Lock

    def _bind(self) -> None:
        # Freed large blocks kept un-coalesced, by capacity, each list used last-in first-out.
        self._large_cache: dict[int, list[int]] = {}
        self._large_cached = 0

    def _unbind(self) -> None:
        pass

    def _new_block(self, off: int, size: int, cls: int) -> PyMemoryBlock:
        return PyMemoryBlock(self, off, size, cls)  # type: ignore[arg-type]

    def _heap_block(self, size: int) -> PyMemoryBlock:
        block = PyMemoryBlock(self, -1, size, -size)  # type: ignore[arg-type]
        block._view = memoryview(bytearray(size))
        return block

    def _lc_pop(self, cap: int) -> int:
        cached = self._large_cache.get(cap)
        if not cached:
            return -1
        self._large_cached -= 1
        return cached.pop()

    def _lc_push(self, cap: int, off: int) -> None:
        self._large_cache.setdefault(cap, []).append(off)
        self._large_cached += 1

    def _lc_entries(self) -> list[tuple[int, int]]:
        return [(cap, off) for cap, offsets in self._large_cache.items() for off in offsets]

    def _lc_drain(self) -> list[tuple[int, int]]:
        entries = self._lc_entries()
        self._large_cache.clear()
        self._large_cached = 0
        return entries

    def _lc_metadata_bytes(self) -> int:
        cache = self._large_cache
        return sys.getsizeof(cache) + sum(sys.getsizeof(v) + 32 * len(v) for v in cache.values())


class PyMemoryPool(_PyFastPaths, _PoolImpl):
    __doc__ = _PoolImpl.__doc__

    #: A block of ``size`` bytes; contents are left as they were unless ``zero=True``.
    allocate = _PoolImpl._allocate_slow


if _cpool is not None:
    _PoolCore: Any = _cpool.PoolCore
    _CLock: Any = _cpool.Lock

    class CMemoryPool(_PoolCore, _PoolImpl):
        __doc__ = _PoolImpl.__doc__
        _lock_type = _CLock

        def _bind(self) -> None:
            self._bind_core(self._mm, self._base, self._heads, self._slab_live, self._class_of,
                            self._slab_sizes, self._slab_bytes, self._octave_shift)

else:
    CMemoryPool = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:  # both implementations have this interface
    MemoryPool = _PoolImpl
    MemoryBlock = PyMemoryBlock
elif _cpool is not None:
    MemoryPool = CMemoryPool
    MemoryBlock = _cpool.Block
else:
    MemoryPool = PyMemoryPool
    MemoryBlock = PyMemoryBlock


def _runs(blocks: list[tuple[int, int]]) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """Maximal runs of adjacent free blocks: (start, end, [(offset, order), ...]), by address."""
    blocks.sort()
    start = end = -1
    members: list[tuple[int, int]] = []
    for off, order in blocks:
        if off != end:
            if members:
                yield start, end, members
            start, members = off, []
        members.append((off, order))
        end = off + (MIN_BLOCK << order)
    if members:
        yield start, end, members


def _pieces(start: int, end: int) -> list[tuple[int, int]]:
    """Decompose ``[start, end)`` into buddy blocks (offset, order), each aligned to its own size."""
    out = []
    pos = start
    while pos < end:
        align = pos & -pos if pos else 1 << 62
        size = min(align, 1 << ((end - pos).bit_length() - 1))
        out.append((pos, (size >> MIN_BLOCK_SHIFT).bit_length() - 1))
        pos += size
    return out
