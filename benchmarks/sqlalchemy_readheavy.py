#!/usr/bin/env python
"""Read-heavy ORM workload on PostgreSQL: no cache vs kotoba's QueryCache vs the dogpile-example approach.

Each operation is one web-request-sized unit: a fresh ``Session``, one ORM query (article page with its
author, latest comments, an author's article list, a comment count) or, for ``--write-ratio`` of them, a
write and a commit. Two scenarios: ``separate`` - the writes go to a table the reads do not touch (readers
subscribing to authors), the case table-level invalidation is made for; ``same`` - the writes hit the read
tables themselves (new comments, article edits), its worst case. Which article each operation touches
follows a real web cache trace (``cache2k-web07`` from ``../shared/traces``; a Zipf draw when the traces
are absent) or, with ``--keys zipf``, YCSB's Zipf(0.99) popularity.

After an untimed warm-up, the contenders run the same operations, interleaved in rounds (order rotated
each round); we report the median operations/s over rounds, the median of the per-round ratios to "no
cache", pooled p50/p99 latency, hit rates after the warm-up, and the stale reads counted in a separate,
untimed verification pass that compares every cached read with a read from the database.

Usage: .venv/bin/python benchmarks/sqlalchemy_readheavy.py [--quick] [--url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, ForeignKey, Index, String, Text, create_engine, func, insert, select, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = REPO.parent / "shared" / "traces"
TRACE_FILE = "cache2k-web07.keys.gz"


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "bench_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    bio: Mapped[str] = mapped_column(Text)


class Article(Base):
    __tablename__ = "bench_articles"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_authors.id"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    published: Mapped[datetime]
    author: Mapped[Author] = relationship()


class Comment(Base):
    __tablename__ = "bench_comments"
    id: Mapped[int] = mapped_column(primary_key=True)
    article_id: Mapped[int] = mapped_column(ForeignKey("bench_articles.id"))
    author_name: Mapped[str] = mapped_column(String(80))
    body: Mapped[str] = mapped_column(Text)
    created: Mapped[datetime]
    __table_args__ = (Index("bench_comments_article_created", "article_id", "created"),)


class Subscription(Base):
    __tablename__ = "bench_subscriptions"
    id: Mapped[int] = mapped_column(primary_key=True)
    reader: Mapped[str] = mapped_column(String(80))
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_authors.id"))
    created: Mapped[datetime]


# --- workload ------------------------------------------------------------------------------------------

READS = ("article_page", "latest_comments", "author_articles", "comment_count")
READ_WEIGHTS = (40, 30, 20, 10)


@dataclass(frozen=True, slots=True)
class Op:
    kind: str
    article: int


def zipf_ids(n_articles: int, count: int, seed: int, exponent: float = 0.99) -> list[int]:
    """YCSB-style Zipfian popularity (exponent 0.99) over the articles, hottest ids scattered."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** exponent for rank in range(n_articles)]
    order = list(range(1, n_articles + 1))
    rng.shuffle(order)
    return rng.choices(order, weights=weights, k=count)


def article_ids_from_trace(traces: Path, n_articles: int, count: int, seed: int) -> tuple[list[int], str]:
    """Article ids in access order: the trace's keys ranked by first appearance, folded onto the articles."""
    path = traces / TRACE_FILE
    if not path.exists():
        return (zipf_ids(n_articles, count, seed),
                f"Zipf(0.99) over {n_articles} articles (traces absent: {path} not found)")
    ranks: dict[str, int] = {}
    ids = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            key = line.strip()
            if not key:
                continue
            rank = ranks.setdefault(key, len(ranks))
            ids.append(rank % n_articles + 1)
            if len(ids) >= count:
                break
    return ids, f"{TRACE_FILE} ({len(ranks)} distinct keys folded onto {n_articles} articles)"


def make_ops(article_ids: list[int], write_ratio: float, seed: int, scenario: str) -> list[Op]:
    rng = random.Random(seed)
    ops = []
    for article in article_ids:
        if rng.random() < write_ratio:
            if scenario == "separate":
                ops.append(Op("subscribe", article))
            else:
                ops.append(Op("new_comment" if rng.random() < 0.6 else "edit_article", article))
        else:
            ops.append(Op(rng.choices(READS, READ_WEIGHTS)[0], article))
    return ops


