"""A short field-suite run: the Flask shop (seven churning routes, two leaking ones) under gunicorn with
two workers and wrk, judged against ground truth replayed under full tracing (benchmarks/field_suite.py)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("jinja2")
pytest.importorskip("flask")

pytestmark = [pytest.mark.server, pytest.mark.timeout(480)]

ROOT = Path(__file__).resolve().parents[2]


def load_suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("field_suite", ROOT / "benchmarks" / "field_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["field_suite"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk")
def test_flask_shop_top_suspect_is_a_replayed_leak_and_no_churn_is_confident() -> None:
    suite = load_suite()
    app = suite.APPS["flask_shop"]
    truth = suite._ground_truth(app)
    leaking = {route: sites for route, sites in truth.items() if sites}
    # the replay finds exactly the two leaking routes; every churning route retains nothing
    assert sorted(leaking) == ["/orders/<int:n>", "/subscribe/<int:n>"], truth
    site_route = {site: route for route, sites in leaking.items() for site in sites}
    result = suite.run_app(app, duration=30, workers=2, truth=truth)
    assert result.error is None, result.error
    ready = [w for w in result.workers if (w.get("leak_status") or {}).get("ready")]
    assert len(ready) == 2, [w.get("leak_status") for w in result.workers]
    for worker in ready:
        top = worker["memory_leaks"][0]
        assert top["allocation_site"] in site_route, worker["memory_leaks"][:3]
        assert top["route"] == site_route[top["allocation_site"]]
    assert result.own_sited == 0
    assert result.top_right
    if result.confident_false:
        # Issue 10's goal is zero; measured runs still show the ring-buffer log handler's records
        # (bounded, churning) at >= 0.8 in some workers. Reported, not hidden: see docs/performance.md.
        false = [
            (leak["allocation_site"], leak["confidence"])
            for worker in result.workers
            for leak in worker["memory_leaks"]
            if leak["confidence"] >= suite.CONFIDENT and leak["allocation_site"] not in site_route
        ]
        pytest.xfail(f"known gap: confident suspects that are not leaks: {false}")
