"""The read-heavy benchmark's code runs end to end on tiny generated data (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import create_engine

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "sqlalchemy_readheavy.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kqc_sqlalchemy_readheavy", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scenario", ["separate", "same"])
def test_benchmark_workload_runs_and_our_cache_is_never_stale(bench: ModuleType, tmp_path: Path,
                                                              scenario: str) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'bench.sqlite'}")
    bench.seed_database(engine, 5, 40, 2, seed=1)
    ids, source = bench.article_ids_from_trace(tmp_path / "no-traces", 40, 160, seed=1)
    assert "traces absent" in source and len(ids) == 160
    ops = bench.make_ops(ids, 0.1, seed=1, scenario=scenario)
    assert any(op.kind not in bench.READS for op in ops)
    ours = bench.KotobaCache(8 * 1024 * 1024)
    peer = bench.DogpileExample()
    tallies = {}
    for contender in (bench.NoCache(), ours, peer):
        tally = bench.Tally()
        contender.attach(engine)
        try:
            bench.run_ops(engine, contender, ops[:80], 5, 1000, tally, verify=False)
            bench.run_ops(engine, contender, ops[80:], 5, 5000, tally, verify=True)
        finally:
            contender.detach(engine)
        tallies[contender.name] = tally
        assert len(tally.latencies_ns) == 80 and tally.verified > 0
    assert tallies[ours.name].stale == 0
    assert ours.hit_rate() is not None and ours.hit_rate() > 0
    assert peer.hit_rate() is not None and peer.hit_rate() > 0
    if scenario == "same":  # the peer has no invalidation: writes to what it cached make it stale
        assert tallies[peer.name].stale > 0
    engine.dispose()


def test_benchmark_ceiling_mode_runs(bench: ModuleType, tmp_path: Path) -> None:
    import argparse

    url = f"sqlite:///{tmp_path / 'ceiling.sqlite'}"
    rows = bench.run_ceiling(url, argparse.Namespace(seed=1), (5, 40, 2), repeats=5, rounds=1)
    assert {row["query"] for row in rows} == set(bench.READS)
    assert {row["contender"] for row in rows} == {"no cache", "kotoba QueryCache", "dogpile example"}
    assert all(row["ops_per_s_median"] > 0 for row in rows)
