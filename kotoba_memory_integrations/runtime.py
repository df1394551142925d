"""The process's one MemoryOptimizer as started by a framework integration (Django app, Flask extension).

Frameworks may initialise more than once per process (several Flask apps, Django's test runner,
re-imports); the optimizer must still run once: the process layer's registry holds it. Under a
pre-forking server with the app preloaded in the master (``gunicorn --preload``) the workers inherit
the master's optimizer, re-initialised for each worker by the fork registry, and its background work
resumes at the worker's first request. The server hooks make that explicit, e.g. in
``gunicorn.conf.py``::

    from kotoba_memory_integrations.runtime import post_fork, pre_fork  # noqa: F401

``pre_fork`` freezes the master's heap out of the GC (``gc.freeze()`` via the GC optimizer) so the
workers share its pages copy-on-write; ``post_fork`` resumes the worker's optimizer at once.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from kotoba_memory.config import MemoryConfig
from kotoba_memory.optimizer import MemoryOptimizer, MemoryReport, get_active_optimizer
from kotoba_memory.process import forks, scheduler

__all__ = ["current_report", "get_optimizer", "post_fork", "pre_fork", "start_optimizer", "stop_optimizer"]

_log = logging.getLogger("kotoba_memory_integrations")
_lock = threading.Lock()
_atexit_registered = False


def start_optimizer(config: MemoryConfig) -> MemoryOptimizer:
    """Start a :class:`MemoryOptimizer` for ``config`` unless this process already runs one.

    Returns the running optimizer (the first config wins; a different later config is logged).
    """
    global _atexit_registered
    with _lock:
        running = get_active_optimizer()
        if running is not None:
            if config != running.config:
                _log.warning("kotoba-memory optimizer already running; ignoring a second, different config")
            return running
        optimizer = MemoryOptimizer(config)
        optimizer.start()
        if not _atexit_registered:
            atexit.register(_stop_at_exit)
            _atexit_registered = True
        return optimizer


def get_optimizer() -> MemoryOptimizer | None:
    """The optimizer running in this process (started by an integration or by hand), or None."""
    return get_active_optimizer()


def stop_optimizer() -> MemoryReport | None:
    """Stop the running optimizer and return its ``MemoryReport`` (None if none was running)."""
    with _lock:
        optimizer = get_active_optimizer()
    return optimizer.stop() if optimizer is not None else None


def current_report() -> MemoryReport | None:
    """A ``MemoryReport`` of the running optimizer so far, without stopping it (None if none runs)."""
    optimizer = get_optimizer()
    return optimizer.report() if optimizer is not None else None


def _stop_at_exit() -> None:
    try:
        stop_optimizer()
    except Exception:  # interpreter shutdown: nothing useful left to do with the error
        _log.debug("kotoba-memory optimizer failed to stop at exit", exc_info=True)


def pre_fork(server: Any = None, worker: Any = None) -> None:
    """Server hook run in the master before forking a worker: freeze the heap for copy-on-write."""
    optimizer = get_optimizer()
    gc_optimizer = getattr(optimizer, "gc_optimizer", None)
    if gc_optimizer is not None:
        gc_optimizer.freeze_for_fork()


def post_fork(server: Any = None, worker: Any = None) -> None:
    """Server hook run in a new worker: resume its inherited optimizer's background work now."""
    scheduler.resume()


def _reinit_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


forks.register(_reinit_after_fork, name="integrations.runtime")
