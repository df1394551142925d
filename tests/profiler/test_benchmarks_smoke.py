"""The leak-suite and overhead benchmarks run end to end on tiny inputs (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import time
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


def test_field_overhead_rotates_which_server_starts_first_at_each_restart(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load("field_overhead")
    started: list[str] = []

    class FakeServer:
        """Stands in for gunicorn: records the order servers are started in."""

        def __init__(self, kotoba: bool, profiler: bool = True, **kwargs: object) -> None:
            if not kotoba:
                started.append("off")
            elif kwargs.get("overrides") is not None:
                started.append("aa")
            else:
                started.append("on" if profiler else "noprof")

        def stop(self) -> None:
            pass

    def fake_round(servers: dict[str, object], *args: object) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in servers:
            out[f"{name}_requests"], out[f"{name}_cpu_us"] = 100.0, 500.0
        return out

    monkeypatch.setattr(bench, "Server", FakeServer)
    monkeypatch.setattr(bench, "paired_round", fake_round)
    argv = ["--rounds", "6", "--restart-every", "2", "--without-profiler", "--variant", "aa={}"]
    assert bench.main(argv) == 0
    # three starts of four servers, each start shifted by one: every server boots (and its wrk is
    # launched) in a different position, so a position's offset is spread over all of them
    first, second, third = (
        ["off", "on", "noprof", "aa"], ["on", "noprof", "aa", "off"], ["noprof", "aa", "off", "on"]
    )
    assert started == first + second + third
    printed = capsys.readouterr().out
    orders = [line.split("start order ", 1)[1] for line in printed.splitlines() if "start order" in line]
    assert orders == [", ".join(first), ", ".join(second), ", ".join(third)]
    assert sum(line.startswith("  round ") for line in printed.splitlines()) == 6
    assert "aa/on" in printed


def test_field_app_can_move_the_first_tracing_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from types import SimpleNamespace

    from benchmarks.field_apps import _profiling
    from kotoba_memory.memory_profiler import MemoryProfiler

    profiler = MemoryProfiler(sample_interval_s=0.5)
    profiler.start()
    try:
        assert profiler.first_window_after_s == 10.0
        _profiling.delay_first_window(SimpleNamespace(profiler=profiler))  # no FIELD_FIRST_WINDOW_S: as is
        assert profiler.first_window_after_s == 10.0
        for bad in ("soon", "-5", "nan"):
            monkeypatch.setenv("FIELD_FIRST_WINDOW_S", bad)
            with pytest.raises(ValueError, match="FIELD_FIRST_WINDOW_S"):
                _profiling.delay_first_window(SimpleNamespace(profiler=profiler))
            assert profiler.first_window_after_s == 10.0 and profiler.running  # left as it was
        monkeypatch.setenv("FIELD_FIRST_WINDOW_S", "5000")
        _profiling.delay_first_window(SimpleNamespace(profiler=profiler))
        assert profiler.first_window_after_s == 5000.0 and profiler.running
        window = next(t for t in profiler._tasks if t.name == "memory_profiler.window")
        assert window.next_at - time.monotonic() > 4000  # the scheduler's clock
    finally:
        profiler.stop()


def test_field_overhead_cancels_the_start_positions_over_whole_rotations() -> None:
    bench = load("field_overhead")
    order = ["off", "on", "noprof", "mwonly"]
    true_cost = {"off": 500.0, "on": 510.0, "noprof": 507.0, "mwonly": 505.0}
    position = [1.03, 1.0, 0.99, 0.985]  # the first server booted reads 3% dearer, and so on
    rounds: list[dict[str, float]] = []
    for start in range(4):
        names = order[start:] + order[:start]
        for wobble in (1.0, 1.002):
            rounds.append({"start": start, **{f"{n}_cpu_us": true_cost[n] * position[i] * wobble
                                             for i, n in enumerate(names)}})
    balanced = bench.position_balanced(rounds, "on", "off", 4)
    assert balanced == pytest.approx(510.0 / 500.0, rel=1e-12)
    assert bench.position_balanced(rounds, "mwonly", "noprof", 4) == pytest.approx(505.0 / 507.0, rel=1e-12)
    median = statistics.median(r["on_cpu_us"] / r["off_cpu_us"] for r in rounds)
    assert abs(median - 1.02) > 0.005  # what the median keeps of the positions' spread
    assert bench.position_balanced(rounds[:6], "on", "off", 4) is None  # three starts: not whole rotations
    assert bench.position_balanced(rounds[:7], "on", "off", 4) is None  # uneven rounds per start


def test_background_cost_times_each_periodic_job_fresh_and_an_hour_old() -> None:
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELD_")}
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'core'}"
    script = str(REPO / "benchmarks" / "background_cost.py")
    out = subprocess.run(
        [sys.executable, script, "--requests", "80", "--repeat", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "µs" in line}
    assert set(rows) == {"fleet.publish", "memory_profiler.sample", "gc_optimizer.monitor"}
    # the ring filled to its capacity, the detector to its caps, with the two leaking sites suspected
    assert "the sample ring full (3600 samples)" in out
    assert "256 sites tracked over 64 windows, 2 suspects" in out
    assert "together, an hour old:" in out


def test_field_uptime_names_each_workers_suspects_against_the_ground_truth() -> None:
    bench = load("field_uptime")
    site = str(REPO / "benchmarks" / "field_apps" / "wsgi_catalog.py") + ":27"
    other = str(REPO / "benchmarks" / "field_apps" / "churn.py") + ":40"
    row = {
        "pid": 41, "uptime_s": 1830.0, "requests": 90_000,
        "leaks": [
            {"allocation_site": site, "route": "/lookup/<key>", "confidence": 0.97},
            {"allocation_site": other, "route": "/render/<n>", "confidence": 0.61},
            {"allocation_site": other, "route": None, "confidence": 0.6},
        ],
    }
    line = bench.describe_row(row, {site})
    head = "pid 41 up 30 min, 90000 requests: [REAL] benchmarks/field_apps/wsgi_catalog.py:27 "
    assert line.startswith(head)
    assert "/lookup/<key> conf 0.97; [not] benchmarks/field_apps/churn.py:40 /render/<n> conf 0.61" in line
    assert line.endswith("churn.py:40 (route not yet known) conf 0.60")
    waiting = {"pid": 42, "uptime_s": 120.0, "requests": 5, "leaks": [], "leak_verdict": "2 of 4 windows"}
    assert bench.describe_row(waiting, {site}) == "pid 42 up 2 min, 5 requests: 2 of 4 windows"


def test_field_uptime_keeps_each_servers_worker_dumps(tmp_path: Path) -> None:
    bench = load("field_uptime")
    outs = {}
    for name, pids in (("on", [11, 12]), ("leak", [13])):
        outs[name] = tmp_path / "run" / name
        outs[name].mkdir(parents=True)
        for pid in pids:
            (outs[name] / f"worker-{pid}.json").write_text(json.dumps({"pid": pid}), encoding="utf-8")
        (outs[name] / "notes.txt").write_text("not a dump", encoding="utf-8")
    kept = bench.keep_dumps(outs, tmp_path / "kept")
    assert sorted(p.relative_to(tmp_path / "kept").as_posix() for p in kept) == [
        "leak/worker-13.json", "on/worker-11.json", "on/worker-12.json",
    ]
    copy = tmp_path / "kept" / "on" / "worker-12.json"
    assert json.loads(copy.read_text(encoding="utf-8")) == {"pid": 12}



_PERF_REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 2K of event 'cpu-clock:ppp'
#
# Samples  Shared Object         Symbol
# .......  ....................  .................................
#
      1927  libpython3.11.so.1.0  [.] _PyObject_Malloc
       412  [kernel.kallsyms]     [k] finish_task_switch.isra.0
        31  libpython3.11.so.1.0  [.] gc_collect_main
         3  _crecord.cpython-311-x86_64-linux-gnu.so  [.] RouteTable_record
"""


