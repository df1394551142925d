"""The package's import-time contract."""

import subprocess
import sys


def test_import_pulls_in_no_web_framework() -> None:
    code = (
        "import sys, kotoba_memory\n"
        "bad = [m for m in ('django', 'flask', 'starlette', 'sqlalchemy', 'opentelemetry', 'redis')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_version_is_exposed() -> None:
    import kotoba_memory

    assert kotoba_memory.__version__.count(".") == 2


def test_unknown_attribute_raises() -> None:
    import pytest

    import kotoba_memory

    with pytest.raises(AttributeError, match="no_such_thing"):
        kotoba_memory.no_such_thing  # noqa: B018


def _about(env_value: str | None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "KOTOBA_MEMORY_PURE_PYTHON"}
    if env_value is not None:
        env["KOTOBA_MEMORY_PURE_PYTHON"] = env_value
    code = (
        "from kotoba_memory import __about__, _native\n"
        "print(__about__.pure_python_forced(), __about__.implementation(),"
        " [_native.load(n) is None for n in _native.EXTENSIONS])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return out.stdout.strip()


def test_pure_python_can_be_forced() -> None:
    from kotoba_memory import _native

    forced = _about("1")
    assert forced.startswith("True python ")
    assert forced.endswith(str([True] * len(_native.EXTENSIONS)))
    assert _about("0").startswith("False ")
    assert _about(None).startswith("False ")


def test_about_names_the_implementation_of_every_extension() -> None:
    from kotoba_memory import __about__, _native

    names = __about__.implementations()
    assert set(names) == set(_native.EXTENSIONS)
    assert set(names.values()) <= {"c", "python"}
    assert __about__.implementation() in {"c", "python", "mixed"}
