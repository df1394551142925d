"""A fixed-size ring of memory samples stored in preallocated arrays.

Appending allocates nothing that outlives the call, so the profiler's footprint is set when it is
built and its own bookkeeping never shows up as growth of the process it watches.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from kotoba_memory.memory_profiler._models import MemorySample

_NONE = -1


class SampleRing:
    """The last ``capacity`` samples; gauges get a fixed number of preallocated columns."""

    def __init__(self, capacity: int, max_gauges: int) -> None:
        self.capacity = capacity
        self._timestamps = array("d", bytes(8 * capacity))
        self._ints = {name: array("q", bytes(8 * capacity)) for name in
                      ("rss", "traced", "blocks", "heap", "gc0", "gc1", "gc2")}
        self._gauge_columns = [array("d", bytes(8 * capacity)) for _ in range(max_gauges)]
        self._gauge_names: list[str | None] = [None] * max_gauges
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def gauge_column(self, name: str) -> int:
        """The column for gauge ``name`` (reusing a free one); -1 when all columns are taken."""
        if name in self._gauge_names:
            return self._gauge_names.index(name)
        for i, current in enumerate(self._gauge_names):
            if current is None:
                self._gauge_names[i] = name
                self._gauge_columns[i][:] = array("d", [math.nan]) * self.capacity
                return i
        return -1

    def release_gauge(self, name: str) -> None:
        if name in self._gauge_names:
            self._gauge_names[self._gauge_names.index(name)] = None

    def append(
        self,
        timestamp: float,
        rss: int,
        traced: int | None,
        blocks: int,
        heap: int | None,
        gc_counts: tuple[int, int, int],
        gauges: dict[int, float],
    ) -> None:
        i = self._next
        self._timestamps[i] = timestamp
        ints = self._ints
        ints["rss"][i] = rss
        ints["traced"][i] = _NONE if traced is None else traced
        ints["blocks"][i] = blocks
        ints["heap"][i] = _NONE if heap is None else heap
        ints["gc0"][i], ints["gc1"][i], ints["gc2"][i] = gc_counts
        for column, name in enumerate(self._gauge_names):
            if name is not None:
                self._gauge_columns[column][i] = gauges.get(column, math.nan)
        self._next = (i + 1) % self.capacity
        self._count = min(self._count + 1, self.capacity)

    def _order(self) -> range | list[int]:
        if self._count < self.capacity:
            return range(self._count)
        return list(range(self._next, self.capacity)) + list(range(self._next))

    def timestamps(self) -> list[float]:
        return self._ordered(self._timestamps).tolist()

    def column(self, name: str) -> list[int]:
        """One integer series (rss, traced, blocks, heap, gc0..2), oldest first; -1 means unknown."""
        return self._ordered(self._ints[name]).tolist()

    def _ordered(self, data: array[Any]) -> array[Any]:
        """A copy of one column, oldest first (slices: no Python object per sample)."""
        if self._count < self.capacity:
            return data[: self._count]
        return data[self._next:] + data[: self._next]

    def growth_columns(self) -> tuple[array[float], array[int], array[int], array[int]]:
        """Copies of the timestamps, rss, heap and blocks columns, oldest first (-1: not read)."""
        ints = self._ints
        return (
            self._ordered(self._timestamps), self._ordered(ints["rss"]), self._ordered(ints["heap"]),
            self._ordered(ints["blocks"]),
        )

    def samples(self) -> list[MemorySample]:
        out: list[MemorySample] = []
        ints = self._ints
        named = [(c, n) for c, n in enumerate(self._gauge_names) if n is not None]
        for i in self._order():
            traced, heap = ints["traced"][i], ints["heap"][i]
            values = [(name, self._gauge_columns[c][i]) for c, name in named]
            gauges = tuple((name, value) for name, value in values if not math.isnan(value))
            out.append(
                MemorySample(
                    timestamp=self._timestamps[i],
                    rss_bytes=ints["rss"][i],
                    traced_bytes=None if traced == _NONE else traced,
                    allocated_blocks=ints["blocks"][i],
                    gc_counts=(ints["gc0"][i], ints["gc1"][i], ints["gc2"][i]),
                    gauges=gauges,
                    heap_bytes=None if heap == _NONE else heap,
                )
            )
        return out

    def footprint_bytes(self) -> int:
        """Bytes held by the arrays (fixed at construction)."""
        total = self._timestamps.buffer_info()[1] * 8
        total += sum(a.buffer_info()[1] * a.itemsize for a in self._ints.values())
        total += sum(a.buffer_info()[1] * a.itemsize for a in self._gauge_columns)
        return total
