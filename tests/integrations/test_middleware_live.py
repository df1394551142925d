"""The middleware with the real GC optimizer and memory profiler, and OpenTelemetry GC pause metrics."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from kotoba_memory_integrations.request import RequestMetrics, RequestRecorder, set_current_route
from kotoba_memory_integrations.wsgi import MemoryMiddleware

gc_optimizer = pytest.importorskip("kotoba_memory.gc_optimizer")
memory_profiler = pytest.importorskip("kotoba_memory.memory_profiler")


def call(app: Any, path: str) -> None:
    result = app({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda *a: None)
    for _ in result:
        pass
    result.close()


def cyclic_garbage(n: int) -> None:
    for _ in range(n):
        a: list[Any] = []
        a.append(a)


@pytest.fixture()
def live() -> Iterator[tuple[Any, Any]]:
    optimizer = gc_optimizer.GcOptimizer(adaptive=False)
    profiler = memory_profiler.MemoryProfiler(leak_detection=False, sample_interval_s=5.0)
    optimizer.start()
    profiler.start()
    try:
        assert gc_optimizer.get_active_gc_optimizer() is optimizer
        assert memory_profiler.get_active_profiler() is profiler
        yield optimizer, profiler
    finally:
        profiler.stop()
        optimizer.stop()


def test_gc_pause_inside_request_and_route_aggregates(live: tuple[Any, Any]) -> None:
    optimizer, profiler = live
    seen: list[RequestMetrics] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        set_current_route("/collect" if environ["PATH_INFO"] == "/collect" else "/quiet")
        if environ["PATH_INFO"] == "/collect":
            cyclic_garbage(20_000)
            gc.collect()
        start_response("200 OK", [])
        return [b"done"]

    middleware = MemoryMiddleware(app, recorder=RequestRecorder(on_request=seen.append))
    before = optimizer.requests_seen
    for _ in range(3):
        call(middleware, "/collect")
    call(middleware, "/quiet")
    assert optimizer.requests_seen - before == 4  # on_request_start/end reached the real optimizer
    assert optimizer.in_flight == 0
    collect = [m for m in seen if m.route == "/collect"]
    assert len(collect) == 3 and all(m.gc_pause_ns > 0 for m in collect)
    routes = {r.route: r for r in profiler.routes()}
    assert routes["/collect"].requests == 3
    assert routes["/quiet"].requests == 1
    assert routes["/collect"].total_duration_s >= sum(m.duration_s for m in collect) * 0.99


def test_otel_gc_pause_histogram_from_the_optimizers_events(live: tuple[Any, Any]) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from kotoba_memory_integrations import otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentor = otel.instrument(provider)
    try:
        instrumentor.drain_gc_events()  # start from now
        for _ in range(4):
            cyclic_garbage(1000)
            gc.collect(2)
        data = reader.get_metrics_data()
    finally:
        otel.uninstrument()
        provider.shutdown()
    assert data is not None
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    pause = metrics["kotoba_memory.gc.pause"]
    assert pause.unit == "s"
    by_generation = {p.attributes["cpython.gc.generation"]: p for p in pause.data.data_points}
    assert by_generation[2].count >= 4
    assert by_generation[2].sum > 0
