"""pytest plugin (entry point ``pytest11``): fail a test that leaks or uses too much memory.

Loaded with the package and inert unless a test asks for it:

* ``@pytest.mark.kotoba_no_leak(limit="0 B", *, runs=3, warmups=1, filter_fn=None)`` runs the test body
  ``warmups + runs`` times (fixtures are set up once) and fails when an allocation site — the innermost
  line of application code, as the profiler blames it — grew in **every** measured run by more than
  ``limit`` per run on average. Warm-up runs absorb first-call caches (``re``, imports, lazy init) that
  a single-run check reports as leaks. Requests that went through kotoba-memory's middleware meanwhile
  (a Flask/Django test client, an ASGI client) are listed per route with the traced memory they kept.
* ``@pytest.mark.kotoba_limit_memory("24 MB")`` fails when the test's peak traced memory above what was
  allocated at its start exceeds the limit, naming the largest sites still allocated at its end.
* fixture ``kotoba_leaks``: ``kotoba_leaks.check(fn, limit=..., runs=..., warmups=...)`` returns a
  :class:`LeakVerdict` (``ok``, ``sites``, ``routes``, ``message()``) for a callable, e.g. one route.
* fixture ``kotoba_gc``: a started :class:`~kotoba_memory.gc_optimizer.GcOptimizer` (the active one if one
  runs); at teardown it is stopped and the test fails if the collector was not put back as found.

Sizes are ``"<number> [B|KB|MB|GB]"`` (1024-based, as pytest-memray; ``KiB``/``MiB``/``GiB`` too) or an
int of bytes. Measurement uses :mod:`tracemalloc` (started for the test when not already tracing), so it
sees Python allocations and those native libraries report to it, not other native memory.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import re
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kotoba_memory.gc_optimizer import GcOptimizer
    from kotoba_memory_integrations.request import RequestMetrics

__all__ = ["LeakVerdict", "RouteVerdict", "SiteVerdict", "measure_leaks", "parse_size"]

_FRAMES = 32  # deep enough to get past library frames to the application line
_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_MARKERS = (
    "kotoba_no_leak(limit='0 B', *, runs=3, warmups=1, filter_fn=None): fail when an allocation site "
    "grows in every one of `runs` repeated runs of the test body (after `warmups`) by more than `limit` "
    "per run (kotoba-memory)",
    "kotoba_limit_memory(limit): fail when the test's peak traced memory exceeds `limit`, e.g. '24 MB' "
    "(kotoba-memory)",
)

Stack = tuple[tuple[str, int], ...]  # (filename, lineno), innermost frame first
_IGNORED_FILES = frozenset({tracemalloc.__file__, __file__})


def parse_size(value: str | int, name: str = "limit") -> int:
    """Bytes in ``value`` ("24 MB", "512 KiB", "0 B" or an int); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be a size such as '24 MB' or an int of bytes, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
        return value
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit or "b") not in _UNITS:
        raise ValueError(f"{name} must look like '24 MB' (units B, KB, MB, GB, TB, KiB...), got {value!r}")
    return int(float(match.group(1)) * _UNITS[unit or "b"])


