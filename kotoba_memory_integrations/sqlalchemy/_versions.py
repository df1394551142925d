"""Per-table version tokens: the key scheme, minting, and bumping on writes.

Every cached entry is stored with the tokens of the tables it read (plus a global generation) and served
only while they are unchanged. Tokens live in the cache tier itself, so a shared tier (Redis) carries
invalidations between processes.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Mapping
from typing import Any

from kotoba_memory_integrations.sqlalchemy._stats import Counters, logger

__all__ = ["MAX_MEMO", "VersionTokens"]

#: Bound of the small memo maps (table set -> version keys, statement shapes).
MAX_MEMO = 4096


class VersionTokens:
    """Reads, mints and bumps the version tokens of one QueryCache in ``cache`` under ``namespace``."""

    def __init__(self, cache: Any, namespace: str, also: Mapping[str, frozenset[str]],
                 counters: Counters) -> None:
        self.cache = cache
        self.prefix = f"{namespace}:"
        self.global_key = f"{namespace}:g"
        self._also = dict(also)
        self._counters = counters
        self._token_prefix = uuid.uuid4().hex[:12] + ":"
        self._tokens = itertools.count(1)
        self._version_keys: dict[frozenset[str], tuple[str, ...]] = {}

    def new_token(self) -> str:
        """A token no other process or QueryCache can mint."""
        return f"{self._token_prefix}{next(self._tokens)}"

    def keys_for(self, tables: frozenset[str]) -> tuple[str, ...]:
        """The version keys an entry reading ``tables`` depends on (the global key first)."""
        keys = self._version_keys.get(tables)
        if keys is None:
            keys = (self.global_key, *(f"{self.prefix}v:{t}" for t in sorted(tables)))
            if len(self._version_keys) >= MAX_MEMO:
                self._version_keys.clear()
            self._version_keys[tables] = keys
        return keys

    def establish(self, key: str) -> str | None:
        """The token of a key that had none, or None when it cannot be known."""
        # A missing token is "unknown, possibly changed": mint a fresh one, never assume "unchanged".
        token = self.new_token()
        if self.cache.add(key, token):
            return token
        current = self.cache.get(key)
        return current if isinstance(current, str) else None

    def expand(self, tables: frozenset[str]) -> frozenset[str]:
        """``tables`` plus what ``also_invalidate`` says a write to them changes."""
        if not self._also:
            return tables
        out = set(tables)
        for table in tables:
            out |= self._also.get(table, frozenset())
        return frozenset(out)

    def bump(self, tables: frozenset[str] | None) -> None:
        """Give ``tables`` (None: the global generation) new tokens, so entries that read them go stale."""
        if tables is None:
            keys = [self.global_key]
        else:
            tables = self.expand(tables)
            keys = [f"{self.prefix}v:{t}" for t in sorted(tables)]
        for key in keys:
            try:
                if not self.cache.put(key, self.new_token()):
                    self.cache.delete(key)
            except Exception:
                self._counters.error(f"invalidating {key}")
                try:
                    self.cache.delete(key)
                except Exception:
                    logger.error("query cache %s could not invalidate %s: cached results of it may be "
                                 "served until they expire", self._counters.name, key)
        self._counters.invalidated(tables)
