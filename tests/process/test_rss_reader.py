"""RssReader with its reads in C (``_crecord.RssCore``) against the pure-Python reference, on the same
``statm`` contents, and the request recorder reading through it without a Python frame."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kotoba_memory.process.memory import PyRssReader, RssReader

IMPLEMENTATIONS = [PyRssReader] + ([RssReader] if RssReader is not PyRssReader else [])
needs_c = pytest.mark.skipif(RssReader is PyRssReader, reason="pure Python in use: no C reader")

PARSEABLE = [b"100 25 3 1 0 20 0\n", b"100 25", b"7 0 0", b"100 25\n", b"100 +25 1", b"100 2_5 1"]
UNPARSEABLE = [b"abc def", b"", b"100 x 3", b"100  25 1", b"100"]


def _read(cls: type[PyRssReader], path: Path) -> tuple[int, PyRssReader]:
    reader = cls()
    fd = reader._fd = os.open(path, os.O_RDONLY)
    try:
        return reader.rss(), reader
    finally:
        if reader._fd == fd:
            reader.close()
        else:  # the reader dropped it, unclosed: a descriptor that is not its statm is not its to close
            os.close(fd)
            reader.close()


@pytest.mark.parametrize("content", PARSEABLE)
def test_both_readers_read_a_statm_line_alike(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "statm"
    path.write_bytes(content)
    values = []
    for cls in IMPLEMENTATIONS:
        value, reader = _read(cls, path)
        assert reader._last[0] == value and reader.peak == value
        values.append(value)
    pages = int(content.split(b" ", 2)[1])
    assert values == [pages * os.sysconf("SC_PAGE_SIZE")] * len(IMPLEMENTATIONS)


@pytest.mark.parametrize("content", UNPARSEABLE)
def test_a_line_neither_can_parse_falls_back_to_psutil(tmp_path: Path, content: bytes) -> None:
    import psutil

    path = tmp_path / "statm"
    path.write_bytes(content)
    for cls in IMPLEMENTATIONS:
        value, reader = _read(cls, path)
        assert abs(value - psutil.Process().memory_info().rss) < 64 << 20, cls
        assert reader._last[0] == value


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_readings_are_stamped_with_time_monotonic(cls: type[PyRssReader]) -> None:
    import time

    reader = cls()
    reader.rss()  # the C reader's first read opens the descriptor through the reference's path
    before = time.monotonic()
    value = reader.rss()  # ...and this one is its own
    after = time.monotonic()
    assert reader._last[0] == value and before <= reader._last[1] <= after
    assert reader.recent(after - reader._last[1] + 3600) == value  # recent() compares on that clock
    reader.close()


@needs_c
def test_the_c_reader_keeps_its_state_where_the_reference_code_sets_it() -> None:
    reader = RssReader()
    assert reader._fd is None and reader._last == (0, -1e18) and reader.peak == 0
    first = reader.rss()  # opens the descriptor through the reference's path, then reads in C
    assert isinstance(reader._fd, int) and reader._last[0] == first and reader.peak >= first
    reader.reset_peak()
    assert reader.peak == 0
    with pytest.raises(TypeError):
        reader._last = "nope"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="_fd"):
        reader._fd = -3
    with pytest.raises(ValueError, match="_page_size"):
        reader._page_size = 0
    reader.reinit_after_fork()
    assert reader._fd is None and reader._last == (0, -1e18) and reader.peak == 0


@needs_c
def test_the_recorder_calls_a_reader_subclass_that_overrides_rss() -> None:
    from kotoba_memory_integrations.request import RequestRecorder

    class Fixed(RssReader):  # type: ignore[misc,valid-type]
        def rss(self) -> int:
            return 4096

        def recent(self, max_age_s: float) -> int:
            return 4096

    recorder = RequestRecorder(rss_reader=Fixed(), rss_sample_every=1, gc_optimizer=lambda: None,
                               profiler=lambda: None)
    metrics = recorder.begin("GET").finish()
    assert metrics is not None and metrics.sampled and metrics.rss_delta == 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_a_descriptor_number_taken_by_another_file_is_dropped_and_reopened(
    tmp_path: Path, cls: type[PyRssReader]
) -> None:
    import psutil

    reader = cls()
    reader.rss()
    number = reader._fd
    assert number is not None and reader.descriptor_is_ours()
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    os.write(other, b"not statm")
    os.dup2(other, number)  # what a double close elsewhere and a reuse of the number do
    try:
        value = reader.rss()  # the read fails, the descriptor is checked, dropped and reopened
        assert abs(value - psutil.Process().memory_info().rss) < 64 << 20
        assert reader._fd not in (None, number) and reader.descriptor_is_ours()
        os.pwrite(other, b"7 3 0 0 0 0 0", 0)  # a reused number that parses: the check catches it
        reader._fd = number
        assert not reader.descriptor_is_ours() and reader._fd is None
    finally:
        os.close(number)  # still open: the reader never closes a descriptor that is not its own
        os.close(other)
        reader.close()
