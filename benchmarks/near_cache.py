"""Near-cache benchmark: coherence delay between processes, hit latency, outages, tampering.

Every part runs against private redis-servers started by ``tools/local_services.py`` on loopback:

* **invalidation**: one writer process and ``--readers`` reader processes share a namespace. The
  writer puts a new version every few ms and reports when each put returned; each reader reads in a
  loop (``--reader-gap`` seconds between reads; 0 = a busy reader) and notes when it first served each
  version. Per version and reader: the *stale window* = last read that still served an older version -
  put returned (0 when none did; CLOCK_MONOTONIC is system-wide), and the *first serve* delay = first
  read serving it - put returned (this one also counts time the reader was not scheduled at all). Also
  counted: reads that went back to an older version, and reads still serving an older version more
  than 10 ms after the newer put returned.
* **latency**: ns per call of a warm ``NearCache.get`` (L1 hit), a raw redis-py ``GET`` round trip and
  a hit of redis-py's own client-side cache (RESP3 ``CLIENT TRACKING``, ``cache_config=CacheConfig()``),
  run interleaved in rounds; medians of the per-round ratios.
* **outage**: ``get_or_set`` p99 on keys that are in Redis but not in L1 (the L1-miss path of a healthy
  run) vs. the same calls while Redis is SIGSTOPped and while it is killed (the factory reads a row
  from a local SQLite file, the application's own source); every operation's exception is counted;
  after a restart, how long until every one of ``--readers`` processes serves what Redis holds.
* **tampering**: forged payloads of several kinds written straight into Redis, each read once; a
  payload that runs code when unpickled would create a marker file.

    .venv/bin/python benchmarks/near_cache.py                 # full run (about a minute)
    .venv/bin/python benchmarks/near_cache.py --quick         # smaller, for a smoke test
    .venv/bin/python benchmarks/near_cache.py --json out.json
    .venv/bin/python benchmarks/near_cache.py --only invalidation   # one part
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from array import array
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import local_services  # noqa: E402
import redis  # noqa: E402

from kotoba_memory.cache_manager.near import NearCache  # noqa: E402
from kotoba_memory.cache_manager.signing import Signer  # noqa: E402

SECRET = "benchmark-secret"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- invalidation delay between processes ---------------------------------------------------------


def _reader(url: str, namespace: str, versions: int, gap: float, ready: Any, out: Any) -> None:
    cache = NearCache(url, secret=SECRET, namespace=namespace)
    cache.wait_coherent(10)
    ready.put(os.getpid())
    times, values = array("q"), array("q")  # every read: when, and which version it served
    seen, backwards, misses = -1, 0, 0
    deadline = time.monotonic() + 120
    while seen < versions - 1 and time.monotonic() < deadline:
        value = cache.get("v", None)
        now = time.monotonic_ns()
        if value is None:
            misses += 1
        else:
            if value < seen:
                backwards += 1
            seen = max(seen, value)
            if len(times) < 4_000_000:
                times.append(now)
                values.append(value)
        if gap:
            time.sleep(gap)
    stats = cache.stats()
    out.put({"times": times.tobytes(), "values": values.tobytes(), "backwards": backwards, "misses": misses,
             "l1_hits": stats.l1_hits, "redis_hits": stats.redis_hits})
    cache.close()


def invalidation(url: str, readers: int, versions: int, gap: float, spacing: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    namespace = f"bench-inval-{uuid.uuid4().hex[:8]}"
    writer = NearCache(url, secret=SECRET, namespace=namespace)
    writer.wait_coherent(10)
    writer.put("v", -1)
    ready, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(url, namespace, versions, gap, ready, out))
             for _ in range(readers)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)
    time.sleep(0.2)
    acked: dict[int, int] = {}
    for version in range(versions):
        writer.put("v", version)
        acked[version] = time.monotonic_ns()
        time.sleep(spacing)
    results = [out.get(timeout=180) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    writer.clear()
    writer.close()
    delays_ms: list[float] = []
    windows_ms: list[float] = []
    late_reads = backwards = misses = total_reads = 0
    for result in results:
        backwards += result["backwards"]
        misses += result["misses"]
        times, values = array("q"), array("q")
        times.frombytes(result["times"])
        values.frombytes(result["values"])
        reads = list(zip(times, values))
        # version v is served once a read returns v or newer (a busy reader may skip versions)
        cursor = 0
        for version in range(versions):
            while cursor < len(reads) and reads[cursor][1] < version:
                cursor += 1
            if cursor < len(reads):
                delays_ms.append((reads[cursor][0] - acked[version]) / 1e6)
            # how long after the put returned this reader still served an older version
            last_old = reads[cursor - 1][0] if cursor > 0 else 0
            windows_ms.append(max(0.0, (last_old - acked[version]) / 1e6))
        # reads serving version v at a time when a newer version had been acknowledged > 10 ms earlier
        for at, value in reads:
            total_reads += 1
            newer = value + 1
            if newer in acked and at - acked[newer] > 10_000_000:
                late_reads += 1
    return {
        "readers": readers,
        "versions": versions,
        "reader_gap_s": gap,
        "stale_window_ms_p50": _pct(windows_ms, 0.50),
        "stale_window_ms_p99": _pct(windows_ms, 0.99),
        "stale_window_ms_max": max(windows_ms) if windows_ms else float("nan"),
        "first_serve_ms_p50": _pct(delays_ms, 0.50),
        "first_serve_ms_p99": _pct(delays_ms, 0.99),
        "first_serve_ms_max": max(delays_ms) if delays_ms else float("nan"),
        "reads": total_reads,
        "went_backwards": backwards,
        "stale_reads_after_10ms": late_reads,
        "misses": misses,
    }


# -- latency ------------------------------------------------------------------------------------------


def _per_call_ns(fn: Any, n: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - started) / n


def latency(url: str, rounds: int, calls: int) -> dict[str, Any]:
    from redis.cache import CacheConfig
    from redis.connection import CacheProxyConnection

    # redis-py gates its client-side cache on Redis >= 7.4; Debian ships 7.0, whose CLIENT TRACKING
    # (since 6.0) is all the cache uses. The gate is lowered here only, to time redis-py's hit path.
    CacheProxyConnection.MIN_ALLOWED_VERSION = "6.0.0"

    namespace = f"bench-lat-{uuid.uuid4().hex[:8]}"
    near = NearCache(url, secret=SECRET, namespace=namespace)
    near.wait_coherent(10)
    value = {"id": 42, "name": "a cached row", "tags": ["x", "y"], "score": 3.5}
    near.put("k", value)
    raw = redis.Redis.from_url(url)
    raw.set("raw:k", pickle.dumps(value))
    csc = redis.Redis.from_url(url, protocol=3, cache_config=CacheConfig())
    csc.set("csc:k", pickle.dumps(value))
    csc.get("csc:k")
    assert near.get("k") == value and csc.get("csc:k") is not None
    assert csc.get_cache().size == 1  # the value is held client-side: its hits make no round trip
    contenders = {
        "near_l1_hit": lambda: near.get("k"),
        "redis_get": lambda: raw.get("raw:k"),
        "redis_py_csc_hit": lambda: csc.get("csc:k"),
        "redis_py_csc_hit_unpickled": lambda: pickle.loads(csc.get("csc:k")),  # same object out as ours
    }
    per_round: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        names = list(contenders)
        names = names[r % len(names):] + names[: r % len(names)]  # rotate the order every round
        for name in names:
            n = calls if name != "redis_get" else max(calls // 50, 200)
            per_round[name].append(_per_call_ns(contenders[name], n))
    near_stats = near.stats()
    result: dict[str, Any] = {name: statistics.median(v) for name, v in per_round.items()}
    result["ratio_redis_get_over_l1_hit"] = statistics.median(
        g / h for g, h in zip(per_round["redis_get"], per_round["near_l1_hit"])
    )
    result["ratio_csc_hit_over_l1_hit"] = statistics.median(
        c / h for c, h in zip(per_round["redis_py_csc_hit"], per_round["near_l1_hit"])
    )
    result["ratio_csc_unpickled_over_l1_hit"] = statistics.median(
        c / h for c, h in zip(per_round["redis_py_csc_hit_unpickled"], per_round["near_l1_hit"])
    )
    result["near_redis_hits_during_run"] = near_stats.redis_hits  # L1 misses: refills after a flush
    result["near_l1_flushes_during_run"] = near_stats.flushes
    near.clear()
    near.close()
    raw.close()
    csc.close()
    return result


# -- outages ------------------------------------------------------------------------------------------


class _Source:
    """The application's own source: a primary-key lookup in a local SQLite file."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, body TEXT)")
        self.conn.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?)",
                              [(i, f"row {i} " * 8) for i in range(5000)])
        self.conn.commit()

    def load(self, i: int) -> str:
        return str(self.conn.execute("SELECT body FROM rows WHERE id = ?", (i,)).fetchone()[0])


