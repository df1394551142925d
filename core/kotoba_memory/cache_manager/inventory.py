"""Which caches are alive in this process and what uses them: the cache list of the report.

Every kotoba-memory cache registers itself when built (weakly, :func:`iter_caches`). Integrations add
what a cache is for with :func:`note_use` ("Django CACHES 'default'", "@cached app.checksum") and
cache-like front ends with their own counters (SQLAlchemy's ``QueryCache``) with :func:`add_view`.
Nothing here keeps a cache alive, and the labels kept per cache are bounded.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kotoba_memory.cache_manager.base import BaseCache, iter_caches
from kotoba_memory.process import forks

__all__ = ["add_provider", "add_view", "cache_inventory", "cache_lookups", "note_use"]

#: Labels kept per cache (e.g. one per ``@cached`` function); beyond it the rest are counted.
MAX_USES = 12
#: Caches listed in a report, busiest first; the rest are counted.
MAX_LISTED = 40
#: Front ends (query caches) remembered at most; dead ones are dropped first.
MAX_VIEWS = 256

_lock = threading.Lock()
_uses: weakref.WeakKeyDictionary[BaseCache, list[str]] = weakref.WeakKeyDictionary()
_extra_uses: weakref.WeakKeyDictionary[BaseCache, int] = weakref.WeakKeyDictionary()
# (front end held weakly, its store held weakly, label, stats reader)
_views: list[tuple[weakref.ref[Any], weakref.ref[BaseCache], str, Callable[[Any], Mapping[str, Any]]]] = []


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


forks.register(_after_fork_in_child, name="cache_manager.inventory")


def note_use(cache: BaseCache, use: str) -> None:
    """Record that ``use`` stores its data in ``cache`` (shown beside the cache in reports)."""
    if not isinstance(cache, BaseCache) or not isinstance(use, str):
        return
    with _lock:
        uses = _uses.setdefault(cache, [])
        if use in uses:
            return
        if len(uses) < MAX_USES:
            uses.append(use)
        else:
            _extra_uses[cache] = _extra_uses.get(cache, 0) + 1


def add_view(front: Any, store: BaseCache, label: str, stats: Callable[[Any], Mapping[str, Any]]) -> None:
    """List ``front`` (a cache-like object with its own counters) under ``store``; both held weakly.

    ``stats(front)`` returns plain counters (``hits``, ``misses``... ) shown with the label.
    """
    with _lock:
        _views[:] = [v for v in _views if v[0]() is not None and v[1]() is not None]
        if len(_views) < MAX_VIEWS:
            _views.append((weakref.ref(front), weakref.ref(store), label, stats))


_providers: list[Callable[[], Iterable[Mapping[str, Any]]]] = []
_MAX_PROVIDERS = 16


def add_provider(provider: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
    """List caches kotoba-memory does not own (a Django ``CACHES`` alias on another backend): each call
    of ``provider()`` yields rows with at least ``name``, and ``type``, ``uses``, ``note`` when known."""
    with _lock:
        if provider not in _providers and len(_providers) < _MAX_PROVIDERS:
            _providers.append(provider)


def _foreign_rows() -> list[dict[str, Any]]:
    with _lock:
        providers = list(_providers)
    rows: list[dict[str, Any]] = []
    for provider in providers:
        try:
            rows.extend({"uses": [], "views": [], "parts": [], **dict(row)} for row in provider())
        except Exception as exc:  # a broken provider must not cost the report
            rows.append({"name": repr(provider), "uses": [], "views": [], "parts": [],
                         "error": f"{type(exc).__name__}: {exc}"})
    return rows


def _parts(cache: BaseCache) -> list[BaseCache]:
    """The caches ``cache`` is built from (a tiered cache's memory and disk tiers, a near cache's tiers)."""
    found: list[BaseCache] = []
    for value in getattr(cache, "__dict__", {}).values():
        if isinstance(value, BaseCache) and value is not cache and not any(value is f for f in found):
            found.append(value)
    return found


def _row(cache: BaseCache, parts: list[BaseCache]) -> dict[str, Any]:
    try:
        stats = cache.stats().to_dict()
    except Exception as exc:  # a closed or unreachable cache still belongs in the list
        stats = {"error": f"{type(exc).__name__}: {exc}"}
    row: dict[str, Any] = {"name": cache.name, "type": type(cache).__name__}
    row.update(stats)
    row["name"] = cache.name
    with _lock:
        uses = list(_uses.get(cache, ()))
        extra = _extra_uses.get(cache, 0)
        views = [(front(), label, read) for front, store, label, read in _views if store() is cache]
    row["uses"] = uses
    if extra:
        row["more_uses"] = extra
    row["views"] = []
    for front, label, read in views:
        if front is None:
            continue
        try:
            row["views"].append({"label": label, **dict(read(front))})
        except Exception as exc:
            row["views"].append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
    row["parts"] = [part.name for part in parts]
    row["shared"] = cache.shared_storage
    return row


def cache_inventory(limit: int = MAX_LISTED) -> tuple[list[dict[str, Any]], int]:
    """``(rows, not_listed)``: one row per live cache that is not a part of another, busiest first.

    A row is the cache's stats plus ``name``, ``type``, ``uses`` (what stores into it), ``views``
    (front ends with their own counters) and ``parts`` (the tiers it is built from, not listed apart).
    """
    caches = list(iter_caches())
    parts_of = {id(cache): _parts(cache) for cache in caches}
    inner = {id(part) for parts in parts_of.values() for part in parts}
    rows = [_row(cache, parts_of[id(cache)]) for cache in caches if id(cache) not in inner]
    rows.extend(_foreign_rows())
    rows.sort(key=lambda r: (-(int(r.get("hits") or 0) + int(r.get("misses") or 0)), str(r["name"])))
    return rows[:limit], max(0, len(rows) - limit)


_last_lookups: tuple[float, tuple[int, int]] = (-1.0, (0, 0))


def cache_lookups() -> tuple[int, int]:
    """``(hits, misses)`` summed over the live caches that are not parts of another (read at most once
    per 50 ms: the profiler's hit and miss gauges ask one after the other)."""
    global _last_lookups
    now = time.monotonic()
    at, totals = _last_lookups
    if 0.0 <= now - at < 0.05:
        return totals
    caches = list(iter_caches())
    inner = {id(part) for cache in caches for part in _parts(cache)}
    hits = misses = 0
    for cache in caches:
        if id(cache) in inner:
            continue
        try:
            cache_hits, cache_misses = cache.lookups()
        except Exception:
            continue
        hits += cache_hits
        misses += cache_misses
    _last_lookups = (now, (hits, misses))
    return hits, misses
