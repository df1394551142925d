"""``QueryCache``: SQLAlchemy 2.x query-result caching that never serves a result older than a write.

How it works, at the DB-API level so Core, ORM, relationship loads and ``text()`` all go one way:

* a cacheable SELECT is intercepted in the dialect's ``do_execute`` event. The current version token of
  every table it reads (plus a global generation) is fetched together with the cached entry in one
  ``get_many``; the entry is served only if it was stored under exactly those tokens. Served rows are
  replayed through a stand-in cursor, so SQLAlchemy's own result processing and ORM loading (identity map
  included) run exactly as without the cache.
* on a miss the tokens read *before* executing are stored with the rows, so a write that commits while
  the query runs makes the new entry stale instead of fresh.
* ORM SELECTs in a session get a second, faster level: a ``do_orm_execute`` listener answers them from a
  pickled ``FrozenResult`` merged into the session, without a connection. Such an entry is stored only
  when every statement run beneath it went through the check above, under the union of their tokens.
* every INSERT/UPDATE/DELETE/DDL marks its tables dirty in the connection's transaction; reads of dirty
  tables bypass the cache inside that transaction; after the DB-API commit the tables get new tokens; a
  rollback discards the marks. Tokens live in the cache tier itself, so a shared tier (Redis) carries
  invalidations between processes.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import logging
import pickle
import threading
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, loading, sessionmaker
from sqlalchemy.orm.interfaces import UserDefinedOption
from sqlalchemy.sql.schema import Table

from kotoba_memory.errors import KotobaMemoryError
from kotoba_memory_integrations.sqlalchemy._analysis import (
    StatementInfo,
    analyze_context,
    analyze_sql,
    normalize_table_name,
    table_names,
)
from kotoba_memory_integrations.sqlalchemy._replay import ReplayCursor, plain_description

__all__ = [
    "CachedOption",
    "NotAttachedError",
    "QueryCache",
    "QueryCacheError",
    "QueryCacheStats",
    "iter_query_caches",
]

logger = logging.getLogger("kotoba_memory.sqlalchemy")

#: Execution option a session-level attachment sets on the statements of its sessions.
EXECUTION_OPTION = "kotoba_query_cache"

_REQUIRED_CACHE_METHODS = ("get", "get_many", "put", "add", "delete")
_MAX_VERSION_KEY_MEMO = 4096


class QueryCacheError(KotobaMemoryError):
    """Base class of the query cache's own errors."""


class NotAttachedError(QueryCacheError, ValueError):
    """``detach`` was given an engine or sessionmaker this QueryCache is not attached to."""


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
        }


class CachedOption(UserDefinedOption):
    """Statement option made by :meth:`QueryCache.cached` / :meth:`QueryCache.uncached`.

    Use it with ``select(...).options(...)`` (ORM or Core) or ``text(...).options(...)``.
    """

    def __init__(
        self,
        query_cache: QueryCache,
        *,
        ttl: float | None,
        tables: frozenset[str],
        enabled: bool,
        propagate: bool,
        allow_nondeterministic: bool,
    ) -> None:
        super().__init__(None)
        # Identify the QueryCache by its token, not a reference: the ORM keeps propagating options in
        # loaded objects' state, and those get pickled with the cached results.
        self.owner = query_cache._owner
        self.ttl = ttl
        self.tables = tables
        self.enabled = enabled
        self.allow_nondeterministic = allow_nondeterministic
        # Read by the ORM: carry the option to the lazy/selectin loads of objects this query loads.
        self.propagate_to_loaders = propagate

    def __repr__(self) -> str:
        state = "cached" if self.enabled else "uncached"
        return f"<CachedOption {state} ttl={self.ttl} tables={sorted(self.tables)}>"


class _TxState:
    """Tables written by the open transaction of one DB-API connection."""

    __slots__ = ("everything", "tables")

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.everything = False

    def touches(self, tables: frozenset[str]) -> bool:
        return self.everything or not self.tables.isdisjoint(tables)


