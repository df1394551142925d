"""Django's cache-backend contract, checked on KotobaCache (ported from the LocMemCache/BaseCacheTests cases).

Each test gets backends on a fresh LOCATION, built the way Django builds them (``BACKEND`` params), so
tests never share data; the ``caches[...]`` aliases from ``django_settings.py`` are used where the
settings machinery itself is under test.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("django")

from django.core.cache import CacheKeyWarning, InvalidCacheBackendError, caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT

from kotoba_memory_integrations.django import KotobaCache
from kotoba_memory_integrations.django.cache import forget_location

MakeCache = Callable[..., KotobaCache]


def custom_key_func(key: str, key_prefix: str, version: int) -> str:
    """A KEY_FUNCTION that differs from Django's default."""
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


@pytest.fixture
def location() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex}"
    yield name
    forget_location(name)


@pytest.fixture
def make_cache(location: str) -> MakeCache:
    """Build a backend on the test's LOCATION (pass ``location=`` for another one)."""

    def build(location_: str | None = None, **params: Any) -> KotobaCache:
        return KotobaCache(location_ or location, params)

    return build


@pytest.fixture
def cache(make_cache: MakeCache) -> KotobaCache:
    return make_cache()


class Unpicklable:
    def __getstate__(self) -> dict[str, Any]:
        raise pickle.PickleError()


# --- basic get/set/add/delete ----------------------------------------------------------------------


def test_simple_set_and_get(cache: KotobaCache) -> None:
    assert cache.set("key", "value") is None
    assert cache.get("key") == "value"


def test_cached_none_wins_over_default(cache: KotobaCache) -> None:
    cache.set("key_default_none", None)
    assert cache.get("key_default_none", default="default") is None


def test_get_missing_returns_default(cache: KotobaCache) -> None:
    assert cache.get("does_not_exist") is None
    assert cache.get("does_not_exist", "bang!") == "bang!"


def test_add_only_when_absent(cache: KotobaCache) -> None:
    assert cache.add("addkey1", "value") is True
    assert cache.add("addkey1", "newvalue") is False
    assert cache.get("addkey1") == "value"


def test_add_replaces_expired_key(cache: KotobaCache) -> None:
    cache.set("k", "old", 0.2)
    time.sleep(0.4)
    assert cache.add("k", "new") is True
    assert cache.get("k") == "new"


def test_prefix_separates_namespaces(make_cache: MakeCache) -> None:
    cache = make_cache()
    prefixed = make_cache(KEY_PREFIX="cacheprefix")
    cache.set("somekey", "value")
    assert prefixed.has_key("somekey") is False
    assert prefixed.add("somekey", "value2") is True
    assert cache.get("somekey") == "value"
    assert prefixed.get("somekey") == "value2"
    cache.set("somekey", "value3")
    assert prefixed.get("somekey") == "value2"


def test_delete_returns_whether_key_existed(cache: KotobaCache) -> None:
    cache.set_many({"key1": "spam", "key2": "eggs"})
    assert cache.delete("key1") is True
    assert cache.get("key1") is None
    assert cache.get("key2") == "eggs"
    assert cache.delete("key1") is False
    assert cache.delete("nonexistent_key") is False


def test_has_key_and_in(cache: KotobaCache) -> None:
    cache.set("hello1", "goodbye1")
    assert cache.has_key("hello1") is True
    assert cache.has_key("goodbye1") is False
    assert "hello1" in cache
    assert "goodbye1" not in cache
    cache.set("no_expiry", "here", None)
    assert cache.has_key("no_expiry") is True
    cache.set("null", None)
    assert cache.has_key("null") is True
    assert "null" in cache


def test_get_many_returns_only_hits(cache: KotobaCache) -> None:
    cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"})
    assert cache.get_many(["a", "c", "d"]) == {"a": "a", "c": "c", "d": "d"}
    assert cache.get_many(["a", "b", "e"]) == {"a": "a", "b": "b"}
    assert cache.get_many(iter(["a", "b", "e"])) == {"a": "a", "b": "b"}
    cache.set("none", None)
    assert cache.get_many(["none"]) == {"none": None}


def test_get_many_honours_prefix_and_version(make_cache: MakeCache) -> None:
    cache = make_cache()
    prefixed = make_cache(KEY_PREFIX="p")
    v2 = make_cache(VERSION=2)
    cache.set_many({"ford1": 37, "arthur1": 42})
    prefixed.set_many({"ford1": "p37"})
    v2.set_many({"ford1": "v2-37", "arthur1": "v2-42"})
    assert cache.get_many(["ford1", "arthur1"]) == {"ford1": 37, "arthur1": 42}
    assert prefixed.get_many(["ford1", "arthur1"]) == {"ford1": "p37"}
    assert v2.get_many(["ford1", "arthur1"]) == {"ford1": "v2-37", "arthur1": "v2-42"}
    assert cache.get_many(["ford1", "arthur1"], version=2) == {"ford1": "v2-37", "arthur1": "v2-42"}
    assert v2.get_many(["ford1"], version=1) == {"ford1": 37}


