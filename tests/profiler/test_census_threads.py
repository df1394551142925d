"""A census never breaks another thread's ``tuple(iterable)``: CPython resizes the tuple it is building
only while nobody else refers to it, and the collector lists it before it is complete."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kotoba_memory.memory_profiler._survival import _heap, _listed_objects

CODE = textwrap.dedent(
    """
    import sys, threading, time
    from kotoba_memory.memory_profiler._survival import _heap

    sys.setswitchinterval(1e-5)  # hand the GIL over as often as CPython allows
    errors, done = [], threading.Event()

    def build():
        while not done.is_set():
            try:
                tuple(x for x in range(7))  # resized at the end from 10 slots to 7
            except SystemError as exc:
                errors.append(repr(exc))
                return

    thread = threading.Thread(target=build)
    thread.start()
    censuses, deadline = 0, time.monotonic() + 4
    while time.monotonic() < deadline and not errors:
        for level in _heap():
            sum(1 for _ in level[:2000])  # bytecode while the census holds each level
        censuses += 1
    done.set()
    thread.join()
    print(censuses, errors)
    """
)


def test_a_census_never_breaks_a_tuple_another_thread_is_building() -> None:
    # Before the fix the first census already made the builder's tuple() raise SystemError.
    run = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    censuses, errors = run.stdout.split(" ", 1)
    assert errors.strip() == "[]"
    assert int(censuses) >= 3


def test_the_first_level_lists_no_tuple_yet_a_held_tuple_is_found_below() -> None:
    held = [(object(), [1])]  # a tracked tuple (it holds containers) that a list keeps alive
    marker = {"marker": held}
    objects = _listed_objects()
    refs = sys.getrefcount(objects)
    assert not any(type(o) is tuple for o in objects)
    assert any(o is marker for o in objects)
    assert any(o is held[0] for o in next(iter(_heap_levels_below())))
    # The list existed when the collector listed everything, yet does not hold itself (a cycle would
    # keep the whole heap, and so every churned sample, alive until the next collection).
    assert not any(o is objects for o in objects)
    assert refs == 2  # our name and getrefcount's argument


def _heap_levels_below() -> list[list[object]]:
    levels = _heap()
    next(levels)
    return [next(levels)]
