"""Requests in flight in this process: the one count every component reads.

The middleware calls :func:`begin` and :func:`end` around each request (a GC optimizer used by hand
marks them through ``on_request_start``/``on_request_end``, which land here too). The GC optimizer
reads :func:`in_flight` to tell idle time; the request recorder learns from :func:`end` whether
another request ran alongside (process-wide readings are then not the request's own). Lock-free: in C,
two counters changed under the GIL; in pure Python, list ``append``/``pop`` and ``next()`` on a
counter, which are atomic under the GIL.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

from kotoba_memory import _native
from kotoba_memory.process import forks

__all__ = ["begin", "end", "in_flight", "mark_end", "mark_start"]

_flight: list[None] = []
_events = itertools.count(1)


def py_mark_end() -> None:
    """Count one request out (unbalanced calls are ignored)."""
    try:
        _flight.pop()
    except IndexError:
        pass


def py_begin() -> tuple[bool, int]:
    """Count a request in; returns ``(alone, epoch)`` to hand back to :func:`end`."""
    _flight.append(None)
    return len(_flight) == 1, next(_events)


def py_end(alone: bool, epoch: int) -> bool:
    """Count a request out; True if another request began or ended while it ran."""
    try:  # mark_end, inlined: this runs once per request
        _flight.pop()
    except IndexError:
        pass
    return not alone or next(_events) != epoch + 1


def py_in_flight() -> int:
    """Requests begun and not yet ended."""
    return len(_flight)


def _py_reinit_after_fork() -> None:
    # A worker forked while the parent served requests serves none of them: start from zero.
    _flight.clear()


# With the C extension built, the count lives there (the C request recorder counts without a call);
# the functions above are the reference it follows and what runs in pure Python.
_c = _native.load("_crecord")
mark_start: Callable[[], object]
mark_end: Callable[[], object]
begin: Callable[[], tuple[bool, int]]
end: Callable[[bool, int], bool]
in_flight: Callable[[], int]
if _c is not None:
    #: Count one request in, with no overlap bookkeeping (a C-level call: no Python frame).
    mark_start, mark_end, begin, end, in_flight = (
        _c.mark_start, _c.mark_end, _c.activity_begin, _c.activity_end, _c.in_flight
    )
    _reinit_after_fork = _c.after_fork
else:
    mark_start = functools.partial(_flight.append, None)
    mark_end, begin, end, in_flight = py_mark_end, py_begin, py_end, py_in_flight
    _reinit_after_fork = _py_reinit_after_fork


forks.register(_reinit_after_fork, name="process.activity")
