"""Which tables a statement reads and writes, and whether its result may be cached.

The analysis of a compiled statement is memoised per ``Compiled`` object (SQLAlchemy reuses those from its
own compiled cache), and the analysis of raw SQL strings in a small bounded map, so the per-execution cost
is one dictionary lookup.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.sql import visitors
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import TableClause

#: Functions whose value changes from one call to the next (or that have side effects): a statement using
#: one is not cached unless the caller opts in explicitly.
NONDETERMINISTIC_FUNCTIONS = frozenset(
    {
        "now", "random", "rand", "uuid", "current_timestamp", "current_date", "current_time", "localtime",
        "localtimestamp", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday",
        "gen_random_uuid", "uuid_generate_v1", "uuid_generate_v4", "nextval", "setval", "currval", "lastval",
        "next_value", "txid_current", "pg_current_xact_id", "sysdate", "getdate", "changes",
        "last_insert_rowid", "randomblob", "pg_sleep", "pg_advisory_lock", "pg_try_advisory_lock",
    }
)

#: Tables that belong to the database's own catalogue: DDL changes them without us knowing which, so
#: reads of them are never cached.
_CATALOG_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_CATALOG_PREFIXES = ("pg_", "sqlite_")

_LOCKING_RE = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?(?:UPDATE|SHARE)\b|\bFOR\s+KEY\s+SHARE\b", re.IGNORECASE)
_NONDET_RE = re.compile(r"\b(" + "|".join(sorted(NONDETERMINISTIC_FUNCTIONS)) + r")\b", re.IGNORECASE)

_IDENT = r'(?:"(?:[^"]|"")+"|`[^`]+`|\[[^\]]+\]|[A-Za-z_][\w$]*)'
_QUALIFIED = rf"{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}}"
_DML_RE = re.compile(
    r"\b(?P<verb>INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|MERGE\s+INTO|UPDATE(?:\s+ONLY)?"
    r"|DELETE\s+FROM(?:\s+ONLY)?|TRUNCATE(?:\s+TABLE)?(?:\s+ONLY)?)"
    rf"\s+(?P<tables>{_QUALIFIED}(?:\s*,\s*{_QUALIFIED})*)",
    re.IGNORECASE,
)
# A DML keyword we could not pair with a table name: the statement writes somewhere unknown.
_DML_KEYWORD_RE = re.compile(r"\b(INSERT|UPDATE|DELETE|MERGE|TRUNCATE)\b", re.IGNORECASE)
# Clauses that contain a DML keyword without being a write of their own.
_NOT_A_WRITE_RE = re.compile(
    r"\bFOR\s+(?:NO\s+KEY\s+)?UPDATE\b|\bDO\s+UPDATE\b|\bON\s+DUPLICATE\s+KEY\s+UPDATE\b"
    r"|\bON\s+(?:UPDATE|DELETE)\s+(?:CASCADE|RESTRICT|SET\s+NULL|SET\s+DEFAULT|NO\s+ACTION)\b",
    re.IGNORECASE,
)
_LITERAL_OR_COMMENT_RE = re.compile(r"'(?:[^']|'')*'|--[^\n]*|/\*.*?\*/", re.DOTALL)
_FIRST_WORD_RE = re.compile(r"\s*\(*\s*([A-Za-z]+)")
# Statements that never change stored rows (when no DML keyword appears in them).
_READ_ONLY_VERBS = frozenset(
    {"select", "with", "values", "table", "show", "explain", "set", "begin", "start", "commit", "end",
     "rollback", "savepoint", "release", "pragma", "describe", "desc"}
)
_SELECT_VERBS = frozenset({"select", "with", "values", "table"})


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """What one statement does to the cache.

    ``reads``: tables read (None = not known). ``writes``: tables written (empty = none; None = unknown, so
    everything must be invalidated). ``returns_rows``: a read whose result may be cached, unless ``reason``
    names why not.
    """

    reads: frozenset[str] | None
    writes: frozenset[str] | None
    returns_rows: bool
    reason: str | None = None
    nondeterministic: bool = False


_NO_EFFECT = StatementInfo(reads=frozenset(), writes=frozenset(), returns_rows=False, reason="not a query")
_UNKNOWN_WRITE = StatementInfo(reads=None, writes=None, returns_rows=False, reason="unknown statement")


def normalize_table_name(name: str) -> str:
    """The version-stamp name of a table: unquoted, without schema, lower case.

    Folding case and dropping the schema can only make two tables share a stamp, which costs extra
    invalidations, never a stale read.
    """
    name = name.strip()
    parts = re.findall(_IDENT, name)
    last = parts[-1] if parts else name
    if last[:1] in {'"', "`", "["}:
        last = last[1:-1].replace('""', '"')
    return last.lower()


def table_names(tables: Any) -> frozenset[str]:
    """Normalise table names or ``Table`` objects (one, or an iterable) given by a user; rejects the rest."""
    if isinstance(tables, (str, TableClause)):
        tables = [tables]
    elif not isinstance(tables, Iterable):
        raise TypeError(f"tables must be a name, a Table or an iterable of them, got {type(tables).__name__}")
    out = set()
    for table in tables:
        if isinstance(table, TableClause):
            out.add(normalize_table_name(table.name))
        elif isinstance(table, str):
            if not table.strip():
                raise ValueError("table name must not be empty")
            out.add(normalize_table_name(table))
        else:
            raise TypeError(f"table must be a name (str) or a Table, got {type(table).__name__}")
    return frozenset(out)


def _is_catalog(table: TableClause) -> bool:
    schema = (getattr(table, "schema", None) or "").lower()
    return schema in _CATALOG_SCHEMAS or table.name.lower().startswith(_CATALOG_PREFIXES)


def _with_cascades(table: TableClause) -> set[str]:
    """The table plus every table its foreign-key ON DELETE/ON UPDATE actions may change, transitively."""
    names = {normalize_table_name(table.name)}
    metadata = getattr(table, "metadata", None)
    if metadata is None:
        return names
    pending = [table]
    seen: set[Any] = set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for other in metadata.tables.values():
            for fk in other.foreign_keys:
                if (fk.ondelete or fk.onupdate) and fk.references(current):
                    names.add(normalize_table_name(other.name))
                    pending.append(other)
    return names


def _walk(elements: Iterable[Any]) -> tuple[set[str], set[str] | None, bool, bool]:
    """Return (tables read, tables written or None if unknown, reads a catalogue, nondeterministic)."""
    reads: set[str] = set()
    writes: set[str] | None = set()
    catalog = nondet = False
    for root in elements:
        for element in visitors.iterate(root):
            if isinstance(element, TableClause):
                reads.add(normalize_table_name(element.name))
                catalog = catalog or _is_catalog(element)
            elif isinstance(element, FunctionElement):
                if str(getattr(element, "name", "")).lower() in NONDETERMINISTIC_FUNCTIONS:
                    nondet = True
            elif isinstance(element, UpdateBase) and writes is not None:
                target = getattr(element, "table", None)
                found = {normalize_table_name(t.name) for t in visitors.iterate(target)
                         if isinstance(t, TableClause)} if target is not None else set()
                writes = writes | found if found else None
    return reads, writes, catalog, nondet


def analyze_compiled(compiled: Any, sql: str) -> StatementInfo:
    """Classify a statement compiled by SQLAlchemy (Core or ORM)."""
    if getattr(compiled, "isplaintext", False):
        return analyze_sql(sql)
    statement = getattr(compiled, "statement", None)
    if statement is None:
        return analyze_sql(sql)
    if getattr(statement, "_is_ddl", False) or type(compiled).__name__.endswith("DDLCompiler"):
        # The schema changed: catalogue reads and every cached shape may be wrong now.
        return StatementInfo(reads=None, writes=None, returns_rows=False, reason="DDL")
    roots = [statement]
    compile_state = getattr(compiled, "compile_state", None)
    state_statement = getattr(compile_state, "statement", None)
    if state_statement is not None and state_statement is not statement:
        # The ORM adds eager-load joins here, after the user's statement.
        roots.append(state_statement)
    if getattr(compiled, "isinsert", False) or getattr(compiled, "isupdate", False) or getattr(
        compiled, "isdelete", False
    ):
        targets: set[str] = set()
        for root in roots:
            target = getattr(root, "table", None)
            if target is not None:
                for table in visitors.iterate(target):
                    if isinstance(table, TableClause):
                        targets |= _with_cascades(table)
        reads, nested_writes, _, _ = _walk(roots)
        dml_writes = None if not targets or nested_writes is None else frozenset(targets | nested_writes)
        return StatementInfo(reads=frozenset(reads), writes=dml_writes, returns_rows=False, reason="DML")
    if not getattr(statement, "is_select", False):
        return analyze_sql(sql)
    reads, writes, catalog, nondet = _walk(roots)
    if writes is None or writes:
        return StatementInfo(reads=frozenset(reads), writes=None if writes is None else frozenset(writes),
                             returns_rows=True, reason="data-modifying CTE")
    reason = None
    if catalog:
        reason = "reads the system catalogue"
    elif getattr(statement, "_for_update_arg", None) is not None or _LOCKING_RE.search(sql):
        reason = "locking read (FOR UPDATE/SHARE)"
    return StatementInfo(reads=frozenset(reads), writes=frozenset(), returns_rows=True, reason=reason,
                         nondeterministic=nondet)


def _strip(sql: str) -> str:
    return _LITERAL_OR_COMMENT_RE.sub(" ", sql)


def _parse_sql(sql: str) -> StatementInfo:
    text = _strip(sql)
    candidate = _NOT_A_WRITE_RE.sub(" ", text)
    writes: set[str] = set()
    for match in _DML_RE.finditer(candidate):
        for name in re.findall(_QUALIFIED, match.group("tables")):
            writes.add(normalize_table_name(name))
    remaining = _DML_RE.sub(" ", candidate)
    first = _FIRST_WORD_RE.match(text)
    verb = first.group(1).lower() if first else ""
    if _DML_KEYWORD_RE.search(remaining) or verb in {"alter", "drop", "create", "rename", "call", "do",
                                                     "exec", "execute", "copy", "vacuum", "grant",
                                                     "revoke", "comment", "reindex", "cluster", "load"}:
        # A write (or a schema change, or a procedure call) we cannot pin to tables.
        return StatementInfo(reads=None, writes=None, returns_rows=verb in _SELECT_VERBS, reason="text")
    if writes:
        return StatementInfo(reads=None, writes=frozenset(writes), returns_rows=False, reason="text DML")
    if verb not in _READ_ONLY_VERBS:
        return _UNKNOWN_WRITE
    if verb not in _SELECT_VERBS:
        return _NO_EFFECT
    reason = "locking read (FOR UPDATE/SHARE)" if _LOCKING_RE.search(text) else None
    return StatementInfo(reads=None, writes=frozenset(), returns_rows=True, reason=reason,
                         nondeterministic=bool(_NONDET_RE.search(text)))


class _Memo:
    """Thread-safe memo of analyses: weakly keyed by compiled object, plus a bounded map for raw SQL."""

    def __init__(self, max_sql: int = 2048) -> None:
        self._lock = threading.Lock()
        self._compiled: weakref.WeakKeyDictionary[Any, StatementInfo] = weakref.WeakKeyDictionary()
        self._sql: OrderedDict[str, StatementInfo] = OrderedDict()
        self._max_sql = max_sql

    def for_context(self, context: Any, sql: str) -> StatementInfo:
        compiled = getattr(context, "compiled", None)
        if compiled is None:
            return self.for_sql(sql)
        info = self._compiled.get(compiled)
        if info is None:
            info = analyze_compiled(compiled, sql)
            with self._lock:
                self._compiled[compiled] = info
        return info

    def for_sql(self, sql: str) -> StatementInfo:
        with self._lock:
            info = self._sql.get(sql)
            if info is not None:
                self._sql.move_to_end(sql)
                return info
        info = _parse_sql(sql)
        with self._lock:
            self._sql[sql] = info
            while len(self._sql) > self._max_sql:
                self._sql.popitem(last=False)
        return info


def analyze_sql(sql: str) -> StatementInfo:
    """Classify a raw SQL string conservatively (``text()`` and ``exec_driver_sql``)."""
    return _MEMO.for_sql(sql)


_MEMO = _Memo()


def analyze_context(context: Any, sql: str) -> StatementInfo:
    """Classify the statement an execution context is running."""
    return _MEMO.for_context(context, sql)


def statement_info(context: Any, statement: str) -> StatementInfo:
    """The analysis of one execution: from its compiled statement when there is a context, else from SQL."""
    if context is None:
        return analyze_sql(statement)
    return analyze_context(context, statement)
