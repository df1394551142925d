"""End to end through a real Flask app and the WSGI middleware: the leaking route is named."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

flask = pytest.importorskip("flask")
integration = pytest.importorskip("kotoba_memory_integrations.flask")
runtime = pytest.importorskip("kotoba_memory_integrations.runtime")

LEAKED: list[bytes] = []


def make_app(rss_sample_every: int) -> object:
    app = flask.Flask("route_attribution")
    app.config.update(
        KOTOBA_MEMORY_RSS_SAMPLE_EVERY=rss_sample_every,
        KOTOBA_MEMORY_ENABLE_CACHING=False,
        KOTOBA_MEMORY_ENABLE_GC_OPTIMIZATION=False,
        KOTOBA_MEMORY_MONITORING_INTERVAL_MS=50,
        KOTOBA_MEMORY_LEAK_WINDOW_S=0.25,
        KOTOBA_MEMORY_LEAK_WINDOW_INTERVAL_S=0.3,
        KOTOBA_MEMORY_LEAK_TRACE_BUDGET=None,
    )

    @app.get("/items/<int:n>")
    def items(n: int) -> object:
        return flask.jsonify(items=[{"id": i, "name": f"item {i}"} for i in range(n % 20)])

    @app.get("/leak")
    def leak() -> object:
        LEAKED.append(bytes(4096))  # the leak the report must find
        return flask.jsonify(size=len(LEAKED))

    integration.KotobaMemory(app)
    return app


# 8: the default, RSS measured on a random eighth of the requests; 1: every request.
@pytest.mark.parametrize("rss_sample_every", [8, 1])
def test_leaking_route_is_the_top_suspect_with_its_site(rss_sample_every: int) -> None:
    app = make_app(rss_sample_every)
    client = app.test_client()  # type: ignore[attr-defined]
    optimizer = runtime.get_optimizer()
    assert optimizer is not None and optimizer.profiler is not None
    rng = random.Random(7)
    sent = 0
    try:
        deadline = time.monotonic() + 20
        while optimizer.profiler.stats().windows < 8 and time.monotonic() < deadline:
            if rng.random() < 0.3:
                client.get("/leak", buffered=True)  # buffered: the body is consumed and closed
            else:
                client.get(f"/items/{rng.randrange(100)}", buffered=True)
            sent += 1
            time.sleep(0.001)
        analysis = optimizer.profiler.analyze()
    finally:
        report = runtime.stop_optimizer()
        LEAKED.clear()
    # Every request is counted per route (attribution regresses on the counts); RSS only on the sample.
    assert sum(r.requests for r in analysis.routes) == sent
    measured = sum(r.rss_requests or 0 for r in analysis.routes)
    assert measured == sent if rss_sample_every == 1 else 0 < measured < sent / 2
    assert analysis.memory_leaks, analysis.stats
    top = analysis.memory_leaks[0]
    lines = Path(__file__).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "# the leak the report" in text)
    assert top.allocation_site == f"{Path(__file__).resolve()}:{line}"
    assert top.route == "/leak"
    assert report is not None and report.leaks[0]["route"] == "/leak"
