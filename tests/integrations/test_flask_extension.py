"""The Flask ``KotobaMemory`` extension: config keys, route labels, the protected report endpoint."""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytest.importorskip("flask")

from flask import Flask, Response, request
from flask.testing import FlaskClient

from kotoba_memory.errors import ConfigError
from kotoba_memory_integrations import request as _request
from kotoba_memory_integrations.flask import EXTENSION_KEY, KotobaMemory
from kotoba_memory_integrations.request import DEFAULT_RSS_SAMPLE_BUDGET, RequestMetrics
from kotoba_memory_integrations.wsgi import MemoryMiddleware

TOKEN = "s3cret-token-for-tests-0123456789"
ENDPOINT = "KOTOBA_MEMORY_REPORT_ENDPOINT"


class BufferedClient(FlaskClient):
    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture()
def seen() -> Any:
    items: list[RequestMetrics] = []
    lock = threading.Lock()

    def listener(metrics: RequestMetrics) -> None:
        with lock:
            items.append(metrics)

    _request.add_request_listener(listener)
    yield items
    _request.remove_request_listener(listener)


def make_app(**config: Any) -> Flask:
    """An app whose test client buffers responses, i.e. closes them like a real server does."""
    app = Flask(__name__)
    app.test_client_class = BufferedClient
    app.config.update({"KOTOBA_MEMORY_AUTOSTART": False, **config})

    @app.get("/users/<int:user_id>")
    def user(user_id: int) -> str:
        return f"user {user_id}"

    @app.get("/fail")
    def fail() -> str:
        raise LookupError("no such thing")

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Any:
            yield "a"
            yield "b"

        return Response(body())

    return app


def test_routes_are_url_rules_not_paths(seen: list[RequestMetrics]) -> None:
    app = make_app()
    KotobaMemory(app)
    assert isinstance(app.wsgi_app, MemoryMiddleware)
    client = app.test_client()
    assert client.get("/users/1").text == "user 1"
    assert client.get("/users/2").text == "user 2"
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/stream").text == "ab"
    assert [(m.route, m.status) for m in seen] == [
        ("/users/<int:user_id>", 200),
        ("/users/<int:user_id>", 200),
        ("unmatched", 404),
        ("/stream", 200),
    ]


def test_view_exception_becomes_500_and_is_recorded(seen: list[RequestMetrics]) -> None:
    app = make_app()
    KotobaMemory(app)
    assert app.test_client().get("/fail").status_code == 500
    [m] = seen
    assert (m.route, m.status) == ("/fail", 500)


def test_propagated_exception_is_reraised_and_recorded(seen: list[RequestMetrics]) -> None:
    app = make_app(PROPAGATE_EXCEPTIONS=True)
    KotobaMemory(app)
    with pytest.raises(LookupError, match="no such thing"):
        app.test_client().get("/fail")
    [m] = seen
    assert (m.route, m.status, m.error) == ("/fail", 500, "LookupError")


def test_rss_sample_every_reaches_the_middleware(seen: list[RequestMetrics]) -> None:
    app = make_app(KOTOBA_MEMORY_RSS_SAMPLE_EVERY=2, KOTOBA_MEMORY_RSS_SAMPLE_BUDGET=None)
    KotobaMemory(app)
    assert app.wsgi_app.recorder.every == 2  # type: ignore[attr-defined]
    assert app.wsgi_app.recorder.rss_sample_budget is None  # type: ignore[attr-defined]
    client = app.test_client()
    for user_id in range(400):
        client.get(f"/users/{user_id}")
    assert len(seen) == 400
    assert 200 - 60 <= sum(m.sampled for m in seen) <= 200 + 60  # a 1/2 chance each: six sigma
    seen.clear()
    app = make_app(KOTOBA_MEMORY_RSS_SAMPLE_EVERY=1)
    KotobaMemory(app)
    for user_id in range(20):
        app.test_client().get(f"/users/{user_id}")
    assert len(seen) == 20 and all(m.sampled for m in seen)
    app = make_app(KOTOBA_MEMORY_RSS_SAMPLE_BUDGET=0.02)
    KotobaMemory(app)
    assert app.wsgi_app.recorder.rss_sample_budget == 0.02  # type: ignore[attr-defined]
    app = make_app()
    KotobaMemory(app)
    assert app.wsgi_app.recorder.rss_sample_budget == DEFAULT_RSS_SAMPLE_BUDGET  # type: ignore[attr-defined]


