"""The pool benchmarks' code runs on tiny generated input (no timing assertions)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_pool_alloc_runs() -> None:
    bench = _load("pool_alloc")
    result = bench.run([64, 65536], rounds=2, ops=40)
    assert set(result) == {"64", "65536"}
    pools = ["py pool"] + (["c pool", "c pool+memoryview"] if bench.CMemoryPool is not None else [])
    for row in result.values():
        assert all(row[f"{name} ns"] > 0 for name in pools) and row["bytearray(n) ns"] > 0
        assert row["bytearray(n) speedup"] == 1.0
    table = bench.markdown(result)
    assert "| 64 KiB |" in table and all(f"{name} vs bytearray" in table for name in pools)


def test_pool_fragmentation_runs_on_generated_sizes() -> None:
    bench = _load("pool_fragmentation")
    rng = random.Random(5)
    sizes = [int(rng.lognormvariate(7.7, 1.3)) + 1 for _ in range(500)]
    rows = [
        bench.churn(sizes, capacity=4 << 20, occupancy=0.5, operations=1500, per_octave=k, samples=5)
        for k in (16, 1)
    ]
    fine, pow2 = rows
    assert fine["internal_median"] < pow2["internal_median"]
    assert 0.0 <= fine["external_end"] <= 1.0 and fine["metadata_ratio"] > 0
    assert "power of two" in bench.markdown(rows)


def test_fragmentation_benchmark_reports_missing_traces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load("pool_fragmentation")
    assert bench.main(["--traces", str(tmp_path), "--quick"]) == 2
    assert "absent" in capsys.readouterr().err
