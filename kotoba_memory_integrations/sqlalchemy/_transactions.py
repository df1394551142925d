"""Transaction tracking: which tables the open transaction of a connection wrote, and bumping them on commit.

Every INSERT/UPDATE/DELETE/DDL marks its tables dirty in the connection's transaction; reads of dirty
tables bypass the cache inside that transaction; after the DB-API commit the tables get new tokens; a
rollback discards the marks.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from kotoba_memory_integrations.sqlalchemy._analysis import statement_info
from kotoba_memory_integrations.sqlalchemy._collector import COLLECTOR
from kotoba_memory_integrations.sqlalchemy._stats import logger
from kotoba_memory_integrations.sqlalchemy._versions import VersionTokens

__all__ = ["TransactionTracker", "TxState", "add_commit_callback", "is_autocommit", "remove_commit_callback"]


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


def add_commit_callback(dialect: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback(dbapi_connection.info)`` after every DB-API commit made through ``dialect``."""
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


def remove_commit_callback(dialect: Any, callback: Callable[[Any], None]) -> None:
    """Undo :func:`add_commit_callback`; the dialect's own methods return with the last callback."""
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


def is_autocommit(conn: Any) -> bool:
    """True when the connection's driver commits every statement by itself."""
    check = getattr(conn, "_is_autocommit_isolation", None)
    try:
        if check is not None and check():
            return True
        return bool(conn.dialect.detect_autocommit_setting(conn.connection.dbapi_connection))
    except Exception:  # NotImplementedError on dialects that cannot tell
        return False


# --- per-connection state ------------------------------------------------------------------------------


class TxState:
    """Tables written by the open transaction of one DB-API connection."""

    __slots__ = ("everything", "tables")

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.everything = False

    def touches(self, tables: frozenset[str]) -> bool:
        """True when the transaction wrote one of ``tables`` (or something unknown)."""
        return self.everything or not self.tables.isdisjoint(tables)


class TransactionTracker:
    """The connection listeners of one QueryCache (token ``owner``): marks writes, bumps them on commit."""

    def __init__(self, owner: str, versions: VersionTokens) -> None:
        self.owner = owner
        self.info_key = f"kotoba_query_cache:{owner}"
        self._versions = versions

    def state(self, info: Any, create: bool) -> TxState | None:
        """The write marks kept in a connection's ``info`` dict (made on demand with ``create``)."""
        if info is None:
            return None
        state = info.get(self.info_key)
        if state is None and create:
            state = TxState()
            info[self.info_key] = state
        return state

    def before_cursor_execute(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                              executemany: bool) -> None:
        """Listener: mark the tables a statement writes in its transaction."""
        info = statement_info(context, statement)
        collector = COLLECTOR.get()
        if collector is not None and collector.owner == self.owner:
            collector.seen += 1
            if info.writes is None or info.writes:
                collector.ok = False
        if info.writes is not None and not info.writes:
            return
        state = self.state(conn.info, create=True)
        assert state is not None
        if info.writes is None:
            state.everything = True
        else:
            state.tables.update(info.writes)

    def after_cursor_execute(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                             executemany: bool) -> None:
        """Listener: bump the tables of a write made in autocommit mode at once."""
        info = statement_info(context, statement)
        if info.writes is not None and not info.writes:
            return
        if is_autocommit(conn):
            # The driver committed already; no commit will come for this write.
            self._versions.bump(info.writes)

    def on_committed(self, info: Any) -> None:
        """Commit callback: bump what the committed transaction wrote."""
        if info is None:
            return
        state = info.pop(self.info_key, None)
        if state is None:
            return
        if state.everything:
            self._versions.bump(None)
        elif state.tables:
            self._versions.bump(frozenset(state.tables))

    def on_rollback(self, conn: Any) -> None:
        """Listener: a rollback discards the write marks."""
        conn.info.pop(self.info_key, None)

    def on_rollback_twophase(self, conn: Any, xid: Any, is_prepared: bool) -> None:
        """Listener: a two-phase rollback discards the write marks."""
        conn.info.pop(self.info_key, None)

    def on_checkin(self, dbapi_connection: Any, connection_record: Any) -> None:
        """Listener: the pool rolled back (or committed, through do_commit) whatever was open."""
        if connection_record is not None:
            connection_record.info.pop(self.info_key, None)
