"""The cache benchmarks run end to end on tiny generated traces (no timing assertions)."""

from __future__ import annotations

import gzip
import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def traces(tmp_path: Path) -> Path:
    rng = random.Random(9)
    for name in ("lirs-multi1", "lirs-loop"):
        keys = [int(rng.paretovariate(0.8)) % 5000 for _ in range(3000)]
        with gzip.open(tmp_path / f"{name}.keys.gz", "wt") as fh:
            fh.write("\n".join(map(str, keys)) + "\n")
    with gzip.open(tmp_path / "cdn.sized.gz", "wt") as fh:
        for _ in range(2000):
            k = int(rng.paretovariate(1.1)) % 500
            fh.write(f"{k} {100 + (k * 37) % 5000}\n")
    return tmp_path


def test_opt_is_an_upper_bound_and_arc_is_sane() -> None:
    hr = load("cache_hit_rate")
    rng = random.Random(1)
    keys = [int(rng.paretovariate(1.1)) % 400 for _ in range(4000)]
    lru = hr.contenders()["cachetools LRU"](keys, 50)
    opt = hr.opt_hits(keys, 50)
    arc = hr.contenders()["ARC"](keys, 50)
    ours = hr.contenders()["ours adaptive"](keys, 50)
    assert opt >= max(lru, arc, ours)
    assert hr.opt_hits([1, 2, 3, 1, 2, 3], 2) == 2  # Belady keeps 1, bypasses... exactly 2 hits
    assert hr.opt_hits(list(range(10)) * 3, 100) == 20


def test_hit_rate_benchmark_runs_on_generated_traces(
    traces: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hr = load("cache_hit_rate")
    assert hr.main(["--quick", "--traces", str(traces)]) == 0
    out = capsys.readouterr().out
    assert "| lirs-multi1 | 500 |" in out
    assert "estimated at 2x" in out
    assert "byte hit rate" in out


def test_hit_rate_benchmark_says_when_traces_are_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hr = load("cache_hit_rate")
    assert hr.main(["--traces", str(tmp_path / "none")]) == 0
    assert "No traces found" in capsys.readouterr().err


def test_generated_traces_have_the_short_term_recency_they_are_for() -> None:
    gen = load("_generated_traces")
    traces = gen.generated_traces(limit=4000)
    assert set(traces) == {"gen-recency", "gen-recency-deep", "gen-phased"}
    assert all(len(keys) == 4000 for keys in traces.values())
    assert gen.generated_traces(limit=4000) == traces  # fixed seeds: the same trace every run
    keys = traces["gen-recency"]
    recent = sum(1 for i, k in enumerate(keys) if k in keys[max(0, i - 50):i])
    assert recent > 0.4 * len(keys)  # most repeats come back within the last 50 requests


def test_latency_benchmark_code_runs() -> None:
    lat = load("cache_latency")
    result = lat.measure(rounds=1, entries=50, loops=1)
    impls = lat.implementations()
    assert impls[-1] == "python"
    ours = {f"ours {p} ({i})" for p in ("lru", "lfu", "fifo", "adaptive") for i in impls}
    assert {"dict", "functools.lru_cache", "theine", *ours} <= set(result)
    assert result["ours lru (python)"]["get-hit"] > 0
    meta = lat.metadata_overhead(200)
    assert {row["policy"] for row in meta} == {
        f"{p} ({i})" for p in ("lru", "lfu", "fifo", "adaptive") for i in impls
    }
