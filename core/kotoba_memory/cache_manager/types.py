"""Value types shared by every cache: policies, cached values with metadata, stats and errors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory.validation import check_enum, check_ttl

__all__ = [
    "CacheAnalysis",
    "CacheError",
    "CacheMetadata",
    "CachePolicy",
    "CacheStats",
    "CachedValue",
    "EntryTooLargeError",
    "EvictionCause",
    "UnhashableKeyError",
    "check_ttl",
]


class CacheError(KotobaMemoryError):
    """Base class of the errors a cache raises on purpose."""


class EntryTooLargeError(CacheError, ValueError):
    """An entry weighs more than the whole cache may hold."""

    def __init__(self, key: object, weight: int, limit: int) -> None:
        self.key = key
        self.weight = weight
        self.limit = limit
        super().__init__(f"entry {key!r} weighs {weight} bytes, more than the cache's max_bytes={limit}")


class UnhashableKeyError(CacheError, TypeError):
    """A cache key is not hashable."""

    def __init__(self, key: object) -> None:
        super().__init__(f"cache keys must be hashable, got {type(key).__name__}")


class CachePolicy(enum.Enum):
    """Which entries leave first when the cache is full."""

    LRU = "lru"
    LFU = "lfu"
    FIFO = "fifo"
    ADAPTIVE = "adaptive"

    @classmethod
    def coerce(cls, value: CachePolicy | str) -> CachePolicy:
        """Accept a member or its name/value in any case (``"lru"``, ``"LRU"``); ConfigError otherwise."""
        return check_enum(value, "policy", cls, label="cache policy")


class EvictionCause(enum.Enum):
    """Why an entry left the cache without being deleted by the caller."""

    SIZE = "size"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class CacheMetadata:
    """What is known about a cached payload: its type, size in bytes and how it was encoded."""

    content_type: str
    size_bytes: int
    compression_ratio: float | None = None
    checksum: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.content_type, str):
            raise TypeError(f"content_type must be a str, got {type(self.content_type).__name__}")
        if isinstance(self.size_bytes, bool) or not isinstance(self.size_bytes, int):
            raise TypeError(f"size_bytes must be an int, got {type(self.size_bytes).__name__}")
        if self.size_bytes < 0:
            raise ValueError(f"size_bytes must be >= 0, got {self.size_bytes}")
        ratio = self.compression_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0
        ):
            raise ValueError(f"compression_ratio must be a number > 0 or None, got {ratio!r}")


@dataclass(frozen=True, slots=True)
class CachedValue:
    """A payload with its metadata and its own ttl; a cache stores and returns it as is.

    Without ``metadata`` one is derived: the type name and the default weigher's size estimate.
    ``created_at`` is wall-clock seconds since the epoch.
    """

    data: Any
    metadata: CacheMetadata = None  # type: ignore[assignment]  # filled in __post_init__
    ttl: float | None = None
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.metadata is None:
            from kotoba_memory.cache_manager.weigher import estimate_size

            meta = CacheMetadata(type(self.data).__name__, estimate_size(self.data))
            object.__setattr__(self, "metadata", meta)
        elif not isinstance(self.metadata, CacheMetadata):
            raise TypeError(f"metadata must be a CacheMetadata, got {type(self.metadata).__name__}")
        object.__setattr__(self, "ttl", check_ttl(self.ttl))

    @property
    def size_bytes(self) -> int:
        """The payload size recorded in the metadata."""
        return self.metadata.size_bytes


@dataclass(frozen=True, kw_only=True)
class CacheStats:
    """A consistent snapshot of a cache's counters and occupancy.

    Latencies are medians of sampled calls in nanoseconds (0 before any sample);
    ``metadata_bytes`` is the cache's own bookkeeping memory beyond the cached values.
    """

    hits: int
    misses: int
    hit_rate: float
    evictions: int
    expirations: int
    rejections: int
    puts: int
    deletes: int
    bytes: int
    entries: int
    max_bytes: int | None
    max_entries: int | None
    metadata_bytes: int
    hit_latency_ns: int
    miss_latency_ns: int
    name: str = ""
    policy: str = ""

    @property
    def requests(self) -> int:
        """Lookups counted: hits plus misses."""
        return self.hits + self.misses

    @property
    def metadata_overhead(self) -> float:
        """Bookkeeping bytes per cached byte (0.0 when empty)."""
        return self.metadata_bytes / self.bytes if self.bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON and metrics exporters)."""
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True, slots=True)
class CacheAnalysis:
    """Stats, a 0..1 effectiveness score, recommendations with numbers, and the estimated MRC.

    ``miss_ratio_curve`` maps a capacity (in the cache's own unit: entries, or bytes when byte
    bounded) to the estimated miss ratio at that capacity.
    """

    stats: CacheStats
    cache_effectiveness: float
    recommendations: list[str]
    miss_ratio_curve: dict[int, float]
