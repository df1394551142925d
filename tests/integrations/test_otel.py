"""OpenTelemetry metrics, read back through the SDK's InMemoryMetricReader."""

from __future__ import annotations

import gc
import mmap
import random
import string
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from resident import fresh_resident  # tests/integrations/resident.py

from kotoba_memory._version import __version__
from kotoba_memory.process.memory import shared_reader
from kotoba_memory_integrations import otel
from kotoba_memory_integrations.request import (
    RequestMetrics,
    RequestRecorder,
    normalize_method,
    set_current_route,
)
from kotoba_memory_integrations.wsgi import MemoryMiddleware


@pytest.fixture()
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel.instrument(meter_provider=provider)
    try:
        yield reader
    finally:
        otel.uninstrument()
        provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    found: dict[str, Any] = {}
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == otel.METER_NAME
            assert scope_metrics.scope.version == __version__
            for metric in scope_metrics.metrics:
                found[metric.name] = metric
    return found


def points(metric: Any) -> list[Any]:
    return list(metric.data.data_points)


def test_semantic_convention_process_and_gc_metrics(reader: InMemoryMetricReader) -> None:
    gc.collect()
    found = collect(reader)
    usage = found["process.memory.usage"]
    assert usage.unit == "By"
    [point] = points(usage)
    assert point.value > 1 << 20
    collections = found["cpython.gc.collections"]
    by_generation = {p.attributes["cpython.gc.generation"]: p.value for p in points(collections)}
    assert set(by_generation) == {0, 1, 2}
    assert 1 <= by_generation[2] <= gc.get_stats()[2]["collections"]
    for name in ("cpython.gc.collected_objects", "cpython.gc.uncollectable_objects"):
        assert {p.attributes["cpython.gc.generation"] for p in points(found[name])} == {0, 1, 2}


def test_request_histograms_carry_route_method_status(reader: InMemoryMetricReader) -> None:
    keep: list[mmap.mmap] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        set_current_route("/reports/<int:year>")
        keep.append(fresh_resident(16 << 20))
        start_response("200 OK", [])
        return [b""]

    recorder = RequestRecorder(gc_optimizer=lambda: None, profiler=lambda: None, rss_sample_every=1)
    middleware = MemoryMiddleware(app, recorder=recorder)
    for _ in range(2):
        result = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/reports/2024"}, lambda *a: None)
        list(result)
        result.close()  # type: ignore[attr-defined]
    found = collect(reader)
    growth = found["kotoba_memory.http.server.request.rss_growth"]
    assert growth.unit == "By"
    [point] = points(growth)
    assert dict(point.attributes) == {
        "http.route": "/reports/<int:year>",
        "http.request.method": "GET",
        "http.response.status_code": 200,
    }
    assert point.count == 2
    reader = shared_reader()
    assert point.sum >= 24 << 20, (
        f"the reader's descriptor {reader._fd} is ours: {reader.descriptor_is_ours()}, "
        f"last reading {reader._last}"
    )
    assert "kotoba_memory.http.server.request.traced_allocations" not in found  # tracemalloc is off
    # No GC optimizer is active here, so no request saw a pause and none is recorded.
    assert "kotoba_memory.http.server.request.gc_pause" not in found
    for block in keep:
        block.close()


def test_cache_metrics_per_cache_name(reader: InMemoryMetricReader) -> None:
    cache_manager = pytest.importorskip("kotoba_memory.cache_manager")
    if not hasattr(cache_manager, "CacheManager"):
        pytest.skip("cache manager not available")
    cache = cache_manager.CacheManager(max_bytes=1 << 20, name="otel-test-cache")
    cache.put("a", b"x" * 100)
    assert cache.get("a") == b"x" * 100
    assert cache.get("missing") is None
    found = collect(reader)

    def value(name: str) -> Any:
        label = "kotoba_memory.cache.name"
        matching = [p.value for p in points(found[name]) if p.attributes.get(label) == "otel-test-cache"]
        assert len(matching) == 1, name
        return matching[0]

    assert value("kotoba_memory.cache.hits") == 1
    assert value("kotoba_memory.cache.misses") == 1
    assert value("kotoba_memory.cache.entries") == 1
    assert value("kotoba_memory.cache.size") >= 100
    assert value("kotoba_memory.cache.evictions") == 0


