"""What the fleet publisher asks for every few seconds: no per-route or per-sample work it does not use."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

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


def test_a_suspect_with_no_contrast_between_windows_gets_its_route_from_the_lazy_table() -> None:
    # The leak grows in every window and both routes run in all of them: no fit over the windows names
    # a route, so the route whose requests leave the most memory behind is read from the route table.
    from kotoba_memory.memory_profiler._leaks import Growth

    profiler = MemoryProfiler(sample_interval_s=1.0, leak_detection=True)
    for _ in range(40):
        profiler.record_request("/small", rss_delta=100, traced_delta=None, duration_s=0.01)
        profiler.record_request("/big", rss_delta=400_000, traced_delta=None, duration_s=0.01)
    key = (("/srv/app/store.py", 12), ("/srv/app/views.py", 30))
    t = 1000.0
    for w in range(8):
        shots = [(t + j * 0.1, {key: (w * 6000 + j * 1000, w * 60 + j * 10)}) for j in range(6)]
        profiler._detector.add_window(shots, {"/small": 5, "/big": 5})
        t += 10.0

    class Growing:
        def since(self, start: float) -> Growth:
            return Growth(
                bytes_per_s=5e5, bytes_stderr=1e4, blocks_per_s=1e4, blocks_stderr=10.0, span_s=100.0
            )

    growth: Any = Growing()
    lazy = profiler_module._LazyRoutes(profiler._routes)
    [from_verdict] = profiler._suspects(profiler._detector, growth, lazy)
    [from_list] = profiler._suspects(profiler._detector, growth, profiler.routes())
    assert from_verdict.route == from_list.route == "/big"
