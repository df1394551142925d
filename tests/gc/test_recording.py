"""Collections are recorded automatically through gc.callbacks, and by hand."""

from __future__ import annotations

import datetime
import gc
import sys
import threading

import pytest

from kotoba_memory.gc_optimizer import GcEvent, GcOptimizer


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def make_cycles(n: int) -> None:
    for _ in range(n):
        a, b = Node(), Node()
        a.other, b.other = b, a


def test_collections_are_recorded_automatically(make_optimizer) -> None:
    optimizer = make_optimizer(adaptive=False)
    optimizer.start()
    before = optimizer.pause_total_ns()
    make_cycles(500)
    gc.collect()
    cursor, events = optimizer.events_since(0)
    assert events, "gc.collect() was not observed"
    assert any(e.generation == 2 for e in events)
    # 500 cycles of two instances: automatic young collections may take some, gc.collect() the rest.
    assert sum(e.collected for e in events) >= 1000
    assert all(isinstance(e, GcEvent) and e.pause_s >= 0 and not e.manual for e in events)
    assert optimizer.pause_total_ns() > before
    assert cursor == events[-1].seq
    # The cursor only returns newer events.
    assert optimizer.events_since(cursor) == (cursor, [])
    gc.collect(0)
    cursor2, newer = optimizer.events_since(cursor)
    assert newer and all(e.seq > cursor for e in newer) and cursor2 == newer[-1].seq


def test_nothing_is_recorded_after_stop(make_optimizer) -> None:
    optimizer = make_optimizer(adaptive=False)
    optimizer.start()
    optimizer.stop()
    assert optimizer._recorder._callback not in gc.callbacks
    total = optimizer.pause_total_ns()
    gc.collect()
    assert optimizer.pause_total_ns() == total


def test_event_ring_is_bounded(make_optimizer) -> None:
    optimizer = make_optimizer(adaptive=False, event_capacity=16)
    optimizer.start()
    for _ in range(40):
        gc.collect(0)
    cursor, events = optimizer.events_since(0)
    assert len(events) == 16
    assert cursor == events[-1].seq and events[0].seq == cursor - 15


def test_manual_record_matches_the_reference_usage(make_optimizer) -> None:
    optimizer = make_optimizer(adaptive=False)
    optimizer.start()
    event = optimizer.record_collection(datetime.timedelta(milliseconds=45), 10_000_000, 0)
    assert event.manual and event.generation == 0 and event.bytes_reclaimed == 10_000_000
    assert event.pause_s == pytest.approx(0.045)
    optimizer.record_collection(0.002, 0, 2)
    analysis = optimizer.analyze()
    assert analysis.bytes_reclaimed == 10_000_000
    assert analysis.generations[0].pause_max_s == pytest.approx(0.045)
    assert 0.0 <= analysis.performance_score < 1.0
    long_pause = [b for b in analysis.bottlenecks if b.kind == "long_pause"]
    assert long_pause and long_pause[0].generation == 0 and 0 < long_pause[0].severity <= 1
    assert "45.0 ms" in long_pause[0].description


@pytest.mark.parametrize(
    ("pause", "nbytes", "generation", "error"),
    [
        (-0.1, 0, 0, ValueError),
        (float("nan"), 0, 0, ValueError),
        (float("inf"), 0, 0, ValueError),
        (datetime.timedelta(seconds=-1), 0, 0, ValueError),
        ("10ms", 0, 0, TypeError),
        (0.01, -1, 0, ValueError),
        (0.01, 1.5, 0, TypeError),
        (0.01, 0, 3, ValueError),
        (0.01, 0, -1, ValueError),
        (0.01, 0, "0", TypeError),
        (0.01, 0, True, TypeError),
    ],
)
def test_bad_manual_records_are_rejected_and_change_nothing(pause, nbytes, generation, error) -> None:
    optimizer = GcOptimizer(adaptive=False)
    optimizer.record_collection(0.001, 10, 1)
    with pytest.raises(error):
        optimizer.record_collection(pause, nbytes, generation)
    _, events = optimizer.events_since(0)
    assert len(events) == 1 and events[0].bytes_reclaimed == 10


def test_events_since_rejects_non_int_cursor() -> None:
    with pytest.raises(TypeError, match="cursor"):
        GcOptimizer(adaptive=False).events_since("0")  # type: ignore[arg-type]


