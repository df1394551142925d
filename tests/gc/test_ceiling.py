"""The memory ceiling's readings: spaced by the headroom under the target, early when this process grows."""

from __future__ import annotations

import pytest

from kotoba_memory.gc_optimizer import MemoryCeiling, MemoryUsage

LIMIT = 1000 * 1024 * 1024


class FakeUse:
    """Stands in for the machine's reading: a settable percentage of LIMIT, and how often it was read."""

    def __init__(self, percent: float) -> None:
        self.percent = percent
        self.reads = 0

    def __call__(self) -> MemoryUsage:
        self.reads += 1
        return MemoryUsage(int(self.percent / 100 * LIMIT), LIMIT, "system")


@pytest.fixture
def ceiling(monkeypatch: pytest.MonkeyPatch) -> tuple[MemoryCeiling, FakeUse]:
    found = MemoryCeiling(75.0)
    use = FakeUse(20.0)
    monkeypatch.setattr(found, "usage", use)
    return found, use


def test_far_under_the_target_readings_wait_for_the_headroom(ceiling) -> None:
    found, use = ceiling
    first = found.due_usage(100.0, 50 << 20, 1.0)
    assert first is not None and first.percent == pytest.approx(20.0) and use.reads == 1
    # 55 points of headroom: 11 intervals by the rule, capped at 10.
    for now in (101.0, 105.0, 109.9):
        assert found.due_usage(now, 50 << 20, 1.0) is None
    assert use.reads == 1
    assert found.due_usage(110.0, 50 << 20, 1.0) is not None and use.reads == 2


def test_the_gap_shrinks_with_the_headroom(ceiling) -> None:
    found, use = ceiling
    use.percent = 60.0  # 15 points: three intervals
    found.due_usage(0.0, 50 << 20, 2.0)
    assert found.due_usage(5.9, 50 << 20, 2.0) is None
    assert found.due_usage(6.0, 50 << 20, 2.0) is not None
    use.percent = 71.0  # within 5 points of the target: every interval
    assert found.due_usage(7.0, 50 << 20, 2.0) is None  # the reading at 6.0 (60%) stands until 12.0
    assert found.due_usage(12.0, 50 << 20, 2.0) is not None
    reads = use.reads
    for now in (12.01, 12.02, 12.03):
        assert found.due_usage(now, 50 << 20, 2.0) is not None
    assert use.reads == reads + 3
    use.percent = 90.0  # over the target: every interval
    assert found.due_usage(13.0, 50 << 20, 2.0) is not None
    assert found.due_usage(13.01, 50 << 20, 2.0) is not None


def test_own_growth_of_half_the_headroom_reads_early(ceiling) -> None:
    found, use = ceiling
    rss = 50 << 20
    found.due_usage(0.0, rss, 1.0)
    half = int(0.5 * 0.55 * LIMIT)  # half of 55 points of headroom, in bytes
    assert found.due_usage(1.0, rss + half - 4096, 1.0) is None
    assert found.due_usage(1.0, rss + half, 1.0) is not None
    assert use.reads == 2


def test_an_explicit_limit_is_judged_by_the_rss_given(monkeypatch: pytest.MonkeyPatch) -> None:
    found = MemoryCeiling(75.0, limit_bytes=LIMIT)

    def unread() -> MemoryUsage:
        raise AssertionError("an explicit limit needs no file read")

    monkeypatch.setattr(found, "usage", unread)
    for now in (0.0, 0.1, 0.2):
        usage = found.due_usage(now, LIMIT // 4, 1.0)
        assert usage == MemoryUsage(LIMIT // 4, LIMIT, "explicit")


def test_the_optimizer_still_meets_a_ceiling_that_arrives_between_readings(
    make_optimizer, wait_for, monkeypatch
) -> None:
    optimizer = make_optimizer(warmup_requests=1, monitoring_interval_s=0.05)
    use = FakeUse(20.0)
    monkeypatch.setattr(optimizer._ceiling, "usage", use)
    optimizer.start()
    assert wait_for(lambda: use.reads >= 1)
    use.percent = 95.0  # another process took the machine's memory: our RSS did not move
    assert wait_for(lambda: optimizer._pressure, timeout=5.0)
    assert any(c.action == "pressure_start" for c in optimizer.changes)
    # Spaced by the headroom: the pressure was seen after at most 10 intervals, on a few readings.
    assert use.reads <= 4
