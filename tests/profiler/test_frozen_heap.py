"""The survival census under a GC optimizer that keeps the heap frozen (``gc.freeze()`` hides objects
from ``gc.get_objects()``): a ring buffer's entries must still be seen to die, a leak's to survive, and
the heap the census thawed must be frozen again."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

THIS_FILE = str(Path(__file__).resolve())


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def _frozen_heap_verdict() -> dict[str, Any]:
    """Run a ring buffer and a leak, both held by containers the GC optimizer froze; report verdicts."""
    import gc
    import time

    from kotoba_memory.gc_optimizer import GcOptimizer
    from kotoba_memory.memory_profiler import MemoryProfiler

    ring: deque[dict[str, str]] = deque(maxlen=100)  # bounded: replaced every few windows
    kept: dict[int, dict[str, list[str]]] = {}
    gc_optimizer = GcOptimizer(warmup_requests=5)
    gc_optimizer.start()
    profiler = MemoryProfiler(
        sample_interval_s=0.05, window_s=0.25, window_interval_s=0.3, first_window_after_s=0.05
    )
    profiler.start()
    counter = itertools.count()
    refroze = False
    try:
        deadline = time.monotonic() + 40
        while profiler.stats().windows < 10 and time.monotonic() < deadline:
            i = next(counter)
            ring.append({"path": "/recent", "note": str(i) * 8})  # churn: a bounded ring buffer
            kept[i] = {"lines": [str(i)] * 4}  # the leak: every request adds an entry
            # Cyclic garbage: automatic collections inside requests then leave the boundary nothing to
            # collect, as in a busy worker (which never refroze after a census thawed its heap).
            junk = [_Node() for _ in range(400)]
            del junk
            gc_optimizer.on_request_end()
            refroze = refroze or gc_optimizer.refreezes_heap
            time.sleep(0.001)
        analysis = profiler.analyze()
        profiler.stop()  # no census thaws the heap from here on
        frozen_before = gc.get_freeze_count()
        # A request the monitor took for a long one holds the refreeze back until it sees one end.
        settle = time.monotonic() + 10
        while gc.get_freeze_count() == 0 and time.monotonic() < settle:
            gc_optimizer.on_request_start()
            gc_optimizer.on_request_end()
            time.sleep(0.01)
        frozen = gc.get_freeze_count()
    finally:
        profiler.stop()
        gc_optimizer.stop()
    return {
        "sites": [(leak.allocation_site, leak.confidence) for leak in analysis.memory_leaks],
        "evidence": [leak.evidence for leak in analysis.memory_leaks],
        "refroze": refroze,
        "thaws": analysis.stats.heap_thaws,
        "frozen_at_end": frozen,
        "frozen_before": frozen_before,
        "refreezes": gc_optimizer.refreezes,
    }


def test_ring_buffer_and_leak_behind_a_frozen_heap() -> None:
    code = (
        "import json, runpy\n"
        f"ns = runpy.run_path({THIS_FILE!r})\n"
        "print(json.dumps(ns['_frozen_heap_verdict']()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    lines = Path(THIS_FILE).read_text().splitlines()
    leak_line = next(i for i, text in enumerate(lines, 1) if "# the leak: every" in text)
    ring_line = next(i for i, text in enumerate(lines, 1) if "# churn: a bounded ring" in text)
    assert verdict["refroze"], verdict  # the optimizer did freeze the heap
    assert verdict["thaws"] > 0, verdict  # and the census saw past it
    # The heap is frozen again by the next request ends, whatever the last census left.
    assert verdict["frozen_at_end"] > 1_000 and verdict["refreezes"] > 0, verdict
    sites = dict(verdict["sites"])
    assert sites.get(f"{THIS_FILE}:{leak_line}", 0) >= 0.8, verdict
    assert f"{THIS_FILE}:{ring_line}" not in sites, verdict
