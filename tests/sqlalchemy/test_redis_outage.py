"""Issue 11, item 2: an invalidation Redis could not take must not let stale results be served later.

Runs against a real redis-server with an append-only file, SIGKILLed and restarted from that file: the
restarted server holds the old entry and the old version tokens, exactly as before the write.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, update
from sqlalchemy.orm import Session

from kotoba_memory.cache_manager.redis_tier import RedisCache
from kotoba_memory_integrations.sqlalchemy import QueryCache

from .conftest import seed

pytestmark = pytest.mark.redis


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until it holds (or ``timeout`` passes); returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture()
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'outage.sqlite'}")
    seed(engine)
    yield engine
    engine.dispose()


def name_of(engine: Engine, qc: QueryCache, models: SimpleNamespace) -> Any:
    """User 1's name, read through the query cache."""
    users = models.users
    with engine.connect() as conn:
        return conn.execute(select(users.c.name).where(users.c.id == 1).options(qc.cached())).scalar_one()


def orm_name_of(engine: Engine, qc: QueryCache, models: SimpleNamespace) -> Any:
    """User 1's name, loaded as an ORM object in a fresh session (the ORM-level entry when there is one)."""
    with Session(engine) as session:
        return session.scalars(select(models.User).where(models.User.id == 1).options(qc.cached())).one().name


def test_a_write_committed_while_redis_was_down_is_never_hidden_by_the_restarted_cache(
    restartable_redis: Any, sqlite_engine: Engine, models: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"outage-{uuid.uuid4().hex[:8]}:"
    qc = QueryCache(RedisCache(restartable_redis.url, prefix=prefix))
    qc.attach(sqlite_engine)
    try:
        assert name_of(sqlite_engine, qc, models) == "user1"
        assert name_of(sqlite_engine, qc, models) == "user1"
        assert qc.stats().hits == 1  # the entry and its tokens are in Redis (and its AOF)
        for _ in range(3):  # DB-API entry, then the ORM-level entry, then an ORM-level hit
            assert orm_name_of(sqlite_engine, qc, models) == "user1"
        assert qc.stats().hits == 3

        restartable_redis.kill()
        with caplog.at_level(logging.ERROR, "kotoba_memory.sqlalchemy"), sqlite_engine.begin() as conn:
            conn.execute(update(models.users).where(models.users.c.id == 1).values(name="bob"))
        assert qc.stats().undelivered >= 1
        assert "could not write invalidations" in caplog.text
        assert name_of(sqlite_engine, qc, models) == "bob"  # Redis down: read from the database

        restartable_redis.start()  # back with the old entries and the old tokens
        assert orm_name_of(sqlite_engine, qc, models) == "bob"
        assert name_of(sqlite_engine, qc, models) == "bob"
        assert name_of(sqlite_engine, qc, models) == "bob"
        stats = qc.stats()
        assert stats.undelivered == 0 and stats.redelivered >= 1
        hits = stats.hits
        assert name_of(sqlite_engine, qc, models) == "bob"
        assert qc.stats().hits == hits + 1  # the cache is used again once the invalidation is written
    finally:
        qc.close()


def test_undelivered_invalidations_reach_other_processes_without_a_read(
    restartable_redis: Any, sqlite_engine: Engine, models: SimpleNamespace
) -> None:
    """The scheduler retries the write, so a QueryCache that never saw the UPDATE stops serving it too."""
    prefix = f"outage-{uuid.uuid4().hex[:8]}:"
    writer = QueryCache(RedisCache(restartable_redis.url, prefix=prefix))
    writer.attach(sqlite_engine)
    other_engine = create_engine(sqlite_engine.url)
    other = QueryCache(RedisCache(restartable_redis.url, prefix=prefix))  # another worker, same Redis
    other.attach(other_engine)
    try:
        assert name_of(other_engine, other, models) == "user1"
        restartable_redis.kill()
        with sqlite_engine.begin() as conn:
            conn.execute(update(models.users).where(models.users.c.id == 1).values(name="bob"))
        restartable_redis.start()
        assert wait_until(lambda: writer.stats().undelivered == 0)  # no read through `writer` needed
        assert name_of(other_engine, other, models) == "bob"
    finally:
        writer.close()
        other.close()
        other_engine.dispose()
