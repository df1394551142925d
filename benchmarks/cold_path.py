r"""What kotoba-memory's per-request path costs in a worker that waits between requests (cold caches).

A warm loop of calls measures the middleware at ~2 µs per request; a gunicorn worker serving a paced
load spends several times that, because between two requests the CPU runs other processes and the
request path finds its code and data out of the caches. This benchmark reproduces that in one
process: requests to the plain-WSGI field app (``benchmarks/field_apps/wsgi_catalog.py``, or a null app
with ``--app null``) alternate between the bare app and the same app in ``MemoryMiddleware``, each call
after a ``--sleep-ms`` pause, and each call's CPU time is read from ``time.thread_time_ns``. The figure
is the CPU added per request (wrapped minus bare, the two interleaved request by request, so the
machine's load and the app's drift cancel), the median of ``--rounds`` per-round means.

Each contender runs in its own process (what is registered as running is process-wide):

- ``middleware``: the recorder alone, no optimizer, at its defaults (RSS read on one request in 8 at
  most, fewer while the reads cost more than ``rss_sample_budget``, 0.02%, of request time);
- ``middleware-every-8``: the same with RSS read on one request in 8 whatever it costs (no budget);
- ``middleware-no-rss``: the same without RSS reads (``rss_sample_every`` huge);
- ``profiler``: no RSS reads, a registered ``MemoryProfiler`` (its per-route table gets every request);
- ``gc``: no RSS reads, a running non-adaptive ``GcOptimizer`` (its pause total is read twice per
  request; adaptive tuning is left out because its between-request collections would charge the bare
  calls' garbage to the wrapped ones).

    .venv/bin/python benchmarks/cold_path.py                 # ~2 minutes
    .venv/bin/python benchmarks/cold_path.py --sleep-ms 0    # the warm loop, for comparison
    .venv/bin/python benchmarks/cold_path.py --app null --contenders middleware,profiler

``--pairs`` instead compares two implementations of one step in one process, the null app called
bare, through one and through the other in turn (so the difference between the two is not blurred by
the spread between processes): ``route-table`` is the C recorder adding a request to the profiler's C
route table directly against the pure-Python path it replaced (``record_request`` into the Python
table); ``rss-reader`` is the RSS read of a request measured through ``RssReader`` (its reads in C)
against ``PyRssReader`` (RSS on every request: one fresh read at the end, the start reusing the last
reading); ``call`` is ``MemoryMiddleware.__call__`` in C against ``PyMemoryMiddleware``; ``gc-hooks`` is
the recorder with no GC optimizer against one with a running adaptive ``GcOptimizer`` (its pause total
read and its request count advanced per request; in C, its fields read directly).

    .venv/bin/python benchmarks/cold_path.py --pairs --rounds 9

``--against CHECKOUT`` compares this tree's C middleware with the one built in another checkout (its
``_crecord`` loaded under another name, same process, calls interleaved), e.g. before and after a change:

    git worktree add /tmp/before f5c3a2d
    inc=$(.venv/bin/python -c 'import sysconfig as s; print(s.get_paths()["include"])')
    ext=$(.venv/bin/python -c 'import sysconfig as s; print(s.get_config_var("EXT_SUFFIX"))')
    cc -O2 -shared -fPIC -I"$inc" /tmp/before/csrc/_crecord.c -lm \
        -o /tmp/before/core/kotoba_memory/_crecord$ext
    .venv/bin/python benchmarks/cold_path.py --against /tmp/before --rounds 7
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ("middleware", "middleware-every-8", "middleware-no-rss", "profiler", "gc")
_PATHS = ("/products/%d", "/recent", "/session/s%d", "/render/%d", "/audit/%d", "/report/%d", "/lookup/k%d")
_NO_RSS = 1_000_000  # the most rss_sample_every allows: no read in a run of this length

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _null_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    return [b"{}"]


def _environ(path: str) -> dict[str, Any]:
    # A server decodes the method from the request line: a new str each request, its hash not yet known.
    return {"REQUEST_METHOD": b"GET".decode("latin-1"), "PATH_INFO": path, "wsgi.input": io.BytesIO(),
            "SERVER_NAME": "bench", "SERVER_PORT": "80", "wsgi.url_scheme": "http"}


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    return None


def _one(app: WSGIApp, path: str) -> int:
    """CPU nanoseconds of this thread for one request, body iterated and closed as a server does."""
    started = time.thread_time_ns()
    result = app(_environ(path), _start_response)
    for _ in result:
        pass
    close = getattr(result, "close", None)
    if close is not None:
        close()
    return time.thread_time_ns() - started


def measure(contender: str, app_name: str, sleep_s: float, rounds: int, requests: int) -> list[float]:
    """Per round: the mean CPU microseconds the contender adds to a request (this process only)."""
    os.environ.setdefault("FIELD_LEAKS", "0")
    os.environ["FIELD_KOTOBA"] = "0"
    from kotoba_memory_integrations.wsgi import MemoryMiddleware

    bare: WSGIApp
    if app_name == "null":
        bare = _null_app
    else:
        from benchmarks.field_apps import wsgi_catalog

        bare = wsgi_catalog.app
    if contender == "profiler":
        from kotoba_memory.memory_profiler import MemoryProfiler
        from kotoba_memory.process import registry

        registry.claim("profiler", MemoryProfiler(leak_detection=False))
    elif contender == "gc":
        from kotoba_memory.gc_optimizer import GcOptimizer

        GcOptimizer(adaptive=False).start()
    if contender == "middleware":
        wrapped = MemoryMiddleware(bare)
    elif contender == "middleware-every-8":
        wrapped = MemoryMiddleware(bare, rss_sample_every=8, rss_sample_budget=None)
    else:
        wrapped = MemoryMiddleware(bare, rss_sample_every=_NO_RSS)
    rng = random.Random(1)
    added: list[float] = []
    for _ in range(rounds):
        totals = {False: 0, True: 0}
        for i in range(requests):
            path = rng.choice(_PATHS)
            if "%d" in path:
                path %= rng.randrange(1000)
            for is_wrapped in ((False, True) if i % 2 else (True, False)):
                if sleep_s:
                    time.sleep(sleep_s)
                totals[is_wrapped] += _one(wrapped if is_wrapped else bare, path)
        added.append((totals[True] - totals[False]) / requests / 1000.0)
    return added


def _pairs(sleep_s: float, rounds: int, requests: int) -> dict[str, dict[str, list[float]]]:
    """Per pair and side: the mean CPU microseconds per request over the bare null app, per round."""
    from kotoba_memory.gc_optimizer import GcOptimizer
    from kotoba_memory.memory_profiler import MemoryProfiler
    from kotoba_memory.memory_profiler.profiler import _RouteTable
    from kotoba_memory.process.memory import PyRssReader, RssReader
    from kotoba_memory_integrations.request import RequestRecorder
    from kotoba_memory_integrations.wsgi import MemoryMiddleware, PyMemoryMiddleware

    def no_gc() -> None:
        return None

    with_table = MemoryProfiler(leak_detection=False)
    python_path = MemoryProfiler(leak_detection=False)
    python_path._routes = _RouteTable(python_path._routes.max_routes)  # what record_request used to feed
    python_path._request_sink = None
    pairs: dict[str, dict[str, WSGIApp]] = {
        "route-table": {
            side: MemoryMiddleware(_null_app, recorder=RequestRecorder(
                profiler=lambda p=profiler: p, gc_optimizer=no_gc, rss_sample_every=_NO_RSS))
            for side, profiler in (("c table", with_table), ("python record_request", python_path))
        },
    }
    pairs["rss-reader"] = {
        side: MemoryMiddleware(_null_app, recorder=RequestRecorder(
            profiler=no_gc, gc_optimizer=no_gc, rss_reader=reader, rss_sample_every=1))
        for side, reader in (("c reader", RssReader()), ("python reader", PyRssReader()))
    }
    recorder = RequestRecorder(profiler=no_gc, gc_optimizer=no_gc, rss_sample_every=_NO_RSS)
    pairs["call"] = {"c __call__": MemoryMiddleware(_null_app, recorder=recorder),
                     "python __call__": PyMemoryMiddleware(_null_app, recorder=recorder)}
    results = {pair: _interleaved(sides, sleep_s, rounds, requests) for pair, sides in pairs.items()}
    optimizer = GcOptimizer()  # adaptive, as MemoryConfig() runs it; running only for this pair
    gc_sides = {
        side: MemoryMiddleware(_null_app, recorder=RequestRecorder(
            profiler=no_gc, gc_optimizer=getter, rss_sample_every=_NO_RSS))
        for side, getter in (("no gc optimizer", no_gc), ("gc optimizer", lambda: optimizer))
    }
    optimizer.start()
    try:
        results["gc-hooks"] = _interleaved(gc_sides, sleep_s, rounds, requests)
    finally:
        optimizer.stop()
    return results


def _interleaved(
    sides: dict[str, WSGIApp], sleep_s: float, rounds: int, requests: int
) -> dict[str, list[float]]:
    """Per side and round: the mean CPU microseconds per request over the bare null app, the bare app and
    every side called in turn (the order rotating), each call after ``sleep_s``."""
    contenders = [("bare", _null_app), *sides.items()]
    out: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        totals = dict.fromkeys([name for name, _ in contenders], 0)
        for i in range(requests):
            k = i % len(contenders)
            for name, app in contenders[k:] + contenders[:k]:
                if sleep_s:
                    time.sleep(sleep_s)
                totals[name] += _one(app, "/")
        for side in sides:
            out[side].append((totals[side] - totals["bare"]) / requests / 1000.0)
    return out


def _against(other: Path, sleep_s: float, rounds: int, requests: int) -> dict[str, list[float]]:
    """This tree's C middleware against the one built in checkout ``other``, in one process: its
    ``_crecord`` is loaded under another name and configured by the layout it has (before 3145e94 it
    took activity's list and counter and request.py's globals; before the registry's getters were
    read directly, no registry). Neither reads RSS, and no profiler or GC optimizer runs (both ask the
    registry, as at the defaults); the other build counts requests in flight apart from this one."""
    import importlib.machinery
    import importlib.util
    import itertools
    import tracemalloc

    from kotoba_memory.process import registry, scheduler
    from kotoba_memory_integrations import request as rq
    from kotoba_memory_integrations.wsgi import MemoryMiddleware, PyMemoryMiddleware

    found = [other / "core" / "kotoba_memory" / f"_crecord{suffix}"
             for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    built = next((path for path in found if path.is_file()), None)
    if built is None:
        raise SystemExit(f"--against: no _crecord built for this Python in {other}/core/kotoba_memory "
                         "(build it there first, e.g. pip install -e . or setup.py build_ext --inplace)")
    spec = importlib.util.spec_from_file_location("kotoba_memory_against._crecord", built)
    assert spec is not None and spec.loader is not None
    theirs: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    tail = (rq._count_error, rq._rng.random, rq.UNMATCHED_ROUTE, rq.KNOWN_METHODS, rq.OTHER_METHOD,
            tracemalloc.is_tracing, tracemalloc.get_traced_memory, rq._RSS_REUSE_S)
    if "profiler_getter" in (theirs.configure.__doc__ or ""):
        theirs.configure(rq.RequestMeasurement, rq.RequestMetrics, rq._current, scheduler, *tail,
                         registry._active, registry.getter("gc_optimizer"), registry.getter("profiler"))
        theirs.set_listeners(())
    elif hasattr(theirs, "set_listeners"):  # b98ca46
        theirs.configure(rq.RequestMeasurement, rq.RequestMetrics, rq._current, scheduler, *tail)
        theirs.set_listeners(())
    else:
        theirs.configure(rq.RequestMeasurement, rq.RequestMetrics, rq._current, [], itertools.count(1),
                         scheduler, {"_listeners": ()}, *tail)

    class TheirRecorder(theirs.Recorder, rq.PyRequestRecorder):  # type: ignore[misc,name-defined]
        pass

    class TheirMiddleware(theirs.WSGICall, PyMemoryMiddleware):  # type: ignore[misc,name-defined]
        pass

    sides: dict[str, WSGIApp] = {
        "this tree": MemoryMiddleware(_null_app, recorder=rq.RequestRecorder(rss_sample_every=_NO_RSS)),
        f"{other}": TheirMiddleware(_null_app, recorder=TheirRecorder(rss_sample_every=_NO_RSS)),
    }
    return _interleaved(sides, sleep_s, rounds, requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--app", choices=("catalog", "null"), default="catalog")
    parser.add_argument("--sleep-ms", type=float, default=2.0, help="pause before every call (0: warm loop)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000, help="requests per round to each side")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--pairs", action="store_true", help="compare implementations in one process")
    parser.add_argument(
        "--against", type=Path, metavar="CHECKOUT",
        help="compare this tree's C middleware with the one built in another checkout, in one process",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sleep_ms < 0 or args.rounds < 1 or args.requests < 1:
        parser.error("--sleep-ms must be >= 0, --rounds and --requests >= 1")
    if args.pairs:
        print(f"null app, {args.sleep_ms:g} ms before every call, {args.rounds} rounds of {args.requests} "
              "requests to each; CPU µs per request over the bare app")
        pairs = _pairs(args.sleep_ms / 1000.0, args.rounds, args.requests)
        for pair, sides in pairs.items():
            for side, added in sides.items():
                print(f"  {pair:12s} {side:22s} median {statistics.median(added):6.2f} µs; per round: "
                      + ", ".join(f"{a:.2f}" for a in added))
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "pairs": pairs},
                                            indent=2), encoding="utf-8")
        return 0
    if args.against is not None:
        print(f"null app, {args.sleep_ms:g} ms before every call, {args.rounds} rounds of {args.requests} "
              "requests to each; CPU µs per request over the bare app")
        sides = _against(args.against.resolve(), args.sleep_ms / 1000.0, args.rounds, args.requests)
        for side, added in sides.items():
            print(f"  {side:40s} median {statistics.median(added):6.2f} µs; per round: "
                  + ", ".join(f"{a:.2f}" for a in added))
        mine, theirs = sides.values()
        print(f"  this tree lower in {sum(a < b for a, b in zip(mine, theirs))} of {len(mine)} rounds")
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json),
                                                                   "against": str(args.against)},
                                             "against": sides}, indent=2), encoding="utf-8")
        return 0
    if args.child:
        added = measure(args.child, args.app, args.sleep_ms / 1000.0, args.rounds, args.requests)
        print(json.dumps(added))
        return 0
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or not contenders:
        parser.error(f"--contenders: choose from {', '.join(CONTENDERS)} (got {args.contenders!r})")
    print(f"app {args.app}, {args.sleep_ms:g} ms before every call, {args.rounds} rounds of "
          f"{args.requests} requests to each side; CPU µs added per request (wrapped - bare)")
    results: dict[str, dict[str, Any]] = {}
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    for contender in contenders:
        out = subprocess.run(
            [sys.executable, __file__, "--child", contender, "--app", args.app,
             "--sleep-ms", str(args.sleep_ms), "--rounds", str(args.rounds),
             "--requests", str(args.requests)],
            cwd=REPO, env=env, capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            raise SystemExit(f"{contender} failed:\n{out.stderr}")
        added = json.loads(out.stdout.strip().splitlines()[-1])
        results[contender] = {"median_us": statistics.median(added), "rounds_us": added}
        print(f"  {contender:18s} median {statistics.median(added):6.2f} µs; per round: "
              + ", ".join(f"{a:.2f}" for a in added), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
