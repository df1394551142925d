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
def test_flask_shop_reports_a_replayed_leak_line_and_nothing_of_ours() -> None:
    """Asserted: the replay's ground truth, every worker reaching a verdict, nothing sited in
    kotoba-memory. Issue 10's stronger goals (a real leak reported in every worker, on top with its route,
    zero confident churn suspects) do not hold in every run yet; the benchmark reports them."""
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
    # Nothing of ours is ever a suspect, in any worker.
    assert result.own_sited == 0
    # Whether each worker names a real leak is reported by the benchmark, not asserted: in a clean-clone
    # run under load one worker listed only churn (issue 10 is open on exactly that).
    assert site_route
