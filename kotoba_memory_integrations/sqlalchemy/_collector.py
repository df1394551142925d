"""Which statements ran beneath one ORM execution, and the version tokens each was checked against."""

from __future__ import annotations

import contextvars

__all__ = ["COLLECTOR", "Collector"]


class Collector:
    """Gathers, during one ORM execution, the version tokens the DB-API layer read for each statement.

    The ORM-level entry is stored only if every statement run underneath (primary query, selectin and
    other secondary loads) went through the version check, so the tokens cover everything it contains.
    ``owner`` is the token of the QueryCache that opened it.
    """

    __slots__ = ("handled", "ok", "owner", "seen", "tokens")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.tokens: dict[str, str] = {}
        self.seen = 0
        self.handled = 0
        self.ok = True

    @property
    def complete(self) -> bool:
        """True when every statement seen was version-checked and nothing disqualified the entry."""
        return self.ok and self.seen > 0 and self.seen == self.handled and bool(self.tokens)


#: The collector of the ORM-level miss running in this context, if any.
COLLECTOR: contextvars.ContextVar[Collector | None] = contextvars.ContextVar("kotoba_qc_collector",
                                                                              default=None)