class _Collector:
    """Gathers, during one ORM execution, the version tokens the DB-API layer read for each statement.

    The ORM-level entry is stored only if every statement run underneath (primary query, selectin and
    other secondary loads) went through the version check, so the tokens cover everything it contains.
    """

    __slots__ = ("handled", "ok", "owner", "seen", "tokens")

    def __init__(self, owner: QueryCache) -> None:
        self.owner = owner
        self.tokens: dict[str, str] = {}
        self.seen = 0
        self.handled = 0
        self.ok = True

    @property
    def complete(self) -> bool:
        return self.ok and self.seen > 0 and self.seen == self.handled and bool(self.tokens)


_COLLECTOR: contextvars.ContextVar[_Collector | None] = contextvars.ContextVar("kotoba_qc_collector",
                                                                               default=None)
_UNCACHEABLE_ORM_OPTIONS = ("populate_existing", "yield_per", "stream_results")


# --- commit hook -------------------------------------------------------------------------------------
# SQLAlchemy's ``commit`` connection event fires *before* the DB-API commit. Bumping versions then would
# let a reader cache pre-commit rows under the new versions, so the bump runs after the dialect's
# ``do_commit`` returns, through a wrapper installed on that engine's dialect instance (removed again when
# the last QueryCache detaches).

_commit_lock = threading.Lock()
_commit_callbacks: weakref.WeakKeyDictionary[Any, list[Callable[[Any], None]]] = weakref.WeakKeyDictionary()


def _run_callbacks(callbacks: list[Callable[[Any], None]], info: Any) -> None:
    for callback in list(callbacks):
        try:
            callback(info)
        except Exception:  # a callback never turns a successful commit into an error
            logger.exception("query cache commit callback failed")


def _add_commit_callback(dialect: Any, callback: Callable[[Any], None]) -> None:
    with _commit_lock:
        callbacks = _commit_callbacks.get(dialect)
        if callbacks is None:
            callbacks = []
            _commit_callbacks[dialect] = callbacks
            original_commit = dialect.do_commit
            original_twophase = dialect.do_commit_twophase

            def do_commit(dbapi_connection: Any) -> None:
                try:
                    original_commit(dbapi_connection)
                finally:
                    # Also after a failed commit: whether it took effect is unknown, so invalidate.
                    _run_callbacks(callbacks, getattr(dbapi_connection, "info", None))

            def do_commit_twophase(connection: Any, xid: Any, is_prepared: bool = True,
                                   recover: bool = False) -> None:
                try:
                    original_twophase(connection, xid, is_prepared, recover)
                finally:
                    _run_callbacks(callbacks, getattr(connection, "info", None))

            do_commit.kotoba_query_cache = True  # type: ignore[attr-defined]
            do_commit_twophase.kotoba_query_cache = True  # type: ignore[attr-defined]
            dialect.do_commit = do_commit
            dialect.do_commit_twophase = do_commit_twophase
        if callback not in callbacks:
            callbacks.append(callback)


def _remove_commit_callback(dialect: Any, callback: Callable[[Any], None]) -> None:
    with _commit_lock:
        callbacks = _commit_callbacks.get(dialect)
        if callbacks is None:
            return
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks:
            del _commit_callbacks[dialect]
            for name in ("do_commit", "do_commit_twophase"):
                if getattr(dialect.__dict__.get(name), "kotoba_query_cache", False):
                    delattr(dialect, name)


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


# --- per-engine listeners ----------------------------------------------------------------------------