def test_set_many_returns_empty_list_of_failures(cache: KotobaCache) -> None:
    assert cache.set_many({"key1": "spam", "key2": "eggs"}) == []
    assert cache.get("key1") == "spam"
    assert cache.get("key2") == "eggs"
    assert cache.set_many({}) == []


def test_set_many_lists_entries_too_large_to_store(make_cache: MakeCache) -> None:
    cache = make_cache(OPTIONS={"MAX_BYTES": 4096})
    assert cache.set_many({"small": "x", "huge": "y" * 100_000}) == ["huge"]
    assert cache.get("small") == "x"
    assert cache.get("huge") is None


def test_delete_many(cache: KotobaCache) -> None:
    cache.set_many({"key1": "spam", "key2": "eggs", "key3": "ham"})
    assert cache.delete_many(["key1", "key2"]) is None
    assert cache.get("key1") is None
    assert cache.get("key2") is None
    assert cache.get("key3") == "ham"
    assert cache.delete_many([]) is None


def test_clear(cache: KotobaCache) -> None:
    cache.set_many({"key1": "spam", "key2": "eggs"})
    cache.clear()
    assert cache.get("key1") is None
    assert cache.get("key2") is None


def test_data_types_round_trip(cache: KotobaCache) -> None:
    stuff = {
        "string": "this is a string",
        "int": 42,
        "bool": True,
        "list": [1, 2, 3, 4],
        "tuple": (1, 2, 3, 4),
        "dict": {"A": 1, "B": 2},
        "function": custom_key_func,
        "class": Unpicklable,
        "bytes": b"\x00\xffbinary",
        "float": 1.5,
        "set": {1, 2},
    }
    cache.set("stuff", stuff)
    assert cache.get("stuff") == stuff


def test_unicode_keys_and_values(cache: KotobaCache) -> None:
    stuff = {
        "ascii": "ascii_value",
        "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
        "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2",
        "ascii2": {"x": 1},
    }
    for key, value in stuff.items():
        cache.set(key, value)
        assert cache.get(key) == value
        cache.delete(key)
        cache.add(key, value)
        assert cache.get(key) == value
        cache.delete(key)
    cache.set_many(stuff)
    for key, value in stuff.items():
        assert cache.get(key) == value


# --- isolation: values are pickled -----------------------------------------------------------------


def test_values_are_isolated_from_later_mutation(cache: KotobaCache) -> None:
    value = {"list": [1, 2]}
    cache.set("k", value)
    value["list"].append(3)
    got = cache.get("k")
    assert got == {"list": [1, 2]}
    got["list"].append(99)
    assert cache.get("k") == {"list": [1, 2]}
    assert cache.get("k") is not cache.get("k")


def test_set_and_add_raise_pickle_errors_and_keep_old_value(cache: KotobaCache) -> None:
    cache.set("k", "old")
    with pytest.raises(pickle.PickleError):
        cache.set("k", Unpicklable())
    with pytest.raises(pickle.PickleError):
        cache.add("unpicklable", Unpicklable())
    assert cache.get("k") == "old"
    assert cache.has_key("unpicklable") is False


class PicklingSideEffect:
    """Records whether the backend's LOCATION lock was held while it was being pickled."""

    def __init__(self, cache: KotobaCache) -> None:
        self.cache = cache
        self.locked: bool | None = None

    def __getstate__(self) -> dict[str, Any]:
        self.locked = self.cache._lock.locked()
        return {}


def test_pickling_happens_outside_the_store_lock(cache: KotobaCache) -> None:
    bad = PicklingSideEffect(cache)
    cache.set("set", bad)
    assert bad.locked is False
    bad.locked = None
    assert cache.add("add", bad) is True
    assert bad.locked is False
    bad.locked = None
    assert cache.set_many({"many": bad}) == []
    assert bad.locked is False


# --- incr / decr -----------------------------------------------------------------------------------


def test_incr(cache: KotobaCache) -> None:
    cache.set("answer", 41)
    assert cache.incr("answer") == 42
    assert cache.get("answer") == 42
    assert cache.incr("answer", 10) == 52
    assert cache.incr("answer", -10) == 42
    with pytest.raises(ValueError):
        cache.incr("does_not_exist")
    with pytest.raises(ValueError):
        cache.incr("does_not_exist", -1)
    cache.set("null", None)
    with pytest.raises(TypeError):
        cache.incr("null")
    assert cache.get("null", "default") is None


def test_decr(cache: KotobaCache) -> None:
    cache.set("answer", 43)
    assert cache.decr("answer") == 42
    assert cache.decr("answer", 10) == 32
    assert cache.decr("answer", -10) == 42
    with pytest.raises(ValueError):
        cache.decr("does_not_exist")


def test_incr_keeps_the_expiry(cache: KotobaCache) -> None:
    cache.set("counter", 1, 100)
    assert cache.incr("counter") == 2
    assert cache.decr("counter") == 1
    remaining = _remaining(cache, "counter")
    assert remaining is not None and 0 < remaining <= 100  # not reset to the 300 s default
    cache.set("forever", 1, None)
    cache.incr("forever")
    assert _remaining(cache, "forever") is None


