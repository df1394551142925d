"""``QueryCache``: SQLAlchemy 2.x query-result caching that never serves a result older than a write.

This module is the facade: configuration, the public API, and attaching to engines and sessionmakers. It
works at the DB-API level so Core, ORM, relationship loads and ``text()`` all go one way; the parts are

* ``_reads``: answering a SELECT from the cache (DB-API and ORM level) or running it and storing the rows;
  ``_replay`` replays stored rows through a stand-in cursor, ``_collector`` tracks an ORM-level miss;
* ``_versions``: the per-table version tokens every entry is checked against, kept in the cache tier itself
  (so a shared tier such as Redis carries invalidations between processes);
* ``_transactions``: which tables the open transaction wrote, and the bump after the DB-API commit;
* ``_hooks``: the listeners installed per engine and per sessionmaker; ``_options``: ``CachedOption``;
* ``_analysis``: which tables a statement reads and writes; ``_stats``: the counters.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.schema import Table

from kotoba_memory.cache_manager.base import BaseCache
from kotoba_memory.cache_manager.inventory import add_view
from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory.validation import check_non_negative_int, check_str, check_ttl
from kotoba_memory_integrations.sqlalchemy._analysis import normalize_table_name, table_names
from kotoba_memory_integrations.sqlalchemy._hooks import EngineHook, SessionHook, as_engine, is_session_target
from kotoba_memory_integrations.sqlalchemy._options import EXECUTION_OPTION, CachedOption, SessionMode
from kotoba_memory_integrations.sqlalchemy._reads import ReadPath
from kotoba_memory_integrations.sqlalchemy._stats import Counters, QueryCacheStats
from kotoba_memory_integrations.sqlalchemy._transactions import TransactionTracker
from kotoba_memory_integrations.sqlalchemy._versions import VersionTokens

__all__ = [
    "EXECUTION_OPTION",
    "CachedOption",
    "NotAttachedError",
    "QueryCache",
    "QueryCacheError",
    "QueryCacheStats",
    "iter_query_caches",
]



def _view_stats(query_cache: QueryCache) -> dict[str, Any]:
    """The query cache's own counters, listed beside its store in the memory report."""
    stats = query_cache.stats()
    return {
        "name": stats.name, "hits": stats.hits, "misses": stats.misses, "bypasses": stats.bypasses,
        "stores": stats.stores, "errors": stats.errors,
    }


class QueryCacheError(KotobaMemoryError):
    """Base class of the query cache's own errors."""


class NotAttachedError(QueryCacheError, ValueError):
    """``detach`` was given an engine or sessionmaker this QueryCache is not attached to."""


# --- registry ----------------------------------------------------------------------------------------

_registry_lock = threading.Lock()
_registry: list[weakref.ref[QueryCache]] = []


def iter_query_caches() -> Iterator[QueryCache]:
    """Yield the QueryCache objects alive in this process (weakly held), e.g. for metrics export."""
    with _registry_lock:
        _registry[:] = [ref for ref in _registry if ref() is not None]
        refs = list(_registry)
    for ref in refs:
        query_cache = ref()
        if query_cache is not None:
            yield query_cache