class _EngineHook:
    """The listeners one QueryCache installs on one engine."""

    def __init__(self, query_cache: QueryCache, engine: Engine) -> None:
        self.query_cache = query_cache
        self.engine = engine
        self.direct = False
        self.cache_all = False
        self.owners: set[int] = set()
        url = engine.url
        # Part of every result key: the same SQL against another database is another result.
        self.database = (engine.dialect.name, url.host, url.port, url.database)
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []

    def install(self) -> None:
        qc = self.query_cache
        for target, name, fn in (
            (self.engine, "do_execute", self._do_execute),
            (self.engine, "before_cursor_execute", qc._before_cursor_execute),
            (self.engine, "after_cursor_execute", qc._after_cursor_execute),
            (self.engine, "rollback", qc._on_rollback),
            (self.engine, "rollback_twophase", qc._on_rollback_twophase),
            (self.engine, "checkin", qc._on_checkin),
        ):
            event.listen(target, name, fn)
            self._listeners.append((target, name, fn))
        _add_commit_callback(self.engine.dialect, qc._on_committed)

    def uninstall(self) -> None:
        for target, name, fn in self._listeners:
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        self._listeners.clear()
        if not any(hook.engine.dialect is self.engine.dialect
                   for hook in self.query_cache._engine_hooks.values() if hook is not self):
            _remove_commit_callback(self.engine.dialect, self.query_cache._on_committed)

    def _do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        return self.query_cache._serve(self, cursor, statement, parameters, context)


@dataclass(slots=True)
class _SessionHook:
    target: Any
    cache_all: bool
    listeners: list[tuple[Any, str, Callable[..., Any]]]
    engines: set[Engine]


@dataclass(frozen=True, slots=True)
class _SessionMode:
    owner: str
    cache_all: bool


