"""The read path: answer a SELECT from the cache (DB-API level and ORM level), or run it and store the rows.

* DB-API level: a cacheable SELECT is intercepted in the dialect's ``do_execute`` event. The current version
  token of every table it reads (plus a global generation) is fetched together with the cached entry in one
  ``get_many``; the entry is served only if it was stored under exactly those tokens. Served rows are
  replayed through a stand-in cursor (``_replay.ReplayCursor``). On a miss the tokens read *before*
  executing are stored with the rows, so a write that commits while the query runs makes the entry stale.
* ORM level: a ``do_orm_execute`` listener answers ORM SELECTs in a session from a pickled
  ``FrozenResult``, without a connection. Such an entry is stored only when every statement run beneath it
  went through the check above (see ``_collector``), under the union of their tokens.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import loading

from kotoba_memory_integrations.sqlalchemy._analysis import StatementInfo, statement_info
from kotoba_memory_integrations.sqlalchemy._collector import COLLECTOR, Collector
from kotoba_memory_integrations.sqlalchemy._hooks import EngineHook
from kotoba_memory_integrations.sqlalchemy._options import (
    EXECUTION_OPTION,
    UNCACHEABLE_ORM_OPTIONS,
    CachedOption,
    SessionMode,
    find_option,
)
from kotoba_memory_integrations.sqlalchemy._replay import ReplayCursor, plain_description
from kotoba_memory_integrations.sqlalchemy._versions import MAX_MEMO

if TYPE_CHECKING:
    from kotoba_memory_integrations.sqlalchemy._cache import QueryCache

__all__ = ["ReadPath"]


class ReadPath:
    """The ``do_execute`` and ``do_orm_execute`` handlers of one QueryCache."""

    def __init__(self, query_cache: QueryCache) -> None:
        self._qc = query_cache  # for its settings (cache, default_ttl, max_rows) and attached engines
        self._owner = query_cache._owner
        self._prefix = f"{query_cache.namespace}:"
        self._versions = query_cache._versions
        self._transactions = query_cache._transactions
        self._counters = query_cache._counters
        # SQLAlchemy cache key of a statement shape -> its SQL text (learned at the DB-API level) and the
        # version keys its ORM-level entry depended on last time (to fetch them in the same round trip).
        self._shapes: dict[Any, str] = {}
        self._shape_versions: dict[str, tuple[str, ...]] = {}
        self._dbapi_only: set[str] = set()

    def serve(self, hook: EngineHook, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        """The ``do_execute`` listener: True when the statement was answered (from cache or executed here)."""
        qc = self._qc
        option = find_option(getattr(context, "invoked_statement", None), self._owner)
        if option is not None:
            if not option.enabled:
                return False
        else:
            mode = context.execution_options.get(EXECUTION_OPTION)
            wanted = hook.cache_all or (
                isinstance(mode, SessionMode) and mode.owner == self._owner and mode.cache_all
            )
            if not wanted:
                return False
        info = statement_info(context, statement)
        if not info.returns_rows:
            return False
        reads, reason = self._cacheable(info, option, context)
        if reason is not None or reads is None:
            self._counters.bypass(reason or "tables unknown")
            return False
        try:
            key = self._result_key(hook, statement, parameters)
        except Exception:
            self._counters.bypass("parameters not picklable")
            return False
        if self._versions.undelivered and not self._versions.redeliver():
            # An invalidation the tier failed is still unwritten: any entry may be stale, serve none.
            self._counters.bypass("invalidation undelivered")
            return False
        version_keys = self._versions.keys_for(reads)
        try:
            found = self._versions.lookup(key, list(version_keys))
            versions = tuple(found.get(k) or self._versions.establish(k) for k in version_keys)
        except Exception:
            self._counters.error("version lookup")
            return False
        if None in versions:
            self._counters.bypass("version unavailable")
            return False
        compiled = getattr(context, "compiled", None)
        shape = getattr(compiled, "cache_key", None)
        if shape is not None and shape.key not in self._shapes:
            if len(self._shapes) >= MAX_MEMO:
                self._shapes.clear()
            self._shapes[shape.key] = str(getattr(compiled, "string", statement))
        collector = COLLECTOR.get()
        inner = collector is not None and collector.owner == self._owner
        if inner:  # part of an ORM-level miss: report the tokens this statement was checked against
            assert collector is not None
            collector.handled += 1
            collector.tokens.update(zip(version_keys, versions))  # type: ignore[arg-type]
        entry = found.get(key)
        if entry is not None and entry[0] == versions:
            try:
                description, rows, rowcount = pickle.loads(entry[1])
            except Exception:
                self._counters.error("decoding a cached result")
            else:
                context.cursor = ReplayCursor(description, rows, rowcount)
                cursor.close()
                self._counters.hit()
                return True
        self._counters.miss()
        context.dialect.do_execute(cursor, statement, parameters, context)
        if cursor.description is None:
            return True
        description = plain_description(cursor.description)
        rows = cursor.fetchall()
        rowcount = cursor.rowcount
        cursor.close()
        context.cursor = ReplayCursor(description, rows, rowcount)
        if len(rows) > qc.max_rows:
            self._counters.bypass("too many rows")
            if inner:
                assert collector is not None
                collector.ok = False
            return True
        if inner:
            return True  # the ORM-level entry will hold these rows; storing them twice costs a pickle
        ttl = option.ttl if option is not None and option.ttl is not None else qc.default_ttl
        try:
            payload = pickle.dumps((description, rows, rowcount), protocol=pickle.HIGHEST_PROTOCOL)
            stored = qc.cache.put(key, (versions, payload), ttl=ttl)
        except Exception:
            self._counters.error("storing a result")
            return True
        self._counters.stored(stored)
        return True

    def orm_execute(self, orm_context: Any) -> Any:
        """``do_orm_execute`` listener: answer an ORM SELECT from an ORM-level entry without a connection.

        Returns None (SQLAlchemy then executes normally, through the DB-API path) whenever anything is
        uncertain: unknown statement shape, pending changes in the session, writes in its transaction.
        """
        qc = self._qc
        try:
            plan = self._orm_plan(orm_context)
        except Exception:
            self._counters.error("planning an ORM lookup")
            return None
        if plan is None:
            return None
        key, option, shape = plan
        if self._versions.undelivered and not self._versions.redeliver():
            return None  # the DB-API level bypasses the cache too, and counts it
        known = self._shape_versions.get(shape, ())
        try:
            found = self._versions.lookup(key, list(known))
            entry = found.get(key)
            if entry is not None:
                stored_keys, stored_tokens, payload = entry
                absent = [k for k in stored_keys if k not in found]
                if absent:
                    found.update(self._versions.lookup(None, absent))
                if tuple(found.get(k) for k in stored_keys) == stored_tokens:
                    frozen = pickle.loads(payload)
                    self._counters.hit()
                    return loading.merge_frozen_result(orm_context.session, orm_context.statement, frozen,
                                                       load=False)()
        except Exception:
            self._counters.error("an ORM-level lookup")
            return None
        # a miss here is counted by the DB-API layer, statement by statement
        collector = Collector(self._owner)
        reset = COLLECTOR.set(collector)
        try:
            frozen = orm_context.invoke_statement().freeze()
        finally:
            COLLECTOR.reset(reset)
        if not collector.complete:
            # Some statement beneath could not be checked, so no ORM entry; and as the DB-API level
            # stored nothing for this miss either, leave this shape to the DB-API level from now on.
            self._use_dbapi_level_only(shape)
        else:
            keys = tuple(sorted(collector.tokens))
            tokens = tuple(collector.tokens[k] for k in keys)
            ttl = option.ttl if option is not None and option.ttl is not None else qc.default_ttl
            try:
                payload = pickle.dumps(frozen, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # e.g. mapped classes defined inside a function
                self._counters.bypass("ORM result not picklable")
                self._use_dbapi_level_only(shape)
                return frozen()
            try:
                stored = qc.cache.put(key, (keys, tokens, payload), ttl=ttl)
            except Exception:
                self._counters.error("storing an ORM result")
            else:
                self._shape_versions[shape] = keys
                self._counters.stored(stored)
        return frozen()

    def _use_dbapi_level_only(self, shape: str) -> None:
        if len(self._dbapi_only) >= MAX_MEMO:
            self._dbapi_only.clear()
        self._dbapi_only.add(shape)

    def _orm_plan(self, orm_context: Any) -> tuple[str, CachedOption | None, str] | None:
        engine_hooks = self._qc._engine_hooks
        collector = COLLECTOR.get()
        if collector is not None:
            # A load nested in an ORM-level miss. On an engine we do not track, its statements would
            # escape the version check, so the outer entry must not be stored.
            if collector.owner == self._owner:
                bind = orm_context.session.get_bind(**orm_context.bind_arguments)
                if not (isinstance(bind, Engine) and bind in engine_hooks):
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
        if any(options.get(name) for name in UNCACHEABLE_ORM_OPTIONS):
            return None
        session = orm_context.session
        bind = session.get_bind(**orm_context.bind_arguments)
        hook = engine_hooks.get(bind) if isinstance(bind, Engine) else None
        if hook is None:
            return None
        if option is None:
            mode = options.get(EXECUTION_OPTION)
            if not (hook.cache_all or (isinstance(mode, SessionMode) and mode.owner == self._owner
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
                state = self._transactions.state(held[0].info, create=False)
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
        state = self._transactions.state(context.root_connection.info, create=False)
        if state is not None and state.touches(reads):
            return None, "written in this transaction"
        return reads, None

    def _result_key(self, hook: EngineHook, statement: str, parameters: Any) -> str:
        blob = pickle.dumps((hook.database, statement, parameters), protocol=pickle.HIGHEST_PROTOCOL)
        return f"{self._prefix}r:{hashlib.blake2b(blob, digest_size=20).hexdigest()}"
