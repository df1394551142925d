"""Checks for the configuration users pass in: each returns the accepted value or raises a ConfigError.

Every function takes the value first and the parameter's name second; the error names that parameter
(``ConfigError.field``). A value of the wrong type raises :class:`ConfigTypeError`, which is both a
``ConfigError`` (so a ``ValueError``) and a ``TypeError``; a value out of range raises ``ConfigError``.
``bool`` is never accepted where a number is expected, and ``nan`` never passes a number check.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import TypeVar

from kotoba_memory.errors import ConfigError, ConfigTypeError

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "check_bool",
    "check_enum",
    "check_int",
    "check_non_negative",
    "check_non_negative_int",
    "check_number",
    "check_positive",
    "check_positive_int",
    "check_str",
    "check_ttl",
]

E = TypeVar("E", bound=enum.Enum)


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is a bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise ConfigTypeError(name, f"must be a bool, got {type(value).__name__}")
    return value


def _range_text(low: float | None, high: float | None, low_open: bool) -> str:
    if low is not None and high is not None and not low_open:
        return f"between {low} and {high}"
    parts = []
    if low is not None:
        parts.append(f"> {low}" if low_open else f">= {low}")
    if high is not None:
        parts.append(f"<= {high}")
    return " and ".join(parts)


def check_int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) with ``low <= value <= high`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(name, f"must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(name, f"must be an int {_range_text(low, high, False)}, got {value!r}")
    return value


def check_positive_int(value: object, name: str, *, high: int | None = None) -> int:
    """``value`` if it is an int >= 1 (and <= ``high``): sizes, capacities, counts of things."""
    return check_int(value, name, low=1, high=high)


def check_non_negative_int(value: object, name: str, *, high: int | None = None) -> int:
    """``value`` if it is an int >= 0 (and <= ``high``): thresholds and counts that may be zero."""
    return check_int(value, name, low=0, high=high)


def check_number(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` (int or float, returned unchanged) if finite and within the bounds.

    ``low_open`` makes ``low`` exclusive; ``allow_inf`` lets ``inf``/``-inf`` through (bounds still apply);
    ``nan`` is always rejected.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigTypeError(name, f"must be a number, got {type(value).__name__}")
    if math.isnan(value) or (not allow_inf and math.isinf(value)):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    too_low = low is not None and (value < low or (low_open and value == low))
    if too_low or (high is not None and value > high):
        raise ConfigError(name, f"must be a number {_range_text(low, high, low_open)}, got {value!r}")
    return value


def check_positive(
    value: object, name: str, *, high: float | None = None, allow_inf: bool = False
) -> float:
    """``value`` if it is a finite number > 0 (and <= ``high``): intervals, durations, ratios."""
    return check_number(value, name, low=0, high=high, low_open=True, allow_inf=allow_inf)


def check_non_negative(
    value: object, name: str, *, high: float | None = None, allow_inf: bool = False
) -> float:
    """``value`` if it is a finite number >= 0 (and <= ``high``): delays and timeouts that may be zero."""
    return check_number(value, name, low=0, high=high, allow_inf=allow_inf)


def check_ttl(value: object, name: str = "ttl") -> float | None:
    """A time-to-live in seconds: None (never expires) or a finite number > 0, returned as a float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigTypeError(name, f"must be a number of seconds or None, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def check_enum(value: object, name: str, enum_type: type[E], *, label: str | None = None) -> E:
    """The member of ``enum_type`` that ``value`` is, or names by its name or value (any case).

    ``label`` is how the error calls the choice (default: the enum's class name).
    """
    if isinstance(value, enum_type):
        return value
    if isinstance(value, enum.Enum):
        raw = str(value.value)
    elif isinstance(value, str):
        raw = value
    else:
        raise ConfigTypeError(name, f"must be a {enum_type.__name__} or str, got {type(value).__name__}")
    wanted = raw.strip().lower()
    for member in enum_type:
        if wanted in (str(member.value).lower(), member.name.lower()):
            return member
    raise ConfigError(
        name, f"unknown {label or enum_type.__name__} {value!r}; expected one of {_names(enum_type)}"
    )


def _names(members: Iterable[enum.Enum]) -> str:
    return ", ".join(str(member.value) for member in members)


def check_str(value: object, name: str, *, allow_spaces: bool = True, allow_empty: bool = False) -> str:
    """``value`` if it is a str; non-empty unless ``allow_empty``, no whitespace unless ``allow_spaces``."""
    if not isinstance(value, str):
        raise ConfigTypeError(name, f"must be a str, got {type(value).__name__}")
    if (not value and not allow_empty) or (not allow_spaces and any(c.isspace() for c in value)):
        what = "a non-empty str" if allow_spaces else "a non-empty str without spaces"
        raise ConfigError(name, f"must be {what}, got {value!r}")
    return value
