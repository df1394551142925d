"""The Django app: add ``"kotoba_memory_integrations.django"`` to ``INSTALLED_APPS``.

On startup it builds a :class:`~kotoba_memory.config.MemoryConfig` from the ``KOTOBA_MEMORY`` settings
dict (lower-case MemoryConfig field names) and starts one :class:`~kotoba_memory.optimizer.MemoryOptimizer`
per process. Settings:

* ``KOTOBA_MEMORY``: dict of MemoryConfig fields; absent means "installed but not started";
* ``KOTOBA_MEMORY_AUTOSTART`` (default True): start the optimizer in ``ready()``;
* ``KOTOBA_MEMORY_OTEL`` (default False): also report OpenTelemetry metrics to the global provider.

Bad settings never crash startup: the optimizer is not started and ``manage.py check`` reports them
(``kotoba_memory.E00x``). With ``gunicorn --preload`` see :mod:`kotoba_memory_integrations.runtime`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from django.apps import AppConfig
from django.conf import settings

__all__ = ["KotobaMemoryConfig", "config_from_settings", "start_from_settings"]

_log = logging.getLogger("kotoba_memory_integrations")


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


def _is_autoreload_parent() -> bool:
    # ``runserver`` re-executes itself in a child (RUN_MAIN=true) that serves; the parent only watches.
    return "runserver" in sys.argv and os.environ.get("RUN_MAIN") != "true" and "--noreload" not in sys.argv


def start_from_settings() -> Any:
    """Start the process's optimizer from settings if configured and valid; returns it or None."""
    if getattr(settings, "KOTOBA_MEMORY_AUTOSTART", True) is not True or _is_autoreload_parent():
        return None
    try:
        config = config_from_settings()
    except (TypeError, ValueError) as exc:
        _log.error("kotoba-memory not started, invalid settings (see manage.py check): %s", exc)
        return None
    if getattr(settings, "KOTOBA_MEMORY_OTEL", False) is True:
        from kotoba_memory_integrations import otel

        otel.instrument()
    if config is None:
        return None
    from kotoba_memory_integrations.runtime import start_optimizer

    return start_optimizer(config)


class KotobaMemoryConfig(AppConfig):
    """Starts kotoba-memory with the Django process and registers its system checks."""

    name = "kotoba_memory_integrations.django"
    label = "kotoba_memory"
    verbose_name = "kotoba-memory"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from kotoba_memory_integrations.django.checks import register_checks

        register_checks()
        start_from_settings()
