"""Django system checks for the ``KOTOBA_MEMORY*`` settings (``manage.py check``).

The same settings make the app's ``ready()`` raise ``ImproperlyConfigured`` (so servers that run no checks
refuse to start too); these checks name them for ``manage.py check`` and tooling that runs checks alone:

* ``kotoba_memory.E001`` ``KOTOBA_MEMORY`` is not a dict;
* ``kotoba_memory.E002`` a field of ``KOTOBA_MEMORY`` is unknown or invalid (the message names it);
* ``kotoba_memory.E003`` ``KOTOBA_MEMORY_AUTOSTART`` / ``KOTOBA_MEMORY_OTEL`` is not a bool;
* ``kotoba_memory.E004`` ``KOTOBA_MEMORY_RSS_SAMPLE_EVERY`` is not an int from 1 to 1000000, or
  ``KOTOBA_MEMORY_RSS_SAMPLE_BUDGET`` is neither None nor a number in (0, 1];
* ``kotoba_memory.E005`` ``KOTOBA_MEMORY_FLEET``, ``KOTOBA_MEMORY_REPORT_TOKEN`` or ``_AUTH`` is invalid;
* ``kotoba_memory.E006`` the ``OPTIONS`` (or ``LOCATION``) of a ``CACHES`` entry using ``KotobaCache`` is
  invalid (the message names the alias and the option);
* ``kotoba_memory.W001`` the middleware is missing, so no per-request or per-route metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

__all__ = ["MIDDLEWARE_PATH", "check_caches", "check_middleware", "check_settings"]

MIDDLEWARE_PATH = "kotoba_memory_integrations.django.middleware.MemoryMiddleware"
_TAG = "kotoba_memory"


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Validate ``KOTOBA_MEMORY`` by building the :class:`MemoryConfig` it describes."""
    messages: list[CheckMessage] = []
    for name in ("KOTOBA_MEMORY_AUTOSTART", "KOTOBA_MEMORY_OTEL"):
        value = getattr(settings, name, None)
        if value is not None and not isinstance(value, bool):
            messages.append(
                Error(
                    f"{name} must be True or False, got {type(value).__name__} {value!r}.",
                    obj=name,
                    id="kotoba_memory.E003",
                )
            )
    from kotoba_memory.errors import ConfigError
    from kotoba_memory_integrations.django.apps import rss_sampling_from_settings

    try:
        rss_sampling_from_settings()
    except ConfigError as exc:
        messages.append(
            Error(
                f"{exc.field} {exc.reason}.",
                hint="RSS_SAMPLE_EVERY: 1 measures memory on every request, N (default 8) on one request "
                "in N at most; RSS_SAMPLE_BUDGET: the share of request time the reads may cost "
                "(default 0.0002), or None.",
                obj=exc.field,
                id="kotoba_memory.E004",
            )
        )
    from kotoba_memory_integrations.django.views import report_access_errors

    fleet = getattr(settings, "KOTOBA_MEMORY_FLEET", True)
    problems = report_access_errors()
    if not isinstance(fleet, bool | str) or (isinstance(fleet, str) and not fleet.strip()):
        problems.append(("KOTOBA_MEMORY_FLEET", f"must be True, False or a non-empty str, got {fleet!r}"))
    for name, problem in problems:
        messages.append(Error(f"{name} {problem}.", obj=name, id="kotoba_memory.E005"))
    raw = getattr(settings, "KOTOBA_MEMORY", None)
    if raw is None:
        return messages
    if not isinstance(raw, Mapping):
        messages.append(
            Error(
                f"KOTOBA_MEMORY must be a dict of MemoryConfig fields, got {type(raw).__name__}.",
                hint="For example KOTOBA_MEMORY = {'cache_size_mb': 64, 'enable_leak_detection': True}.",
                obj="KOTOBA_MEMORY",
                id="kotoba_memory.E001",
            )
        )
        return messages
    from kotoba_memory.config import MemoryConfig
    from kotoba_memory.errors import ConfigError

    try:
        MemoryConfig.from_mapping(raw)
    except ConfigError as exc:
        messages.append(
            Error(
                f"KOTOBA_MEMORY[{exc.field!r}] is invalid: {exc}",
                hint="See MemoryConfig in the kotoba-memory docs for the accepted fields and ranges.",
                obj=f"KOTOBA_MEMORY[{exc.field!r}]",
                id="kotoba_memory.E002",
            )
        )
    except (TypeError, ValueError) as exc:
        messages.append(
            Error(f"KOTOBA_MEMORY is invalid: {exc}", obj="KOTOBA_MEMORY", id="kotoba_memory.E002")
        )
    return messages


