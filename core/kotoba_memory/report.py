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

from kotoba_memory import report_format as fmt

__all__ = ["MemoryReport", "MemoryStats", "private_dir", "replace_private", "to_plain", "write_private"]

_MIB = 1024 * 1024
_MAX_ADVICE = 8
_MAX_TEXT_CACHES = 12


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
class MemoryBrief:
    """The counters of a running optimizer, read cheaply enough for a task every few seconds (the fleet
    snapshot): the fields a :class:`MemoryReport` has under the same names, without its series,
    hotspots or GC analysis."""

    stats: MemoryStats
    routes: list[dict[str, Any]] = field(default_factory=list)
    #: ``total_collections``, ``total_pause_s``, ``gc_time_share`` and ``mode`` (see ``GcOptimizer.summary``).
    gc: dict[str, Any] | None = None
    profiler: dict[str, Any] | None = None
    leaks: list[dict[str, Any]] = field(default_factory=list)
    leak_status: dict[str, Any] | None = None
    cache: dict[str, Any] | None = None
    caches: list[dict[str, Any]] = field(default_factory=list)


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
    #: Every live cache of the process, busiest first (see :mod:`kotoba_memory.cache_manager.inventory`);
    #: ``cache`` above is only the optimizer's own, when it was used.
    caches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        """Seconds covered by the report."""
        return max(0.0, self.finished_at - self.started_at)

    # ------------------------------------------------------------------ text
    def recommendations(self) -> list[str]:
        """What to do first, the most certain first: confident leak suspects, GC advice, thrashing caches."""
        return fmt.recommendations(self)

    def summary(self, *, advice: bool = True) -> str:
        """A short human-readable summary (what you would print at the end of a run); ``advice=False``
        leaves out the recommendations (the HTML page lists them on their own)."""
        s = self.stats
        head = f"kotoba-memory report: {self.duration_s:.1f} s"
        if self.duration_s < _MIN_EXTRAPOLATION_S:
            head += " (a short run: rates and shares below are extrapolated from it, not steady state)"
        lines = [head]
        todo = self.recommendations() if advice else []
        if todo:
            lines.append("  do first:")
            lines.extend(f"    - {text}" for text in todo[:_MAX_ADVICE])
        lines.append(
            f"  memory: current {fmt.bytes_text(s.rss_bytes)}, peak {fmt.bytes_text(s.peak_rss_bytes)}, "
            f"{_efficiency_text(s)}"
        )
        if self.temporal and self.temporal.get("samples"):
            rate = float(self.temporal.get("growth_rate_bytes_per_s") or 0.0)
            lines.append(f"  trend: {fmt.rate_text(rate)}{_limit_text(self.temporal)}")
        if self.gc is not None:
            lines.append(
                f"  gc: {fmt.number_text(int(self.gc.get('total_collections') or 0))} collections, "
                f"{fmt.seconds_text(float(self.gc.get('total_pause_s') or 0.0))} paused in all, "
                f"score {float(self.gc.get('performance_score') or 0.0):.2f} of 1"
                f"{_gc_share_text(self.gc, self.duration_s)}"
            )
            if self.gc.get("mode"):
                lines.append(
                    f"  gc mode: {self.gc['mode']} ({self.gc.get('mode_reason') or 'no reason given'}); "
                    f"own bookkeeping {fmt.bytes_text(self.gc.get('own_memory_bytes') or 0)}"
                )
        if self.caches:
            lines.append(f"  caches: {len(self.caches)} alive (hit rate = lookups answered from the cache)")
            lines.extend(f"    {fmt.cache_line(row)}" for row in self.caches[:_MAX_TEXT_CACHES])
            if len(self.caches) > _MAX_TEXT_CACHES:
                lines.append(f"    ... and {len(self.caches) - _MAX_TEXT_CACHES} more (see the JSON report)")
        elif self.cache is not None:
            lines.append(f"  cache: {fmt.cache_line(self.cache)}")
        else:
            lines.append("  caches: none alive")
        if self.pool is not None:
            lines.append(
                f"  pool: {fmt.bytes_text(self.pool.get('used_bytes') or 0)} of "
                f"{fmt.bytes_text(self.pool.get('capacity') or 0)} used, "
                f"hit rate {fmt.percent_text(float(self.pool.get('hit_rate') or 0.0))}"
            )
        if self.allocator:
            active, requested = self.allocator.get("active"), self.allocator.get("requested")
            lines.append(f"  allocator: {active} (requested {requested})")
        if self.leaks:
            lines.append(f"  leak suspects: {len(self.leaks)} (most confident first)")
            for leak in fmt.leak_order(self.leaks)[:5]:
                route = f" [route {leak['route']}]" if leak.get("route") else ""
                lines.append(
                    f"    {leak['allocation_site']}{route}: "
                    f"{fmt.rate_text(float(leak.get('growth_rate_bytes_per_s') or 0.0))}, "
                    f"~{fmt.bytes_text(leak.get('size') or 0)} over "
                    f"{fmt.duration_text(float(leak.get('age_seconds') or 0.0))}, "
                    f"confidence {float(leak.get('confidence') or 0.0):.2f}"
                )
                src = leak.get("source_line") or fmt.source_line(leak.get("allocation_site"))
                if src:
                    lines.append(f"      > {src}")
        elif self.leak_status is not None and not self.leak_status.get("ready"):
            lines.append(f"  leak suspects: no verdict — {self.leak_status.get('message')}")
        elif self.profiler is not None:
            lines.append(f"  leak suspects: none ({self.profiler.get('windows', 0)} tracing windows)")
        lines.extend(_fleet_lines(self.workers, self.fleet))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable): the raw figures, plus ``recommendations``."""
        data = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["duration_s"] = self.duration_s
        data["recommendations"] = self.recommendations()
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
        """A self-contained HTML page: what to do first, leak suspects with their source lines, every live
        cache, charts (memory, GC pauses, cache hit rate), the text summary, then the detailed figures."""
        t0 = self.started_at
        memory = [(t - t0, mb) for t, mb in self.memory_series]
        pauses = [(t - t0, ms) for t, ms, _ in self.gc_pauses]
        hit_rate = [(t - t0, rate * 100.0) for t, rate in self.cache_hit_rate_series]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0))
        charts = [
            _svg_chart("memory", "Memory over time (RSS)", memory, "MiB", kind="line"),
            _svg_chart("gc-pauses", "GC pauses", pauses, "ms", kind="bars"),
            _svg_chart(
                "cache-hit-rate", "Cache hit rate (all caches)", hit_rate, "%", kind="line", y_max=100.0
            ),
        ]
        advice = self.recommendations()
        short = self.duration_s < _MIN_EXTRAPOLATION_S
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>kotoba-memory report ({_esc(stamp)})</title>",
            f"<style>{_CSS}</style></head><body>",
            "<h1>kotoba-memory report</h1>",
            f'<p class="meta">{_esc(stamp)}, {_esc(fmt.duration_text(self.duration_s))} of data'
            + (
                '. <strong class="warn">A short run: rates, shares and forecasts are extrapolated from '
                "it and are not steady-state figures.</strong>"
                if short
                else "."
            )
            + "</p>",
            '<h2 id="recommendations">Do first</h2>',
            _help("recommendations"),
            (
                "<ol class=\"advice\">" + "".join(f"<li>{_esc(a)}</li>" for a in advice) + "</ol>"
                if advice
                else '<p class="empty">nothing stands out</p>'
            ),
            _leak_table(self.leaks, self.leak_status),
            _caches_table(self.caches),
            '<section class="charts">',
            *charts,
            "</section>",
            '<h2 id="summary">Summary</h2>',
            f'<pre class="summary">{_esc(self.summary(advice=False))}</pre>',
            _workers_table(self.workers) if self.fleet is not None else "",
            _table(
                "Routes",
                ["route", "requests", "mean RSS delta", "mean traced delta", "total time"],
                [
                    [
                        r.get("route"),
                        r.get("requests"),
                        _bytes(_mean(r.get("rss_delta_bytes"), _rss_requests(r))),
                        _bytes(_mean(r.get("traced_delta_bytes"), r.get("traced_requests"))),
                        fmt.seconds_text(float(r.get("total_duration_s") or 0.0)),
                    ]
                    for r in self.routes
                ],
                help_key="routes",
            ),
            _table(
                "Allocation hotspots (last tracing window)",
                ["site", "source", "bytes", "blocks"],
                [
                    [
                        h.get("allocation_site"),
                        fmt.source_line(h.get("allocation_site")),
                        _bytes(h.get("size")),
                        h.get("count"),
                    ]
                    for h in self.hotspots
                ],
                help_key="hotspots",
            ),
            _table("Memory", ["figure", "value"], _memory_rows(self.stats), help_key="memory-stats"),
        ]
        if self.gc:
            parts.extend(_gc_tables(self.gc, self.duration_s))
        if self.cache and not self.caches:
            parts.append(_table("Cache", ["figure", "value"], _human_pairs(self.cache), help_key="caches"))
        if self.pool:
            parts.append(_table("Memory pool", ["figure", "value"], _human_pairs(self.pool), help_key="pool"))
        if self.profiler:
            parts.append(
                _table("Profiler's own footprint", ["figure", "value"], _human_pairs(self.profiler),
                       help_key="profiler")
            )
        if self.notes:
            parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in self.notes) + "</ul>")
        parts.append(
            _table("Configuration", ["field", "value"], _pairs(self.config), help_key="configuration")
        )
        parts.append("</body></html>")
        return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------- HTML helpers
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222;max-width:72rem}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2rem}
pre.summary{background:#f5f5f7;padding:1rem;border-radius:6px;white-space:pre-wrap}
pre.src{margin:.25rem 0;padding:.25rem .4rem;background:#fff8e6;white-space:pre-wrap;font-size:.85rem}
code{font-size:.85rem;overflow-wrap:anywhere} td:first-child{min-width:12rem}
.charts{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:.5rem}
figcaption{font-weight:600;margin-bottom:.25rem}
table{border-collapse:collapse;margin-top:.5rem;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
td{overflow-wrap:anywhere} th{white-space:nowrap}
th{background:#f0f0f3} td.num{text-align:right}
.empty{color:#777;font-style:italic}
p.what{color:#555;margin:.25rem 0 .5rem;max-width:60rem}
p.meta{color:#555} .warn{color:#a15c00}
ol.advice li{margin:.25rem 0}
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
    for frac, anchor in ((0.0, "middle"), (0.5, "middle"), (1.0, "end")):
        value = x_lo + frac * (x_hi - x_lo)
        axis.append(
            f'<text x="{sx(value):.1f}" y="{_H - 8}" text-anchor="{anchor}">{_fmt(value)} s</text>'
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


def _help(key: str) -> str:
    text = fmt.SECTION_HELP.get(key)
    return f'<p class="what">{_esc(text)}</p>' if text else ""


class _Html(str):
    """A table cell that is already HTML (escaped where it holds data)."""


def _cell(value: object) -> str:
    if isinstance(value, _Html):
        return f"<td>{value}</td>"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num">{_esc(fmt.number_text(value))}</td>'
    return f"<td>{_esc(value)}</td>"


def _table(
    title: str, headers: Sequence[str], rows: Iterable[Sequence[object]], *, help_key: str | None = None
) -> str:
    rows = list(rows)
    out = [f"<h2>{_esc(title)}</h2>"]
    if help_key:
        out.append(_help(help_key))
    if not rows:
        out.append('<p class="empty">none</p>')
        return "\n".join(out)
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    out.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
    for row in rows:
        cells = "".join(_cell(c) for c in row)
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
    return (
        f", memory limit in {_duration(eta)} at this rate ({_duration(headroom / fast)} to {latest}; "
        f"extrapolated from {_duration(duration)} of samples)"
    )


def _efficiency_text(stats: MemoryStats) -> str:
    """What ``memory_efficiency`` means for this run, in words."""
    if stats.efficiency_basis == "managed":
        reserved = (stats.cache_capacity_bytes or 0) + (stats.pool_capacity_bytes or 0)
        return (
            f"the optimizer's cache and pool hold {fmt.percent_text(stats.memory_efficiency)} of the "
            f"{fmt.bytes_text(reserved)} they may use"
        )
    return f"now {fmt.percent_text(stats.memory_efficiency)} of the peak"


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
        return (
            f'<h2>Leak suspects</h2>\n{_help("leaks")}\n'
            f'<p class="empty">no verdict: {_esc(status.get("message"))}</p>'
        )

    rows = []
    for leak in fmt.leak_order(leaks):
        source = leak.get("source_line") or fmt.source_line(leak.get("allocation_site"))
        frames = list(leak.get("traceback") or [])
        site = f"<code>{_esc(leak.get('allocation_site'))}</code>"
        if source:
            site += f'<pre class="src">{_esc(source)}</pre>'
        if len(frames) > 1:
            site += (
                f"<details><summary>{len(frames)} frames</summary>"
                f'<pre class="src">{_esc(chr(10).join(frames))}</pre></details>'
            )
        rows.append([
            _Html(site),
            leak.get("route") or "",
            fmt.rate_text(float(leak.get("growth_rate_bytes_per_s") or 0.0)),
            _bytes(leak.get("size")),
            fmt.duration_text(float(leak.get("age_seconds") or 0.0)),
            f"{float(leak.get('confidence') or 0.0):.2f}",
            leak.get("evidence", ""),
        ])
    return _table(
        "Leak suspects",
        ["allocation site and source", "route", "growth", "size", "age", "confidence", "evidence"],
        rows,
        help_key="leaks",
    )


def _caches_table(caches: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for row in caches:
        hits, misses = int(row.get("hits") or 0), int(row.get("misses") or 0)
        lookups = hits + misses
        uses = list(row.get("uses") or []) + [fmt.view_text(v) for v in row.get("views") or []]
        if row.get("parts"):
            uses.append("tiers: " + ", ".join(str(p) for p in row["parts"]))
        rows.append([
            row.get("name"),
            row.get("type"),
            fmt.percent_text(hits / lookups) if lookups else "no lookups",
            lookups,
            row.get("entries"),
            _bytes(row.get("bytes")),
            _bytes(row.get("max_bytes")) or "unbounded",
            row.get("evictions"),
            fmt.seconds_text((row.get("hit_latency_ns") or 0) / 1e9) if row.get("hit_latency_ns") else "",
            "; ".join(uses) or (row.get("error") or ""),
        ])
    return _table(
        "Caches",
        ["cache", "type", "hit rate", "lookups", "entries", "held", "limit", "evicted", "hit latency",
         "used by"],
        rows,
        help_key="caches",
    )


def _memory_rows(stats: MemoryStats) -> list[list[object]]:
    rows: list[list[object]] = [
        ["RSS now", fmt.bytes_text(stats.rss_bytes)],
        ["peak RSS", fmt.bytes_text(stats.peak_rss_bytes)],
        ["efficiency", f"{fmt.percent_text(stats.memory_efficiency)}: {_efficiency_text(stats)}"],
    ]
    if stats.cache_capacity_bytes:
        held = f"{fmt.bytes_text(stats.cache_bytes)} of {fmt.bytes_text(stats.cache_capacity_bytes)}"
        rows.append(["optimizer's cache", held])
    if stats.pool_capacity_bytes:
        used = f"{fmt.bytes_text(stats.pool_used_bytes)} of {fmt.bytes_text(stats.pool_capacity_bytes)}"
        rows.append(["pool", used])
    if stats.gc_pause_total_s is not None:
        rows.append(["GC paused in all", fmt.seconds_text(stats.gc_pause_total_s)])
    rows.append(["uptime", fmt.duration_text(stats.uptime_s)])
    return rows


def _gc_tables(gc_data: Mapping[str, Any], duration_s: float) -> list[str]:
    scalars = {k: v for k, v in gc_data.items() if not isinstance(v, dict | list)}
    rows = _human_pairs(scalars)
    if duration_s < _MIN_EXTRAPOLATION_S:
        for row in rows:
            if row[0] in ("gc time share", "gc cpu share", "collections per minute"):
                row[1] = f"{row[1]} (over only {duration_s:.0f} s: not steady state)"
    tables = [_table("Garbage collector", ["figure", "value"], rows, help_key="gc")]
    generations = gc_data.get("generations") or {}
    if isinstance(generations, Mapping) and generations:
        tables.append(_table(
            "GC generations",
            ["generation", "collections", "pause p50", "pause p95", "pause max", "paused in all",
             "collected"],
            [
                [
                    g.get("generation", key), g.get("collections"),
                    fmt.seconds_text(g.get("pause_p50_s")), fmt.seconds_text(g.get("pause_p95_s")),
                    fmt.seconds_text(g.get("pause_max_s")), fmt.seconds_text(g.get("total_pause_s")),
                    g.get("collected"),
                ]
                for key, g in generations.items() if isinstance(g, Mapping)
            ],
        ))
    bottlenecks = [b for b in gc_data.get("bottlenecks") or [] if isinstance(b, Mapping)]
    findings = [[b.get("kind"), b.get("description")] for b in bottlenecks]
    if findings:
        tables.append(_table("GC bottlenecks", ["kind", "what"], findings))
    return tables


def _worker_cells(row: Mapping[str, Any]) -> list[object]:
    """pid, role, RSS, peak, requests, GC, leak suspects, cache, age: one process of the fleet."""
    gc_row = row.get("gc") or {}
    gc_text = (
        f"{fmt.number_text(int(gc_row.get('collections') or 0))} collections, "
        f"{fmt.seconds_text(float(gc_row.get('pause_total_s') or 0.0))}"
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
    cache_text = _worker_caches_text(row)
    return [
        row.get("pid"), row.get("role", "worker"),
        _bytes(row.get("rss_bytes")), _bytes(row.get("peak_rss_bytes")),
        row.get("requests") if row.get("requests") is not None else "", gc_text, leak_text, cache_text,
        f"{float(row.get('age_s') or 0.0):.0f} s",
    ]


def _worker_caches_text(row: Mapping[str, Any]) -> str:
    caches = [c for c in row.get("caches") or [] if isinstance(c, Mapping)]
    if not caches and isinstance(row.get("cache"), Mapping):
        caches = [row["cache"]]
    if not caches:
        return "none"
    hits = sum(int(c.get("hits") or 0) for c in caches)
    lookups = hits + sum(int(c.get("misses") or 0) for c in caches)
    rate = f"{fmt.percent_text(hits / lookups)} of {fmt.number_text(lookups)} lookups hit" if lookups else (
        "no lookups yet"
    )
    return f"{len(caches)} ({', '.join(str(c.get('name')) for c in caches[:3])}): {rate}"


_WORKER_HEADERS = ["pid", "role", "RSS", "peak RSS", "requests", "GC", "leak suspects", "cache", "written"]


def _fleet_lines(workers: Sequence[Mapping[str, Any]], fleet: Mapping[str, Any] | None) -> list[str]:
    if fleet is None:
        return []
    if fleet.get("error"):
        return [f"  workers: not listed ({fleet['error']})"]
    hit_rate = fleet.get("cache_hit_rate")
    lines = [
        f"  workers: {fleet.get('workers', 0)} ({fleet.get('processes', 0)} processes), "
        f"RSS {fmt.bytes_text(fleet.get('rss_bytes') or 0)} in all, "
        f"{fmt.number_text(int(fleet.get('requests') or 0))} requests, "
        f"{fleet.get('leak_suspects') or 0} leak suspects"
        + (f", caches {fmt.percent_text(hit_rate)} hits" if isinstance(hit_rate, int | float) else "")
    ]
    for cache in (fleet.get("caches") or [])[:_MAX_TEXT_CACHES]:
        lookups = int(cache.get("hits") or 0) + int(cache.get("misses") or 0)
        rate = cache.get("hit_rate")
        hit_text = f"{fmt.percent_text(rate)} of {fmt.number_text(lookups)} lookups hit" if lookups else (
            "no lookups"
        )
        entries = fmt.number_text(int(cache.get("entries") or 0))
        lines.append(
            f"    cache {cache.get('name')} in {cache.get('processes')} processes: {hit_text}, "
            f"{entries} entries, {fmt.bytes_text(cache.get('bytes'))}"
        )
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


def _human_pairs(mapping: Mapping[str, Any]) -> list[list[object]]:
    """Raw figures as (label, value in units) rows; the raw numbers stay in the JSON report."""
    return [[k.replace("_", " "), fmt.human_value(k, v)] for k, v in mapping.items()]


def _rss_requests(route: Mapping[str, Any]) -> object:
    """How many of a route's requests had their RSS measured (older reports: all of them)."""
    n = route.get("rss_requests")
    return route.get("requests") if n is None else n


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


_duration = fmt.duration_text


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
