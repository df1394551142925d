"""The packaged Django report view (staff, token, auth callable; workers listed) and the Flask
endpoint's fleet rows, in-process; the real multi-worker servers are in test_fleet_servers.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")
pytest.importorskip("flask")

from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory, override_settings
from django.urls import include, path, reverse
from flask import Flask

from kotoba_memory.config import MemoryConfig
from kotoba_memory.errors import ConfigError
from kotoba_memory_integrations import runtime
from kotoba_memory_integrations.django import checks
from kotoba_memory_integrations.django.views import report
from kotoba_memory_integrations.flask import KotobaMemory

TOKEN = "view-test-token-0123456789abcdef"
QUIET = MemoryConfig(enable_leak_detection=False, monitoring_interval_ms=100)


@pytest.fixture()
def optimizer() -> Iterator[None]:
    runtime.stop_optimizer()
    runtime.start_optimizer(QUIET)
    runtime.serving()  # as a middleware would: this process joins the fleet
    yield
    runtime.stop_optimizer()


def get(user: Any = None, **extra: Any) -> Any:
    params = extra.pop("data", {})
    request = RequestFactory().get("/_kotoba/report", params, **extra)
    if user is not None:
        request.user = user
    return report(request)


def staff(active: bool = True, is_staff: bool = True) -> User:
    return User(username="ops", is_staff=is_staff, is_active=active)


def allow_header(request: Any) -> bool:
    return bool(request.headers.get("X-Ops") == "yes")


@override_settings(KOTOBA_MEMORY_REPORT_TOKEN=TOKEN)
def test_token_protects_the_view_like_the_flask_endpoint(optimizer: None) -> None:
    anonymous = get(AnonymousUser())
    assert anonymous.status_code == 401 and anonymous["WWW-Authenticate"] == 'Bearer realm="kotoba-memory"'
    assert b"kotoba-memory report" not in anonymous.content
    assert get(HTTP_AUTHORIZATION="Bearer nope").status_code == 403
    assert get(HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 401
    text = get(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert text.status_code == 200 and b"kotoba-memory report" in text.content
    assert "no-cache" in text["Cache-Control"]
    data = json.loads(get(HTTP_AUTHORIZATION=f"Bearer {TOKEN}", data={"format": "json"}).content)
    mine = [row for row in data["workers"] if row["pid"] == os.getpid()]
    assert len(mine) == 1 and mine[0]["optimizer"] is True and data["fleet"]["workers"] >= 1
    html = get(HTTP_AUTHORIZATION=f"Bearer {TOKEN}", data={"format": "html"})
    assert b"<h2>Workers</h2>" in html.content
    assert get(HTTP_AUTHORIZATION=f"Bearer {TOKEN}", data={"format": "xml"}).status_code == 400
    post = report(RequestFactory().post("/_kotoba/report", HTTP_AUTHORIZATION=f"Bearer {TOKEN}"))
    assert post.status_code == 405


def test_staff_users_and_the_auth_callable(optimizer: None) -> None:
    assert get(staff()).status_code == 200
    assert get(staff(active=False)).status_code == 403
    assert get(staff(is_staff=False)).status_code == 403
    assert get(AnonymousUser()).status_code == 403  # nothing configured: no anonymous access at all
    with override_settings(KOTOBA_MEMORY_REPORT_AUTH=f"{__name__}.allow_header"):
        assert get(AnonymousUser(), HTTP_X_OPS="yes").status_code == 200
        assert get(AnonymousUser(), HTTP_X_OPS="no").status_code == 403
    with override_settings(KOTOBA_MEMORY_REPORT_AUTH=allow_header):
        assert get(HTTP_X_OPS="yes").status_code == 200


def test_no_optimizer_is_503() -> None:
    runtime.stop_optimizer()
    answer = get(staff())
    assert answer.status_code == 503 and b"not running" in answer.content


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"KOTOBA_MEMORY_REPORT_TOKEN": "short"}, "at least 16"),
        ({"KOTOBA_MEMORY_REPORT_TOKEN": "has a space in the middle"}, "whitespace"),
        ({"KOTOBA_MEMORY_REPORT_AUTH": "no.such.module.fn"}, "cannot import"),
        ({"KOTOBA_MEMORY_REPORT_AUTH": 42}, "callable"),
        ({"KOTOBA_MEMORY_FLEET": ""}, "KOTOBA_MEMORY_FLEET"),
    ],
)
def test_bad_settings_are_named_by_the_view_and_by_checks(settings: dict[str, Any], problem: str) -> None:
    with override_settings(**settings):
        messages = [m for m in checks.check_settings() if m.id == "kotoba_memory.E005"]
        assert len(messages) == 1 and problem in messages[0].msg
        if "KOTOBA_MEMORY_FLEET" not in settings:
            with pytest.raises(ImproperlyConfigured, match=problem):
                get(staff())


class Urls:
    urlpatterns = [path("_kotoba/", include("kotoba_memory_integrations.django.urls"))]


@override_settings(ROOT_URLCONF=Urls)
def test_urls_are_included_under_a_prefix() -> None:
    assert reverse("kotoba_memory:report") == "/_kotoba/report"


def test_flask_endpoint_lists_the_workers_and_checks_the_fleet_setting() -> None:
    runtime.stop_optimizer()
    app = Flask("fleet_test_app")
    app.config.update(
        KOTOBA_MEMORY_REPORT_ENDPOINT="/_kotoba/report", KOTOBA_MEMORY_REPORT_TOKEN=TOKEN,
        KOTOBA_MEMORY_ENABLE_LEAK_DETECTION=False,
    )
    KotobaMemory(app)
    try:
        answer = app.test_client().get(
            "/_kotoba/report?format=json", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert answer.status_code == 200
        rows = answer.get_json()["workers"]
        assert os.getpid() in [row["pid"] for row in rows]
    finally:
        runtime.stop_optimizer()
    for bad in ("", 3, None):
        broken = Flask("fleet_test_bad")
        broken.config["KOTOBA_MEMORY_FLEET"] = bad
        with pytest.raises(ConfigError, match="KOTOBA_MEMORY_FLEET"):
            KotobaMemory(broken)


def test_configure_fleet_rejects_bad_names() -> None:
    with pytest.raises(TypeError, match="fleet name"):
        runtime.configure_fleet("  ")
    with pytest.raises(ValueError, match="interval_s"):
        runtime.configure_fleet(True, interval_s=0)


def test_a_spool_others_may_write_into_is_named_in_the_report_and_not_read(tmp_path: Path) -> None:
    from kotoba_memory.fleet import FleetSpool

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    runtime.stop_optimizer()
    optimizer = runtime.start_optimizer(QUIET)
    try:
        result = runtime.with_fleet(optimizer.report(), FleetSpool(shared), viewer_pid=os.getpid())
    finally:
        runtime.stop_optimizer()
    assert result.workers == [] and "writable by others" in result.fleet["error"]  # type: ignore[index]
    assert "workers: not listed (fleet spool" in result.summary()
