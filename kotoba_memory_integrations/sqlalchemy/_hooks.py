"""The SQLAlchemy listeners one QueryCache installs: per engine, and per sessionmaker/Session class."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from kotoba_memory_integrations.sqlalchemy._transactions import (
    TransactionTracker,
    add_commit_callback,
    remove_commit_callback,
)

__all__ = ["EngineHook", "ServeFn", "SessionHook", "as_engine", "is_session_target"]

#: The read path's ``do_execute`` handler: (hook, cursor, statement, parameters, context) -> answered.
ServeFn = Callable[["EngineHook", Any, str, Any, Any], bool]


class EngineHook:
    """The listeners one QueryCache installs on one engine."""

    def __init__(self, engine: Engine, transactions: TransactionTracker, serve: ServeFn) -> None:
        self.engine = engine
        self.direct = False
        self.cache_all = False
        self.owners: set[int] = set()
        url = engine.url
        # Part of every result key: the same SQL against another database is another result.
        self.database = (engine.dialect.name, url.host, url.port, url.database)
        self._transactions = transactions
        self._serve = serve
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []

    def install(self) -> None:
        """Add the engine's listeners and the commit callback on its dialect."""
        tx = self._transactions
        for target, name, fn in (
            (self.engine, "do_execute", self._do_execute),
            (self.engine, "before_cursor_execute", tx.before_cursor_execute),
            (self.engine, "after_cursor_execute", tx.after_cursor_execute),
            (self.engine, "rollback", tx.on_rollback),
            (self.engine, "rollback_twophase", tx.on_rollback_twophase),
            (self.engine, "checkin", tx.on_checkin),
        ):
            event.listen(target, name, fn)
            self._listeners.append((target, name, fn))
        add_commit_callback(self.engine.dialect, tx.on_committed)

    def uninstall(self, dialect_still_used: bool) -> None:
        """Remove the listeners; the commit callback too unless another hook of ours shares the dialect."""
        for target, name, fn in self._listeners:
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        self._listeners.clear()
        if not dialect_still_used:
            remove_commit_callback(self.engine.dialect, self._transactions.on_committed)

    def _do_execute(self, cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
        return self._serve(self, cursor, statement, parameters, context)


@dataclass(slots=True)
class SessionHook:
    """What attaching to one sessionmaker or Session class installed, and the engines it brought in."""

    target: Any
    cache_all: bool
    listeners: list[tuple[Any, str, Callable[..., Any]]]
    engines: set[Engine]


def as_engine(target: Any) -> Engine | None:
    """The sync ``Engine`` of an Engine or AsyncEngine, else None."""
    if isinstance(target, Engine):
        return target
    sync_engine = getattr(target, "sync_engine", None)  # AsyncEngine
    if isinstance(sync_engine, Engine):
        return sync_engine
    return None


def is_session_target(target: Any) -> bool:
    """True for a sessionmaker or a Session subclass (what ``attach`` accepts besides engines)."""
    return isinstance(target, sessionmaker) or (isinstance(target, type) and issubclass(target, Session))