def read_statement(kind: str, article: int, n_authors: int) -> Any:
    if kind == "article_page":
        return select(Article).options(joinedload(Article.author)).where(Article.id == article)
    if kind == "latest_comments":
        return (select(Comment).where(Comment.article_id == article)
                .order_by(Comment.created.desc(), Comment.id.desc()).limit(20))
    if kind == "author_articles":
        return (select(Article.id, Article.title).where(Article.author_id == article % n_authors + 1)
                .order_by(Article.published.desc(), Article.id.desc()).limit(10))
    return select(func.count(Comment.id)).where(Comment.article_id == article)


def normalize(kind: str, result: Any) -> Any:
    """A plain value for comparing a cached read with the database."""
    if kind == "article_page":
        a = result.scalars().unique().one()
        return (a.id, a.title, a.body[:32], a.author.name)
    if kind == "latest_comments":
        return [(c.id, c.body) for c in result.scalars()]
    if kind == "author_articles":
        return [tuple(r) for r in result]
    return result.scalar_one()


def truth(engine: Engine, kind: str, article: int, n_authors: int) -> Any:
    with Session(engine) as session:
        return normalize(kind, session.execute(read_statement(kind, article, n_authors)))


def do_write(session: Session, op: Op, serial: int) -> None:
    now = datetime(2026, 1, 1) + timedelta(seconds=serial)
    if op.kind == "new_comment":
        session.add(Comment(article_id=op.article, author_name=f"reader{serial % 97}",
                            body=f"comment {serial} " * 8, created=now))
    elif op.kind == "subscribe":
        session.add(Subscription(reader=f"reader{serial % 997}", author_id=op.article % 50 + 1, created=now))
    else:
        session.execute(update(Article).where(Article.id == op.article)
                        .values(title=f"Article {op.article} (edit {serial})"))
    session.commit()


def seed_database(engine: Engine, n_authors: int, n_articles: int, comments_per_article: int,
                  seed: int) -> None:
    rng = random.Random(seed)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    start = datetime(2025, 1, 1)
    with engine.begin() as conn:
        conn.execute(insert(Author), [{"id": i, "name": f"author {i}", "bio": "bio " * 50}
                                      for i in range(1, n_authors + 1)])
        for lo in range(1, n_articles + 1, 2000):
            conn.execute(insert(Article), [
                {"id": i, "author_id": rng.randint(1, n_authors), "title": f"Article {i}",
                 "body": f"body of article {i} " * 60, "published": start + timedelta(minutes=i)}
                for i in range(lo, min(lo + 2000, n_articles + 1))
            ])
        serial = 0
        batch: list[dict[str, Any]] = []
        for article in range(1, n_articles + 1):
            for _ in range(rng.randint(0, 2 * comments_per_article)):
                serial += 1
                batch.append({"article_id": article, "author_name": f"reader{serial % 97}",
                              "body": f"comment {serial} " * 8, "created": start + timedelta(seconds=serial)})
            if len(batch) >= 5000:
                conn.execute(insert(Comment), batch)
                batch = []
        if batch:
            conn.execute(insert(Comment), batch)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")


# --- contenders ----------------------------------------------------------------------------------------


class Contender:
    """One way of running the reads: ``option()`` is added to each read statement."""

    name = "base"

    def attach(self, engine: Engine) -> None:  # pragma: no cover - overridden
        pass

    def detach(self, engine: Engine) -> None:
        pass

    def option(self) -> Any:
        return None

    def hit_rate(self) -> float | None:
        return None

    def reset_counts(self) -> None:
        """Start counting hits from here (after the warm-up)."""


class NoCache(Contender):
    name = "no cache"


