"""What the fleet publisher asks for every few seconds: no per-route or per-sample work it does not use."""

from __future__ import annotations

import dataclasses
import math

import pytest
from detector_windows import APP, feed

from kotoba_memory.memory_profiler import MemoryProfiler
from kotoba_memory.memory_profiler import profiler as profiler_module
from kotoba_memory.memory_profiler._models import RouteStats
from kotoba_memory.report import to_plain


@pytest.mark.parametrize("route", [
    RouteStats("/a/<id>", 12, 4096, -100, 3, 0.25, None),
    RouteStats("/b", 0, 0, 0, 0, math.inf, 7),
    RouteStats("<other>", 2**40, -(2**33), 5, 1, math.nan, 0),
])
def test_a_routes_own_dict_is_what_the_generic_conversion_made(route: RouteStats) -> None:
    generic = {}
    for f in dataclasses.fields(route):
        value = getattr(route, f.name)
        generic[f.name] = None if isinstance(value, float) and not math.isfinite(value) else value
    assert route.to_dict() == generic == to_plain(route)


def test_a_verdict_without_suspects_reads_no_route_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    profiler = MemoryProfiler(sample_interval_s=1.0, leak_detection=True, max_routes=300)
    for i in range(257):
        profiler.record_request(f"/r{i}", rss_delta=4096, traced_delta=None, duration_s=0.01)
    for _ in range(5):
        profiler._sample()
    calls: list[int] = []
    made = profiler_module._route_stats

    def counted(table: object) -> list[RouteStats]:
        calls.append(1)
        return made(table)

    monkeypatch.setattr(profiler_module, "_route_stats", counted)
    leaks, _status = profiler.leak_verdict()
    assert leaks == [] and calls == []
    assert len(profiler.routes()) == 257 and calls == [1]  # the table is there to be read


def test_a_verdict_is_reused_until_a_window_a_census_a_check_or_its_age_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    profiler = MemoryProfiler(sample_interval_s=1.0, leak_detection=True)
    detector = profiler._detector
    feed(detector, 6, lambda w, j: 1000 * j, key=APP)
    for _ in range(5):
        profiler._sample()
    judged: list[int] = []
    suspects = profiler._suspects

    def counted(*args: object, **kwargs: object) -> object:
        judged.append(1)
        return suspects(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(profiler, "_suspects", counted)
    first, status = profiler.leak_verdict()
    assert [leak.allocation_site for leak in first] == ["/srv/app/cache.py:42"] and len(judged) == 1
    again, status_again = profiler.leak_verdict()
    assert again == first and again is not first and len(judged) == 1  # nothing new: reused
    assert status_again.windows == status.windows == 6
    feed(detector, 1, lambda w, j: 1000 * j, key=APP)  # a window
    assert profiler.leak_verdict()[1].windows == 7 and len(judged) == 2
    detector.survival.check(0.0)  # a survival check
    profiler.leak_verdict()
    assert len(judged) == 3
    detector.survival.add([], [APP], 0.0)  # a census (that found none of its objects: a miss)
    profiler.leak_verdict()
    assert len(judged) == 4
    profiler.leak_verdict()
    assert len(judged) == 4
    clock = profiler_module.time.monotonic() + profiler_module.VERDICT_REUSE_S
    monkeypatch.setattr(profiler_module.time, "monotonic", lambda: clock)  # old enough
    profiler.leak_verdict()
    assert len(judged) == 5
