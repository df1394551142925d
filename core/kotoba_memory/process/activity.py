"""Requests in flight in this process: the one count every component reads.

The middleware calls :func:`begin` and :func:`end` around each request (a GC optimizer used by hand
marks them through ``on_request_start``/``on_request_end``, which land here too). The GC optimizer
reads :func:`in_flight` to tell idle time; the request recorder learns from :func:`end` whether
another request ran alongside (process-wide readings are then not the request's own). Lock-free:
list ``append``/``pop`` and ``next()`` on a counter are atomic under the GIL.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

from kotoba_memory.process import forks

__all__ = ["begin", "end", "in_flight", "mark_end", "mark_start", "shared_state"]

_flight: list[None] = []
_events = itertools.count(1)

#: Count one request in, with no overlap bookkeeping (a C-level call: no Python frame).
mark_start = functools.partial(_flight.append, None)


def mark_end() -> None:
    """Count one request out (unbalanced calls are ignored)."""
    try:
        _flight.pop()
    except IndexError:
        pass


def begin() -> tuple[bool, int]:
    """Count a request in; returns ``(alone, epoch)`` to hand back to :func:`end`."""
    _flight.append(None)
    return len(_flight) == 1, next(_events)


def end(alone: bool, epoch: int) -> bool:
    """Count a request out; True if another request began or ended while it ran."""
    try:  # mark_end, inlined: this runs once per request
        _flight.pop()
    except IndexError:
        pass
    return not alone or next(_events) != epoch + 1


def in_flight() -> int:
    """Requests begun and not yet ended."""
    return len(_flight)


def shared_state() -> tuple[list[None], Iterator[int]]:
    """The in-flight list and the event counter themselves, for the C request recorder: it appends,
    pops and ticks them exactly as :func:`begin` and :func:`end` do, so there is still one count."""
    return _flight, _events


def _reinit_after_fork() -> None:
    # A worker forked while the parent served requests serves none of them: start from zero.
    _flight.clear()


forks.register(_reinit_after_fork, name="process.activity")
