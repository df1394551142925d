"""The pytest plugin, run on example test files in a fresh pytest process (the installed entry point)."""

from __future__ import annotations

import importlib.metadata
import re
import textwrap

import pytest

from kotoba_memory_integrations.pytest_plugin import measure_leaks, parse_size

pytestmark = pytest.mark.slow

LEAKY_AND_CLEAN = '''import re
import pytest

_kept = []
_cache = {}


def handle(n):
    pattern = re.compile(r"item-(\\d+)")           # re's own cache: filled on the first call
    _cache.setdefault("config", [0] * 1000)        # a first-call cache: not a leak
    return [pattern.match(f"item-{i}") for i in range(n)]


@pytest.mark.kotoba_no_leak
def test_leaks():
    handle(100)
    _kept.append(bytearray(10_000))                 # LEAK-LINE: kept forever


@pytest.mark.kotoba_no_leak
def test_clean():
    assert len(handle(100)) == 100


@pytest.mark.kotoba_no_leak("64 KB", runs=2, warmups=0)
def test_small_leak_under_the_limit():
    _kept.append(bytearray(1_000))
'''


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_example=textwrap.dedent(source))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args)


def test_the_entry_point_registers_the_plugin() -> None:
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert found.get("kotoba_memory") == "kotoba_memory_integrations.pytest_plugin"


def test_catches_a_leak_names_its_line_and_passes_clean_tests(pytester: pytest.Pytester) -> None:
    result = _run(pytester, LEAKY_AND_CLEAN)
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "test_example.py::test_leaks" in out
    leak_line = next(i for i, line in enumerate(LEAKY_AND_CLEAN.splitlines(), 1) if "LEAK-LINE" in line)
    assert f"test_example.py:{leak_line}: +9.8 KiB per run" in out
    assert "grew in every one of 3 runs (after 1 warm-up run(s))" in out


def test_plugin_is_inert_for_unmarked_tests(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        '''
        import sys, tracemalloc

        def test_plain():
            assert not tracemalloc.is_tracing()
            assert "kotoba_memory" not in sys.modules   # the plugin imports no component
        ''',
    )
    result.assert_outcomes(passed=1)


def test_limit_memory_fails_above_and_passes_below(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        '''
        import pytest

        def build():
            block = bytearray(40 << 20)   # 40 MiB, freed before the test ends
            return len(block)

        @pytest.mark.kotoba_limit_memory("24 MB")
        def test_too_much():
            assert build() == 40 << 20

        @pytest.mark.kotoba_limit_memory("64 MB")
        def test_within():
            assert build() == 40 << 20
        ''',
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*peak traced memory was 40.* MiB, above its limit of 24.0 MiB*"])


def test_route_verdicts_name_the_leaking_route(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        '''
        import pytest
        from kotoba_memory_integrations.request import set_current_route
        from kotoba_memory_integrations.wsgi import MemoryMiddleware

        kept = []

        def app(environ, start_response):
            path = environ["PATH_INFO"]
            set_current_route(path)
            if path == "/leak":
                kept.append(bytearray(50_000))
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]

        wrapped = MemoryMiddleware(app)

        def get(path):
            body = wrapped({"REQUEST_METHOD": "GET", "PATH_INFO": path}, lambda *a: None)
            list(body)
            body.close()

        @pytest.mark.kotoba_no_leak
        def test_pages():
            get("/fine")
            get("/leak")
        ''',
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "routes that kept traced memory (kotoba-memory middleware):" in out
    # 50,000 bytes a request, plus or minus what the interpreter itself keeps around it
    kept = re.search(r"/leak: 3 request\(s\), \+(\d+\.\d) KiB kept per request", out)
    assert kept is not None, out
    assert 48.0 <= float(kept.group(1)) <= 50.0, out
    assert "/fine:" not in out.split("routes that kept")[1]


def test_gc_fixture_runs_an_optimizer_and_checks_it_restores(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        '''
        import gc

        def test_uses_gc(kotoba_gc):
            assert kotoba_gc.running
            kotoba_gc.on_request_start()
            garbage = [[] for _ in range(1000)]
            for item in garbage:
                item.append(item)
            del garbage
            kotoba_gc.on_request_end()
            assert kotoba_gc.analyze() is not None
        ''',
    )
    result.assert_outcomes(passed=1)


def test_bad_marker_arguments_are_named(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        '''
        import pytest

        @pytest.mark.kotoba_limit_memory("24 MBs")
        def test_bad_unit():
            pass

        @pytest.mark.kotoba_no_leak(runs=0)
        def test_bad_runs():
            pass
        ''',
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*limit must look like '24 MB'*got '24 MBs'*"])
    result.stdout.fnmatch_lines(["*runs must be an int >= 1, got 0*"])


def test_measure_leaks_on_a_callable() -> None:
    kept: list[bytes] = []
    leaky = measure_leaks(lambda: kept.append(b"x" * 5000), runs=3)
    assert not leaky.ok
    assert leaky.sites[0].site == f"{__file__}:{_line('kept.append')}"
    assert all(growth > 5000 for growth in leaky.sites[0].growth_per_run)
    assert measure_leaks(lambda: [b"x" * 5000 for _ in range(10)], runs=3).ok


def _line(needle: str) -> int:
    with open(__file__) as source:
        return next(i for i, line in enumerate(source, 1) if needle in line and "measure_leaks(" in line)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24 MB", 24 << 20), ("0 B", 0), ("512KiB", 512 << 10), ("1.5 GB", 3 << 29), (7, 7), ("3", 3)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["24 MBs", "", "-1 MB", "MB", -1, 1.5, True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises((ValueError, TypeError), match="limit"):
        parse_size(bad)  # type: ignore[arg-type]
