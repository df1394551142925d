"""Loads the optional C extensions that speed up hot paths, unless pure Python is forced.

Every compiled module has a pure-Python reference implementation with the same behaviour; callers ask
:func:`load` and fall back to it when ``None`` comes back. ``KOTOBA_MEMORY_PURE_PYTHON=1`` forces the
fallback everywhere (read once, at first use, so one process never mixes both for one component).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType

PURE_PYTHON_ENV = "KOTOBA_MEMORY_PURE_PYTHON"

# The compiled modules the package knows of (each built from csrc/<name>.c as kotoba_memory.<name>).
EXTENSIONS: tuple[str, ...] = ("_ccache", "_cpool", "_crecord", "_cunpooled")

_log = logging.getLogger("kotoba_memory")
_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
_forced: bool | None = None


def pure_python_forced() -> bool:
    """Whether ``KOTOBA_MEMORY_PURE_PYTHON`` asks for the pure-Python implementation everywhere."""
    global _forced
    if _forced is None:
        _forced = os.environ.get(PURE_PYTHON_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return _forced


def load(name: str) -> ModuleType | None:
    """The compiled ``kotoba_memory.<name>``, or None where it is not built or pure Python is forced."""
    with _lock:
        if name in _modules:
            return _modules[name]
        module: ModuleType | None = None
        if not pure_python_forced():
            try:
                module = importlib.import_module(f"kotoba_memory.{name}")
            except ImportError as exc:
                _log.debug("kotoba-memory: %s not built (%s); using pure Python", name, exc)
        _modules[name] = module
        return module


def implementations() -> dict[str, str]:
    """Each known extension mapped to the implementation in use: ``"c"`` or ``"python"``."""
    return {name: "c" if load(name) is not None else "python" for name in EXTENSIONS}


def implementation() -> str:
    """``"c"`` when every known extension is in use, ``"python"`` when none is, else ``"mixed"``."""
    used = set(implementations().values())
    if used == {"c"}:
        return "c"
    if used <= {"python"}:
        return "python"
    return "mixed"
