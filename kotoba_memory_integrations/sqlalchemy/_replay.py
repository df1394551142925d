"""A DB-API cursor stand-in that replays buffered rows, so SQLAlchemy builds its result exactly as usual."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Description = tuple[tuple[Any, ...], ...]


def plain_description(description: Sequence[Sequence[Any]]) -> Description:
    """The cursor description as plain 7-tuples (drivers' column objects may not pickle)."""
    return tuple(tuple(column)[:7] for column in description)


class ReplayCursor:
    """Serves ``description``, ``rowcount`` and the fetch methods of a cursor from a list of rows."""

    __slots__ = ("_pos", "_rows", "arraysize", "description", "lastrowid", "rowcount")

    def __init__(self, description: Description, rows: list[Any], rowcount: int) -> None:
        self.description = description
        self.rowcount = rowcount
        self.arraysize = 1
        self.lastrowid = None
        self._rows = rows
        self._pos = 0

    def fetchone(self) -> Any:
        if self._pos >= len(self._rows):
            return None
        row = self._rows[self._pos]
        self._pos += 1
        return row

    def fetchmany(self, size: int | None = None) -> list[Any]:
        count = self.arraysize if size is None else size
        chunk = self._rows[self._pos : self._pos + count]
        self._pos += len(chunk)
        return chunk

    def fetchall(self) -> list[Any]:
        rest = self._rows[self._pos :]
        self._pos = len(self._rows)
        return rest

    def close(self) -> None:
        self._rows = []
        self._pos = 0

    def __iter__(self) -> Any:
        return iter(self.fetchall())