class QueryCache:
    """Caches SELECT results of the engines (or sessionmakers) it is attached to; never serves stale rows.

    ``cache`` is any kotoba-memory cache (``CacheManager``, a tier, ``RedisCache``): entries and per-table
    version tokens both live there. ``default_ttl`` (seconds) applies to entries whose ``cached()`` gives
    none; ``max_rows`` bounds the rows of a result that is stored; ``namespace`` prefixes every key (give
    apps that share a Redis different namespaces); ``also_invalidate`` maps a table to tables a write to it
    changes behind SQLAlchemy's back (triggers); foreign keys with ON DELETE/UPDATE actions are followed
    automatically.
    """

    def __init__(
        self,
        cache: BaseCache,
        *,
        default_ttl: float | None = None,
        max_rows: int = 10_000,
        namespace: str = "kqc",
        also_invalidate: Mapping[str, Iterable[str]] | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(cache, BaseCache):
            raise TypeError(
                "cache must be a kotoba-memory cache (a BaseCache: CacheManager, TieredCache, RedisCache), "
                f"got {type(cache).__name__}"
            )
        # finite: an infinite ttl used to be accepted here and then made every store fail
        self.default_ttl = check_ttl(default_ttl, "default_ttl")
        check_non_negative_int(max_rows, "max_rows")
        check_str(namespace, "namespace", allow_spaces=False)
        if name is not None:
            check_str(name, "name")
        self.cache = cache
        self.max_rows = max_rows
        self.namespace = namespace
        self._counters = Counters(name or f"query-cache-{uuid.uuid4().hex[:8]}")
        also: dict[str, frozenset[str]] = {}
        for table, related in (also_invalidate or {}).items():
            also[normalize_table_name(table)] = table_names(related)
        self._owner = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._engine_hooks: dict[Engine, EngineHook] = {}
        self._session_hooks: dict[int, SessionHook] = {}
        self._orm_listening = False
        self._versions = VersionTokens(cache, namespace, also, self._counters)
        self._transactions = TransactionTracker(self._owner, self._versions)
        self._reads = ReadPath(self)
        with _registry_lock:
            _registry.append(weakref.ref(self))
        add_view(self, cache, "SQLAlchemy QueryCache", _view_stats)

    def __repr__(self) -> str:
        return f"<QueryCache {self.name!r} engines={len(self._engine_hooks)}>"

    @property
    def name(self) -> str:
        """The name in stats, metrics and log lines."""
        return self._counters.name

    @name.setter
    def name(self, value: str) -> None:
        self._counters.name = value

    # --- public API ----------------------------------------------------------------------------------

    def cached(
        self,
        ttl: float | None = None,
        *,
        tables: Iterable[str | Table] | str | Table | None = None,
        propagate: bool = True,
        allow_nondeterministic: bool = False,
    ) -> CachedOption:
        """Statement option opting one query in: ``select(User).options(qc.cached(ttl=60))``.

        ``tables`` names what a ``text()`` SELECT reads (required for those; added to the detected tables
        otherwise). ``propagate`` carries the option to the ORM's relationship loads of the loaded objects.
        ``allow_nondeterministic`` caches statements calling now()/random()-like functions anyway.
        """
        return CachedOption(
            self,
            ttl=check_ttl(ttl, "ttl"),
            tables=table_names(tables) if tables is not None else frozenset(),
            enabled=True,
            propagate=bool(propagate),
            allow_nondeterministic=bool(allow_nondeterministic),
        )

    def uncached(self) -> CachedOption:
        """Statement option opting one query out (useful with ``cache_all_selects=True``)."""
        return CachedOption(self, ttl=None, tables=frozenset(), enabled=False, propagate=False,
                            allow_nondeterministic=False)

    def attach(self, target: Any, *, cache_all_selects: bool = False) -> None:
        """Start caching for an ``Engine`` (Core and ORM traffic), an ``AsyncEngine``, or a ``sessionmaker``.

        With a sessionmaker only its sessions' statements are cached, but writes are tracked on every
        engine those sessions use. Attaching again updates ``cache_all_selects``.
        """
        engine = as_engine(target)
        with self._lock:
            if engine is not None:
                hook = self._ensure_engine_locked(engine)
                hook.direct = True
                hook.cache_all = bool(cache_all_selects)
                return
            if not is_session_target(target):
                raise TypeError(
                    "attach() takes an Engine, AsyncEngine, sessionmaker or Session subclass, "
                    f"got {type(target).__name__}"
                )
            existing = self._session_hooks.get(id(target))
            if existing is not None:
                existing.cache_all = bool(cache_all_selects)
                return
            hook_s = SessionHook(target=target, cache_all=bool(cache_all_selects), listeners=[],
                                  engines=set())
            self._session_hooks[id(target)] = hook_s

            def on_orm_execute(orm_execute_state: Any) -> None:
                orm_execute_state.update_execution_options(
                    **{EXECUTION_OPTION: SessionMode(self._owner, hook_s.cache_all)}
                )

            def on_after_begin(session: Any, transaction: Any, connection: Any) -> None:
                self._ensure_engine_for(hook_s, connection.engine)

            for name, fn in (("do_orm_execute", on_orm_execute), ("after_begin", on_after_begin)):
                event.listen(target, name, fn)
                hook_s.listeners.append((target, name, fn))
            bind = getattr(target, "kw", {}).get("bind") if isinstance(target, sessionmaker) else None
            bind_engine = as_engine(bind) if bind is not None else None
            if bind_engine is not None:
                self._ensure_engine_for_locked(hook_s, bind_engine)

    def detach(self, target: Any) -> None:
        """Remove every listener this QueryCache added for ``target``.

        When an engine stops being watched, everything cached so far is invalidated (the global token is
        bumped): writes made while nobody watches could never be seen, so a later ``attach`` must not
        find old entries.
        """
        engine = as_engine(target)
        released = False
        with self._lock:
            if engine is not None:
                hook = self._engine_hooks.get(engine)
                if hook is None or not hook.direct:
                    raise NotAttachedError(f"{self.name} is not attached to {engine!r}")
                hook.direct = False
                hook.cache_all = False
                released = self._release_engine_locked(hook)
            else:
                hook_s = self._session_hooks.pop(id(target), None)
                if hook_s is None:
                    raise NotAttachedError(f"{self.name} is not attached to {target!r}")
                for tgt, name, fn in hook_s.listeners:
                    if event.contains(tgt, name, fn):
                        event.remove(tgt, name, fn)
                for bound in hook_s.engines:
                    engine_hook = self._engine_hooks.get(bound)
                    if engine_hook is not None:
                        engine_hook.owners.discard(id(target))
                        released = self._release_engine_locked(engine_hook) or released
        if released:
            self._versions.bump(None)

    def close(self) -> None:
        """Detach from everything."""
        with self._lock:
            targets = [h.target for h in self._session_hooks.values()]
            engines = [e for e, h in self._engine_hooks.items() if h.direct]
        for target in targets:
            self.detach(target)
        for engine in engines:
            self.detach(engine)

    @property
    def attached_engines(self) -> list[Engine]:
        """Engines currently carrying this QueryCache's listeners."""
        with self._lock:
            return list(self._engine_hooks)

    def invalidate(self, *tables: str | Table | Iterable[str | Table]) -> None:
        """Mark tables changed (for writes made outside SQLAlchemy): their cached results are never served."""
        names: set[str] = set()
        for item in tables:
            names |= table_names(item)
        if not names:
            raise ValueError("invalidate() needs at least one table; use invalidate_all() for everything")
        self._versions.bump(frozenset(names))

    def invalidate_all(self) -> None:
        """Invalidate every cached result of this QueryCache (bumps the global generation)."""
        self._versions.bump(None)

    async def ainvalidate(self, *tables: str | Table | Iterable[str | Table]) -> None:
        """Async twin of :meth:`invalidate` (runs in a worker thread: the tier may do network I/O)."""
        await asyncio.to_thread(self.invalidate, *tables)

    async def ainvalidate_all(self) -> None:
        """Async twin of :meth:`invalidate_all`."""
        await asyncio.to_thread(self.invalidate_all)

    def stats(self) -> QueryCacheStats:
        """A snapshot of the counters: hits, misses, bypasses, invalidations per table, errors."""
        return self._counters.snapshot()

    # --- attachment bookkeeping (call with self._lock held) --------------------------------------------

    def _ensure_engine_locked(self, engine: Engine) -> EngineHook:
        hook = self._engine_hooks.get(engine)
        if hook is None:
            hook = EngineHook(engine, self._transactions, self._reads.serve)
            self._engine_hooks[engine] = hook
            hook.install()
        if not self._orm_listening:
            event.listen(Session, "do_orm_execute", self._reads.orm_execute)
            self._orm_listening = True
        return hook

    def _ensure_engine_for(self, session_hook: SessionHook, engine: Engine) -> None:
        if engine in session_hook.engines:
            return
        with self._lock:
            if self._session_hooks.get(id(session_hook.target)) is session_hook:
                self._ensure_engine_for_locked(session_hook, engine)

    def _ensure_engine_for_locked(self, session_hook: SessionHook, engine: Engine) -> None:
        hook = self._ensure_engine_locked(engine)
        hook.owners.add(id(session_hook.target))
        session_hook.engines.add(engine)

    def _release_engine_locked(self, hook: EngineHook) -> bool:
        if hook.direct or hook.owners:
            return False
        del self._engine_hooks[hook.engine]
        dialect = hook.engine.dialect
        hook.uninstall(any(other.engine.dialect is dialect for other in self._engine_hooks.values()))
        if not self._engine_hooks and self._orm_listening:
            event.remove(Session, "do_orm_execute", self._reads.orm_execute)
            self._orm_listening = False
        return True

