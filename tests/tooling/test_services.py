"""The test tooling really starts the servers it promises."""

from typing import Any

import pytest


@pytest.mark.redis
def test_redis_fixture_serves_commands(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.set("kotoba:probe", b"1")
    assert client.get("kotoba:probe") == b"1"


@pytest.mark.postgres
def test_postgres_fixture_serves_queries(postgres_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("select 40 + 2")).scalar_one() == 42
    engine.dispose()


@pytest.mark.redis
def test_restartable_redis_keeps_acknowledged_writes_across_a_sigkill(restartable_redis: Any) -> None:
    """The AOF server used by the outage tests: killed without a save, restarted with its data."""
    import redis

    client = redis.Redis.from_url(restartable_redis.url)
    client.set("kotoba:probe", b"before the kill")
    restartable_redis.kill()
    with pytest.raises(redis.ConnectionError):
        client.get("kotoba:probe")
    restartable_redis.start()
    assert client.get("kotoba:probe") == b"before the kill"
    client.close()
