"""Every constructor that takes user configuration rejects a bad value with a ConfigError naming the field.

The checks all go through ``kotoba_memory.validation``; ConfigError is a ValueError, and a value of the
wrong type raises ConfigTypeError, also a TypeError, so older ``except ValueError/TypeError`` still work.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kotoba_memory import MemoryConfig
from kotoba_memory.allocators.process import configure_glibc_malloc, malloc_arena_advice, malloc_trim
from kotoba_memory.cache_manager import CacheManager, DiskCache, RedisCache, TieredCache
from kotoba_memory.cache_manager.compression import Compressor, ZlibCodec
from kotoba_memory.errors import ConfigError, ConfigTypeError
from kotoba_memory.gc_optimizer import GcOptimizer
from kotoba_memory.memory_pool import Arena, MemoryPool, ObjectPool
from kotoba_memory.memory_profiler import MemoryProfiler
from kotoba_memory_integrations._request import RequestRecorder
from kotoba_memory_integrations.hooks import cached

NAN, INF = float("nan"), float("inf")
REDIS = "redis://127.0.0.1:1/0"  # never contacted: validation runs before any I/O


def _cache() -> CacheManager:
    return CacheManager(max_entries=10)


def _tiered(tmp: Path, **kwargs: Any) -> TieredCache:
    return TieredCache(CacheManager(1 << 20), DiskCache(tmp / "t.sqlite3", 1 << 20), **kwargs)


def _query_cache(**kwargs: Any) -> Any:
    pytest.importorskip("sqlalchemy")
    from kotoba_memory_integrations.sqlalchemy import QueryCache

    return QueryCache(_cache(), **kwargs)


def _django(options: dict[str, Any]) -> Any:
    pytest.importorskip("django")
    from kotoba_memory_integrations.django import KotobaCache

    cache = KotobaCache(f"config-errors-{uuid.uuid4().hex}", {"OPTIONS": options})
    cache.get("k")  # invalid OPTIONS raise on use (construction must not: Django's checks build caches)
    return cache


def _cachelib(**kwargs: Any) -> Any:
    pytest.importorskip("cachelib")
    from kotoba_memory_integrations.cachelib import KotobaCache

    return KotobaCache(**kwargs)


def _flask(**config: Any) -> Any:
    pytest.importorskip("flask")
    from flask import Flask

    from kotoba_memory_integrations.flask import KotobaMemory

    app = Flask(__name__)
    app.config.update(config)
    return KotobaMemory(app)


CASES: list[tuple[str, Callable[[Path], Any], str]] = [
    ("MemoryConfig size", lambda t: MemoryConfig(cache_size_mb=0), "cache_size_mb"),
    ("MemoryConfig inf", lambda t: MemoryConfig(target_memory_usage_percent=INF),
     "target_memory_usage_percent"),
    ("MemoryConfig nan", lambda t: MemoryConfig(leak_window_s=NAN), "leak_window_s"),
    ("MemoryConfig policy", lambda t: MemoryConfig(cache_policy="mru"), "cache_policy"),
    ("MemoryConfig bool", lambda t: MemoryConfig(enable_pooling=1), "enable_pooling"),  # type: ignore[arg-type]
    ("CacheManager bound", lambda t: CacheManager(max_bytes=0), "max_bytes"),
    ("CacheManager no bound", lambda t: CacheManager(), "max_bytes"),
    ("CacheManager bool bound", lambda t: CacheManager(max_entries=True), "max_entries"),
    ("CacheManager ttl inf", lambda t: CacheManager(10, default_ttl=INF), "default_ttl"),
    ("CacheManager ttl nan", lambda t: CacheManager(10, default_ttl=NAN), "default_ttl"),
    ("CacheManager policy", lambda t: CacheManager(10, "mru"), "policy"),
    ("CacheManager name", lambda t: CacheManager(10, name=""), "name"),
    ("CacheManager.put ttl", lambda t: _cache().put("k", 1, ttl=INF), "ttl"),
    ("CacheManager.get_or_set ttl", lambda t: _cache().get_or_set("k", lambda: 1, ttl=-1), "ttl"),
    ("DiskCache max_bytes", lambda t: DiskCache(t, 0), "max_bytes"),
    ("DiskCache timeout", lambda t: DiskCache(t, 1 << 20, timeout=NAN), "timeout"),
    ("DiskCache ttl", lambda t: DiskCache(t, 1 << 20, default_ttl=INF), "default_ttl"),
    ("DiskCache compress_min_bytes", lambda t: DiskCache(t, 1 << 20, compress_min_bytes=-1),
     "compress_min_bytes"),
    ("TieredCache spill", lambda t: _tiered(t, spill_threshold_bytes=-1), "spill_threshold_bytes"),
    ("TieredCache ttl", lambda t: _tiered(t, default_ttl=INF), "default_ttl"),
    ("RedisCache scan_interval nan", lambda t: RedisCache(REDIS, scan_interval=NAN), "scan_interval"),
    ("RedisCache scan_interval < 0", lambda t: RedisCache(REDIS, scan_interval=-1), "scan_interval"),
    ("RedisCache ttl", lambda t: RedisCache(REDIS, default_ttl=0), "default_ttl"),
    ("RedisCache prefix", lambda t: RedisCache(REDIS, prefix=3), "prefix"),
    ("ZlibCodec level", lambda t: ZlibCodec(level=10), "zlib level"),
    ("Compressor min_bytes", lambda t: Compressor(None, min_bytes=-1), "compress_min_bytes"),
    ("MemoryPool capacity", lambda t: MemoryPool(10), "capacity"),
    ("MemoryPool fallback", lambda t: MemoryPool(1 << 20, fallback="explode"), "fallback"),
    ("MemoryPool classes", lambda t: MemoryPool(1 << 20, classes_per_octave=3), "per_octave"),
    ("Arena chunk_size", lambda t: Arena(8), "chunk_size"),
    ("Arena max_bytes", lambda t: Arena(1024, max_bytes=100), "max_bytes"),
    ("ObjectPool max_size", lambda t: ObjectPool(object, max_size=0), "max_size"),
    ("ObjectPool timeout inf", lambda t: ObjectPool(object, timeout=INF), "timeout"),
    ("ObjectPool timeout nan", lambda t: ObjectPool(object, timeout=NAN), "timeout"),
    ("ObjectPool.acquire timeout", lambda t: ObjectPool(object).acquire(timeout=-1), "timeout"),
    ("MemoryProfiler interval inf", lambda t: MemoryProfiler(sample_interval_s=INF), "sample_interval_s"),
    ("MemoryProfiler confidence nan", lambda t: MemoryProfiler(min_confidence=NAN), "min_confidence"),
    ("GcOptimizer interval nan", lambda t: GcOptimizer(monitoring_interval_s=NAN), "monitoring_interval_s"),
    ("GcOptimizer bool", lambda t: GcOptimizer(adaptive=1), "adaptive"),  # type: ignore[arg-type]
    ("RequestRecorder", lambda t: RequestRecorder(rss_sample_every=0), "rss_sample_every"),
    ("malloc_trim pad", lambda t: malloc_trim(-1), "pad"),
    ("configure_glibc_malloc arena_max", lambda t: configure_glibc_malloc(arena_max=0), "arena_max"),
    ("glibc trim_threshold", lambda t: configure_glibc_malloc(trim_threshold=-1), "trim_threshold"),
    ("malloc_arena_advice threads", lambda t: malloc_arena_advice(threads=0), "threads"),
    ("@cached ttl inf", lambda t: cached(_cache(), ttl=INF), "ttl"),
    ("@cached ttl type", lambda t: cached(_cache(), ttl="1"), "ttl"),  # type: ignore[arg-type]
    ("QueryCache default_ttl inf", lambda t: _query_cache(default_ttl=INF), "default_ttl"),
    ("QueryCache default_ttl 0", lambda t: _query_cache(default_ttl=0), "default_ttl"),
    ("QueryCache max_rows", lambda t: _query_cache(max_rows=-1), "max_rows"),
    ("QueryCache namespace", lambda t: _query_cache(namespace="a b"), "namespace"),
    ("QueryCache name", lambda t: _query_cache(name=""), "name"),
    ("QueryCache.cached ttl", lambda t: _query_cache().cached(ttl=INF), "ttl"),
    ("Django MAX_BYTES", lambda t: _django({"MAX_BYTES": 0}), "MAX_BYTES"),
    ("Django POLICY", lambda t: _django({"POLICY": "mru"}), "POLICY"),
    ("Django NAME", lambda t: _django({"NAME": ""}), "NAME"),
    ("Django SPILL", lambda t: _django({"DISK_PATH": str(t), "SPILL_THRESHOLD_BYTES": -1}),
     "SPILL_THRESHOLD_BYTES"),
    ("cachelib threshold", lambda t: _cachelib(threshold=-1), "threshold"),
    ("cachelib key_prefix", lambda t: _cachelib(key_prefix=3), "key_prefix"),
    ("cachelib policy", lambda t: _cachelib(policy="mru"), "policy"),
    ("Flask RSS_SAMPLE_EVERY", lambda t: _flask(KOTOBA_MEMORY_RSS_SAMPLE_EVERY=NAN),
     "KOTOBA_MEMORY_RSS_SAMPLE_EVERY"),
    ("Flask RSS_SAMPLE_BUDGET", lambda t: _flask(KOTOBA_MEMORY_RSS_SAMPLE_BUDGET=NAN),
     "KOTOBA_MEMORY_RSS_SAMPLE_BUDGET"),
    ("RequestRecorder budget", lambda t: RequestRecorder(rss_sample_budget=0), "rss_sample_budget"),
]


@pytest.mark.parametrize(("build", "field"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_value_raises_config_error_naming_the_field(
    build: Callable[[Path], Any], field: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        build(tmp_path)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


def test_wrong_types_are_also_type_errors() -> None:
    with pytest.raises(TypeError) as info:
        CacheManager(max_entries="10")  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigTypeError) and info.value.field == "max_entries"


def test_query_cache_with_a_huge_finite_ttl_still_stores() -> None:
    """Regression: ``default_ttl=inf`` was accepted and then every store failed (counted as an error)."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from kotoba_memory_integrations.sqlalchemy import QueryCache

    engine = sqlalchemy.create_engine("sqlite://")
    qc = QueryCache(_cache(), default_ttl=1e9)
    qc.attach(engine, cache_all_selects=True)
    try:
        with engine.connect() as conn:
            for _ in range(2):
                query = sqlalchemy.text("SELECT 1").options(qc.cached(tables=["t"]))
                assert conn.execute(query).scalar() == 1
        stats = qc.stats()
        assert stats.errors == 0 and stats.stores == 1 and stats.hits == 1
    finally:
        qc.close()
        engine.dispose()


def test_redis_scan_interval_may_be_infinite() -> None:
    """``inf`` means stats() never rescans by itself (documented); only nan and negatives are refused."""
    assert RedisCache(REDIS, scan_interval=INF).scan_interval == INF
