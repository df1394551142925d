"""Issue 11, item 4: a pool that passes validation but cannot be mapped is a ConfigError naming the setting.

Each case runs in a subprocess whose address space is capped with ``RLIMIT_AS`` just above what it
already uses, so the pool's ``mmap`` fails with ENOMEM whatever the machine's memory.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CAP = """
import resource
from kotoba_memory.process import memory
headroom = 512 << 20
limit = memory.virtual_memory_bytes() + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
POOL_MB = 4096  # far above the headroom left under the cap
"""


def run(body: str) -> str:
    """Run ``body`` under the address-space cap; returns its stdout (the script asserts for itself)."""
    script = _CAP + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_memory_pool_and_optimizer_raise_config_error_naming_the_size() -> None:
    out = run("""
        from kotoba_memory import MemoryConfig
        from kotoba_memory.errors import ConfigError
        from kotoba_memory.memory_pool import MemoryPool
        from kotoba_memory.optimizer import MemoryOptimizer
        from kotoba_memory.process import registry
        try:
            MemoryPool(POOL_MB << 20)
        except ConfigError as exc:
            assert exc.field == "capacity" and "map" in exc.reason, exc
        else:
            raise AssertionError("the pool mapped")
        optimizer = MemoryOptimizer(MemoryConfig(enable_pooling=True, pool_size_mb=POOL_MB))
        try:
            optimizer.start()
        except ConfigError as exc:
            print(exc)
        assert not optimizer.running and registry.snapshot().get("optimizer") is None
    """)
    assert out.startswith("pool_size_mb: 4096 MiB: cannot map")


def test_django_start_up_fails_with_improperly_configured_naming_pool_size_mb() -> None:
    pytest.importorskip("django")
    out = run("""
        import django
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
        settings.configure(INSTALLED_APPS=["kotoba_memory_integrations.django"],
                           KOTOBA_MEMORY={"enable_pooling": True, "pool_size_mb": POOL_MB,
                                          "enable_leak_detection": False})
        try:
            django.setup()
        except ImproperlyConfigured as exc:
            print(exc)
    """)
    assert out.startswith("KOTOBA_MEMORY['pool_size_mb'] is invalid: 4096 MiB: cannot map"), out


def test_flask_init_app_raises_config_error_naming_pool_size_mb() -> None:
    pytest.importorskip("flask")
    out = run("""
        from flask import Flask
        from kotoba_memory.errors import ConfigError
        from kotoba_memory_integrations.flask import EXTENSION_KEY, KotobaMemory
        app = Flask("t")
        app.config.update(KOTOBA_MEMORY_ENABLE_POOLING=True, KOTOBA_MEMORY_POOL_SIZE_MB=POOL_MB,
                          KOTOBA_MEMORY_ENABLE_LEAK_DETECTION=False)
        original = app.wsgi_app
        try:
            KotobaMemory(app)
        except ConfigError as exc:
            print(exc.field)
        assert app.wsgi_app == original and EXTENSION_KEY not in app.extensions
    """)
    assert out.strip() == "pool_size_mb"
