"""RSS sampling under a budget: the mean gap between measured requests widens while the reads' measured
cost exceeds ``rss_sample_budget`` of request time, on both recorders (C and the pure-Python reference)."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest

from kotoba_memory.errors import ConfigError
from kotoba_memory_integrations import request as _request
from kotoba_memory_integrations.request import (
    DEFAULT_RSS_SAMPLE_BUDGET,
    DEFAULT_RSS_SAMPLE_EVERY,
    PyRequestRecorder,
    RequestRecorder,
)

C_BUILT = _request.CRequestRecorder is not None
IMPLEMENTATIONS: list[Any] = [PyRequestRecorder] + ([_request.CRequestRecorder] if C_BUILT else [])
impl = pytest.mark.parametrize("recorder_cls", IMPLEMENTATIONS, ids=lambda c: c.__name__[:2])


def _quiet(recorder_cls: Any, **kwargs: Any) -> Any:
    return recorder_cls(gc_optimizer=lambda: None, profiler=lambda: None, **kwargs)


class SlowRss:
    """An RSS reader whose every read takes ``seconds`` (a busy wait: sleep() may round up a lot)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.reads = 0

    def _wait(self) -> int:
        self.reads += 1
        until = time.perf_counter() + self.seconds
        while time.perf_counter() < until:
            pass
        return 100 << 20

    def rss(self) -> int:
        return self._wait()

    def recent(self, max_age_s: float) -> int:
        return self._wait()


@impl
def test_the_defaults_start_at_one_in_every_and_keep_a_budget(recorder_cls: Any) -> None:
    recorder = _quiet(recorder_cls)
    assert recorder.every == DEFAULT_RSS_SAMPLE_EVERY == 8
    assert recorder.rss_sample_budget == DEFAULT_RSS_SAMPLE_BUDGET == 0.0002
    assert recorder.mean_gap == pytest.approx(8.0)


@impl
def test_the_gap_is_where_reads_cost_the_budget_never_below_every(recorder_cls: Any) -> None:
    recorder = _quiet(recorder_cls, rss_sample_every=4, rss_sample_budget=0.01)
    recorder._note_rss_cost(20e-6, 500e-6)  # reads cost 4% of the request, the budget 1%: one in 4
    assert recorder.mean_gap == pytest.approx(4.0)
    recorder = _quiet(recorder_cls, rss_sample_every=4, rss_sample_budget=0.001)
    recorder._note_rss_cost(20e-6, 500e-6)  # 4% against 0.1%: one in 40
    assert recorder.mean_gap == pytest.approx(40.0)
    recorder._note_rss_cost(20e-6, 500e-6)
    assert recorder.mean_gap == pytest.approx(40.0)  # the same figures: the same gap
    recorder = _quiet(recorder_cls, rss_sample_every=4, rss_sample_budget=0.001)
    recorder._note_rss_cost(10e-6, 100e-3)  # a slow request: the budget allows more than every asks
    assert recorder.mean_gap == pytest.approx(4.0)


@impl
def test_the_gap_follows_running_means_and_stays_within_bounds(recorder_cls: Any) -> None:
    recorder = _quiet(recorder_cls, rss_sample_budget=0.001)
    recorder._note_rss_cost(20e-6, 1e-3)
    recorder._note_rss_cost(20e-6, 2e-3)  # a plain mean while the means start
    assert recorder.mean_gap == pytest.approx(20e-6 / (0.001 * 1.5e-3))
    # A read that took 5 ms (the thread descheduled mid-read) counts as four times the mean at most.
    recorder._note_rss_cost(5e-3, 1.5e-3)
    assert recorder.mean_gap == pytest.approx((20e-6 + 60e-6 / 3) / (0.001 * 1.5e-3))
    steady = _quiet(recorder_cls, rss_sample_budget=0.001)
    for _ in range(40):
        steady._note_rss_cost(20e-6, 1e-3)
    steady._note_rss_cost(40e-6, 1e-3)  # past the first 16, each new one weighs 1/16
    assert steady._rss_samples == 16
    assert steady.mean_gap == pytest.approx((20e-6 + 20e-6 / 16) / (0.001 * 1e-3))
    capped = _quiet(recorder_cls, rss_sample_budget=0.001)
    capped._note_rss_cost(1.0, 0.0)  # a clock that did not move: the widest gap, no division by zero
    assert capped.mean_gap == pytest.approx(1_000_000, rel=1e-6)
    huge = _quiet(recorder_cls, rss_sample_budget=1e-6)
    huge._note_rss_cost(1.0, 1e-6)
    assert huge.mean_gap == pytest.approx(1_000_000, rel=1e-6)
    assert huge.next_gap() >= 1