def _timed_calls(cache: NearCache, source: _Source, keys: range, prefix: str) -> tuple[list[float], int]:
    samples: list[float] = []
    failures = 0
    for i in keys:
        started = time.perf_counter_ns()
        try:
            cache.get_or_set(f"{prefix}{i}", lambda i=i: source.load(i), ttl=300)  # type: ignore[misc]
            cache.get(f"{prefix}{i}")
            cache.put(f"w{prefix}{i}", i)
        except Exception:
            failures += 1
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples, failures


def _recovery_reader(url: str, namespace: str, ready: Any, go: Any, out: Any) -> None:
    cache = NearCache(url, secret=SECRET, namespace=namespace)
    cache.wait_coherent(10)
    ready.put(os.getpid())
    go.get()  # Redis was killed meanwhile; the value Redis will hold after its restart is "after"
    failures = 0
    while True:
        try:
            value = cache.get_or_set("shared", lambda: "from-source", ttl=300)
        except Exception:
            failures += 1
            value = None
        if value == "after":
            out.put({"served_at": time.monotonic_ns(), "failures": failures})
            break
        time.sleep(0.001)
    cache.close()


def _wait_recovered(cache: NearCache) -> None:
    deadline = time.monotonic() + 10
    while (cache.breaker_open or not cache.stats().coherent) and time.monotonic() < deadline:
        time.sleep(0.01)