def _find_option(statement: Any, query_cache: QueryCache) -> CachedOption | None:
    options = getattr(statement, "_with_options", None)
    if options is None:
        # lambda statements (used by some ORM loaders) keep their options on the resolved statement
        options = getattr(getattr(statement, "_resolved", None), "_with_options", None)
    for option in options or ():
        if isinstance(option, CachedOption) and option.owner == query_cache._owner:
            return option
    return None


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
        cache: Any,
        *,
        default_ttl: float | None = None,
        max_rows: int = 10_000,
        namespace: str = "kqc",
        also_invalidate: Mapping[str, Iterable[str]] | None = None,
        name: str | None = None,
    ) -> None:
        missing = [m for m in _REQUIRED_CACHE_METHODS if not callable(getattr(cache, m, None))]
        if missing:
            raise TypeError(
                f"cache must be a kotoba-memory cache (BaseCache); {type(cache).__name__} lacks {missing}"
            )
        self.default_ttl = _check_ttl(default_ttl, "default_ttl")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
            raise ValueError(f"max_rows must be an int >= 0, got {max_rows!r}")
        if not isinstance(namespace, str) or not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"namespace must be a non-empty str without spaces, got {namespace!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        self.cache = cache
        self.max_rows = max_rows
        self.namespace = namespace
        self.name = name or f"query-cache-{uuid.uuid4().hex[:8]}"
        self._also: dict[str, frozenset[str]] = {}
        for table, related in (also_invalidate or {}).items():
            self._also[normalize_table_name(table)] = table_names(related)
        self._prefix = f"{namespace}:"
        self._global_key = f"{namespace}:g"
        self._owner = uuid.uuid4().hex
        self._info_key = f"kotoba_query_cache:{self._owner}"
        self._token_prefix = uuid.uuid4().hex[:12] + ":"
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._engine_hooks: dict[Engine, _EngineHook] = {}
        self._session_hooks: dict[int, _SessionHook] = {}
        self._version_keys: dict[frozenset[str], tuple[str, ...]] = {}
        # SQLAlchemy cache key of a statement shape -> its SQL text (learned at the DB-API level) and the
        # version keys its ORM-level entry depended on last time (to fetch them in the same round trip).
        self._shapes: dict[Any, str] = {}
        self._shape_versions: dict[str, tuple[str, ...]] = {}
        self._dbapi_only: set[str] = set()
        self._orm_listening = False
        self._hits = self._misses = self._bypasses = self._stores = self._rejected = self._errors = 0
        self._global_invalidations = 0
        self._invalidations: Counter[str] = Counter()
        self._bypass_reasons: Counter[str] = Counter()
        with _registry_lock:
            _registry.append(weakref.ref(self))

    def __repr__(self) -> str:
        return f"<QueryCache {self.name!r} engines={len(self._engine_hooks)}>"

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
            ttl=_check_ttl(ttl, "ttl"),
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
        engine = _as_engine(target)
        with self._lock:
            if engine is not None:
                hook = self._ensure_engine_locked(engine)
                hook.direct = True
                hook.cache_all = bool(cache_all_selects)
                return
            if not _is_session_target(target):
                raise TypeError(
                    "attach() takes an Engine, AsyncEngine, sessionmaker or Session subclass, "
                    f"got {type(target).__name__}"
                )
            existing = self._session_hooks.get(id(target))
            if existing is not None:
                existing.cache_all = bool(cache_all_selects)
                return
            hook_s = _SessionHook(target=target, cache_all=bool(cache_all_selects), listeners=[],
                                  engines=set())
            self._session_hooks[id(target)] = hook_s

            def on_orm_execute(orm_execute_state: Any) -> None:
                orm_execute_state.update_execution_options(
                    **{EXECUTION_OPTION: _SessionMode(self._owner, hook_s.cache_all)}
                )

            def on_after_begin(session: Any, transaction: Any, connection: Any) -> None:
                self._ensure_engine_for(hook_s, connection.engine)

            for name, fn in (("do_orm_execute", on_orm_execute), ("after_begin", on_after_begin)):
                event.listen(target, name, fn)
                hook_s.listeners.append((target, name, fn))
            bind = getattr(target, "kw", {}).get("bind") if isinstance(target, sessionmaker) else None
            bind_engine = _as_engine(bind) if bind is not None else None
            if bind_engine is not None:
                self._ensure_engine_for_locked(hook_s, bind_engine)

    def detach(self, target: Any) -> None:
        """Remove every listener this QueryCache added for ``target``.

        When an engine stops being watched, everything cached so far is invalidated (the global token is
        bumped): writes made while nobody watches could never be seen, so a later ``attach`` must not
        find old entries.
        """
        engine = _as_engine(target)
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
            self._bump(None)

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
        self._bump(frozenset(names))

    def invalidate_all(self) -> None:
        """Invalidate every cached result of this QueryCache (bumps the global generation)."""
        self._bump(None)

    async def ainvalidate(self, *tables: str | Table | Iterable[str | Table]) -> None:
        """Async twin of :meth:`invalidate` (runs in a worker thread: the tier may do network I/O)."""
        await asyncio.to_thread(self.invalidate, *tables)

    async def ainvalidate_all(self) -> None:
        """Async twin of :meth:`invalidate_all`."""
        await asyncio.to_thread(self.invalidate_all)

    def stats(self) -> QueryCacheStats:
        """A snapshot of the counters: hits, misses, bypasses, invalidations per table, errors."""
        with self._lock:
            return QueryCacheStats(
                name=self.name, hits=self._hits, misses=self._misses, bypasses=self._bypasses,
                stores=self._stores, rejected=self._rejected, errors=self._errors,
                global_invalidations=self._global_invalidations,
                invalidations=MappingProxyType(dict(self._invalidations)),
                bypass_reasons=MappingProxyType(dict(self._bypass_reasons)),
            )

    # --- attachment bookkeeping (call with self._lock held) --------------------------------------------

    def _ensure_engine_locked(self, engine: Engine) -> _EngineHook:
        hook = self._engine_hooks.get(engine)
        if hook is None:
            hook = _EngineHook(self, engine)
            self._engine_hooks[engine] = hook
            hook.install()
        if not self._orm_listening:
            event.listen(Session, "do_orm_execute", self._orm_execute)
            self._orm_listening = True
        return hook

    def _ensure_engine_for(self, session_hook: _SessionHook, engine: Engine) -> None:
        if engine in session_hook.engines:
            return
        with self._lock:
            if self._session_hooks.get(id(session_hook.target)) is session_hook:
                self._ensure_engine_for_locked(session_hook, engine)

    def _ensure_engine_for_locked(self, session_hook: _SessionHook, engine: Engine) -> None:
        hook = self._ensure_engine_locked(engine)
        hook.owners.add(id(session_hook.target))
        session_hook.engines.add(engine)

    def _release_engine_locked(self, hook: _EngineHook) -> bool:
        if hook.direct or hook.owners:
            return False
        del self._engine_hooks[hook.engine]
        hook.uninstall()
        if not self._engine_hooks and self._orm_listening:
            event.remove(Session, "do_orm_execute", self._orm_execute)
            self._orm_listening = False
        return True

    # --- counters ------------------------------------------------------------------------------------

    def _count_bypass(self, reason: str) -> None:
        with self._lock:
            self._bypasses += 1
            self._bypass_reasons[reason] += 1

    def _count_error(self, what: str) -> None:
        with self._lock:
            self._errors += 1
        logger.warning("query cache %s: %s failed; continuing without the cache", self.name, what,
                       exc_info=True)

    # --- versions ------------------------------------------------------------------------------------

    def _new_token(self) -> str:
        return f"{self._token_prefix}{next(self._tokens)}"

    def _keys_for(self, tables: frozenset[str]) -> tuple[str, ...]:
        keys = self._version_keys.get(tables)
        if keys is None:
            keys = (self._global_key, *(f"{self._prefix}v:{t}" for t in sorted(tables)))
            if len(self._version_keys) >= _MAX_VERSION_KEY_MEMO:
                self._version_keys.clear()
            self._version_keys[tables] = keys
        return keys

    def _establish(self, key: str) -> str | None:
        # A missing token is "unknown, possibly changed": mint a fresh one, never assume "unchanged".
        token = self._new_token()
        if self.cache.add(key, token):
            return token
        current = self.cache.get(key)
        return current if isinstance(current, str) else None

    def _expand(self, tables: frozenset[str]) -> frozenset[str]:
        if not self._also:
            return tables
        out = set(tables)
        for table in tables:
            out |= self._also.get(table, frozenset())
        return frozenset(out)

    def _bump(self, tables: frozenset[str] | None) -> None:
        if tables is None:
            keys = [self._global_key]
        else:
            tables = self._expand(tables)
            keys = [f"{self._prefix}v:{t}" for t in sorted(tables)]
        for key in keys:
            try:
                if not self.cache.put(key, self._new_token()):
                    self.cache.delete(key)
            except Exception:
                self._count_error(f"invalidating {key}")
                try:
                    self.cache.delete(key)
                except Exception:
                    logger.error("query cache %s could not invalidate %s: cached results of it may be "
                                 "served until they expire", self.name, key)
        with self._lock:
            if tables is None:
                self._global_invalidations += 1
            else:
                self._invalidations.update(tables)

    # --- transaction tracking -------------------------------------------------------------------------

    def _state(self, info: Any, create: bool) -> _TxState | None:
        if info is None:
            return None
        state = info.get(self._info_key)
        if state is None and create:
            state = _TxState()
            info[self._info_key] = state
        return state

    def _before_cursor_execute(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                               executemany: bool) -> None:
        info = _statement_info(context, statement)
        collector = _COLLECTOR.get()
        if collector is not None and collector.owner is self:
            collector.seen += 1
            if info.writes is None or info.writes:
                collector.ok = False
        if info.writes is not None and not info.writes:
            return
        state = self._state(conn.info, create=True)
        assert state is not None
        if info.writes is None:
            state.everything = True
        else:
            state.tables.update(info.writes)

    def _after_cursor_execute(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                              executemany: bool) -> None:
        info = _statement_info(context, statement)
        if info.writes is not None and not info.writes:
            return
        if _is_autocommit(conn):
            # The driver committed already; no commit will come for this write.
            self._bump(info.writes)

    def _on_committed(self, info: Any) -> None:
        if info is None:
            return
        state = info.pop(self._info_key, None)
        if state is None:
            return
        if state.everything:
            self._bump(None)
        elif state.tables:
            self._bump(frozenset(state.tables))

    def _on_rollback(self, conn: Any) -> None:
        conn.info.pop(self._info_key, None)

    def _on_rollback_twophase(self, conn: Any, xid: Any, is_prepared: bool) -> None:
        conn.info.pop(self._info_key, None)

    def _on_checkin(self, dbapi_connection: Any, connection_record: Any) -> None:
        # The pool rolled back (or committed, through do_commit) whatever was open.
        if connection_record is not None:
            connection_record.info.pop(self._info_key, None)

    # --- reads ---------------------------------------------------------------------------------------

    def _serve(self, hook: _EngineHook, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        """The ``do_execute`` listener: True when the statement was answered (from cache or executed here)."""
        option = _find_option(getattr(context, "invoked_statement", None), self)
        if option is not None:
            if not option.enabled:
                return False
        else:
            mode = context.execution_options.get(EXECUTION_OPTION)
            wanted = hook.cache_all or (
                isinstance(mode, _SessionMode) and mode.owner == self._owner and mode.cache_all
            )
            if not wanted:
                return False
        info = _statement_info(context, statement)
        if not info.returns_rows:
            return False
        reads, reason = self._cacheable(info, option, context)
        if reason is not None or reads is None:
            self._count_bypass(reason or "tables unknown")
            return False
        try:
            key = self._result_key(hook, statement, parameters)
        except Exception:
            self._count_bypass("parameters not picklable")
            return False
        version_keys = self._keys_for(reads)
        try:
            found = self.cache.get_many([key, *version_keys])
            versions = tuple(found.get(k) or self._establish(k) for k in version_keys)
        except Exception:
            self._count_error("version lookup")
            return False
        if None in versions:
            self._count_bypass("version unavailable")
            return False
        compiled = getattr(context, "compiled", None)
        shape = getattr(compiled, "cache_key", None)
        if shape is not None and shape.key not in self._shapes:
            if len(self._shapes) >= _MAX_VERSION_KEY_MEMO:
                self._shapes.clear()
            self._shapes[shape.key] = str(getattr(compiled, "string", statement))
        collector = _COLLECTOR.get()
        inner = collector is not None and collector.owner is self
        if inner:  # part of an ORM-level miss: report the tokens this statement was checked against
            assert collector is not None
            collector.handled += 1
            collector.tokens.update(zip(version_keys, versions))  # type: ignore[arg-type]
        entry = found.get(key)
        if entry is not None and entry[0] == versions:
            try:
                description, rows, rowcount = pickle.loads(entry[1])
            except Exception:
                self._count_error("decoding a cached result")
            else:
                context.cursor = ReplayCursor(description, rows, rowcount)
                cursor.close()
                with self._lock:
                    self._hits += 1
                return True
        with self._lock:
            self._misses += 1
        context.dialect.do_execute(cursor, statement, parameters, context)
        if cursor.description is None:
            return True
        description = plain_description(cursor.description)
        rows = cursor.fetchall()
        rowcount = cursor.rowcount
        cursor.close()
        context.cursor = ReplayCursor(description, rows, rowcount)
        if len(rows) > self.max_rows:
            self._count_bypass("too many rows")
            if inner:
                assert collector is not None
                collector.ok = False
            return True
        if inner:
            return True  # the ORM-level entry will hold these rows; storing them twice costs a pickle
        ttl = option.ttl if option is not None and option.ttl is not None else self.default_ttl
        try:
            payload = pickle.dumps((description, rows, rowcount), protocol=pickle.HIGHEST_PROTOCOL)
            stored = self.cache.put(key, (versions, payload), ttl=ttl)
        except Exception:
            self._count_error("storing a result")
            return True
        with self._lock:
            if stored:
                self._stores += 1
            else:
                self._rejected += 1
        return True

    def _orm_execute(self, orm_context: Any) -> Any:
        """``do_orm_execute`` listener: answer an ORM SELECT from an ORM-level entry without a connection.

        Returns None (SQLAlchemy then executes normally, through the DB-API path) whenever anything is
        uncertain: unknown statement shape, pending changes in the session, writes in its transaction.
        """
        try:
            plan = self._orm_plan(orm_context)
        except Exception:
            self._count_error("planning an ORM lookup")
            return None
        if plan is None:
            return None
        key, option, shape = plan
        known = self._shape_versions.get(shape, ())
        try:
            found = self.cache.get_many([key, *known])
            entry = found.get(key)
            if entry is not None:
                stored_keys, stored_tokens, payload = entry
                absent = [k for k in stored_keys if k not in found]
                if absent:
                    found.update(self.cache.get_many(absent))
                if tuple(found.get(k) for k in stored_keys) == stored_tokens:
                    frozen = pickle.loads(payload)
                    with self._lock:
                        self._hits += 1
                    return loading.merge_frozen_result(orm_context.session, orm_context.statement, frozen,
                                                       load=False)()
        except Exception:
            self._count_error("an ORM-level lookup")
            return None
        # a miss here is counted by the DB-API layer, statement by statement
        collector = _Collector(self)
        reset = _COLLECTOR.set(collector)
        try:
            frozen = orm_context.invoke_statement().freeze()
        finally:
            _COLLECTOR.reset(reset)
        if not collector.complete:
            # Some statement beneath could not be checked, so no ORM entry; and as the DB-API level
            # stored nothing for this miss either, leave this shape to the DB-API level from now on.
            self._use_dbapi_level_only(shape)
        else:
            keys = tuple(sorted(collector.tokens))
            tokens = tuple(collector.tokens[k] for k in keys)
            ttl = option.ttl if option is not None and option.ttl is not None else self.default_ttl
            try:
                payload = pickle.dumps(frozen, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # e.g. mapped classes defined inside a function
                self._count_bypass("ORM result not picklable")
                self._use_dbapi_level_only(shape)
                return frozen()
            try:
                stored = self.cache.put(key, (keys, tokens, payload), ttl=ttl)
            except Exception:
                self._count_error("storing an ORM result")
            else:
                self._shape_versions[shape] = keys
                with self._lock:
                    if stored:
                        self._stores += 1
                    else:
                        self._rejected += 1
        return frozen()

    def _use_dbapi_level_only(self, shape: str) -> None:
        if len(self._dbapi_only) >= _MAX_VERSION_KEY_MEMO:
            self._dbapi_only.clear()
        self._dbapi_only.add(shape)

    def _orm_plan(self, orm_context: Any) -> tuple[str, CachedOption | None, str] | None:
        collector = _COLLECTOR.get()
        if collector is not None:
            # A load nested in an ORM-level miss. On an engine we do not track, its statements would
            # escape the version check, so the outer entry must not be stored.
            if collector.owner is self:
                bind = orm_context.session.get_bind(**orm_context.bind_arguments)
                if not (isinstance(bind, Engine) and bind in self._engine_hooks):
                    collector.ok = False
            return None
        if not orm_context.is_select:
            return None
        option = None
        for candidate in orm_context.user_defined_options:
            if isinstance(candidate, CachedOption) and candidate.owner == self._owner:
                option = candidate
        if option is not None and not option.enabled:
            return None
        options = orm_context.execution_options
        if any(options.get(name) for name in _UNCACHEABLE_ORM_OPTIONS):
            return None
        session = orm_context.session
        bind = session.get_bind(**orm_context.bind_arguments)
        hook = self._engine_hooks.get(bind) if isinstance(bind, Engine) else None
        if hook is None:
            return None
        if option is None:
            mode = options.get(EXECUTION_OPTION)
            if not (hook.cache_all or (isinstance(mode, _SessionMode) and mode.owner == self._owner
                                       and mode.cache_all)):
                return None
        # pending changes would be autoflushed first: let the normal path handle that transaction
        if not session._is_clean():
            return None
        transaction = session.get_transaction()
        if transaction is not None:
            boundary = getattr(transaction, "_connections_boundary", transaction)
            connections = getattr(boundary, "_connections", None)
            if connections is None:
                return None
            held = connections.get(bind)
            if held is not None:
                state = self._state(held[0].info, create=False)
                if state is not None and (state.everything or state.tables):
                    return None
        cache_key = orm_context.statement._generate_cache_key()
        if cache_key is None:
            return None
        sql = self._shapes.get(cache_key.key)
        if sql is None or sql in self._dbapi_only:
            return None  # first sight of this shape (the DB-API path learns its SQL), or DB-API level only
        parameters = orm_context.parameters or {}
        if not isinstance(parameters, Mapping):
            return None
        names = {bp.key for bp in cache_key.bindparams}
        if any(name not in names for name in parameters):
            return None
        values = [parameters.get(bp.key, bp.effective_value) for bp in cache_key.bindparams]
        blob = pickle.dumps((hook.database, sql, values), protocol=pickle.HIGHEST_PROTOCOL)
        key = f"{self._prefix}o:{hashlib.blake2b(blob, digest_size=20).hexdigest()}"
        return key, option, sql

    def _cacheable(self, info: StatementInfo, option: CachedOption | None,
                   context: Any) -> tuple[frozenset[str] | None, str | None]:
        if info.writes is None or info.writes:
            return None, "statement writes"
        if info.reason is not None:
            return None, info.reason
        if info.nondeterministic and not (option is not None and option.allow_nondeterministic):
            return None, "non-deterministic function"
        extra = option.tables if option is not None else frozenset()
        if info.reads is None:
            if not extra:
                return None, "tables unknown"
            reads = extra
        else:
            reads = info.reads | extra if extra else info.reads
        options = context.execution_options
        if options.get("stream_results") or options.get("yield_per") or getattr(
            context, "_is_server_side", False
        ):
            return None, "streaming result"
        state = self._state(context.root_connection.info, create=False)
        if state is not None and state.touches(reads):
            return None, "written in this transaction"
        return reads, None

    def _result_key(self, hook: _EngineHook, statement: str, parameters: Any) -> str:
        blob = pickle.dumps((hook.database, statement, parameters), protocol=pickle.HIGHEST_PROTOCOL)
        return f"{self._prefix}r:{hashlib.blake2b(blob, digest_size=20).hexdigest()}"


# --- helpers -----------------------------------------------------------------------------------------


def _check_ttl(ttl: float | None, name: str) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(ttl).__name__}")
    if not ttl > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {ttl!r}")
    return float(ttl)


def _statement_info(context: Any, statement: str) -> StatementInfo:
    if context is None:
        return analyze_sql(statement)
    return analyze_context(context, statement)


def _is_autocommit(conn: Any) -> bool:
    check = getattr(conn, "_is_autocommit_isolation", None)
    try:
        if check is not None and check():
            return True
        return bool(conn.dialect.detect_autocommit_setting(conn.connection.dbapi_connection))
    except Exception:  # NotImplementedError on dialects that cannot tell
        return False


def _as_engine(target: Any) -> Engine | None:
    if isinstance(target, Engine):
        return target
    sync_engine = getattr(target, "sync_engine", None)  # AsyncEngine
    if isinstance(sync_engine, Engine):
        return sync_engine
    return None


def _is_session_target(target: Any) -> bool:
    return isinstance(target, sessionmaker) or (isinstance(target, type) and issubclass(target, Session))