def test_incr_is_atomic_across_threads(cache: KotobaCache) -> None:
    cache.set("counter", 0, None)
    threads = [threading.Thread(target=lambda: [cache.incr("counter") for _ in range(200)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert cache.get("counter") == 800


# --- timeouts --------------------------------------------------------------------------------------


def test_expiration(cache: KotobaCache) -> None:
    cache.set("expire1", "very quickly", 0.2)
    cache.set("expire2", "very quickly", 0.2)
    cache.set("expire3", "very quickly", 0.2)
    time.sleep(0.4)
    assert cache.get("expire1") is None
    assert cache.add("expire2", "newvalue") is True
    assert cache.get("expire2") == "newvalue"
    assert cache.has_key("expire3") is False


def test_default_timeout_from_settings(make_cache: MakeCache) -> None:
    cache = make_cache(TIMEOUT=30)
    assert cache.default_timeout == 30
    cache.set("k", "v", timeout=0.2)
    cache.set("default", "v")
    time.sleep(0.4)
    assert cache.get("k") is None
    assert cache.get("default") == "v"


def _remaining(cache: KotobaCache, key: str) -> float | None:
    return cache.store.ttl_remaining(cache.make_key(key))


def test_touch(cache: KotobaCache) -> None:
    cache.set("expire1", "very quickly", timeout=5)
    assert cache.touch("expire1", timeout=30) is True
    remaining = _remaining(cache, "expire1")
    assert remaining is not None and 5 < remaining <= 30
    assert cache.touch("expire1") is True  # without a timeout: the default (300 s)
    remaining = _remaining(cache, "expire1")
    assert remaining is not None and 30 < remaining <= 300
    assert cache.touch("expire1", timeout=0.2) is True
    time.sleep(0.4)
    assert cache.has_key("expire1") is False
    cache.set("expire2", "very quickly", timeout=5)
    assert cache.touch("expire2", timeout=None) is True
    assert _remaining(cache, "expire2") is None
    assert cache.get("expire2") == "very quickly"
    assert cache.touch("nonexistent") is False


def test_long_timeout(cache: KotobaCache) -> None:
    month_plus = 60 * 60 * 24 * 30 + 1
    cache.set("key1", "eggs", month_plus)
    assert cache.get("key1") == "eggs"
    assert cache.add("key2", "ham", month_plus) is True
    assert cache.get("key2") == "ham"
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, month_plus)
    assert cache.get("key3") == "sausage"


def test_forever_timeout(cache: KotobaCache) -> None:
    cache.set("key1", "eggs", None)
    assert cache.get("key1") == "eggs"
    assert cache.add("key2", "ham", None) is True
    assert cache.add("key1", "new eggs", None) is False
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
    assert cache.get("key4") == "lobster bisque"
    cache.set("key5", "belgian fries", timeout=1)
    assert cache.touch("key5", timeout=None) is True
    assert cache.get("key5") == "belgian fries"


def test_settings_timeout_none_means_forever(make_cache: MakeCache) -> None:
    cache = make_cache(TIMEOUT=None)
    assert cache.default_timeout is None
    cache.set("k", "v")
    assert cache.get("k") == "v"


def test_zero_timeout_stores_nothing(cache: KotobaCache) -> None:
    cache.set("key1", "eggs", 0)
    assert cache.get("key1") is None
    assert cache.add("key2", "ham", 0) is True
    assert cache.get("key2") is None
    cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 0)
    assert cache.get("key3") is None
    cache.set("key5", "belgian fries", timeout=5)
    assert cache.touch("key5", timeout=0) is True
    assert cache.get("key5") is None
    cache.set("key6", "old")
    cache.set("key6", "new", -1)
    assert cache.get("key6") is None
    assert len(cache.store) == 0


def test_float_timeout(cache: KotobaCache) -> None:
    cache.set("key1", "spam", 100.2)
    assert cache.get("key1") == "spam"


# --- versions --------------------------------------------------------------------------------------


def test_versioning_get_set(make_cache: MakeCache) -> None:
    cache = make_cache()
    v2 = make_cache(VERSION=2)
    cache.set("answer1", 42)
    assert cache.get("answer1") == 42
    assert cache.get("answer1", version=1) == 42
    assert cache.get("answer1", version=2) is None
    assert v2.get("answer1") is None
    assert v2.get("answer1", version=1) == 42
    cache.set("answer2", 42, version=2)
    assert cache.get("answer2") is None
    assert cache.get("answer2", version=2) == 42
    assert v2.get("answer2") == 42
    v2.set("answer3", 42)
    assert cache.get("answer3", version=2) == 42
    v2.set("answer4", 42, version=1)
    assert cache.get("answer4") == 42


def test_versioning_add_has_key_delete(make_cache: MakeCache) -> None:
    cache = make_cache()
    v2 = make_cache(VERSION=2)
    assert cache.add("answer1", 42, version=2) is True
    assert cache.add("answer1", 37, version=2) is False
    assert cache.add("answer1", 37, version=1) is True
    assert cache.get("answer1", version=1) == 37
    assert cache.get("answer1", version=2) == 42
    assert v2.has_key("answer1") is True
    assert cache.has_key("answer1", version=3) is False
    assert cache.delete("answer1", version=2) is True
    assert cache.get("answer1", version=2) is None
    assert cache.get("answer1", version=1) == 37
    cache.set_many({"a": 1, "b": 2}, version=2)
    cache.delete_many(["a", "b"], version=2)
    assert v2.get_many(["a", "b"]) == {}


def test_versioning_incr_decr(make_cache: MakeCache) -> None:
    cache = make_cache()
    cache.set("answer1", 37, version=1)
    cache.set("answer1", 42, version=2)
    assert cache.incr("answer1") == 38
    assert cache.decr("answer1", version=2) == 41
    assert cache.get("answer1", version=1) == 38
    assert cache.get("answer1", version=2) == 41


def test_incr_and_decr_version(make_cache: MakeCache) -> None:
    cache = make_cache()
    v2 = make_cache(VERSION=2)
    cache.set("answer", 42, version=2)
    assert cache.incr_version("answer", version=2) == 3
    assert cache.get("answer", version=2) is None
    assert cache.get("answer", version=3) == 42
    v2.set("answer2", 42)
    assert v2.incr_version("answer2") == 3
    assert v2.get("answer2") is None
    assert v2.get("answer2", version=3) == 42
    assert v2.decr_version("answer2", version=3) == 2
    assert v2.get("answer2") == 42
    with pytest.raises(ValueError):
        cache.incr_version("does_not_exist")
    with pytest.raises(ValueError):
        cache.decr_version("does_not_exist")
    cache.set("null", None)
    assert cache.incr_version("null") == 2
    assert cache.get("null", "default", version=2) is None


# --- keys ------------------------------------------------------------------------------------------


def test_custom_key_function(make_cache: MakeCache) -> None:
    cache = make_cache()
    custom = make_cache(KEY_FUNCTION=custom_key_func)
    custom_by_path = make_cache(KEY_FUNCTION=f"{__name__}.custom_key_func")
    custom.set("answer1", 42)
    assert cache.get("answer1") is None
    assert custom.get("answer1") == 42
    assert custom_by_path.get("answer1") == 42  # same key function by dotted path: same keys
    assert custom.make_key("answer1") == "CUSTOM--1-answer1"


def test_key_function_by_dotted_path(make_cache: MakeCache) -> None:
    cache = make_cache(KEY_FUNCTION="django.core.cache.backends.base.default_key_func", KEY_PREFIX="x")
    assert cache.make_key("k") == "x:1:k"


@pytest.mark.parametrize(
    ("operation", "args"),
    [
        ("add", ("value",)),
        ("get", ()),
        ("set", ("value",)),
        ("incr", ()),
        ("decr", ()),
        ("touch", ()),
        ("delete", ()),
        ("has_key", ()),
        ("get_or_set", ("value",)),
    ],
)
def test_invalid_key_characters_warn(cache: KotobaCache, operation: str, args: tuple[Any, ...]) -> None:
    key = "key with spaces and 清"
    with pytest.warns(CacheKeyWarning, match="characters that will cause errors if used with memcached"):
        try:
            getattr(cache, operation)(key, *args)
        except ValueError:  # incr/decr of a missing key
            pass


def test_invalid_key_length_warns(cache: KotobaCache) -> None:
    key = "a" * 250
    expected = cache.make_key(key)
    with pytest.warns(CacheKeyWarning) as record:
        cache.set(key, "value")
    assert len(record) == 1
    assert f"{expected!r} (longer than 250)" in str(record[0].message)
    with pytest.warns(CacheKeyWarning):
        assert cache.get(key) == "value"


def test_invalid_key_length_with_version(cache: KotobaCache) -> None:
    key = "a" * 248
    with pytest.warns(CacheKeyWarning, match="longer than 250"):
        cache.set(key, "value", version=42)


def test_many_methods_warn_per_bad_key(cache: KotobaCache) -> None:
    with pytest.warns(CacheKeyWarning, match="key with spaces"):
        assert cache.set_many({"key with spaces": "foo"}) == []
    with pytest.warns(CacheKeyWarning, match="key with spaces"):
        cache.get_many(["key with spaces"])
    with pytest.warns(CacheKeyWarning, match="key with spaces"):
        cache.delete_many(["key with spaces"])


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "key with spaces and 清",
            "Cache key contains characters that will cause errors if used with memcached: ",
        ),
        ("a" * 250 + "清", "Cache key will cause errors if used with memcached: "),
    ],
)
def test_every_operation_warns_with_djangos_message(cache: KotobaCache, key: str, expected: str) -> None:
    cache.key_func = lambda key, *args: key  # as Django's suite does: the raw key reaches validate_key
    operations: list[tuple[str, tuple[Any, ...]]] = [
        ("add", (key, 1)),
        ("get", (key,)),
        ("set", (key, 1)),
        ("incr", (key,)),
        ("decr", (key,)),
        ("touch", (key,)),
        ("delete", (key,)),
        ("get_many", ([key, "b"],)),
        ("set_many", ({key: 1, "b": 2},)),
        ("delete_many", ([key, "b"],)),
    ]
    for operation, args in operations:
        with pytest.warns(CacheKeyWarning) as record:
            getattr(cache, operation)(*args)
        assert str(record[0].message).startswith(expected + repr(key)), operation


