"""A Django cache under gunicorn: ``KotobaCache`` with ``OPTIONS={"REDIS_URL": ...}`` in a plain WSGI app.

``GET /set?k=..&v=..``, ``/get?k=..``, ``/getorset?k=..`` (the factory answers "source"); each answer
names the worker (pid) and its near-cache's breaker state. ``NEAR_REDIS_URL`` and ``NEAR_NAMESPACE``
come from the environment.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qs

import django
from django.conf import settings

settings.configure(
    SECRET_KEY="near-app-secret",
    CACHES={
        "default": {
            "BACKEND": "kotoba_memory_integrations.django.KotobaCache",
            "LOCATION": "near-app",
            "TIMEOUT": 300,
            "OPTIONS": {
                "REDIS_URL": os.environ["NEAR_REDIS_URL"],
                "NAMESPACE": os.environ["NEAR_NAMESPACE"],
                "SOCKET_TIMEOUT": 0.05,
            },
        }
    },
)
django.setup()

from django.core.cache import cache  # noqa: E402


def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = environ.get("PATH_INFO", "/")
    body: dict[str, Any] = {"pid": os.getpid()}
    if path == "/set":
        cache.set(query["k"], query["v"])
    elif path == "/get":
        body["v"] = cache.get(query["k"])
    elif path == "/getorset":
        body["v"] = cache.get_or_set(query["k"], lambda: "source")
    stats = cache.stats()  # type: ignore[attr-defined]
    body["breaker_open"] = stats.breaker_open
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
