"""A Django forum under gunicorn: eight bounded-but-churning routes and, with FIELD_LEAKS=1, one leak:
``/notify/<n>`` connects a receiver to a module-level signal per request and never disconnects it (a
listener registry that only grows).

Django's own churn: templates compiled per request, a ``LocMemCache`` culling at ``MAX_ENTRIES`` over a
huge key space; plus the shared churn of :mod:`benchmarks.field_apps.churn`.
"""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.dispatch import Signal

from benchmarks.field_apps import churn
from benchmarks.field_apps._profiling import LEAKS_ON, config

order_placed = Signal()  # nothing ever sends it; receivers pile up when connected per request

_TEMPLATE = "<ol>{% for post in posts %}<li>{{ post.title|title }} ({{ post.votes }})</li>{% endfor %}</ol>"


def _configure() -> None:
    if settings.configured:
        return
    cfg = config()
    settings.configure(
        DEBUG=False,
        SECRET_KEY="field-suite-not-secret",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["kotoba_memory_integrations.django"],
        MIDDLEWARE=["kotoba_memory_integrations.django.middleware.MemoryMiddleware"],
        KOTOBA_MEMORY={
            "enable_caching": cfg.enable_caching,
            "enable_profiling": cfg.enable_profiling,
            "enable_leak_detection": cfg.enable_leak_detection,
            "monitoring_interval_ms": cfg.monitoring_interval_ms,
            "leak_window_s": cfg.leak_window_s,
            "leak_window_interval_s": cfg.leak_window_interval_s,
            "leak_trace_budget": cfg.leak_trace_budget,
        },
        CACHES={
            "default": {
                "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                "OPTIONS": {"MAX_ENTRIES": 300, "CULL_FREQUENCY": 3},
            }
        },
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": []}],
        DATABASES={},
        USE_TZ=True,
    )


def _json(body: dict[str, Any]) -> Any:
    from django.http import JsonResponse

    return JsonResponse(body)


def index(request: Any) -> Any:
    return _json({"status": "ok"})


def products(request: Any, sku: int) -> Any:
    return _json(churn.product(sku))


def recent(request: Any) -> Any:
    return _json(churn.remember("/recent"))


def session(request: Any, sid: str) -> Any:
    return _json(churn.session(sid))


def render(request: Any, n: int) -> Any:
    from django.template import Context, Template

    template = Template(_TEMPLATE)  # compiled per request, as careless views do
    posts = [{"title": f"post number {i}", "votes": i * 3} for i in range(n % 15)]
    return _json({"length": len(template.render(Context({"posts": posts})))})


def cached(request: Any, n: int) -> Any:
    from django.core.cache import cache

    key = f"thread:{n}"
    page = cache.get(key)
    if page is None:
        page = {"thread": n, "title": f"thread {n} " * 6, "replies": list(range(n % 30))}
        cache.set(key, page, timeout=300)  # MAX_ENTRIES 300: culls a third when full
    return _json({"replies": len(page["replies"])})


def audit(request: Any, user: int) -> Any:
    return _json(churn.audit(user))


def report(request: Any, n: int) -> Any:
    return _json(churn.report(n))


def notify(request: Any, n: int) -> Any:
    def on_order(sender: object, note: str = f"notify subscriber {n} " * 8, **kwargs: object) -> str:
        return note

    if LEAKS_ON:
        order_placed.connect(on_order, weak=False)
    return _json({"receivers": len(order_placed.receivers)})


def _urls() -> list[Any]:
    from django.urls import path

    return [
        path("", index),
        path("products/<int:sku>", products),
        path("recent", recent),
        path("session/<str:sid>", session),
        path("render/<int:n>", render),
        path("cache/<int:n>", cached),
        path("audit/<int:user>", audit),
        path("report/<int:n>", report),
        path("notify/<int:n>", notify),
    ]


urlpatterns: list[Any] = []


def create_app() -> WSGIHandler:
    """Django configured in code (no project directory), kotoba-memory started by its app config."""
    _configure()
    django.setup()
    if not urlpatterns:
        urlpatterns.extend(_urls())
    return WSGIHandler()
