"""The GC optimizer's per-request hooks: ``_crecord.GcHooks`` / ``GcTally`` against the pure-Python
``PyGcHooks`` / ``PyGcTally``, and the request recorder reading them directly (C) or calling them."""

from __future__ import annotations

from typing import Any

import pytest

from kotoba_memory import _native
from kotoba_memory.gc_optimizer import GcOptimizer
from kotoba_memory.gc_optimizer.events import GcRecorder, PyGcTally
from kotoba_memory.gc_optimizer.optimizer import _NEVER, PyGcHooks
from kotoba_memory_integrations import request as _request
from kotoba_memory_integrations.request import PyRequestRecorder, listener_errors

_crecord = _native.load("_crecord")
HOOKS: list[Any] = [PyGcHooks] + ([_crecord.GcHooks] if _crecord is not None else [])
TALLIES: list[Any] = [PyGcTally] + ([_crecord.GcTally] if _crecord is not None else [])
RECORDERS: list[Any] = [PyRequestRecorder] + (
    [_request.CRequestRecorder] if _request.CRequestRecorder is not None else []
)


def hooks_class(base: Any) -> Any:
    class Hooks(base):  # type: ignore[misc,valid-type]
        """Checks every third request, as the optimizer spaces its boundary checks."""

        def __init__(self) -> None:
            super().__init__()
            self.checked: list[int] = []

        def _check_at_boundary(self, n: int) -> None:
            self.checked.append(n)
            self._next_check = n + 3

    return Hooks


def drive(hooks_base: Any, tally_base: Any) -> list[Any]:
    """What one implementation shows over a fixed sequence of ends, pauses and resets."""
    hooks = hooks_class(hooks_base)()
    hooks._recorder = tally_base()
    seen: list[Any] = [hooks.requests_seen, hooks._next_check, hooks.pause_total_ns()]
    for step in range(12):
        if step == 2:
            hooks._next_check = 4
        if step == 7:
            hooks._recorder.pause_total_ns += 1_500
        if step == 9:  # a forked child counts again, its boundary check due soon
            hooks._reset_requests()
            hooks._next_check = 2
        seen.append((hooks.request_ended(), hooks.requests_seen, hooks._next_check, hooks.pause_total_ns()))
    seen.append(hooks.checked)
    return seen


@pytest.mark.skipif(_crecord is None, reason="pure Python in use: C builds only")
def test_the_c_hooks_count_check_and_read_the_pause_as_the_reference_does() -> None:
    reference = drive(PyGcHooks, PyGcTally)
    assert reference[:3] == [0, _NEVER, 0] and reference[3][0] == 1
    assert reference[-1] == [4, 7, 2]  # after the reset at step 9 the count starts again at 1
    for hooks_base in HOOKS:
        for tally_base in TALLIES:
            assert drive(hooks_base, tally_base) == reference, (hooks_base, tally_base)


@pytest.mark.parametrize("hooks_base", HOOKS, ids=lambda c: c.__module__.rsplit(".", 1)[-1])
def test_bad_fields_are_refused_and_a_missing_recorder_says_so(hooks_base: Any) -> None:
    hooks = hooks_class(hooks_base)()
    with pytest.raises(AttributeError, match="_recorder"):
        hooks.pause_total_ns()
    hooks._recorder = PyGcTally()
    assert hooks.pause_total_ns() == 0
    if hooks_base is not PyGcHooks:  # C fields: typed
        with pytest.raises(TypeError):
            hooks._next_check = "soon"
        with pytest.raises(AttributeError):
            hooks.requests_seen = 3
    assert hooks.request_ended() == 1 and hooks.requests_seen == 1


@pytest.mark.skipif(_crecord is None, reason="pure Python in use: C builds only")
def test_the_c_tally_refuses_what_is_not_an_int() -> None:
    tally = _crecord.GcTally()
    tally.pause_total_ns = 5
    for bad, error in ((2.5, TypeError), (True, TypeError), ("7", TypeError), (1 << 80, OverflowError)):
        with pytest.raises(error, match="pause_total_ns"):
            tally.pause_total_ns = bad
    with pytest.raises(TypeError, match="cannot be deleted"):
        del tally.pause_total_ns
    tally.pause_total_ns += 7
    assert tally.pause_total_ns == 12  # nothing stored by the refused values
    hooks = _crecord.GcHooks()
    with pytest.raises(OverflowError):
        hooks._next_check = -(1 << 70)
    assert hooks._next_check == _NEVER
    assert issubclass(GcRecorder, _crecord.GcTally) and issubclass(GcOptimizer, _crecord.GcHooks)