def test_valid_keys_do_not_warn(cache: KotobaCache) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheKeyWarning)
        cache.set("good-key_1:2", "v")
        assert cache.get("good-key_1:2") == "v"


# --- get_or_set ------------------------------------------------------------------------------------


def test_get_or_set(cache: KotobaCache) -> None:
    assert cache.get("projector") is None
    assert cache.get_or_set("projector", 42) == 42
    assert cache.get("projector") == 42
    assert cache.get_or_set("projector", 43) == 42
    assert cache.get_or_set("null", None) is None
    assert cache.get("null", "default") is None


def test_get_or_set_callable(cache: KotobaCache) -> None:
    calls: list[int] = []

    def my_callable() -> str:
        calls.append(1)
        return "value"

    assert cache.get_or_set("mykey", my_callable) == "value"
    assert cache.get_or_set("mykey", my_callable) == "value"
    assert calls == [1]
    assert cache.get_or_set("null", lambda: None) is None
    assert cache.get("null", "default") is None


def test_get_or_set_version_and_missing_default(cache: KotobaCache) -> None:
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    with pytest.raises(TypeError):
        cache.get_or_set("brian")  # type: ignore[call-arg]
    assert cache.get("brian", version=1) is None
    assert cache.get_or_set("brian", 42, version=1) == 42
    assert cache.get_or_set("brian", 1979, version=2) == 1979
    assert cache.get("brian", version=3) is None


