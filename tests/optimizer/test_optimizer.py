"""MemoryOptimizer end to end: the Quick Start, stats, the report in text, data and HTML."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kotoba_memory.cache_manager.inventory import cache_inventory
from kotoba_memory.config import MemoryConfig
from kotoba_memory.optimizer import MemoryOptimizer, OptimizerError, get_active_optimizer
from kotoba_memory.report import MemoryReport, MemoryStats

HOLD: list[bytearray] = []


def fast_config(**kwargs: object) -> MemoryConfig:
    options: dict[str, object] = {
        "monitoring_interval_ms": 20,
        "leak_window_s": 0.2,
        "leak_window_interval_s": 0.25,
        "leak_trace_budget": None,
        "enable_pooling": False,
        "cache_size_mb": 8,
    }
    options.update(kwargs)
    return MemoryConfig(**options)  # type: ignore[arg-type]


class ChartReader(HTMLParser):
    """Collects the figures (charts) and table headings of the report page."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, list[list[float]]] = {}
        self.headings: list[str] = []
        self.svgs = 0
        self.scripts = 0
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "figure":
            self.figures[str(values["id"])] = json.loads(values["data-points"] or "[]")
        elif tag == "svg":
            self.svgs += 1
        elif tag == "script":
            self.scripts += 1
        self._in_h2 = tag == "h2"

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def test_quick_start_runs_and_reports(tmp_path: Path) -> None:
    config = fast_config(enable_caching=True, report_dir=tmp_path)
    optimizer = MemoryOptimizer(config)
    optimizer.start()
    try:
        assert get_active_optimizer() is optimizer
        deadline = time.monotonic() + 15
        i = 0
        profiler = optimizer.profiler
        assert profiler is not None
        while profiler.stats().windows < 5 and time.monotonic() < deadline:
            i += 1
            HOLD.append(bytearray(3000))  # leaks on purpose
            if optimizer.cache is not None:
                optimizer.cache.put(i % 20, b"v" * 100)
                optimizer.cache.get((i * 7) % 30)
            time.sleep(0.002)
        stats = optimizer.memory_stats()
    finally:
        report = optimizer.stop()
        HOLD.clear()
    assert get_active_optimizer() is None
    assert isinstance(stats, MemoryStats)
    assert stats.current_memory_mb > 0 and stats.peak_memory_mb >= stats.current_memory_mb * 0.5
    assert 0.0 <= stats.memory_efficiency <= 1.0
    assert isinstance(report, MemoryReport)
    text = report.summary()
    assert "memory: current" in text and "leak suspects" in text
    expected_site = f"test_optimizer.py:{_line('leaks on purpose')}"
    assert report.leaks and report.leaks[0]["allocation_site"].endswith(expected_site)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["config"]["monitoring_interval_ms"] == 20
    assert len(data["memory_series"]) >= 5
    # report_dir got both files
    assert (tmp_path / "report.html").exists() and json.loads((tmp_path / "report.json").read_text())
    reader = ChartReader()
    reader.feed(report.to_html())
    assert reader.scripts == 0
    assert {"memory", "gc-pauses", "cache-hit-rate"} <= set(reader.figures)
    assert len(reader.figures["memory"]) == len(report.memory_series)
    assert reader.figures["memory"][0][1] == pytest.approx(report.memory_series[0][1], rel=1e-3)
    assert "Leak suspects" in reader.headings
    if optimizer.cache is not None:
        assert reader.figures["cache-hit-rate"], "cache hit rate sampled while running"
        assert report.cache is not None and report.cache["hits"] > 0
        # Other optimizers' caches (same name) may be alive in this process: find this one by its counters.
        rows, _ = cache_inventory(limit=10_000)
        assert any(
            row["name"] == "kotoba-memory" and row["hits"] == report.cache["hits"]
            and row["uses"] == ["MemoryOptimizer (optimizer.cache)"]
            for row in rows
        )
        assert report.caches and all("uses" in row and "hits" in row for row in report.caches)
    if optimizer.gc_optimizer is not None:
        assert report.gc is not None


def _line(marker: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if marker in text and "_line(" not in text)


def test_everything_off_still_reports() -> None:
    config = MemoryConfig(
        enable_caching=False, enable_gc_optimization=False, enable_profiling=False, enable_pooling=False
    )
    with MemoryOptimizer(config) as optimizer:
        stats = optimizer.memory_stats()
        assert optimizer.cache is None and optimizer.profiler is None and optimizer.gc_optimizer is None
    assert stats.efficiency_basis == "rss/peak"
    assert 0 < stats.memory_efficiency <= 1.0
    assert not optimizer.running


