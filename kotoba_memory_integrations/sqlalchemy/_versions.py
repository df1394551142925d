"""Per-table version tokens: the key scheme, minting, and bumping on writes.

Every cached entry is stored with the tokens of the tables it read (plus a global generation) and served
only while they are unchanged. Tokens live in the cache tier itself, so a shared tier (Redis) carries
invalidations between processes.

A bump the tier fails (Redis down) is kept as *undelivered*: until it is written, this QueryCache serves
and stores nothing (every read goes to the database), and each read, plus a scheduler task every
``REDELIVER_EVERY_S``, tries to write it again. A tier that comes back with its old contents (Redis
restarted from its AOF) therefore gets the new tokens before any entry is checked against them.
"""

from __future__ import annotations

import itertools
import threading
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

from kotoba_memory.process import forks, scheduler
from kotoba_memory.process.scheduler import Task
from kotoba_memory_integrations.sqlalchemy._stats import Counters, logger

__all__ = ["MAX_MEMO", "REDELIVER_EVERY_S", "VersionTokens"]

#: Bound of the small memo maps (table set -> version keys, statement shapes).
MAX_MEMO = 4096
#: How often the scheduler retries undelivered invalidations (reads retry them too, before any lookup).
REDELIVER_EVERY_S = 1.0


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
        # version key -> sequence number of the failed bump (a later failure of the same key renumbers it)
        self.undelivered: dict[str, int] = {}
        self._failures = itertools.count(1)
        self._lock = threading.Lock()
        self._task: Task | None = None
        counters.undelivered = self.undelivered.__len__
        forks.register(self.reinit_after_fork, name="query_cache.versions")

    def reinit_after_fork(self) -> None:
        """In a forked child: a new lock (the child keeps the undelivered keys and the scheduler task)."""
        self._lock = threading.Lock()

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

    def lookup(self, entry_key: str | None, version_keys: list[str]) -> dict[str, Any]:
        """``{key: value}`` of the entry and the version keys found, in one call where the tier can.

        A near-cache (an L1 copy per process in front of Redis) reads the tokens from Redis itself
        (``fresh_many``): a token must never lag a bump by the invalidation delay. The entry may come
        from L1: it is only served if it was stored under exactly the tokens read now.
        """
        fresh = getattr(self.cache, "fresh_many", None)
        if fresh is None:
            return dict(self.cache.get_many([entry_key, *version_keys] if entry_key else version_keys))
        found: dict[str, Any] = fresh(version_keys)
        if entry_key is not None:
            entry = self.cache.get(entry_key)
            if entry is not None:
                found[entry_key] = entry
        return found

    def establish(self, key: str) -> str | None:
        """The token of a key that had none, or None when it cannot be known."""
        # A missing token is "unknown, possibly changed": mint a fresh one, never assume "unchanged".
        token = self.new_token()
        if self.cache.add(key, token):
            return token
        current = self.lookup(None, [key]).get(key)
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
        failed = False
        for key in keys:
            if self._write(key):
                with self._lock:
                    self.undelivered.pop(key, None)  # a new token supersedes any that failed before
            else:
                failed = True
                with self._lock:
                    self.undelivered[key] = next(self._failures)
        if failed:
            logger.error("query cache %s could not write invalidations (%d waiting): it serves nothing "
                         "from the cache until they are written", self._counters.name, len(self.undelivered))
            self._schedule_redelivery()
        self._counters.invalidated(tables)

    def _write(self, key: str) -> bool:
        """Give ``key`` a new token (or remove it: absent means "unknown"); False when the tier failed."""
        try:
            if not self.cache.put(key, self.new_token()):
                self.cache.delete(key)
            return True
        except Exception:
            self._counters.error(f"invalidating {key}")
            try:
                self.cache.delete(key)
                return True
            except Exception:
                return False

    def redeliver(self) -> bool:
        """Write the undelivered invalidations; True when none is left (the cache may be used again)."""
        with self._lock:
            pending = list(self.undelivered.items())
        written = 0
        for key, number in pending:
            try:
                if not self.cache.put(key, self.new_token()):
                    self.cache.delete(key)
            except Exception:
                break  # still down: keep this key and the rest for the next try
            written += 1
            with self._lock:
                if self.undelivered.get(key) == number:  # not failed again meanwhile
                    del self.undelivered[key]
        if written:
            self._counters.redelivered(written)
            if not self.undelivered:
                logger.warning("query cache %s: undelivered invalidations written; using the cache again",
                               self._counters.name)
        return not self.undelivered

    def _schedule_redelivery(self) -> None:
        with self._lock:
            if self._task is not None and not self._task.cancelled:
                return
            ref = weakref.ref(self)

            def retry() -> None:
                versions = ref()
                if versions is None:
                    task.cancel(wait=False)
                elif versions.redeliver():
                    with versions._lock:  # a bump failing right now keeps the task (it checks under the lock)
                        if not versions.undelivered:
                            task.cancel(wait=False)

            task = self._task = scheduler.every(REDELIVER_EVERY_S, retry, name="query_cache.redeliver")
