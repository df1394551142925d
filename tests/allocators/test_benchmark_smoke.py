"""The allocator RSS benchmark runs end to end on a tiny workload (no timing or RSS assertions)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_allocator_rss_runs_through_the_launcher() -> None:
    bench = _load("allocator_rss")
    settings, _notes = bench.available(bench.SETTINGS)
    chosen = [s for s in settings if s.name in ("glibc", "glibc + malloc_trim(0)")]
    shapes = [bench.Shape(2, staggered=True)]
    rows = bench.run(chosen, shapes, objects=400, rounds=1)
    assert len(rows) == len(chosen) * len(shapes)
    for row in rows:
        assert row["rss_end_mib"] > 0 and row["cpu_s"] > 0
        if row["setting"] == "glibc":
            assert row["rss_vs_glibc"] == 1.0
    assert "taking turns" in bench.markdown(rows)
