"""``MemoryOptimizer``: starts and stops everything a :class:`MemoryConfig` turns on, and reports on it.

It owns one MemoryProfiler (sampling + leak detection), one GcOptimizer, and, when enabled, a
MemoryPool and a CacheManager sized from the config (the cache is built when first used through
``optimizer.cache``, so an app whose caches live elsewhere carries no idle one). Components are
imported when first enabled, so ``import kotoba_memory.optimizer`` stays cheap; the process layer
holds which optimizer is running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from kotoba_memory.config import MemoryConfig
from kotoba_memory.errors import ConfigError, KotobaMemoryError
from kotoba_memory.memory_profiler import MemoryAnalysis, MemoryProfiler
from kotoba_memory.process import forks, registry, scheduler
from kotoba_memory.process import memory as process_memory
from kotoba_memory.report import MemoryBrief, MemoryReport, MemoryStats, to_plain

if TYPE_CHECKING:
    from kotoba_memory.cache_manager import CacheManager
    from kotoba_memory.gc_optimizer import GcOptimizer
    from kotoba_memory.memory_pool import MemoryPool

__all__ = ["MemoryOptimizer", "MemoryReport", "MemoryStats", "OptimizerError", "get_active_optimizer"]

logger = logging.getLogger(__name__)
_MIB = 1024 * 1024


def _cache_lookups() -> tuple[int, int]:
    """Hits and misses summed over the live caches that are not parts of another cache."""
    from kotoba_memory.cache_manager.inventory import cache_lookups

    return cache_lookups()


def _with_source(leak: dict[str, Any]) -> dict[str, Any]:
    """A leak suspect with the text of its allocation site (read here, where the source is)."""
    from kotoba_memory.report_format import source_line

    leak["source_line"] = source_line(leak.get("allocation_site"))
    return leak


class OptimizerError(KotobaMemoryError, RuntimeError):
    """The optimizer was asked for something it cannot do in its current state."""


def get_active_optimizer() -> MemoryOptimizer | None:
    """The most recently started MemoryOptimizer that is still running, if any.

    In a forked child this is the optimizer it inherited; asking for it resumes its background work.
    """
    optimizer: MemoryOptimizer | None = registry.active("optimizer")
    if optimizer is not None:
        scheduler.resume()
    return optimizer


def detect_allocator() -> str:
    """The malloc this process runs on: ``jemalloc`` or ``mimalloc`` when loaded, else ``system``."""
    from kotoba_memory.allocators import detect_allocator as detect

    try:
        return str(detect().type.value).lower()
    except OSError:
        return "system"


class MemoryOptimizer:
    """Runs the memory features a :class:`MemoryConfig` enables; ``stop()`` returns a MemoryReport."""

    def __init__(self, config: MemoryConfig | None = None) -> None:
        if config is None:
            config = MemoryConfig()
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        self.config = config
        self.profiler: MemoryProfiler | None = None
        self.gc_optimizer: GcOptimizer | None = None
        self._cache: CacheManager | None = None
        self.pool: MemoryPool | None = None
        self.allocator: dict[str, Any] = {}
        self._notes: list[str] = []
        self._lock = threading.RLock()
        self._started_at = 0.0
        self._start_rss = 0
        self._running = False
        self._owns_gc = False
        forks.register(self.reinit_after_fork, name="optimizer")

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._running

    def start(self) -> None:
        """Create and start every enabled feature (no-op when already running)."""
        with self._lock:
            if self._running:
                return
            self._notes = []
            self._started_at = time.time()
            process_memory.reset_peak()
            self._start_rss = self._rss()
            cfg = self.config
            if (cfg.enable_pooling or (cfg.enable_custom_allocators and cfg.allocator_name == "custom")) and (
                self.pool is None
            ):
                self.pool = self._make_pool()
            self.allocator = self._allocator_info()
            if cfg.enable_gc_optimization:
                self._start_gc_optimizer()
            if cfg.enable_profiling:
                self.profiler = MemoryProfiler(
                    sample_interval_s=cfg.monitoring_interval_ms / 1000.0,
                    leak_detection=cfg.enable_leak_detection,
                    window_s=cfg.leak_window_s,
                    window_interval_s=cfg.leak_window_interval_s,
                    trace_budget=cfg.leak_trace_budget,
                    memory_limit_bytes=cfg.memory_limit_mb * _MIB if cfg.memory_limit_mb else None,
                )
                self._register_gauges(self.profiler)
                self.profiler.start()
            self._running = True
        registry.claim("optimizer", self)

    def stop(self) -> MemoryReport:
        """Stop every feature, restore the GC settings, and return the run's report.

        When ``config.report_dir`` is set the report is also written there as report.html/report.json.
        """
        with self._lock:
            if not self._running:
                raise OptimizerError("stop() called on a MemoryOptimizer that is not running")
            report = self._build_report()
            if self.profiler is not None:
                self.profiler.stop()
            if self.gc_optimizer is not None and self._owns_gc:
                try:
                    self.gc_optimizer.stop()
                except Exception:
                    logger.warning("kotoba-memory: GC optimizer failed to stop cleanly", exc_info=True)
            self._running = False
        registry.release("optimizer", self)
        if self.config.report_dir is not None:
            report.write_html(self.config.report_dir / "report.html")
            report.write_json(self.config.report_dir / "report.json")
        return report

    def report(self) -> MemoryReport:
        """A report of the run so far, without stopping anything."""
        scheduler.resume()
        with self._lock:
            if not self._running:
                raise OptimizerError("report() needs a running MemoryOptimizer; stop() returns the final one")
            return self._build_report()

    def brief(self) -> MemoryBrief:
        """The run's counters without building a report: cheap enough for a task every few seconds."""
        if not self._running:
            raise OptimizerError("brief() needs a running MemoryOptimizer")
        profiler, routes, leaks, status = self.profiler, [], [], None
        if profiler is not None:
            routes = [r.to_dict() for r in profiler.routes()]
            found, verdict = profiler.leak_verdict()
            leaks = [leak.to_dict() for leak in found]
            status = to_plain(verdict)
        gc_data: dict[str, Any] | None = None
        if self.gc_optimizer is not None:
            try:
                gc_data = self.gc_optimizer.summary()
            except Exception:
                logger.debug("kotoba-memory: reading the GC counters failed", exc_info=True)
        caches, _ = self._caches()
        cache_data = to_plain(self._cache_stats())
        return MemoryBrief(
            stats=self.memory_stats(),
            routes=routes,
            gc=gc_data,
            profiler=to_plain(profiler.stats()) if profiler is not None else None,
            leaks=leaks,
            leak_status=status,
            cache=cache_data if isinstance(cache_data, dict) else None,
            caches=to_plain(caches),
        )

    async def astart(self) -> None:
        """Async twin of :meth:`start`."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> MemoryReport:
        """Async twin of :meth:`stop` (thread joins happen off the event loop)."""
        return await asyncio.to_thread(self.stop)

    async def areport(self) -> MemoryReport:
        """Async twin of :meth:`report`."""
        return await asyncio.to_thread(self.report)

    async def abrief(self) -> MemoryBrief:
        """Async twin of :meth:`brief` (it reads /proc and takes the components' locks)."""
        return await asyncio.to_thread(self.brief)

    def __enter__(self) -> MemoryOptimizer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._running:
            self.stop()

    @property
    def cache(self) -> CacheManager | None:
        """The optimizer's own ``CacheManager`` (``cache_size_mb``, ``cache_policy``), built on first use;
        None when ``enable_caching`` is off."""
        if self._cache is None and self.config.enable_caching:
            with self._lock:
                if self._cache is None:
                    self._cache = self._make_cache()
        return self._cache

    # ------------------------------------------------------------------ stats
    def memory_stats(self) -> MemoryStats:
        """Current and peak RSS, and ``memory_efficiency`` (see :class:`MemoryStats` for its definition)."""
        rss = self._rss()
        peak = max(rss, process_memory.peak_rss_bytes())
        cache_bytes = cache_cap = pool_used = pool_cap = None
        hit_rate: float | None = None
        cache_stats = self._cache_stats()
        if cache_stats is not None:
            cache_bytes = int(cache_stats.bytes)
            cache_cap = int(cache_stats.max_bytes) if cache_stats.max_bytes else None
            hit_rate = float(cache_stats.hit_rate)
        pool_stats = self._pool_stats()
        if pool_stats is not None:
            pool_used, pool_cap = int(pool_stats.used_bytes), int(pool_stats.capacity)
        reserved = (cache_cap or 0) + (pool_cap or 0)
        if reserved:
            efficiency = ((cache_bytes or 0) + (pool_used or 0)) / reserved
            basis = "managed"
        else:
            efficiency = rss / peak if peak else 1.0
            basis = "rss/peak"
        pause: float | None = None
        if self.gc_optimizer is not None:
            try:
                pause = self.gc_optimizer.pause_total_ns() / 1e9
            except Exception:
                pause = None
        return MemoryStats(
            current_memory_mb=rss / _MIB,
            peak_memory_mb=peak / _MIB,
            memory_efficiency=min(1.0, max(0.0, efficiency)),
            efficiency_basis=basis,
            rss_bytes=rss,
            peak_rss_bytes=peak,
            cache_bytes=cache_bytes,
            cache_capacity_bytes=cache_cap,
            cache_hit_rate=hit_rate,
            pool_used_bytes=pool_used,
            pool_capacity_bytes=pool_cap,
            gc_pause_total_s=pause,
            uptime_s=time.time() - self._started_at if self._running else 0.0,
        )

    async def amemory_stats(self) -> MemoryStats:
        """Async twin of :meth:`memory_stats` (reads /proc off the event loop)."""
        return await asyncio.to_thread(self.memory_stats)

    # ------------------------------------------------------------------ parts
    def _rss(self) -> int:
        return process_memory.rss_bytes()

    def reinit_after_fork(self) -> None:
        """In a forked child: a new lock, and the run starts over (a worker reports on itself)."""
        self._lock = threading.RLock()
        if self._running:
            self._started_at = time.time()
            self._start_rss = self._rss()

    def _make_cache(self) -> CacheManager:
        from kotoba_memory.cache_manager import CacheManager
        from kotoba_memory.cache_manager.inventory import note_use

        size, policy = self.config.cache_size_mb * _MIB, self.config.cache_policy_name
        cache = CacheManager(max_bytes=size, policy=policy, name="kotoba-memory")
        note_use(cache, "MemoryOptimizer (optimizer.cache)")
        return cache

    def _make_pool(self) -> MemoryPool:
        from kotoba_memory.memory_pool import MemoryPool

        # A full pool hands out heap memory rather than failing the request.
        try:
            return MemoryPool(self.config.pool_size_mb * _MIB, fallback="heap", name="kotoba-memory")
        except ConfigError as exc:  # the reservation cannot be mapped here: name the setting that asked
            raise ConfigError("pool_size_mb", f"{self.config.pool_size_mb} MiB: {exc.reason}") from exc

    def _make_gc_optimizer(self) -> GcOptimizer:
        from kotoba_memory.gc_optimizer import GcOptimizer

        limit = self.config.memory_limit_mb * _MIB if self.config.memory_limit_mb else None
        return GcOptimizer(
            target_memory_usage_percent=self.config.target_memory_usage_percent,
            adaptive=self.config.gc_adaptive,
            monitoring_interval_s=self.config.monitoring_interval_ms / 1000.0,
            memory_limit_bytes=limit,
        )

    def _start_gc_optimizer(self) -> None:
        from kotoba_memory.gc_optimizer import get_active_gc_optimizer

        existing = get_active_gc_optimizer()
        if existing is not None:
            # CPython has one collector: share the optimizer that already tunes it, leave it running.
            self.gc_optimizer, self._owns_gc = existing, False
            self._notes.append("a GcOptimizer was already active: reported on, left running by stop()")
            return
        self.gc_optimizer = self._make_gc_optimizer()
        self.gc_optimizer.start()
        self._owns_gc = True

    def _allocator_info(self) -> dict[str, Any]:
        requested = self.config.allocator_name if self.config.enable_custom_allocators else "system"
        active = detect_allocator()
        info: dict[str, Any] = {"requested": requested, "active": active}
        if requested == "custom":
            info["active"] = f"{active} + kotoba arena pool" if self.pool is not None else active
        elif requested != active:
            # malloc cannot be swapped inside a running interpreter; it has to be preloaded at exec.
            note = (
                f"allocator {requested!r} requested but this process runs {active!r}; "
                f"start it with `kotoba-memory run --allocator {requested} -- ...`"
            )
            info["note"] = note
            self._notes.append(note)
        return info

    def _register_gauges(self, profiler: MemoryProfiler) -> None:
        pool = self.pool
        # Lookups of every live cache, so the report's chart shows the hit rate between samples.
        profiler.add_gauge("cache_hits", lambda: float(_cache_lookups()[0]))
        profiler.add_gauge("cache_misses", lambda: float(_cache_lookups()[1]))
        if pool is not None:
            profiler.add_gauge("pool_used_bytes", lambda: float(pool.stats().used_bytes))

    def _cache_stats(self) -> Any:
        if self._cache is None:
            return None
        try:
            return self._cache.stats()
        except Exception:
            return None

    def _caches(self) -> tuple[list[dict[str, Any]], int]:
        """Every live cache (busiest first) and how many more were left unlisted; -1 when listing failed."""
        from kotoba_memory.cache_manager.inventory import cache_inventory

        try:
            return cache_inventory()
        except Exception:
            logger.warning("kotoba-memory: listing the caches failed", exc_info=True)
            return [], -1

    def _pool_stats(self) -> Any:
        if self.pool is None:
            return None
        try:
            return self.pool.stats()
        except Exception:  # a closed pool has no stats
            return None

    # ------------------------------------------------------------------ report
    def _build_report(self) -> MemoryReport:
        stats = self.memory_stats()
        analysis: MemoryAnalysis | None = self.profiler.analyze() if self.profiler is not None else None
        memory_series: list[tuple[float, float]] = []
        hit_series: list[tuple[float, float]] = []
        if analysis is not None:
            previous: tuple[float, float] | None = None
            for sample in analysis.samples:
                memory_series.append((sample.timestamp, sample.rss_bytes / _MIB))
                gauges = dict(sample.gauges)
                if "cache_hits" not in gauges or "cache_misses" not in gauges:
                    continue
                now = (gauges["cache_hits"], gauges["cache_misses"])
                if previous is not None:
                    hits, misses = now[0] - previous[0], now[1] - previous[1]
                    if hits >= 0 and misses >= 0 and hits + misses > 0:
                        hit_series.append((sample.timestamp, hits / (hits + misses)))
                previous = now
        gc_data: dict[str, Any] | None = None
        pauses: list[tuple[float, float, int]] = []
        if self.gc_optimizer is not None:
            try:
                gc_data = to_plain(self.gc_optimizer.analyze())
                _, events = self.gc_optimizer.events_since(0)
                pauses = [
                    (e.timestamp, e.pause_s * 1000.0, e.generation)
                    for e in events
                    if e.timestamp >= self._started_at
                ]
            except Exception:
                logger.warning("kotoba-memory: GC analysis failed", exc_info=True)
                self._notes.append("GC analysis failed; see the log")
        cache_data = to_plain(self._cache_stats())
        if isinstance(cache_data, dict) and self._cache is not None:
            try:
                analysis_obj = self._cache.analyze()
                cache_data["recommendations"] = list(getattr(analysis_obj, "recommendations", []))
            except Exception:
                pass
        pool_data = to_plain(self._pool_stats())
        caches, unlisted = self._caches()
        notes = list(self._notes)
        if unlisted < 0:
            notes.append("listing the caches failed; see the log")
        elif unlisted:
            notes.append(f"{unlisted} more caches are alive but not listed (the quietest ones)")
        return MemoryReport(
            started_at=self._started_at,
            finished_at=time.time(),
            config=self.config.to_dict(),
            stats=stats,
            memory_series=memory_series,
            gc_pauses=pauses,
            cache_hit_rate_series=hit_series,
            leaks=[_with_source(leak.to_dict()) for leak in analysis.memory_leaks] if analysis else [],
            hotspots=[h.to_dict() for h in analysis.hotspots] if analysis else [],
            temporal=analysis.temporal.to_dict() if analysis else None,
            routes=[to_plain(r) for r in analysis.routes] if analysis else [],
            gc=gc_data,
            cache=cache_data if isinstance(cache_data, dict) else None,
            pool=pool_data if isinstance(pool_data, dict) else None,
            caches=to_plain(caches),
            allocator=dict(self.allocator),
            profiler=to_plain(analysis.stats) if analysis else None,
            leak_status=to_plain(analysis.leak_status) if analysis and analysis.leak_status else None,
            notes=notes,
        )
