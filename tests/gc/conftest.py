"""Fixtures for the GC optimizer tests: every optimizer is stopped and gc state checked afterwards."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kotoba_memory.gc_optimizer import GcOptimizer


@pytest.fixture
def make_optimizer() -> Iterator[Callable[..., GcOptimizer]]:
    found = (gc.get_threshold(), gc.isenabled(), gc.get_freeze_count())
    created: list[GcOptimizer] = []

    def factory(**kwargs: Any) -> GcOptimizer:
        kwargs.setdefault("monitoring_interval_s", 0.05)
        optimizer = GcOptimizer(**kwargs)
        created.append(optimizer)
        return optimizer

    try:
        yield factory
    finally:
        for optimizer in created:
            optimizer.stop()
        after = (gc.get_threshold(), gc.isenabled(), gc.get_freeze_count())
        # Put things back even if the optimizer failed to, so one failure cannot poison other tests.
        gc.set_threshold(*found[0])
        (gc.enable if found[1] else gc.disable)()
        if found[2] == 0:
            gc.unfreeze()
        elif after[2] != found[2]:
            gc.unfreeze()
            gc.collect()  # 3.12+: the collector puts its immortal objects back in the permanent generation
        assert after == found, (
            "GcOptimizer.stop() did not restore the collector: "
            + "; ".join(f"{c.action} {c.before!r}->{c.after!r} {c.reason}" for o in created
                        for c in o.changes)
        )


@pytest.fixture
def wait_for() -> Callable[..., bool]:
    """Poll ``predicate`` every 10 ms until true or ``timeout`` seconds pass; returns its last value."""
    import time

    def wait(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return bool(predicate())
            time.sleep(0.01)

    return wait
