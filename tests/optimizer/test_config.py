"""MemoryConfig: defaults, the reference Quick Start, validation naming the field, from_mapping."""

from __future__ import annotations

import enum
from pathlib import Path

import pytest

from kotoba_memory.config import MemoryConfig
from kotoba_memory.errors import ConfigError


def test_defaults_are_valid_and_plain() -> None:
    config = MemoryConfig()
    assert config.cache_policy_name == "adaptive"
    assert config.allocator_name == "system"
    data = config.to_dict()
    assert data["cache_policy"] == "adaptive" and data["report_dir"] is None
    assert MemoryConfig.from_mapping(data) == config


def test_reference_quick_start_fields() -> None:
    config = MemoryConfig(
        enable_pooling=True,
        pool_size_mb=256,
        enable_caching=True,
        cache_size_mb=512,
        cache_policy="ADAPTIVE",
        enable_custom_allocators=False,
        allocator_type="Custom",
        enable_gc_optimization=True,
        target_memory_usage_percent=75.0,
        monitoring_interval_ms=1000,
    )
    assert config.cache_policy_name == "adaptive"
    assert config.allocator_name == "custom"


def test_enum_members_from_the_feature_modules_are_kept() -> None:
    cache_manager = pytest.importorskip("kotoba_memory.cache_manager")
    policy = cache_manager.CachePolicy.LRU
    assert MemoryConfig(cache_policy=policy).cache_policy is policy
    assert MemoryConfig(cache_policy="lfu").cache_policy is cache_manager.CachePolicy.LFU


def test_foreign_enum_is_matched_by_value() -> None:
    class Policy(enum.Enum):
        FIFO = "fifo"

    assert MemoryConfig(cache_policy=Policy.FIFO).cache_policy_name == "fifo"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"enable_pooling": "yes"}, "enable_pooling"),
        ({"pool_size_mb": 0}, "pool_size_mb"),
        ({"pool_size_mb": 1.5}, "pool_size_mb"),
        ({"cache_size_mb": -1}, "cache_size_mb"),
        ({"cache_policy": "random"}, "cache_policy"),
        ({"cache_policy": 3}, "cache_policy"),
        ({"allocator_type": "tcmalloc"}, "allocator_type"),
        ({"target_memory_usage_percent": 0}, "target_memory_usage_percent"),
        ({"target_memory_usage_percent": 101}, "target_memory_usage_percent"),
        ({"target_memory_usage_percent": float("nan")}, "target_memory_usage_percent"),
        ({"monitoring_interval_ms": 1}, "monitoring_interval_ms"),
        ({"monitoring_interval_ms": True}, "monitoring_interval_ms"),
        ({"leak_window_s": 0}, "leak_window_s"),
        ({"leak_window_s": 5.0, "leak_window_interval_s": 1.0}, "leak_window_interval_s"),
        ({"memory_limit_mb": 0}, "memory_limit_mb"),
        ({"report_dir": ""}, "report_dir"),
        ({"report_dir": 12}, "report_dir"),
        ({"enable_leak_detection": None}, "enable_leak_detection"),
    ],
)
def test_each_bad_field_is_named(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        MemoryConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)


def test_from_mapping_rejects_unknown_keys_and_normalises_case(tmp_path: Path) -> None:
    config = MemoryConfig.from_mapping({"CACHE_SIZE_MB": 32, "report_dir": str(tmp_path)})
    assert config.cache_size_mb == 32 and config.report_dir == tmp_path
    with pytest.raises(ConfigError, match="cache_sise_mb"):
        MemoryConfig.from_mapping({"cache_sise_mb": 32})
    with pytest.raises(TypeError):
        MemoryConfig.from_mapping([("cache_size_mb", 1)])  # type: ignore[arg-type]


def test_frozen() -> None:
    config = MemoryConfig()
    with pytest.raises(AttributeError):
        config.cache_size_mb = 1  # type: ignore[misc]
