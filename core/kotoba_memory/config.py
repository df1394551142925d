"""``MemoryConfig``: every knob of the MemoryOptimizer, validated when it is built."""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kotoba_memory.errors import ConfigError, ConfigTypeError
from kotoba_memory.validation import (
    check_bool,
    check_enum,
    check_int,
    check_positive,
    check_positive_int,
    check_str,
)

__all__ = ["MemoryConfig"]

_CACHE_POLICIES = ("lru", "lfu", "fifo", "adaptive")
_ALLOCATORS = ("system", "jemalloc", "mimalloc", "custom")


def _enum_class(module: str, name: str) -> type[enum.Enum] | None:
    """The enum from a sibling feature module, or None while that module is not installed."""
    try:
        value = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return value if isinstance(value, type) and issubclass(value, enum.Enum) else None


def _coerce_choice(
    field_name: str, value: object, module: str, enum_name: str, choices: tuple[str, ...]
) -> enum.Enum | str:
    """Accept an enum member or its name/value in any case; return the member (or the name)."""
    cls = _enum_class(module, enum_name)
    if cls is not None:
        return check_enum(value, field_name, cls, label=enum_name)
    # The feature module is not installed: check the name against the known choices.
    raw = str(value.value) if isinstance(value, enum.Enum) else check_str(value, field_name)
    normalized = raw.strip().lower()
    if normalized not in choices:
        raise ConfigError(field_name, f"unknown {enum_name} {value!r}; expected one of {', '.join(choices)}")
    return normalized


@dataclass(frozen=True)
class MemoryConfig:
    """What the :class:`~kotoba_memory.optimizer.MemoryOptimizer` turns on, and how big things are.

    Field names follow the reference design. Sizes are MiB; ``monitoring_interval_ms`` is how often
    memory is sampled; ``leak_window_s`` out of every ``leak_window_interval_s`` seconds is traced for
    leak detection, and further apart while a window's measured cost exceeds ``leak_trace_budget`` of the
    process's CPU (0.25%; ``None`` keeps the fixed schedule, for a diagnosis duty cycle).
    ``gc_adaptive=False`` keeps the GC optimizer to observing (pauses, counts) without tuning the collector.
    """

    enable_pooling: bool = False
    pool_size_mb: int = 64
    enable_caching: bool = True
    cache_size_mb: int = 128
    cache_policy: enum.Enum | str = "adaptive"
    enable_custom_allocators: bool = False
    allocator_type: enum.Enum | str = "system"
    enable_gc_optimization: bool = True
    gc_adaptive: bool = True
    target_memory_usage_percent: float = 75.0
    monitoring_interval_ms: int = 1000
    enable_profiling: bool = True
    enable_leak_detection: bool = True
    report_dir: Path | None = None
    leak_window_s: float = 0.5
    leak_window_interval_s: float = 60.0
    leak_trace_budget: float | None = 0.0025
    memory_limit_mb: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "enable_pooling",
            "enable_caching",
            "enable_custom_allocators",
            "enable_gc_optimization",
            "gc_adaptive",
            "enable_profiling",
            "enable_leak_detection",
        ):
            check_bool(getattr(self, name), name)
        check_positive_int(self.pool_size_mb, "pool_size_mb", high=1 << 20)
        check_positive_int(self.cache_size_mb, "cache_size_mb", high=1 << 20)
        check_positive(self.target_memory_usage_percent, "target_memory_usage_percent", high=100.0)
        check_int(self.monitoring_interval_ms, "monitoring_interval_ms", low=10, high=3_600_000)
        check_positive(self.leak_window_s, "leak_window_s", high=3600.0)
        check_positive(self.leak_window_interval_s, "leak_window_interval_s", high=86_400.0)
        if self.leak_window_interval_s < self.leak_window_s:
            raise ConfigError(
                "leak_window_interval_s",
                f"must be >= leak_window_s ({self.leak_window_s}), got {self.leak_window_interval_s}",
            )
        if self.leak_trace_budget is not None:
            check_positive(self.leak_trace_budget, "leak_trace_budget", high=1.0)
        if self.memory_limit_mb is not None:
            check_positive_int(self.memory_limit_mb, "memory_limit_mb", high=1 << 30)
        policy = _coerce_choice(
            "cache_policy", self.cache_policy, "kotoba_memory.cache_manager", "CachePolicy", _CACHE_POLICIES
        )
        allocator = _coerce_choice(
            "allocator_type", self.allocator_type, "kotoba_memory.allocators", "AllocatorType", _ALLOCATORS
        )
        object.__setattr__(self, "cache_policy", policy)
        object.__setattr__(self, "allocator_type", allocator)
        if self.report_dir is not None:
            if not isinstance(self.report_dir, str | Path):
                raise ConfigTypeError("report_dir", f"must be a path, got {type(self.report_dir).__name__}")
            if str(self.report_dir).strip() == "":
                raise ConfigError("report_dir", "must not be empty")
            object.__setattr__(self, "report_dir", Path(self.report_dir))

    @property
    def cache_policy_name(self) -> str:
        """The cache policy as its lower-case value (``"adaptive"``)."""
        return _choice_name(self.cache_policy)

    @property
    def allocator_name(self) -> str:
        """The allocator type as its lower-case value (``"system"``)."""
        return _choice_name(self.allocator_type)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> MemoryConfig:
        """Build from a settings dict with lower-case field names (Django ``KOTOBA_MEMORY``, Flask keys).

        An unknown key raises :class:`ConfigError` naming it, so typos do not pass silently.
        """
        if not isinstance(mapping, Mapping):
            raise TypeError(f"MemoryConfig.from_mapping needs a mapping, got {type(mapping).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            if not isinstance(key, str):
                raise ConfigError(str(key), "setting names must be strings")
            name = key.strip().lower()
            if name not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(key, f"unknown MemoryConfig field; known fields: {known}")
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable): enums as their values, paths as strings."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, Path):
                value = str(value)
            data[f.name] = value
        return data


def _choice_name(value: enum.Enum | str) -> str:
    return str(value.value).lower() if isinstance(value, enum.Enum) else value