def test_pool_and_cache_efficiency_is_used_over_reserved() -> None:
    pytest.importorskip("kotoba_memory.memory_pool")
    pytest.importorskip("kotoba_memory.cache_manager")
    config = MemoryConfig(
        enable_pooling=True, pool_size_mb=1, enable_caching=True, cache_size_mb=1,
        enable_profiling=False, enable_gc_optimization=False,
    )
    optimizer = MemoryOptimizer(config)
    optimizer.start()
    try:
        assert optimizer.pool is not None and optimizer.cache is not None
        block = optimizer.pool.allocate(64 * 1024)
        optimizer.cache.put("k", b"x" * 10_000)
        stats = optimizer.memory_stats()
        pool_used, cache_used = stats.pool_used_bytes or 0, stats.cache_bytes or 0
        assert pool_used >= 64 * 1024 and cache_used >= 10_000
        reserved = (stats.pool_capacity_bytes or 0) + (stats.cache_capacity_bytes or 0)
        assert stats.efficiency_basis == "managed"
        assert stats.memory_efficiency == pytest.approx((pool_used + cache_used) / reserved)
        block.release()
    finally:
        optimizer.stop()


def test_stop_twice_and_report_when_stopped_raise() -> None:
    optimizer = MemoryOptimizer(fast_config(enable_gc_optimization=False, enable_caching=False))
    with pytest.raises(OptimizerError):
        optimizer.stop()
    optimizer.start()
    optimizer.start()  # idempotent
    snapshot = optimizer.report()
    assert snapshot.duration_s >= 0
    optimizer.stop()
    with pytest.raises(OptimizerError):
        optimizer.report()
    with pytest.raises(TypeError):
        MemoryOptimizer({"cache_size_mb": 1})  # type: ignore[arg-type]


def test_async_twins() -> None:
    optimizer = MemoryOptimizer(fast_config(enable_gc_optimization=False))

    async def scenario() -> MemoryReport:
        await optimizer.astart()
        stats = await optimizer.amemory_stats()
        assert stats.rss_bytes > 0
        snapshot = await optimizer.areport()
        assert snapshot.stats.rss_bytes > 0
        return await optimizer.astop()

    report = asyncio.run(scenario())
    assert report.finished_at >= report.started_at


def test_requested_allocator_is_reported_against_the_running_one() -> None:
    config = fast_config(
        enable_custom_allocators=True, allocator_type="mimalloc", enable_gc_optimization=False
    )
    with MemoryOptimizer(config) as optimizer:
        info = dict(optimizer.allocator)
    assert info["requested"] == "mimalloc"
    assert info["active"] in {"system", "jemalloc", "mimalloc"}
    if info["active"] != "mimalloc":
        assert "kotoba-memory run" in info["note"]


def test_preloaded_jemalloc_is_detected_and_satisfies_the_request() -> None:
    import glob
    import os
    import subprocess
    import sys

    libs = glob.glob("/usr/lib/*/libjemalloc.so.2")
    if not libs:
        pytest.skip("libjemalloc2 is not installed")
    code = (
        "from kotoba_memory.config import MemoryConfig\n"
        "from kotoba_memory.optimizer import MemoryOptimizer\n"
        "cfg = MemoryConfig(enable_custom_allocators=True, allocator_type='jemalloc',"
        " enable_caching=False, enable_gc_optimization=False, monitoring_interval_ms=20,"
        " leak_window_s=0.1, leak_window_interval_s=0.2, leak_trace_budget=None)\n"
        "with MemoryOptimizer(cfg) as opt:\n"
        "    import time; time.sleep(0.5)\n"
        "    print(opt.allocator['active'], 'note' in opt.allocator, opt.profiler.samples()[-1].heap_bytes)\n"
    )
    env = dict(os.environ, LD_PRELOAD=libs[0])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    active, has_note, heap = out.stdout.split()
    assert active == "jemalloc" and has_note == "False"
    assert heap == "None"  # glibc's mallinfo2 knows nothing of jemalloc's heap: RSS is used instead


def test_report_dir_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    """Issue 11, item 8: a link planted at report.html is replaced, not followed; reports are 0600."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    report_dir = tmp_path / "shared"
    report_dir.mkdir()
    (report_dir / "report.html").symlink_to(victim)
    (report_dir / "report.json").symlink_to(tmp_path / "dangling")
    optimizer = MemoryOptimizer(fast_config(report_dir=report_dir))
    optimizer.start()
    optimizer.stop()
    assert victim.read_text() == "precious"
    assert not (tmp_path / "dangling").exists()
    for name in ("report.html", "report.json"):
        info = os.lstat(report_dir / name)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600, name
    assert "<html" in (report_dir / "report.html").read_text().lower()
    assert sorted(p.name for p in report_dir.iterdir()) == ["report.html", "report.json"]  # no temp left


def test_report_dir_we_create_is_private(tmp_path: Path) -> None:
    """A report directory kotoba-memory creates is 0700 (its parent may be world-writable)."""
    report_dir = tmp_path / "made" / "here"
    optimizer = MemoryOptimizer(fast_config(report_dir=report_dir))
    optimizer.start()
    optimizer.stop()
    assert stat.S_IMODE(os.stat(report_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(report_dir / "report.json").st_mode) == 0o600