def test_uninstrument_stops_reporting_and_instrument_is_idempotent() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentor = otel.instrument(meter_provider=provider)
    otel.instrument(meter_provider=provider)
    assert otel.is_instrumented() and instrumentor is otel.MemoryInstrumentor()
    assert "process.memory.usage" in collect(reader)
    otel.uninstrument()
    otel.uninstrument()
    assert not otel.is_instrumented()
    data = reader.get_metrics_data()
    names = {
        m.name
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        if points(m)
    }
    assert "process.memory.usage" not in names
    provider.shutdown()


def test_without_a_configured_provider_nothing_breaks() -> None:
    # No SDK provider: the global API provider is a proxy/no-op, instruments record nothing.
    otel.instrument()
    try:
        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            start_response("204 No Content", [])
            return []

        result = MemoryMiddleware(app)({"REQUEST_METHOD": "GET"}, lambda *a: None)
        list(result)
        result.close()  # type: ignore[attr-defined]
        assert otel.MemoryInstrumentor().callback_errors == 0
    finally:
        otel.uninstrument()


def test_query_cache_metrics_with_invalidations_per_table(reader: InMemoryMetricReader) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from kotoba_memory.cache_manager import CacheManager
    from kotoba_memory_integrations.sqlalchemy import QueryCache

    engine = sqlalchemy.create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE widget (id INTEGER PRIMARY KEY, name TEXT)"))
        conn.execute(sqlalchemy.text("INSERT INTO widget (name) VALUES ('a'), ('b')"))
    query_cache = QueryCache(CacheManager(max_bytes=1 << 20), name="otel-query-cache")
    query_cache.attach(engine)
    widget = sqlalchemy.table("widget", sqlalchemy.column("id"), sqlalchemy.column("name"))
    statement = sqlalchemy.select(widget.c.name).options(query_cache.cached(ttl=60))
    with engine.connect() as conn:
        assert len(conn.execute(statement).all()) == 2  # miss
        assert len(conn.execute(statement).all()) == 2  # hit
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("INSERT INTO widget (name) VALUES ('c')"))  # invalidates widget
    found = collect(reader)

    def series(name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        return {
            tuple(sorted(p.attributes.items())): p.value
            for p in points(found[name])
            if p.attributes.get("kotoba_memory.cache.name") == "otel-query-cache"
        }

    assert list(series("kotoba_memory.query_cache.hits").values()) == [1]
    assert list(series("kotoba_memory.query_cache.misses").values()) == [1]
    by_table = series("kotoba_memory.query_cache.invalidations")
    invalidations = {dict(k)["db.collection.name"]: v for k, v in by_table.items()}
    assert invalidations.get("widget", 0) >= 1
    query_cache.close()


def test_pool_metrics_from_the_active_optimizer(reader: InMemoryMetricReader) -> None:
    pytest.importorskip("kotoba_memory.optimizer")
    from kotoba_memory.config import MemoryConfig
    from kotoba_memory_integrations import runtime

    runtime.stop_optimizer()
    optimizer = runtime.start_optimizer(
        MemoryConfig(enable_pooling=True, pool_size_mb=1, enable_profiling=False, enable_caching=False,
                     enable_gc_optimization=False)
    )
    try:
        block = optimizer.pool.allocate(10_000)
        found = collect(reader)
        [usage] = points(found["kotoba_memory.pool.usage"])
        [capacity] = points(found["kotoba_memory.pool.capacity"])
        assert usage.value >= 10_000
        assert capacity.value >= 1 << 20
        block.release()
    finally:
        runtime.stop_optimizer()


def test_client_chosen_methods_make_a_bounded_set_of_series(reader: InMemoryMetricReader) -> None:
    """300 random methods (issue 11, item 3) must not make 300 series: unknown ones count as ``_OTHER``."""
    rng = random.Random(11)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        set_current_route(environ["ROUTE"])
        start_response("200 OK", [])
        return [b""]

    recorder = RequestRecorder(gc_optimizer=lambda: None, profiler=lambda: None, rss_sample_every=1)
    middleware = MemoryMiddleware(app, recorder=recorder)
    methods = ["".join(rng.choices(string.ascii_letters, k=12)) for _ in range(300)]
    requests = [(method, "/items/<id>") for method in [*methods, "GET", "POST", "get"]]
    for method, route in [*requests, ("DELETE", "/new/<id>")]:
        result = middleware({"REQUEST_METHOD": method, "ROUTE": route}, lambda *a: None)
        list(result)
        result.close()  # type: ignore[attr-defined]
    series = {tuple(sorted(p.attributes.items()))
              for p in points(collect(reader)["kotoba_memory.http.server.request.rss_growth"])}
    seen = {(dict(s)["http.route"], dict(s)["http.request.method"]) for s in series}
    assert seen == {("/items/<id>", "_OTHER"), ("/items/<id>", "GET"), ("/items/<id>", "POST"),
                    ("/new/<id>", "DELETE")}


def test_unmeasured_requests_record_no_rss_but_their_traced_delta_and_gc_pause(
    reader: InMemoryMetricReader,
) -> None:
    listener = otel.MemoryInstrumentor()._instruments.on_request  # type: ignore[union-attr]
    listener(RequestMetrics("/r", "GET", 200, 0.0, 0, None, 0, None, sampled=False))  # nothing to say
    assert "kotoba_memory.http.server.request.rss_growth" not in collect(reader)
    listener(RequestMetrics("/r", "GET", 200, 0.0, 0, 2048, 5_000_000, None, sampled=False))
    listener(RequestMetrics("/r", "GET", 200, 0.0, 4096, None, 0, None, sampled=True))
    found = collect(reader)
    [rss] = points(found["kotoba_memory.http.server.request.rss_growth"])
    assert (rss.count, rss.sum) == (1, 4096)  # the measured request only
    [traced] = points(found["kotoba_memory.http.server.request.traced_allocations"])
    assert (traced.count, traced.sum) == (1, 2048)
    [pause] = points(found["kotoba_memory.http.server.request.gc_pause"])
    assert pause.count == 1 and pause.sum == pytest.approx(0.005)


def test_every_recorded_request_attribute_is_bounded(reader: InMemoryMetricReader) -> None:
    """A listener fed metrics by hand gets the same bounds: method normalised, odd status codes dropped."""
    otel.MemoryInstrumentor()._instruments.on_request(  # type: ignore[union-attr]
        RequestMetrics("/r", "BREW", 999, 0.0, 1, None, 0, None))
    [point] = points(collect(reader)["kotoba_memory.http.server.request.rss_growth"])
    assert dict(point.attributes) == {"http.route": "/r", "http.request.method": "_OTHER"}
    assert normalize_method("PATCH") == "PATCH" and normalize_method("patch") == "_OTHER"


def test_gc_mode_and_own_memory_are_exported(reader: InMemoryMetricReader) -> None:
    from kotoba_memory.gc_optimizer import GcOptimizer

    optimizer = GcOptimizer(warmup_requests=1, monitoring_interval_s=0.05)
    optimizer.start()
    try:
        for _ in range(3):
            optimizer.on_request_start()
            [{"i": i} for i in range(100)]
            optimizer.on_request_end()
        found = collect(reader)
        modes = {p.attributes["kotoba_memory.gc.mode"]: p for p in points(found["kotoba_memory.gc.mode"])}
        current = [m for m, p in modes.items() if p.value == 1]
        assert current == [optimizer.mode[0]] == ["between_requests"]
        assert modes["between_requests"].attributes["kotoba_memory.gc.mode.cause"] == "request_boundaries"
        assert {"budget", "long_request_stepping"} <= set(modes)
        [own] = points(found["kotoba_memory.gc.own_memory"])
        assert found["kotoba_memory.gc.own_memory"].unit == "By" and 0 < own.value <= 1 << 20
    finally:
        optimizer.stop()
