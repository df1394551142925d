r"""Where the CPU of kotoba-memory's servers goes, symbol by symbol, side by side (Linux ``perf``).

``field_overhead.py`` tells how much more CPU a request costs at some configuration; this tells where.
Servers of the plain-WSGI field app (``benchmarks/field_apps/wsgi_catalog.py``, its leak off, under
gunicorn with ``--workers`` gthread workers) run at the same time, each with ``MemoryConfig``'s
defaults and the fields a ``--server NAME=JSON`` changes. After a warm-up, every server is loaded at
the same pace while ``perf record`` samples its workers; each symbol's samples are then counted per
1,000 requests, summed over rounds (each round starts fresh servers, in rotated order), and compared
with the ``--baseline`` server. Sampling is by CPU clock, so a symbol's count is its CPU time; the
counts of a symbol that stays hot over every round are steadier than a whole process's CPU time.

    .venv/bin/python benchmarks/field_perf.py --server 'on={}' \
        --server 'nowin={"enable_leak_detection": false}' --baseline nowin --rounds 3
    .venv/bin/python benchmarks/field_perf.py --server 'on={}' --server 'late={}' \
        --server-env 'late=FIELD_FIRST_WINDOW_S=100000' --baseline late --watch _PyObject_Malloc

``--server-env NAME=KEY=VALUE`` sets an environment variable for one server (the field apps read
``FIELD_FIRST_WINDOW_S``, when the profiler's first tracing window opens). ``--watch SYMBOL`` prints
that symbol's share of each server's samples round by round. Needs ``perf`` (Debian's ``linux-perf``,
not installed by ``scripts/bootstrap.sh``) and wrk. Each worker dumps pymalloc's pools at exit
(``sys._debugmallocstats``); their fill per server is printed after the symbols.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "core")]

from benchmarks.field_overhead import Server, config_overrides, paired_round  # noqa: E402
from benchmarks.field_suite import APPS, _wrk_script  # noqa: E402
from benchmarks.middleware_overhead import wrk_pacing  # noqa: E402

# One row of `perf report --stdio --sort dso,sym -F sample,dso,sym`: samples, object, [k]/[.], symbol.
_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+\[(.)\]\s+(.*\S)\s*$")


def parse_report(text: str) -> Counter[tuple[str, str]]:
    """Samples per ``(object, symbol)`` from ``perf report``'s text (comment and blank lines skipped)."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        row = _ROW.match(line)
        if row is not None:
            counts[(row.group(2), row.group(4))] += int(row.group(1))
    return counts


def per_thousand(samples: Counter[tuple[str, str]], requests: int) -> dict[tuple[str, str], float]:
    """Each symbol's samples per 1,000 requests."""
    if requests <= 0:
        raise ValueError(f"requests must be > 0, got {requests}")
    return {key: count * 1000.0 / requests for key, count in samples.items()}


def differences(
    rates: dict[str, dict[tuple[str, str], float]], baseline: str, top: int
) -> list[tuple[tuple[str, str], dict[str, float]]]:
    """The ``top`` symbols whose rate differs most from ``baseline``'s in any server, largest first."""
    keys = set().union(*(set(r) for r in rates.values()))
    base = rates[baseline]

    def spread(key: tuple[str, str]) -> float:
        return max(abs(r.get(key, 0.0) - base.get(key, 0.0)) for r in rates.values())

    ranked = sorted(keys, key=lambda key: (-spread(key), key))[:top]
    return [(key, {name: r.get(key, 0.0) for name, r in rates.items()}) for key in ranked]


def worker_heaps(dumps: Path) -> list[dict[str, Any]]:
    """The pymalloc figures each worker dumped at exit (``process-<pid>.json``; none when absent)."""
    found = []
    for path in sorted(dumps.glob("process-*.json")):
        heap = json.loads(path.read_text(encoding="utf-8")).get("pymalloc")
        if heap:
            found.append(heap)
    return found


def class_free_blocks(heaps: list[dict[str, Any]]) -> dict[str, float]:
    """Per size class (bytes), the mean over workers of the free blocks in its pools in use."""
    totals: dict[str, float] = {}
    for heap in heaps:
        for size, (_pools, _used, free) in heap.get("classes", {}).items():
            totals[size] = totals.get(size, 0.0) + free / len(heaps)
    return totals


def heap_summary(heaps: list[dict[str, Any]]) -> str:
    """Mean arenas, pools in use, free blocks in them and fill over workers ('' when none dumped)."""
    if not heaps:
        return ""
    mean = {k: statistics.fmean(h[k] or 0 for h in heaps)
            for k in ("arenas", "pools", "blocks_free_in_used_pools", "fill")}
    return (f"{mean['arenas']:.1f} arenas, {mean['pools']:.0f} pools, "
            f"{mean['blocks_free_in_used_pools']:.0f} free blocks in them, fill {mean['fill']:.3f}")


def _pairs(parser: argparse.ArgumentParser, specs: list[str], flag: str) -> list[tuple[str, str]]:
    found = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"{flag} wants NAME=..., with NAME an identifier, got {spec!r}")
        found.append((name, rest))
    return found