class KotobaCache(Contender):
    """kotoba-memory's QueryCache over an in-process CacheManager."""

    name = "kotoba QueryCache"

    def __init__(self, max_bytes: int) -> None:
        from kotoba_memory.cache_manager import CacheManager
        from kotoba_memory_integrations.sqlalchemy import QueryCache

        self.qc = QueryCache(CacheManager(max_bytes=max_bytes, name="bench-sqlalchemy"))
        self._option = self.qc.cached(ttl=3600)
        self._base = (0, 0)

    def attach(self, engine: Engine) -> None:
        self.qc.attach(engine)

    def detach(self, engine: Engine) -> None:
        self.qc.detach(engine)

    def option(self) -> Any:
        return self._option

    def hit_rate(self) -> float | None:
        stats = self.qc.stats()
        hits, lookups = stats.hits - self._base[0], stats.lookups - self._base[1]
        return hits / lookups if lookups else None

    def reset_counts(self) -> None:
        stats = self.qc.stats()
        self._base = (stats.hits, stats.lookups)


class DogpileExample(Contender):
    """The approach of SQLAlchemy's dogpile_caching example: do_orm_execute + FrozenResult +
    merge_frozen_result over a dogpile.cache memory region, keyed by the offline cache-key string.
    It has no invalidation: writes are not seen until the entry expires."""

    name = "dogpile example"

    def __init__(self) -> None:
        from dogpile.cache import make_region
        from sqlalchemy.orm.interfaces import UserDefinedOption

        class FromCache(UserDefinedOption):
            propagate_to_loaders = False

        self._option_cls = FromCache
        self._option = FromCache()
        self.region = make_region().configure("dogpile.cache.memory", expiration_time=3600)
        self._statement_cache: dict[Any, str] = {}
        self.lookups = self.loads = 0
        self._listener: Callable[..., Any] | None = None

    def _on_execute(self, orm_context: Any) -> Any:
        from sqlalchemy.orm import loading

        if not any(isinstance(o, self._option_cls) for o in orm_context.user_defined_options):
            return None
        cache_key = orm_context.statement._generate_cache_key()
        key = cache_key.to_offline_string(self._statement_cache, orm_context.statement,
                                          orm_context.parameters or {})
        self.lookups += 1

        def create() -> Any:
            self.loads += 1
            return orm_context.invoke_statement().freeze()

        frozen = self.region.get_or_create(key, create)
        return loading.merge_frozen_result(orm_context.session, orm_context.statement, frozen, load=False)()

    def attach(self, engine: Engine) -> None:
        from sqlalchemy import event

        self._listener = self._on_execute
        event.listen(Session, "do_orm_execute", self._listener, retval=True)

    def detach(self, engine: Engine) -> None:
        from sqlalchemy import event

        if self._listener is not None:
            event.remove(Session, "do_orm_execute", self._listener)
            self._listener = None

    def option(self) -> Any:
        return self._option

    def hit_rate(self) -> float | None:
        return (self.lookups - self.loads) / self.lookups if self.lookups else None

    def reset_counts(self) -> None:
        self.lookups = self.loads = 0


# --- running -------------------------------------------------------------------------------------------


@dataclass
class Tally:
    queries_per_s: list[float] = field(default_factory=list)
    latencies_ns: list[int] = field(default_factory=list)
    stale: int = 0
    verified: int = 0


def run_ops(engine: Engine, contender: Contender, ops: list[Op], n_authors: int, serial_base: int,
            tally: Tally, verify: bool) -> None:
    option = contender.option()
    perf = time.perf_counter_ns
    started = perf()
    for i, op in enumerate(ops):
        t0 = perf()
        with Session(engine) as session:
            if op.kind in READS:
                stmt = read_statement(op.kind, op.article, n_authors)
                if option is not None:
                    stmt = stmt.options(option)
                value = normalize(op.kind, session.execute(stmt))
            else:
                do_write(session, op, serial_base + i)
                value = None
        if not verify:
            tally.latencies_ns.append(perf() - t0)
        elif value is not None:
            tally.verified += 1
            if value != truth(engine, op.kind, op.article, n_authors):
                tally.stale += 1
    if not verify:
        tally.queries_per_s.append(len(ops) / ((perf() - started) / 1e9))


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    sys.path.insert(0, str(REPO / "tools"))
    import local_services

    with local_services.postgres_server("kotoba_bench") as started:
        yield started