@pytest.mark.skipif(not C_BUILT, reason="pure Python in use: nothing to compare against")
def test_c_and_the_reference_set_the_same_gaps_from_the_same_figures() -> None:
    rng = random.Random(7)
    figures = [(rng.uniform(0, 50e-6), rng.choice([0.0, rng.uniform(1e-6, 5e-3)])) for _ in range(300)]
    both = [_quiet(cls, rss_sample_every=every, rss_sample_budget=budget)
            for every in (2, 8, 1000) for budget in (1e-4, 0.001, 0.5) for cls in IMPLEMENTATIONS]
    for cost, duration in figures:
        for recorder in both:
            recorder._note_rss_cost(cost, duration)
        for py, c in zip(both[0::2], both[1::2], strict=True):
            assert math.isclose(c._log_q, py._log_q, rel_tol=1e-12)
            assert (c._rss_cost_s, c._rss_duration_s) == pytest.approx((py._rss_cost_s, py._rss_duration_s))
            assert c._rss_samples == py._rss_samples


@impl
def test_slow_reads_of_quick_requests_widen_the_gap(recorder_cls: Any) -> None:
    reader = SlowRss(0.0005)  # 1 ms of reads per measured request of a few microseconds
    recorder = _quiet(recorder_cls, rss_reader=reader, rss_sample_every=2)
    measured = 0
    for _ in range(3000):
        metrics = recorder.begin().finish()
        measured += metrics.sampled
    assert recorder.mean_gap >= 1000  # 1 ms against 0.1% of a few microseconds: the widest gaps
    assert measured < 100  # at one in 2 throughout it would be ~1500
    assert reader.reads == 2 * measured


@impl
def test_cheap_reads_of_slow_requests_keep_one_in_every(recorder_cls: Any) -> None:
    # The real reader: microseconds a read (tens after a sleep, with cold caches), 1 ms allowed.
    recorder = _quiet(recorder_cls, rss_sample_every=2, rss_sample_budget=0.05)
    measured = 0
    for _ in range(60):
        m = recorder.begin()
        time.sleep(0.02)
        measured += m.finish().sampled
    assert recorder.mean_gap == pytest.approx(2.0)
    assert measured >= 10  # ~30 expected at one in 2


@impl
def test_without_a_budget_or_at_every_request_the_gap_never_moves(recorder_cls: Any) -> None:
    reader = SlowRss(0.0002)
    fixed = _quiet(recorder_cls, rss_reader=reader, rss_sample_every=4, rss_sample_budget=None)
    every = _quiet(recorder_cls, rss_reader=reader, rss_sample_every=1)
    assert fixed.rss_sample_budget is None and every.rss_sample_budget is None
    measured = sum(fixed.begin().finish().sampled for _ in range(400))
    assert fixed.mean_gap == pytest.approx(4.0) and 50 <= measured <= 160
    assert all(every.begin().finish().sampled for _ in range(50))


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan, math.inf, "0.001", True])
def test_rss_sample_budget_is_validated(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="rss_sample_budget") as info:
        RequestRecorder(rss_sample_budget=bad)
    assert isinstance(info.value, ConfigError)
