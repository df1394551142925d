"""``MemoryOptimizer``: starts and stops everything a :class:`MemoryConfig` turns on, and reports on it.

It owns one MemoryProfiler (sampling + leak detection), one GcOptimizer, and, when enabled, a
CacheManager and a MemoryPool sized from the config. Components are imported when first enabled, so
``import kotoba_memory.optimizer`` stays cheap; the process layer holds which optimizer is running.
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
from kotoba_memory.report import MemoryReport, MemoryStats, to_plain

if TYPE_CHECKING:
    from kotoba_memory.cache_manager import CacheManager
    from kotoba_memory.gc_optimizer import GcOptimizer
    from kotoba_memory.memory_pool import MemoryPool

__all__ = ["MemoryOptimizer", "MemoryReport", "MemoryStats", "OptimizerError", "get_active_optimizer"]

logger = logging.getLogger(__name__)
_MIB = 1024 * 1024


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
        self.cache: CacheManager | None = None
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
            if cfg.enable_caching and self.cache is None:
                self.cache = self._make_cache()
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

    async def astart(self) -> None:
        """Async twin of :meth:`start`."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> MemoryReport:
        """Async twin of :meth:`stop` (thread joins happen off the event loop)."""
        return await asyncio.to_thread(self.stop)

    async def areport(self) -> MemoryReport:
        """Async twin of :meth:`report`."""
        return await asyncio.to_thread(self.report)

    def __enter__(self) -> MemoryOptimizer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._running:
            self.stop()

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

        size, policy = self.config.cache_size_mb * _MIB, self.config.cache_policy_name
        return CacheManager(max_bytes=size, policy=policy, name="kotoba-memory")

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
        cache, pool = self.cache, self.pool
        if cache is not None:
            profiler.add_gauge("cache_bytes", lambda: float(cache.stats().bytes))
            profiler.add_gauge("cache_hit_rate", lambda: float(cache.stats().hit_rate))
        if pool is not None:
            profiler.add_gauge("pool_used_bytes", lambda: float(pool.stats().used_bytes))

    def _cache_stats(self) -> Any:
        if self.cache is None:
            return None
        try:
            return self.cache.stats()
        except Exception:
            return None

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
            for sample in analysis.samples:
                memory_series.append((sample.timestamp, sample.rss_bytes / _MIB))
                for name, value in sample.gauges:
                    if name == "cache_hit_rate":
                        hit_series.append((sample.timestamp, value))
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
        if isinstance(cache_data, dict) and self.cache is not None:
            try:
                analysis_obj = self.cache.analyze()
                cache_data["recommendations"] = list(getattr(analysis_obj, "recommendations", []))
            except Exception:
                pass
        pool_data = to_plain(self._pool_stats())
        return MemoryReport(
            started_at=self._started_at,
            finished_at=time.time(),
            config=self.config.to_dict(),
            stats=stats,
            memory_series=memory_series,
            gc_pauses=pauses,
            cache_hit_rate_series=hit_series,
            leaks=[leak.to_dict() for leak in analysis.memory_leaks] if analysis else [],
            hotspots=[h.to_dict() for h in analysis.hotspots] if analysis else [],
            temporal=analysis.temporal.to_dict() if analysis else None,
            routes=[to_plain(r) for r in analysis.routes] if analysis else [],
            gc=gc_data,
            cache=cache_data if isinstance(cache_data, dict) else None,
            pool=pool_data if isinstance(pool_data, dict) else None,
            allocator=dict(self.allocator),
            profiler=to_plain(analysis.stats) if analysis else None,
            leak_status=to_plain(analysis.leak_status) if analysis and analysis.leak_status else None,
            notes=list(self._notes),
        )
