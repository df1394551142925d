"""cachelib and Flask-Caching backends switched to the near-cache with one setting, on a real Redis.

The cachelib contract cases of test_cachelib_backend.py that describe cachelib's API (not the
in-memory bounds) run again here with ``redis_url=``; then what only the shared store does.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("cachelib")
pytest.importorskip("flask_caching")

import test_cachelib_backend as contract
from flask import Flask
from flask_caching import Cache

from kotoba_memory.cache_manager.near import NearCache
from kotoba_memory.errors import ConfigError
from kotoba_memory_integrations.cachelib import KotobaCache

pytestmark = pytest.mark.redis

_SHARED_CONTRACT = [
    "test_set_get",
    "test_set_get_many",
    "test_get_dict",
    "test_delete",
    "test_delete_many",
    "test_delete_many_counts_missing_keys_as_deleted",
    "test_add",
    "test_inc_dec",
    "test_has",
    "test_clear",
    "test_timeouts_zero_never_expires_and_positive_expires",
    "test_negative_timeout_stores_nothing",
    "test_bad_timeout_type_is_a_type_error",
    "test_values_are_isolated",
    "test_non_str_key_is_a_type_error",
]
for _name in _SHARED_CONTRACT:
    globals()[_name] = getattr(contract, _name)

_made: list[KotobaCache] = []


@pytest.fixture(autouse=True)
def _close_near_caches() -> Iterator[None]:
    yield
    while _made:
        backend = _made.pop()
        backend.clear()
        backend.store.close()  # type: ignore[attr-defined]


@pytest.fixture
def factory(redis_url: str) -> Callable[..., KotobaCache]:
    namespace = f"cachelib-near-{uuid.uuid4().hex[:8]}"

    def build(cls: type[KotobaCache] = KotobaCache, **options: Any) -> KotobaCache:
        options.setdefault("secret", "test-secret")
        options.setdefault("namespace", namespace)
        backend = cls(redis_url=redis_url, **options)
        assert backend.store.wait_coherent(10)  # type: ignore[attr-defined]
        _made.append(backend)
        return backend

    return build


@pytest.fixture(params=[KotobaCache, contract.ReprCache], ids=["pickle", "custom-serializer"])
def cache(request: pytest.FixtureRequest, factory: Callable[..., KotobaCache]) -> KotobaCache:
    return factory(request.param)


def test_redis_url_builds_a_near_cache(factory: Callable[..., KotobaCache]) -> None:
    backend = factory()
    assert isinstance(backend.store, NearCache)


def test_two_processes_worth_of_backends_stay_coherent(
    factory: Callable[..., KotobaCache], eventually: Callable[..., bool]
) -> None:
    a, b = factory(name="a"), factory(name="b")
    assert a.store is not b.store
    assert a.set("k", {"v": 1})
    assert b.get("k") == {"v": 1}
    assert b.set("k", {"v": 2})
    assert eventually(lambda: a.get("k") == {"v": 2})
    assert a.delete("k")
    assert eventually(lambda: b.get("k") is None)


def test_inc_is_atomic_across_backends(factory: Callable[..., KotobaCache]) -> None:
    backends = [factory(name=f"w{i}") for i in range(3)]

    def bump(backend: KotobaCache) -> None:
        for _ in range(40):
            backend.inc("n")

    threads = [threading.Thread(target=bump, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert backends[0].get("n") == 120


def test_near_arguments_are_checked(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="secret"):
        KotobaCache(redis_url=redis_url)
    with pytest.raises(ValueError, match="redis_url"):
        KotobaCache(secret="s")
    with pytest.raises(ValueError, match="not both"):
        KotobaCache(redis_url=redis_url, secret="s", cache=contract.CacheManager(1000))


def test_flask_caching_one_setting(redis_url: str) -> None:
    def app_with_cache(name: str) -> tuple[Flask, Cache]:
        app = Flask(name)
        app.config.update(
            SECRET_KEY="flask-secret",
            CACHE_TYPE="kotoba_memory_integrations.flask.KotobaCache",
            CACHE_REDIS_URL=redis_url,
        )
        return app, Cache(app)

    (app_a, cache_a), (app_b, cache_b) = app_with_cache("a"), app_with_cache("b")
    store_a, store_b = cache_a.cache.store, cache_b.cache.store
    assert isinstance(store_a, NearCache) and isinstance(store_b, NearCache)
    assert store_a.namespace == store_b.namespace  # same SECRET_KEY: the same app's workers share
    try:
        assert store_a.wait_coherent() and store_b.wait_coherent()
        with app_a.app_context():
            cache_a.set("k", "from a")
        with app_b.app_context():
            assert cache_b.get("k") == "from a"
    finally:
        store_a.clear()
        store_a.close()
        store_b.close()
