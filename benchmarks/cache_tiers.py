"""Cache tiers benchmark: memory-only vs memory-over-disk vs disk-only vs peers on a real sized trace.

Replays a prefix of ``adaptsize-request.sized.gz`` (CDN requests with object sizes): for each request,
``get``; on a miss, ``put`` a generated JSON/HTML-like payload of the traced size. Contenders run
interleaved, segment by segment in rotating order, and the whole replay is repeated with fresh caches;
medians are reported, and latencies as ratios to the memory-only cache.

    .venv/bin/python benchmarks/cache_tiers.py            # 20,000 requests, 3 repeats
    .venv/bin/python benchmarks/cache_tiers.py --quick    # 3,000 requests, 1 repeat
    .venv/bin/python benchmarks/cache_tiers.py --with-redis   # also a RedisCache on a private server
"""

from __future__ import annotations

import argparse
import contextlib
import dbm.dumb
import gzip
import json
import os
import random
import shelve
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = REPO.parent / "shared" / "traces"
TRACE = "adaptsize-request.sized.gz"
SEGMENT = 500

from kotoba_memory.cache_manager.compression import Compressor, available_codecs  # noqa: E402
from kotoba_memory.cache_manager.disk import DiskCache  # noqa: E402
from kotoba_memory.cache_manager.memory import CacheManager  # noqa: E402
from kotoba_memory.cache_manager.tiers import TieredCache  # noqa: E402

_WORDS_TEXT = (
    "the of and to in is for on that with as by this from at are be or it an was have not your all can "
    "more has one will about new which their what other our time page home search free only information "
    "also these may when use contact product service news price data online order list user account email "
    "shipping details review help item total update customer result report"
)
_WORDS = _WORDS_TEXT.split()


def load_trace(traces: Path, limit: int | None) -> list[tuple[int, int]]:
    """(key, size) pairs of the trace prefix."""
    rows: list[tuple[int, int]] = []
    with gzip.open(traces / TRACE, "rt") as fh:
        for line in fh:
            key, size = line.split()
            rows.append((int(key), max(int(size), 1)))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def make_corpora(seed: int = 1) -> tuple[str, str]:
    """HTML-like and JSON-like texts of ~1 MiB each from a small vocabulary: they compress like real pages."""
    rng = random.Random(seed)
    html_parts: list[str] = []
    total = 0
    while total < 1 << 20:
        words = " ".join(rng.choices(_WORDS, k=rng.randint(5, 30)))
        tag = rng.choice(("p", "li", "td", "span", "h2", "a"))
        part = f'<{tag} class="{rng.choice(_WORDS)}-{rng.randint(1, 40)}">{words}</{tag}>\n'
        html_parts.append(part)
        total += len(part)
    json_parts: list[str] = []
    total = 0
    while total < 1 << 20:
        record = {
            "id": rng.randint(1, 10**7),
            "name": " ".join(rng.choices(_WORDS, k=3)),
            "price": round(rng.random() * 500, 2),
            "tags": rng.choices(_WORDS, k=rng.randint(1, 5)),
            "active": rng.random() < 0.5,
        }
        part = json.dumps(record) + ",\n"
        json_parts.append(part)
        total += len(part)
    return "".join(html_parts), "".join(json_parts)


