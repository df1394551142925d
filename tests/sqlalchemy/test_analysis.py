"""Which tables a statement reads and writes, as the query cache sees it."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable

from kotoba_memory_integrations.sqlalchemy._analysis import analyze_compiled, analyze_sql, table_names

NONE: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    ("sql", "writes", "returns_rows"),
    [
        ('UPDATE "My Table" SET x = 1', {"my table"}, False),
        ("insert into public.users (id) values (1)", {"users"}, False),
        ("INSERT INTO a VALUES (1) ON CONFLICT (id) DO UPDATE SET x = 1", {"a"}, False),
        ("INSERT OR REPLACE INTO kv VALUES (1, 2)", {"kv"}, False),
        ("TRUNCATE a, b", {"a", "b"}, False),
        ("DELETE FROM [dbo].[T] WHERE id = 1", {"t"}, False),
        ("UPDATE ONLY t SET a = 1", {"t"}, False),
        ("WITH d AS (DELETE FROM logs RETURNING *) SELECT * FROM d", {"logs"}, False),
        ("SELECT replace(name, 'UPDATE x SET', 'b') FROM t", NONE, True),  # inside a literal
        ("-- UPDATE x\nSELECT 1", NONE, True),  # inside a comment
        ("SELECT update_count FROM stats", NONE, True),
        ("SET search_path TO app", NONE, False),
        ("CALL refresh_everything()", None, False),  # unknown effect: invalidates everything
        ("ALTER TABLE x ADD COLUMN c int", None, False),
        ("DROP TABLE IF EXISTS x", None, False),
    ],
)
def test_text_statements_are_classified_conservatively(sql: str, writes: set[str] | None,
                                                       returns_rows: bool) -> None:
    info = analyze_sql(sql)
    assert info.writes == (None if writes is None else frozenset(writes))
    assert info.returns_rows is returns_rows


@pytest.mark.parametrize("sql", ["SELECT * FROM t FOR UPDATE", "select * from t for update of t nowait",
                                 "SELECT * FROM t FOR SHARE", "SELECT * FROM t FOR NO KEY UPDATE"])
def test_locking_reads_are_not_cacheable(sql: str) -> None:
    info = analyze_sql(sql)
    assert info.writes == NONE and info.reason is not None and "locking" in info.reason


def test_nondeterministic_text_is_flagged() -> None:
    assert analyze_sql("SELECT now()").nondeterministic
    assert analyze_sql("SELECT random() FROM t").nondeterministic
    assert not analyze_sql("SELECT nowhere FROM t").nondeterministic


def _tables() -> tuple[Table, Table, Table]:
    meta = MetaData()
    parent = Table("Parent", meta, Column("id", Integer, primary_key=True), schema="app")
    child = Table("child", meta, Column("id", Integer, primary_key=True),
                  Column("parent_id", ForeignKey("app.Parent.id", ondelete="CASCADE")))
    grandchild = Table("grandchild", meta, Column("id", Integer, primary_key=True),
                       Column("child_id", ForeignKey("child.id", onupdate="CASCADE")),
                       Column("note", String))
    return parent, child, grandchild


def test_compiled_select_reads_every_table_including_subqueries_and_ctes() -> None:
    parent, child, grandchild = _tables()
    cte = select(grandchild.c.child_id).cte("g")
    stmt = (select(parent.c.id).join(child, child.c.parent_id == parent.c.id)
            .where(child.c.id.in_(select(cte.c.child_id))))
    info = analyze_compiled(stmt.compile(dialect=postgresql.dialect()), str(stmt))
    assert info.reads == {"parent", "child", "grandchild"}
    assert info.writes == NONE and info.returns_rows and info.reason is None


def test_compiled_dml_follows_foreign_key_cascades() -> None:
    parent, _, grandchild = _tables()
    stmt = update(parent).values(id=2)
    info = analyze_compiled(stmt.compile(dialect=sqlite.dialect()), "UPDATE")
    assert info.writes == {"parent", "child", "grandchild"}
    info = analyze_compiled(update(grandchild).values(note="x").compile(dialect=sqlite.dialect()), "")
    assert info.writes == {"grandchild"}


def test_compiled_ddl_and_locking_and_functions() -> None:
    _, child, _ = _tables()
    ddl = CreateTable(child)
    assert analyze_compiled(ddl.compile(dialect=sqlite.dialect()), str(ddl)).writes is None
    locking = select(child).with_for_update()
    assert analyze_compiled(locking.compile(dialect=postgresql.dialect()), "SELECT").reason is not None
    stamped = select(child.c.id, func.now())
    assert analyze_compiled(stamped.compile(dialect=postgresql.dialect()), "SELECT").nondeterministic
    catalog = select(Table("pg_class", MetaData(), Column("oid", Integer), schema="pg_catalog"))
    assert analyze_compiled(catalog.compile(dialect=postgresql.dialect()), "SELECT").reason is not None


def test_table_names_accepts_names_and_tables_only() -> None:
    parent, _, _ = _tables()
    assert table_names(["app.Users", '"Orders"', parent]) == {"users", "orders", "parent"}
    assert table_names("users") == {"users"}
    with pytest.raises(TypeError):
        table_names(42)
    with pytest.raises(ValueError):
        table_names([" "])
