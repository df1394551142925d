"""The Django app: add ``"kotoba_memory_integrations.django"`` to ``INSTALLED_APPS``.

On startup it builds a :class:`~kotoba_memory.config.MemoryConfig` from the ``KOTOBA_MEMORY`` settings
dict (lower-case MemoryConfig field names) and starts one :class:`~kotoba_memory.optimizer.MemoryOptimizer`
per process. Settings:

* ``KOTOBA_MEMORY``: dict of MemoryConfig fields; absent means "installed but not started";
* ``KOTOBA_MEMORY_AUTOSTART`` (default True): start the optimizer in ``ready()``;
* ``KOTOBA_MEMORY_OTEL`` (default False): also report OpenTelemetry metrics to the global provider;
* ``KOTOBA_MEMORY_FLEET`` (default True): each serving process writes its snapshot to a per-host spool
  named after the settings module, so the report view and ``manage.py kotoba_memory_report`` list every
  worker of the server (a str names the spool; False: off);
* ``KOTOBA_MEMORY_REPORT_TOKEN`` / ``KOTOBA_MEMORY_REPORT_AUTH``: who may read the packaged report view
  (:mod:`kotoba_memory_integrations.django.views`).

Bad settings fail start-up the way Django's own do: ``ready()`` raises ``ImproperlyConfigured`` naming the
setting (an unknown or invalid ``KOTOBA_MEMORY`` field, a non-bool flag, a misspelt ``KOTOBA_MEMORY*``
setting name, a pool this machine cannot map), so a server that runs no checks (gunicorn) still refuses
to start with the message. ``manage.py check`` reports the same settings as ``kotoba_memory.E00x``.
With ``gunicorn --preload`` see :mod:`kotoba_memory_integrations.runtime`.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = ["SETTING_NAMES", "KotobaMemoryConfig", "config_from_settings", "fleet_name", "misspelt_settings",
           "rss_sampling_from_settings", "start_from_settings"]

_log = logging.getLogger("kotoba_memory_integrations")

#: The Django settings kotoba-memory reads.
SETTING_NAMES = (
    "KOTOBA_MEMORY", "KOTOBA_MEMORY_AUTOSTART", "KOTOBA_MEMORY_OTEL", "KOTOBA_MEMORY_RSS_SAMPLE_EVERY",
    "KOTOBA_MEMORY_RSS_SAMPLE_BUDGET", "KOTOBA_MEMORY_FLEET", "KOTOBA_MEMORY_REPORT_TOKEN",
    "KOTOBA_MEMORY_REPORT_AUTH",
)


def misspelt_settings() -> list[tuple[str, str]]:
    """``(name, meant)`` for each defined setting that looks like a misspelling of one of ours."""
    found = []
    for name in dir(settings):
        if not name.isupper() or name in SETTING_NAMES:
            continue
        close = difflib.get_close_matches(name, SETTING_NAMES, n=1, cutoff=0.85)
        if close:
            found.append((name, close[0]))
    return found


def rss_sampling_from_settings() -> tuple[int, float | None]:
    """``KOTOBA_MEMORY_RSS_SAMPLE_EVERY`` and ``_BUDGET`` (or their defaults); a ``ConfigError`` naming the
    setting when either is invalid."""
    from kotoba_memory.validation import check_positive, check_positive_int
    from kotoba_memory_integrations.request import DEFAULT_RSS_SAMPLE_BUDGET, DEFAULT_RSS_SAMPLE_EVERY

    every = getattr(settings, "KOTOBA_MEMORY_RSS_SAMPLE_EVERY", DEFAULT_RSS_SAMPLE_EVERY)
    check_positive_int(every, "KOTOBA_MEMORY_RSS_SAMPLE_EVERY", high=1_000_000)
    budget = getattr(settings, "KOTOBA_MEMORY_RSS_SAMPLE_BUDGET", DEFAULT_RSS_SAMPLE_BUDGET)
    if budget is not None:
        budget = float(check_positive(budget, "KOTOBA_MEMORY_RSS_SAMPLE_BUDGET", high=1.0))
    return every, budget


def _improperly_configured(exc: Exception) -> ImproperlyConfigured:
    from kotoba_memory.errors import ConfigError

    if isinstance(exc, ConfigError):
        return ImproperlyConfigured(f"KOTOBA_MEMORY[{exc.field!r}] is invalid: {exc.reason}")
    return ImproperlyConfigured(f"KOTOBA_MEMORY is invalid: {exc}")


def config_from_settings() -> Any:
    """The MemoryConfig ``settings.KOTOBA_MEMORY`` describes (None when the setting is absent).

    Raises ``ConfigError`` (or TypeError for a non-dict) when it is invalid.
    """
    raw = getattr(settings, "KOTOBA_MEMORY", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"KOTOBA_MEMORY must be a dict, got {type(raw).__name__}")
    from kotoba_memory.config import MemoryConfig

    return MemoryConfig.from_mapping(raw)


def fleet_name() -> str | None:
    """The fleet spool's name from ``KOTOBA_MEMORY_FLEET``: by default the settings module and its file
    (the same for the server's workers and a management command run beside them); None when off."""
    value = getattr(settings, "KOTOBA_MEMORY_FLEET", True)
    if not isinstance(value, bool | str) or (isinstance(value, str) and not value.strip()):
        raise ImproperlyConfigured(
            f"KOTOBA_MEMORY_FLEET must be True, False or a non-empty str, got {value!r}"
        )
    if value is False:
        return None
    if isinstance(value, str):
        return value
    module_name = getattr(settings, "SETTINGS_MODULE", None) or "settings"
    module = sys.modules.get(module_name)
    location = os.path.realpath(getattr(module, "__file__", None) or os.getcwd())
    return f"django:{module_name}:{location}"


def _is_autoreload_parent() -> bool:
    # ``runserver`` re-executes itself in a child (RUN_MAIN=true) that serves; the parent only watches.
    return "runserver" in sys.argv and os.environ.get("RUN_MAIN") != "true" and "--noreload" not in sys.argv


def start_from_settings() -> Any:
    """Start the process's optimizer from settings if configured; returns it or None.

    Raises ``ImproperlyConfigured`` naming the setting when the settings are invalid or cannot be met.
    """
    for name, meant in misspelt_settings():
        raise ImproperlyConfigured(f"{name} is not a kotoba-memory setting; did you mean {meant}?")
    for name, default in (("KOTOBA_MEMORY_AUTOSTART", True), ("KOTOBA_MEMORY_OTEL", False)):
        value = getattr(settings, name, default)
        if not isinstance(value, bool):
            raise ImproperlyConfigured(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    from kotoba_memory.errors import ConfigError

    try:
        rss_sampling_from_settings()
    except ConfigError as exc:
        raise ImproperlyConfigured(f"{exc.field} {exc.reason}") from exc
    try:
        config = config_from_settings()
    except (TypeError, ValueError) as exc:
        raise _improperly_configured(exc) from exc
    from kotoba_memory_integrations.runtime import configure_fleet

    configure_fleet(fleet_name() or False)
    if getattr(settings, "KOTOBA_MEMORY_AUTOSTART", True) is not True or _is_autoreload_parent():
        return None
    if getattr(settings, "KOTOBA_MEMORY_OTEL", False) is True:
        from kotoba_memory_integrations import otel

        otel.instrument()
    if config is None:
        return None
    from kotoba_memory_integrations.runtime import start_optimizer

    try:
        return start_optimizer(config)
    except ValueError as exc:  # ConfigError: e.g. a pool_size_mb this machine cannot map
        raise _improperly_configured(exc) from exc


class KotobaMemoryConfig(AppConfig):
    """Starts kotoba-memory with the Django process and registers its system checks."""

    name = "kotoba_memory_integrations.django"
    label = "kotoba_memory"
    verbose_name = "kotoba-memory"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from kotoba_memory.cache_manager.inventory import add_provider
        from kotoba_memory_integrations.django._uses import foreign_caches
        from kotoba_memory_integrations.django.checks import register_checks

        register_checks()
        add_provider(foreign_caches)  # the report lists CACHES aliases on other backends too
        start_from_settings()
