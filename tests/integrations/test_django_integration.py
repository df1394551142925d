"""Django: middleware (sync, async, streaming, exceptions, outer WSGI/ASGI), checks, app config, command."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

from django.core.checks import Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path

from kotoba_memory_integrations import request as _request
from kotoba_memory_integrations import runtime
from kotoba_memory_integrations.django import checks
from kotoba_memory_integrations.django.apps import KotobaMemoryConfig, start_from_settings
from kotoba_memory_integrations.django.middleware import route_of, wrap_asgi, wrap_wsgi
from kotoba_memory_integrations.request import DEFAULT_RSS_SAMPLE_BUDGET, RequestMetrics

MIDDLEWARE_PATH = "kotoba_memory_integrations.django.middleware.MemoryMiddleware"


def item(request: HttpRequest, pk: int) -> HttpResponse:
    return HttpResponse(f"item {pk}")


async def aitem(request: HttpRequest, pk: int) -> HttpResponse:
    await asyncio.sleep(0)
    return HttpResponse(f"aitem {pk}")


def boom(request: HttpRequest) -> HttpResponse:
    raise KeyError("missing")


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def rows() -> Iterator[bytes]:
        for i in range(3):
            yield b"row%d\n" % i

    return StreamingHttpResponse(rows())


def astream(request: HttpRequest) -> StreamingHttpResponse:
    async def rows() -> Any:
        for i in range(2):
            yield b"arow%d\n" % i

    return StreamingHttpResponse(rows())


class URLS:
    """A URLconf object (Django accepts any hashable object with ``urlpatterns``)."""

    urlpatterns = [
        path("items/<int:pk>/", item),
        path("aitems/<int:pk>/", aitem),
        path("boom/", boom),
        path("stream/", stream),
        path("astream/", astream),
    ]


@pytest.fixture()
def seen() -> Iterator[list[RequestMetrics]]:
    items: list[RequestMetrics] = []
    lock = threading.Lock()

    def listener(metrics: RequestMetrics) -> None:
        with lock:
            items.append(metrics)

    _request.add_request_listener(listener)
    with override_settings(ROOT_URLCONF=URLS, MIDDLEWARE=[MIDDLEWARE_PATH]):
        yield items
    _request.remove_request_listener(listener)


def test_route_is_the_url_pattern(seen: list[RequestMetrics]) -> None:
    client = Client()
    assert client.get("/items/1/").content == b"item 1"
    assert client.get("/items/22/").content == b"item 22"
    assert client.get("/nothing/here/").status_code == 404
    assert [(m.route, m.status, m.method) for m in seen] == [
        ("/items/<int:pk>/", 200, "GET"),
        ("/items/<int:pk>/", 200, "GET"),
        ("unmatched", 404, "GET"),
    ]


def test_view_exception_is_recorded_with_500(seen: list[RequestMetrics]) -> None:
    response = Client(raise_request_exception=False).get("/boom/")
    assert response.status_code == 500
    [m] = seen
    assert (m.route, m.status, m.error) == ("/boom/", 500, "KeyError")


def test_streaming_response_finishes_on_close(seen: list[RequestMetrics]) -> None:
    response = Client().get("/stream/")
    assert seen == []  # still streaming
    assert b"".join(response.streaming_content) == b"row0\nrow1\nrow2\n"
    response.close()
    [m] = seen
    assert (m.route, m.status, m.error) == ("/stream/", 200, None)


def test_async_view_and_async_streaming(seen: list[RequestMetrics]) -> None:
    async def run() -> tuple[bytes, bytes]:
        client = AsyncClient()
        first = await client.get("/aitems/7/")
        streamed = await client.get("/astream/")
        chunks = [chunk async for chunk in streamed.streaming_content]
        streamed.close()
        return first.content, b"".join(chunks)

    content, streamed = asyncio.run(run())
    assert content == b"aitem 7"
    assert streamed == b"arow0\narow1\n"
    assert [(m.route, m.status) for m in seen] == [("/aitems/<int:pk>/", 200), ("/astream/", 200)]


def wsgi_environ(path_info: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path_info,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
    }


def test_outer_wsgi_middleware_gets_the_route_and_measures_once(seen: list[RequestMetrics]) -> None:
    app = wrap_wsgi(WSGIHandler())
    statuses: list[str] = []
    result = app(wsgi_environ("/items/3/"), lambda status, headers, exc_info=None: statuses.append(status))
    assert b"".join(result) == b"item 3"
    result.close()
    assert statuses == ["200 OK"]
    assert [(m.route, m.status) for m in seen] == [("/items/<int:pk>/", 200)]


def test_outer_asgi_middleware_gets_the_route(seen: list[RequestMetrics]) -> None:
    app = wrap_asgi(ASGIHandler())
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
            "scheme": "http", "path": "/aitems/5/", "raw_path": b"/aitems/5/", "query_string": b"",
            "root_path": "", "headers": [(b"host", b"testserver")], "server": ("testserver", 80),
            "client": ("127.0.0.1", 1234),
        }
        await app(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"aitem 5"
    assert [(m.route, m.status) for m in seen] == [("/aitems/<int:pk>/", 200)]


def test_route_of_before_resolving_is_none() -> None:
    assert route_of(HttpRequest()) is None


# -- system checks ------------------------------------------------------------------------------


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def test_checks_accept_good_settings() -> None:
    with override_settings(KOTOBA_MEMORY={"cache_size_mb": 32}, KOTOBA_MEMORY_AUTOSTART=False):
        assert checks.check_settings() == []


@pytest.mark.parametrize(
    ("settings", "expected_id", "field"),
    [
        ({"KOTOBA_MEMORY": ["cache_size_mb", 3]}, "kotoba_memory.E001", "KOTOBA_MEMORY"),
        ({"KOTOBA_MEMORY": {"cache_size_mb": -5}}, "kotoba_memory.E002", "cache_size_mb"),
        ({"KOTOBA_MEMORY": {"cache_sise_mb": 5}}, "kotoba_memory.E002", "cache_sise_mb"),
        ({"KOTOBA_MEMORY_AUTOSTART": "yes"}, "kotoba_memory.E003", "KOTOBA_MEMORY_AUTOSTART"),
        ({"KOTOBA_MEMORY_OTEL": 1}, "kotoba_memory.E003", "KOTOBA_MEMORY_OTEL"),
        ({"KOTOBA_MEMORY_RSS_SAMPLE_EVERY": 0}, "kotoba_memory.E004", "KOTOBA_MEMORY_RSS_SAMPLE_EVERY"),
        ({"KOTOBA_MEMORY_RSS_SAMPLE_BUDGET": 2}, "kotoba_memory.E004", "KOTOBA_MEMORY_RSS_SAMPLE_BUDGET"),
    ],
)
def test_checks_report_bad_settings_by_field(settings: dict[str, Any], expected_id: str, field: str) -> None:
    with override_settings(**settings):
        messages = checks.check_settings()
    assert ids(messages) == [expected_id]
    assert isinstance(messages[0], Error)
    assert field in messages[0].msg


def test_middleware_check() -> None:
    with override_settings(MIDDLEWARE=[]):
        [message] = checks.check_middleware()
    assert isinstance(message, Warning) and message.id == "kotoba_memory.W001"
    with override_settings(MIDDLEWARE=[MIDDLEWARE_PATH]):
        assert checks.check_middleware() == []


def test_registered_checks_run_through_djangos_framework() -> None:
    from django.core import checks as django_checks

    checks.register_checks()
    with override_settings(KOTOBA_MEMORY={"cache_size_mb": "lots"}, MIDDLEWARE=[MIDDLEWARE_PATH]):
        messages = django_checks.run_checks(tags=["kotoba_memory"])
    assert ids(messages) == ["kotoba_memory.E002"]


# -- app config and command ----------------------------------------------------------------------


@pytest.fixture()
def no_optimizer() -> Iterator[None]:
    runtime.stop_optimizer()
    yield
    runtime.stop_optimizer()


QUIET = {"enable_leak_detection": False, "monitoring_interval_ms": 100}


def test_app_config_starts_one_optimizer_per_process(no_optimizer: None) -> None:
    config = KotobaMemoryConfig.create("kotoba_memory_integrations.django")
    assert config.label == "kotoba_memory"
    with override_settings(KOTOBA_MEMORY={"cache_size_mb": 8, **QUIET}):
        config.ready()
        first = runtime.get_optimizer()
        assert first is not None and first.config.cache_size_mb == 8
        config.ready()  # Django may call ready() again (tests, reloads): still one optimizer
        assert runtime.get_optimizer() is first


def test_app_config_with_autostart_off_or_absent_settings_starts_nothing(no_optimizer: None) -> None:
    with override_settings(KOTOBA_MEMORY={"cache_size_mb": 8}, KOTOBA_MEMORY_AUTOSTART=False):
        assert start_from_settings() is None
    assert start_from_settings() is None  # KOTOBA_MEMORY absent: installed but not started
    assert runtime.get_optimizer() is None


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"KOTOBA_MEMORY": {"cache_size_mb": -1}}, "KOTOBA_MEMORY['cache_size_mb']"),
        ({"KOTOBA_MEMORY": {"cache_sise_mb": 8}}, "KOTOBA_MEMORY['cache_sise_mb']"),  # a typo in the dict
        ({"KOTOBA_MEMORY": [("cache_size_mb", 8)]}, "KOTOBA_MEMORY"),
        ({"KOTOBA_MEMROY": {"cache_size_mb": 8}}, "KOTOBA_MEMROY"),  # a misspelt setting name
        ({"KOTOBA_MEMORY_AUTOSTART": "yes", "KOTOBA_MEMORY": {}}, "KOTOBA_MEMORY_AUTOSTART"),
        ({"KOTOBA_MEMORY_RSS_SAMPLE_EVERY": 0}, "KOTOBA_MEMORY_RSS_SAMPLE_EVERY"),
        ({"KOTOBA_MEMORY_RSS_SAMPLE_BUDGET": -0.5}, "KOTOBA_MEMORY_RSS_SAMPLE_BUDGET"),
    ],
)
def test_bad_settings_fail_start_up_naming_the_setting(no_optimizer: None, settings: dict[str, Any],
                                                        named: str) -> None:
    """Issue 11, item 10: gunicorn runs no checks, so ready() itself must refuse bad settings."""
    with override_settings(**settings), pytest.raises(ImproperlyConfigured) as info:
        start_from_settings()
    assert named in str(info.value)
    assert runtime.get_optimizer() is None


def test_report_command_checks_the_html_path_before_stopping_the_optimizer(no_optimizer: None,
                                                                           tmp_path: Path) -> None:
    """Issue 11, item 10: an unwritable --html path fails first; the app's optimizer keeps running."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with override_settings(KOTOBA_MEMORY=QUIET):
        start_from_settings()
        running = runtime.get_optimizer()
        assert running is not None
        with pytest.raises(CommandError, match="--html"):
            call_command(command(), "--html", str(blocker / "dir" / "x.html"), stdout=io.StringIO())
        assert runtime.get_optimizer() is running and running.running


