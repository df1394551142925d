"""The fleet spool: snapshots written and read back, dead and reused pids pruned, untrusted files refused."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kotoba_memory import fleet
from kotoba_memory.config import MemoryConfig
from kotoba_memory.optimizer import MemoryOptimizer, OptimizerError
from kotoba_memory.report import MemoryReport, MemoryStats

ROOT = Path(__file__).resolve().parents[2]


def files(spool: fleet.FleetSpool) -> list[str]:
    return sorted(p.name for p in spool.directory.iterdir())


def test_snapshot_round_trip_and_a_dead_process_is_pruned(tmp_path: Path) -> None:
    spool = fleet.FleetSpool(tmp_path / "base" / "spool")
    ours = fleet.snapshot_from_report(None, name="app")
    spool.write(ours)
    code = (
        "import sys; from kotoba_memory import fleet; "
        "print(fleet.FleetSpool(sys.argv[1]).write(fleet.snapshot_from_report(None)))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "core"))
    child = subprocess.run(
        [sys.executable, "-c", code, str(spool.directory)], check=True, capture_output=True, text=True,
        env=env,
    )
    child_file = Path(child.stdout.strip())
    assert child_file.exists()  # the child has exited: its snapshot is left behind
    rows = spool.read()
    assert [row["pid"] for row in rows] == [os.getpid()]
    assert rows[0]["rss_bytes"] > 0 and rows[0]["optimizer"] is False
    assert not child_file.exists()  # pruned on read
    assert files(spool) == [f"{os.getpid()}.json"]
    assert (spool.directory.stat().st_mode & 0o777) == 0o700
    assert (spool.directory.parent.stat().st_mode & 0o777) == 0o700  # the base we created too
    assert ((spool.directory / f"{os.getpid()}.json").stat().st_mode & 0o777) == 0o600


def test_a_reused_pid_is_not_taken_for_the_process_that_wrote_the_snapshot(tmp_path: Path) -> None:
    spool = fleet.FleetSpool(tmp_path)
    stale = fleet.snapshot_from_report(None)
    stale["created_at"] = float(stale["created_at"]) - 3600  # written by an earlier process with our pid
    spool.write(stale)
    assert spool.read() == []
    assert files(spool) == []


def test_untrusted_files_are_refused_and_never_followed(tmp_path: Path) -> None:
    spool = fleet.FleetSpool(tmp_path)
    spool.write(fleet.snapshot_from_report(None))
    pid = os.getpid()
    # A live process of our own (not the parent: a runner started under nohup has pid 1 as its parent,
    # and its file would then be the "1.json" below): only the content can make these files invalid.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / f"{alive.pid}.json").write_bytes(b"\x80\x04K\x01.")  # a pickle, not JSON
        (tmp_path / "1.json").write_text(json.dumps({"schema": fleet.SCHEMA, "pid": pid}))  # another pid
        secret = tmp_path / "secret.txt"
        secret.write_text(json.dumps({"schema": fleet.SCHEMA, "pid": 2}))
        os.symlink(secret, tmp_path / "2.json")
        rows = spool.read(prune=False)
    finally:
        alive.kill()
        alive.wait()
    assert [row["pid"] for row in rows] == [pid]
    assert spool.rejected == 2  # the pickle and the misnamed one; the symlink is not even opened
    big = fleet.snapshot_from_report(None)
    big["name"] = "x" * fleet.MAX_FILE_BYTES
    with pytest.raises(ValueError, match="limit"):
        spool.write(big)
    with pytest.raises(ValueError, match="pid"):
        spool.write({"pid": "1"})


def test_a_spool_others_may_write_into_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    planted = fleet.snapshot_from_report(None)
    (directory / f"{os.getpid()}.json").write_text(json.dumps(planted))  # e.g. by another user
    with pytest.raises(fleet.FleetError, match="writable by others"):
        fleet.FleetSpool(directory).write(fleet.snapshot_from_report(None))
    with pytest.raises(fleet.FleetError, match="writable by others"):
        fleet.FleetSpool(directory).read()  # never trusted
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, tmp_path / "link")
    with pytest.raises(fleet.FleetError, match="not a directory"):
        fleet.FleetSpool(tmp_path / "link").write(fleet.snapshot_from_report(None))


def test_many_dead_snapshots_are_all_pruned(tmp_path: Path) -> None:
    spool = fleet.FleetSpool(tmp_path)
    spool.write(fleet.snapshot_from_report(None))
    template = fleet.snapshot_from_report(None)
    for i in range(fleet.MAX_FILES + 20):
        dead = dict(template, pid=5_000_000 + i)  # above any pid_max: never a live process
        (tmp_path / f"{dead['pid']}.json").write_text(json.dumps(dead))
    assert [row["pid"] for row in spool.read()] == [os.getpid()]
    assert files(spool) == [f"{os.getpid()}.json"]


def test_spool_directory_is_named_after_the_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOTOBA_MEMORY_FLEET_DIR", str(tmp_path))
    first = fleet.spool_dir("django:site.settings:/srv/a/site/settings.py")
    assert first.parent == tmp_path and first.name.startswith("fleet-django-site.settings-srv-a")
    assert fleet.spool_dir("django:site.settings:/srv/b/site/settings.py") != first
    assert fleet.spool_dir("django:site.settings:/srv/a/site/settings.py") == first
    with pytest.raises((TypeError, ValueError)):
        fleet.spool_dir("")


def test_default_spools_live_in_memory_where_the_machine_has_a_dev_shm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOTOBA_MEMORY_FLEET_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    uid = os.geteuid()
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(fleet, "_SHM_DIR", str(shm))
    assert fleet.default_base_dir() == shm / f"kotoba-memory-{uid}"
    shm.chmod(0o500)  # there, but not ours to write into: the temporary directory instead
    try:
        if not os.access(shm, os.W_OK):  # root may write anyway
            assert fleet.default_base_dir() == Path(tempfile.gettempdir()) / f"kotoba-memory-{uid}"
    finally:
        shm.chmod(0o700)
    monkeypatch.setattr(fleet, "_SHM_DIR", str(tmp_path / "absent"))
    assert fleet.default_base_dir() == Path(tempfile.gettempdir()) / f"kotoba-memory-{uid}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert fleet.default_base_dir() == tmp_path / "kotoba-memory"


def test_the_default_spool_works_end_to_end_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOTOBA_MEMORY_FLEET_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    spool = fleet.FleetSpool.for_name(f"kotoba-test-{os.getpid()}")
    if os.path.isdir("/dev/shm"):
        assert str(spool.directory).startswith("/dev/shm/")
    try:
        spool.write(fleet.snapshot_from_report(None))
        assert [r["pid"] for r in spool.read()] == [os.getpid()]
        assert stat.S_IMODE(os.stat(spool.directory).st_mode) == 0o700
    finally:
        spool.remove()
        spool.directory.rmdir()


def row(pid: int, ppid: int, rss: int, **extra: object) -> dict[str, object]:
    return {"pid": pid, "ppid": ppid, "rss_bytes": rss, "written_at": 100.0, **extra}


def test_fleet_view_lists_one_server_from_inside_and_every_server_from_outside() -> None:
    rows = [
        row(100, 1, 50, requests=0),  # a --preload master: parent of 101 and 102
        row(101, 100, 70, requests=5, cache={"hits": 3, "misses": 1}, leak_suspects=1),
        row(102, 100, 80, requests=7, cache={"hits": 1, "misses": 3}, gc={"collections": 4}),
        row(201, 200, 90, requests=1),  # a worker of another server of the same app
    ]
    mine, totals = fleet.fleet_view(rows, viewer_pid=101, now=102.0)
    assert [(r["pid"], r["role"]) for r in mine] == [(101, "worker"), (102, "worker"), (100, "master")]
    assert totals["workers"] == 2 and totals["processes"] == 3 and totals["servers"] == [100]
    assert totals["rss_bytes"] == 200 and totals["worker_rss_bytes"] == 150
    assert totals["requests"] == 12 and totals["leak_suspects"] == 1 and totals["gc_collections"] == 4
    assert totals["cache_hit_rate"] == pytest.approx(0.5)
    assert mine[0]["age_s"] == pytest.approx(2.0)
    everyone, totals = fleet.fleet_view(rows, viewer_pid=None)
    assert {r["pid"] for r in everyone} == {100, 101, 102, 201}
    assert totals["servers"] == [100, 200] and totals["workers"] == 3


def test_a_shared_stores_entries_are_counted_once_across_workers() -> None:
    def cache(name: str, hits: int, entries: int, shared: bool) -> dict[str, object]:
        return {"name": name, "hits": hits, "misses": 1, "entries": entries, "bytes": entries * 10,
                "evictions": 0, "shared": shared}

    rows = [  # two workers read the same Redis prefix at slightly different times; each has its own LRU
        row(101, 100, 70, caches=[cache("redis:app:", 5, 1000, True), cache("local", 2, 40, False)]),
        row(102, 100, 80, caches=[cache("redis:app:", 7, 1003, True), cache("local", 3, 60, False)]),
    ]
    _, totals = fleet.fleet_view(rows, viewer_pid=101, now=101.0)
    by_name = {c["name"]: c for c in totals["caches"]}
    assert (by_name["redis:app:"]["entries"], by_name["redis:app:"]["bytes"]) == (1003, 10030)
    assert by_name["redis:app:"]["hits"] == 12 and by_name["redis:app:"]["shared"] is True
    assert (by_name["local"]["entries"], by_name["local"]["shared"]) == (100, False)


def test_report_shows_the_workers_rows_and_totals() -> None:
    stats = MemoryStats(1.0, 1.0, 1.0, "rss/peak", 1 << 20, 1 << 20)
    rows, totals = fleet.fleet_view(
        [
            row(41, 40, 60 << 20, peak_rss_bytes=61 << 20, requests=9, optimizer=True, leak_suspects=1,
                leaks=[{"allocation_site": "app.py:12", "route": "/leak"}], gc={"collections": 3}),
            row(42, 40, 70 << 20, requests=2, optimizer=True, leak_suspects=0,
                cache={"hits": 1, "misses": 0}),
        ],
        viewer_pid=41,
    )
    report = MemoryReport(0.0, 1.0, {}, stats, workers=rows, fleet=totals)
    text = report.summary()
    assert "workers: 2 (2 processes), RSS 130.0 MiB in all, 11 requests, 1 leak suspects" in text
    assert "pid 41 (worker): RSS 60.0 MiB (peak 61.0 MiB), 9 requests" in text
    assert "leaks 1: app.py:12 [route /leak]" in text
    page = report.to_html()
    assert "<h2>Workers</h2>" in page and "<td class=\"num\">42</td>" in page
    data = json.loads(report.to_json())
    assert [w["pid"] for w in data["workers"]] == [41, 42] and data["fleet"]["workers"] == 2
    alone = MemoryReport(0.0, 1.0, {}, stats)
    assert "workers:" not in alone.summary() and "Workers" not in alone.to_html()


def test_a_forked_child_publishes_its_own_snapshot(tmp_path: Path) -> None:
    spool = fleet.FleetSpool(tmp_path)
    publisher = fleet.FleetPublisher(spool, name="app", report=lambda: None)
    assert publisher.publish() is not None
    pid = os.fork()
    if pid == 0:  # the child: its snapshot goes to <child pid>.json, the parent's stays as it was
        try:
            written = publisher.publish()
            mine = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
            ok = written is not None and mine["pid"] == os.getpid() and mine["forks"] >= 1
            os._exit(0 if ok else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r["pid"] for r in spool.read()] == [os.getpid()]  # the child is dead: pruned


def test_publisher_task_writes_until_stopped(tmp_path: Path) -> None:
    config = MemoryConfig(enable_caching=True, enable_profiling=False, enable_gc_optimization=False)
    optimizer = MemoryOptimizer(config)
    optimizer.start()
    assert optimizer.cache is not None  # built on first use: the snapshot lists it from then on
    optimizer.cache.put("k", b"v")
    optimizer.cache.get("k")
    spool = fleet.FleetSpool(tmp_path)
    publisher = fleet.FleetPublisher(spool, name="app", interval_s=0.05)
    try:
        publisher.start()
        deadline = time.monotonic() + 10
        while not spool.read() and time.monotonic() < deadline:
            time.sleep(0.02)
        [snapshot] = spool.read()
        assert snapshot["optimizer"] is True and snapshot["cache"]["name"] == "kotoba-memory"
        assert snapshot["cache"]["hits"] == 1
        # the busiest live caches of the process (others may be alive here too), each with its users
        assert 0 < len(snapshot["caches"]) <= 12 and all("uses" in c for c in snapshot["caches"])
        assert snapshot["gc"] is None and snapshot["leak_suspects"] is None  # those features are off
    finally:
        publisher.stop()
        optimizer.stop()
    assert not publisher.running and files(spool) == []


def test_publisher_reports_a_write_failure_once_and_keeps_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    publisher = fleet.FleetPublisher(fleet.FleetSpool(blocker / "spool"), report=lambda: None)
    assert publisher.publish() is None and publisher.publish() is None
    assert publisher.errors == 2
    assert len([r for r in caplog.records if "fleet snapshot" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="interval_s"):
        fleet.FleetPublisher(fleet.FleetSpool(tmp_path), interval_s=0)


def test_a_dead_worker_not_yet_reaped_counts_as_dead(tmp_path: Path) -> None:
    spool = fleet.FleetSpool(tmp_path)
    pid = os.fork()
    if pid == 0:
        try:
            spool.write(fleet.snapshot_from_report(None))
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10  # wait until the child is a zombie (exited, not reaped)
        while time.monotonic() < deadline:
            state = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]
            if state == b"Z":
                break
            time.sleep(0.01)
        assert state == b"Z"
        assert (tmp_path / f"{pid}.json").exists()
        assert spool.read() == []
        assert not (tmp_path / f"{pid}.json").exists()
    finally:
        os.waitpid(pid, 0)


def test_a_slow_snapshot_stretches_the_interval(tmp_path: Path) -> None:
    def slow_report() -> None:
        started = time.thread_time()
        while time.thread_time() - started < 0.02:  # e.g. a report built while tracemalloc traces everything
            pass

    publisher = fleet.FleetPublisher(fleet.FleetSpool(tmp_path), interval_s=1.0, report=slow_report)
    delay = publisher._tick()
    # 20 ms of CPU at 0.1% of an idle process's CPU would be 400 s: stretched as far as it goes
    assert delay == fleet.MAX_STRETCH * 1.0
    quick = fleet.FleetPublisher(fleet.FleetSpool(tmp_path), interval_s=30.0, report=lambda: None)
    assert quick._tick() == 30.0


def test_the_periodic_snapshot_reads_counters_and_says_what_a_report_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = MemoryConfig(
        enable_caching=True, enable_pooling=False, monitoring_interval_ms=20, leak_window_s=0.2,
        leak_window_interval_s=0.25, leak_trace_budget=None, cache_size_mb=8,
    )
    optimizer = MemoryOptimizer(config)
    optimizer.start()
    try:
        assert optimizer.profiler is not None and optimizer.cache is not None
        for i in range(30):
            optimizer.profiler.record_request(f"/r{i % 3}", 4096, None, 0.001)
            optimizer.cache.put(f"k{i % 5}", b"v" * 100)
            optimizer.cache.get(f"k{i % 7}")
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()  # the same collections in both readings
        try:
            full = fleet.snapshot_from_report(optimizer.report(), name="app")
            brief = fleet.snapshot_from_report(optimizer.brief(), name="app")
        finally:
            if was_enabled:
                gc.enable()
        assert brief.keys() == full.keys()
        for key in ("optimizer", "requests", "leak_suspects", "leaks", "cache"):
            assert brief[key] == full[key], key
        assert brief["requests"] == 30 and brief["cache"]["hits"] == full["cache"]["hits"] > 0
        assert brief["gc"]["collections"] == full["gc"]["collections"] > 0
        assert brief["gc"]["mode"] == full["gc"]["mode"]
        assert [c["name"] for c in brief["caches"]] == [c["name"] for c in full["caches"]]
        # before enough windows both say so, the same way (the seconds-to-go are read a moment apart)
        assert (brief["leak_verdict"] or "").split(";")[0] == (full["leak_verdict"] or "").split(";")[0]

        awaited = asyncio.run(optimizer.abrief())
        assert sum(r["requests"] for r in awaited.routes) == 30 and awaited.gc is not None

        def no_report() -> None:
            raise AssertionError("the periodic snapshot built a full report")

        monkeypatch.setattr(optimizer, "report", no_report)
        written = fleet.FleetPublisher(fleet.FleetSpool(tmp_path), name="app").publish()
        assert written is not None and written["requests"] == 30 and written["gc"]["collections"] > 0
    finally:
        optimizer.stop()
    with pytest.raises(OptimizerError, match="running"):
        optimizer.brief()
