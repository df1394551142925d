"""The query cache's counters and the plain-data snapshot :meth:`QueryCache.stats` returns."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["Counters", "QueryCacheStats", "logger"]

logger = logging.getLogger("kotoba_memory.sqlalchemy")


@dataclass(frozen=True, slots=True)
class QueryCacheStats:
    """A snapshot of one QueryCache's counters (plain data, safe to export)."""

    name: str
    hits: int
    misses: int
    bypasses: int
    stores: int
    rejected: int
    errors: int
    global_invalidations: int
    invalidations: Mapping[str, int] = field(default_factory=dict)
    bypass_reasons: Mapping[str, int] = field(default_factory=dict)
    #: Invalidations that could not be written to the tier and are still waiting (the cache is bypassed
    #: meanwhile), and how many were written late, once the tier answered again.
    undelivered: int = 0
    redelivered: int = 0

    @property
    def lookups(self) -> int:
        """Cache lookups made (hits + misses; bypasses are not lookups)."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Hits over lookups, 0.0 before the first lookup."""
        return self.hits / self.lookups if self.lookups else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a JSON-ready dict."""
        return {
            "name": self.name, "hits": self.hits, "misses": self.misses, "bypasses": self.bypasses,
            "stores": self.stores, "rejected": self.rejected, "errors": self.errors,
            "hit_rate": self.hit_rate, "global_invalidations": self.global_invalidations,
            "invalidations": dict(self.invalidations), "bypass_reasons": dict(self.bypass_reasons),
            "undelivered": self.undelivered, "redelivered": self.redelivered,
        }


class Counters:
    """Thread-safe counters of one QueryCache; ``name`` labels its log lines."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._hits = self._misses = self._bypasses = self._stores = self._rejected = self._errors = 0
        self._global_invalidations = 0
        self._invalidations: Counter[str] = Counter()
        self._bypass_reasons: Counter[str] = Counter()
        self._redelivered = 0
        #: Read by the snapshot: how many invalidations wait to be written (set by VersionTokens).
        self.undelivered: Callable[[], int] = lambda: 0

    def hit(self) -> None:
        """Count a result served from the cache."""
        with self._lock:
            self._hits += 1

    def miss(self) -> None:
        """Count a lookup that found no fresh entry."""
        with self._lock:
            self._misses += 1

    def stored(self, accepted: bool) -> None:
        """Count a store the tier accepted (or rejected, e.g. too large)."""
        with self._lock:
            if accepted:
                self._stores += 1
            else:
                self._rejected += 1

    def bypass(self, reason: str) -> None:
        """Count a statement that could not use the cache, by reason."""
        with self._lock:
            self._bypasses += 1
            self._bypass_reasons[reason] += 1

    def error(self, what: str) -> None:
        """Count and log (with the current exception) a failure the query cache continued past."""
        with self._lock:
            self._errors += 1
        logger.warning("query cache %s: %s failed; continuing without the cache", self.name, what,
                       exc_info=True)

    def redelivered(self, count: int) -> None:
        """Count invalidations written late, after the tier failed them."""
        with self._lock:
            self._redelivered += count

    def invalidated(self, tables: frozenset[str] | None) -> None:
        """Count an invalidation of ``tables`` (None: the global generation)."""
        with self._lock:
            if tables is None:
                self._global_invalidations += 1
            else:
                self._invalidations.update(tables)

    def snapshot(self) -> QueryCacheStats:
        """The counters as a :class:`QueryCacheStats`."""
        with self._lock:
            return QueryCacheStats(
                name=self.name, hits=self._hits, misses=self._misses, bypasses=self._bypasses,
                stores=self._stores, rejected=self._rejected, errors=self._errors,
                global_invalidations=self._global_invalidations,
                invalidations=MappingProxyType(dict(self._invalidations)),
                bypass_reasons=MappingProxyType(dict(self._bypass_reasons)),
                undelivered=self.undelivered(), redelivered=self._redelivered,
            )
