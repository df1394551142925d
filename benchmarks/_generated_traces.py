"""Generated key traces with strong short-term recency, for the hit-rate benchmark's held-out check.

The issue behind ADAPTIVE's window adaptation reports a storage trace with strong short-term recency on
which W-TinyLFU-style caches fall behind LRU at a few hundred entries; that trace is not available here,
so these generators make traces of that kind from fixed seeds (no real data is copied).
"""

from __future__ import annotations

import bisect
import itertools
import random


def recency_trace(
    seed: int,
    n: int = 200_000,
    *,
    p_recent: float = 0.6,
    depth: float = 40.0,
    universe: int = 50_000,
    zipf: float = 0.8,
    unique: float = 0.15,
) -> list[int]:
    """A stack-distance trace: with ``p_recent`` a request repeats one of the last keys (reuse depth
    exponential with mean ``depth``), with ``unique`` it is a key never seen again before, else Zipf."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(1.0 / (i + 1) ** zipf for i in range(universe)))
    total = cumulative[-1]
    history: list[int] = []
    out: list[int] = []
    fresh = universe
    for _ in range(n):
        r = rng.random()
        if history and r < p_recent:
            key = history[-min(len(history), 1 + int(rng.expovariate(1.0 / depth)))]
        elif r < p_recent + unique:
            key, fresh = fresh, fresh + 1
        else:
            key = bisect.bisect_left(cumulative, rng.random() * total)
        out.append(key)
        history.append(key)
        if len(history) > 5_000:
            del history[:1_000]
    return out


def phased_trace(seed: int, n: int = 200_000, phase: int = 20_000) -> list[int]:
    """Phases of ``phase`` requests that alternate between a frequency-heavy Zipf mix and a recency-heavy
    mix over disjoint keys, so the window must swing between small and large."""
    out: list[int] = []
    for i in range(n // phase):
        if i % 2:
            part = recency_trace(seed + i, phase, p_recent=0.85, depth=30, unique=0.1)
        else:
            part = recency_trace(seed + i, phase, p_recent=0.05, unique=0.2, zipf=1.0)
        out.extend(key + (i % 2) * 10_000_000 for key in part)
    return out


def generated_traces(limit: int | None = None) -> dict[str, list[int]]:
    """Name -> keys of every generated trace (the first ``limit`` requests of each)."""
    traces = {
        "gen-recency": recency_trace(1),
        "gen-recency-deep": recency_trace(1, p_recent=0.5, depth=100, unique=0.3),
        "gen-phased": phased_trace(7),
    }
    return {name: keys[:limit] if limit else keys for name, keys in traces.items()}