def outage(calls: int, readers: int, rounds: int) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="kotoba-near-bench-")
    source = _Source(os.path.join(workdir, "source.sqlite3"))
    namespace = f"bench-out-{uuid.uuid4().hex[:8]}"
    healthy: list[float] = []
    paused: list[float] = []
    down: list[float] = []
    failures = {"healthy": 0, "paused": 0, "down": 0}
    per_round: list[dict[str, float]] = []
    with local_services.restartable_redis_server() as server:
        cache = NearCache(server.url, secret=SECRET, namespace=namespace, socket_timeout=0.05)
        filler = NearCache(server.url, secret=SECRET, namespace=namespace, name="filler")
        cache.wait_coherent(10)
        filler.wait_coherent(10)
        for r in range(rounds):
            _wait_recovered(filler)
            for i in range(calls):
                filler.put(f"h{r}-{i}", source.load(i % 5000), ttl=300)
            _wait_recovered(cache)
            # healthy: every key is in Redis, none in this process's L1 (written by another cache)
            h, fails = _timed_calls(cache, source, range(calls), f"h{r}-")
            failures["healthy"] += fails
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)
            try:
                p, fails = _timed_calls(cache, source, range(calls), f"p{r}-")
                failures["paused"] += fails
            finally:
                server.proc.send_signal(signal.SIGCONT)
            _wait_recovered(cache)
            server.kill()
            d, fails = _timed_calls(cache, source, range(calls), f"d{r}-")
            failures["down"] += fails
            server.start()
            _wait_recovered(cache)
            healthy += h
            paused += p
            down += d
            per_round.append({"healthy_p99_us": _pct(h, 0.99), "paused_p99_us": _pct(p, 0.99),
                              "down_p99_us": _pct(d, 0.99),
                              "down_over_healthy": _pct(d, 0.99) / _pct(h, 0.99),
                              "paused_over_healthy": _pct(p, 0.99) / _pct(h, 0.99)})
        stats = cache.stats()
        # recovery: readers serving while Redis is down, then Redis comes back holding "after"
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=_recovery_reader, args=(server.url, namespace, ready, go, out))
                 for _ in range(readers)]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get(timeout=60)
        cache.put("shared", "after", ttl=300)  # what Redis holds (AOF) when it comes back
        server.kill()
        for _ in procs:
            go.put(1)
        time.sleep(1.0)  # the readers serve from their source meanwhile
        server.start()
        back_at = time.monotonic_ns()
        served = [out.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        cache.close()
        filler.close()
    source.conn.close()
    return {
        "rounds": rounds,
        "calls_per_phase_per_round": calls,
        "per_round": per_round,
        "median_ratio_down_p99_over_healthy_p99": statistics.median(
            r["down_over_healthy"] for r in per_round
        ),
        "median_ratio_paused_p99_over_healthy_p99": statistics.median(
            r["paused_over_healthy"] for r in per_round
        ),
        "op": "get_or_set + get + put per sample",
        "healthy_l1_miss_p50_us": _pct(healthy, 0.5),
        "healthy_l1_miss_p99_us": _pct(healthy, 0.99),
        "paused_p50_us": _pct(paused, 0.5),
        "paused_p99_us": _pct(paused, 0.99),
        "paused_max_us": max(paused),
        "down_p50_us": _pct(down, 0.5),
        "down_p99_us": _pct(down, 0.99),
        "down_max_us": max(down),
        "failed_operations": failures,
        "redis_errors_counted": stats.redis_errors,
        "breaker_trips": stats.breaker_trips,
        "recovery_readers": readers,
        "recovery_ms_max": max((s["served_at"] - back_at) / 1e6 for s in served),
        "recovery_failures": sum(s["failures"] for s in served),
    }


# -- tampering ----------------------------------------------------------------------------------------


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def tampering(url: str, count: int) -> dict[str, Any]:
    namespace = f"bench-tamper-{uuid.uuid4().hex[:8]}"
    cache = NearCache(url, secret=SECRET, namespace=namespace)
    cache.wait_coherent(10)
    raw = redis.Redis.from_url(url)
    prefix = f"{namespace}:".encode()
    marker_dir = tempfile.mkdtemp(prefix="kotoba-tamper-")
    other = Signer("someone-else", "near-cache")
    kinds = ["unsigned", "random-tag", "other-secret", "moved", "bit-flip", "truncated"]
    written = 0
    for i in range(count):
        kind = kinds[i % len(kinds)]
        key = f"t{i}".encode()
        evil = pickle.dumps(_Marker(os.path.join(marker_dir, f"ran-{i}")))
        if kind == "unsigned":
            data = evil
        elif kind == "random-tag":
            data = b"\x00KS1" + os.urandom(32) + os.urandom(16) + evil
        elif kind == "other-secret":
            data = other.sign(prefix + key, os.urandom(16) + evil)
        else:
            cache.put(f"genuine{i}", {"i": i})
            genuine = raw.get(prefix + f"genuine{i}".encode()) or b""
            if kind == "moved":
                data = genuine
            elif kind == "bit-flip":
                flipped = bytearray(genuine)
                flipped[-1] ^= 0x01
                data = bytes(flipped)
            else:
                data = genuine[:-3]
        raw.set(prefix + key, data)
        written += 1
    refused = sum(1 for i in range(count) if cache.get(f"t{i}", "refused") == "refused")
    executed = len(os.listdir(marker_dir))
    stats = cache.stats()
    cache.clear()
    cache.close()
    raw.close()
    return {"written": written, "refused": refused, "refused_pct": 100.0 * refused / written,
            "executed": executed, "refused_counted": stats.refused, "kinds": kinds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--reader-gap", type=float, default=0.0001)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["invalidation", "latency", "tampering", "outage"],
                        help="run one part only")
    args = parser.parse_args(argv)
    versions = 40 if args.quick else 200
    rounds, calls = (3, 2000) if args.quick else (9, 50_000)
    outage_calls, outage_rounds = (200, 1) if args.quick else (2000, 3)
    results: dict[str, Any] = {"loadavg_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    wanted = {args.only} if args.only else {"invalidation", "latency", "tampering", "outage"}
    with local_services.redis_server() as url:
        readers, gap = args.readers, args.reader_gap
        if "invalidation" in wanted:
            results["invalidation_idle_readers"] = invalidation(url, readers, versions, gap, 0.005)
            results["invalidation_busy_readers"] = invalidation(url, readers, versions, 0.0, 0.005)
        if "latency" in wanted:
            results["latency_ns"] = latency(url, rounds, calls)
        if "tampering" in wanted:
            results["tampering"] = tampering(url, 60 if args.quick else 600)
    if "outage" in wanted:
        results["outage"] = outage(outage_calls, args.readers, outage_rounds)
    results["loadavg_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