def _record(server: Server, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    pids = ",".join(str(worker.pid) for worker in server.workers)
    return subprocess.Popen(
        ["perf", "record", "-q", "-F", "997", "-o", str(out), "-p", pids, "--", "sleep", f"{seconds:.0f}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def wait_recorded(recorder: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    """Wait for one server's ``perf record``; a RuntimeError with perf's own words when it failed (e.g.
    not allowed to attach: ``kernel.perf_event_paranoid``), instead of a report of a missing file."""
    _, err = recorder.communicate(timeout=timeout)
    if recorder.returncode != 0:
        said = err.decode("utf-8", "replace").strip() or "no message"
        raise RuntimeError(f"perf record for server {name} exited {recorder.returncode}: {said}")


def _report(data: Path) -> Counter[tuple[str, str]]:
    text = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso,sym", "-F", "sample,dso,sym",
         "--percent-limit", "0"],
        capture_output=True, text=True, check=True,
    ).stdout
    return parse_report(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", action="append", default=[], metavar="NAME=JSON", required=True)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=KEY=VALUE")
    parser.add_argument("--baseline", help="the server the others are compared with (default: the first)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--record-s", type=float, default=90.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=25, help="symbols to list (most different first)")
    parser.add_argument("--watch", action="append", default=[], metavar="SYMBOL")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    configs: dict[str, dict[str, Any]] = {}
    for name, text in _pairs(parser, args.server, "--server"):
        configs[name] = config_overrides(parser, f"--server {name}", text)
    envs: dict[str, dict[str, str]] = {name: {} for name in configs}
    for name, text in _pairs(parser, args.server_env, "--server-env"):
        key, sep, value = text.partition("=")
        if name not in configs or not sep or not key:
            parser.error(f"--server-env wants NAME=KEY=VALUE for a --server NAME, got {name}={text}")
        envs[name][key] = value
    baseline = args.baseline or next(iter(configs))
    if baseline not in configs:
        parser.error(f"--baseline {baseline!r} is not a --server")
    if args.rounds < 1:
        parser.error(f"--rounds wants at least 1, got {args.rounds}")
    for tool, how in (("perf", "apt-get install linux-perf"), ("wrk", "bash scripts/bootstrap.sh")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed ({how} installs it)")

    samples = {name: Counter[tuple[str, str]]() for name in configs}
    requests = dict.fromkeys(configs, 0)
    watched: dict[str, list[list[float]]] = {symbol: [] for symbol in args.watch}
    heaps: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    names = list(configs)
    with tempfile.TemporaryDirectory(prefix="field-perf-") as tmp:
        work = Path(tmp)
        script = work / "routes.lua"
        _wrk_script(APPS["wsgi_catalog"], script)
        if args.delay_ms > 0:
            with script.open("a", encoding="utf-8") as lua:
                lua.write(wrk_pacing(args.delay_ms))
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            servers: dict[str, Server] = {}
            try:
                for name in order:
                    (work / f"{name}-{r}").mkdir()
                    servers[name] = Server(
                        True, workers=args.workers, overrides=configs[name] or None, extra_env=envs[name],
                        out=work / f"{name}-{r}",
                    )
                paired_round(servers, args.warmup_s, script, args.connections)
                recorders = {
                    name: _record(s, args.record_s, work / f"{name}-{r}.data") for name, s in servers.items()
                }
                served = paired_round(servers, args.record_s, script, args.connections)
                for name, recorder in recorders.items():
                    wait_recorded(recorder, name, args.record_s + 120)
            finally:
                for server in servers.values():
                    server.stop()
            this_round = {}
            for name in order:
                this_round[name] = _report(work / f"{name}-{r}.data")
                samples[name] += this_round[name]
                requests[name] += int(served[f"{name}_requests"])
            for name in names:
                heaps[name].extend(worker_heaps(work / f"{name}-{r}"))
            for symbol, rows in watched.items():
                rows.append([
                    100.0 * sum(c for (_, s), c in this_round[n].items() if s == symbol)
                    / max(1, sum(this_round[n].values()))
                    for n in names
                ])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {sum(this_round[n].values()) * 1000.0 / max(1, int(served[f'{n}_requests'])):.1f} "
                f"samples per 1,000 requests" for n in names), flush=True)

    rates = {name: per_thousand(samples[name], requests[name]) for name in names}
    totals = {name: sum(rate.values()) for name, rate in rates.items()}
    print("\nsamples per 1,000 requests (all rounds): " + ", ".join(
        f"{n} {totals[n]:.1f} ({totals[n] / totals[baseline]:.4f} of {baseline})" for n in names))
    print(f"\n{'symbol':58s} " + " ".join(f"{n:>10s}" for n in names))
    table = differences(rates, baseline, args.top)
    for (obj, symbol), row in table:
        label = f"{symbol} ({Path(obj).name})"[:58]
        print(f"{label:58s} " + " ".join(f"{row[n]:10.2f}" for n in names))
    print("\npymalloc at each worker's exit (mean over workers): " + "; ".join(
        f"{n} {summary}" for n in names if (summary := heap_summary(heaps[n]))))
    free = {n: class_free_blocks(heaps[n]) for n in names}
    if free[baseline]:
        sizes = sorted(set().union(*free.values()), key=lambda c: -max(
            abs(free[n].get(c, 0.0) - free[baseline].get(c, 0.0)) for n in names))[:6]
        print("free blocks in used pools by size class (mean over workers): " + "; ".join(
            f"{c} B: " + ", ".join(f"{n} {free[n].get(c, 0.0):.0f}" for n in names) for c in sizes))
    for symbol, rows in watched.items():
        print(f"\n{symbol}, % of each server's samples per round: " + "; ".join(
            ", ".join(f"{n} {v:.2f}" for n, v in zip(names, row, strict=True)) for row in rows))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "requests": requests, "samples_per_1000": totals,
            "top": [{"object": obj, "symbol": s, "rates": row} for (obj, s), row in table],
            "watched": watched, "pymalloc": heaps,
        }, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