def test_field_perf_counts_samples_per_symbol_and_ranks_what_differs() -> None:
    bench = load("field_perf")
    counts = bench.parse_report(_PERF_REPORT)
    assert counts[("libpython3.11.so.1.0", "_PyObject_Malloc")] == 1927
    assert counts[("[kernel.kallsyms]", "finish_task_switch.isra.0")] == 412
    assert sum(counts.values()) == 1927 + 412 + 31 + 3
    on = bench.per_thousand(counts, 2000)
    assert on[("libpython3.11.so.1.0", "_PyObject_Malloc")] == pytest.approx(963.5)
    base = dict(on)
    base[("libpython3.11.so.1.0", "_PyObject_Malloc")] = 900.0
    base[("libpython3.11.so.1.0", "gc_collect_main")] = 10.0
    ranked = bench.differences({"on": on, "base": base}, "base", 2)
    assert [key[1] for key, _ in ranked] == ["_PyObject_Malloc", "gc_collect_main"]
    assert ranked[0][1] == {"on": pytest.approx(963.5), "base": 900.0}
    with pytest.raises(ValueError, match="requests"):
        bench.per_thousand(counts, 0)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--server", "on={"], "not JSON"),
        (["--server", "on=[]"], "JSON object"),
        (["--server", 'on={"cache_size_mb": -1}'], "cache_size_mb"),
        (["--server", "on={}", "--baseline", "off"], "--baseline"),
        (["--server", "on={}", "--server-env", "off=A=1"], "--server-env"),
        (["--server", "on={}", "--rounds", "0"], "--rounds"),
        (["--server", "2on={}"], "NAME an identifier"),
        (["--server", "on={}", "--server-env", "on"], "NAME an identifier"),
    ],
)
def test_field_perf_refuses_bad_arguments_before_starting_servers(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load("field_perf").main(argv)
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_field_workers_dump_how_densely_pymalloc_fills_its_pools(tmp_path: Path) -> None:
    sys.path[:0] = [str(REPO)]
    try:
        from benchmarks.field_apps._profiling import pymalloc_stats
    finally:
        sys.path.remove(str(REPO))
    before = pymalloc_stats()
    assert before is not None
    keep = [(i, str(i)) for i in range(50_000)]  # ~100k new blocks, most in two size classes
    after = pymalloc_stats()
    assert after is not None
    assert after["blocks_in_use"] - before["blocks_in_use"] > 50_000
    assert after["pools"] > before["pools"] and 0.0 < after["fill"] <= 1.0
    assert after["arenas"] >= before["arenas"] >= 1
    del keep
    bench = load("field_perf")
    (tmp_path / "process-1.json").write_text(json.dumps({"pymalloc": after}), encoding="utf-8")
    (tmp_path / "process-2.json").write_text(json.dumps({"pymalloc": None}), encoding="utf-8")
    [heap] = bench.worker_heaps(tmp_path)
    assert heap["pools"] == after["pools"]
    assert bench.class_free_blocks([heap])["32"] == after["classes"]["32"][2]
    assert f"{after['pools']} pools" in bench.heap_summary([heap])
    assert bench.heap_summary([]) == ""


def test_field_perf_says_why_perf_record_failed() -> None:
    bench = load("field_perf")
    failed = subprocess.Popen(
        ["sh", "-c", "echo 'Access to performance monitoring is restricted' >&2; exit 255"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    with pytest.raises(RuntimeError, match=r"server on exited 255: Access to performance monitoring"):
        bench.wait_recorded(failed, "on", 10)
    fine = subprocess.Popen(["true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bench.wait_recorded(fine, "on", 10)
