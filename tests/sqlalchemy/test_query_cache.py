"""QueryCache behaviour on real databases: hits, invalidation on every kind of write, transactions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, column, create_engine, delete, event, func, insert, select, table, text, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.sqlalchemy import NotAttachedError, QueryCache, iter_query_caches

USERS = table("kqc_users", column("id"), column("name"))


def _name(engine: Engine, user_id: int, qc: QueryCache | None = None) -> str:
    """Read a user's name through the cache (``qc``) or straight from the database."""
    stmt = select(USERS.c.name).where(USERS.c.id == user_id)
    if qc is not None:
        stmt = stmt.options(qc.cached())
    with engine.connect() as conn:
        return str(conn.execute(stmt).scalar_one())


def test_orm_select_is_served_from_cache_with_identity_map(engine: Engine, qc: QueryCache,
                                                          models: SimpleNamespace) -> None:
    qc.attach(engine)
    User = models.User
    stmt = select(User).where(User.id == 1).options(qc.cached(ttl=60))
    with Session(engine) as session:
        first = session.scalars(stmt).one()
        again = session.scalars(stmt).one()
        assert again is first  # identity map respected on a hit
    with Session(engine) as session:
        fresh = session.scalars(stmt).one()
        assert fresh.name == "user1" and fresh in session
        assert [a.email for a in fresh.addresses] == ["u1@example.com"]
    stats = qc.stats()
    assert stats.hits >= 2 and stats.misses >= 1 and stats.hit_rate > 0


def test_cached_rows_equal_uncached_rows_for_core_select(engine: Engine, qc: QueryCache,
                                                         models: SimpleNamespace) -> None:
    qc.attach(engine)
    users, addresses = models.users, models.addresses
    stmt = (select(users.c.id, users.c.name, func.count(addresses.c.id).label("n"))
            .join(addresses, addresses.c.user_id == users.c.id).group_by(users.c.id, users.c.name)
            .order_by(users.c.id))
    with engine.connect() as conn:
        plain = conn.execute(stmt).all()
        miss = conn.execute(stmt.options(qc.cached())).all()
        hit = conn.execute(stmt.options(qc.cached())).all()
        result = conn.execute(stmt.options(qc.cached()))
        assert list(result.keys()) == ["id", "name", "n"]
        assert result.mappings().all()[0] == {"id": 1, "name": "user1", "n": 1}
    assert plain == miss == hit
    assert qc.stats().hits == 2


def test_uncommitted_write_is_visible_to_its_transaction_only_and_commit_invalidates(
    engine: Engine, qc: QueryCache, models: SimpleNamespace
) -> None:
    qc.attach(engine)
    User = models.User
    stmt = select(User.name).where(User.id == 1).options(qc.cached())
    assert _name(engine, 1, qc) == "user1"
    with Session(engine) as writer:
        writer.get(User, 1).name = "changed"
        writer.flush()
        # the writing transaction sees its own write, never the cached pre-write row
        assert writer.scalars(stmt).one() == "changed"
        assert qc.stats().bypass_reasons.get("written in this transaction", 0) >= 1
        writer.commit()
    assert _name(engine, 1, qc) == "changed"
    assert _name(engine, 1) == "changed"
    assert qc.stats().invalidations["kqc_users"] == 1


def test_rollback_leaves_the_cache_as_if_nothing_happened(engine: Engine, qc: QueryCache,
                                                          models: SimpleNamespace) -> None:
    qc.attach(engine)
    User = models.User
    assert _name(engine, 2, qc) == "user2"
    hits_before = qc.stats().hits
    with Session(engine) as session:
        session.get(User, 2).name = "rolled back"
        session.flush()
        session.rollback()
        assert session.scalars(select(User.name).where(User.id == 2).options(qc.cached())).one() == "user2"
    assert _name(engine, 2, qc) == "user2"
    assert qc.stats().hits == hits_before + 2
    assert qc.stats().invalidations.get("kqc_users", 0) == 0