def command() -> Any:
    return load_command_class("kotoba_memory_integrations.django", "kotoba_memory_report")


def test_report_command_prints_summary_and_writes_html(no_optimizer: None, tmp_path: Path) -> None:
    out = io.StringIO()
    target = tmp_path / "report.html"
    with override_settings(KOTOBA_MEMORY={"cache_size_mb": 4, **QUIET}):
        call_command(command(), "--html", str(target), "--duration", "0.3", stdout=out)
    text = out.getvalue()
    assert "kotoba-memory report" in text
    assert f"HTML report written to {target}" in text
    assert "<html" in target.read_text().lower()
    assert runtime.get_optimizer() is None  # the command's report ends its run


def test_report_command_json_and_errors(no_optimizer: None) -> None:
    import json

    out = io.StringIO()
    with override_settings(KOTOBA_MEMORY=QUIET):
        call_command(command(), "--json", stdout=out)
    assert "stats" in json.loads(out.getvalue())
    bad = override_settings(KOTOBA_MEMORY={"pool_size_mb": "big"})
    with bad, pytest.raises(CommandError, match="pool_size_mb"):
        call_command(command(), stdout=io.StringIO())
    with pytest.raises(CommandError, match="duration"):
        call_command(command(), "--duration", "-1", stdout=io.StringIO())


def test_rss_sampling_settings_reach_the_recorder() -> None:
    with override_settings(KOTOBA_MEMORY_RSS_SAMPLE_EVERY=3, KOTOBA_MEMORY_RSS_SAMPLE_BUDGET=0.02):
        wrapped = wrap_wsgi(WSGIHandler())
    assert (wrapped.recorder.every, wrapped.recorder.rss_sample_budget) == (3, 0.02)
    with override_settings(KOTOBA_MEMORY_RSS_SAMPLE_BUDGET=None):
        assert wrap_wsgi(WSGIHandler()).recorder.rss_sample_budget is None
    with override_settings(KOTOBA_MEMORY_RSS_SAMPLE_BUDGET="cheap"):  # invalid: E004 says why
        assert wrap_asgi(ASGIHandler()).recorder.rss_sample_budget == DEFAULT_RSS_SAMPLE_BUDGET
    assert wrap_wsgi(WSGIHandler()).recorder.rss_sample_budget == DEFAULT_RSS_SAMPLE_BUDGET
