"""``MemoryReport``: what a MemoryOptimizer run found, as text, plain data and a self-contained HTML page.

The HTML page draws its charts as inline SVG (no script, no network), so it can be mailed, attached to
a ticket or opened from disk.
"""

from __future__ import annotations

import dataclasses
import enum
import html
import json
import logging
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MemoryReport", "MemoryStats", "private_dir", "replace_private", "to_plain", "write_private"]

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MemoryStats:
    """Current memory figures of the process and of the memory the optimizer manages.

    ``memory_efficiency`` is defined by ``efficiency_basis``: ``"managed"`` = bytes in use in the
    cache and pool over the bytes they reserve; ``"rss/peak"`` (when neither is enabled) = current RSS
    over the peak RSS seen since start, i.e. how much of the high-water mark is still needed.
    """

    current_memory_mb: float
    peak_memory_mb: float
    memory_efficiency: float
    efficiency_basis: str
    rss_bytes: int
    peak_rss_bytes: int
    cache_bytes: int | None = None
    cache_capacity_bytes: int | None = None
    cache_hit_rate: float | None = None
    pool_used_bytes: int | None = None
    pool_capacity_bytes: int | None = None
    gc_pause_total_s: float | None = None
    uptime_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return dataclasses.asdict(self)


def to_plain(value: Any, _depth: int = 0) -> Any:
    """Dataclasses, enums, paths, mappings and sequences turned into JSON-ready data."""
    if _depth > 12:
        return repr(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return to_plain(value.value, _depth + 1)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        plain = getattr(value, "to_dict", None)
        if callable(plain):
            return to_plain(plain(), _depth + 1)
        return {f.name: to_plain(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return to_plain(value._asdict(), _depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        return [to_plain(v, _depth + 1) for v in value]
    return repr(value)


@dataclass(frozen=True)
class MemoryReport:
    """The outcome of one MemoryOptimizer run (or a snapshot of a running one)."""

    started_at: float
    finished_at: float
    config: dict[str, Any]
    stats: MemoryStats
    memory_series: list[tuple[float, float]] = field(default_factory=list)  # (epoch s, RSS MiB)
    gc_pauses: list[tuple[float, float, int]] = field(default_factory=list)  # (epoch s, pause ms, gen)
    cache_hit_rate_series: list[tuple[float, float]] = field(default_factory=list)  # (epoch s, rate)
    leaks: list[dict[str, Any]] = field(default_factory=list)
    hotspots: list[dict[str, Any]] = field(default_factory=list)
    temporal: dict[str, Any] | None = None
    routes: list[dict[str, Any]] = field(default_factory=list)
    gc: dict[str, Any] | None = None
    cache: dict[str, Any] | None = None
    pool: dict[str, Any] | None = None
    allocator: dict[str, Any] = field(default_factory=dict)
    profiler: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    leak_status: dict[str, Any] | None = None
    #: Every process of the server from the fleet spool (see :mod:`kotoba_memory.fleet`), and their totals.
    workers: list[dict[str, Any]] = field(default_factory=list)
    fleet: dict[str, Any] | None = None

    @property
    def duration_s(self) -> float:
        """Seconds covered by the report."""
        return max(0.0, self.finished_at - self.started_at)

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        """A short human-readable summary (what you would print at the end of a run)."""
        s = self.stats
        lines = [
            f"kotoba-memory report: {self.duration_s:.1f} s",
            f"  memory: current {s.current_memory_mb:.1f} MB, peak {s.peak_memory_mb:.1f} MB, "
            f"efficiency {s.memory_efficiency * 100:.1f}% ({s.efficiency_basis})",
        ]
        if self.temporal and self.temporal.get("samples"):
            rate = self.temporal.get("growth_rate_bytes_per_s") or 0.0
            lines.append(f"  trend: {rate / 1024:+.1f} KiB/s{_limit_text(self.temporal)}")
        if self.gc is not None:
            lines.append(
                f"  gc: {self.gc.get('total_collections', 0)} collections, "
                f"{(self.gc.get('total_pause_s') or 0.0) * 1000:.1f} ms paused, "
                f"score {self.gc.get('performance_score', 0.0):.2f}{_gc_share_text(self.gc, self.duration_s)}"
            )
            if self.gc.get("mode"):
                lines.append(
                    f"  gc mode: {self.gc['mode']} ({self.gc.get('mode_reason') or 'no reason given'}); "
                    f"own bookkeeping {(self.gc.get('own_memory_bytes') or 0) / 1024:.0f} KiB"
                )
        if self.cache is not None:
            lines.append(
                f"  cache: hit rate {(self.cache.get('hit_rate') or 0.0) * 100:.1f}%, "
                f"{self.cache.get('entries', 0)} entries, {(self.cache.get('bytes') or 0) / _MIB:.1f} MB"
            )
        if self.pool is not None:
            lines.append(
                f"  pool: {(self.pool.get('used_bytes') or 0) / _MIB:.1f} of "
                f"{(self.pool.get('capacity') or 0) / _MIB:.0f} MB used, "
                f"hit rate {(self.pool.get('hit_rate') or 0.0) * 100:.1f}%"
            )
        if self.allocator:
            active, requested = self.allocator.get("active"), self.allocator.get("requested")
            lines.append(f"  allocator: {active} (requested {requested})")
        if self.leaks:
            lines.append(f"  leak suspects: {len(self.leaks)}")
            for leak in self.leaks[:5]:
                route = f" [route {leak['route']}]" if leak.get("route") else ""
                lines.append(
                    f"    {leak['allocation_site']}{route}: "
                    f"{leak['growth_rate_bytes_per_s'] / 1024:.1f} KiB/s, "
                    f"~{leak['size'] / 1024:.0f} KiB over {leak['age_seconds']:.0f} s, "
                    f"confidence {leak['confidence']:.2f}"
                )
        elif self.leak_status is not None and not self.leak_status.get("ready"):
            lines.append(f"  leak suspects: no verdict — {self.leak_status.get('message')}")
        elif self.profiler is not None:
            lines.append(f"  leak suspects: none ({self.profiler.get('windows', 0)} tracing windows)")
        lines.extend(_fleet_lines(self.workers, self.fleet))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        data = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["duration_s"] = self.duration_s
        return data

    def to_json(self, **kwargs: Any) -> str:
        """``to_dict()`` as JSON text."""
        return json.dumps(self.to_dict(), **kwargs)

    def write_html(self, path: str | Path) -> Path:
        """Write ``to_html()`` to ``path`` (a directory gets ``report.html``); returns the file path."""
        target = Path(path)
        if target.is_dir():
            target = target / "report.html"
        return write_private(target, self.to_html())

    def write_json(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` (a directory gets ``report.json``); returns the file path."""
        target = Path(path)
        if target.is_dir():
            target = target / "report.json"
        return write_private(target, self.to_json(indent=2))

    # ------------------------------------------------------------------ HTML
    def to_html(self) -> str:
        """A self-contained HTML page: summary, charts (memory, GC pauses, cache hit rate) and tables."""
        t0 = self.started_at
        memory = [(t - t0, mb) for t, mb in self.memory_series]
        pauses = [(t - t0, ms) for t, ms, _ in self.gc_pauses]
        hit_rate = [(t - t0, rate * 100.0) for t, rate in self.cache_hit_rate_series]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0))
        charts = [
            _svg_chart("memory", "Memory over time (RSS)", memory, "MB", kind="line"),
            _svg_chart("gc-pauses", "GC pauses", pauses, "ms", kind="bars"),
            _svg_chart("cache-hit-rate", "Cache hit rate", hit_rate, "%", kind="line", y_max=100.0),
        ]
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>kotoba-memory report ({_esc(stamp)})</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>kotoba-memory report</h1>",
            f"<pre class=\"summary\">{_esc(self.summary())}</pre>",
            '<section class="charts">',
            *charts,
            "</section>",
            _workers_table(self.workers) if self.fleet is not None else "",
            _leak_table(self.leaks, self.leak_status),
            _table(
                "Allocation hotspots (last tracing window)",
                ["site", "bytes", "blocks"],
                [[h.get("allocation_site"), _bytes(h.get("size")), h.get("count")] for h in self.hotspots],
            ),
            _table(
                "Routes",
                ["route", "requests", "mean RSS delta", "mean traced delta", "total time"],
                [
                    [
                        r.get("route"),
                        r.get("requests"),
                        _bytes(_mean(r.get("rss_delta_bytes"), r.get("requests"))),
                        _bytes(_mean(r.get("traced_delta_bytes"), r.get("traced_requests"))),
                        f"{r.get('total_duration_s', 0.0):.2f} s",
                    ]
                    for r in self.routes
                ],
            ),
            _table("Memory stats", ["figure", "value"], _pairs(self.stats.to_dict())),
            _table("Configuration", ["field", "value"], _pairs(self.config)),
        ]
        if self.gc:
            scalars = {k: v for k, v in self.gc.items() if not isinstance(v, dict | list)}
            share = scalars.get("gc_time_share")
            if isinstance(share, int | float) and self.duration_s < _MIN_EXTRAPOLATION_S:
                short = f"over only {self.duration_s:.0f} s: not steady state"
                scalars["gc_time_share"] = f"{share:.4f} ({short})"
            parts.append(_table("Garbage collector", ["figure", "value"], _pairs(scalars)))
        if self.cache:
            parts.append(_table("Cache", ["figure", "value"], _pairs(self.cache)))
        if self.pool:
            parts.append(_table("Memory pool", ["figure", "value"], _pairs(self.pool)))
        if self.profiler:
            parts.append(_table("Profiler's own footprint", ["figure", "value"], _pairs(self.profiler)))
        parts.append("</body></html>")
        return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------- HTML helpers
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222;max-width:72rem}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2rem}
pre.summary{background:#f5f5f7;padding:1rem;border-radius:6px;overflow-x:auto}
.charts{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:.5rem}
figcaption{font-weight:600;margin-bottom:.25rem}
table{border-collapse:collapse;margin-top:.5rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
td{overflow-wrap:anywhere} th{white-space:nowrap}
th{background:#f0f0f3} td.num{text-align:right}
.empty{color:#777;font-style:italic}
svg text{font-size:10px;fill:#555}
"""

_W, _H, _PAD_L, _PAD_B, _PAD_T, _PAD_R = 440, 220, 52, 28, 10, 10


def _esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _svg_chart(
    chart_id: str,
    title: str,
    points: Sequence[tuple[float, float]],
    unit: str,
    *,
    kind: str,
    y_max: float | None = None,
) -> str:
    """An SVG line or bar chart; the data is also kept in ``data-points`` so tools can read it back."""
    data = json.dumps([[round(x, 3), round(y, 4)] for x, y in points])
    head = f'<figure id="{chart_id}" data-unit="{_esc(unit)}" data-points=\'{_esc(data)}\'>'
    caption = f"<figcaption>{_esc(title)}</figcaption>"
    if not points:
        return f'{head}{caption}<p class="empty">no data recorded</p></figure>'
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo = 0.0 if kind == "bars" or (min(ys) >= 0 and min(ys) < 0.2 * max(ys)) else min(ys)
    y_hi = y_max if y_max is not None else max(ys)
    if y_hi <= y_lo:
        y_hi = y_lo + 1.0
    if x_hi <= x_lo:
        x_hi = x_lo + 1.0
    plot_w, plot_h = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def sx(x: float) -> float:
        return _PAD_L + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return _PAD_T + plot_h - (y - y_lo) / (y_hi - y_lo) * plot_h

    shapes: list[str] = []
    if kind == "bars":
        # Pauses are instants: thin bars, kept inside the plot so they never cover the axis labels.
        width = min(4.0, max(1.0, plot_w / max(len(points), 1) * 0.8))
        for x, y in points:
            top = sy(y)
            left = min(max(sx(x) - width / 2, _PAD_L), _W - _PAD_R - width)
            shapes.append(
                f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" '
                f'height="{_PAD_T + plot_h - top:.1f}" fill="#d9534f"><title>{y:.3f} {unit}</title></rect>'
            )
    else:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        shapes.append(f'<polyline fill="none" stroke="#2b6cb0" stroke-width="1.5" points="{path}"/>')
    axis = [
        f'<line x1="{_PAD_L}" y1="{_PAD_T + plot_h}" x2="{_W - _PAD_R}" y2="{_PAD_T + plot_h}" '
        'stroke="#999"/>',
        f'<line x1="{_PAD_L}" y1="{_PAD_T}" x2="{_PAD_L}" y2="{_PAD_T + plot_h}" stroke="#999"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        value = y_lo + frac * (y_hi - y_lo)
        y = sy(value)
        axis.append(
            f'<text x="{_PAD_L - 4}" y="{y + 3:.1f}" text-anchor="end">{_fmt(value)} {_esc(unit)}</text>'
        )
    for frac in (0.0, 0.5, 1.0):
        value = x_lo + frac * (x_hi - x_lo)
        axis.append(
            f'<text x="{sx(value):.1f}" y="{_H - 8}" text-anchor="middle">{_fmt(value)} s</text>'
        )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
        f'role="img" aria-label="{_esc(title)}">{"".join(axis)}{"".join(shapes)}</svg>'
    )
    return f"{head}{caption}{svg}</figure>"


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = list(rows)
    out = [f"<h2>{_esc(title)}</h2>"]
    if not rows:
        out.append('<p class="empty">none</p>')
        return "\n".join(out)
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    out.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
    for row in rows:
        cells = "".join(
            f'<td class="num">{_esc(c)}</td>' if isinstance(c, int | float) else f"<td>{_esc(c)}</td>"
            for c in row
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# Extrapolations from less than this much data are withheld: a minute of RSS or GC timing says little
# about the next hours (start-up, warm-up and load bursts dominate it).
_MIN_EXTRAPOLATION_S = 60.0


def _limit_text(temporal: Mapping[str, Any]) -> str:
    """Time to the memory limit with its range at two standard errors of the slope, or why it is withheld."""
    eta = temporal.get("time_to_limit_s")
    if eta is None:
        return ""
    duration = float(temporal.get("duration_s") or 0.0)
    if duration < _MIN_EXTRAPOLATION_S:
        return f" (time to the memory limit withheld: only {duration:.0f} s of samples)"
    rate = float(temporal.get("growth_rate_bytes_per_s") or 0.0)
    err = float(temporal.get("growth_rate_stderr") or 0.0)
    headroom = eta * rate
    slow, fast = rate - 2.0 * err, rate + 2.0 * err
    latest = f"{_duration(headroom / slow)}" if slow > 0 else "never"
    return f", memory limit in {_duration(eta)} at this rate ({_duration(headroom / fast)} to {latest})"


def _gc_share_text(gc_data: Mapping[str, Any], duration_s: float) -> str:
    """GC share of wall time, marked as a short-run figure when measured over under a minute."""
    share = gc_data.get("gc_time_share")
    if not isinstance(share, int | float):
        return ""
    if duration_s < _MIN_EXTRAPOLATION_S:
        return f", {share:.1%} of wall time over only {duration_s:.0f} s (not a steady-state figure)"
    return f", {share:.1%} of wall time"


def _leak_table(leaks: Sequence[Mapping[str, Any]], status: Mapping[str, Any] | None = None) -> str:
    if not leaks and status is not None and not status.get("ready"):
        return f'<h2>Leak suspects</h2>\n<p class="empty">no verdict: {_esc(status.get("message"))}</p>'

    rows = [
        [
            leak.get("allocation_site"),
            leak.get("route") or "",
            f"{(leak.get('growth_rate_bytes_per_s') or 0.0) / 1024:.2f} KiB/s",
            _bytes(leak.get("size")),
            f"{leak.get('age_seconds', 0.0):.0f} s",
            f"{leak.get('confidence', 0.0):.2f}",
            " <- ".join(leak.get("traceback") or []),
            leak.get("evidence", ""),
        ]
        for leak in leaks
    ]
    return _table(
        "Leak suspects",
        ["allocation site", "route", "growth", "size", "age", "confidence", "traceback", "evidence"],
        rows,
    )


def _worker_cells(row: Mapping[str, Any]) -> list[object]:
    """pid, role, RSS, peak, requests, GC, leak suspects, cache, age: one process of the fleet."""
    gc_row = row.get("gc") or {}
    gc_text = (
        f"{gc_row.get('collections') or 0} collections, {(gc_row.get('pause_total_s') or 0.0) * 1000:.1f} ms"
        if gc_row else "off"
    )
    leaks = row.get("leak_suspects")
    if leaks is None:
        leak_text = "off" if row.get("optimizer") else "no optimizer"
    elif leaks:
        top = (row.get("leaks") or [{}])[0]
        route = f" [route {top['route']}]" if top.get("route") else ""
        leak_text = f"{leaks}: {top.get('allocation_site')}{route}"
    else:
        leak_text = "none yet" if row.get("leak_verdict") else "none"
    cache = row.get("cache") or {}
    cache_text = (
        f"{(cache.get('hit_rate') or 0.0) * 100:.1f}% hits, {cache.get('entries') or 0} entries, "
        f"{_bytes(cache.get('bytes'))}" if cache else "off"
    )
    return [
        row.get("pid"), row.get("role", "worker"),
        _bytes(row.get("rss_bytes")), _bytes(row.get("peak_rss_bytes")),
        row.get("requests") if row.get("requests") is not None else "", gc_text, leak_text, cache_text,
        f"{float(row.get('age_s') or 0.0):.0f} s",
    ]


_WORKER_HEADERS = ["pid", "role", "RSS", "peak RSS", "requests", "GC", "leak suspects", "cache", "written"]


def _fleet_lines(workers: Sequence[Mapping[str, Any]], fleet: Mapping[str, Any] | None) -> list[str]:
    if fleet is None:
        return []
    if fleet.get("error"):
        return [f"  workers: not listed ({fleet['error']})"]
    hit_rate = fleet.get("cache_hit_rate")
    lines = [
        f"  workers: {fleet.get('workers', 0)} ({fleet.get('processes', 0)} processes), "
        f"RSS {(fleet.get('rss_bytes') or 0) / _MIB:.1f} MB in all, {fleet.get('requests') or 0} requests, "
        f"{fleet.get('leak_suspects') or 0} leak suspects"
        + (f", cache {hit_rate * 100:.1f}% hits" if isinstance(hit_rate, int | float) else "")
    ]
    for row in workers:
        pid, role, rss, peak, requests, gc_text, leak_text, cache_text, age = _worker_cells(row)
        lines.append(
            f"    pid {pid} ({role}): RSS {rss} (peak {peak}), {requests or 0} requests, gc {gc_text}, "
            f"leaks {leak_text}, cache {cache_text}, written {age} ago"
        )
    return lines


def _workers_table(workers: Sequence[Mapping[str, Any]]) -> str:
    return _table("Workers", _WORKER_HEADERS, [_worker_cells(row) for row in workers])


def _pairs(mapping: Mapping[str, Any]) -> list[list[object]]:
    return [[k, json.dumps(v) if isinstance(v, dict | list) else v] for k, v in mapping.items()]


def _mean(total: object, count: object) -> float | None:
    if isinstance(total, int | float) and isinstance(count, int) and count:
        return total / count
    return None


def _bytes(value: object) -> str:
    if not isinstance(value, int | float):
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _duration(seconds: float) -> str:
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


_log = logging.getLogger("kotoba_memory.report")


def private_dir(path: str | Path) -> Path:
    """Make ``path`` (mode 0700, parents too) when it is missing; warn when others may write into it."""
    directory = Path(path)
    if not directory.is_dir():
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return directory
    info = directory.stat()
    others_write = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if (others_write and not info.st_mode & stat.S_ISVTX) or info.st_uid != os.geteuid():
        _log.warning("kotoba-memory: report directory %s is writable by others or not ours; reports are "
                     "written to fresh 0600 files and renamed into place, never through a link", directory)
    return directory


def write_private(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` as a new 0600 file renamed into place (never written through a link)."""
    target = Path(path)
    return replace_private(private_dir(target.parent) / target.name, text)


def replace_private(target: Path, text: str) -> Path:
    """Write ``text`` to a fresh 0600 file beside ``target`` and rename it over ``target`` (atomic)."""
    # mkstemp creates the file with O_EXCL (no link is followed) and mode 0600; os.replace then swaps
    # the directory entry itself, so a symlink planted at ``target`` is replaced, not written through.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target
