"""The process layer at the bottom of the core: what every component asks about this process.

- :mod:`~kotoba_memory.process.memory`: RSS (and its peak), cgroup limit and usage, the glibc heap.
- :mod:`~kotoba_memory.process.forks`: the one ``os.register_at_fork``; components register callbacks.
- :mod:`~kotoba_memory.process.scheduler`: the one background thread for periodic work.
- :mod:`~kotoba_memory.process.registry`: which optimizer, GC optimizer and profiler are running.
- :mod:`~kotoba_memory.process.activity`: requests in flight.
- :mod:`~kotoba_memory.process.cpu`: what periodic work may cost, as a share of the process's CPU.

It imports no component: components import it.
"""

from __future__ import annotations

from kotoba_memory.process import activity, forks, memory, registry
from kotoba_memory.process.scheduler import Scheduler, Task, scheduler

__all__ = ["Scheduler", "Task", "activity", "forks", "memory", "registry", "scheduler"]

