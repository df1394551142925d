"""How a statement opts in or out: the ``CachedOption`` statement option and the session-level mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.interfaces import UserDefinedOption

if TYPE_CHECKING:
    from kotoba_memory_integrations.sqlalchemy._cache import QueryCache

__all__ = ["EXECUTION_OPTION", "UNCACHEABLE_ORM_OPTIONS", "CachedOption", "SessionMode", "find_option"]

#: Execution option a session-level attachment sets on the statements of its sessions.
EXECUTION_OPTION = "kotoba_query_cache"

#: ORM execution options whose results are never answered from an ORM-level entry.
UNCACHEABLE_ORM_OPTIONS = ("populate_existing", "yield_per", "stream_results")


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


@dataclass(frozen=True, slots=True)
class SessionMode:
    """Value of :data:`EXECUTION_OPTION`: which QueryCache attached the session, and whether it caches all."""

    owner: str
    cache_all: bool


def find_option(statement: Any, owner: str) -> CachedOption | None:
    """The :class:`CachedOption` of QueryCache ``owner`` on ``statement``, if it carries one."""
    options = getattr(statement, "_with_options", None)
    if options is None:
        # lambda statements (used by some ORM loaders) keep their options on the resolved statement
        options = getattr(getattr(statement, "_resolved", None), "_with_options", None)
    for option in options or ():
        if isinstance(option, CachedOption) and option.owner == owner:
            return option
    return None