def test_get_or_set_with_zero_timeout_returns_default_without_storing(cache: KotobaCache) -> None:
    assert cache.get_or_set("k", "d", timeout=0) == "d"
    assert cache.has_key("k") is False


# --- close / misc ----------------------------------------------------------------------------------


def test_close_is_harmless(cache: KotobaCache) -> None:
    cache.set("k", "v")
    assert cache.close() is None
    assert cache.get("k") == "v"


def test_get_or_set_returns_default_when_add_loses_a_race(cache: KotobaCache) -> None:
    from unittest import mock

    with mock.patch("kotoba_memory_integrations.django.KotobaCache.add", return_value=False):
        assert cache.get_or_set("key", "default") == "default"


def test_string_version_and_timeout_in_set_many(cache: KotobaCache) -> None:
    assert cache.set_many({"a": 1, "b": 2}, timeout=2, version="1") == []
    assert cache.get_many(["a", "b"]) == {"a": 1, "b": 2}


def test_default_timeout_constant_is_djangos(cache: KotobaCache) -> None:
    cache.set("k", "v", DEFAULT_TIMEOUT)
    assert cache.get("k") == "v"


# --- culling ---------------------------------------------------------------------------------------


def _perform_cull(cache: KotobaCache, initial_count: int) -> int:
    for i in range(1, initial_count):
        cache.set(f"cull{i}", "value", 1000)
    return sum(cache.has_key(f"cull{i}") for i in range(1, initial_count))


def test_cull_removes_a_third_when_full(make_cache: MakeCache) -> None:
    assert _perform_cull(make_cache(OPTIONS={"MAX_ENTRIES": 30}), 50) == 29


def test_zero_cull_frequency_empties_the_cache(make_cache: MakeCache) -> None:
    assert _perform_cull(make_cache(OPTIONS={"MAX_ENTRIES": 30, "CULL_FREQUENCY": 0}), 50) == 19


def test_cull_when_max_entries_below_zero_still_stores(make_cache: MakeCache) -> None:
    cache = make_cache(OPTIONS={"MAX_ENTRIES": 30})
    cache._max_entries = -1
    cache.set("force_cull_delete", "value", 1000)
    assert cache.has_key("force_cull_delete") is True


def test_cull_evicts_least_recently_used_by_get(make_cache: MakeCache) -> None:
    cache = make_cache(OPTIONS={"MAX_ENTRIES": 9})
    for key in range(9):
        cache.set(key, key, timeout=None)
    for key in range(6):
        assert cache.get(key) == key
    cache.set(9, 9, timeout=None)
    for key in range(6):
        assert cache.get(key) == key
    for key in range(6, 9):
        assert cache.get(key) is None
    assert cache.get(9) == 9


def test_cull_evicts_least_recently_used_by_set(make_cache: MakeCache) -> None:
    cache = make_cache(OPTIONS={"MAX_ENTRIES": 9})
    for key in range(9):
        cache.set(key, key, timeout=None)
    for key in range(3, 9):
        cache.set(key, key, timeout=None)
    cache.set(9, 9, timeout=None)
    for key in range(3, 10):
        assert cache.get(key) == key
    for key in range(3):
        assert cache.get(key) is None


def test_cull_evicts_least_recently_used_by_incr(make_cache: MakeCache) -> None:
    cache = make_cache(OPTIONS={"MAX_ENTRIES": 9})
    for key in range(9):
        cache.set(key, key, timeout=None)
    for key in range(6):
        assert cache.incr(key) == key + 1
    cache.set(9, 9, timeout=None)
    for key in range(6):
        assert cache.get(key) == key + 1
    for key in range(6, 9):
        assert cache.get(key) is None
    assert cache.get(9) == 9