def _fmt(size: float) -> str:
    sign = "-" if size < 0 else ""
    size = abs(size)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{sign}{size:.0f} {unit}" if unit == "B" else f"{sign}{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class SiteVerdict:
    """One allocation site that grew in every measured run."""

    site: str  # file:line of the innermost application frame
    growth_per_run: tuple[int, ...]  # bytes kept by each measured run
    blocks_per_run: tuple[int, ...]
    stack: Stack  # the whole traceback, innermost frame first
    callers: Stack = ()  # the application frames that led to the site, innermost first

    @property
    def mean_bytes(self) -> float:
        """Average bytes the site kept per measured run."""
        return sum(self.growth_per_run) / max(1, len(self.growth_per_run))


@dataclass(frozen=True)
class RouteVerdict:
    """Requests of one route (through kotoba-memory's middleware) during the measured runs."""

    route: str
    requests: int
    traced_requests: int  # requests whose traced delta is known (tracing on, not overlapped)
    traced_bytes: int  # net traced bytes those requests kept, summed

    @property
    def bytes_per_request(self) -> float | None:
        """Mean traced bytes kept per traced request, None when none was traced."""
        return self.traced_bytes / self.traced_requests if self.traced_requests else None


@dataclass(frozen=True)
class LeakVerdict:
    """What :func:`measure_leaks` found: ``ok`` unless some site leaked more than the limit."""

    limit: int
    runs: int
    warmups: int
    sites: tuple[SiteVerdict, ...]  # leaking sites, most per run first
    routes: tuple[RouteVerdict, ...] = field(default=())  # most kept per request first

    @property
    def ok(self) -> bool:
        """True when no site leaked."""
        return not self.sites

    def message(self, limit_sites: int = 5) -> str:
        """A readable account: each leaking site with its growth per run, then the routes."""
        if self.ok:
            return f"no allocation site grew in all {self.runs} runs by more than {_fmt(self.limit)} per run"
        lines = [
            f"{len(self.sites)} allocation site(s) grew in every one of {self.runs} runs "
            f"(after {self.warmups} warm-up run(s)) by more than {_fmt(self.limit)} per run:"
        ]
        for site in self.sites[:limit_sites]:
            runs = ", ".join(_fmt(b) for b in site.growth_per_run)
            blocks = sum(site.blocks_per_run)
            lines.append(f"  {site.site}: +{_fmt(site.mean_bytes)} per run ({runs}; {blocks:+d} blocks)")
            lines.extend(f"      called from {filename}:{lineno}" for filename, lineno in site.callers[:3])
        if len(self.sites) > limit_sites:
            lines.append(f"  ... and {len(self.sites) - limit_sites} more")
        kept = [r for r in self.routes if r.bytes_per_request is not None and r.traced_bytes > 0]
        if kept:
            lines.append("routes that kept traced memory (kotoba-memory middleware):")
            for route in kept[:limit_sites]:
                per = route.bytes_per_request or 0.0
                lines.append(f"  {route.route}: {route.requests} request(s), +{_fmt(per)} kept per request")
        return "\n".join(lines)


class _Tracing:
    """Starts tracemalloc for a measurement when it is not already tracing, and stops it afterwards."""

    def __enter__(self) -> _Tracing:
        self.started = not tracemalloc.is_tracing()
        if self.started:
            tracemalloc.start(_FRAMES)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            tracemalloc.stop()


class _RouteLog:
    """Collects the middleware's per-request measurements while active."""

    def __init__(self) -> None:
        self.requests: list[RequestMetrics] = []

    def __call__(self, metrics: RequestMetrics) -> None:
        self.requests.append(metrics)

    def __enter__(self) -> _RouteLog:
        try:
            from kotoba_memory_integrations.request import add_request_listener
        except ImportError:  # pragma: no cover - the integrations ship together with the plugin
            return self
        add_request_listener(self)
        return self

    def __exit__(self, *exc: object) -> None:
        from kotoba_memory_integrations.request import remove_request_listener

        remove_request_listener(self)

    def verdicts(self) -> tuple[RouteVerdict, ...]:
        by_route: dict[str, list[int]] = {}
        counts: dict[str, int] = {}
        for metrics in self.requests:
            counts[metrics.route] = counts.get(metrics.route, 0) + 1
            traced = by_route.setdefault(metrics.route, [])
            if metrics.traced_delta is not None:
                traced.append(metrics.traced_delta)
        found = [
            RouteVerdict(route, counts[route], len(traced), sum(traced)) for route, traced in by_route.items()
        ]
        found.sort(key=lambda r: r.bytes_per_request or 0.0, reverse=True)
        return tuple(found)


def _site_chooser() -> Any:
    from kotoba_memory.memory_profiler._leaks import SiteChooser
    from kotoba_memory.memory_profiler.profiler import _library_prefixes, _own_prefixes

    return SiteChooser(_library_prefixes(), _own_prefixes())


def _snapshot() -> dict[Stack, tuple[int, int]]:
    gc.collect()
    found: dict[Stack, tuple[int, int]] = {}
    for stat in tracemalloc.take_snapshot().statistics("traceback"):
        # tracemalloc lists frames oldest first; the profiler's keys are innermost first.
        key = tuple((frame.filename, frame.lineno) for frame in reversed(stat.traceback))
        if key and key[0][0] in _IGNORED_FILES:
            continue  # the measurement's own allocations
        size, count = found.get(key, (0, 0))
        found[key] = (size + stat.size, count + stat.count)
    return found


def _judge(
    chooser: Any,
    snapshots: Sequence[dict[Stack, tuple[int, int]]],
    limit: int,
    filter_fn: Callable[[Stack], bool] | None,
) -> list[SiteVerdict]:
    per_site: dict[str, tuple[list[int], list[int], Stack]] = {}
    keys = set().union(*snapshots)
    for key in keys:
        if chooser.owner(key) != "user":
            continue  # kotoba-memory's own bookkeeping, or no application frame at all
        site = chooser.site(key)
        sizes, counts, stack = per_site.setdefault(site, ([0] * len(snapshots), [0] * len(snapshots), key))
        for i, snap in enumerate(snapshots):
            size, count = snap.get(key, (0, 0))
            sizes[i] += size
            counts[i] += count
    found = []
    for site, (sizes, counts, stack) in per_site.items():
        growth = tuple(b - a for a, b in itertools.pairwise(sizes))
        blocks = tuple(b - a for a, b in itertools.pairwise(counts))
        if not growth or min(growth) <= 0 or sum(growth) <= limit * len(growth):
            continue
        if filter_fn is not None and not filter_fn(stack):
            continue
        at = next((i for i, (name, line) in enumerate(stack) if f"{name}:{line}" == site), 0)
        callers = tuple(frame for frame in stack[at + 1:] if chooser.owner((frame,)) == "user")
        found.append(SiteVerdict(site, growth, blocks, stack, callers))
    found.sort(key=lambda s: s.mean_bytes, reverse=True)
    return found


def measure_leaks(
    fn: Callable[[], Any],
    *,
    limit: str | int = "0 B",
    runs: int = 3,
    warmups: int = 1,
    filter_fn: Callable[[Stack], bool] | None = None,
) -> LeakVerdict:
    """Call ``fn`` ``warmups + runs`` times and judge which allocation sites grew in every measured run.

    ``filter_fn(stack)`` (innermost ``(filename, lineno)`` first) returning False drops a site (known
    false positives), as pytest-memray's ``filter_fn``.
    """
    size_limit = parse_size(limit)
    _check_runs(runs, warmups)
    snapshots: list[dict[Stack, tuple[int, int]]] = []
    chooser = _site_chooser()  # imported before tracing starts: imports are not the test's allocations
    with _RouteLog() as routes, _Tracing():
        for _ in range(warmups):
            fn()
        routes.requests.clear()  # routes are judged on the measured runs only
        snapshots.append(_snapshot())
        for _ in range(runs):
            fn()
            snapshots.append(_snapshot())
        sites = _judge(chooser, snapshots, size_limit, filter_fn)
    return LeakVerdict(size_limit, runs, warmups, tuple(sites), routes.verdicts())


def _check_runs(runs: Any, warmups: Any) -> None:
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"kotoba_no_leak: runs must be an int >= 1, got {runs!r}")
    if isinstance(warmups, bool) or not isinstance(warmups, int) or warmups < 0:
        raise ValueError(f"kotoba_no_leak: warmups must be an int >= 0, got {warmups!r}")


