"""Per-request memory measurement shared by the WSGI, ASGI, Django and Flask integrations.

One :class:`RequestRecorder` per middleware measures each request: wall time, the change in resident
memory (RSS), the traced-allocation delta when ``tracemalloc`` is tracing, the GC pause time that fell
inside the request and the route template it belongs to. It calls the active GC optimizer's
between-request hooks and hands the result to the active memory profiler and to registered listeners
(the OpenTelemetry layer is one). Nothing here imports a web framework.
"""

from __future__ import annotations

import contextvars
import functools
import math
import random
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from kotoba_memory import _native
from kotoba_memory.process import activity, forks, registry, scheduler
from kotoba_memory.process.memory import RssReader, shared_reader
from kotoba_memory.validation import check_positive, check_positive_int

__all__ = [
    "CRequestRecorder",
    "DEFAULT_RSS_SAMPLE_BUDGET",
    "DEFAULT_RSS_SAMPLE_EVERY",
    "ENVIRON_KEY",
    "UNMATCHED_ROUTE",
    "RequestMeasurement",
    "RequestMetrics",
    "RequestRecorder",
    "RssReader",
    "add_request_listener",
    "current_measurement",
    "KNOWN_METHODS",
    "OTHER_METHOD",
    "PyRequestMeasurement",
    "PyRequestRecorder",
    "listener_errors",
    "normalize_method",
    "remove_request_listener",
    "set_current_route",
]

#: Key under which the measurement of the running request is stored in a WSGI environ or ASGI scope.
ENVIRON_KEY = "kotoba_memory.request"
#: A request starts from the process's last RSS reading when it is at most this old (see RssReader.recent).
_RSS_REUSE_S = 0.010
#: RSS is measured on one request in this many on average at most (a random gap: see RequestRecorder).
#: The ``/proc`` read is the largest per-request cost inside a worker; per-route means stay unbiased.
DEFAULT_RSS_SAMPLE_EVERY = 8
#: Share of request time (as the middleware measures it: the app's part, on the wall clock) the RSS reads
#: of measured requests may cost: past it the gap between measured requests grows (see RequestRecorder).
#: A threaded worker's requests wait for the GIL, so their wall time is 2-3x their CPU: 0.02% of wall
#: time keeps the reads near 0.05% of the worker's CPU.
DEFAULT_RSS_SAMPLE_BUDGET = 0.0002
#: The widest mean gap the budget sets (also rss_sample_every's upper bound).
_MAX_RSS_GAP = 1_000_000
# The running means of read cost and request duration weigh the n-th measured request 1/n up to this
# many (a plain mean while they start, so the first, cold reading fades fast), then 1/_RSS_MEAN_OVER.
_RSS_MEAN_OVER = 16
# A read's cost counts for at most this many times the running mean: the reads are timed on the wall
# clock, and a thread descheduled mid-read (milliseconds on a busy machine) would otherwise widen the
# gap a hundredfold, and keep it wide, since the wider the gap the rarer the readings that narrow it.
_RSS_COST_CLAMP = 4.0
# Our own generator: drawing gaps from ``random``'s shared one would shift a seeded app's sequence.
_rng = random.Random()
forks.register(_rng.seed, name="request RSS sample gaps")  # forked workers must not draw the same gaps
#: Route label used when no framework told us the route; the raw path is never used (cardinality).
UNMATCHED_ROUTE = "unmatched"
#: The HTTP methods recorded as sent (OpenTelemetry HTTP semantic conventions, case-sensitive); any
#: other method a client sends is recorded as :data:`OTHER_METHOD`, so metric series stay bounded.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
OTHER_METHOD = "_OTHER"


def normalize_method(method: Any) -> str:
    """``method`` if it is a known HTTP method, else ``"_OTHER"`` (clients choose it: never kept as sent)."""
    return method if method in KNOWN_METHODS else OTHER_METHOD


_current: contextvars.ContextVar[RequestMeasurement | None] = contextvars.ContextVar(
    "kotoba_memory_request", default=None
)


class RequestMetrics(NamedTuple):
    """What one finished request cost (a NamedTuple: built once per request, so it must be cheap).

    ``rss_delta`` is the process's RSS change over the request; ``traced_delta`` the net traced
    allocations, given only when tracemalloc traced the whole request *and* no other request of this
    process started or finished meanwhile (both counters are process-wide, so an overlapped request's
    figure would include its neighbours'); ``overlapped`` says whether another request ran alongside.
    ``sampled`` is False for the requests whose RSS was not measured (``rss_sample_every`` > 1, the
    default): their ``rss_delta`` is 0, and the profiler and OpenTelemetry leave it out of their RSS
    figures (they still count the request, its traced delta and its GC pause).
    """

    route: str
    method: str  # a KNOWN_METHODS member or "_OTHER" (see normalize_method)
    status: int | None
    duration_s: float
    rss_delta: int
    traced_delta: int | None
    gc_pause_ns: int
    error: str | None
    overlapped: bool = False
    sampled: bool = True