def test_manual_records_from_many_threads_while_gc_runs(make_optimizer) -> None:
    optimizer = make_optimizer(adaptive=False, event_capacity=100_000)
    optimizer.start()
    per_thread = 300

    def work() -> None:
        for i in range(per_thread):
            optimizer.record_collection(0.0001, 1, i % 3)
            make_cycles(5)
            if i % 50 == 0:
                gc.collect(0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    _, events = optimizer.events_since(0)
    manual = [e for e in events if e.manual]
    assert len(manual) == 4 * per_thread
    seqs = [e.seq for e in events]
    assert len(set(seqs)) == len(seqs)
    assert optimizer.analyze().bytes_reclaimed == 4 * per_thread
    assert optimizer._recorder.callback_errors == 0


def test_restart_analyzes_the_new_run_only_and_notes_a_wrapped_ring(make_optimizer) -> None:
    optimizer = make_optimizer(adaptive=False, event_capacity=16)
    optimizer.start()
    for _ in range(30):
        gc.collect(0)
    analysis = optimizer.analyze()
    assert analysis.total_collections >= 30
    assert any("last 16 of" in note for note in analysis.notes)
    total_ns = optimizer.pause_total_ns()
    cursor, _ = optimizer.events_since(0)
    optimizer.stop()
    optimizer.start()
    gc.collect(0)
    again = optimizer.analyze()
    assert 1 <= again.total_collections < 30
    assert optimizer.pause_total_ns() > total_ns  # monotonic for callers that diff it
    newer_cursor, newer = optimizer.events_since(cursor)
    assert newer and newer_cursor > cursor


def test_summary_gives_the_analysis_headline_without_the_analysis(make_optimizer) -> None:
    optimizer = make_optimizer(adaptive=False)
    optimizer.start()
    make_cycles(200)
    gc.collect()
    optimizer.record_collection(datetime.timedelta(milliseconds=30), 1_000, 1)
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection between the two readings
    try:
        summary = optimizer.summary()
        analysis = optimizer.analyze()
    finally:
        if was_enabled:
            gc.enable()
    assert summary["total_collections"] == analysis.total_collections >= 2
    assert summary["total_pause_s"] == pytest.approx(analysis.total_pause_s)
    assert summary["total_pause_s"] >= 0.03  # the explicit record's 30 ms counts too
    assert summary["mode"] == analysis.mode
    # the share's wall time is read a moment apart in the two: the later reading is the smaller share
    assert 0 < analysis.gc_time_share <= summary["gc_time_share"] <= 1.0


def test_events_since_walks_back_to_the_cursor_also_while_collections_land(make_optimizer) -> None:
    optimizer = make_optimizer(adaptive=False, event_capacity=64)
    for i in range(150):  # the ring wrapped: the oldest events are gone
        optimizer._recorder.record_manual(1000 + i, 0, i % 3)
    recorder = optimizer._recorder
    everything = list(recorder.snapshot())
    assert len(everything) == 64
    for cursor in (0, everything[0].seq - 1, everything[0].seq, everything[30].seq, everything[-2].seq,
                   everything[-1].seq, everything[-1].seq + 5):
        expected = [e for e in everything if e.seq > cursor]
        assert recorder.events_since(cursor) == ((expected[-1].seq if expected else cursor), expected)

    # A collection that lands while the ring is walked: walked again, nothing lost or doubled.
    events = recorder._events
    cursor = everything[-3].seq

    class Landing(type(events)):  # type: ignore[misc]
        landed = False

        def __reversed__(self):  # type: ignore[no-untyped-def]
            for n, event in enumerate(super().__reversed__()):
                if n == 1 and not Landing.landed:
                    Landing.landed = True
                    self.append(events[-1]._replace(seq=10_000))
                    raise RuntimeError("deque mutated during iteration")
                yield event

    recorder._events = Landing(events, maxlen=events.maxlen)
    got_cursor, got = recorder.events_since(cursor)
    assert Landing.landed and [e.seq for e in got] == [everything[-2].seq, everything[-1].seq, 10_000]
    assert got_cursor == 10_000


def test_memory_bytes_counts_a_full_ring_from_its_newest_events(make_optimizer) -> None:
    from kotoba_memory.gc_optimizer.events import _SIZED_EVENTS, _event_bytes

    optimizer = make_optimizer(adaptive=False, event_capacity=512)
    recorder = optimizer._recorder
    empty = recorder.memory_bytes()
    for i in range(2000):  # wrapped, with sizes that vary: big and small ints, manual and observed
        recorder.record_manual(1000 + 7 * i, (i % 5) * 100_000, i % 3)
    make_cycles(5000)
    gc.collect()
    events = recorder.snapshot()
    assert len(events) == 512
    exact = sys.getsizeof(recorder._events) + sys.getsizeof(recorder) + sum(map(_event_bytes, events))
    estimate = recorder.memory_bytes()
    assert estimate > empty
    assert abs(estimate - exact) <= 0.05 * exact
    newest = events[-_SIZED_EVENTS:]
    assert estimate == sys.getsizeof(recorder._events) + sys.getsizeof(recorder) + round(
        sum(map(_event_bytes, newest)) * 512 / len(newest)
    )
