"""Smoke test of benchmarks/middleware_overhead.py on tiny input: it runs and its variants serve."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kotoba_memory import _native

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark() -> ModuleType:
    path = ROOT / "benchmarks" / "middleware_overhead.py"
    spec = importlib.util.spec_from_file_location("middleware_overhead", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("middleware_overhead", module)
    spec.loader.exec_module(module)
    return module


def serve_once(app: Any) -> tuple[str, bytes]:
    status: list[str] = []
    result = app(
        {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "x", "SERVER_PORT": "80",
         "wsgi.url_scheme": "http", "wsgi.input": None, "wsgi.errors": sys.stderr},
        lambda s, h, exc_info=None: status.append(s),
    )
    body = b"".join(result)
    getattr(result, "close", lambda: None)()
    return status[0], body


def test_every_variant_serves_the_trivial_endpoint() -> None:
    bench = load_benchmark()
    from kotoba_memory_integrations import otel, runtime

    try:
        for variant in bench.VARIANTS:
            if variant.startswith("example"):
                continue  # see the next test
            status, body = serve_once(bench.build_variant(variant))
            assert status.startswith("200") and body == b"ok", variant
    finally:
        otel.uninstrument()
        runtime.stop_optimizer()
    with pytest.raises(ValueError, match="unknown variant"):
        bench.build_variant("nope")


def test_example_variants_serve_the_example_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_benchmark()
    monkeypatch.syspath_prepend(str(bench.EXAMPLE_DIR))
    monkeypatch.setenv("KOTOBA_EXAMPLE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KOTOBA_EXAMPLE_METRICS", "0")
    from kotoba_memory_integrations import runtime

    try:
        for variant in ("example", "example+kotoba"):
            app = bench.build_variant(variant)
            assert ("kotoba_memory" in app.extensions) and (runtime.get_optimizer() is not None) == (
                variant == "example+kotoba"
            )
            status, body = serve_once(app)
            assert status.startswith("200") and b'"status":"ok"' in body.replace(b" ", b""), variant
            runtime.stop_optimizer()
    finally:
        runtime.stop_optimizer()


def test_in_process_part_reports_numbers() -> None:
    cost = load_benchmark().in_process_cost_us(repeats=1, calls=20)
    assert set(cost) == {
        "plain_us", "middleware_us", "added_us", "every_request_us", "every_request_added_us",
        "pure_added_us", "pure_every_request_added_us", "c_over_pure", "recorder",
    }
    assert cost["plain_us"] > 0 and cost["middleware_us"] > 0
    assert cost["recorder"] in ("c", "python")


@pytest.mark.server
@pytest.mark.timeout(120)
@pytest.mark.usefixtures("wrk")  # fails under CI when missing
def test_server_part_runs_one_tiny_round(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark()
    assert bench.main(["--quick", "--rounds", "1", "--seconds", "1", "--variants", "plain,middleware"]) == 0
    out = capsys.readouterr().out
    assert "in-process:" in out and "middleware " in out and "ratio" in out


def test_cold_path_benchmark_runs_each_contender_in_its_own_process(tmp_path: Path) -> None:
    import json
    import subprocess

    out = tmp_path / "cold.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cold_path.py"), "--app", "catalog", "--sleep-ms", "0",
         "--rounds", "2", "--requests", "30", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert set(results) == {"middleware", "middleware-every-8", "middleware-no-rss", "profiler", "gc"}
    for name, result in results.items():
        assert len(result["rounds_us"]) == 2, name
        assert name in done.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cold_path.py"), "--contenders", "nope"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "choose from" in bad.stderr


def test_cold_path_pairs_compare_both_implementations_in_one_process(tmp_path: Path) -> None:
    import json
    import subprocess

    out = tmp_path / "pairs.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cold_path.py"), "--pairs", "--sleep-ms", "0",
         "--rounds", "2", "--requests", "30", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    pairs = json.loads(out.read_text(encoding="utf-8"))["pairs"]
    assert {pair: sorted(sides) for pair, sides in pairs.items()} == {
        "route-table": ["c table", "python record_request"], "rss-reader": ["c reader", "python reader"],
        "call": ["c __call__", "python __call__"], "gc-hooks": ["gc optimizer", "no gc optimizer"]}
    assert all(len(rounds) == 2 for sides in pairs.values() for rounds in sides.values())


@pytest.mark.skipif(_native.load("_crecord") is None, reason="pure Python in use: C builds only")
def test_cold_path_against_loads_another_build_under_its_own_name(tmp_path: Path) -> None:
    import json
    import subprocess

    out = tmp_path / "against.json"
    done = subprocess.run(  # this checkout against itself: the same build, loaded a second time
        [sys.executable, str(ROOT / "benchmarks" / "cold_path.py"), "--against", str(ROOT), "--sleep-ms", "0",
         "--rounds", "2", "--requests", "30", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    sides = json.loads(out.read_text(encoding="utf-8"))["against"]
    assert len(sides) == 2 and all(len(rounds) == 2 for rounds in sides.values())
    assert "lower in" in done.stdout
    missing = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cold_path.py"), "--against", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert missing.returncode != 0 and "no _crecord built" in missing.stderr