RequestListener = Callable[[RequestMetrics], None]
# RequestMetrics(...) without the generated Python-level __new__ (one call per request: no frame).
_new_metrics = functools.partial(tuple.__new__, RequestMetrics)

_listeners: tuple[RequestListener, ...] = ()
_listeners_lock = threading.Lock()
_listener_errors = 0


def _hand_over_listeners(listeners: tuple[RequestListener, ...]) -> None:
    """Give the C recorder the new tuple (replaced below when it is built; pure Python reads the global)."""


def add_request_listener(listener: RequestListener) -> None:
    """Call ``listener(metrics)`` after every measured request (idempotent)."""
    global _listeners
    with _listeners_lock:
        if listener not in _listeners:
            _listeners = (*_listeners, listener)
            _hand_over_listeners(_listeners)


def remove_request_listener(listener: RequestListener) -> None:
    """Stop calling ``listener``; unknown listeners are ignored."""
    global _listeners
    with _listeners_lock:
        _listeners = tuple(fn for fn in _listeners if fn != listener)
        _hand_over_listeners(_listeners)


def listener_errors() -> int:
    """How many times a request listener, profiler or GC hook raised (they never reach the app)."""
    return _listener_errors


def _count_error() -> None:
    global _listener_errors
    _listener_errors += 1


def current_measurement() -> RequestMeasurement | None:
    """The measurement of the request running in this context, if a middleware started one.

    The C ``MemoryMiddleware`` keeps its request on the thread that runs it until this is asked where
    the thread cannot answer (another thread while requests are in flight, e.g. a copied context, or
    under gevent/eventlet); that call returns None and every later request is made current in the
    context variable too, so copied contexts see it.
    """
    measurement = _current.get()
    if measurement is None and _thread_measurement is not None:
        return _thread_measurement()
    return measurement


def set_current_route(route: str | None) -> None:
    """Tell the running request's measurement its route template (a no-op outside a request)."""
    measurement = current_measurement()
    if measurement is not None and route:
        measurement.route = route


class RequestMeasurement:
    """The in-flight measurement of one request; ``finish()`` records it exactly once.

    The type both implementations derive from (``isinstance`` sees either): :class:`PyRequestMeasurement`,
    the pure-Python reference, and ``kotoba_memory._crecord.Measurement``, which the C recorder makes.
    """

    if not TYPE_CHECKING:  # no instance layout of its own (the C type extends it); mypy sees the fields
        __slots__ = ()
    route: str | None
    method: str
    status: int | None
    error: str | None

    @property
    def finished(self) -> bool:
        """Whether ``finish()`` already ran."""
        raise NotImplementedError

    def activate(self) -> None:
        """Make this the current measurement of the running context (see :func:`current_measurement`)."""
        raise NotImplementedError

    def deactivate(self) -> None:
        """Undo :meth:`activate` in the context that activated it."""
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        """Note that the app raised ``exc`` while serving this request."""
        raise NotImplementedError

    def finish(self) -> RequestMetrics | None:
        """Record the request (idempotent: later calls return None)."""
        raise NotImplementedError