def test_savepoints_keep_outer_writes_dirty_and_commit_invalidates(engine: Engine, qc: QueryCache,
                                                                   models: SimpleNamespace) -> None:
    qc.attach(engine)
    User = models.User
    stmt = select(User.name).where(User.id == 3).options(qc.cached())
    assert _name(engine, 3, qc) == "user3"
    with Session(engine) as session:
        nested = session.begin_nested()
        session.get(User, 3).name = "in savepoint"
        session.flush()
        assert session.scalars(stmt).one() == "in savepoint"
        nested.rollback()
        # rolled back to the savepoint: the transaction reads the old value, from the database
        assert session.scalars(stmt).one() == "user3"
        with session.begin_nested():
            session.get(User, 3).name = "released"
        assert session.scalars(stmt).one() == "released"
        assert _name(engine, 3, qc) == "user3"  # other connections: still the committed value
        session.commit()
    assert _name(engine, 3, qc) == "released"


def test_join_and_subquery_depend_on_every_table_they_read(engine: Engine, qc: QueryCache,
                                                           models: SimpleNamespace) -> None:
    qc.attach(engine)
    User, Address = models.User, models.Address
    joined = select(User.name, Address.email).join(User.addresses).order_by(User.id).options(qc.cached())
    sub = (select(User.name).where(User.id.in_(select(Address.user_id).where(Address.email.like("%new%"))))
           .options(qc.cached()))
    with Session(engine) as session:
        assert session.execute(joined).all()[0] == ("user1", "u1@example.com")
        assert session.scalars(sub).all() == []
    with Session(engine) as session:
        session.execute(update(Address).where(Address.id == 1).values(email="new@example.com"))
        session.commit()
    with Session(engine) as session:
        assert session.execute(joined).all()[0] == ("user1", "new@example.com")
        assert session.scalars(sub).all() == ["user1"]


def test_relationship_loads_are_cached_and_invalidated(engine: Engine, qc: QueryCache,
                                                       models: SimpleNamespace) -> None:
    qc.attach(engine)
    User, Address = models.User, models.Address
    for loader in (None, selectinload(User.addresses)):
        stmt = select(User).where(User.id == 1).options(qc.cached())
        if loader is not None:
            stmt = stmt.options(loader)
        for _ in range(2):
            with Session(engine) as session:
                user = session.scalars(stmt).one()
                assert [a.email for a in user.addresses] == ["u1@example.com"]
    assert qc.stats().hits >= 4  # the user row and the relationship load came from the cache
    with Session(engine) as session:
        session.add(Address(id=99, user_id=1, email="second@example.com"))
        session.commit()
    with Session(engine) as session:
        user = session.scalars(select(User).where(User.id == 1).options(qc.cached())).one()
        assert [a.email for a in user.addresses] == ["u1@example.com", "second@example.com"]


@pytest.mark.parametrize("write", ["core_insert", "core_update", "core_delete", "orm_bulk_insert",
                                   "orm_bulk_update", "orm_delete", "text_update", "text_quoted"])
def test_every_kind_of_write_invalidates(engine: Engine, qc: QueryCache, models: SimpleNamespace,
                                         write: str) -> None:
    qc.attach(engine)
    User, users = models.User, models.users
    count_stmt = select(func.count()).select_from(users).where(users.c.score >= 0).options(qc.cached())
    names_stmt = select(users.c.name).order_by(users.c.id).options(qc.cached())

    def snapshot() -> tuple[int, list[str]]:
        with engine.connect() as conn:
            return conn.execute(count_stmt).scalar_one(), list(conn.execute(names_stmt).scalars())

    before = snapshot()
    assert snapshot() == before and qc.stats().hits == 2
    with Session(engine) as session:
        if write == "core_insert":
            session.connection().execute(insert(users).values(id=10, name="ten", score=1))
        elif write == "core_update":
            session.connection().execute(update(users).where(users.c.id == 1).values(name="x"))
        elif write == "core_delete":
            session.connection().execute(delete(users).where(users.c.id == 3))
        elif write == "orm_bulk_insert":
            session.execute(insert(User), [{"id": 20, "name": "a", "score": 1}, {"id": 21, "name": "b"}])
        elif write == "orm_bulk_update":
            session.execute(update(User), [{"id": 1, "name": "bulk"}, {"id": 2, "name": "bulk2"}])
        elif write == "orm_delete":
            session.delete(session.get(User, 2))
        elif write == "text_update":
            session.execute(text("UPDATE kqc_users SET name = :n WHERE id = 1"), {"n": "texted"})
        elif write == "text_quoted":
            session.execute(text('DELETE FROM "kqc_users" WHERE id = 1'))
        session.commit()
    after = snapshot()
    with engine.connect() as conn:  # the truth, uncached
        truth = (conn.execute(select(func.count()).select_from(users)).scalar_one(),
                 list(conn.execute(select(users.c.name).order_by(users.c.id)).scalars()))
    assert after == truth != before


