"""The report's cache list (every live cache, by name, with what uses it) and its figures for people."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import pytest

from kotoba_memory import report_format as fmt
from kotoba_memory.cache_manager import CacheManager, TieredCache
from kotoba_memory.cache_manager.disk import DiskCache
from kotoba_memory.cache_manager.inventory import MAX_USES, add_view, cache_inventory, cache_lookups, note_use
from kotoba_memory.config import MemoryConfig
from kotoba_memory.optimizer import MemoryOptimizer
from kotoba_memory.report import MemoryReport, MemoryStats


def rows_named(prefix: str) -> dict[str, dict[str, Any]]:
    rows, _ = cache_inventory(limit=10_000)
    return {row["name"]: row for row in rows if str(row["name"]).startswith(prefix)}


def test_every_live_cache_is_listed_with_its_stats_and_uses() -> None:
    busy = CacheManager(max_bytes=1 << 20, name="inv-busy")
    quiet = CacheManager(max_bytes=1 << 20, name="inv-quiet")
    note_use(busy, "@cached app.compute")
    note_use(busy, "@cached app.compute")  # the same use twice is listed once
    busy.put("k", b"v")
    for _ in range(3):
        busy.get("k")
    busy.get("missing")
    rows = rows_named("inv-")
    assert rows["inv-busy"]["hits"] == 3 and rows["inv-busy"]["misses"] == 1
    assert rows["inv-busy"]["hit_rate"] == pytest.approx(0.75)
    assert rows["inv-busy"]["uses"] == ["@cached app.compute"] and rows["inv-busy"]["type"] == "CacheManager"
    assert rows["inv-quiet"]["uses"] == [] and rows["inv-quiet"]["hits"] == 0
    ordered = [r["name"] for r in cache_inventory(limit=10_000)[0] if str(r["name"]).startswith("inv-")]
    assert ordered.index("inv-busy") < ordered.index("inv-quiet")  # busiest first
    del quiet


def test_caches_are_held_weakly_and_uses_are_bounded() -> None:
    cache = CacheManager(max_bytes=1 << 20, name="inv-weak")
    for i in range(MAX_USES + 5):
        note_use(cache, f"@cached f{i}")
    row = rows_named("inv-weak")["inv-weak"]
    assert len(row["uses"]) == MAX_USES and row["more_uses"] == 5
    del cache, row
    gc.collect()
    assert "inv-weak" not in rows_named("inv-weak")


def test_a_tiered_cache_is_one_row_with_its_tiers_as_parts(tmp_path: Path) -> None:
    memory = CacheManager(max_bytes=1 << 20, name="inv-tier-mem")
    disk = DiskCache(tmp_path / "c.db", 1 << 20, name="inv-tier-disk")
    tiered = TieredCache(memory, disk, name="inv-tiered")
    try:
        tiered.put("a", b"x")
        tiered.get("a")
        rows = rows_named("inv-tier")
        assert list(rows) == ["inv-tiered"]
        assert rows["inv-tiered"]["parts"] == ["inv-tier-mem", "inv-tier-disk"]
        assert rows["inv-tiered"]["hits"] == 1
    finally:
        tiered.close()


class Front:
    def __init__(self) -> None:
        self.hits, self.misses = 7, 3


def test_views_are_listed_under_their_store_and_dropped_with_their_front() -> None:
    store = CacheManager(max_bytes=1 << 20, name="inv-view-store")
    front = Front()
    add_view(front, store, "Query front", lambda f: {"name": "q1", "hits": f.hits, "misses": f.misses})
    [view] = rows_named("inv-view")["inv-view-store"]["views"]
    assert view == {"label": "Query front", "name": "q1", "hits": 7, "misses": 3}
    line = fmt.cache_line(rows_named("inv-view")["inv-view-store"])
    assert "Query front 'q1' (70.0% of 10 queries hit)" in line
    del front
    gc.collect()
    assert rows_named("inv-view")["inv-view-store"]["views"] == []


class Broken(CacheManager):
    def stats(self) -> Any:
        raise ConnectionError("redis is down")


def test_a_cache_whose_stats_fail_is_still_listed_with_the_error() -> None:
    cache = Broken(max_bytes=1 << 20, name="inv-broken")
    row = rows_named("inv-broken")["inv-broken"]
    assert row["error"] == "ConnectionError: redis is down"
    assert fmt.cache_line(row) == "inv-broken (Broken): stats unavailable (ConnectionError: redis is down)"
    before = cache_lookups()
    assert isinstance(before, tuple)  # the failing cache is skipped, not raised
    del cache


def test_the_list_is_bounded_and_says_how_many_were_left_out() -> None:
    caches = [CacheManager(max_bytes=1 << 16, name=f"inv-many-{i}") for i in range(5)]
    rows, left_out = cache_inventory(limit=2)
    assert len(rows) == 2 and left_out >= 3
    del caches


def fast(**kwargs: object) -> MemoryConfig:
    options: dict[str, object] = {"monitoring_interval_ms": 20, "enable_leak_detection": False}
    options.update(kwargs)
    return MemoryConfig(**options)  # type: ignore[arg-type]


def test_the_optimizer_builds_no_cache_until_one_is_used() -> None:
    app_cache = CacheManager(max_bytes=1 << 20, name="inv-app")
    note_use(app_cache, "Django CACHES 'default'")
    optimizer = MemoryOptimizer(fast(cache_size_mb=4))
    optimizer.start()
    try:
        deadline = time.monotonic() + 10
        i = 0
        while len(optimizer.report().cache_hit_rate_series) < 3 and time.monotonic() < deadline:
            i += 1
            app_cache.get(i % 4) or app_cache.put(i % 4, b"v")
            time.sleep(0.005)
        report = optimizer.report()
        assert report.cache is None and report.stats.cache_capacity_bytes is None
        assert report.stats.efficiency_basis == "rss/peak"
        names = [row["name"] for row in report.caches]
        assert "inv-app" in names and "kotoba-memory" not in names
        assert report.cache_hit_rate_series and all(0.0 <= r <= 1.0 for _, r in report.cache_hit_rate_series)
        assert optimizer.cache is not None and optimizer.cache.max_bytes == 4 << 20  # built on first use
        optimizer.cache.put("k", b"v")
        used = optimizer.report()
        assert used.cache is not None and used.stats.cache_capacity_bytes == 4 << 20
        [own] = [row for row in used.caches if row["name"] == "kotoba-memory"]
        assert own["uses"] == ["MemoryOptimizer (optimizer.cache)"]
    finally:
        optimizer.stop()
    assert MemoryOptimizer(fast(enable_caching=False)).cache is None


def stats(**kwargs: Any) -> MemoryStats:
    return MemoryStats(**{"current_memory_mb": 50.0, "peak_memory_mb": 60.0, "memory_efficiency": 1.347e-05,
                          "efficiency_basis": "managed", "rss_bytes": 50 << 20, "peak_rss_bytes": 60 << 20,
                          "cache_bytes": 1800, "cache_capacity_bytes": 128 << 20, **kwargs})


def sample_report(duration: float = 20.0, **kwargs: Any) -> MemoryReport:
    gc_data = {"total_collections": 12, "total_pause_s": 0.0423, "gc_time_share": 0.0021,
               "gc_cpu_share": 0.005812345, "performance_score": 0.9, "collections_per_minute": 36.3,
               "optimization_opportunities": [
                   {"description": "full collections pause up to 55.9 ms", "actions": ["gc.freeze()"]}]}
    leaks = [
        {"allocation_site": "app.py:3", "confidence": 0.6, "growth_rate_bytes_per_s": 9000.0, "size": 9000,
         "age_seconds": 10.0, "route": None},
        {"allocation_site": f"{__file__}:{LEAK_LINE}", "confidence": 0.93, "growth_rate_bytes_per_s": 2048.0,
         "size": 1 << 20, "age_seconds": 15.0, "route": "/leak"},
    ]
    caches = [{"name": "django:site", "type": "CacheManager", "hits": 637, "misses": 80,
               "hit_rate": 637 / 717, "entries": 120, "bytes": 300_000, "max_bytes": 64 << 20,
               "evictions": 0, "puts": 80,
               "uses": ["Django CACHES 'default'"], "views": [], "parts": []},
              {"name": "thrash", "type": "CacheManager", "hits": 10, "misses": 990, "hit_rate": 0.01,
               "entries": 10, "bytes": 1000, "max_bytes": 1000, "evictions": 900, "puts": 990,
               "uses": [], "views": [], "parts": []}]
    base: dict[str, Any] = {"gc": gc_data, "leaks": leaks, "caches": caches,
                            "profiler": {"windows": 4, "own_memory_bytes": 900_000}}
    base.update(kwargs)
    return MemoryReport(1000.0, 1000.0 + duration, {"cache_size_mb": 128}, stats(), **base)


LEAK_LINE = 1  # the confident suspect points at this file's first line: its source text is known


def test_the_text_puts_advice_and_confident_leaks_first_with_their_source_line() -> None:
    text = sample_report().summary()
    lines = text.splitlines()
    assert lines[1] == "  do first:"
    first = f"    - Likely leak at {__file__}:1 (route /leak): +2.0 KiB/s, confidence 0.93"
    assert lines[2].startswith(first)
    assert "`\"\"\"The report's cache list" in lines[2]  # the source line itself
    assert "GC: full collections pause up to 55.9 ms (gc.freeze())" in text
    assert "Cache thrash answers only 1.0% of lookups and evicted 900 entries" in text
    assert "app.py:3" not in lines[2] and text.index(f"{__file__}:1 [route /leak]") < text.index("app.py:3:")
    assert "django:site (CacheManager): 88.8% of 717 lookups hit, 120 entries, 293.0 KiB of 64.0 MiB; " \
        "used by Django CACHES 'default'" in text
    assert "(a short run: rates and shares below are extrapolated from it, not steady state)" in lines[0]
    assert "1.347e-05" not in text and "<0.1%" in text


def test_the_html_shows_figures_in_units_and_the_json_keeps_raw_numbers() -> None:
    rep = sample_report()
    page = rep.to_html()
    for raw in ("1.347e-05", "0.005812345", "0.0058", "0.0423", "637 / 717"):
        assert raw not in page
    assert "0.6% (over only 20 s: not steady state)" in page  # gc_cpu_share, marked as a short-run figure
    assert "42.3 ms" in page and "&lt;0.1%: the optimizer&#x27;s cache and pool hold" in page
    assert '<h2 id="recommendations">Do first</h2>' in page
    assert page.index("Likely leak at") < page.index("<h2>Leak suspects</h2>") < page.index("<h2>Caches</h2>")
    assert "Every cache alive in this process" in page  # each section says what it means
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    data = json.loads(rep.to_json())
    assert data["stats"]["memory_efficiency"] == 1.347e-05 and data["gc"]["gc_cpu_share"] == 0.005812345
    assert data["caches"][0]["hits"] == 637 and data["recommendations"][0].startswith("Likely leak at")


def test_a_long_run_keeps_figures_unmarked_but_a_forecast_says_it_is_extrapolated() -> None:
    temporal = {"samples": 600, "duration_s": 600.0, "growth_rate_bytes_per_s": 1000.0,
                "growth_rate_stderr": 100.0, "time_to_limit_s": 95_000.0}
    text = sample_report(600.0, temporal=temporal).summary()
    assert "short run" not in text and "over only" not in text
    assert "memory limit in 1.1 days at this rate" in text
    assert "extrapolated from 10.0 min of samples" in text


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0, "0%"), (1.347e-05, "<0.1%"), (0.005812, "0.6%"), (0.9996, "99.9%"), (1.0, "100%"), (None, "n/a")],
)
def test_percentages(value: float | None, text: str) -> None:
    assert fmt.percent_text(value) == text


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("gc_cpu_share", 0.0058123, "0.6%"),
        ("total_pause_s", 0.0423, "42.3 ms"),
        ("pause_p50_s", 3.2758e-05, "33 µs"),
        ("own_memory_bytes", 967_400, "944.7 KiB"),
        ("growth_rate_bytes_per_s", 1_367_739.5, "+1.3 MiB/s"),
        ("memory_usage_percent", 5.4468, "5.4%"),
        ("collections_per_minute", 83.82516965769575, "83.8"),
        ("hit_latency_ns", 1907, "2 µs"),
        ("windows", 12345, "12,345"),
        ("efficiency_objects_per_ms", 1.0109307375153886, "1.01"),
    ],
)
def test_raw_figures_are_written_in_their_units(key: str, value: float, text: str) -> None:
    assert fmt.human_value(key, value) == text


def test_bytes_and_durations() -> None:
    assert [fmt.bytes_text(v) for v in (512, 6650, 5 << 30, None)] == ["512 B", "6.5 KiB", "5.0 GiB", "n/a"]
    assert [fmt.duration_text(v) for v in (45, 210, 7200, 95_000)] == ["45 s", "3.5 min", "2.0 h", "1.1 days"]
    assert fmt.source_line("no-such-file.py:3") == "" and fmt.source_line("nonsense") == ""
