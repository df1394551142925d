"""A ledger of decimal amounts and timestamps that only grows: values with nothing to fingerprint."""

import datetime
import threading
from decimal import Decimal

from benchmarks.leak_workloads._common import serve

LEAKS = True
DESCRIPTION = "module-level lists of Decimal amounts and datetimes, appended per request, never trimmed"

_amounts: list[Decimal] = []
_stamps: list[datetime.datetime] = []
_EPOCH = datetime.datetime(2026, 1, 1)


def handle(i: int) -> None:
    _amounts.append(Decimal(i % 100_000) / 100)  # LEAK-SITE
    _stamps.append(_EPOCH + datetime.timedelta(seconds=i))  # LEAK-SITE


def run(stop: threading.Event) -> None:
    serve(stop, handle)
