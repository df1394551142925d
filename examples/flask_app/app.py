"""A small but real Flask app wired with every kotoba-memory integration.

* ``KotobaMemory`` (per-request memory metrics by ``url_rule``, the optimizer, the protected report
  endpoint at ``/_kotoba/report``);
* SQLAlchemy (SQLite by default) with kotoba-memory's ``QueryCache`` on the engine;
* Flask-Caching with kotoba-memory's ``KotobaCache`` backend (``@cache.cached`` views);
* ``@cached`` from ``kotoba_memory_integrations.hooks`` on a plain function, in a ``CacheManager``;
* OpenTelemetry metrics exported in Prometheus format at ``/metrics``;
* ``/leak``, which leaks memory on purpose, only when ``KOTOBA_EXAMPLE_LEAK=1``.

Run: ``gunicorn -c gunicorn.conf.py 'app:create_app()'`` from this directory (see README.md). The schema
is created and seeded once, before any worker starts: by gunicorn's ``on_starting`` hook in
``gunicorn.conf.py``, or by ``flask --app app init-db`` for other servers; workers never race on it.
Environment: ``KOTOBA_EXAMPLE_DB`` (SQLAlchemy URL, default SQLite in ``KOTOBA_EXAMPLE_DATA_DIR``),
``KOTOBA_EXAMPLE_REPORT_TOKEN`` (enables the report endpoint), ``KOTOBA_EXAMPLE_LEAK``,
``KOTOBA_EXAMPLE_REPORT_DIR`` (where HTML reports go), ``KOTOBA_EXAMPLE_GC=0`` (GC optimizer off, for
``benchmarks/gc_servers.py``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify
from flask_caching import Cache
from sqlalchemy import ForeignKey, String, create_engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, scoped_session, sessionmaker

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.flask import KotobaMemory
from kotoba_memory_integrations.hooks import cached
from kotoba_memory_integrations.sqlalchemy import QueryCache

# Module level on purpose: what /leak appends here is never freed (the leak the report must find).
_LEAKED: list[bytes] = []


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    year: Mapped[int]
    author_id: Mapped[int] = mapped_column(ForeignKey("author.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def _seed(session: Any) -> None:
    if session.scalar(select(func.count()).select_from(Book)):
        return
    authors = [Author(id=i, name=f"Author {i}") for i in range(1, 11)]
    books = [Book(id=i, title=f"Book {i}", year=1950 + i % 70, author_id=1 + i % 10) for i in range(1, 201)]
    session.add_all(authors + books)
    try:
        session.commit()
    except IntegrityError:  # seeded by another ``init-db`` run meanwhile
        session.rollback()


def database_url() -> str:
    """The SQLAlchemy URL: ``KOTOBA_EXAMPLE_DB``, else SQLite in ``KOTOBA_EXAMPLE_DATA_DIR``."""
    data_dir = Path(os.environ.get("KOTOBA_EXAMPLE_DATA_DIR") or tempfile.gettempdir())
    return os.environ.get("KOTOBA_EXAMPLE_DB") or f"sqlite:///{data_dir / 'kotoba-flask.sqlite3'}"


def init_db(url: str | None = None) -> None:
    """Create the schema and seed it: run once before the workers start (never in each worker, where
    concurrent ``create_all`` calls race: "table author already exists")."""
    engine = create_engine(url or database_url())
    try:
        Base.metadata.create_all(engine)
        with sessionmaker(engine)() as session:
            _seed(session)
    finally:
        engine.dispose()


def checksum_chain(rounds: int) -> str:
    """Deliberately costly: hash a value ``rounds`` times (create_app memoises it with ``@cached``)."""
    digest = b"kotoba"
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


_metrics_view: Any = None


def _prometheus_metrics() -> Any:
    """Install the OpenTelemetry Prometheus exporter (once per process); returns the /metrics view."""
    global _metrics_view
    if _metrics_view is not None:
        return _metrics_view
    from opentelemetry import metrics
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    from kotoba_memory_integrations import otel

    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    metrics.set_meter_provider(provider)
    otel.instrument(provider)

    def view() -> Response:
        return Response(generate_latest(REGISTRY), mimetype=CONTENT_TYPE_LATEST)

    _metrics_view = view
    return view


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the example app; ``config`` overrides ``app.config`` keys (tests use it)."""
    app = Flask(__name__)
    env = os.environ.get
    data_dir = Path(os.environ.get("KOTOBA_EXAMPLE_DATA_DIR") or tempfile.gettempdir())
    report_dir = os.environ.get("KOTOBA_EXAMPLE_REPORT_DIR") or str(data_dir / "kotoba-reports")
    app.config.update(
        DATABASE_URL=database_url(),
        CACHE_TYPE="kotoba_memory_integrations.flask.KotobaCache",
        CACHE_DEFAULT_TIMEOUT=30,
        CACHE_THRESHOLD=2000,
        KOTOBA_MEMORY_ENABLE_CACHING=True,
        KOTOBA_MEMORY_CACHE_SIZE_MB=16,
        KOTOBA_MEMORY_ENABLE_PROFILING=True,
        KOTOBA_MEMORY_ENABLE_LEAK_DETECTION=True,
        KOTOBA_MEMORY_ENABLE_GC_OPTIMIZATION=env("KOTOBA_EXAMPLE_GC", "1") == "1",
        KOTOBA_MEMORY_REPORT_DIR=report_dir,
        # Leak detection opens a short tracemalloc window every this many seconds (the demo shortens it).
        KOTOBA_MEMORY_LEAK_WINDOW_INTERVAL_S=float(env("KOTOBA_EXAMPLE_LEAK_WINDOW_INTERVAL_S", "60")),
        KOTOBA_MEMORY_MONITORING_INTERVAL_MS=int(env("KOTOBA_EXAMPLE_MONITORING_INTERVAL_MS", "1000")),
        # RSS measured on one request in N on average (default 8; 1: every request).
        KOTOBA_MEMORY_RSS_SAMPLE_EVERY=int(env("KOTOBA_EXAMPLE_RSS_SAMPLE_EVERY", "8")),
        EXAMPLE_LEAK=os.environ.get("KOTOBA_EXAMPLE_LEAK") == "1",
        EXAMPLE_METRICS=os.environ.get("KOTOBA_EXAMPLE_METRICS", "1") == "1",
    )
    budget = os.environ.get("KOTOBA_EXAMPLE_LEAK_TRACE_BUDGET")
    if budget:
        # Windows go further apart while they cost more than this share of CPU (unset: the library's
        # default; "none": a fixed schedule, as the demo's diagnosis duty cycle needs).
        app.config["KOTOBA_MEMORY_LEAK_TRACE_BUDGET"] = None if budget.lower() == "none" else float(budget)
    token = os.environ.get("KOTOBA_EXAMPLE_REPORT_TOKEN")
    if token:
        app.config.update(KOTOBA_MEMORY_REPORT_ENDPOINT="/_kotoba/report", KOTOBA_MEMORY_REPORT_TOKEN=token)
    app.config.update(config or {})

    engine = create_engine(app.config["DATABASE_URL"])
    query_store = CacheManager(max_bytes=8 << 20, name="example-flask-queries")
    query_cache = QueryCache(query_store, name="example-flask")
    query_cache.attach(engine)
    Session = scoped_session(sessionmaker(engine))

    @app.cli.command("init-db")
    def init_db_command() -> None:
        """Create and seed the example's database (gunicorn.conf.py does it in on_starting)."""
        init_db(app.config["DATABASE_URL"])

    cache = Cache(app)
    KotobaMemory(app)
    # Memoise through the optimizer's own cache (KOTOBA_MEMORY_CACHE_SIZE_MB; built on this first use):
    # the report lists it as used by "@cached app.checksum_chain", with its hit rate.
    optimizer = KotobaMemory.optimizer(app)
    compute_cache = getattr(optimizer, "cache", None)
    if compute_cache is None:
        compute_cache = CacheManager(max_bytes=4 << 20, name="example-compute")
    memoised_checksum = cached(compute_cache, ttl=300)(checksum_chain)
    if app.config["EXAMPLE_METRICS"]:
        app.add_url_rule("/metrics", "metrics", _prometheus_metrics())

    @app.teardown_appcontext
    def remove_session(exc: BaseException | None) -> None:
        Session.remove()

    @app.get("/")
    def index() -> Response:
        return jsonify(status="ok", leak_enabled=app.config["EXAMPLE_LEAK"])

    @app.get("/books")
    def books() -> Response:
        query = select(Book).order_by(Book.id).limit(50).options(query_cache.cached(ttl=60))
        rows = Session.scalars(query).all()
        return jsonify([{"id": b.id, "title": b.title, "year": b.year} for b in rows])

    @app.get("/books/<int:book_id>")
    def book(book_id: int) -> Response:
        query = select(Book).where(Book.id == book_id).options(query_cache.cached(ttl=60))
        row = Session.scalars(query).first()
        if row is None:
            abort(404)
        return jsonify(id=row.id, title=row.title, year=row.year, author=row.author.name)

    @app.post("/books/<int:book_id>/bump")
    def bump(book_id: int) -> Response:
        row = Session.get(Book, book_id)
        if row is None:
            abort(404)
        row.year += 1
        Session.commit()  # the query cache drops the book table's cached results here
        return jsonify(id=row.id, year=row.year)

    @app.get("/stats")
    @cache.cached(timeout=10)
    def stats() -> Response:
        per_decade = Session.execute(
            select((Book.year // 10 * 10).label("decade"), func.count()).group_by("decade").order_by("decade")
        ).all()
        return jsonify({str(decade): count for decade, count in per_decade})

    @app.get("/checksum/<int:rounds>")
    def checksum(rounds: int) -> Response:
        if not 1 <= rounds <= 100_000:
            abort(400)
        return jsonify(rounds=rounds, checksum=memoised_checksum(rounds))

    @app.get("/leak")
    def leak() -> Response:
        if not app.config["EXAMPLE_LEAK"]:
            abort(404)
        _LEAKED.append(os.urandom(32) * 256)  # 8 KiB per request, kept forever
        return jsonify(leaked_chunks=len(_LEAKED))

    return app
