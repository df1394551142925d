"""The shared configuration checks in ``kotoba_memory.validation``."""

from __future__ import annotations

import enum
import math
import pickle

import pytest

from kotoba_memory.errors import ConfigError, ConfigTypeError, KotobaMemoryError
from kotoba_memory.validation import (
    check_bool,
    check_enum,
    check_int,
    check_non_negative,
    check_non_negative_int,
    check_number,
    check_positive,
    check_positive_int,
    check_str,
    check_ttl,
)

NAN, INF = float("nan"), float("inf")


class Color(enum.Enum):
    RED = "red"
    DARK_BLUE = "blue"


def test_error_hierarchy() -> None:
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, KotobaMemoryError)
    assert issubclass(ConfigTypeError, ConfigError) and issubclass(ConfigTypeError, TypeError)
    error = ConfigError("size", "must be > 0")
    assert error.field == "size" and str(error) == "size: must be > 0"
    copy = pickle.loads(pickle.dumps(ConfigTypeError("size", "must be an int")))
    assert type(copy) is ConfigTypeError and copy.field == "size" and str(copy) == "size: must be an int"


def test_check_bool() -> None:
    assert check_bool(False, "flag") is False
    for bad in (0, 1, None, "yes"):
        with pytest.raises(ConfigTypeError, match="flag: must be a bool"):
            check_bool(bad, "flag")


def test_check_int_and_its_bounds() -> None:
    assert check_int(-3, "n") == -3
    assert check_int(5, "n", low=5, high=5) == 5
    assert check_positive_int(1, "n") == 1
    assert check_non_negative_int(0, "n") == 0
    for bad in (True, 1.0, "1", None):
        with pytest.raises(ConfigTypeError, match="n: must be an int"):
            check_int(bad, "n")
    with pytest.raises(ConfigError, match=r"n: must be an int between 1 and 3, got 4"):
        check_int(4, "n", low=1, high=3)
    with pytest.raises(ConfigError, match=r"n: must be an int >= 1, got 0"):
        check_positive_int(0, "n")
    with pytest.raises(ConfigError, match=r"n: must be an int >= 0, got -1"):
        check_non_negative_int(-1, "n")
    with pytest.raises(ConfigError, match=r"must be an int <= 9"):
        check_int(10, "n", high=9)
    with pytest.raises(ConfigError):
        check_positive_int(11, "n", high=10)


def test_check_number_rejects_nan_and_inf_unless_inf_is_allowed() -> None:
    assert check_number(2, "x") == 2 and check_number(2.5, "x") == 2.5
    for bad in (NAN, INF, -INF):
        with pytest.raises(ConfigError, match="x: must be a finite number"):
            check_number(bad, "x")
    assert check_number(INF, "x", low=0, allow_inf=True) == INF
    with pytest.raises(ConfigError):
        check_number(NAN, "x", allow_inf=True)
    with pytest.raises(ConfigError):
        check_number(-INF, "x", low=0, allow_inf=True)
    for bad in (True, "1", None, 1j):
        with pytest.raises(ConfigTypeError, match="x: must be a number"):
            check_number(bad, "x")


def test_check_number_bounds() -> None:
    assert check_number(0.0, "x", low=0.0) == 0.0
    with pytest.raises(ConfigError, match=r"x: must be a number > 0.0 and <= 1.0, got 0.0"):
        check_number(0.0, "x", low=0.0, high=1.0, low_open=True)
    with pytest.raises(ConfigError, match=r"must be a number between 0 and 1, got 1.5"):
        check_number(1.5, "x", low=0, high=1)
    assert check_positive(1e-9, "x") == 1e-9
    with pytest.raises(ConfigError, match=r"x: must be a number > 0, got 0"):
        check_positive(0, "x")
    assert check_non_negative(0, "x") == 0
    with pytest.raises(ConfigError):
        check_non_negative(-0.5, "x")
    with pytest.raises(ConfigError):
        check_positive(INF, "x")
    assert check_positive(INF, "x", allow_inf=True) == INF


def test_check_ttl() -> None:
    assert check_ttl(None) is None
    assert check_ttl(5, "default_ttl") == 5.0 and isinstance(check_ttl(5), float)
    for bad in (0, -1, NAN, INF, -INF):
        with pytest.raises(ConfigError, match="default_ttl: must be a finite number of seconds > 0"):
            check_ttl(bad, "default_ttl")
    for bad in (True, "10", [1]):
        with pytest.raises(ConfigTypeError, match="ttl: must be a number of seconds or None"):
            check_ttl(bad)


def test_check_enum_accepts_members_names_and_values() -> None:
    assert check_enum(Color.RED, "color", Color) is Color.RED
    assert check_enum("red", "color", Color) is Color.RED
    assert check_enum(" RED ", "color", Color) is Color.RED
    assert check_enum("blue", "color", Color) is Color.DARK_BLUE
    assert check_enum("dark_blue", "color", Color) is Color.DARK_BLUE
    with pytest.raises(ConfigError, match=r"color: unknown paint 'green'; expected one of red, blue"):
        check_enum("green", "color", Color, label="paint")
    with pytest.raises(ConfigError, match="unknown Color"):
        check_enum("green", "color", Color)
    with pytest.raises(ConfigTypeError, match="color: must be a Color or str, got int"):
        check_enum(1, "color", Color)


def test_check_str() -> None:
    assert check_str("a b", "name") == "a b"
    with pytest.raises(ConfigError, match="name: must be a non-empty str"):
        check_str("", "name")
    with pytest.raises(ConfigError, match="without spaces"):
        check_str("a b", "name", allow_spaces=False)
    with pytest.raises(ConfigTypeError, match="name: must be a str, got int"):
        check_str(3, "name")


def test_errors_keep_working_with_except_value_error_and_type_error() -> None:
    with pytest.raises(ValueError):
        check_positive_int(0, "n")
    with pytest.raises(TypeError):
        check_positive_int("1", "n")
    with pytest.raises(ValueError):
        check_positive_int("1", "n")
    assert math.isinf(check_number(INF, "x", allow_inf=True))