@pytest.mark.parametrize("recorder_cls", RECORDERS, ids=lambda c: c.__name__[:2])
def test_a_request_reports_the_pause_inside_it_and_counts_its_end(recorder_cls: Any) -> None:
    optimizer = GcOptimizer(adaptive=False)
    recorder = recorder_cls(gc_optimizer=lambda: optimizer, profiler=lambda: None, rss_sample_every=1000)
    optimizer._recorder.pause_total_ns += 10_000  # before the request: not its pause
    measurement = recorder.begin("GET")
    optimizer._recorder.pause_total_ns += 2_500  # a collection inside the request
    metrics = measurement.finish()
    assert metrics.gc_pause_ns == 2_500 and optimizer.requests_seen == 1
    # Counts that go backwards (a reset recorder) report no pause, never a negative one.
    measurement = recorder.begin("GET")
    optimizer._recorder.pause_total_ns = 0
    assert measurement.finish().gc_pause_ns == 0 and optimizer.requests_seen == 2


@pytest.mark.parametrize("recorder_cls", RECORDERS, ids=lambda c: c.__name__[:2])
def test_the_boundary_check_runs_when_due_from_the_recorder(recorder_cls: Any) -> None:
    class Checked(GcOptimizer):
        def _check_at_boundary(self, n: int) -> None:
            calls.append(n)
            self._next_check = n + 2

    calls: list[int] = []
    optimizer = Checked(adaptive=False)
    optimizer._next_check = 1
    recorder = recorder_cls(gc_optimizer=lambda: optimizer, profiler=lambda: None, rss_sample_every=1000)
    for _ in range(5):
        recorder.begin("GET").finish()
    assert calls == [1, 3, 5] and optimizer.requests_seen == 5


@pytest.mark.parametrize("recorder_cls", RECORDERS, ids=lambda c: c.__name__[:2])
def test_overridden_hooks_are_called_also_when_patched_after_construction(recorder_cls: Any) -> None:
    class Logged(GcOptimizer):
        def request_ended(self) -> object:
            log.append("ended")
            return super().request_ended()

    log: list[str] = []
    optimizer = Logged(adaptive=False)
    recorder = recorder_cls(gc_optimizer=lambda: optimizer, profiler=lambda: None, rss_sample_every=1000)
    recorder.begin("GET").finish()
    assert log == ["ended"] and optimizer.requests_seen == 1

    plain = GcOptimizer(adaptive=False)
    recorder = recorder_cls(gc_optimizer=lambda: plain, profiler=lambda: None, rss_sample_every=1000)
    recorder.begin("GET").finish()
    original = GcOptimizer.pause_total_ns
    GcOptimizer.pause_total_ns = lambda self: log.append("pause") or 0  # type: ignore[method-assign]
    try:
        recorder.begin("GET").finish()
    finally:
        GcOptimizer.pause_total_ns = original  # type: ignore[method-assign]
    assert log == ["ended", "pause", "pause"] and plain.requests_seen == 2


@pytest.mark.parametrize("recorder_cls", RECORDERS, ids=lambda c: c.__name__[:2])
def test_a_boundary_check_that_raises_is_counted_and_the_request_still_recorded(recorder_cls: Any) -> None:
    class Broken(GcOptimizer):
        def _check_at_boundary(self, n: int) -> None:
            raise RuntimeError("boundary")

    optimizer = Broken(adaptive=False)
    optimizer._next_check = 1
    recorder = recorder_cls(gc_optimizer=lambda: optimizer, profiler=lambda: None, rss_sample_every=1000)
    errors = listener_errors()
    metrics = recorder.begin("GET").finish()
    assert metrics is not None and metrics.gc_pause_ns == 0
    assert listener_errors() == errors + 1 and optimizer.requests_seen == 1
