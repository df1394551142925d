"""What the fleet publisher asks for every few seconds: no per-route or per-sample work it does not use."""

from __future__ import annotations

import dataclasses
import math

import pytest

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
