"""Turn a cache's stats and estimated miss-ratio curve into a score and recommendations with numbers."""

from __future__ import annotations

from typing import Any

from kotoba_memory.cache_manager.types import CacheAnalysis, CacheStats

__all__ = ["analyze_cache"]

# Below this many lookups the rates are too noisy to recommend anything.
_MIN_REQUESTS = 200
# Bookkeeping advice needs entries enough that the per-entry figure is not the cache's fixed tables
# divided by a handful, and bookkeeping big enough to be worth acting on.
_MIN_ENTRIES_FOR_OVERHEAD = 100
_MIN_OVERHEAD_BYTES = 1 << 20


def _fmt_capacity(stats: CacheStats, capacity: int) -> str:
    if stats.max_bytes is not None:
        return f"{capacity / 2**20:.1f} MiB" if capacity >= 2**20 else f"{capacity} bytes"
    return f"{capacity} entries"


def analyze_cache(
    stats: CacheStats, curve: dict[int, float], details: dict[str, Any], callback_errors: int = 0
) -> CacheAnalysis:
    """Score a cache and recommend changes.

    ``cache_effectiveness`` is the hit rate scaled by the share of the cache's memory that holds values
    rather than bookkeeping: 1.0 would be every lookup served with no overhead.
    """
    held = stats.bytes + stats.metadata_bytes
    byte_efficiency = stats.bytes / held if held else 1.0
    effectiveness = round(stats.hit_rate * byte_efficiency, 4)
    recs: list[str] = []
    requests = stats.requests
    capacity = stats.max_bytes if stats.max_bytes is not None else stats.max_entries
    if requests >= _MIN_REQUESTS and capacity and len(curve) > 1:
        sizes = sorted(curve)
        largest = sizes[-1]
        now_rate = 1.0 - curve[sizes[0]]
        later_rate = 1.0 - curve[largest]
        factor = largest / capacity
        gain = later_rate - now_rate
        size_text = _fmt_capacity(stats, largest)
        # With frequency-based admission a bigger cache also changes what gets admitted, which the
        # ghost estimate cannot see: for those policies it is a lower bound.
        bound = "at least " if stats.policy in ("adaptive", "lfu") else "about "
        if gain >= 0.02:
            recs.append(
                f"At {factor:.1f}x the size ({size_text}) the hit rate would be {bound}{later_rate:.1%} "
                f"instead of {now_rate:.1%} (+{gain * 100:.1f} points, estimated from evicted keys "
                "that were requested again)."
            )
        elif stats.evictions > 0:
            recs.append(
                f"At {factor:.1f}x the size ({size_text}) the hit rate would be {bound}{later_rate:.1%} "
                f"(+{gain * 100:.1f} points): more memory would barely help; the misses are first-time "
                "or long-reuse keys."
            )
    if requests >= _MIN_REQUESTS and stats.hit_rate < 0.2 and stats.evictions == 0:
        recs.append(
            f"Hit rate is {stats.hit_rate:.1%} with no evictions: the cache is not too small; the keys are "
            "rarely requested twice (check the key scheme, or the ttl if expirations are high)."
        )
    if stats.puts and stats.expirations / stats.puts > 0.3:
        recs.append(
            f"{stats.expirations / stats.puts:.0%} of stored entries expired ({stats.expirations} of "
            f"{stats.puts} puts): if the data allows, a longer ttl would turn some misses into hits."
        )
    if stats.rejections:
        recs.append(
            f"{stats.rejections} puts were refused as larger than max_bytes={stats.max_bytes}: raise the "
            "bound or store such values elsewhere (e.g. a disk tier)."
        )
    if (
        stats.bytes
        and stats.metadata_overhead > 0.25
        and stats.entries >= _MIN_ENTRIES_FOR_OVERHEAD
        and stats.metadata_bytes >= _MIN_OVERHEAD_BYTES
    ):
        per_entry = stats.metadata_bytes / max(stats.entries, 1)
        avg_value = stats.bytes / max(stats.entries, 1)
        recs.append(
            f"Bookkeeping is {stats.metadata_overhead:.0%} of the cached bytes (~{per_entry:.0f} bytes per "
            f"entry for values averaging {avg_value:.0f} bytes): cache fewer, larger values."
        )
    if callback_errors:
        recs.append(f"{callback_errors} eviction-listener calls raised; see the log for tracebacks.")
    window = details.get("window_fraction")
    if window is not None:
        recs.append(
            f"The adaptive policy currently gives {window:.0%} of the capacity to its recency window "
            f"({'recency' if window > 0.3 else 'frequency'}-leaning workload)."
        )
    return CacheAnalysis(
        stats=stats,
        cache_effectiveness=effectiveness,
        recommendations=recs,
        miss_ratio_curve=dict(curve),
    )
