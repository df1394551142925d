"""`manage.py check` reports invalid KotobaCache OPTIONS as kotoba_memory.E006, not as a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django")

SETTINGS = '''
SECRET_KEY = "not-secret"
INSTALLED_APPS = ["kotoba_memory_integrations.django"]
MIDDLEWARE = ["kotoba_memory_integrations.django.middleware.MemoryMiddleware"]
CACHES = {{"default": {{"BACKEND": "kotoba_memory_integrations.django.KotobaCache",
                        "LOCATION": "main", "OPTIONS": {options}}}}}
'''


def _django(tmp_path: Path, options: str, *command: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "project_settings.py").write_text(SETTINGS.format(options=options))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project_settings", "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "django", *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ('{"POLICY": "adaptve"}',
         "CACHES['default']['OPTIONS']['POLICY'] is invalid: unknown cache policy"),
        ('{"MAX_BYTES": -5}', "CACHES['default']['OPTIONS']['MAX_BYTES'] is invalid"),
        ('{"SPILL_THRESHOLD_BYTES": 10}', "['SPILL_THRESHOLD_BYTES'] is invalid: only applies with a disk"),
    ],
)
def test_bad_options_are_a_check_error_not_a_traceback(tmp_path: Path, options: str, expected: str) -> None:
    done = _django(tmp_path, options, "check")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert "(kotoba_memory.E006)" in done.stderr and expected in done.stderr, done.stderr


def test_aliases_sharing_a_location_must_agree(tmp_path: Path) -> None:
    (tmp_path / "project_settings.py").write_text(SETTINGS.format(options='{"POLICY": "lru"}') + (
        'CACHES["other"] = {"BACKEND": "kotoba_memory_integrations.django.KotobaCache", "LOCATION": "main",\n'
        '                   "OPTIONS": {"POLICY": "lfu"}}\n'
    ))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project_settings", "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "django", "check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    expected = "CACHES['other']['OPTIONS'] is invalid: LOCATION 'main' is also used by CACHES['default']"
    assert expected in done.stderr


def test_good_options_pass_and_a_bad_cache_raises_on_use(tmp_path: Path) -> None:
    assert _django(tmp_path, '{"POLICY": "adaptive", "MAX_BYTES": 1048576}', "check").returncode == 0
    code = (
        "import django; django.setup()\n"
        "from django.core.cache import caches\n"
        "from kotoba_memory.errors import ConfigError\n"
        "cache = caches['default']\n"
        "try:\n    cache.set('k', 1)\nexcept ConfigError as exc:\n    print('raised', exc)\n"
    )
    (tmp_path / "use.py").write_text(code)
    (tmp_path / "project_settings.py").write_text(SETTINGS.format(options='{"POLICY": "adaptve"}'))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project_settings", "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "use.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.startswith("raised POLICY: unknown cache policy 'adaptve'"), done.stderr