# -- pytest hooks ---------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKERS:
        config.addinivalue_line("markers", line)


def _leak_options(marker: pytest.Mark) -> dict[str, Any]:
    args, kwargs = marker.args, dict(marker.kwargs)
    if len(args) > 1:
        raise TypeError("kotoba_no_leak takes at most one positional argument (the limit)")
    unknown = set(kwargs) - {"limit", "runs", "warmups", "filter_fn"}
    if unknown:
        raise TypeError(f"kotoba_no_leak got unknown argument(s): {', '.join(sorted(unknown))}")
    if args:
        kwargs["limit"] = args[0]
    options: dict[str, Any] = {"limit": "0 B", "runs": 3, "warmups": 1, "filter_fn": None} | kwargs
    parse_size(options["limit"])
    _check_runs(options["runs"], options["warmups"])
    return options


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> object | None:
    marker = pyfuncitem.get_closest_marker("kotoba_no_leak")
    if marker is None:
        return None  # pytest (or another plugin) calls the test as usual
    options = _leak_options(marker)
    testfunction = pyfuncitem.obj
    if inspect.iscoroutinefunction(testfunction) or inspect.isasyncgenfunction(testfunction):
        raise TypeError("kotoba_no_leak repeats the test body, which needs a plain (sync) test function")
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    verdict = measure_leaks(lambda: testfunction(**kwargs), **options)
    if not verdict.ok:
        pytest.fail(verdict.message(), pytrace=False)
    return True  # the call was made


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    marker = item.get_closest_marker("kotoba_limit_memory")
    if marker is None:
        return (yield)
    if len(marker.args) != 1 or marker.kwargs:
        raise TypeError("kotoba_limit_memory takes exactly one argument, the limit (e.g. '24 MB')")
    budget = parse_size(marker.args[0])
    with _Tracing():
        tracemalloc.reset_peak()
        start = _traced_now()
        result = yield
        peak = tracemalloc.get_traced_memory()[1] - start
        if peak > budget:
            pytest.fail(_limit_message(peak, budget), pytrace=False)
    return result


