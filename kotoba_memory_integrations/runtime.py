"""The process's one MemoryOptimizer as started by a framework integration (Django app, Flask extension).

Frameworks may initialise more than once per process (several Flask apps, Django's test runner,
re-imports); the optimizer's sampling threads must still run once. Under a pre-forking server with
the app preloaded in the master (``gunicorn --preload``), threads do not survive ``fork()``: call
:func:`pre_fork` / :func:`post_fork` from the server's hooks, e.g. in ``gunicorn.conf.py``::

    from kotoba_memory_integrations.runtime import post_fork, pre_fork  # noqa: F401

``pre_fork`` freezes the master's heap out of the GC (``gc.freeze()`` via the GC optimizer) so the
workers share its pages copy-on-write; ``post_fork`` starts a fresh optimizer in the worker.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

__all__ = ["current_report", "get_optimizer", "post_fork", "pre_fork", "start_optimizer", "stop_optimizer"]

_log = logging.getLogger("kotoba_memory_integrations")
_lock = threading.Lock()
_optimizer: Any = None
_config: Any = None
_pid = -1
_atexit_registered = False


def start_optimizer(config: Any) -> Any:
    """Start a :class:`MemoryOptimizer` for ``config`` unless this process already runs one.

    Returns the running optimizer (the first config wins; a different later config is logged).
    """
    global _optimizer, _config, _pid, _atexit_registered
    from kotoba_memory.optimizer import MemoryOptimizer

    with _lock:
        if _optimizer is not None and _pid == os.getpid():
            if config != _config:
                _log.warning("kotoba-memory optimizer already running; ignoring a second, different config")
            return _optimizer
        optimizer = MemoryOptimizer(config)
        optimizer.start()
        _optimizer, _config, _pid = optimizer, config, os.getpid()
        if not _atexit_registered:
            atexit.register(_stop_at_exit)
            _atexit_registered = True
        return optimizer


def get_optimizer() -> Any:
    """The optimizer an integration started in this process, or None."""
    return _optimizer if _pid == os.getpid() else None


def stop_optimizer() -> Any:
    """Stop the integration's optimizer and return its ``MemoryReport`` (None if none was running)."""
    global _optimizer, _pid
    with _lock:
        optimizer = _optimizer if _pid == os.getpid() else None
        _optimizer, _pid = None, -1
    return optimizer.stop() if optimizer is not None else None


def current_report() -> Any:
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
    """Server hook run in a new worker: start the worker's own optimizer with the master's config."""
    global _optimizer, _pid
    with _lock:
        config, inherited = _config, _optimizer
        _optimizer, _pid = None, -1  # the inherited one's threads did not survive fork()
    if inherited is not None and config is not None:
        start_optimizer(config)