class Payloads:
    """Deterministic per-key payloads of a given size, cut from the corpora at a key-dependent offset."""

    def __init__(self) -> None:
        self.html, self.json = make_corpora()

    def __call__(self, key: int, size: int) -> str:
        corpus = self.html if key % 2 else self.json
        header = f"{key}:"
        need = max(size - len(header), 0)
        start = (key * 7919) % (len(corpus) - 1)
        body = (corpus[start:] + corpus) * (need // len(corpus) + 1)
        return header + body[:need]


@dataclass
class Result:
    hits: int = 0
    requests: int = 0
    hit_ns: list[int] = field(default_factory=list)
    miss_ns: list[int] = field(default_factory=list)
    put_ns: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Contender:
    """A named cache under test: ``get(key)`` (None on a miss), ``put(key, value)``, ``report()``."""

    def __init__(self, name: str, get: Callable[[int], Any], put: Callable[[int, str], Any],
                 report: Callable[[], dict[str, Any]], close: Callable[[], None]) -> None:
        self.name, self.get, self.put, self.report, self.close = name, get, put, report, close


def build_contenders(
    workdir: Path,
    memory_bytes: int,
    disk_bytes: int,
    redis_url: str | None = None,
    redis_label: str = "RedisCache (the server's own bound)",
) -> list[Contender]:
    out: list[Contender] = []

    small = CacheManager(max_bytes=memory_bytes, policy="lru", name="bench-memory")
    out.append(Contender("memory-only (RAM = M)", small.get, small.put,
                         lambda: {"ram_bytes": small.stats().bytes}, lambda: None))

    big = CacheManager(max_bytes=memory_bytes + disk_bytes, policy="lru", name="bench-memory-big")
    out.append(Contender("memory-only (RAM = M+D)", big.get, big.put,
                         lambda: {"ram_bytes": big.stats().bytes}, lambda: None))

    codec = "zstd" if "zstd" in available_codecs() else "zlib"
    tiered = TieredCache(
        CacheManager(max_bytes=memory_bytes, policy="lru", name="bench-l1"),
        DiskCache(workdir / "tiered", disk_bytes, compression=codec, name="bench-l2"),
        name="bench-tiered",
    )

    def tiered_report() -> dict[str, Any]:
        s = tiered.stats()
        return {"ram_bytes": s.memory.bytes, "disk_bytes": s.disk.bytes,
                "compression_ratio": s.compression_ratio, "memory_hit_share":
                s.memory_hits / s.hits if s.hits else 0.0}

    out.append(Contender(f"tiered M + disk D ({codec})", tiered.get, tiered.put, tiered_report, tiered.close))

    for compression in (codec, None):
        disk = DiskCache(workdir / f"disk-{compression}", disk_bytes, compression=compression)

        def disk_report(disk: DiskCache = disk) -> dict[str, Any]:
            s = disk.stats()
            return {"disk_bytes": s.bytes, "compression_ratio": s.compression_ratio}

        label = f"DiskCache D ({compression or 'raw'})"
        out.append(Contender(label, disk.get, disk.put, disk_report, disk.close))

    try:
        import diskcache
    except ImportError:
        print("diskcache not installed: peer skipped", file=sys.stderr)
    else:
        peer = diskcache.Cache(str(workdir / "diskcache"), size_limit=disk_bytes,
                               eviction_policy="least-recently-used")
        out.append(Contender("diskcache.Cache D (LRU)", peer.get, peer.set,
                             lambda: {"disk_bytes": peer.volume()}, peer.close))

    # Closed by the contender's close(), after the replay.
    shelf = shelve.Shelf(dbm.dumb.open(str(workdir / "shelf"), "c"), protocol=5)  # noqa: SIM115

    def shelf_get(key: int) -> Any:
        return shelf.get(str(key))

    def shelf_put(key: int, value: str) -> None:
        shelf[str(key)] = value

    out.append(Contender("shelve/dbm.dumb (unbounded)", shelf_get, shelf_put,
                         lambda: {"disk_bytes": (workdir / "shelf.dat").stat().st_size}, shelf.close))
    if redis_url is not None:
        from kotoba_memory.cache_manager.redis_tier import RedisCache

        shared = RedisCache(redis_url, prefix=f"kotoba-bench-{os.getpid()}:")
        shared.clear()

        def redis_close() -> None:
            shared.clear()
            shared.close()

        out.append(Contender(redis_label, shared.get, shared.put, lambda: {}, redis_close))
    return out


@contextlib.contextmanager
def private_redis(disk_bytes: int) -> Iterator[str]:
    """A redis-server on loopback from the test tooling, bounded like the disk tier (allkeys-lru)."""
    sys.path.insert(0, str(REPO / "tools"))
    import local_services
    import redis

    with local_services.redis_server() as url:
        client = redis.Redis.from_url(url)
        client.config_set("maxmemory", str(disk_bytes))
        client.config_set("maxmemory-policy", "allkeys-lru")
        client.close()
        yield url


def replay(contenders: list[Contender], trace: list[tuple[int, int]], payload: Payloads) -> dict[str, Result]:
    results = {c.name: Result() for c in contenders}
    perf = time.perf_counter_ns
    for seg_no, start in enumerate(range(0, len(trace), SEGMENT)):
        segment = trace[start : start + SEGMENT]
        # Generate outside the timed calls, once per segment, shared by every contender.
        values = {key: payload(key, size) for key, size in segment}
        shift = seg_no % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            res = results[contender.name]
            get, put = contender.get, contender.put
            for key, _size in segment:
                t0 = perf()
                got = get(key)
                t1 = perf()
                res.requests += 1
                if got is not None:
                    res.hits += 1
                    res.hit_ns.append(t1 - t0)
                else:
                    res.miss_ns.append(t1 - t0)
                    t2 = perf()
                    put(key, values[key])
                    res.put_ns.append(perf() - t2)
    for contender in contenders:
        results[contender.name].extra = contender.report()
    return results


def compression_table(trace: list[tuple[int, int]], payload: Payloads, sample: int) -> list[dict[str, Any]]:
    """Ratio and speed of each codec over a sample of the trace's payloads (pickled, as DiskCache does)."""
    import pickle

    rng = random.Random(5)
    picked = rng.sample(trace, min(sample, len(trace)))
    blobs = [pickle.dumps(payload(k, s), protocol=pickle.HIGHEST_PROTOCOL) for k, s in picked]
    rows = []
    for codec in available_codecs():
        runs = []
        for _ in range(3):
            compressor = Compressor(codec, min_bytes=0)
            t0 = time.perf_counter_ns()
            for blob in blobs:
                compressor.pack(blob)
            runs.append(time.perf_counter_ns() - t0)
        stats = compressor.stats()
        total_kib = sum(map(len, blobs)) / 1024
        rows.append({"codec": codec, "ratio": stats.ratio, "ns_per_kib": statistics.median(runs) / total_kib,
                     "stored_raw": stats.values_stored_raw, "values": len(blobs)})
    return rows


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    parser.add_argument("--quick", action="store_true", help="3,000 requests, 1 repeat")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--memory-share", type=float, default=0.05, help="M as a share of the working set")
    parser.add_argument("--disk-share", type=float, default=0.30, help="D as a share of the working set")
    parser.add_argument("--compression-sample", type=int, default=None, help="payloads in the codec table")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    redis_group = parser.add_mutually_exclusive_group()
    redis_group.add_argument("--redis-url", default=None, help="also measure a RedisCache on this server")
    redis_group.add_argument("--with-redis", action="store_true",
                             help="start a private redis-server (maxmemory = D, allkeys-lru) and measure it")
    args = parser.parse_args(argv)
    if not (args.traces / TRACE).exists():
        print(f"trace {TRACE} not found under {args.traces}: pass --traces DIR", file=sys.stderr)
        return 2
    n = args.requests or (3_000 if args.quick else 20_000)
    repeats = args.repeats or (1 if args.quick else 3)
    trace = load_trace(args.traces, n)
    payload = Payloads()
    sizes = dict(trace)
    working_set = sum(sizes.values())
    memory_bytes = max(int(working_set * args.memory_share), 1 << 16)
    disk_bytes = max(int(working_set * args.disk_share), 1 << 18)
    print(f"{TRACE}: {len(trace)} requests, {len(sizes)} objects, working set {working_set / 2**20:.1f} MiB; "
          f"M = {memory_bytes / 2**20:.1f} MiB, D = {disk_bytes / 2**20:.1f} MiB; {repeats} repeat(s)")

    per_repeat: list[dict[str, Result]] = []
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url
        if args.with_redis:
            redis_url = stack.enter_context(private_redis(disk_bytes))
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="kotoba-tiers-") as tmp:
                contenders = build_contenders(
                    Path(tmp), memory_bytes, disk_bytes, redis_url,
                    "RedisCache (maxmemory D, allkeys-lru)" if args.with_redis else "RedisCache",
                )
                try:
                    per_repeat.append(replay(contenders, trace, payload))
                finally:
                    for c in contenders:
                        with contextlib.suppress(Exception):
                            c.close()

    names = list(per_repeat[0])
    base = names[0]
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = [r[name] for r in per_repeat]
        summary[name] = {
            "hit_rate": _median([r.hits / r.requests for r in runs]),
            "get_hit_ns": _median([_median(r.hit_ns) for r in runs]),
            "get_miss_ns": _median([_median(r.miss_ns) for r in runs]),
            "put_ns": _median([_median(r.put_ns) for r in runs]),
            **{k: v for k, v in runs[-1].extra.items() if v is not None},
        }
    ref = summary[base]
    print()
    print("| contender | hit rate | get hit (median ns) | get miss | put | hit latency vs memory | "
          "compression | disk MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        ratio = s["get_hit_ns"] / ref["get_hit_ns"]
        comp = s.get("compression_ratio")
        disk = s.get("disk_bytes")
        extra = ""
        if "memory_hit_share" in s:
            extra = f" ({s['memory_hit_share']:.0%} of hits from RAM)"
        print(f"| {name} | {s['hit_rate']:.2%}{extra} | {s['get_hit_ns']:,.0f} | {s['get_miss_ns']:,.0f} | "
              f"{s['put_ns']:,.0f} | {ratio:.1f}x | {f'{comp:.2f}' if comp else '-'} | "
              f"{f'{disk / 2**20:.1f}' if disk else '-'} |")
    comp_rows = compression_table(trace, payload, args.compression_sample or (100 if args.quick else 400))
    print()
    print("| codec | ratio (bytes in / out) | compress ns per KiB | values kept raw |")
    print("|---|---|---|---|")
    for row in comp_rows:
        print(f"| {row['codec']} | {row['ratio']:.2f} | {row['ns_per_kib']:,.0f} | "
              f"{row['stored_raw']} of {row['values']} |")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "compression": comp_rows,
                                         "requests": len(trace), "repeats": repeats,
                                         "memory_bytes": memory_bytes, "disk_bytes": disk_bytes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
