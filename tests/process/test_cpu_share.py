"""Periodic work is spaced by a share of the process's own CPU, not of wall time."""

from __future__ import annotations

import time

import pytest

from kotoba_memory.process.cpu import IDLE_CPU_RATE, CpuShare


def spin(seconds: float) -> None:
    started = time.process_time()
    while time.process_time() - started < seconds:
        pass


def test_an_idle_process_is_charged_at_the_idle_rate() -> None:
    share = CpuShare(0.001, min_gap_s=0.0, max_gap_s=1e9)
    share.next_gap(0.0)  # the first call has no rate yet: idle
    time.sleep(0.2)  # no CPU spent between the two calls
    gap = share.next_gap(0.001)
    assert gap == pytest.approx(0.001 / (0.001 * IDLE_CPU_RATE), rel=0.2)  # ~20 s


def test_a_busy_process_runs_the_same_job_more_often() -> None:
    share = CpuShare(0.001, min_gap_s=0.0, max_gap_s=1e9)
    share.next_gap(0.0)
    spin(0.2)  # one core busy between the two calls
    busy_gap = share.next_gap(0.001)
    idle_gap = 0.001 / (0.001 * IDLE_CPU_RATE)  # 20 s
    assert busy_gap < idle_gap / 2  # a rate of more than 0.1 core (~1 s on an idle machine)
    assert share.cpu_rate() == pytest.approx(0.001 / (0.001 * busy_gap))  # too short a span: the last rate


def test_the_gap_stays_within_its_bounds() -> None:
    share = CpuShare(0.01, min_gap_s=5.0, max_gap_s=60.0)
    assert share.next_gap(0.0) == 5.0
    assert share.next_gap(10.0) == 60.0
    assert share.next_gap(-1.0) == 5.0  # a clock that stepped back costs nothing


def test_a_cpu_clock_that_restarts_reads_as_idle() -> None:
    share = CpuShare(0.001, min_gap_s=0.0, max_gap_s=1e9)
    share._last = (time.monotonic() - 1.0, time.process_time() + 100.0)  # the parent's clock, before fork()
    assert share.next_gap(0.001) == pytest.approx(0.001 / (0.001 * IDLE_CPU_RATE))


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_a_share_outside_0_to_1_is_refused_by_name(bad: float) -> None:
    with pytest.raises(ValueError, match="share"):
        CpuShare(bad, min_gap_s=0.0, max_gap_s=1.0)
