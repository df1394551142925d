"""OpenTelemetry metrics for kotoba-memory.

``instrument()`` creates a meter named ``kotoba-memory`` (with the package version) on the given
``MeterProvider`` or the global one, and registers:

* semantic-convention instruments: ``process.memory.usage`` / ``process.memory.virtual`` (``By``) and
  ``cpython.gc.collections`` / ``cpython.gc.collected_objects`` / ``cpython.gc.uncollectable_objects``
  per ``cpython.gc.generation``, observed from ``gc.get_stats()`` on collection;
* ``kotoba_memory.gc.mode`` (gauge, 1 for the GC optimizer's current mode and 0 for the others, per
  ``kotoba_memory.gc.mode`` with ``kotoba_memory.gc.mode.cause``: why, e.g. ``rss_budget``,
  ``memory_ceiling``, ``long_request``, ``request_boundaries``) and ``kotoba_memory.gc.own_memory``
  (``By``, the optimizer's own bookkeeping), while a GC optimizer is active;
* ``kotoba_memory.gc.pause`` (histogram, ``s``), fed from the active GC optimizer's event ring, drained
  outside gc callbacks (on collection and at most once a second at the end of a request);
* per cache (``kotoba_memory.cache.name``): ``kotoba_memory.cache.hits`` / ``.misses`` / ``.evictions``
  / ``.expirations`` (counters), ``kotoba_memory.cache.size`` (``By``) and ``.entries``;
* per SQLAlchemy query cache: ``kotoba_memory.query_cache.hits`` / ``.misses`` / ``.invalidations``;
* memory pools: ``kotoba_memory.pool.usage`` / ``kotoba_memory.pool.capacity`` (``By``);
* per request (``http.route``, ``http.request.method``: the known methods or ``_OTHER`` as the HTTP
  semantic conventions say, ``http.response.status_code``: only codes in 100..599):
  ``kotoba_memory.http.server.request.rss_growth`` (``By``), ``...traced_allocations`` (``By``, only
  while tracemalloc traces) and ``...gc_pause`` (``s``, only requests a collection hit), recorded by
  the WSGI/ASGI middleware.

Observable instruments read our stats only when a reader collects, so the steady-state cost is one
histogram record per request (~10 us with the SDK); with no SDK configured it goes to the API's
proxy instrument (~0.1 us). ``uninstrument()`` stops all of it (the API cannot delete instruments, so their
callbacks just report nothing afterwards; instrumenting the same provider again revives them).

:class:`MemoryInstrumentor` is an OpenTelemetry contrib ``BaseInstrumentor`` registered under the
``opentelemetry_instrumentor`` entry point, so ``opentelemetry-instrument python app.py`` loads it with
no code change.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from opentelemetry import metrics
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]  # untyped upstream
    BaseInstrumentor,
)
from opentelemetry.metrics import CallbackOptions, Observation

from kotoba_memory._version import __version__
from kotoba_memory.cache_manager import iter_caches
from kotoba_memory.gc_optimizer import get_active_gc_optimizer
from kotoba_memory.gc_optimizer.optimizer import MODES as GC_MODES
from kotoba_memory.optimizer import get_active_optimizer
from kotoba_memory.process import memory as process_memory
from kotoba_memory_integrations.request import (
    RequestMetrics,
    add_request_listener,
    normalize_method,
    remove_request_listener,
)

__all__ = ["METER_NAME", "MemoryInstrumentor", "instrument", "is_instrumented", "uninstrument"]

METER_NAME = "kotoba-memory"
_log = logging.getLogger(__name__)

_BYTE_BUCKETS = (0, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20)
_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_GC_DRAIN_INTERVAL_S = 1.0
_INSTRUMENTS = ("kotoba-memory >= 0.1",)

_Reader = Callable[[], Iterable[Observation]]


def _safe(fn: Callable[[], Iterable[Observation]], counter: list[int]) -> list[Observation]:
    try:
        return list(fn())
    except Exception:  # a metrics callback must never break the host's collection
        counter[0] += 1
        _log.debug("kotoba-memory metrics callback failed", exc_info=True)
        return []


def _iter_caches() -> Iterator[Any]:
    return iter(iter_caches())


def _iter_query_caches() -> Iterator[Any]:
    try:  # the SQLAlchemy integration is an optional extra
        from kotoba_memory_integrations.sqlalchemy import iter_query_caches
    except ImportError:
        return iter(())
    return iter(iter_query_caches())


def _iter_pools() -> Iterator[Any]:
    optimizer = get_active_optimizer()
    pool = getattr(optimizer, "pool", None) if optimizer is not None else None
    return iter(() if pool is None else (pool,))


def _active_gc_optimizer() -> Any:
    return get_active_gc_optimizer()


def _stat(stats: Any, name: str) -> int | float | None:
    value = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


class _Instruments:
    """The instruments of one ``instrument()`` call; inert once ``active`` is cleared."""

    def __init__(self, meter_provider: metrics.MeterProvider | None) -> None:
        self.active = True
        self.callback_errors = [0]
        self._gc_lock = threading.Lock()
        self._gc_source: Any = None
        self._gc_cursor = 0
        self._gc_next_drain = 0.0
        meter = metrics.get_meter(METER_NAME, __version__, meter_provider)
        self.meter = meter

        def observe(fn: _Reader) -> Callable[[CallbackOptions], list[Observation]]:
            def callback(_options: CallbackOptions) -> list[Observation]:
                if not self.active:
                    return []
                return _safe(fn, self.callback_errors)

            return callback

        meter.create_observable_up_down_counter(
            "process.memory.usage", [observe(self._memory_usage)], unit="By",
            description="The amount of physical memory in use.",
        )
        meter.create_observable_up_down_counter(
            "process.memory.virtual", [observe(self._memory_virtual)], unit="By",
            description="The amount of committed virtual memory.",
        )
        # The GC pause histogram is drained first so its points land in the same collection.
        meter.create_observable_counter(
            "cpython.gc.collections", [observe(self._gc_collections)], unit="{collection}",
            description="The number of times a generation was collected since interpreter start.",
        )
        meter.create_observable_counter(
            "cpython.gc.collected_objects", [observe(lambda: self._gc_stat("collected"))],
            unit="{object}", description="Objects collected since interpreter start.",
        )
        meter.create_observable_counter(
            "cpython.gc.uncollectable_objects", [observe(lambda: self._gc_stat("uncollectable"))],
            unit="{object}", description="Objects found uncollectable since interpreter start.",
        )
        meter.create_observable_gauge(
            "kotoba_memory.gc.mode", [observe(self._gc_mode)], unit="1",
            description="1 for the GC optimizer's current mode (and why), 0 for the others.",
        )
        meter.create_observable_up_down_counter(
            "kotoba_memory.gc.own_memory", [observe(self._gc_own_memory)], unit="By",
            description="Bytes held by the GC optimizer's own bookkeeping (event ring, change logs).",
        )
        self.gc_pause = meter.create_histogram(
            "kotoba_memory.gc.pause", unit="s", description="Duration of each GC collection.",
            explicit_bucket_boundaries_advisory=list(_PAUSE_BUCKETS),
        )
        for name, unit, description in (
            ("hits", "{hit}", "Cache lookups that found a live entry."),
            ("misses", "{miss}", "Cache lookups that found nothing."),
            ("evictions", "{entry}", "Entries evicted for size pressure."),
            ("expirations", "{entry}", "Entries that expired."),
        ):
            meter.create_observable_counter(
                f"kotoba_memory.cache.{name}", [observe(self._cache_stat(name))], unit=unit,
                description=description,
            )
        meter.create_observable_up_down_counter(
            "kotoba_memory.cache.size", [observe(self._cache_stat("bytes"))], unit="By",
            description="Bytes held by the cache (its weigher's estimate).",
        )
        meter.create_observable_up_down_counter(
            "kotoba_memory.cache.entries", [observe(self._cache_stat("entries"))], unit="{entry}",
            description="Entries held by the cache.",
        )
        for name in ("hits", "misses", "invalidations"):
            meter.create_observable_counter(
                f"kotoba_memory.query_cache.{name}", [observe(self._query_cache_stat(name))],
                unit="{query}" if name != "invalidations" else "{invalidation}",
                description=f"SQLAlchemy query cache {name}.",
            )
        meter.create_observable_up_down_counter(
            "kotoba_memory.pool.usage", [observe(self._pool_stat("used_bytes"))],
            unit="By", description="Bytes of the memory pool handed out.",
        )
        meter.create_observable_up_down_counter(
            "kotoba_memory.pool.capacity", [observe(self._pool_stat("capacity"))],
            unit="By", description="Bytes the memory pool holds in total.",
        )
        self.request_rss = meter.create_histogram(
            "kotoba_memory.http.server.request.rss_growth", unit="By",
            description="Growth of the process RSS while the request ran (0 when it shrank).",
            explicit_bucket_boundaries_advisory=list(_BYTE_BUCKETS),
        )
        self.request_traced = meter.create_histogram(
            "kotoba_memory.http.server.request.traced_allocations", unit="By",
            description="Net traced allocations of the request (only while tracemalloc traces).",
            explicit_bucket_boundaries_advisory=list(_BYTE_BUCKETS),
        )
        self.request_gc_pause = meter.create_histogram(
            "kotoba_memory.http.server.request.gc_pause", unit="s",
            description="GC pause time inside requests that were hit by a collection (others not recorded).",
            explicit_bucket_boundaries_advisory=list(_PAUSE_BUCKETS),
        )

    # -- observable callbacks -------------------------------------------------------------------
    def _memory_usage(self) -> Iterator[Observation]:
        yield Observation(process_memory.rss_bytes())

    def _memory_virtual(self) -> Iterator[Observation]:
        yield Observation(process_memory.virtual_memory_bytes())

    def _gc_collections(self) -> Iterator[Observation]:
        self.drain_gc_events(force=True)
        for generation, stats in enumerate(gc.get_stats()):
            yield Observation(stats["collections"], {"cpython.gc.generation": generation})

    def _gc_mode(self) -> Iterator[Observation]:
        optimizer = _active_gc_optimizer()
        if optimizer is None:
            return
        current, _ = optimizer.mode
        cause = str(optimizer.mode_cause)
        for mode in GC_MODES:
            attributes = {"kotoba_memory.gc.mode": mode}
            if mode == current:
                attributes["kotoba_memory.gc.mode.cause"] = cause
            yield Observation(1 if mode == current else 0, attributes)

    def _gc_own_memory(self) -> Iterator[Observation]:
        optimizer = _active_gc_optimizer()
        if optimizer is not None:
            yield Observation(int(optimizer.own_memory_bytes()))

    def _gc_stat(self, key: str) -> Iterator[Observation]:
        for generation, stats in enumerate(gc.get_stats()):
            yield Observation(stats[key], {"cpython.gc.generation": generation})

    def _cache_stat(self, field: str) -> Callable[[], Iterator[Observation]]:
        def read() -> Iterator[Observation]:
            for cache in _iter_caches():
                value = _stat(cache.stats(), field)
                if value is not None:
                    yield Observation(value, {"kotoba_memory.cache.name": str(cache.name)})

        return read

    def _query_cache_stat(self, field: str) -> Callable[[], Iterator[Observation]]:
        def read() -> Iterator[Observation]:
            for cache in _iter_query_caches():
                stats = cache.stats()
                attributes = {"kotoba_memory.cache.name": str(stats.name)}
                if field != "invalidations":
                    yield Observation(getattr(stats, field), attributes)
                    continue
                # Per table (semconv's db.collection.name); invalidate_all() counts under "*".
                for table, count in stats.invalidations.items():
                    yield Observation(count, {**attributes, "db.collection.name": str(table)})
                yield Observation(stats.global_invalidations, {**attributes, "db.collection.name": "*"})

        return read

    def _pool_stat(self, field: str) -> Callable[[], Iterator[Observation]]:
        def read() -> Iterator[Observation]:
            for pool in _iter_pools():
                if getattr(pool, "closed", False):
                    continue
                value = _stat(pool.stats(), field)
                if value is not None:
                    yield Observation(value, {"kotoba_memory.pool.name": str(pool.name)})

        return read

    # -- recording --------------------------------------------------------------------------------
    def drain_gc_events(self, *, force: bool = False) -> int:
        """Record GC pauses the active optimizer saw since the last drain; returns how many."""
        if not self.active:
            return 0
        now = time.monotonic()
        if not force and now < self._gc_next_drain:
            return 0
        if not self._gc_lock.acquire(blocking=False):
            return 0  # someone else is draining right now
        try:
            self._gc_next_drain = now + _GC_DRAIN_INTERVAL_S
            optimizer = _active_gc_optimizer()
            if optimizer is None:
                return 0
            if optimizer is not self._gc_source:
                self._gc_source, self._gc_cursor = optimizer, 0
            self._gc_cursor, events = optimizer.events_since(self._gc_cursor)
            for event in events:
                self.gc_pause.record(float(event.pause_s), {"cpython.gc.generation": int(event.generation)})
            return len(events)
        except Exception:
            self.callback_errors[0] += 1
            return 0
        finally:
            self._gc_lock.release()

    def on_request(self, result: RequestMetrics) -> None:
        """Record one finished request (the middleware's listener)."""
        if not self.active:
            return
        traced, pause = result.traced_delta, result.gc_pause_ns
        # An unmeasured request (RSS is sampled) adds nothing unless it was traced or a collection hit it.
        if result.sampled or traced is not None or pause:
            # Every attribute has a bounded set of values: route templates (never the raw path), the
            # known methods plus "_OTHER" (clients choose the method), and status codes within 100..599.
            attributes: dict[str, str | int] = {"http.route": result.route,
                                                "http.request.method": normalize_method(result.method)}
            status = result.status
            if status is not None and 100 <= status <= 599:
                attributes["http.response.status_code"] = status
            if result.sampled:
                self.request_rss.record(max(0, result.rss_delta), attributes)
            if traced is not None:
                self.request_traced.record(max(0, traced), attributes)
            if pause:
                # Most requests see no collection; recording their zeros would cost ~10 us each with
                # the SDK and drown the distribution that matters.
                self.request_gc_pause.record(pause / 1e9, attributes)
        self.drain_gc_events()


class MemoryInstrumentor(BaseInstrumentor):
    """The OpenTelemetry contrib instrumentor for kotoba-memory's metrics (a per-process singleton).

    ``MemoryInstrumentor().instrument(meter_provider=None)`` / ``.uninstrument()``, or through the
    ``opentelemetry_instrumentor`` entry point: ``opentelemetry-instrument python app.py``.
    """

    _lock = threading.Lock()
    _instruments: _Instruments | None = None
    # Instruments made per provider: the API cannot delete them, so instrumenting the same provider
    # again reactivates the first set rather than registering duplicates the SDK would ignore.
    _made: list[tuple[weakref.ref[Any] | None, _Instruments]] = []

    def instrumentation_dependencies(self) -> Collection[str]:
        """What is instrumented: kotoba-memory itself (its caches, pools, GC optimizer, middleware)."""
        return _INSTRUMENTS

    @property
    def is_instrumented(self) -> bool:
        """Whether ``instrument()`` is in effect."""
        return self._instruments is not None

    @property
    def callback_errors(self) -> int:
        """How many metric callbacks raised (swallowed so the host's collection goes on)."""
        return self._instruments.callback_errors[0] if self._instruments is not None else 0

    def _instrument(self, **kwargs: Any) -> None:
        provider: metrics.MeterProvider | None = kwargs.get("meter_provider")
        with self._lock:
            if self._instruments is not None:
                return
            instruments = self._instruments_for(provider)
            instruments.active = True
            self._instruments = instruments
            add_request_listener(instruments.on_request)

    def _uninstrument(self, **kwargs: Any) -> None:
        with self._lock:
            instruments, self._instruments = self._instruments, None
            if instruments is not None:
                instruments.active = False
                remove_request_listener(instruments.on_request)

    def _instruments_for(self, provider: metrics.MeterProvider | None) -> _Instruments:
        alive = []
        found = None
        for ref, instruments in type(self)._made:
            target = None if ref is None else ref()
            if ref is not None and target is None:
                continue  # that provider is gone
            alive.append((ref, instruments))
            if target is provider:
                found = instruments
        if found is None:
            found = _Instruments(provider)
            alive.append((None if provider is None else weakref.ref(provider), found))
        type(self)._made = alive
        return found

    def drain_gc_events(self) -> int:
        """Record pending GC pause events now (normally done on collection and at request end)."""
        instruments = self._instruments
        return instruments.drain_gc_events(force=True) if instruments is not None else 0


def instrument(meter_provider: metrics.MeterProvider | None = None) -> MemoryInstrumentor:
    """Report kotoba-memory's metrics to ``meter_provider`` (default: the global provider); idempotent."""
    instrumentor = MemoryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(meter_provider=meter_provider)
    return instrumentor


def uninstrument() -> None:
    """Stop reporting kotoba-memory's metrics; safe to call when not instrumented."""
    instrumentor = MemoryInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def is_instrumented() -> bool:
    """Whether kotoba-memory's metrics are being reported."""
    return MemoryInstrumentor().is_instrumented
