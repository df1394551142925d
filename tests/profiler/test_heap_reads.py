"""glibc's heap is read only as often as its cost allows; trends use the readings there are."""

from __future__ import annotations

import time

import pytest

from kotoba_memory.memory_profiler import MemoryProfiler, MemorySample
from kotoba_memory.memory_profiler import profiler as profiler_module
from kotoba_memory.memory_profiler._leaks import Growth
from kotoba_memory.memory_profiler._temporal import linear_fit
from kotoba_memory.memory_profiler.profiler import _SampleGrowth
from kotoba_memory.process import memory as process_memory


def test_a_slow_heap_reading_is_spaced_out_by_its_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []

    def slow_heap() -> int:
        started = time.perf_counter()
        while time.perf_counter() - started < 0.002:  # mallinfo2 on a fragmented multi-arena heap
            pass
        reads.append(1)
        return 100 << 20

    monkeypatch.setattr(process_memory, "heap_in_use_bytes", slow_heap)
    profiler = MemoryProfiler(sample_interval_s=1.0, leak_detection=False)
    for _ in range(30):
        profiler._sample()
    # 2 ms of reading at 0.1% of the CPU of a process at most idle: the next reading is due ~40 s later
    assert len(reads) == 1
    heaps = [s.heap_bytes for s in profiler.samples()]
    assert heaps[0] is not None and heaps[1:] == [None] * 29


def test_a_heap_reading_is_never_further_apart_than_sixty_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    def very_slow_heap() -> int:
        time.sleep(0.02)  # at a 0.1% budget: 400 s to the next reading, more than sixty samples
        return 1 << 20

    monkeypatch.setattr(process_memory, "heap_in_use_bytes", very_slow_heap)
    profiler = MemoryProfiler(sample_interval_s=0.01, leak_detection=False)
    deadline = time.monotonic() + 0.9
    while time.monotonic() < deadline:
        profiler._sample()
        time.sleep(0.01)
    heaps = [s.heap_bytes for s in profiler.samples()]
    assert sum(h is not None for h in heaps) >= 2  # the first, then again within sixty sample intervals


class _SampledEverySecond:
    """The ``time`` module as the profiler sees it when its samples run a second apart, as in a worker."""

    def __init__(self) -> None:
        self._now = time.monotonic()

    def monotonic(self) -> float:
        self._now += 1.0
        return self._now

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def test_a_cheap_heap_reading_is_taken_at_every_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_memory, "heap_in_use_bytes", lambda: 1 << 20)
    monkeypatch.setattr(profiler_module, "_HEAP_READ_BUDGET", 1.0)  # any cost is within it
    # back-to-back calls would make the gap (20x the read's cost at an idle CPU rate) outlast a slow read
    monkeypatch.setattr(profiler_module, "time", _SampledEverySecond())
    profiler = MemoryProfiler(sample_interval_s=1.0, leak_detection=False)
    for _ in range(5):
        profiler._sample()
    assert all(s.heap_bytes is not None for s in profiler.samples())


def sample(t: float, rss: int, heap: int | None) -> MemorySample:
    return MemorySample(t, rss, None, 1000, (0, 0, 0), heap_bytes=heap)


def test_growth_fits_the_sparse_heap_readings_over_rss() -> None:
    # the heap grows 1 KiB/s, read every 5th sample; RSS stays flat (freed memory is not returned)
    samples = [sample(t, 50 << 20, (10 << 20) + 1024 * t if t % 5 == 0 else None) for t in range(60)]
    growth = _SampleGrowth.of_samples(samples).since(0.0)
    assert growth is not None and growth.bytes_per_s == pytest.approx(1024.0)


def test_growth_falls_back_to_rss_when_heap_readings_cover_too_little_of_the_span() -> None:
    samples = [sample(t, (50 << 20) + 2048 * t, (10 << 20) if t < 20 else None) for t in range(60)]
    growth = _SampleGrowth.of_samples(samples).since(0.0)
    assert growth is not None and growth.bytes_per_s == pytest.approx(2048.0)


def test_the_ring_columns_give_the_growth_its_samples_give_also_once_the_ring_wrapped() -> None:
    from kotoba_memory.memory_profiler._ring import SampleRing

    ring = SampleRing(50, 2)
    for t in range(130):  # wrapped twice: the oldest sample is no longer at index 0
        heap = (10 << 20) + 512 * t if t % 3 == 0 else None
        ring.append(float(t), (40 << 20) + 4096 * t, None, 1000 + 7 * t, heap, (0, 0, 0), {})
    from_columns = _SampleGrowth(*ring.growth_columns())
    from_samples = _SampleGrowth.of_samples(ring.samples())
    for start in (0.0, 85.0, 120.0, 127.0):
        assert from_columns.since(start) == from_samples.since(start)
    growth = from_columns.since(0.0)
    assert growth is not None and growth.bytes_per_s == pytest.approx(512.0)  # the heap readings
    assert growth.blocks_per_s == pytest.approx(7.0) and growth.span_s == pytest.approx(49.0)
    assert from_columns.since(127.0) is None  # three samples are too few for a fit


