"""Memory that is certain to raise RSS by its size, for tests that check a measured RSS growth."""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE


def fresh_resident(size: int) -> mmap.mmap:
    """An anonymous mapping of ``size`` bytes with every page written: new resident pages, always.

    A ``bytearray`` of the same size may be carved from heap memory an earlier test freed and glibc kept
    resident (its mmap threshold rises to 32 MiB after a large free, and a freed block under a live one
    is never trimmed); touching it then adds almost nothing to RSS. A mapping of our own cannot be.
    """
    block = mmap.mmap(-1, size)
    for offset in range(0, size, PAGE):
        block[offset] = 1
    return block
