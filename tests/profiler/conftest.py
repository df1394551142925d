"""Fixtures shared by the profiler tests."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator

import pytest

# --import-mode=importlib leaves test directories off sys.path; detector_windows.py is shared by two modules
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


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
