"""Recent decimal amounts and timestamps in bounded rings: at capacity each new value replaces the oldest."""

import collections
import datetime
import threading
from decimal import Decimal

from benchmarks.leak_workloads._common import serve

LEAKS = False
DESCRIPTION = "bounded deques (maxlen=2000) of Decimal amounts and datetimes, churning at capacity"

_amounts: collections.deque[Decimal] = collections.deque(maxlen=2000)
_stamps: collections.deque[datetime.datetime] = collections.deque(maxlen=2000)
_EPOCH = datetime.datetime(2026, 1, 1)


def handle(i: int) -> None:
    _amounts.append(Decimal(i % 100_000) / 100)
    _stamps.append(_EPOCH + datetime.timedelta(seconds=i))


def run(stop: threading.Event) -> None:
    serve(stop, handle)
