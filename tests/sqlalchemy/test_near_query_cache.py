"""QueryCache over a NearCache: entries from each process's L1, version tokens read from Redis itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from kotoba_memory.cache_manager.near import NearCache
from kotoba_memory_integrations.sqlalchemy import QueryCache

pytestmark = pytest.mark.redis

_WRITER = textwrap.dedent(
    """
    import sys
    from sqlalchemy import create_engine, text
    from kotoba_memory.cache_manager.near import NearCache
    from kotoba_memory_integrations.sqlalchemy import QueryCache

    db_url, redis_url, namespace = sys.argv[1:4]
    engine = create_engine(db_url)
    qc = QueryCache(NearCache(redis_url, secret="qc-secret", namespace=namespace))
    qc.attach(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE kqc_users SET name = 'other process' WHERE id = 1"))
    print(qc.stats().invalidations["kqc_users"])
    """
)


def test_a_commit_in_another_process_is_never_missed(engine: Engine, models: SimpleNamespace,
                                                     redis_url: str) -> None:
    namespace = f"kqc-near-{uuid.uuid4().hex[:8]}"
    near = NearCache(redis_url, secret="qc-secret", namespace=namespace)
    assert near.wait_coherent(10)
    qc = QueryCache(near)
    qc.attach(engine)
    User = models.User
    stmt = select(User.name).where(User.id == 1).options(qc.cached(ttl=300))
    try:
        for _ in range(3):
            with Session(engine) as session:
                assert session.scalars(stmt).one() == "user1"
        assert qc.stats().hits == 2
        assert near.stats().l1_hits >= 2  # the entry came from this process's L1
        db_url = engine.url.render_as_string(hide_password=False)
        out = subprocess.run(
            [sys.executable, "-c", _WRITER, db_url, redis_url, namespace],
            check=True, capture_output=True, text=True, timeout=120,
        )
        assert out.stdout.strip() == "1"
        # No wait for the invalidation message: the tokens are read from Redis on every lookup.
        with Session(engine) as session:
            assert session.scalars(stmt).one() == "other process"
        with Session(engine) as session:
            assert session.scalars(stmt).one() == "other process"
        stats = qc.stats()
        assert (stats.hits, stats.misses) == (3, 2)
    finally:
        qc.close()
        near.clear()
        near.close()


def test_redis_down_bypasses_the_cache(
    engine: Engine, models: SimpleNamespace, restartable_redis: Any
) -> None:
    near = NearCache(restartable_redis.url, secret="qc-secret", namespace="kqc-down")
    assert near.wait_coherent(10)
    qc = QueryCache(near)
    qc.attach(engine)
    User = models.User
    stmt = select(User.name).where(User.id == 1).options(qc.cached(ttl=300))
    try:
        with Session(engine) as session:
            assert session.scalars(stmt).one() == "user1"
        restartable_redis.kill()
        for _ in range(3):  # answered by the database, no exception
            with Session(engine) as session:
                assert session.scalars(stmt).one() == "user1"
        assert qc.stats().hits == 0 and qc.stats().errors >= 1
    finally:
        qc.close()
        near.close()
