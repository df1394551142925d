"""The HTML report opened in a real browser (Debian's headless Chromium): it renders from one file with
no network, and its charts carry the run's data points after the page has loaded."""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kotoba_memory.cache_manager import CacheManager
from kotoba_memory.cache_manager.inventory import note_use
from kotoba_memory.config import MemoryConfig
from kotoba_memory.optimizer import MemoryOptimizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEPT: list[bytearray] = []
WIDTH, HEIGHT = 1200, 2000


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI must provide it (scripts/bootstrap.sh installs it)")
    pytest.skip("chromium is not installed")


def run_browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


class Dom(HTMLParser):
    """The figures (id -> data points and drawn shapes) and headings of the page as the browser left it."""

    def __init__(self) -> None:
        super().__init__()
        self.points: dict[str, list[list[float]]] = {}
        self.shapes: dict[str, int] = {}
        self.headings: list[str] = []
        self._figure: str | None = None
        self._heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "figure":
            self._figure = str(values["id"])
            self.points[self._figure] = json.loads(values.get("data-points") or "[]")
            self.shapes[self._figure] = 0
        elif tag in ("polyline", "rect") and self._figure is not None:
            self.shapes[self._figure] += 1
        elif tag == "h2":
            self._heading = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figure = None

    def handle_data(self, data: str) -> None:
        if self._heading:
            self.headings.append(data.strip())
            self._heading = False


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_html_report_renders_in_headless_chromium_with_charts_that_have_data(tmp_path: Path) -> None:
    cache = CacheManager(max_bytes=1 << 20, name="browser-test")
    note_use(cache, "@cached tests.lookup")
    config = MemoryConfig(monitoring_interval_ms=20, leak_window_s=0.2, leak_window_interval_s=0.25,
                          leak_trace_budget=None)
    optimizer = MemoryOptimizer(config)
    optimizer.start()
    try:
        deadline = time.monotonic() + 20
        i = 0
        while time.monotonic() < deadline:
            i += 1
            cache.get(i % 40) or cache.put(i % 40, b"v" * 64)
            KEPT.append(bytearray(2000))
            if i % 200 == 0:
                gc.collect()  # a pause for the GC chart
            report = optimizer.report() if i % 100 == 0 else None
            if report is not None and len(report.cache_hit_rate_series) >= 5 and report.gc_pauses:
                break
            time.sleep(0.002)
    finally:
        report = optimizer.stop()
        KEPT.clear()
    page = report.write_html(tmp_path / "report.html")

    dumped = run_browser(tmp_path, "--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = Dom()
    dom.feed(dumped.stdout)
    assert {"memory", "gc-pauses", "cache-hit-rate"} <= set(dom.points)
    assert len(dom.points["memory"]) == len(report.memory_series) >= 5
    assert len(dom.points["cache-hit-rate"]) == len(report.cache_hit_rate_series) >= 5
    assert len(dom.points["gc-pauses"]) == len(report.gc_pauses) >= 1
    assert dom.shapes["memory"] == 1 and dom.shapes["cache-hit-rate"] == 1  # one line each
    assert dom.shapes["gc-pauses"] == len(report.gc_pauses)  # one bar per pause
    assert dom.headings[:3] == ["Do first", "Leak suspects", "Caches"] and "Summary" in dom.headings
    assert "browser-test" in dumped.stdout and "@cached tests.lookup" in dumped.stdout

    shot = tmp_path / "report.png"
    taken = run_browser(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri())
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    assert png_size(shot) == (WIDTH, HEIGHT)
    assert shot.stat().st_size > 30_000  # text, tables and charts drawn, not a blank page