def test_the_leak_verdict_makes_no_sample_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fleet publisher asks for the verdict every few seconds; with a full ring (an hour of samples)
    # a MemorySample per sample made each ask cost ~10 ms.
    from kotoba_memory.memory_profiler._ring import SampleRing

    profiler = MemoryProfiler(sample_interval_s=1.0, leak_detection=True)
    for _ in range(10):
        profiler._sample()

    def refuse(self: SampleRing) -> list[MemorySample]:
        raise AssertionError("leak_verdict built the sample list")

    monkeypatch.setattr(SampleRing, "samples", refuse)
    leaks, status = profiler.leak_verdict()
    assert leaks == [] and not status.ready


def fit_afresh(
    ts: list[float], rss: list[int], heap: list[int], blocks: list[int], start: float
) -> Growth | None:
    """The reference the running sums must agree with: each window fitted from scratch (samples in
    time order; heap -1 where it was not read)."""
    window = [i for i, t in enumerate(ts) if t >= start]
    if len(window) < 4:
        return None
    xs = [ts[i] for i in window]
    readings = [(ts[i], float(heap[i])) for i in window if heap[i] >= 0]
    if len(readings) >= 4 and readings[-1][0] - readings[0][0] >= 0.5 * (xs[-1] - xs[0]):
        bytes_slope, bytes_err, _ = linear_fit([t for t, _ in readings], [h for _, h in readings])
    else:
        bytes_slope, bytes_err, _ = linear_fit(xs, [float(rss[i]) for i in window])
    block_slope, block_err, _ = linear_fit(xs, [float(blocks[i]) for i in window])
    return Growth(bytes_slope, bytes_err, block_slope, block_err, xs[-1] - xs[0])


@pytest.mark.parametrize("seed", range(6))
def test_the_running_sums_fit_what_a_fit_of_each_window_finds(seed: int) -> None:
    import random

    rng = random.Random(seed)
    n = rng.choice([5, 60, 900, 3600])
    t0 = 1.8e9 + rng.random() * 1e6  # wall-clock seconds: their squares would cancel without centring
    ts = [t0 + i + rng.random() * 0.2 for i in range(n)]
    rss = [int(3e8 + 7_000 * i * rng.choice([0, 1]) + rng.randrange(1 << 20)) for i in range(n)]
    heap = [int(2e8 + 900 * i + rng.randrange(1 << 16)) if rng.random() < 0.1 else -1 for i in range(n)]
    blocks = [400_000 + 3 * i + rng.randrange(50) for i in range(n)]
    summed = _SampleGrowth(ts, rss, heap, blocks)
    for start in [ts[0] - 5, *(rng.uniform(ts[0], ts[-1]) for _ in range(20)), ts[-3]]:
        fast, slow = summed.since(start), fit_afresh(ts, rss, heap, blocks, start)
        assert (fast is None) == (slow is None)
        if fast is None or slow is None:
            continue
        assert fast.span_s == slow.span_s
        for got, want in zip(
            (fast.bytes_per_s, fast.bytes_stderr, fast.blocks_per_s, fast.blocks_stderr),
            (slow.bytes_per_s, slow.bytes_stderr, slow.blocks_per_s, slow.blocks_stderr),
        ):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_samples_out_of_time_order_are_fitted_in_time_order() -> None:
    # The wall clock was set back twice: the ring holds the samples in the order they were taken.
    ts = [100.0, 101.0, 102.0, 50.0, 51.0, 103.0, 104.0, 30.0, 105.0, 106.0]
    rss = [1000 * int(t) for t in ts]
    heap = [2000 * int(t) if i % 2 else -1 for i, t in enumerate(ts)]
    blocks = [3 * int(t) for t in ts]
    growth = _SampleGrowth(ts, rss, heap, blocks)
    order = sorted(range(len(ts)), key=ts.__getitem__)
    in_order = [[column[i] for i in order] for column in (ts, rss, heap, blocks)]
    for start in (0.0, 50.5, 101.0, 103.5, 104.5):
        got, want = growth.since(start), fit_afresh(*in_order, start)  # type: ignore[arg-type]
        assert (got is None) == (want is None), start
        if got is not None and want is not None:
            assert got.span_s == want.span_s
            assert got.bytes_per_s == pytest.approx(want.bytes_per_s, rel=1e-9)
            assert got.blocks_per_s == pytest.approx(want.blocks_per_s, rel=1e-9)
    whole = growth.since(0.0)
    assert whole is not None and whole.span_s == 76.0  # from 30 to 106, not from the first to the last taken
    assert whole.blocks_per_s == pytest.approx(3.0)
