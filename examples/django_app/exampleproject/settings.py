"""Settings of the Django example: SQLite, kotoba-memory's app, middleware, cache backend and metrics.

Environment: ``KOTOBA_EXAMPLE_DATA_DIR`` (where the SQLite file lives, default the temp dir),
``KOTOBA_EXAMPLE_LEAK=1`` (turns on the leaking view), ``KOTOBA_EXAMPLE_REPORT_TOKEN`` (enables the
token-protected report view), ``KOTOBA_EXAMPLE_REPORT_DIR``, ``KOTOBA_EXAMPLE_LEAK_WINDOW_INTERVAL_S``,
``KOTOBA_EXAMPLE_LEAK_TRACE_BUDGET`` (``none``: every window of a diagnosis duty cycle runs),
``KOTOBA_EXAMPLE_REDIS_URL`` (the cache becomes the near-cache over that Redis, shared by every worker).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DATA_DIR = Path(os.environ.get("KOTOBA_EXAMPLE_DATA_DIR") or tempfile.gettempdir())

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "kotoba-memory-example-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "kotoba_memory_integrations.django",
    "library",
]

MIDDLEWARE = [
    "kotoba_memory_integrations.django.middleware.MemoryMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "exampleproject.urls"
WSGI_APPLICATION = "exampleproject.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "kotoba-django-example.sqlite3",
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

CACHES = {
    "default": {
        "BACKEND": "kotoba_memory_integrations.django.KotobaCache",
        "LOCATION": "example-django",
        "TIMEOUT": 30,
        "OPTIONS": {"MAX_ENTRIES": 2000},
    }
}
if os.environ.get("KOTOBA_EXAMPLE_REDIS_URL"):  # one cache for every worker: the near-cache over Redis
    CACHES["default"]["OPTIONS"] = {"REDIS_URL": os.environ["KOTOBA_EXAMPLE_REDIS_URL"]}

KOTOBA_MEMORY = {
    "enable_profiling": True,
    "enable_leak_detection": True,
    "enable_gc_optimization": os.environ.get("KOTOBA_EXAMPLE_GC", "1") == "1",  # 0: benchmarks/gc_servers.py
    "monitoring_interval_ms": int(os.environ.get("KOTOBA_EXAMPLE_MONITORING_INTERVAL_MS", "1000")),
    "leak_window_interval_s": float(os.environ.get("KOTOBA_EXAMPLE_LEAK_WINDOW_INTERVAL_S", "60")),
    "report_dir": os.environ.get("KOTOBA_EXAMPLE_REPORT_DIR") or str(DATA_DIR / "kotoba-reports"),
}
if budget := os.environ.get("KOTOBA_EXAMPLE_LEAK_TRACE_BUDGET"):
    # Unset: the library's default; "none": windows on the fixed schedule (a diagnosis duty cycle), not
    # spaced out by their cost.
    KOTOBA_MEMORY["leak_trace_budget"] = None if budget.lower() == "none" else float(budget)
KOTOBA_MEMORY_OTEL = os.environ.get("KOTOBA_EXAMPLE_METRICS", "1") == "1"
# RSS measured on one request in N on average (default 8; 1: every request).
KOTOBA_MEMORY_RSS_SAMPLE_EVERY = int(os.environ.get("KOTOBA_EXAMPLE_RSS_SAMPLE_EVERY", "8"))

EXAMPLE_LEAK = os.environ.get("KOTOBA_EXAMPLE_LEAK") == "1"
# Who may read kotoba-memory's report view (/_kotoba/report): this bearer token (unset: nobody).
KOTOBA_MEMORY_REPORT_TOKEN = os.environ.get("KOTOBA_EXAMPLE_REPORT_TOKEN") or None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
