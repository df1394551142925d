"""``MemoryConfig``: every knob of the MemoryOptimizer, validated when it is built."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kotoba_memory.errors import ConfigError

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
    if isinstance(value, enum.Enum):
        raw = str(value.value)
    elif isinstance(value, str):
        raw = value
    else:
        raise ConfigError(field_name, f"must be a {enum_name} or str, got {type(value).__name__}")
    cls = _enum_class(module, enum_name)
    if cls is not None:
        if isinstance(value, cls):
            return value
        for member in cls:
            if raw.strip().lower() in (str(member.value).lower(), member.name.lower()):
                return member
        options = ", ".join(str(m.value) for m in cls)
        raise ConfigError(field_name, f"unknown {enum_name} {value!r}; expected one of {options}")
    normalized = raw.strip().lower()
    if normalized not in choices:
        raise ConfigError(field_name, f"unknown {enum_name} {value!r}; expected one of {', '.join(choices)}")
    return normalized


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be a bool, got {type(value).__name__}")


def _check_number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigError(name, f"must be {bound} and <= {high}, got {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {value}")


@dataclass(frozen=True)
class MemoryConfig:
    """What the :class:`~kotoba_memory.optimizer.MemoryOptimizer` turns on, and how big things are.

    Field names follow the reference design. Sizes are MiB; ``monitoring_interval_ms`` is how often
    memory is sampled; ``leak_window_s`` out of every ``leak_window_interval_s`` seconds is traced for
    leak detection (the default 0.5 s per minute keeps the overhead near 1%). ``gc_adaptive=False``
    keeps the GC optimizer to observing (pauses, counts) without tuning the collector.
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
            _check_bool(name, getattr(self, name))
        _check_int("pool_size_mb", self.pool_size_mb, 1, 1 << 20)
        _check_int("cache_size_mb", self.cache_size_mb, 1, 1 << 20)
        _check_number(
            "target_memory_usage_percent", self.target_memory_usage_percent, 0.0, 100.0, low_open=True
        )
        _check_int("monitoring_interval_ms", self.monitoring_interval_ms, 10, 3_600_000)
        _check_number("leak_window_s", self.leak_window_s, 0.0, 3600.0, low_open=True)
        _check_number("leak_window_interval_s", self.leak_window_interval_s, 0.0, 86_400.0, low_open=True)
        if self.leak_window_interval_s < self.leak_window_s:
            raise ConfigError(
                "leak_window_interval_s",
                f"must be >= leak_window_s ({self.leak_window_s}), got {self.leak_window_interval_s}",
            )
        if self.memory_limit_mb is not None:
            _check_int("memory_limit_mb", self.memory_limit_mb, 1, 1 << 30)
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
                raise ConfigError("report_dir", f"must be a path, got {type(self.report_dir).__name__}")
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
