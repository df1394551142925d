"""Figures of a :class:`~kotoba_memory.report.MemoryReport` written for people: units, rounding,
percentages, what each section means, and the recommendations to read first.

The JSON form keeps the raw numbers; only the text and HTML forms go through here.
"""

from __future__ import annotations

import linecache
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CONFIDENT_LEAK",
    "SECTION_HELP",
    "bytes_text",
    "cache_line",
    "duration_text",
    "human_value",
    "leak_order",
    "number_text",
    "percent_text",
    "recommendations",
    "seconds_text",
    "source_line",
    "view_text",
]

#: A leak suspect at or above this confidence is listed as a recommendation.
CONFIDENT_LEAK = 0.8

#: One line per report section: what it shows and what to do about it.
SECTION_HELP: dict[str, str] = {
    "recommendations": "What to change first, the most certain first. Each line names the figure behind it.",
    "memory": "Resident memory (RSS) of this process as sampled. A line that keeps rising under steady "
    "load points to a leak or an unbounded cache; a rise that levels off is warm-up.",
    "gc-pauses": "Each bar is one pause of Python's cyclic garbage collector. Pauses of tens of ms stall "
    "requests: freeze the long-lived heap (gc.freeze) or let the GC optimizer tune the thresholds.",
    "cache-hit-rate": "Share of lookups answered from a cache, all caches together, between two samples. "
    "A falling line under steady traffic means a cache is too small for what is asked of it.",
    "caches": "Every cache alive in this process, busiest first. Hit rate = lookups answered from the "
    "cache. Low hit rate with many evictions: the cache is too small (raise its size); low hit rate "
    "without evictions: keys are seldom asked twice (cache less, or for longer).",
    "leaks": "Allocation sites whose memory grew across tracing windows and stayed alive, the most "
    "confident first. Confidence 0.8 "
    "or more is a likely leak: read the source line shown and find who keeps those objects.",
    "hotspots": "Where the most memory was allocated during the last tracing window (not necessarily "
    "leaked): the first places to look when memory is high but stable.",
    "routes": "Requests per route and the memory they added on average. A route whose mean RSS delta "
    "stays well above zero is where memory grows.",
    "workers": "Every process of this server, from the fleet spool: compare their RSS and leak suspects.",
    "memory-stats": "The process's memory now and at its peak since the optimizer started.",
    "gc": "Python's garbage collector during the run. A large share of wall time in GC means tune the "
    "thresholds or freeze long-lived objects; short runs overstate it.",
    "pool": "The memory pool: how much of its reservation is in use. Mostly unused: shrink pool_size_mb.",
    "profiler": "What the profiler itself costs (memory, time per window): it should stay small.",
    "configuration": "The MemoryConfig this run used.",
}

_KIB = 1024.0


def number_text(value: float | int) -> str:
    """A count or measure rounded for reading: ``12,345``, ``3.14``, ``0.0012``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01:
        return f"{value:.2f}"
    return f"{value:.2g}"


def percent_text(share: float | None) -> str:
    """A 0..1 share as a percentage: ``99.9%``, ``0.6%``, ``<0.1%``, ``100%``."""
    if share is None or not math.isfinite(share):
        return "n/a"
    pct = share * 100.0
    if pct == 0:
        return "0%"
    if 0 < pct < 0.1:
        return "<0.1%"
    if share >= 1.0:
        return f"{pct:.0f}%"
    if pct >= 99.95:  # not all: never round up to 100%
        return "99.9%"
    return f"{pct:.1f}%"


def bytes_text(value: float | int | None) -> str:
    """Bytes with a binary unit: ``512 B``, ``6.5 KiB``, ``1.2 GiB``."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < _KIB or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= _KIB
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns at TiB


def seconds_text(value: float | None) -> str:
    """A short duration: ``42 µs``, ``3.1 ms``, ``1.25 s``, then minutes, hours, days."""
    if value is None or not math.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude == 0:
        return "0 s"
    if magnitude < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if magnitude < 1:
        return f"{value * 1e3:.1f} ms"
    if magnitude < 60:
        return f"{value:.2f} s"
    return duration_text(value)


def duration_text(seconds: float) -> str:
    """A long duration: ``45 s``, ``3.5 min``, ``2.0 h``, ``1.1 days``."""
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def rate_text(bytes_per_s: float) -> str:
    """A growth rate: ``+1.3 MiB/s``, ``-200 B/s``."""
    sign = "+" if bytes_per_s >= 0 else "-"
    return f"{sign}{bytes_text(abs(bytes_per_s))}/s"


