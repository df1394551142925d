"""``AllocatorType``: which malloc a process uses, or our in-process arena allocator."""

from __future__ import annotations

import enum

__all__ = ["AllocatorType"]


class AllocatorType(enum.StrEnum):
    """The allocator choice of ``MemoryConfig.allocator_type``; strings like ``"jemalloc"`` are accepted."""

    SYSTEM = "system"  # the platform malloc (glibc ptmalloc2 on Debian/Ubuntu)
    JEMALLOC = "jemalloc"  # preloaded libjemalloc (Debian package libjemalloc2)
    MIMALLOC = "mimalloc"  # preloaded libmimalloc (Debian package libmimalloc2.0)
    CUSTOM = "custom"  # kotoba-memory's arena allocator for buffers inside the process

    @classmethod
    def _missing_(cls, value: object) -> AllocatorType | None:
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if key in (member.value, member.name.lower()):
                    return member
        return None

    @classmethod
    def parse(cls, value: AllocatorType | str) -> AllocatorType:
        """``AllocatorType(value)`` with an error that lists the accepted names."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(f"allocator type must be a string or AllocatorType, got {type(value).__name__}")
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown allocator type {value!r}; expected one of: {names}") from None

    @property
    def preloadable(self) -> bool:
        """True for the mallocs the ``kotoba-memory run`` launcher can preload."""
        return self in (AllocatorType.JEMALLOC, AllocatorType.MIMALLOC)

    def __str__(self) -> str:
        return self.value
