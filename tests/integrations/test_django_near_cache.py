"""Django's cache-backend contract on ``KotobaCache`` with ``OPTIONS={"REDIS_URL": ...}`` (the near-cache).

The cases ported from Django's own BaseCacheTests/LocMemCache tests live in test_django_cache.py; the
ones that describe Django's cache API (not locmem's culling, byte bounds or in-process specifics) are
imported here and run again against a real redis-server, on a fresh namespace per test. Below them:
what only the near-cache does (two workers' worth of backends sharing one Redis, the settings, faults).
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("django")
pytest.importorskip("redis")

import redis
import test_django_cache as contract
from django.test import override_settings

from kotoba_memory.cache_manager.near import NearCache
from kotoba_memory.errors import ConfigError
from kotoba_memory_integrations.django import KotobaCache
from kotoba_memory_integrations.django.near_cache import KotobaNearCache, forget_near_stores

pytestmark = pytest.mark.redis

_SHARED_CONTRACT = [
    "test_simple_set_and_get",
    "test_cached_none_wins_over_default",
    "test_get_missing_returns_default",
    "test_add_only_when_absent",
    "test_add_replaces_expired_key",
    "test_prefix_separates_namespaces",
    "test_delete_returns_whether_key_existed",
    "test_has_key_and_in",
    "test_get_many_returns_only_hits",
    "test_get_many_honours_prefix_and_version",
    "test_set_many_returns_empty_list_of_failures",
    "test_delete_many",
    "test_clear",
    "test_data_types_round_trip",
    "test_unicode_keys_and_values",
    "test_values_are_isolated_from_later_mutation",
    "test_set_and_add_raise_pickle_errors_and_keep_old_value",
    "test_incr",
    "test_decr",
    "test_incr_keeps_the_expiry",
    "test_incr_is_atomic_across_threads",
    "test_expiration",
    "test_default_timeout_from_settings",
    "test_touch",
    "test_long_timeout",
    "test_forever_timeout",
    "test_settings_timeout_none_means_forever",
    "test_zero_timeout_stores_nothing",
    "test_float_timeout",
    "test_versioning_get_set",
    "test_versioning_add_has_key_delete",
    "test_versioning_incr_decr",
    "test_incr_and_decr_version",
    "test_custom_key_function",
    "test_key_function_by_dotted_path",
    "test_invalid_key_characters_warn",
    "test_invalid_key_length_warns",
    "test_invalid_key_length_with_version",
    "test_many_methods_warn_per_bad_key",
    "test_every_operation_warns_with_djangos_message",
    "test_valid_keys_do_not_warn",
    "test_get_or_set",
    "test_get_or_set_callable",
    "test_get_or_set_version_and_missing_default",
    "test_get_or_set_with_zero_timeout_returns_default_without_storing",
    "test_close_is_harmless",
    "test_string_version_and_timeout_in_set_many",
    "test_default_timeout_constant_is_djangos",
    "test_stats_reflect_hits_and_misses",
    "test_async_methods_mirror_the_sync_ones",
    "test_async_key_warnings_and_zero_timeout",
    "test_aget_or_set_accepts_an_async_default",
]
for _name in _SHARED_CONTRACT:
    globals()[_name] = getattr(contract, _name)


@pytest.fixture
def location() -> Iterator[str]:
    yield f"near-{uuid.uuid4().hex}"
    forget_near_stores()


@pytest.fixture
def make_cache(location: str, redis_url: str) -> contract.MakeCache:
    """Backends on the test's LOCATION, each a near-cache over the session's Redis."""

    def build(location_: str | None = None, **params: Any) -> KotobaCache:
        options = {"REDIS_URL": redis_url, "SOCKET_TIMEOUT": 1.0, **params.pop("OPTIONS", {})}
        cache = KotobaCache(location_ or location, {**params, "OPTIONS": options})
        assert isinstance(cache, KotobaNearCache)
        assert cache._near.wait_coherent(10)
        return cache

    return build


@pytest.fixture
def cache(make_cache: contract.MakeCache) -> Iterator[KotobaCache]:
    backend = make_cache()
    yield backend
    backend.clear()


# -- near-cache specifics -------------------------------------------------------------------------


def test_one_option_switches_the_backend_to_the_near_cache(cache: KotobaCache) -> None:
    assert isinstance(cache, KotobaNearCache) and isinstance(cache, KotobaCache)
    assert isinstance(cache.store, NearCache)
    assert cache.store.namespace.startswith("kotoba:")  # derived from the secret and LOCATION
    assert "near-cache" in repr(cache)


def test_two_workers_share_writes_and_deletes(
    location: str, redis_url: str, eventually: Callable[..., bool]
) -> None:
    options = {"REDIS_URL": redis_url, "NAMESPACE": f"two-workers-{uuid.uuid4().hex[:8]}"}
    # Two NearCache stores = two workers (each process builds its own; here they differ by NAME).
    worker_a = KotobaCache(location, {"OPTIONS": {**options, "NAME": "worker-a"}})
    worker_b = KotobaCache(location, {"OPTIONS": {**options, "NAME": "worker-b"}})
    assert worker_a.store is not worker_b.store
    assert worker_a.store.wait_coherent() and worker_b.store.wait_coherent()  # type: ignore[attr-defined]
    worker_a.set("k", "from a")
    assert worker_b.get("k") == "from a"
    worker_b.set("k", "from b")
    assert eventually(lambda: worker_a.get("k") == "from b")
    worker_a.delete("k")
    assert eventually(lambda: worker_b.get("k", "gone") == "gone")
    assert worker_a.incr_version("k2", delta=1) if worker_a.add("k2", 1) else True
    worker_a.set("n", 1)
    assert worker_b.incr("n", 5) == 6 and eventually(lambda: worker_a.get("n") == 6)


def test_values_signed_with_secret_key_and_tampering_refused(
    cache: KotobaCache, redis_url: str, tmp_path: Any, eventually: Callable[..., bool]
) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Any:
            import os

            return (os.system, (f"touch {marker}",))

    cache.set("k", "genuine")
    raw = redis.Redis.from_url(redis_url)
    store = cache.store
    assert isinstance(store, NearCache)
    redis_key = store._keys(cache.make_key("k"))[1]
    try:
        assert raw.get(redis_key) != pickle.dumps("genuine")
        raw.set(redis_key, pickle.dumps(Evil()))
        store.l1.clear()  # a worker without a copy (a write around the near-cache sends no invalidation)
        assert cache.get("k", "refused") == "refused"
    finally:
        raw.close()
    assert not marker.exists()
    assert store.stats().refused >= 1


def test_a_different_secret_key_cannot_read_the_values(location: str, redis_url: str) -> None:
    options = {"REDIS_URL": redis_url, "NAMESPACE": f"secret-{uuid.uuid4().hex[:8]}"}
    ours = KotobaCache(location, {"OPTIONS": options})
    ours.set("k", "v")
    with override_settings(SECRET_KEY="another-app"):
        theirs = KotobaCache(location, {"OPTIONS": {**options, "NAME": "theirs"}})
    assert theirs.get("k", "refused") == "refused"
    assert theirs.stats().refused == 1  # type: ignore[attr-defined]


def test_near_options_are_validated(location: str, redis_url: str) -> None:
    for options, field in (
        ({"REDIS_URL": redis_url, "DISK_PATH": "/tmp/x"}, "DISK_PATH"),
        ({"REDIS_URL": "http://nope"}, "REDIS_URL"),
        ({"REDIS_URL": redis_url, "IGNORE_EXCEPTIONS": "yes"}, "IGNORE_EXCEPTIONS"),
        ({"REDIS_URL": redis_url, "SOCKET_TIMEOUT": 0}, "SOCKET_TIMEOUT"),
        ({"REDIS_URL": redis_url, "POLICY": "random"}, "POLICY"),
        ({"REDIS_URL": redis_url, "NAMESPACE": "has space"}, "NAMESPACE"),
    ):
        with pytest.raises(ConfigError, match=field):
            KotobaCache(location, {"OPTIONS": options})
    with override_settings(SECRET_KEY=""), pytest.raises(ConfigError, match="SECRET"):
        KotobaCache(location, {"OPTIONS": {"REDIS_URL": redis_url}})


def test_redis_down_never_reaches_the_request(
    location: str, restartable_redis: Any, eventually: Callable[..., bool]
) -> None:
    backend = KotobaCache(location, {"OPTIONS": {"REDIS_URL": restartable_redis.url}})
    store = backend.store
    assert isinstance(store, NearCache) and store.wait_coherent()
    backend.set("counter", 1)
    backend.set("n", 1)
    restartable_redis.kill()
    assert backend.get("counter", "miss") in (1, "miss")
    backend.set("k", "v")
    assert backend.get("k") == "v"  # kept in this worker for OUTAGE_TTL
    assert backend.add("k", "other") is False
    backend.set("n", 1)
    assert backend.incr("n") == 2  # counted locally during the outage
    assert backend.get_or_set("g", lambda: "from the view") == "from the view"
    backend.delete("k")
    assert backend.get_many(["k", "g"]) in ({"g": "from the view"}, {})
    stats = store.stats()
    assert stats.breaker_open and stats.redis_errors >= 1 and stats.pending_writes >= 1
    restartable_redis.start()
    assert eventually(lambda: not store.breaker_open and store.stats().pending_writes == 0)
    assert eventually(lambda: backend.get("counter") == 1)  # Redis' value again (restored from its AOF)
    assert backend.get("n", "miss") == "miss"  # written during the outage: replayed as a delete
