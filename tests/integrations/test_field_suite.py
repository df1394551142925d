"""A short field-suite run: a plain WSGI app with churning routes and one leak, under gunicorn with two
workers and wrk, judged against ground truth replayed under full tracing (benchmarks/field_suite.py)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("gunicorn")
pytest.importorskip("jinja2")
pytest.importorskip("werkzeug")

pytestmark = [pytest.mark.server, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]


def load_suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("field_suite", ROOT / "benchmarks" / "field_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["field_suite"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk")
def test_wsgi_app_top_suspect_is_the_replayed_leak_and_no_churn_is_confident() -> None:
    suite = load_suite()
    app = suite.APPS["wsgi_catalog"]
    truth = suite._ground_truth(app)
    leaking = {route: sites for route, sites in truth.items() if sites}
    # the replay finds exactly the one leaking route; every churning route retains nothing
    assert list(leaking) == ["/lookup/<key>"], truth
    result = suite.run_app(app, duration=30, workers=2, truth=truth)
    assert result.error is None, result.error
    ready = [w for w in result.workers if (w.get("leak_status") or {}).get("ready")]
    assert len(ready) == 2, [w.get("leak_status") for w in result.workers]
    for worker in ready:
        top = worker["memory_leaks"][0]
        assert top["allocation_site"] in leaking["/lookup/<key>"], worker["memory_leaks"][:3]
        assert top["route"] == "/lookup/<key>"
    assert result.confident_false == 0, [w["memory_leaks"] for w in result.workers]
    assert result.own_sited == 0
    assert result.top_right
