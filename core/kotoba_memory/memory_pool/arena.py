"""``Arena``: bump allocation of temporary buffers that are all freed together."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

from kotoba_memory.errors import ConfigError
from kotoba_memory.memory_pool.errors import BlockInUseError, PoolExhausted
from kotoba_memory.memory_pool.pool import MemoryBlock, MemoryPool
from kotoba_memory.validation import check_int

__all__ = ["Arena", "ArenaStats"]

_MAX_ALIGN = 4096


@dataclass(frozen=True)
class ArenaStats:
    """Counters of one arena."""

    allocations: int  # since creation
    resets: int
    bytes_in_use: int  # bytes handed out since the last reset (including alignment padding)
    peak_bytes: int
    reserved_bytes: int  # bytes of the chunks currently held
    chunks: int


class _Chunk:
    __slots__ = ("address", "block", "buffer", "size", "used", "view")

    def __init__(self, size: int, pool: MemoryPool | None) -> None:
        self.block: MemoryBlock | None = None
        self.buffer: bytearray | None = None
        if pool is not None:
            self.block = pool.allocate(size)
            self.view = self.block.as_slice()
            self.address = self.block.address
        else:
            self.buffer = bytearray(size)
            self.view = memoryview(self.buffer)
            self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        self.size = size
        self.used = 0


class Arena:
    """Hands out memoryviews by bumping a pointer through chunks; ``reset()`` frees them all at once.

    Chunks of ``chunk_size`` bytes come from ``pool`` when given, otherwise from the heap. Every view handed
    out is invalidated by ``reset()`` (or on leaving a ``with`` block), so none can write into reused memory.
    Thread-safe.
    """

    def __init__(
        self, chunk_size: int = 1 << 20, *, max_bytes: int | None = None, pool: MemoryPool | None = None
    ) -> None:
        check_int(chunk_size, "chunk_size", low=64)
        if max_bytes is not None and check_int(max_bytes, "max_bytes") < chunk_size:
            raise ConfigError("max_bytes", f"must be at least chunk_size ({chunk_size}), got {max_bytes}")
        if pool is not None and not isinstance(pool, MemoryPool):
            raise TypeError(f"pool must be a MemoryPool, got {type(pool).__name__}")
        self.chunk_size = chunk_size
        self.max_bytes = max_bytes
        self.pool = pool
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []
        self._views: list[tuple[memoryview, _Chunk]] = []
        self._abandoned: list[tuple[_Chunk, list[memoryview]]] = []
        self._allocations = 0
        self._resets = 0
        self._in_use = 0
        self._peak = 0

    def allocate(self, size: int, align: int = 16, *, zero: bool = False) -> memoryview:
        """A writable view of ``size`` bytes whose address is a multiple of ``align``."""
        return self.allocate_with_address(size, align, zero=zero)[0]

    def allocate_with_address(
        self, size: int, align: int = 16, *, zero: bool = False
    ) -> tuple[memoryview, int]:
        """Like ``allocate`` but also returns the buffer's address."""
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int, got {type(size).__name__}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a positive power of two, got {align!r}")
        if align > _MAX_ALIGN:
            raise ValueError(f"align must be at most {_MAX_ALIGN}, got {align}")
        with self._lock:
            chunk = self._chunks[-1] if self._chunks else None
            pad = 0
            if chunk is not None:
                pad = -(chunk.address + chunk.used) % align
            if chunk is None or chunk.used + pad + size > chunk.size:
                chunk = self._grow(size + align - 1)
                pad = -(chunk.address + chunk.used) % align
            start = chunk.used + pad
            view = chunk.view[start : start + size]
            address = chunk.address + start
            chunk.used = start + size
            self._views.append((view, chunk))
            self._allocations += 1
            self._in_use += pad + size
            if self._in_use > self._peak:
                self._peak = self._in_use
            if zero and size:  # under the lock: a concurrent reset() cannot hand this memory out meanwhile
                ctypes.memset(address, 0, size)
        return view, address

    def reset(self) -> None:
        """Free every buffer at once: their views are released and the first chunk is kept for reuse."""
        self._reset(keep_first=True)

    def close(self) -> None:
        """Free every buffer and give all chunks back (to the pool or the heap)."""
        self._reset(keep_first=False)

    def stats(self) -> ArenaStats:
        """A snapshot of the arena's counters."""
        with self._lock:
            return ArenaStats(
                allocations=self._allocations,
                resets=self._resets,
                bytes_in_use=self._in_use,
                peak_bytes=self._peak,
                reserved_bytes=sum(c.size for c in self._chunks),
                chunks=len(self._chunks),
            )

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Arena chunks={len(self._chunks)} in_use={self._in_use}>"

    def _grow(self, need: int) -> _Chunk:
        size = max(self.chunk_size, need)
        reserved = sum(c.size for c in self._chunks)
        if self.max_bytes is not None and reserved + size > self.max_bytes:
            raise PoolExhausted(
                f"arena limit reached: {reserved} of {self.max_bytes} bytes reserved, {need} more needed"
            )
        chunk = _Chunk(size, self.pool)
        self._chunks.append(chunk)
        return chunk

    def _reset(self, keep_first: bool) -> None:
        with self._lock:
            self._retry_abandoned()
            pinned: dict[int, list[memoryview]] = {}
            for view, owner in self._views:
                try:
                    view.release()
                except BufferError:
                    pinned.setdefault(id(owner), []).append(view)
            self._views = []
            self._in_use = 0
            self._resets += 1
            kept: list[_Chunk] = []
            for chunk in self._chunks:
                if id(chunk) in pinned:
                    # Something still exports a buffer in this chunk: never hand its memory out again.
                    self._abandoned.append((chunk, pinned[id(chunk)]))
                elif keep_first and not kept:
                    chunk.used = 0
                    kept.append(chunk)
                else:
                    self._free_chunk(chunk)
            self._chunks = kept
            if pinned:
                raise BlockInUseError(
                    f"{sum(len(v) for v in pinned.values())} arena buffer(s) are still exported "
                    "(numpy, PickleBuffer, ...); their chunk is retired instead of reused"
                )

    def _retry_abandoned(self) -> None:
        still: list[tuple[_Chunk, list[memoryview]]] = []
        for chunk, views in self._abandoned:
            left = []
            for view in views:
                try:
                    view.release()
                except BufferError:
                    left.append(view)
            if left:
                still.append((chunk, left))
            else:
                self._free_chunk(chunk)
        self._abandoned = still

    @staticmethod
    def _free_chunk(chunk: _Chunk) -> None:
        if chunk.block is not None:
            chunk.block.release()  # also releases chunk.view, the block's own view
        else:
            chunk.view.release()
        chunk.buffer = None
