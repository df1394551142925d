"""A plain WSGI app that starts the optimizer at import, for gunicorn with and without ``--preload``.

``GET /state`` answers, for the worker that serves it: its pid, whether exactly one optimizer runs,
how many threads of ours exist and how many samples its profiler has taken.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from typing import Any

from kotoba_memory.config import MemoryConfig
from kotoba_memory.optimizer import MemoryOptimizer
from kotoba_memory.process import registry, scheduler
from kotoba_memory_integrations import runtime
from kotoba_memory_integrations.wsgi import MemoryMiddleware

# Every optimizer ever built here, to count the running ones. Not gc.get_objects(): the GC optimizer
# freezes the long-lived heap after warm-up, and frozen objects are not listed.
_BUILT: weakref.WeakSet[MemoryOptimizer] = weakref.WeakSet()
_init = MemoryOptimizer.__init__


def _recording_init(self: MemoryOptimizer, *args: Any, **kwargs: Any) -> None:
    _BUILT.add(self)
    _init(self, *args, **kwargs)


MemoryOptimizer.__init__ = _recording_init  # type: ignore[method-assign]

runtime.start_optimizer(
    MemoryConfig(
        enable_caching=False, monitoring_interval_ms=50, leak_window_s=0.2, leak_window_interval_s=1.0,
        leak_trace_budget=None,
    )
)
LOADED_IN = os.getpid()


def _state() -> dict[str, Any]:
    optimizer = registry.active("optimizer")  # not get_active_optimizer(): that would resume the work itself
    alive = [o for o in list(_BUILT) if o.running]
    return {
        "pid": os.getpid(),
        "loaded_in": LOADED_IN,
        "running_optimizers": len(alive),
        "active_is_the_running_one": optimizer is not None and alive == [optimizer],
        "our_threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("kotoba")),
        "scheduler_running": scheduler.running,
        "samples": optimizer.profiler.stats().samples if optimizer and optimizer.profiler else -1,
        "tasks": sorted(task.name for task in scheduler.tasks()),
    }


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = json.dumps(_state()).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


application = MemoryMiddleware(_app)