def test_byte_bound_holds(make_cache: MakeCache) -> None:
    cache = make_cache(OPTIONS={"MAX_BYTES": 64 * 1024, "MAX_ENTRIES": 100_000})
    for i in range(500):
        cache.set(f"k{i}", "x" * 1000)
    stats = cache.stats()
    assert stats.bytes <= 64 * 1024
    assert stats.evictions > 0
    assert cache.get("k499") == "x" * 1000


def test_policy_option_selects_the_eviction_order(make_cache: MakeCache) -> None:
    cache = make_cache(OPTIONS={"POLICY": "fifo", "MAX_ENTRIES": 9})
    for key in range(9):
        cache.set(key, key, timeout=None)
    for key in range(3):
        cache.get(key)  # reads do not protect an entry under FIFO
    cache.set(9, 9, timeout=None)
    assert [cache.get(key) for key in range(3)] == [None, None, None]
    assert cache.get(9) == 9


def test_invalid_options_raise_clear_errors(location: str) -> None:
    from kotoba_memory.errors import ConfigError

    # Built without raising (Django's own checks build every cache; kotoba_memory.E006 reports the
    # error there), the cache raises the error on any use.
    with pytest.raises(ConfigError, match="POLICY"):
        KotobaCache(location + "-a", {"OPTIONS": {"POLICY": "random"}}).get("k")
    with pytest.raises(ConfigError, match="MAX_BYTES"):
        KotobaCache(location + "-b", {"OPTIONS": {"MAX_BYTES": -5}}).set("k", 1)
    with pytest.raises(ConfigError, match="NO_SUCH_OPTION"):
        KotobaCache(location + "-c", {"OPTIONS": {"NO_SUCH_OPTION": 1}}).stats()


# --- sharing and the settings machinery ------------------------------------------------------------


def test_aliases_with_same_location_share_data() -> None:
    default, alias, other = caches["default"], caches["default_alias"], caches["other"]
    try:
        default.set("shared", "yes")
        assert alias.get("shared") == "yes"
        assert other.get("shared") is None
    finally:
        default.clear()
        other.clear()


def test_same_location_shares_across_threads(make_cache: MakeCache) -> None:
    make_cache().set("k", "v")
    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(make_cache().get("k")))
    thread.start()
    thread.join(timeout=10)
    assert seen == ["v"]


def test_caches_without_location_are_shared_and_others_isolated() -> None:
    from django.test import override_settings

    backend = "kotoba_memory_integrations.django.KotobaCache"
    settings = {
        "default": {"BACKEND": backend},
        "again": {"BACKEND": backend},
        "other": {"BACKEND": backend, "LOCATION": "other-isolated"},
    }
    try:
        with override_settings(CACHES=settings):
            caches["default"].set("value", 42)
            assert caches["again"].get("value") == 42
            assert caches["other"].get("value") is None
    finally:
        forget_location("")
        forget_location("other-isolated")


def test_unknown_backend_alias_is_djangos_error() -> None:
    with pytest.raises(InvalidCacheBackendError):
        caches["no-such-alias"]


def test_stats_reflect_hits_and_misses(cache: KotobaCache) -> None:
    cache.set("k", "v")
    cache.get("k")
    cache.get("missing")
    stats = cache.stats()
    assert stats.hits >= 1
    assert stats.misses >= 1
    assert stats.entries == 1
    assert stats.bytes >= len(pickle.dumps("v"))


