"""Smoke test: benchmarks/cache_tiers.py replays a tiny generated trace end to end (no timing asserted)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cache_tiers.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cache_tiers_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_on_a_generated_trace(tmp_path: Path) -> None:
    rng = random.Random(11)
    sizes = {k: rng.choice([300, 2_000, 9_000, 40_000]) for k in range(120)}
    keys = [min(int(rng.paretovariate(1.2)) - 1, 119) for _ in range(400)]
    with gzip.open(tmp_path / "adaptsize-request.sized.gz", "wt") as fh:
        for key in keys:
            fh.write(f"{key} {sizes[key]}\n")
    out = tmp_path / "result.json"
    bench = _load()
    code = bench.main(
        ["--traces", str(tmp_path), "--requests", "400", "--repeats", "1", "--compression-sample", "20",
         "--json", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert any(name.startswith("tiered") for name in summary)
    assert any(name.startswith("DiskCache") for name in summary)
    # The unbounded shelf misses only first references: the ceiling for every bounded contender.
    ceiling = 1 - len(set(keys)) / len(keys)
    shelf = next(v for k, v in summary.items() if k.startswith("shelve"))
    assert abs(shelf["hit_rate"] - ceiling) < 1e-9
    for stats in summary.values():
        assert 0 <= stats["hit_rate"] <= ceiling + 1e-9
    tiered = next(v for k, v in summary.items() if k.startswith("tiered"))
    assert tiered["compression_ratio"] > 1
    assert {row["codec"] for row in result["compression"]} >= {"zlib"}


def test_missing_trace_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _load().main(["--traces", str(tmp_path), "--quick"]) == 2
    assert "not found" in capsys.readouterr().err
