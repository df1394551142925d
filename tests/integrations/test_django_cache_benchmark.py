"""Smoke test: the Django backend benchmark's code runs on tiny generated input (no timing asserted)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("django")

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "framework_cache_backends.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kotoba_framework_cache_backends_bench", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_contenders_replay_a_generated_trace(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    rng = random.Random(7)
    keys = [int(rng.paretovariate(1.2)) for _ in range(3000)]
    weight = bench._entry_weight()
    rates = {}
    for name, factory in bench.contenders(50, weight).items():
        cache = factory()
        rates[name] = bench.replay(cache, keys)
        bench._release(cache)
    assert all(0.0 < rate < 1.0 for rate in rates.values())
    # Same MAX_ENTRIES + CULL_FREQUENCY semantics as LocMemCache: the same hits on the same trace.
    assert rates["KotobaCache lru, MAX_ENTRIES (cull 1/3)"] == rates["LocMemCache (cull 1/3)"]
    bench.latencies(rounds=1, batch=50)
    assert "KotobaCache / LocMemCache" in capsys.readouterr().out