def _traced_now() -> int:
    return tracemalloc.get_traced_memory()[0]


def _limit_message(peak: int, budget: int) -> str:
    lines = [f"the test's peak traced memory was {_fmt(peak)}, above its limit of {_fmt(budget)}"]
    stats = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__))
    ).statistics("lineno")
    if stats:
        lines.append("largest sites still allocated at the end of the test:")
        for stat in stats[:5]:
            frame = stat.traceback[0]
            lines.append(f"  {frame.filename}:{frame.lineno}: {_fmt(stat.size)}")
    return "\n".join(lines)


class _LeakChecker:
    """The ``kotoba_leaks`` fixture: :func:`measure_leaks` on any callable, and an assert form."""

    check = staticmethod(measure_leaks)

    @staticmethod
    def assert_no_leak(fn: Callable[[], Any], **options: Any) -> LeakVerdict:
        """:func:`measure_leaks`, failing the test with its message when a site leaked."""
        verdict = measure_leaks(fn, **options)
        if not verdict.ok:
            pytest.fail(verdict.message(), pytrace=False)
        return verdict


@pytest.fixture
def kotoba_leaks() -> _LeakChecker:
    """Measure leaks of a callable: ``kotoba_leaks.check(fn)`` / ``kotoba_leaks.assert_no_leak(fn)``."""
    return _LeakChecker()


@pytest.fixture
def kotoba_gc() -> Iterator[GcOptimizer]:
    """A running GC optimizer for the test; the collector must be back as found at teardown."""
    from kotoba_memory.gc_optimizer import GcOptimizer, get_active_gc_optimizer

    active = get_active_gc_optimizer()
    if active is not None:
        yield active  # someone else's: leave it running
        return
    found = (gc.get_threshold(), gc.isenabled(), gc.get_freeze_count())
    optimizer = GcOptimizer()
    optimizer.start()
    try:
        yield optimizer
    finally:
        optimizer.stop()
    after = (gc.get_threshold(), gc.isenabled(), gc.get_freeze_count())
    if after[:2] != found[:2] or after[2] > found[2]:
        pytest.fail(
            f"the GC optimizer left the collector changed: thresholds/enabled/frozen {found} -> {after}",
            pytrace=False,
        )
