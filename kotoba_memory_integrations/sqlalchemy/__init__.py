"""SQLAlchemy query-result caching that is never stale: per-table version stamps, transaction aware.

``from kotoba_memory_integrations.sqlalchemy import QueryCache``; see docs/sqlalchemy.md.
"""

from __future__ import annotations

from kotoba_memory_integrations.sqlalchemy._analysis import NONDETERMINISTIC_FUNCTIONS
from kotoba_memory_integrations.sqlalchemy._cache import (
    EXECUTION_OPTION,
    CachedOption,
    NotAttachedError,
    QueryCache,
    QueryCacheError,
    QueryCacheStats,
    iter_query_caches,
)

__all__ = [
    "EXECUTION_OPTION",
    "NONDETERMINISTIC_FUNCTIONS",
    "CachedOption",
    "NotAttachedError",
    "QueryCache",
    "QueryCacheError",
    "QueryCacheStats",
    "iter_query_caches",
]