def _is_kotoba_backend(path: Any) -> bool:
    if not isinstance(path, str):
        return False
    from django.utils.module_loading import import_string

    from kotoba_memory_integrations.django.cache import KotobaCache

    try:
        backend = import_string(path)
    except ImportError:
        return False  # Django's own checks and cache loading report a backend that does not import
    return isinstance(backend, type) and issubclass(backend, KotobaCache)


def check_caches(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Validate the ``OPTIONS`` of every ``CACHES`` entry whose backend is ``KotobaCache``."""
    from kotoba_memory.errors import ConfigError
    from kotoba_memory.validation import check_str
    from kotoba_memory_integrations.django.cache import _parse_options

    messages: list[CheckMessage] = []
    seen: dict[str, tuple[str, Any]] = {}  # LOCATION -> (first alias, its parsed options)
    caches = getattr(settings, "CACHES", None)
    for alias, entry in (caches or {}).items() if isinstance(caches, Mapping) else ():
        if not isinstance(entry, Mapping) or not _is_kotoba_backend(entry.get("BACKEND")):
            continue
        options = entry.get("OPTIONS") or {}
        try:
            location = check_str(entry.get("LOCATION", ""), "LOCATION", allow_empty=True)
            if not isinstance(options, Mapping):
                raise ConfigError("OPTIONS", f"must be a dict, got {type(options).__name__}")
            if "REDIS_URL" in options:  # the near-cache over Redis (near_cache.py) has its own options
                from kotoba_memory_integrations.django.near_cache import _parse as _parse_near

                parsed: Any = _parse_near(location, options)
            else:
                parsed = _parse_options(location, options)
            first = seen.setdefault(location, (alias, parsed))
            if first[1] != parsed:
                raise ConfigError(
                    "OPTIONS",
                    f"LOCATION {location!r} is also used by CACHES[{first[0]!r}] with other options; aliases "
                    "sharing a LOCATION share one store and must agree on MAX_BYTES/POLICY/NAME/DISK_*",
                )
        except ConfigError as exc:
            field = exc.field
            where = f"[{field!r}]" if field in ("LOCATION", "OPTIONS") else f"['OPTIONS'][{field!r}]"
            messages.append(
                Error(
                    f"CACHES[{alias!r}]{where} is invalid: {exc.reason}",
                    hint="See the KotobaCache section of kotoba-memory's docs/cache-backends.md.",
                    obj=f"CACHES[{alias!r}]",
                    id="kotoba_memory.E006",
                )
            )
    return messages


def check_middleware(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Warn when the app is installed but its middleware is not, so routes go unmeasured."""
    middleware = getattr(settings, "MIDDLEWARE", None) or []
    if MIDDLEWARE_PATH in middleware:
        return []
    return [
        Warning(
            "kotoba_memory_integrations.django is installed but its middleware is not in MIDDLEWARE: "
            "requests are not measured per route.",
            hint=f"Add {MIDDLEWARE_PATH!r} to MIDDLEWARE (first is best).",
            obj="MIDDLEWARE",
            id="kotoba_memory.W001",
        )
    ]


def register_checks() -> None:
    """Register the checks (called from the AppConfig's ``ready``; registering twice is harmless)."""
    register(_TAG)(check_settings)
    register(_TAG, "caches")(check_caches)
    register(_TAG)(check_middleware)