def run_scenario(url: str, scenario: str, args: argparse.Namespace, sizes: tuple[int, int, int],
                 ops_per_round: int, rounds: int) -> dict[str, Any]:
    """Seed, run the contenders interleaved, verify; returns the summary rows of one scenario."""
    n_authors, n_articles, per_article = sizes
    engine = create_engine(url, pool_size=4)
    print(f"[{scenario}] seeding {n_articles} articles on {engine.dialect.name} ...", flush=True)
    seed_database(engine, n_authors, n_articles, per_article, args.seed)
    verify_ops = 400
    warmup = args.warmup if args.warmup is not None else ops_per_round
    count = warmup + ops_per_round * rounds + verify_ops
    if args.keys == "zipf":
        ids, source = zipf_ids(n_articles, count, args.seed), f"Zipf(0.99) over {n_articles} articles (YCSB)"
    else:
        ids, source = article_ids_from_trace(args.traces, n_articles, count, args.seed)
    ops = make_ops(ids, args.write_ratio, args.seed, scenario)
    print(f"[{scenario}] key stream: {source}", flush=True)
    contenders: list[Contender] = [NoCache(), KotobaCache(64 * 1024 * 1024), DogpileExample()]
    tallies = {c.name: Tally() for c in contenders}
    serial = 10_000_000
    # Every contender stays attached for the whole scenario, as in production: our QueryCache must see
    # the writes made during the other contenders' turns. A contender's reads use its cache only in its
    # own turn (its statement option); the others' listeners just return (a few microseconds per query).
    for contender in contenders:
        contender.attach(engine)
    try:
        for contender in contenders:  # untimed: caches and PostgreSQL's buffers reach a steady state
            run_ops(engine, contender, ops[:warmup], n_authors, serial, Tally(), verify=False)
            contender.reset_counts()
            serial += warmup
        ops = ops[warmup:]
        for r in range(rounds):
            chunk = ops[r * ops_per_round:(r + 1) * ops_per_round]
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for contender in order:
                run_ops(engine, contender, chunk, n_authors, serial, tallies[contender.name], verify=False)
                serial += len(chunk)
        hit_rates = {c.name: c.hit_rate() for c in contenders}
        verify_chunk = ops[rounds * ops_per_round:]
        for contender in contenders[1:]:
            run_ops(engine, contender, verify_chunk, n_authors, serial, tallies[contender.name], verify=True)
            serial += len(verify_chunk)
    finally:
        for contender in contenders:
            contender.detach(engine)
        engine.dispose()
    rows = []
    for contender in contenders:
        tally = tallies[contender.name]
        qps = statistics.median(tally.queries_per_s)
        hit = hit_rates[contender.name]
        # each round ran the contenders back to back: the per-round ratio cancels the machine's drift
        per_round = [q / b for q, b in zip(tally.queries_per_s, tallies["no cache"].queries_per_s)]
        rows.append({
            "contender": contender.name, "ops_per_s_median": round(qps, 1),
            "speedup": round(statistics.median(per_round), 2),
            "speedup_per_round": [round(x, 2) for x in per_round],
            "p50_ms": round(percentile(tally.latencies_ns, 0.50), 3),
            "p99_ms": round(percentile(tally.latencies_ns, 0.99), 3),
            "hit_rate": None if hit is None else round(hit, 3),
            "stale_reads": None if contender.name == "no cache" else tally.stale,
            "verified_reads": None if contender.name == "no cache" else tally.verified,
        })
    return {"scenario": scenario, "source": source, "warmup": warmup, "rows": rows}


