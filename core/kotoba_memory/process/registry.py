"""The one registry of what is running in this process: the optimizer, the GC optimizer, the profiler.

Each component registers itself when it starts and leaves when it stops; everyone else asks here
(``active("gc_optimizer")``) instead of keeping its own "current" variable. A forked child inherits the
entries: the objects are the same, re-initialised by their fork callbacks.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from kotoba_memory.process import forks

__all__ = ["KINDS", "active", "claim", "getter", "release", "snapshot"]

#: The kinds of component the registry knows; one running instance of each per process.
KINDS = ("optimizer", "gc_optimizer", "profiler")

_lock = threading.Lock()
_active: dict[str, Any] = {}


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")


def active(kind: str) -> Any:
    """The running component of ``kind``, or None."""
    return _active.get(kind)


def getter(kind: str) -> Callable[[], Any]:
    """A callable returning the running component of ``kind`` (or None): ``active(kind)`` as one C-level
    call, for per-request lookups. The same object for a kind every time (the C request recorder knows
    it, and reads the registry itself instead of calling it)."""
    _check(kind)
    return _getters[kind]


_getters = {kind: functools.partial(_active.get, kind) for kind in KINDS}


def claim(kind: str, component: Any, *, replace: bool = True) -> Any:
    """Make ``component`` the running one of ``kind``; returns the one it replaced (or that blocks it).

    With ``replace=False`` an existing, different component stays and is returned, and ``component``
    is not registered: the caller decides what to do (the GC optimizer refuses to start twice).
    """
    _check(kind)
    with _lock:
        current = _active.get(kind)
        if current is not None and current is not component and not replace:
            return current
        _active[kind] = component
        return current


def release(kind: str, component: Any) -> None:
    """Remove ``component`` if it is the running one of ``kind`` (no-op otherwise)."""
    _check(kind)
    with _lock:
        if _active.get(kind) is component:
            del _active[kind]


def snapshot() -> dict[str, Any]:
    """A copy of kind -> running component."""
    with _lock:
        return dict(_active)


def _reinit_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


forks.register(_reinit_after_fork, name="process.registry")
