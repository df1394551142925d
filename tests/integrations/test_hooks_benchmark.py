"""Smoke test: the @cached benchmark's code runs on tiny input and its contenders agree (no timing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("wrapt")

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "cached_decorator.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kotoba_cached_decorator_bench", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_contenders_agree_and_measure_runs() -> None:
    bench = _load()
    funcs = bench.contenders()
    assert any(name.startswith("kotoba") for name in funcs)
    for a, b in [(1, 2), (511, 6), (1, 2)]:
        assert {func(a, b) for func in funcs.values()} == {bench.work(a, b)}
    medians = bench.measure(rounds=1, calls=100)
    assert set(medians) == set(funcs)
    assert bench.measure_async(rounds=1, calls=50) > 0