def human_value(key: str, value: Any) -> str:
    """One figure of a raw mapping formatted by what its name says it is (bytes, seconds, share...)."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {human_value(str(k), v)}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(human_value(key, v) for v in value) or "none"
    if not isinstance(value, int | float):
        return str(value)
    name = key.lower()
    if name.endswith("_per_s") and "bytes" in name:
        return rate_text(float(value))
    if "_per_" in name:  # a rate (collections per minute, objects per ms): a plain number
        return number_text(value)
    if name.endswith("_percent"):
        return f"{float(value):.1f}%"
    if name.endswith(("_share", "_rate", "_ratio", "efficiency")):
        return percent_text(float(value))
    if name.endswith("_mb"):
        return bytes_text(float(value) * _KIB * _KIB)
    if "bytes" in name or name in ("capacity", "size", "bytes"):
        return bytes_text(value)
    if name.endswith("_ns"):
        return seconds_text(float(value) / 1e9)
    if name.endswith("_ms"):
        return seconds_text(float(value) / 1e3)
    if name.endswith(("_s", "_seconds")):
        return seconds_text(float(value))
    return number_text(value)


def source_line(site: str | None) -> str:
    """The source text at ``file:line`` (stripped), or "" when the file cannot be read here."""
    if not site or ":" not in site:
        return ""
    filename, _, line = site.rpartition(":")
    try:
        number = int(line)
    except ValueError:
        return ""
    return linecache.getline(filename, number).strip()[:160]


def leak_order(leaks: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Leak suspects, the most confident first (then the fastest growing)."""
    return sorted(
        leaks,
        key=lambda leak: (
            -float(leak.get("confidence") or 0.0),
            -float(leak.get("growth_rate_bytes_per_s") or 0.0),
        ),
    )


def cache_line(row: Mapping[str, Any]) -> str:
    """One cache of the report in a line: hit rate of its lookups, size, evictions, who uses it."""
    name, kind = row.get("name"), row.get("type") or "cache"
    if row.get("error"):
        return f"{name} ({kind}): stats unavailable ({row['error']})"
    if row.get("note") and "hits" not in row:
        users = "; ".join(row.get("uses") or [])
        return f"{name} ({kind}): {row['note']}" + (f"; used by {users}" if users else "")
    hits, misses = int(row.get("hits") or 0), int(row.get("misses") or 0)
    lookups = hits + misses
    parts = [
        f"{percent_text(hits / lookups)} of {number_text(lookups)} lookups hit"
        if lookups
        else "no lookups yet",
        f"{number_text(int(row.get('entries') or 0))} entries",
    ]
    held, limit = row.get("bytes"), row.get("max_bytes")
    parts.append(f"{bytes_text(held)} of {bytes_text(limit)}" if limit else f"{bytes_text(held)}")
    evictions = int(row.get("evictions") or 0)
    if evictions:
        parts.append(f"{number_text(evictions)} evicted")
    text = f"{name} ({kind}): " + ", ".join(parts)
    uses = list(row.get("uses") or [])
    for view in row.get("views") or []:
        uses.append(view_text(view))
    if row.get("more_uses"):
        uses.append(f"{row['more_uses']} more")
    if uses:
        text += "; used by " + "; ".join(uses)
    if row.get("parts"):
        text += f" [tiers: {', '.join(str(p) for p in row['parts'])}]"
    return text


def view_text(view: Mapping[str, Any]) -> str:
    """A front end listed under its store (a ``QueryCache``): its label, name and its own hit rate."""
    label = str(view.get("label", "?")) + (f" {view['name']!r}" if view.get("name") else "")
    if view.get("error"):
        return f"{label} (stats unavailable: {view['error']})"
    hits, misses = int(view.get("hits") or 0), int(view.get("misses") or 0)
    lookups = hits + misses
    text = (
        f"{label} ({percent_text(hits / lookups)} of {number_text(lookups)} queries hit"
        if lookups
        else (f"{label} (no queries cached yet")
    )
    if view.get("bypasses"):
        text += f", {number_text(int(view['bypasses']))} bypassed"
    return text + ")"


def recommendations(report: Any) -> list[str]:
    """What to do first, from a report's figures: confident leaks, GC advice, caches that thrash."""
    out: list[str] = []
    for leak in leak_order(report.leaks):
        if float(leak.get("confidence") or 0.0) < CONFIDENT_LEAK:
            continue
        route = f" (route {leak['route']})" if leak.get("route") else ""
        src = leak.get("source_line") or source_line(leak.get("allocation_site"))
        out.append(
            f"Likely leak at {leak.get('allocation_site')}{route}: "
            f"{rate_text(float(leak.get('growth_rate_bytes_per_s') or 0.0))}, confidence "
            f"{float(leak.get('confidence') or 0.0):.2f}" + (f" — `{src}`" if src else "")
        )
    gc_data = report.gc or {}
    for opportunity in gc_data.get("optimization_opportunities") or []:
        description = opportunity.get("description")
        if description:
            actions = opportunity.get("actions") or []
            out.append(f"GC: {description}" + (f" ({'; '.join(actions[:2])})" if actions else ""))
    for row in report.caches:
        hits, misses = int(row.get("hits") or 0), int(row.get("misses") or 0)
        lookups, evictions = hits + misses, int(row.get("evictions") or 0)
        if lookups >= 100 and hits / lookups < 0.5 and evictions > 0.1 * max(1, int(row.get("puts") or 0)):
            out.append(
                f"Cache {row.get('name')} answers only {percent_text(hits / lookups)} of lookups and evicted "
                f"{number_text(evictions)} entries: it is smaller than what is asked of it; raise its size"
            )
    own = report.cache or {}
    if int(own.get("hits") or 0) + int(own.get("misses") or 0) >= 100:  # advice from enough lookups only
        name = own.get("name", "kotoba-memory")
        for text in own.get("recommendations") or []:
            if not text.startswith("The adaptive policy currently"):  # a description, nothing to do
                out.append(f"Cache {name}: {text}")
    note = (report.allocator or {}).get("note")
    if note:
        out.append(f"Allocator: {note}")
    return out
