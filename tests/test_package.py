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