class PyRequestMeasurement(RequestMeasurement):
    """The pure-Python measurement (the reference the C one follows step by step)."""

    __slots__ = (
        "_alone",
        "_done",
        "_epoch",
        "_gc",
        "_gc_pause0",
        "_read_s",
        "_recorder",
        "_rss0",
        "_sampled",
        "_t0",
        "_token",
        "_traced0",
        "error",
        "method",
        "route",
        "status",
    )

    def __init__(self, recorder: PyRequestRecorder, method: str) -> None:
        self._recorder = recorder
        self.method = method if method in KNOWN_METHODS else OTHER_METHOD
        self.route: str | None = None
        self.status: int | None = None
        self.error: str | None = None
        self._done = False
        self._token: contextvars.Token[RequestMeasurement | None] | None = None
        if scheduler.paused_by_fork:  # the first request of a forked worker: resume our background work
            scheduler.resume()
        self._alone, self._epoch = activity.begin()
        try:
            gc_opt = recorder.gc_optimizer()
            self._gc = gc_opt
            self._gc_pause0 = 0
            if gc_opt is not None:
                try:
                    self._gc_pause0 = int(gc_opt.pause_total_ns())
                except Exception:
                    _count_error()
                    self._gc = None
            if recorder.every == 1:
                self._sampled = True
                self._rss0 = recorder.rss_reader.recent(_RSS_REUSE_S)
            else:
                # Racing threads may lose a decrement or both sample: harmless for a random sample.
                left = recorder.countdown - 1
                if left > 0:
                    recorder.countdown = left
                    self._sampled, self._rss0 = False, 0
                else:
                    recorder.countdown = recorder.next_gap()
                    self._sampled = True
                    # A fresh reading: the last one may predate unmeasured requests, whose growth it
                    # would add to this one's. Timed for the budget (read back only on this path).
                    started = time.perf_counter()
                    self._rss0 = recorder.rss_reader.rss()
                    self._read_s = time.perf_counter() - started
            # Only inside the profiler's tracing windows; every request, so route means use them all.
            self._traced0 = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
        except BaseException:
            activity.mark_end()  # a request that failed to begin must not stay counted in flight
            raise
        self._t0 = time.perf_counter()

    @property
    def finished(self) -> bool:
        """Whether ``finish()`` already ran."""
        return self._done

    def activate(self) -> None:
        """Make this the current measurement of the running context (see :func:`current_measurement`)."""
        self._token = _current.set(self)

    def deactivate(self) -> None:
        """Undo :meth:`activate` in the context that activated it."""
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:  # reset from another context: just clear ours
                _current.set(None)
            self._token = None

    def fail(self, exc: BaseException) -> None:
        """Note that the app raised ``exc`` while serving this request."""
        if self.error is None:
            self.error = type(exc).__qualname__
        if self.status is None:
            self.status = 500

    def finish(self) -> RequestMetrics | None:
        """Record the request (idempotent: later calls return None)."""
        if self._done:
            return None
        self._done = True
        ended = time.perf_counter()
        duration = ended - self._t0
        recorder = self._recorder
        overlapped = activity.end(self._alone, self._epoch)
        rss_delta = 0
        if self._sampled:
            rss_delta = recorder.rss_reader.rss() - self._rss0
            if recorder._rss_budget:
                recorder._note_rss_cost(self._read_s + time.perf_counter() - ended, duration)
        traced_delta = None
        if self._traced0 is not None and not overlapped and tracemalloc.is_tracing():
            traced_delta = tracemalloc.get_traced_memory()[0] - self._traced0
        gc_pause = 0
        gc_opt = self._gc
        if gc_opt is not None:
            try:
                gc_pause = max(0, int(gc_opt.pause_total_ns()) - self._gc_pause0)
                gc_opt.request_ended()
            except Exception:
                _count_error()
        metrics: RequestMetrics = _new_metrics((
            self.route or UNMATCHED_ROUTE,
            self.method,
            self.status,
            duration,
            rss_delta,
            traced_delta,
            gc_pause,
            self.error,
            overlapped,
            self._sampled,
        ))
        recorder.deliver(metrics)
        return metrics


