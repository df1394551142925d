"""Errors raised by memory pools, arenas and object pools."""

from __future__ import annotations

from kotoba_memory.errors import KotobaMemoryError


class PoolError(KotobaMemoryError):
    """Base class of every memory-pool error."""


class PoolExhausted(PoolError, MemoryError):
    """The pool (or arena, or object pool) has no room for the request and no fallback is configured."""


class BlockReleasedError(PoolError, ValueError):
    """A block, arena buffer or pooled object was used or released after it had been released."""


class BlockInUseError(PoolError, BufferError):
    """A block cannot be released because something (numpy, PickleBuffer, ...) still exports its buffer."""


class PoolClosedError(PoolError, ValueError):
    """The pool has been closed."""


class PoolCorruptedError(PoolError, RuntimeError):
    """The pool's free-list was overwritten, typically through a sub-slice kept after release."""
