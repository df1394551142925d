"""Django's caches in the memory report: a ``KotobaCache`` store by the aliases that use it, and aliases
on other backends listed too (without counters, which Django does not keep)."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("django")

from django.core.cache import caches
from django.test import override_settings

from kotoba_memory.cache_manager.inventory import cache_inventory
from kotoba_memory.report_format import cache_line
from kotoba_memory_integrations.django.apps import KotobaMemoryConfig
from kotoba_memory_integrations.django.cache import forget_location

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "inv-locmem"},
    "pages": {"BACKEND": "kotoba_memory_integrations.django.KotobaCache", "LOCATION": "inv-django"},
    "fragments": {"BACKEND": "kotoba_memory_integrations.django.KotobaCache", "LOCATION": "inv-django"},
}


def test_the_report_names_each_caches_alias_and_its_real_counters() -> None:
    module = importlib.import_module("kotoba_memory_integrations.django")
    app = KotobaMemoryConfig("kotoba_memory_integrations.django", module)
    with override_settings(CACHES=CACHES, KOTOBA_MEMORY_AUTOSTART=False):
        try:
            app.ready()  # registers the CACHES lister, as INSTALLED_APPS does at start-up
            pages = caches["pages"]
            pages.set("a", 1)
            for _ in range(4):
                pages.get("a")
            pages.get("nope")
            caches["fragments"].get("a")
            rows = {row["name"]: row for row in cache_inventory(limit=10_000)[0]}
            store = rows["django:inv-django"]
            assert store["uses"] == ["Django CACHES 'pages', 'fragments'"]
            assert (store["hits"], store["misses"]) == (5, 1)  # both aliases share the LOCATION's store
            other = rows["django:default"]
            assert other["type"] == "LocMemCache" and other["uses"] == ["Django CACHES 'default'"]
            assert cache_line(other).startswith("django:default (LocMemCache): no hit counters")
            assert "django:pages" not in rows and "django:fragments" not in rows  # not listed twice
        finally:
            forget_location("inv-django")
