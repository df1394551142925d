"""What the memory report says about a ``KotobaCache`` store: the ``CACHES`` aliases that use it."""

from __future__ import annotations

from kotoba_memory.cache_manager import BaseCache
from kotoba_memory.cache_manager.inventory import note_use

_BACKEND_PREFIX = "kotoba_memory_integrations.django"


def note_store(cache: BaseCache, location: str) -> None:
    """Record ``cache`` as the store of the ``CACHES`` aliases whose ``LOCATION`` is ``location``."""
    from django.conf import settings

    try:
        configured = dict(getattr(settings, "CACHES", None) or {})
    except Exception:  # settings not configured: the backend was built by hand
        configured = {}
    aliases = [
        alias
        for alias, conf in configured.items()
        if isinstance(conf, dict)
        and str(conf.get("BACKEND", "")).startswith(_BACKEND_PREFIX)
        and conf.get("LOCATION", "") == location
    ]
    where = ", ".join(repr(a) for a in aliases) if aliases else f"LOCATION {location!r}"
    note_use(cache, f"Django CACHES {where}")
