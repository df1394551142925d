"""What the memory report says about Django's caches: the ``CACHES`` aliases a ``KotobaCache`` store
serves, and the aliases on other backends (listed without counters, which Django does not keep)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


def foreign_caches() -> Iterator[dict[str, Any]]:
    """One report row per ``CACHES`` alias whose backend is not kotoba-memory's."""
    from django.conf import settings

    for alias, conf in dict(getattr(settings, "CACHES", None) or {}).items():
        backend = str(conf.get("BACKEND", "")) if isinstance(conf, dict) else ""
        if not backend or backend.startswith(_BACKEND_PREFIX):
            continue
        yield {
            "name": f"django:{alias}",
            "type": backend.rsplit(".", 1)[-1],
            "uses": [f"Django CACHES {alias!r}"],
            "note": "no hit counters (not a kotoba-memory backend; "
            "BACKEND 'kotoba_memory_integrations.django.KotobaCache' reports them)",
        }
