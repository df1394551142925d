"""Fixtures for the SQLAlchemy query-cache tests: a small schema on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine, ForeignKey, Integer, String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.sqlalchemy import QueryCache


class Base(DeclarativeBase):
    pass


# Module level, so cached ORM results (pickled) can name these classes.
class User(Base):
    __tablename__ = "kqc_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    score: Mapped[int] = mapped_column(Integer, default=0)
    addresses: Mapped[list[Address]] = relationship(
        back_populates="user", order_by="Address.id", cascade="all, delete-orphan", passive_deletes=True
    )


class Address(Base):
    __tablename__ = "kqc_addresses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("kqc_users.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(80))
    user: Mapped[User] = relationship(back_populates="addresses")


MODELS = SimpleNamespace(Base=Base, User=User, Address=Address, users=User.__table__,
                         addresses=Address.__table__)


@pytest.fixture(scope="session")
def models() -> SimpleNamespace:
    """The declarative classes (User, Address) and their tables."""
    return MODELS


def seed(engine: Engine, users: int = 3) -> None:
    """Recreate the tables and insert ``users`` users with one address each."""
    MODELS.Base.metadata.drop_all(engine)
    MODELS.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(MODELS.users.insert(),
                     [{"id": i, "name": f"user{i}", "score": i} for i in range(1, users + 1)])
        conn.execute(MODELS.addresses.insert(),
                     [{"id": i, "user_id": i, "email": f"u{i}@example.com"} for i in range(1, users + 1)])


def make_engine(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Engine:
    if kind == "sqlite":
        return create_engine(f"sqlite:///{tmp_path / 'kqc.sqlite'}", connect_args={"timeout": 10})
    url = request.getfixturevalue("postgres_url")
    engine = create_engine(url, pool_size=4, max_overflow=4)
    with engine.begin() as conn:  # a previous test's leftovers must not block DROP for long
        conn.execute(text("SELECT 1"))
    return engine


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A seeded engine, on SQLite and on the tooling's PostgreSQL."""
    eng = make_engine(request.param, tmp_path, request)
    seed(eng)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def cache() -> CacheManager:
    return CacheManager(max_bytes=32 * 1024 * 1024, name="sqlalchemy-test")


@pytest.fixture
def qc(cache: CacheManager) -> Iterator[QueryCache]:
    query_cache = QueryCache(cache)
    try:
        yield query_cache
    finally:
        query_cache.close()
