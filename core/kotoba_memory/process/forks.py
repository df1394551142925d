"""The one fork registry: a single ``os.register_at_fork`` for the whole package.

Components register a callback to run in a forked child (``reinit_after_fork``: new locks, forget the
parent's descriptors, readings and threads), and may pair a ``before`` callback (parent, just before
fork: e.g. take a lock so no write is mid-flight) with an ``after_in_parent`` one (release it).
Callbacks never start threads: the scheduler resumes its one thread the next time the child calls
into kotoba-memory (a request, a report, a new task).
Bound methods are held weakly, so registering does not keep a component alive.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["fork_count", "register"]

logger = logging.getLogger("kotoba_memory.process")

_lock = threading.Lock()
# (name, strong function or weak method reference, is_weak)
_child: list[tuple[str, Any, bool]] = []
_before: list[tuple[str, Any, bool]] = []
_parent: list[tuple[str, Any, bool]] = []
_forks = 0
errors = 0


def _ref(callback: Callable[[], Any]) -> tuple[Any, bool]:
    if getattr(callback, "__self__", None) is not None and hasattr(callback, "__func__"):
        return weakref.WeakMethod(callback), True
    return callback, False


def register(
    after_in_child: Callable[[], Any] | None = None,
    *,
    before: Callable[[], Any] | None = None,
    after_in_parent: Callable[[], Any] | None = None,
    name: str = "",
) -> None:
    """Run ``after_in_child()`` in every forked child, ``before()`` in the parent just before fork and
    ``after_in_parent()`` in the parent just after it.

    Callbacks run in registration order (``before`` in reverse, as ``os.register_at_fork`` does); one
    that raises is logged and counted, and the others still run.
    """
    if after_in_child is None and before is None and after_in_parent is None:
        raise TypeError("register() needs after_in_child, before or after_in_parent")
    for callback in (after_in_child, before, after_in_parent):
        if callback is not None and not callable(callback):
            raise TypeError(f"fork callbacks must be callable, got {type(callback).__name__}")
    label = name or getattr(after_in_child or before or after_in_parent, "__qualname__", "callback")
    with _lock:
        if len(_child) + len(_before) + len(_parent) > 256:  # drop callbacks of components that are gone
            for table in (_child, _before, _parent):
                table[:] = [row for row in table if _resolve(row) is not None]
        if after_in_child is not None:
            _child.append((label, *_ref(after_in_child)))
        if before is not None:
            _before.append((label, *_ref(before)))
        if after_in_parent is not None:
            _parent.append((label, *_ref(after_in_parent)))


def fork_count() -> int:
    """How many times this process's ancestry forked into it (0 in the original process)."""
    return _forks


def _resolve(row: tuple[str, Any, bool]) -> Callable[[], Any] | None:
    _, target, weak = row
    return target() if weak else target


def _run(rows: list[tuple[str, Any, bool]]) -> None:
    global errors
    for row in rows:
        callback = _resolve(row)
        if callback is None:
            continue
        try:
            callback()
        except Exception:  # one broken component must not break the forked worker
            errors += 1
            logger.debug("kotoba-memory: fork callback %s failed", row[0], exc_info=True)


def _before_fork() -> None:
    _run(list(reversed(_before)))


def _after_in_parent() -> None:
    _run(list(_parent))


def _after_in_child() -> None:
    global _lock, _forks
    # A parent thread may have held the lock at fork time: the child's copy would stay held forever.
    _lock = threading.Lock()
    _forks += 1
    _child[:] = [row for row in _child if _resolve(row) is not None]
    _run(list(_child))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_in_parent, after_in_child=_after_in_child)
