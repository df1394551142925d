"""The contrib-shaped instrumentor: BaseInstrumentor, its entry point, and zero-code loading through
``opentelemetry-instrument`` in a real subprocess."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.instrumentation")

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations import otel
from kotoba_memory_integrations import request as request_module

BIN = Path(sys.executable).parent

APP = '''
import sys, time
from pathlib import Path
from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.request import set_current_route
from kotoba_memory_integrations.wsgi import MemoryMiddleware

cache = CacheManager(max_bytes=1 << 20, name="zero-code")
cache.put("a", 1)
cache.get("a"); cache.get("a"); cache.get("missing")

def app(environ, start_response):
    set_current_route("/books/<int:book_id>")
    start_response("200 OK", [])
    return [b"ok"]

measured = MemoryMiddleware(app, rss_sample_every=1)  # this one request must be measured
body = measured({"REQUEST_METHOD": "GET", "PATH_INFO": "/books/1"}, lambda *a: None)
list(body); body.close()
if len(sys.argv) > 1:  # keep serving /metrics until the test is done scraping
    Path(sys.argv[1]).write_text("ready")
    deadline = time.monotonic() + 60
    while Path(sys.argv[1]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
'''


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_TRACES_EXPORTER="none", OTEL_LOGS_EXPORTER="none", OTEL_SERVICE_NAME="zero-code-app")
    env.update(extra)
    return env


def test_is_a_contrib_instrumentor_found_through_its_entry_point() -> None:
    instrumentor = otel.MemoryInstrumentor()
    assert isinstance(instrumentor, BaseInstrumentor)
    assert instrumentor is otel.MemoryInstrumentor()
    assert list(instrumentor.instrumentation_dependencies()) == ["kotoba-memory >= 0.1"]
    [entry_point] = [ep for ep in importlib.metadata.entry_points(group="opentelemetry_instrumentor")
                     if ep.name == "kotoba_memory"]
    assert entry_point.load() is otel.MemoryInstrumentor


def _names_with_points(reader: InMemoryMetricReader) -> set[str]:
    data = reader.get_metrics_data()
    return {
        metric.name
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if list(metric.data.data_points)
    }


def test_uninstrument_restores_fully_and_instrument_revives_the_same_provider() -> None:
    listeners_before = request_module._listeners
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    cache = CacheManager(max_bytes=1 << 16, name="revived")
    cache.get("x")
    instrumentor = otel.MemoryInstrumentor()
    instrumentor.instrument(meter_provider=provider)
    try:
        assert instrumentor.is_instrumented_by_opentelemetry and otel.is_instrumented()
        assert len(request_module._listeners) == len(listeners_before) + 1
        assert "kotoba_memory.cache.misses" in _names_with_points(reader)
        instrumentor.uninstrument()
        assert not otel.is_instrumented() and not instrumentor.is_instrumented_by_opentelemetry
        assert request_module._listeners == listeners_before
        assert _names_with_points(reader) == set()
        # The same provider again: the first instruments come back to life (the SDK would ignore
        # a second registration of the same names).
        instrumentor.instrument(meter_provider=provider)
        assert "kotoba_memory.cache.misses" in _names_with_points(reader)
    finally:
        otel.uninstrument()
        provider.shutdown()
    assert request_module._listeners == listeners_before


def _exported_json(stdout: str) -> list[dict[str, Any]]:
    decoder, found, at = json.JSONDecoder(), [], 0
    while (start := stdout.find("{", at)) != -1:
        try:
            blob, at = decoder.raw_decode(stdout, start)
        except ValueError:
            at = start + 1
            continue
        found.append(blob)
    return found


def test_opentelemetry_instrument_exports_our_metrics_with_no_code_change(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    done = subprocess.run(
        [str(BIN / "opentelemetry-instrument"), sys.executable, "app.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=_env(OTEL_METRICS_EXPORTER="console", OTEL_METRIC_EXPORT_INTERVAL="600000"),
    )
    assert done.returncode == 0, done.stderr
    points: dict[str, list[dict[str, Any]]] = {}
    for blob in _exported_json(done.stdout):
        for rm in blob.get("resource_metrics", []):
            for sm in rm["scope_metrics"]:
                if sm["scope"]["name"] != otel.METER_NAME:
                    continue
                for metric in sm["metrics"]:
                    points.setdefault(metric["name"], []).extend(metric["data"]["data_points"])
    assert points, done.stdout[-2000:] + done.stderr[-2000:]
    hits = [p["value"] for p in points["kotoba_memory.cache.hits"]
            if p["attributes"].get("kotoba_memory.cache.name") == "zero-code"]
    assert hits == [2]
    assert points["process.memory.usage"][0]["value"] > 1 << 20
    [request_point] = [p for p in points["kotoba_memory.http.server.request.rss_growth"]
                       if p["attributes"].get("http.route") == "/books/<int:book_id>"]
    assert request_point["count"] == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_opentelemetry_instrument_serves_them_to_prometheus(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    flag, port = tmp_path / "serving", _free_port()
    proc = subprocess.Popen(
        [str(BIN / "opentelemetry-instrument"), sys.executable, "app.py", str(flag)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(OTEL_METRICS_EXPORTER="prometheus", OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
                 OTEL_EXPORTER_PROMETHEUS_PORT=str(port)),
    )
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the app never got ready"
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        flag.unlink(missing_ok=True)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.communicate()
    series = r'_total\{kotoba_memory_cache_name="zero-code",otel_scope_name="kotoba-memory"[^}]*\} '
    assert re.search("kotoba_memory_cache_hits" + series + r"2\.0$", text, re.M), text
    assert re.search("kotoba_memory_cache_misses" + series + r"1\.0$", text, re.M), text
    assert "process_memory_usage_bytes" in text