def test_delete_cascade_invalidates_the_referencing_table(engine: Engine, qc: QueryCache,
                                                          models: SimpleNamespace) -> None:
    qc.attach(engine)
    addresses = models.addresses
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda dbapi_conn, _: dbapi_conn.execute("PRAGMA foreign_keys=ON"))
        engine.dispose()
    stmt = select(func.count()).select_from(addresses).options(qc.cached())
    with engine.connect() as conn:
        assert conn.execute(stmt).scalar_one() == 3
        conn.execute(delete(models.users).where(models.users.c.id == 1))  # the database cascades
        conn.commit()
        assert conn.execute(stmt).scalar_one() == 2


def test_text_select_needs_declared_tables(engine: Engine, qc: QueryCache) -> None:
    qc.attach(engine)
    undeclared = text("SELECT name FROM kqc_users WHERE id = 1")
    declared = undeclared.options(qc.cached(tables=["kqc_users"]))
    with engine.connect() as conn:
        for _ in range(2):
            assert conn.execute(undeclared.options(qc.cached())).scalar_one() == "user1"
        assert qc.stats().bypass_reasons["tables unknown"] == 2
        assert conn.execute(declared).scalar_one() == "user1"
        assert conn.execute(declared).scalar_one() == "user1"
        assert qc.stats().hits == 1
        conn.execute(text("UPDATE kqc_users SET name = 'raw' WHERE id = 1"))
        conn.commit()
        assert conn.execute(declared).scalar_one() == "raw"


def test_manual_invalidate_for_writes_outside_sqlalchemy(engine: Engine, qc: QueryCache) -> None:
    qc.attach(engine)
    assert _name(engine, 1, qc) == "user1"
    raw = engine.raw_connection()  # a write SQLAlchemy never sees
    try:
        cursor = raw.cursor()
        cursor.execute("UPDATE kqc_users SET name = 'outside' WHERE id = 1")
        raw.commit()
        cursor.close()
    finally:
        raw.close()
    assert _name(engine, 1, qc) == "user1"  # documented: unseen writes need invalidate()
    qc.invalidate("kqc_users")
    assert _name(engine, 1, qc) == "outside"
    asyncio.run(qc.ainvalidate(["KQC_USERS"]))
    assert qc.stats().invalidations["kqc_users"] == 2


def test_ddl_invalidates_everything(engine: Engine, qc: QueryCache) -> None:
    qc.attach(engine)
    assert _name(engine, 1, qc) == "user1"
    with engine.begin() as conn:
        conn.execute(text("UPDATE kqc_users SET name = 'ddl' WHERE id = 1"))
        conn.execute(text("CREATE TABLE kqc_tmp (id INTEGER)"))
        conn.execute(text("DROP TABLE kqc_tmp"))
    assert qc.stats().global_invalidations == 1
    assert _name(engine, 1, qc) == "ddl"


def test_missing_version_token_is_never_taken_as_unchanged(engine: Engine, cache: CacheManager,
                                                           qc: QueryCache) -> None:
    qc.attach(engine)
    assert _name(engine, 1, qc) == "user1"
    with engine.connect() as conn:  # a write whose invalidation is lost, e.g. the token was evicted
        conn.execute(text("UPDATE kqc_users SET name = 'evicted' WHERE id = 1"))
        conn.commit()
    cache.delete("kqc:v:kqc_users")  # also what an eviction of the version key looks like
    cache.delete("kqc:g")
    stats_before = qc.stats()
    assert _name(engine, 1, qc) == "evicted"
    assert qc.stats().misses == stats_before.misses + 1


