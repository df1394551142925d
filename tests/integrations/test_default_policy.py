"""The default eviction policy: ADAPTIVE in the core, LRU in the framework backends (docs/cache.md)."""

from __future__ import annotations

import uuid

import pytest

from kotoba_memory import MemoryConfig
from kotoba_memory.cache_manager import CacheManager, CachePolicy


def test_core_caches_default_to_adaptive() -> None:
    assert CacheManager(1 << 20).policy is CachePolicy.ADAPTIVE
    assert MemoryConfig().cache_policy is CachePolicy.ADAPTIVE


def test_django_backend_defaults_to_lru() -> None:
    pytest.importorskip("django")
    from kotoba_memory_integrations.django import KotobaCache
    from kotoba_memory_integrations.django.cache import forget_location

    location = f"defaults-{uuid.uuid4().hex}"
    try:
        cache = KotobaCache(location, {})
        assert cache.store.policy is CachePolicy.LRU
    finally:
        forget_location(location)


def test_cachelib_and_flask_backends_default_to_lru() -> None:
    pytest.importorskip("cachelib")
    from kotoba_memory_integrations.cachelib import KotobaCache

    assert KotobaCache().store.policy is CachePolicy.LRU
    pytest.importorskip("flask_caching")
    from kotoba_memory_integrations.flask.caching import KotobaCache as FlaskKotobaCache

    assert FlaskKotobaCache().store.policy is CachePolicy.LRU


def test_backend_default_keeps_every_set_at_the_byte_bound() -> None:
    """Why the backends differ: with LRU a set at the bound is kept (SimpleCache's contract)."""
    pytest.importorskip("cachelib")
    from kotoba_memory_integrations.cachelib import KotobaCache

    cache = KotobaCache(threshold=10_000, max_bytes=16 * 1024)
    assert all(cache.set(f"k{i}", "x" * 500) for i in range(200))
    assert cache.get("k199") == "x" * 500
