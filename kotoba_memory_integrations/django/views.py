"""The packaged report view: the memory report of every worker of the server, for staff or a token.

Include its URLs under a prefix of your choice::

    urlpatterns = [..., path("_kotoba/", include("kotoba_memory_integrations.django.urls"))]
    # GET /_kotoba/report[?format=text|json|html]

Access, as with the Flask endpoint, is never anonymous: an active staff user (with Django's
authentication middleware), ``Authorization: Bearer <KOTOBA_MEMORY_REPORT_TOKEN>`` (compared in
constant time), or ``KOTOBA_MEMORY_REPORT_AUTH`` (a ``callable(request) -> bool`` or its dotted path)
returning True. Without credentials the answer is 401 when a token is configured, 403 otherwise; with
wrong ones 403. The report lists every process of the server from the fleet spool (``workers``).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.utils.module_loading import import_string
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

__all__ = ["report", "report_access_errors"]


def report_access_errors() -> list[tuple[str, str]]:
    """``(setting, problem)`` for each invalid ``KOTOBA_MEMORY_REPORT_TOKEN`` / ``_AUTH`` setting."""
    errors: list[tuple[str, str]] = []
    token = getattr(settings, "KOTOBA_MEMORY_REPORT_TOKEN", None)
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        errors.append(("KOTOBA_MEMORY_REPORT_TOKEN", "must be a string of at least 16 characters"))
    elif isinstance(token, str) and any(c.isspace() for c in token):
        errors.append(("KOTOBA_MEMORY_REPORT_TOKEN", "must not contain whitespace (it could never match)"))
    auth = getattr(settings, "KOTOBA_MEMORY_REPORT_AUTH", None)
    if isinstance(auth, str):
        try:
            auth = import_string(auth)
        except ImportError as exc:
            errors.append(("KOTOBA_MEMORY_REPORT_AUTH", f"cannot import {auth!r}: {exc}"))
            return errors
    if auth is not None and not callable(auth):
        errors.append(("KOTOBA_MEMORY_REPORT_AUTH", "must be a callable(request) -> bool or its dotted path"))
    return errors


def _settings() -> tuple[str | None, Callable[[HttpRequest], Any] | None]:
    errors = report_access_errors()
    if errors:
        name, problem = errors[0]
        raise ImproperlyConfigured(f"{name} {problem}")
    auth = getattr(settings, "KOTOBA_MEMORY_REPORT_AUTH", None)
    if isinstance(auth, str):
        auth = import_string(auth)
    return getattr(settings, "KOTOBA_MEMORY_REPORT_TOKEN", None), auth


def _denied(request: HttpRequest) -> HttpResponse | None:
    """None when ``request`` may read the report, else the 401/403 answer."""
    token, auth = _settings()
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_active", False) and getattr(user, "is_staff", False):
        return None
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    presented = credentials.strip() if scheme.lower() == "bearer" else ""
    if token is not None and presented and hmac.compare_digest(presented.encode(), token.encode()):
        return None
    if auth is not None and auth(request) is True:
        return None
    if not presented and token is not None:
        response = HttpResponse("authentication required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="kotoba-memory"'
        return response
    return HttpResponse("forbidden\n", status=403, content_type="text/plain")


@never_cache
@require_GET
def report(request: HttpRequest) -> HttpResponse:
    """This server's memory report: text (default), ``?format=json`` or ``?format=html``."""
    denied = _denied(request)
    if denied is not None:
        return denied
    fmt = request.GET.get("format", "text")
    if fmt not in ("text", "json", "html"):
        return HttpResponseBadRequest("format must be one of text, json, html\n", content_type="text/plain")
    from kotoba_memory_integrations.runtime import current_report

    result = current_report()
    if result is None:
        return HttpResponse(
            "kotoba-memory optimizer is not running in this process\n", status=503, content_type="text/plain"
        )
    if fmt == "json":
        return HttpResponse(json.dumps(result.to_dict(), default=str), content_type="application/json")
    if fmt == "html":
        return HttpResponse(result.to_html(), content_type="text/html; charset=utf-8")
    return HttpResponse(result.summary(), content_type="text/plain; charset=utf-8")
