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
Without the hooks the work resumes at the worker's first request through kotoba-memory's middleware;
a worker forked with a running optimizer and neither hook nor middleware logs a warning saying so.

The fleet: once a process serves requests (a kotoba-memory middleware is built in it) it publishes a
snapshot of itself to the app's per-host spool (:mod:`kotoba_memory.fleet`), and :func:`current_report`
lists every process of the server from it (the JSON report's ``workers`` list and ``fleet`` totals).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys
import threading
from types import FrameType
from typing import Any

from kotoba_memory import fleet
from kotoba_memory.config import MemoryConfig
from kotoba_memory.optimizer import MemoryOptimizer, MemoryReport, get_active_optimizer
from kotoba_memory.process import forks, registry, scheduler

__all__ = [
    "configure_fleet",
    "current_report",
    "fleet_spool",
    "get_optimizer",
    "post_fork",
    "pre_fork",
    "serving",
    "start_optimizer",
    "stop_optimizer",
    "with_fleet",
]

_log = logging.getLogger("kotoba_memory_integrations")
_lock = threading.Lock()
_atexit_registered = False
# The fleet: the app name its spool is keyed by (None: not configured yet, a default applies; "": off),
# whether a request path of ours exists in this process, and the publisher once one runs.
_fleet_name: str | None = None
_fleet_interval_s = fleet.DEFAULT_INTERVAL_S
_serving = False
_publisher: fleet.FleetPublisher | None = None


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
    _stop_publishing()
    return optimizer.stop() if optimizer is not None else None


def current_report(*, workers: bool = True) -> MemoryReport | None:
    """A ``MemoryReport`` of the running optimizer so far, without stopping it (None if none runs).

    With ``workers`` (and a fleet spool in use) it also lists every process of this server: this
    process's snapshot is written from the report first, the others are at most one publishing
    interval old.
    """
    optimizer = get_optimizer()
    if optimizer is None:
        return None
    report = optimizer.report()
    publisher = _publisher
    if not workers or publisher is None:
        return report
    publisher.publish(report)
    return with_fleet(report, publisher.spool, viewer_pid=os.getpid())


def with_fleet(report: MemoryReport, spool: fleet.FleetSpool, *, viewer_pid: int | None) -> MemoryReport:
    """``report`` with the ``workers`` rows and ``fleet`` totals read from ``spool`` (dead pids pruned).

    ``viewer_pid``: the reporting process, whose own server's processes are listed; None (a command
    run outside the server) lists every server of the app.
    """
    try:
        rows, totals = fleet.fleet_view(spool.read(), viewer_pid=viewer_pid)
    except OSError as exc:  # FleetError: a spool that is not ours is never read
        _log.warning("kotoba-memory: fleet spool %s not read: %s", spool.directory, exc)
        failed = {"error": str(exc), "spool": str(spool.directory)}
        return dataclasses.replace(report, fleet=failed, notes=[*report.notes, f"workers not listed: {exc}"])
    totals["spool"] = str(spool.directory)
    return dataclasses.replace(report, workers=rows, fleet=totals)


def default_fleet_name() -> str:
    """The app name used when no integration named one: the working directory and program."""
    return f"process:{os.path.realpath(os.getcwd())}:{os.path.basename(sys.argv[0] if sys.argv else '')}"


def configure_fleet(name: str | bool, *, interval_s: float = fleet.DEFAULT_INTERVAL_S) -> None:
    """Name this app's fleet spool (``True``: the default name, ``False``: no spool) before it serves.

    Integrations call it (Django: the settings module, Flask: the app's import name and root path),
    so the workers of one server and a management command run beside them find the same spool.
    """
    global _fleet_name, _fleet_interval_s
    if not isinstance(name, bool | str) or (isinstance(name, str) and not name.strip()):
        raise TypeError(f"fleet name must be True, False or a non-empty str, got {name!r}")
    fleet_interval = float(interval_s)
    if not fleet_interval > 0:
        raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
    with _lock:
        if _publisher is not None:
            return  # already publishing: the first name stays (several apps in one process)
        _fleet_name = default_fleet_name() if name is True else ("" if name is False else str(name))
        _fleet_interval_s = fleet_interval


def fleet_spool(name: str | None = None) -> fleet.FleetSpool | None:
    """The spool of ``name`` (default: this process's configured app), or None when the fleet is off."""
    chosen = name if name is not None else (_fleet_name if _fleet_name is not None else default_fleet_name())
    return fleet.FleetSpool.for_name(chosen) if chosen else None


def serving() -> None:
    """Note that this process serves requests (middleware calls it): start publishing its snapshot."""
    global _serving, _publisher
    _serving = True
    if _publisher is not None or get_active_optimizer() is None:
        return
    with _lock:
        if _publisher is not None:
            return
        spool = fleet_spool()
        if spool is None:
            return
        publisher = fleet.FleetPublisher(
            spool,
            name=_fleet_name or default_fleet_name(),
            interval_s=_fleet_interval_s,
            keep=_keep_publishing,
        )
        _publisher = publisher
    publisher.start()


def _keep_publishing() -> bool:
    """Whether the publisher goes on: only while an optimizer runs (it is forgotten otherwise)."""
    global _publisher
    optimizer = registry.active("optimizer")
    if optimizer is not None and optimizer.running:
        return True
    with _lock:
        _publisher = None
    return False


def _stop_publishing() -> None:
    global _publisher
    with _lock:
        publisher, _publisher = _publisher, None
    if publisher is not None:
        publisher.stop()


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
    if registry.active("optimizer") is not None and scheduler.paused_by_fork and not _serving:
        _warn_if_nothing_resumes()


def _warn_if_nothing_resumes() -> None:
    """In a gunicorn worker forked from a master running the optimizer (``--preload``) with neither
    kotoba-memory's middleware in the app nor the ``post_fork`` hook: say that nothing will run."""
    arbiter = _gunicorn_arbiter()
    if arbiter is None:
        return
    hook = getattr(getattr(arbiter, "cfg", None), "post_fork", None)
    if getattr(hook, "__module__", None) == __name__ or getattr(hook, "__wrapped__", None) is post_fork:
        return
    _log.warning(
        "kotoba-memory: gunicorn worker %d inherited the master's running optimizer (--preload), but "
        "nothing in this worker resumes it: the app is not wrapped in kotoba-memory's middleware and "
        "gunicorn's post_fork hook is not kotoba-memory's, so no profiling, GC tuning or fleet report "
        "runs here. Fix: add `from kotoba_memory_integrations.runtime import post_fork, pre_fork` to "
        "gunicorn.conf.py (or call kotoba_memory_integrations.runtime.post_fork() from your own "
        "post_fork), or wrap the app in kotoba_memory_integrations.wsgi.MemoryMiddleware.",
        os.getpid(),
    )


def _gunicorn_arbiter() -> Any:
    """The gunicorn ``Arbiter`` whose ``spawn_worker`` forked this process, if any (read off the stack:
    the fork callbacks run inside its ``os.fork()`` call)."""
    if "gunicorn.arbiter" not in sys.modules:
        return None
    arbiter_type = getattr(sys.modules["gunicorn.arbiter"], "Arbiter", None)
    frame: FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if arbiter_type is not None and isinstance(candidate, arbiter_type):
            return candidate
        frame = frame.f_back
    return None


forks.register(_reinit_after_fork, name="integrations.runtime")
