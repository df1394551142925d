"""Flask-Caching's backend contract (its generic backend suite) and app-level use of KotobaCache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("flask_caching")

from flask import Flask
from flask_caching import Cache
from flask_caching.backends.base import BaseCache as FlaskCachingBaseCache

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory_integrations.flask.caching import KotobaCache

CACHE_TYPE = "kotoba_memory_integrations.flask.KotobaCache"


_made: list[KotobaCache] = []


@pytest.fixture(autouse=True)
def _clear_backends() -> Iterator[None]:
    """Empty every backend a test made: ttl'd entries left behind keep the engine's sweeper thread awake."""
    yield
    while _made:
        _made.pop().clear()


@pytest.fixture
def c() -> KotobaCache:
    backend = KotobaCache()
    _made.append(backend)
    return backend


def test_is_a_flask_caching_backend(c: KotobaCache) -> None:
    assert isinstance(c, FlaskCachingBaseCache)
    assert c.ignore_delete_many_errors is False  # Flask-Caching's default, unlike cachelib's


def test_generic_get_dict(c: KotobaCache) -> None:
    assert c.set("a", "a")
    assert c.set("b", "b")
    assert c.get_dict("a", "b") == {"a": "a", "b": "b"}


def test_generic_set_get_and_get_many(c: KotobaCache) -> None:
    for i in range(3):
        assert c.set(str(i), i * i)
    for i in range(3):
        assert c.get(str(i)) == i * i
    assert c.set("foo", ["bar"])
    assert c.set("spam", "eggs")
    assert c.get_many("foo", "spam") == [["bar"], "eggs"]


def test_generic_set_many(c: KotobaCache) -> None:
    assert c.set_many({"foo": "bar", "spam": ["eggs"]}) == ["foo", "spam"]
    assert c.get("foo") == "bar"
    assert c.get("spam") == ["eggs"]


def test_generic_add_delete(c: KotobaCache) -> None:
    assert c.add("foo", "bar")
    assert c.get("foo") == "bar"
    assert not c.add("foo", "qux")
    assert c.get("foo") == "bar"
    assert c.delete("foo")
    assert c.get("foo") is None
    assert c.add("foo", "bar")
    assert c.add("spam", "eggs")
    assert c.delete_many("foo", "spam") == ["foo", "spam"]
    assert c.get("foo") is None and c.get("spam") is None


def test_generic_inc_dec(c: KotobaCache) -> None:
    assert c.set("foo", 1)
    assert c.inc("foo") == c.get("foo") == 2
    assert c.dec("foo") == c.get("foo") == 1
    assert c.delete("foo")


def test_generic_true_false_and_bytes(c: KotobaCache) -> None:
    assert c.set("foo", True)
    assert c.get("foo") is True
    assert c.set("bar", False)
    assert c.get("bar") is False
    assert c.set("raw", b"bar")
    assert c.get("raw") == b"bar"


def test_generic_has(c: KotobaCache) -> None:
    assert c.has("foo") is False
    assert c.set("foo", "bar")
    assert c.has("foo") is True
    assert c.has("spam") is False
    c.delete("foo")
    assert c.has("foo") is False


def test_generic_timeout_zero_means_forever(c: KotobaCache) -> None:
    c.set("foo", "bar", 0)
    c.set("baz", "qux", 1)
    assert c.get("baz") == "qux"
    time.sleep(1.3)
    assert c.get("foo") == "bar"
    assert c.get("baz") is None


def _app(**config: Any) -> tuple[Flask, Cache]:
    app = Flask(__name__)
    app.config.update(CACHE_TYPE=CACHE_TYPE, **config)
    cache = Cache(app)
    _made.append(app.extensions["cache"][cache])
    return app, cache


def test_cache_type_by_dotted_path_builds_the_backend_from_config() -> None:
    app, cache = _app(CACHE_THRESHOLD=7, CACHE_DEFAULT_TIMEOUT=0, CACHE_OPTIONS={"max_bytes": 1 << 20})
    with app.app_context():
        backend = cache.cache
        assert isinstance(backend, KotobaCache)
        stats = backend.stats()
        assert stats.max_entries == 7
        assert stats.max_bytes == 1 << 20
        assert backend.default_timeout == 0
        cache.set("k", {"v": 1})
        assert cache.get("k") == {"v": 1}
        assert cache.has("k")


def test_cached_view_and_memoize_on_the_backend() -> None:
    app, cache = _app(CACHE_DEFAULT_TIMEOUT=60)
    renders = {"view": 0, "memo": 0}

    @app.route("/")
    @cache.cached()
    def index() -> str:
        renders["view"] += 1
        return f"render {renders['view']}"

    @cache.memoize()
    def square(n: int) -> int:
        renders["memo"] += 1
        return n * n

    client = app.test_client()
    assert client.get("/").data == b"render 1"
    assert client.get("/").data == b"render 1"
    assert renders["view"] == 1
    with app.app_context():
        assert square(4) == 16
        assert square(4) == 16
        assert renders["memo"] == 1
        cache.delete_memoized(square, 4)
        assert square(4) == 16
        assert renders["memo"] == 2
        assert cache.cache.stats().hits >= 2


def test_cache_serializer_config_is_honoured() -> None:
    from cachelib.serializers import BaseSerializer

    class CountingSerializer(BaseSerializer):
        dumped = 0

        def dumps(self, value: Any, protocol: int = 5) -> bytes:
            CountingSerializer.dumped += 1
            return super().dumps(value, protocol) or b""

    app, cache = _app(CACHE_SERIALIZER=CountingSerializer)
    with app.app_context():
        cache.set("k", [1, 2])
        assert cache.get("k") == [1, 2]
    assert CountingSerializer.dumped == 1


def test_shared_store_through_cache_options() -> None:
    store = CacheManager(max_entries=100)
    app_one, cache_one = _app(CACHE_OPTIONS={"cache": store, "key_prefix": "one:"})
    app_two, cache_two = _app(CACHE_OPTIONS={"cache": store, "key_prefix": "one:"})
    with app_one.app_context():
        cache_one.set("k", "from one")
    with app_two.app_context():
        assert cache_two.get("k") == "from one"


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError):
        _app(CACHE_OPTIONS={"policy": "random"})
    with pytest.raises(TypeError):
        _app(CACHE_OPTIONS={"no_such_option": 1})
