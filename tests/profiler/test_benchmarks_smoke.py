"""The leak-suite and overhead benchmarks run end to end on tiny inputs (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_workload_declares_truth_and_leaking_ones_mark_their_sites() -> None:
    suite = load("leak_suite")
    paths = suite.discover(suite.DEFAULT_DIR)
    assert len(paths) >= 20
    truths = {p.stem: suite._declared(p)["leaks"] for p in paths}
    assert sum(truths.values()) >= 10 and sum(not v for v in truths.values()) >= 10
    for path in paths:
        assert bool(suite.marked_sites(path)) == truths[path.stem], path.name


def test_scores_count_verdicts_and_sites() -> None:
    suite = load("leak_suite")
    site = "/w/a.py:3"
    outcomes = [
        suite.Outcome("a", True, "", verdict=True, suspects=[{"allocation_site": site}], marked_sites=[site]),
        suite.Outcome("b", True, "", verdict=False, marked_sites=[site]),
        suite.Outcome("c", False, "", verdict=True, suspects=[{"allocation_site": "/w/c.py:1"}]),
        suite.Outcome("d", False, "", verdict=False),
    ]
    scores = suite.score(outcomes)
    assert scores["verdict_precision"] == 0.5 and scores["verdict_recall"] == 0.5
    assert scores["site_precision"] == 0.5 and scores["site_recall"] == 0.5


def test_suite_runs_a_workload_in_a_subprocess(tmp_path: Path) -> None:
    suite = load("leak_suite")
    out = tmp_path / "result.json"
    assert suite.main(["--only", "leak_default_arg", "--duration", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    [outcome] = data["outcomes"]
    assert outcome["error"] is None and outcome["windows"] >= 1
    assert outcome["marked_sites"]


@pytest.mark.parametrize("workload", ["bare", "flask"])
def test_overhead_benchmark_measures_all_contenders(workload: str) -> None:
    bench = load("profiler_overhead")
    bench.HANDLER = bench.flask_handler() if workload == "flask" else bench.handle
    result = bench.measure(rounds=1, phase=0.3)
    assert set(result["median_req_per_s"]) == {"off", "kotoba", "tracemalloc"}
    assert all(v > 0 for v in result["median_req_per_s"].values())
    assert 0 < result["kotoba_duty"] <= 1


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("on={}", "new identifier"),
        ("nowin", "NAME=JSON"),
        ("x={not json", "not JSON"),
        ("x=[1]", "JSON object"),
        ('x={"no_such_field": 1}', "no_such_field"),
        ('x={"leak_window_s": -1}', "leak_window_s"),
    ],
)
def test_field_overhead_refuses_a_bad_variant_before_starting_servers(
    spec: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load("field_overhead")
    with pytest.raises(SystemExit) as exited:
        bench.main(["--variant", spec])
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_field_overhead_refuses_a_negative_restart_period(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load("field_overhead").main(["--restart-every", "-1"])
    assert exited.value.code == 2 and "--restart-every" in capsys.readouterr().err


def test_field_app_dumps_what_its_process_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.field_apps import _profiling

    monkeypatch.setenv("FIELD_OUT", str(tmp_path))
    monkeypatch.setattr(_profiling.runtime, "get_optimizer", lambda: None)
    _profiling.dump_analysis()  # no optimizer runs here: only what the process ran is written
    process = json.loads(next(tmp_path.glob("process-*.json")).read_text(encoding="utf-8"))
    assert process["threads_cpu_s"] and all(cpu >= 0 for cpu in process["threads_cpu_s"].values())
    assert len(process["gc_threshold"]) == 3 and len(process["gc_stats"]) == 3
    assert not list(tmp_path.glob("worker-*.json"))
    summary = load("field_overhead")._what_ran(tmp_path)
    assert summary is not None and summary["workers_dumped"] == 1
    assert summary["collections"] == [g["collections"] for g in process["gc_stats"]]
