"""One daemon thread for all of kotoba-memory's periodic work.

Profiler samples and leak windows, the GC optimizer's ceiling checks, cache TTL sweeps and heap trims
are :class:`Task` s on the shared :data:`scheduler`. The thread starts with the first task, exits when
the last one is cancelled, and runs tasks one at a time: a task that returns a number asks to run again
after that many seconds, else after its interval. A task that raises is counted and logged, never
propagated. After ``fork()`` the child keeps the tasks but not the thread; :meth:`Scheduler.resume`
(called at the child's next request, report or new task) starts it again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable

from kotoba_memory.process import forks

__all__ = ["Scheduler", "Task", "scheduler"]

logger = logging.getLogger("kotoba_memory.process")

TaskFunction = Callable[[], "float | None"]
_GRID_S = 1.0


class Task:
    """A periodic job on the scheduler; :meth:`cancel` removes it."""

    __slots__ = (
        "_scheduler", "cancelled", "cpu_s", "errors", "fn", "interval_s", "name", "next_at", "runs", "seq",
    )

    def __init__(self, scheduler: Scheduler, name: str, fn: TaskFunction, interval_s: float) -> None:
        self._scheduler = scheduler
        self.name = name
        self.fn = fn
        self.interval_s = interval_s
        self.next_at = 0.0
        self.seq = 0
        self.cancelled = False
        self.runs = 0
        self.errors = 0
        #: CPU seconds the task's runs have taken on the scheduler's thread (what our background work costs).
        self.cpu_s = 0.0

    def cancel(self, *, wait: bool = True) -> None:
        """Remove the task; with ``wait``, also wait for a run in progress (not from the task itself)."""
        self._scheduler.cancel(self, wait=wait)

    def run_soon(self, delay_s: float = 0.0) -> None:
        """Run the task after ``delay_s`` seconds instead of at its next planned time, if that is sooner."""
        self._scheduler.reschedule(self, delay_s)

    def __repr__(self) -> str:
        return (f"<Task {self.name!r} every {self.interval_s:g}s runs={self.runs} errors={self.errors} "
                f"cpu={self.cpu_s:.3f}s>")


class Scheduler:
    """Runs :class:`Task` s on one daemon thread, earliest deadline first."""

    thread_name = "kotoba-memory"

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Task]] = []
        self._tasks: set[Task] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._current: Task | None = None
        #: True in a forked child whose tasks wait for :meth:`resume` (a plain attribute: read per request).
        self.paused_by_fork = False
        self.errors = 0
        forks.register(self.reinit_after_fork, name="process.scheduler")

    # -- tasks -------------------------------------------------------------------------------------
    def every(self, interval_s: float, fn: TaskFunction, *, name: str, delay_s: float | None = None) -> Task:
        """Run ``fn`` every ``interval_s`` seconds (first after ``delay_s``, default one interval)."""
        if isinstance(interval_s, bool) or not isinstance(interval_s, int | float) or not interval_s > 0:
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        if interval_s == float("inf"):
            raise ValueError("interval_s must be finite")
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        task = Task(self, name, fn, float(interval_s))
        first = interval_s if delay_s is None else max(0.0, float(delay_s))
        with self._cond:
            self._tasks.add(task)
            self._push(task, time.monotonic() + first)
            self._ensure_thread()
            self._cond.notify_all()
        return task

    def cancel(self, task: Task, *, wait: bool = True) -> None:
        """Remove ``task``; with ``wait``, return only once a run of it in progress has finished."""
        with self._cond:
            task.cancelled = True
            self._tasks.discard(task)
            if wait and self._thread is not threading.current_thread():
                deadline = time.monotonic() + 30.0
                while self._current is task and time.monotonic() < deadline:
                    self._cond.wait(0.1)
            self._cond.notify_all()

    def reschedule(self, task: Task, delay_s: float) -> None:
        """Move ``task``'s next run earlier, to ``delay_s`` seconds from now."""
        with self._cond:
            if task.cancelled or task not in self._tasks:
                return
            at = time.monotonic() + max(0.0, delay_s)
            if at < task.next_at and task is not self._current:
                self._push(task, at)
                self._cond.notify_all()

    def tasks(self) -> list[Task]:
        """The tasks scheduled now, in no particular order."""
        with self._cond:
            return list(self._tasks)

    # -- the thread ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def on_own_thread(self) -> bool:
        """Whether the caller runs on the scheduler's thread (our background work, never the app's)."""
        return self._thread is threading.current_thread()

    def resume(self) -> None:
        """Start the thread again if tasks are waiting for one (in a forked child); cheap otherwise."""
        if not self.paused_by_fork:
            return
        with self._cond:
            self.paused_by_fork = False
            if self._tasks:
                self._ensure_thread()

    def reinit_after_fork(self) -> None:
        """In a forked child: new lock, no thread; tasks wait for :meth:`resume`."""
        self._cond = threading.Condition(threading.Lock())
        self._thread = None
        current = self._current
        self._current = None
        if current is not None and not current.cancelled:
            # It was running in the parent's thread at fork time: run it again in the child.
            self._push(current, time.monotonic() + current.interval_s)
        self.paused_by_fork = bool(self._tasks)

    def _push(self, task: Task, at: float) -> None:
        task.next_at = at
        task.seq = next(self._seq)
        heapq.heappush(self._heap, (at, task.seq, task))

    def _ensure_thread(self) -> None:
        if self.paused_by_fork:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def _next_due(self) -> Task | None:
        """Wait for the earliest due task and claim it; None once no tasks are left (the thread ends)."""
        cond = self._cond
        with cond:
            while True:
                if not self._tasks or self._thread is not threading.current_thread():
                    if self._thread is threading.current_thread():
                        self._thread = None
                    if not self._tasks:
                        self._heap.clear()
                    return None
                at, seq, task = self._heap[0] if self._heap else (float("inf"), 0, None)
                if task is not None and (task.cancelled or seq != task.seq):
                    heapq.heappop(self._heap)  # stale entry: cancelled, or moved by reschedule()
                    continue
                now = time.monotonic()
                if task is None or at > now:
                    cond.wait(min(60.0, at - now) if task is not None else 60.0)
                    continue
                heapq.heappop(self._heap)
                self._current = task
                return task

    def _run(self) -> None:
        while True:
            task = self._next_due()
            if task is None:
                return
            delay: float | None = None
            started = time.thread_time()
            try:
                result = task.fn()
                if isinstance(result, int | float) and not isinstance(result, bool):
                    delay = max(0.0, float(result))
                task.runs += 1
            except Exception:  # our periodic work must never take the host app down
                task.errors += 1
                self.errors += 1
                logger.debug("kotoba-memory: task %s failed", task.name, exc_info=True)
            task.cpu_s += time.thread_time() - started
            with self._cond:
                self._current = None
                if not task.cancelled and task in self._tasks:
                    now = time.monotonic()
                    self._push(task, _on_grid(now, task.interval_s) if delay is None else now + delay)
                self._cond.notify_all()


def _on_grid(now: float, interval_s: float) -> float:
    """About ``interval_s`` after ``now``, on a grid of ``min(interval_s, 1 s)`` steps: tasks with the same
    (or a multiple) interval then share wake-ups instead of drifting apart, and each wake-up takes the
    GIL from the app's threads once for all of them. The gap stays within half a step of the interval."""
    step = min(interval_s, _GRID_S)
    return math.ceil((now + interval_s - step / 2) / step) * step


scheduler = Scheduler()