def test_concurrent_writers_and_readers_keep_bounds(make_cache: MakeCache) -> None:
    cache = make_cache(OPTIONS={"MAX_ENTRIES": 50})
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(300):
                key = f"k{(seed * 7 + i) % 120}"
                cache.set(key, i)
                cache.get(key)
                cache.add(f"a{i % 60}", i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(cache.store) <= 50


# --- async methods ---------------------------------------------------------------------------------


def test_async_methods_mirror_the_sync_ones(make_cache: MakeCache) -> None:
    cache = make_cache()

    async def scenario() -> None:
        assert await cache.aset("k", {"v": 1}) is None
        assert await cache.aget("k") == {"v": 1}
        assert await cache.aget("missing", "d") == "d"
        assert await cache.aadd("k", "other") is False
        assert await cache.aadd("new", 1) is True
        assert await cache.ahas_key("new") is True
        assert await cache.aincr("new", 4) == 5
        assert await cache.adecr("new") == 4
        with pytest.raises(ValueError):
            await cache.aincr("absent")
        assert await cache.aset_many({"a": 1, "b": 2}) == []
        assert await cache.aget_many(["a", "b", "zz"]) == {"a": 1, "b": 2}
        assert await cache.adelete_many(["a"]) is None
        assert await cache.aget("a") is None
        assert await cache.atouch("b", 30) is True
        assert await cache.atouch("zz") is False
        assert await cache.aget_or_set("g", lambda: "computed") == "computed"
        assert await cache.aget_or_set("g", "ignored") == "computed"
        assert await cache.aincr_version("g") == 2
        assert await cache.aget("g", version=2) == "computed"
        assert await cache.adecr_version("g", version=2) == 1
        assert await cache.adelete("g") is True
        assert await cache.adelete("g") is False
        await cache.aclear()
        assert await cache.aget("b") is None
        await cache.aclose()

    asyncio.run(scenario())


def test_async_methods_do_not_hop_threads(cache: KotobaCache) -> None:
    seen: list[int] = []

    class RecordsThread:
        def __reduce__(self) -> Any:
            seen.append(threading.get_ident())
            return (str, ("x",))

    async def scenario() -> None:
        await cache.aset("k", RecordsThread())

    asyncio.run(scenario())
    assert seen == [threading.get_ident()]


def test_async_key_warnings_and_zero_timeout(cache: KotobaCache) -> None:
    async def scenario() -> None:
        with pytest.warns(CacheKeyWarning):
            await cache.aset("bad key", 1)
        await cache.aset("z", 1, 0)
        assert await cache.ahas_key("z") is False

    asyncio.run(scenario())


# --- Django machinery on top: sessions and cache_page ----------------------------------------------


def test_cache_session_backend_round_trip() -> None:
    from django.contrib.sessions.backends.cache import SessionStore

    session = SessionStore()
    session["user"] = "ada"
    session["cart"] = [1, 2]
    session.save()
    key = session.session_key
    assert key is not None
    loaded = SessionStore(session_key=key)
    assert loaded["user"] == "ada"
    assert loaded["cart"] == [1, 2]
    assert SessionStore().exists(key) is True
    loaded.delete()
    assert SessionStore().exists(key) is False
    caches["default"].clear()  # leave no ttl'd entries behind (they keep the engine's sweeper awake)


def test_session_middleware_and_cache_page_through_the_test_client() -> None:
    from django.http import HttpRequest, HttpResponse
    from django.test import Client, override_settings
    from django.urls import path
    from django.views.decorators.cache import cache_page

    hits = {"page": 0}

    @cache_page(60)
    def page(request: HttpRequest) -> HttpResponse:
        hits["page"] += 1
        return HttpResponse(f"render {hits['page']}")

    def login(request: HttpRequest) -> HttpResponse:
        request.session["visits"] = request.session.get("visits", 0) + 1
        return HttpResponse(str(request.session["visits"]))

    class Urls:
        urlpatterns = [path("page/", page), path("login/", login)]

    middleware = ["django.contrib.sessions.middleware.SessionMiddleware"]
    with override_settings(ROOT_URLCONF=Urls, MIDDLEWARE=middleware):
        client = Client()
        try:
            first = client.get("/page/")
            second = client.get("/page/")
            assert first.content == second.content == b"render 1"
            assert hits["page"] == 1
            assert "max-age=60" in second["Cache-Control"]
            assert client.get("/login/").content == b"1"
            assert client.get("/login/").content == b"2"
            assert client.cookies["sessionid"].value
        finally:
            caches["default"].clear()


def test_update_and_fetch_cache_middleware_round_trip_cookies() -> None:
    from django.http import HttpRequest, HttpResponse
    from django.middleware.cache import FetchFromCacheMiddleware, UpdateCacheMiddleware
    from django.test import RequestFactory, override_settings

    def empty(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    def with_cookie(request: HttpRequest) -> HttpResponse:
        response = HttpResponse("Testing cookie serialization.")
        response.set_cookie("foo", "bar")
        return response

    with override_settings(CACHE_MIDDLEWARE_ALIAS="default", CACHE_MIDDLEWARE_SECONDS=30):
        try:
            fetch = FetchFromCacheMiddleware(empty)
            request = RequestFactory().get("/cache/test")
            request._cache_update_cache = True  # type: ignore[attr-defined]
            assert fetch.process_request(request) is None
            response = UpdateCacheMiddleware(with_cookie)(request)
            cached_response = fetch.process_request(request)
            assert cached_response is not None
            assert cached_response.content == b"Testing cookie serialization."
            assert cached_response.cookies == response.cookies
        finally:
            caches["default"].clear()


# --- disk tier -------------------------------------------------------------------------------------------


def test_disk_tier_keeps_what_memory_evicts(make_cache: MakeCache, tmp_path: Any) -> None:
    options = {
        "MAX_BYTES": 8 * 1024,
        "MAX_ENTRIES": 10_000,
        "DISK_PATH": str(tmp_path),
        "DISK_COMPRESSION": "zlib",
    }
    cache = make_cache(OPTIONS=options)
    for i in range(100):
        cache.set(f"k{i}", {"i": i, "pad": "x" * 400})
    assert all(cache.get(f"k{i}") == {"i": i, "pad": "x" * 400} for i in range(100))
    stats = cache.stats()
    assert stats.spills > 0  # type: ignore[attr-defined]
    assert stats.memory.bytes <= 8 * 1024  # type: ignore[attr-defined]
    big = "y" * 500_000  # over the spill threshold: straight to disk
    cache.set("big", big, None)
    assert cache.get("big") == big
    assert cache.incr_version("big") == 2
    cache.set("n", 1, 30)
    assert cache.incr("n", 5) == 6
    assert cache.delete("k0") is True
    assert cache.has_key("k0") is False
    assert (tmp_path / "kotoba-cache.sqlite3").exists()


def test_disk_tier_incr_keeps_the_expiry_of_a_spilled_entry(make_cache: MakeCache, tmp_path: Any) -> None:
    cache = make_cache(OPTIONS={"MAX_BYTES": 8 * 1024, "MAX_ENTRIES": 10_000, "DISK_PATH": str(tmp_path)})
    cache.set("n", 1, 100)
    for i in range(100):  # push "n" out of the memory tier onto the disk tier
        cache.set(f"k{i}", "x" * 400)
    assert cache.make_key("n") in cache._disk  # type: ignore[operator]
    assert cache.incr("n", 5) == 6
    remaining = _remaining(cache, "n")  # the tiered store's ttl_remaining, whichever tier holds it
    assert remaining is not None and 90 < remaining <= 100


def test_disk_tier_async_methods_run_off_the_loop(make_cache: MakeCache, tmp_path: Any) -> None:
    cache = make_cache(OPTIONS={"DISK_PATH": str(tmp_path)})

    async def scenario() -> None:
        await cache.aset("k", [1, 2])
        assert await cache.aget("k") == [1, 2]
        assert await cache.aadd("k", 0) is False
        assert await cache.aget_or_set("g", lambda: "v") == "v"
        await cache.aclear()
        assert await cache.ahas_key("k") is False

    asyncio.run(scenario())


def test_disk_options_are_validated(location: str, tmp_path: Any) -> None:
    from kotoba_memory.errors import ConfigError

    with pytest.raises(ConfigError, match="DISK_MAX_BYTES"):
        KotobaCache(location + "-a", {"OPTIONS": {"DISK_MAX_BYTES": 1024}}).get("k")  # no DISK_PATH
    with pytest.raises(ConfigError, match="DISK_COMPRESSION"):
        options = {"DISK_PATH": str(tmp_path), "DISK_COMPRESSION": "lz4"}
        KotobaCache(location + "-b", {"OPTIONS": options}).get("k")
    with pytest.raises(ConfigError, match="DISK_MAX_BYTES"):
        KotobaCache(location + "-c", {"OPTIONS": {"DISK_PATH": str(tmp_path), "DISK_MAX_BYTES": 0}}).get("k")


def test_one_location_cannot_have_two_configurations(make_cache: MakeCache) -> None:
    from kotoba_memory.errors import ConfigError

    make_cache(OPTIONS={"MAX_BYTES": 10_000})
    make_cache(OPTIONS={"MAX_BYTES": 10_000, "MAX_ENTRIES": 5})  # per-alias culling options may differ
    with pytest.raises(ConfigError, match="already in use"):
        make_cache(OPTIONS={"MAX_BYTES": 20_000}).get("k")


def test_aget_or_set_accepts_an_async_default(cache: KotobaCache) -> None:
    calls: list[int] = []

    async def compute() -> str:
        calls.append(1)
        return "computed"

    async def scenario() -> tuple[Any, Any]:
        return await cache.aget_or_set("k", compute), await cache.aget_or_set("k", compute)

    assert asyncio.run(scenario()) == ("computed", "computed")
    assert calls == [1]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_forked_child_gets_fresh_locks_and_the_inherited_data(cache: KotobaCache) -> None:
    import os
    import signal

    # No ttl anywhere here: ttl'd entries would involve the engine's sweeper thread, whose own locks
    # are not this test's subject.
    cache.set("k", "inherited", None)
    holder_ready, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with cache._lock:
            holder_ready.set()
            release.wait(timeout=10)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert holder_ready.wait(timeout=10)
    try:
        pid = os.fork()
        if pid == 0:  # child: the lock is held by a thread that does not exist here
            ok = False
            try:
                signal.alarm(20)  # a deadlock fails the test instead of hanging it
                cache.set("child", 1, None)
                ok = cache.get("k") == "inherited" and cache.get("child") == 1
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join(timeout=10)
    assert os.waitstatus_to_exitcode(status) == 0


def test_incr_is_atomic_across_aliases_of_one_location(make_cache: MakeCache) -> None:
    first, second = make_cache(), make_cache()
    first.set("counter", 0, None)

    def bump(cache: KotobaCache) -> None:
        for _ in range(150):
            cache.incr("counter")

    threads = [threading.Thread(target=bump, args=(c,)) for c in (first, second, first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert second.get("counter") == 600


def test_concurrent_aget_or_set_agree_on_one_value(cache: KotobaCache) -> None:
    counter = iter(range(1000))

    async def compute() -> int:
        await asyncio.sleep(0)
        return next(counter)

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(*(cache.aget_or_set("k", compute) for _ in range(20))))

    results = asyncio.run(scenario())
    assert len(set(results)) == 1  # the first add() wins and everyone reads it back
    assert cache.get("k") == results[0]


def test_bad_timeouts_raise_and_keep_the_stored_value(cache: KotobaCache) -> None:
    cache.set("k", "v")
    with pytest.raises(TypeError, match="timeout"):
        cache.set("k", "x", timeout="soon")
    with pytest.raises(ValueError, match="nan"):
        cache.add("other", "x", timeout=float("nan"))
    with pytest.raises(TypeError, match="timeout"):
        cache.touch("k", timeout=True)
    assert cache.get("k") == "v"
    assert cache.has_key("other") is False
    cache.set("inf", "forever", timeout=float("inf"))
    assert _remaining(cache, "inf") is None
