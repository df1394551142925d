"""Process-level malloc: detection, glibc heap statistics, malloc_trim, arena advice, the launcher."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

import pytest

from kotoba_memory.allocators import (
    AllocatorNotFoundError,
    AllocatorType,
    allocator_stats,
    configure_glibc_malloc,
    detect_allocator,
    find_allocator_library,
    heap_in_use_bytes,
    heap_stats,
    launcher,
    malloc_arena_advice,
    malloc_trim,
    process,
)

GLIBC = detect_allocator().libc == "glibc" and detect_allocator().type is AllocatorType.SYSTEM
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc malloc only")

# What a child process launched through `kotoba-memory run` reports about itself.
_REPORT = (
    "import json; from kotoba_memory.allocators import detect_allocator, heap_stats, malloc_trim; "
    "i = detect_allocator(); h = heap_stats(); t = malloc_trim(); "
    "print(json.dumps({'type': i.type.value, 'library': i.library, 'heap': h.supported, "
    "'reason': h.reason, 'trim': t.supported}))"
)


def _installed(kind: str) -> bool:
    try:
        find_allocator_library(kind)
    except AllocatorNotFoundError:
        return False
    return True


def _launch(*args: str, entry: str = "kotoba_memory.allocators.launcher") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_ARENA_MAX")}
    prefix = [sys.executable, "-m", entry] + (["run"] if entry == "kotoba_memory.cli" else [])
    return subprocess.run(
        [*prefix, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_allocator_type_parsing() -> None:
    assert AllocatorType("JeMalloc") is AllocatorType.JEMALLOC
    assert AllocatorType.parse("mimalloc") is AllocatorType.MIMALLOC
    assert AllocatorType.SYSTEM == "system"
    with pytest.raises(ValueError, match="expected one of: system, jemalloc, mimalloc, custom"):
        AllocatorType.parse("tcmalloc")
    with pytest.raises(TypeError):
        AllocatorType.parse(3)  # type: ignore[arg-type]


def test_detects_this_process() -> None:
    info = detect_allocator()
    assert info.pid == os.getpid()
    assert info.type in (AllocatorType.SYSTEM, AllocatorType.JEMALLOC, AllocatorType.MIMALLOC)
    if sys.platform.startswith("linux"):
        assert info.libc in ("glibc", "musl")


def test_detect_missing_process() -> None:
    with pytest.raises(ProcessLookupError):
        detect_allocator(pid=2**22 + 12345)


@needs_glibc
def test_heap_stats_see_python_allocations() -> None:
    before = heap_stats()
    assert before.supported and before.reason is None
    keep = [bytearray(50_000) for _ in range(200)]  # below the mmap threshold: from the heap
    after = heap_stats()
    assert after.in_use_bytes - before.in_use_bytes >= 200 * 50_000 * 0.9
    assert 0.0 <= after.fragmentation < 1.0
    assert "fragmentation" in after.to_dict()
    del keep


@needs_glibc
def test_heap_in_use_bytes_matches_heap_stats_and_sees_allocations() -> None:
    stats, quick = heap_stats(), heap_in_use_bytes()
    assert quick is not None
    assert abs(quick - (stats.in_use_bytes + stats.mmap_bytes)) < 1_000_000
    keep = [bytearray(50_000) for _ in range(200)]
    grown = heap_in_use_bytes()
    assert grown is not None and grown - quick >= 200 * 50_000 * 0.9
    del keep


@needs_glibc
def test_malloc_trim_releases_freed_heap() -> None:
    blocks = [bytearray(60_000) for _ in range(400)]
    tail = bytearray(60_000)  # keeps the freed chunks below the top of the heap
    del blocks
    freed = heap_stats().free_bytes
    assert freed >= 300 * 60_000
    result = malloc_trim()
    assert result.supported and result.released
    assert result.rss_saved >= 0
    assert result.rss_after <= result.rss_before
    del tail
    with pytest.raises(ValueError):
        malloc_trim(-1)


@needs_glibc
def test_configure_glibc_malloc() -> None:
    # Values that match glibc's own defaults, so the test process is not changed.
    accepted = configure_glibc_malloc(trim_threshold=128 * 1024, mmap_threshold=128 * 1024)
    assert accepted == {"trim_threshold": True, "mmap_threshold": True}
    with pytest.raises(ValueError):
        configure_glibc_malloc(arena_max=0)


def test_unsupported_outside_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    musl = process.AllocatorInfo(AllocatorType.SYSTEM, None, "musl", None, os.getpid())
    monkeypatch.setattr(process, "detect_allocator", lambda pid=None: musl)
    stats = heap_stats()
    assert not stats.supported and "musl" in (stats.reason or "")
    trim = malloc_trim()
    assert not trim.supported and not trim.released
    assert configure_glibc_malloc(arena_max=2) == {"arena_max": False}
    assert malloc_arena_advice(8).recommended is None


@needs_glibc
def test_arena_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    threaded = malloc_arena_advice(threads=8)
    assert threaded.recommended == 2 and threaded.current is None
    assert threaded.default_limit == 8 * (os.cpu_count() or 1)
    assert malloc_arena_advice(threads=1).recommended is None
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert malloc_arena_advice(threads=8).recommended is None
    with pytest.raises(ValueError):
        malloc_arena_advice(threads=0)


@needs_glibc
def test_allocator_stats_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, args=(10,), daemon=True)
    worker.start()
    try:
        snapshot = allocator_stats()
    finally:
        stop.set()
        worker.join(5)
    data = snapshot.to_dict()
    assert data["allocator"]["type"] == "system"
    assert data["heap"]["supported"] and data["rss_bytes"] > 0
    assert any("MALLOC_ARENA_MAX=2" in line for line in snapshot.advice)
    json.dumps(data)


def test_missing_library_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "_ldconfig_paths", dict)
    monkeypatch.setattr(process, "_search_dirs", lambda: ["/nonexistent-kotoba"])
    with pytest.raises(AllocatorNotFoundError, match="libjemalloc2") as info:
        find_allocator_library("jemalloc")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(AllocatorNotFoundError, match=r"libmimalloc2\.0"):
        launcher.build_environment("mimalloc", {})
    with pytest.raises(ValueError, match="not a preloadable"):
        find_allocator_library("system")


def test_build_environment() -> None:
    base = {"LD_PRELOAD": "/opt/libjemalloc.so.2 /opt/libother.so", "PATH": "/bin"}
    system = launcher.build_environment("system", base, arena_max=2)
    assert system["LD_PRELOAD"] == "/opt/libother.so"  # an earlier malloc preload is dropped
    assert system["MALLOC_ARENA_MAX"] == "2" and system[launcher.ENV_MARKER] == "system"
    assert base["LD_PRELOAD"].startswith("/opt/libjemalloc")  # the caller's mapping is untouched
    assert "LD_PRELOAD" not in launcher.build_environment("system", {"LD_PRELOAD": "/x/libmimalloc.so.2"})
    with pytest.raises(ValueError, match="glibc"):
        launcher.build_environment("jemalloc", {}, arena_max=2, library=__file__)
    with pytest.raises(ValueError, match="in-process arena"):
        launcher.build_environment("custom", {})
    with pytest.raises(AllocatorNotFoundError, match="no such file"):
        launcher.build_environment("jemalloc", {}, library="/nonexistent/libjemalloc.so.2")
    env = launcher.build_environment("jemalloc", {"LD_PRELOAD": "/opt/libother.so"}, library=__file__)
    assert env["LD_PRELOAD"] == f"{os.path.abspath(__file__)} /opt/libother.so"


def test_run_registers_as_a_cli_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="kotoba-memory")
    launcher.add_parser(parser.add_subparsers(dest="command_name", required=True))
    args = parser.parse_args(
        ["run", "--allocator", "system", "--arena-max", "2", "--dry-run", "--", "gunicorn", "a:b"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "MALLOC_ARENA_MAX=2" in out and out.strip().endswith("gunicorn a:b")
    args = parser.parse_args(["run", "--allocator", "system"])
    assert args.func(args) == 2
    assert "no command" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["jemalloc", "mimalloc"])
def test_launcher_preloads_the_allocator_into_a_child(kind: str) -> None:
    if not _installed(kind):
        pytest.skip(
            f"{kind} is not installed (Debian package {process.DEBIAN_PACKAGES[AllocatorType(kind)]})"
        )
    # through the real console entry point: kotoba-memory run --allocator <kind> -- python -c ...
    result = _launch("--allocator", kind, "--", sys.executable, "-c", _REPORT, entry="kotoba_memory.cli")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["type"] == kind and kind in report["library"]
    assert report["heap"] is False and kind in report["reason"]  # glibc stats do not apply
    assert report["trim"] is False


def test_launcher_system_child_uses_glibc() -> None:
    result = _launch("--allocator", "system", "--arena-max", "2", "--", sys.executable, "-c", _REPORT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["type"] == "system" and report["library"] is None
    assert report["heap"] is GLIBC


def test_launcher_errors() -> None:
    missing = _launch("--allocator", "system", "--", "kotoba-no-such-command-xyz")
    assert missing.returncode == 127 and "command not found" in missing.stderr
    bad = _launch("--allocator", "jemalloc", "--library", "/nonexistent/libjemalloc.so.2", "--", "true")
    assert bad.returncode == 1 and "libjemalloc2" in bad.stderr


def test_detects_another_process_by_pid() -> None:
    if not _installed("jemalloc"):
        pytest.skip("jemalloc is not installed (Debian package libjemalloc2)")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    child = subprocess.Popen(
        [sys.executable, "-m", "kotoba_memory.allocators.launcher", "--allocator", "jemalloc", "--",
         sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        info = detect_allocator(child.pid)  # the launcher exec'd, so the pid is the python child
        assert info.type is AllocatorType.JEMALLOC and info.pid == child.pid
    finally:
        child.communicate(input="", timeout=30)
    assert child.returncode == 0