def test_a_reader_racing_a_commit_stores_a_stale_entry_that_is_never_served(
    engine: Engine, cache: CacheManager, qc: QueryCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    qc.attach(engine)
    real_put = cache.put
    raced: list[bool] = []

    def put_after_a_concurrent_commit(key: object, value: object, ttl: float | None = None) -> bool:
        if str(key).startswith("kqc:r:") and not raced:
            raced.append(True)
            # the reader has its (old) rows; a writer commits before the reader stores them
            with engine.begin() as conn:
                conn.execute(text("UPDATE kqc_users SET name = 'raced' WHERE id = 1"))
        return real_put(key, value, ttl)

    monkeypatch.setattr(cache, "put", put_after_a_concurrent_commit)
    assert _name(engine, 1, qc) == "user1"
    assert raced
    assert _name(engine, 1, qc) == "raced"


def test_cache_all_selects_and_what_is_never_cached(engine: Engine, qc: QueryCache,
                                                    models: SimpleNamespace) -> None:
    qc.attach(engine, cache_all_selects=True)
    users = models.users
    plain = select(users.c.name).where(users.c.id == 1)
    with engine.connect() as conn:
        conn.execute(plain).all()
        conn.execute(plain).all()
        assert qc.stats().hits == 1
        conn.execute(plain.options(qc.uncached())).all()
        conn.execute(select(users.c.id, func.random()).limit(1)).all()
        assert qc.stats().bypass_reasons["non-deterministic function"] == 1
        conn.execute(select(users.c.id, func.now()).limit(1).options(qc.cached(allow_nondeterministic=True)))
        if engine.dialect.name != "sqlite":  # SQLite has no FOR UPDATE
            conn.execute(plain.with_for_update()).all()
            assert qc.stats().bypass_reasons["locking read (FOR UPDATE/SHARE)"] == 1
        conn.execute(plain.execution_options(yield_per=10)).all()
        assert qc.stats().bypass_reasons["streaming result"] == 1
        conn.execute(text("SELECT 1")).all()
        assert qc.stats().hits == 1
    qc.attach(engine, cache_all_selects=False)  # attach again: switches the mode
    with engine.connect() as conn:
        lookups = qc.stats().lookups
        conn.execute(plain).all()
        assert qc.stats().lookups == lookups


def test_sessionmaker_attachment_caches_only_its_sessions(engine: Engine, qc: QueryCache,
                                                          models: SimpleNamespace) -> None:
    factory = sessionmaker(engine)
    qc.attach(factory, cache_all_selects=True)
    User = models.User
    for _ in range(2):
        with factory() as session:
            assert session.scalars(select(User.name).where(User.id == 1)).one() == "user1"
    assert qc.stats().hits == 1
    with engine.connect() as conn:  # Core traffic outside those sessions is not cached ...
        conn.execute(select(User.name).where(User.id == 1)).all()
        assert qc.stats().lookups == 2
        conn.execute(update(User).where(User.id == 1).values(name="core write"))
        conn.commit()  # ... but its writes invalidate
    with factory() as session:
        assert session.scalars(select(User.name).where(User.id == 1)).one() == "core write"
    qc.detach(factory)
    assert qc.attached_engines == []
    with pytest.raises(NotAttachedError):
        qc.detach(factory)


def test_results_too_large_or_rejected_are_returned_but_not_stored(engine: Engine,
                                                                   models: SimpleNamespace) -> None:
    small = QueryCache(CacheManager(max_bytes=1024), max_rows=2)
    small.attach(engine, cache_all_selects=True)
    try:
        with engine.connect() as conn:
            for _ in range(2):
                rows = conn.execute(select(models.users).order_by(models.users.c.id)).all()
                assert [r.id for r in rows] == [1, 2, 3]
        assert small.stats().hits == 0 and small.stats().bypass_reasons["too many rows"] == 2
    finally:
        small.close()


def test_detach_removes_every_listener(engine: Engine, qc: QueryCache) -> None:
    had_commit_override = "do_commit" in engine.dialect.__dict__
    qc.attach(engine, cache_all_selects=True)
    assert "do_commit" in engine.dialect.__dict__
    qc.detach(engine)
    assert ("do_commit" in engine.dialect.__dict__) == had_commit_override
    assert len(engine.dispatch.before_cursor_execute) == 0
    assert len(engine.dialect.dispatch.do_execute) == 0
    with pytest.raises(NotAttachedError):
        qc.detach(engine)
    assert _name(engine, 1, qc) == "user1"
    assert qc.stats().lookups == 0
    assert qc.stats().global_invalidations == 1  # detaching retires what was cached


def test_entries_from_before_a_detach_are_not_served_after_reattaching(engine: Engine,
                                                                       qc: QueryCache) -> None:
    qc.attach(engine)
    assert _name(engine, 1, qc) == "user1"
    qc.detach(engine)
    with engine.begin() as conn:  # nobody watches this write
        conn.execute(text("UPDATE kqc_users SET name = 'unseen' WHERE id = 1"))
    qc.attach(engine)
    assert _name(engine, 1, qc) == "unseen"


def test_bad_input_is_rejected_clearly(engine: Engine, qc: QueryCache) -> None:
    with pytest.raises(TypeError, match="BaseCache"):
        QueryCache(object())
    with pytest.raises(ValueError, match="ttl"):
        qc.cached(ttl=0)
    with pytest.raises(TypeError, match="ttl"):
        qc.cached(ttl="60")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_rows"):
        QueryCache(CacheManager(max_entries=10), max_rows=-1)
    with pytest.raises(ValueError, match="namespace"):
        QueryCache(CacheManager(max_entries=10), namespace="a b")
    with pytest.raises(TypeError, match="attach"):
        qc.attach("sqlite://")
    with pytest.raises(TypeError, match="table"):
        qc.cached(tables=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one table"):
        qc.invalidate()
    with pytest.raises(ValueError, match="empty"):
        qc.invalidate("")
    with pytest.raises(NotAttachedError):
        qc.detach(engine)


def test_registry_and_stats_export(qc: QueryCache) -> None:
    assert qc in list(iter_query_caches())
    exported = qc.stats().to_dict()
    assert exported["hits"] == 0 and exported["invalidations"] == {} and exported["hit_rate"] == 0.0


def test_orm_hits_are_answered_without_a_connection_and_stay_isolated(engine: Engine, qc: QueryCache,
                                                                      models: SimpleNamespace) -> None:
    qc.attach(engine)
    User = models.User
    checkouts: list[int] = []
    event.listen(engine, "checkout", lambda *_: checkouts.append(1))
    stmt = (select(User).where(User.id.in_([1, 2])).order_by(User.id)
            .options(selectinload(User.addresses), qc.cached()))
    for _ in range(2):  # the first run learns the statement's shape, the second stores the ORM entry
        with Session(engine) as session:
            session.scalars(stmt).all()
    before = len(checkouts)
    with Session(engine) as session:
        users = session.scalars(stmt).all()
        assert [u.name for u in users] == ["user1", "user2"]
        assert [a.email for a in users[0].addresses] == ["u1@example.com"]  # loaded, no lazy load
        again = session.scalars(stmt).all()
        assert again[0] is users[0]  # identity map: the in-session object
        users[0].name = "mutated, never flushed"
        users[1].addresses.clear()
    assert len(checkouts) == before  # answered from the cache: no connection was needed
    with Session(engine) as session:
        assert [u.name for u in session.scalars(stmt)] == ["user1", "user2"]
    with Session(engine) as session:
        session.add(models.Address(id=50, user_id=2, email="late@example.com"))
        session.commit()
    with Session(engine) as session:  # the entry covered the selectin load's table too
        users = session.scalars(stmt).all()
        assert [a.email for a in users[1].addresses] == ["u2@example.com", "late@example.com"]


def test_orm_entry_is_not_stored_when_a_nested_load_uses_an_untracked_engine(
    tmp_path: Path, qc: QueryCache, models: SimpleNamespace
) -> None:
    User, Address = models.User, models.Address
    tracked = create_engine(f"sqlite:///{tmp_path / 'users.sqlite'}")
    untracked = create_engine(f"sqlite:///{tmp_path / 'addresses.sqlite'}")
    for eng in (tracked, untracked):
        models.Base.metadata.create_all(eng)
    with Session(binds={User: tracked, Address: untracked}) as session:
        session.add(User(id=1, name="u", score=0))
        session.add(Address(id=1, user_id=1, email="old@example.com"))
        session.commit()
    qc.attach(tracked)
    stmt = select(User).where(User.id == 1).options(selectinload(User.addresses), qc.cached())
    try:
        for _ in range(3):
            with Session(binds={User: tracked, Address: untracked}) as session:
                assert [a.email for a in session.scalars(stmt).one().addresses] == ["old@example.com"]
        with untracked.begin() as conn:  # a write the QueryCache cannot see
            conn.execute(update(Address).values(email="new@example.com"))
        with Session(binds={User: tracked, Address: untracked}) as session:
            assert [a.email for a in session.scalars(stmt).one().addresses] == ["new@example.com"]
    finally:
        qc.detach(tracked)
        tracked.dispose()
        untracked.dispose()