def test_init_app_factory_pattern_and_overrides() -> None:
    memory = KotobaMemory(enabled=False)
    app = make_app()
    memory.init_app(app)
    assert not isinstance(app.wsgi_app, MemoryMiddleware)
    assert app.extensions[EXTENSION_KEY].memory_config.cache_size_mb > 0
    with pytest.raises(RuntimeError, match="already initialised"):
        memory.init_app(app)


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"KOTOBA_MEMORY_CACHE_SIZE_MBB": 3}, "KOTOBA_MEMORY_CACHE_SIZE_MBB"),
        ({"KOTOBA_MEMORY_ENABLED": "yes"}, "KOTOBA_MEMORY_ENABLED"),
        ({"KOTOBA_MEMORY_REPORT_ENDPOINT": "/r"}, "KOTOBA_MEMORY_REPORT_ENDPOINT"),
        ({ENDPOINT: "r", "KOTOBA_MEMORY_REPORT_TOKEN": TOKEN}, ENDPOINT),
        ({ENDPOINT: "/r", "KOTOBA_MEMORY_REPORT_TOKEN": "short"}, "KOTOBA_MEMORY_REPORT_TOKEN"),
        ({ENDPOINT: "/r", "KOTOBA_MEMORY_REPORT_AUTH": "admin"}, "KOTOBA_MEMORY_REPORT_AUTH"),
        ({"KOTOBA_MEMORY_CACHE_SIZE_MB": -1}, "cache_size_mb"),
        ({"KOTOBA_MEMORY_RSS_SAMPLE_EVERY": 0}, "KOTOBA_MEMORY_RSS_SAMPLE_EVERY"),
        ({"KOTOBA_MEMORY_RSS_SAMPLE_BUDGET": 0}, "KOTOBA_MEMORY_RSS_SAMPLE_BUDGET"),
        ({"KOTOBA_MEMORY_RSS_SAMPLE_BUDGET": "0.01"}, "KOTOBA_MEMORY_RSS_SAMPLE_BUDGET"),
        # issue 11, item 10: a misspelt prefix used to be ignored, an all-space token never matched
        ({"KOTOBA_MEMROY_CACHE_SIZE_MB": 3}, "KOTOBA_MEMROY_CACHE_SIZE_MB"),
        ({"kotoba_memory_cache_size_mb": 3}, "kotoba_memory_cache_size_mb"),
        ({ENDPOINT: "/r", "KOTOBA_MEMORY_REPORT_TOKEN": " " * 20}, "KOTOBA_MEMORY_REPORT_TOKEN"),
        ({ENDPOINT: "/r", "KOTOBA_MEMORY_REPORT_TOKEN": TOKEN + " "}, "KOTOBA_MEMORY_REPORT_TOKEN"),
    ],
)
def test_bad_config_raises_naming_the_key_and_installs_nothing(config: dict[str, Any], key: str) -> None:
    app = make_app(**config)
    original = app.wsgi_app
    with pytest.raises(ConfigError) as info:
        KotobaMemory(app)
    assert info.value.field == key
    assert app.wsgi_app == original
    assert EXTENSION_KEY not in app.extensions


def test_report_endpoint_is_off_by_default() -> None:
    app = make_app()
    KotobaMemory(app)
    client = app.test_client()
    assert client.get("/_kotoba/report").status_code == 404
    assert client.get("/_kotoba/report", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_report_endpoint_token_auth() -> None:
    app = make_app(KOTOBA_MEMORY_REPORT_ENDPOINT="/_kotoba/report", KOTOBA_MEMORY_REPORT_TOKEN=TOKEN)
    KotobaMemory(app)
    client = app.test_client()
    anonymous = client.get("/_kotoba/report")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert "memory" not in anonymous.text.lower().replace("kotoba-memory", "")
    assert client.get("/_kotoba/report", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/_kotoba/report", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get("/_kotoba/report", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 403
    # Authorised, but autostart is off here: no optimizer in this process.
    assert client.get("/_kotoba/report", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 503


def test_report_endpoint_callable_auth() -> None:
    def is_admin(req: Any) -> bool:
        return req.headers.get("X-Role") == "admin"

    app = make_app(KOTOBA_MEMORY_REPORT_ENDPOINT="/_kotoba/report", KOTOBA_MEMORY_REPORT_AUTH=is_admin)
    KotobaMemory(app)
    client = app.test_client()
    assert client.get("/_kotoba/report").status_code == 403
    assert client.get("/_kotoba/report", headers={"X-Role": "user"}).status_code == 403
    assert client.get("/_kotoba/report", headers={"X-Role": "admin"}).status_code == 503


def test_report_endpoint_serves_the_running_optimizers_report() -> None:
    pytest.importorskip("kotoba_memory.optimizer")
    from kotoba_memory_integrations import runtime

    app = make_app(
        KOTOBA_MEMORY_AUTOSTART=True,
        KOTOBA_MEMORY_REPORT_ENDPOINT="/_kotoba/report",
        KOTOBA_MEMORY_REPORT_TOKEN=TOKEN,
        KOTOBA_MEMORY_ENABLE_LEAK_DETECTION=False,
    )
    KotobaMemory(app)
    try:
        assert KotobaMemory.optimizer(app) is runtime.get_optimizer() is not None
        client = app.test_client()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        client.get("/users/5")
        text = client.get("/_kotoba/report", headers=auth)
        assert text.status_code == 200 and text.mimetype == "text/plain" and text.text.strip()
        as_json = client.get("/_kotoba/report?format=json", headers=auth)
        assert as_json.status_code == 200 and isinstance(as_json.get_json(), dict)
        html = client.get("/_kotoba/report?format=html", headers=auth)
        assert html.status_code == 200 and "<html" in html.text.lower()
        assert client.get("/_kotoba/report?format=xml", headers=auth).status_code == 400
        assert runtime.get_optimizer() is not None  # reporting did not end monitoring
    finally:
        runtime.stop_optimizer()


def test_kotoba_cache_is_re_exported() -> None:
    pytest.importorskip("flask_caching")
    from kotoba_memory_integrations.flask import KotobaCache
    from kotoba_memory_integrations.flask.caching import KotobaCache as Original

    assert KotobaCache is Original
    with pytest.raises(AttributeError):
        from kotoba_memory_integrations import flask as module

        module.NoSuchName  # noqa: B018


def test_request_context_is_untouched_by_the_extension() -> None:
    app = make_app()
    KotobaMemory(app)

    @app.get("/echo")
    def echo() -> str:
        return request.path

    assert app.test_client().get("/echo").text == "/echo"
