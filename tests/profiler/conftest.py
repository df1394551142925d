"""Fixtures shared by the profiler tests."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture
def small_heap() -> Iterator[None]:
    """Hide pytest's own heap from the collector's lists for one test, so each census walks only what
    the test allocates (``gc.get_objects()`` leaves frozen objects out), as a small worker's would."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