def run_ceiling(url: str, args: argparse.Namespace, sizes: tuple[int, int, int], repeats: int,
                rounds: int) -> list[dict[str, Any]]:
    """Every read repeated on one article: 100% hits after the first, the best any cache can do here."""
    n_authors, n_articles, per_article = sizes
    engine = create_engine(url, pool_size=4)
    print(f"[ceiling] seeding {n_articles} articles on {engine.dialect.name} ...", flush=True)
    seed_database(engine, n_authors, n_articles, per_article, args.seed)
    contenders: list[Contender] = [NoCache(), KotobaCache(64 * 1024 * 1024), DogpileExample()]
    rows = []
    for contender in contenders:
        contender.attach(engine)
    try:
        for kind in READS:
            ops = [Op(kind, min(42, n_articles))] * repeats
            tallies = {c.name: Tally() for c in contenders}
            for r in range(rounds):
                order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
                for contender in order:
                    run_ops(engine, contender, ops, n_authors, 0, tallies[contender.name], verify=False)
            base = tallies["no cache"].queries_per_s
            for contender in contenders:
                tally = tallies[contender.name]
                rows.append({
                    "query": kind, "contender": contender.name,
                    "ops_per_s_median": round(statistics.median(tally.queries_per_s), 1),
                    "speedup": round(statistics.median(q / b for q, b in zip(tally.queries_per_s, base)), 2),
                    "p50_ms": round(percentile(tally.latencies_ns, 0.50), 3),
                })
    finally:
        for contender in contenders:
            contender.detach(engine)
        engine.dispose()
    return rows


def print_table(result: dict[str, Any], rounds: int, ops_per_round: int, write_ratio: float) -> None:
    print(f"\nscenario {result['scenario']}: {rounds} rounds x {ops_per_round} operations per contender "
          f"after {result['warmup']} untimed warm-up operations, write ratio {write_ratio:.0%}; "
          f"keys: {result['source']}\n")
    print("| contender | ops/s (median) | vs no cache (median of rounds) | p50 ms | p99 ms | hit rate "
          "| stale reads / verified |")
    print("|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        hit = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.1%}"
        stale = "-" if row["stale_reads"] is None else f"{row['stale_reads']} / {row['verified_reads']}"
        print(f"| {row['contender']} | {row['ops_per_s_median']:.0f} | {row['speedup']:.2f}x | "
              f"{row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {hit} | {stale} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="PostgreSQL SQLAlchemy URL (default: start a throwaway server)")
    parser.add_argument("--quick", action="store_true", help="small data and few operations (smoke run)")
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES, help="directory of the cache traces")
    parser.add_argument("--scenario", choices=["separate", "same", "both"], default="both")
    parser.add_argument("--keys", choices=["trace", "zipf"], default="trace",
                        help="article popularity: the web trace (default) or YCSB's Zipf(0.99)")
    parser.add_argument("--ops", type=int, help="operations per contender per round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--ceiling", action="store_true",
                        help="instead: each read repeated on one article (the all-hits ceiling)")
    parser.add_argument("--warmup", type=int, help="untimed operations per contender before the rounds")
    parser.add_argument("--write-ratio", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    # a plain kill must still stop the throwaway PostgreSQL (context managers run on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = (50, 1000, 3) if args.quick else (500, 10_000, 5)
    ops_per_round = args.ops or (300 if args.quick else 200)
    rounds = args.rounds or (2 if args.quick else 36)
    if not 0 <= args.write_ratio < 1:
        parser.error("--write-ratio must be in [0, 1)")
    if args.ceiling:
        with database(args.url) as url:
            ceiling = run_ceiling(url, args, sizes, repeats=50 if args.quick else 200, rounds=rounds)
        print("\nceiling: one article read over and over (all hits after the first), "
              f"{rounds} interleaved rounds\n")
        print("| query | contender | ops/s (median) | vs no cache (median of rounds) | p50 ms |")
        print("|---|---|---|---|---|")
        for row in ceiling:
            print(f"| {row['query']} | {row['contender']} | {row['ops_per_s_median']:.0f} | "
                  f"{row['speedup']:.2f}x | {row['p50_ms']:.3f} |")
        if args.json:
            args.json.write_text(json.dumps(ceiling, indent=2))
        return 0
    scenarios = ["separate", "same"] if args.scenario == "both" else [args.scenario]
    results = []
    with database(args.url) as url:
        for scenario in scenarios:
            results.append(run_scenario(url, scenario, args, sizes, ops_per_round, rounds))
    for result in results:
        print_table(result, rounds, ops_per_round, args.write_ratio)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
