"""QueryCache under real threads, across processes through Redis, and with an AsyncEngine."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.sqlalchemy import QueryCache


def test_threads_never_read_older_than_the_last_commit(engine: Engine, models: SimpleNamespace) -> None:
    qc = QueryCache(CacheManager(max_bytes=4 * 1024 * 1024))
    qc.attach(engine, cache_all_selects=True)
    User = models.User
    stmt = select(User.score).where(User.id == 1)
    lock = threading.Lock()
    committed = [1]
    done = threading.Event()
    violations: list[tuple[int, int]] = []
    reads = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for value in range(2, 32):
                with Session(engine) as session:
                    session.execute(update(User).where(User.id == 1).values(score=value))
                    session.commit()
                with lock:
                    committed[0] = value
                time.sleep(0.002)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        deadline = time.monotonic() + 60
        try:
            while not done.is_set() and time.monotonic() < deadline:
                with lock:
                    floor = committed[0]
                with Session(engine) as session:
                    seen = session.scalars(stmt).one()
                if seen < floor:
                    violations.append((seen, floor))
                with lock:
                    reads[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(3)]
    threads.append(threading.Thread(target=writer, daemon=True))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        qc.close()
    assert not errors, errors
    assert violations == []
    assert reads[0] > 30
    stats = qc.stats()
    assert stats.hits > 0 and stats.invalidations["kqc_users"] == 30


_WRITER = textwrap.dedent(
    """
    import sys
    from sqlalchemy import create_engine, text
    from kotoba_memory.cache_manager.redis_tier import RedisCache
    from kotoba_memory_integrations.sqlalchemy import QueryCache

    db_url, redis_url, prefix = sys.argv[1:4]
    engine = create_engine(db_url)
    qc = QueryCache(RedisCache(redis_url, prefix=prefix))
    qc.attach(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE kqc_users SET name = 'other process' WHERE id = 1"))
    print(qc.stats().invalidations["kqc_users"])
    """
)


@pytest.mark.redis
def test_processes_invalidate_each_other_through_redis(engine: Engine, models: SimpleNamespace,
                                                       redis_url: str) -> None:
    from kotoba_memory.cache_manager.redis_tier import RedisCache

    prefix = f"kqc-test-{uuid.uuid4().hex[:8]}:"
    tier = RedisCache(redis_url, prefix=prefix)
    qc = QueryCache(tier)
    qc.attach(engine)
    User = models.User
    stmt = select(User.name).where(User.id == 1).options(qc.cached(ttl=300))
    try:
        with Session(engine) as session:
            assert session.scalars(stmt).one() == "user1"
        with Session(engine) as session:
            assert session.scalars(stmt).one() == "user1"
        assert qc.stats().hits == 1
        db_url = engine.url.render_as_string(hide_password=False)
        out = subprocess.run(
            [sys.executable, "-c", _WRITER, db_url, redis_url, prefix],
            check=True, capture_output=True, text=True, timeout=120,
        )
        assert out.stdout.strip() == "1"
        with Session(engine) as session:  # this process saw no write: only Redis can tell it
            assert session.scalars(stmt).one() == "other process"
        with Session(engine) as session:
            assert session.scalars(stmt).one() == "other process"
        stats = qc.stats()
        assert (stats.hits, stats.misses) == (2, 2)
    finally:
        qc.close()
        tier.clear()
        tier.close()


@pytest.mark.postgres
def test_async_engine_and_session(postgres_url: str, models: SimpleNamespace) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def scenario() -> tuple[list[str], QueryCache]:
        async_engine = create_async_engine(postgres_url)
        qc = QueryCache(CacheManager(max_bytes=1024 * 1024))
        qc.attach(async_engine)
        User = models.User
        seen = []
        try:
            async with async_engine.begin() as conn:
                await conn.run_sync(models.Base.metadata.drop_all)
                await conn.run_sync(models.Base.metadata.create_all)
            async with AsyncSession(async_engine) as session:
                session.add(User(id=1, name="async", score=0))
                await session.commit()
            stmt = select(User.name).where(User.id == 1).options(qc.cached())
            for new_name in (None, None, "renamed"):
                async with AsyncSession(async_engine) as session:
                    if new_name is not None:
                        await session.execute(update(User).where(User.id == 1).values(name=new_name))
                        await session.commit()
                    seen.append((await session.scalars(stmt)).one())
            await qc.ainvalidate_all()
        finally:
            qc.close()
            await async_engine.dispose()
        return seen, qc

    seen, qc = asyncio.run(scenario())
    assert seen == ["async", "async", "renamed"]
    stats = qc.stats()
    # global bumps: the DDL transaction (drop_all + create_all), ainvalidate_all(), and close()
    assert stats.hits == 1 and stats.global_invalidations == 3