class PyRequestRecorder:
    """Starts per-request measurements and delivers their results (pure Python: the reference).

    ``gc_optimizer`` / ``profiler`` default to the process's active ones (looked up per request, so an
    optimizer started after the middleware was built is still seen); pass ``None``-returning callables
    to disable either. ``on_request`` is called with every :class:`RequestMetrics` besides the global
    listeners. ``rss_sample_every=N`` measures RSS on one request in N on average, at random gaps
    (geometric: each request has the same chance, so periodic traffic cannot alias with it); the
    others still reach the GC hooks, the profiler's request counts and the listeners, marked
    ``sampled=False``. ``1`` measures every request. The ``/proc`` reads are the largest per-request
    cost inside a worker, and per-route means stay unbiased. ``rss_sample_budget`` (a share of request
    time) widens the mean gap past N while the reads' measured cost, over the measured requests'
    duration, would exceed it; ``None`` keeps one in N whatever the reads cost.
    """

    def __init__(
        self,
        *,
        gc_optimizer: Callable[[], Any] | None = None,
        profiler: Callable[[], Any] | None = None,
        on_request: RequestListener | None = None,
        rss_reader: RssReader | None = None,
        rss_sample_every: int = DEFAULT_RSS_SAMPLE_EVERY,
        rss_sample_budget: float | None = DEFAULT_RSS_SAMPLE_BUDGET,
    ) -> None:
        self.every = check_positive_int(rss_sample_every, "rss_sample_every", high=_MAX_RSS_GAP)
        budget = None if rss_sample_budget is None else check_positive(
            rss_sample_budget, "rss_sample_budget", high=1.0
        )
        self._log_q = math.log1p(-1.0 / self.every) if self.every > 1 else -math.inf
        # 0.0: no budget. The running means start at the first measured request.
        self._rss_budget = 0.0 if budget is None or self.every == 1 else float(budget)
        self._rss_cost_s = self._rss_duration_s = 0.0
        self._rss_samples = 0  # measured requests in the means, counted up to _RSS_MEAN_OVER
        self.countdown = self.next_gap()  # requests left until the next measured one
        # The getters look up the optimizer/profiler active at call time (the process registry); the
        # defaults are get_active_gc_optimizer / get_active_profiler as C-level calls (per request).
        self.gc_optimizer = gc_optimizer or registry.getter("gc_optimizer")
        self.profiler = profiler or registry.getter("profiler")
        self.on_request = on_request
        self.rss_reader = rss_reader or shared_reader()

    @property
    def rss_sample_budget(self) -> float | None:
        """The share of request time RSS reads may cost (None: one request in ``every``, always)."""
        return self._rss_budget or None

    @property
    def mean_gap(self) -> float:
        """Requests from one RSS measurement to the next, on average, as the budget has set it."""
        return 1.0 / -math.expm1(self._log_q)

    def next_gap(self) -> int:
        """Requests from one RSS measurement to the next: geometric with mean :attr:`mean_gap`."""
        return 1 + int(math.log(1.0 - _rng.random()) / self._log_q)

    def _note_rss_cost(self, cost_s: float, duration_s: float) -> None:
        """A measured request's reads took ``cost_s`` over its ``duration_s``: set the gap the budget allows.

        Running means of both over measured requests (a random sample of all: a plain mean of the first
        16, then each new one weighs 1/16; a cost counts for at most four times the mean); the mean gap
        is where reads cost ``rss_sample_budget`` of request time, never below ``every``.
        """
        if self._rss_samples:
            cost_s = min(cost_s, _RSS_COST_CLAMP * self._rss_cost_s)
        n = self._rss_samples = min(self._rss_samples + 1, _RSS_MEAN_OVER)
        cost = self._rss_cost_s + (cost_s - self._rss_cost_s) / n
        duration = self._rss_duration_s + (duration_s - self._rss_duration_s) / n
        self._rss_cost_s, self._rss_duration_s = cost, duration
        allowed = self._rss_budget * duration
        gap = cost / allowed if allowed > 0.0 else float(_MAX_RSS_GAP)
        self._log_q = math.log1p(-1.0 / min(float(_MAX_RSS_GAP), max(float(self.every), gap)))

    def begin(self, method: str = "GET") -> RequestMeasurement:
        """Start measuring a request."""
        return PyRequestMeasurement(self, method)

    def deliver(self, metrics: RequestMetrics) -> None:
        """Hand finished metrics to the profiler, ``on_request`` and the listeners; never raises."""
        try:
            # Every request, measured or not: the leak profiler's route attribution regresses a site's
            # growth on per-route request counts, which thinning would blur.
            profiler = self.profiler()
            if profiler is not None:
                profiler.record_request(
                    metrics.route, metrics.rss_delta if metrics.sampled else None, metrics.traced_delta,
                    metrics.duration_s,
                )
        except Exception:
            _count_error()
        if self.on_request is not None:
            try:
                self.on_request(metrics)
            except Exception:
                _count_error()
        for listener in _listeners:
            try:
                listener(metrics)
            except Exception:
                _count_error()


_crecord = _native.load("_crecord")
if _crecord is not None:
    # The C measurement derives from RequestMeasurement; it counts requests in flight where activity
    # keeps them (in the C module), and uses this module's error count and RNG; each new tuple of
    # listeners is handed over; the registry's own getters are not called but the registry read
    # directly (the same lookup): one truth for each, whichever side runs.
    _CMeasurement: Any = _crecord.configure(
        RequestMeasurement, RequestMetrics, _current, scheduler, _count_error, _rng.random, UNMATCHED_ROUTE,
        KNOWN_METHODS, OTHER_METHOD, tracemalloc.is_tracing, tracemalloc.get_traced_memory, _RSS_REUSE_S,
        registry._active, registry.getter("gc_optimizer"), registry.getter("profiler"),
    )
    _hand_over_listeners = _crecord.set_listeners
    _thread_measurement = _crecord.thread_measurement
    _hand_over_listeners(_listeners)
    _RecorderCore: Any = _crecord.Recorder

    class CRequestRecorder(_RecorderCore, PyRequestRecorder):
        __doc__ = (PyRequestRecorder.__doc__ or "").replace("pure Python: the reference", "C begin/finish")

else:
    CRequestRecorder = None  # type: ignore[assignment,misc]
    _thread_measurement = None

if TYPE_CHECKING:  # both implementations have this interface
    RequestRecorder = PyRequestRecorder
elif _crecord is not None:
    RequestRecorder = CRequestRecorder
else:
    RequestRecorder = PyRequestRecorder
