"""DiskCache specifics: persistence, LRU order, purging, checksums, compression, fork, SIGKILL mid-write.

The BaseCache contract (get/put/ttl/stats/bad input/get_or_set/async twins/threads) is in
test_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kotoba_memory.cache_manager.disk import DiskCache, DiskCacheError, DiskCacheStats


def _page(i: int) -> str:
    """An HTML-like page, compressible like real ones."""
    rows = "".join(f"<tr><td>{j}</td><td>item {i}-{j}</td><td>{j * 3.5:.2f}</td></tr>" for j in range(40))
    return f"<html><body><h1>Page {i}</h1><table>{rows}</table></body></html>"


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[DiskCache]:
    c = DiskCache(tmp_path / "c.sqlite3", 1 << 20)
    yield c
    c.close()


def test_survives_restart_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "persist.sqlite3"
    with DiskCache(path, 1 << 20, compression="zlib") as c:
        c.put("page", _page(1))
        c.put("forever", 7)
        c.put("short", "gone soon", ttl=0.05)
    time.sleep(0.1)
    code = textwrap.dedent(
        f"""
        import json
        from kotoba_memory.cache_manager.disk import DiskCache
        c = DiskCache({str(path)!r}, 1 << 20)
        print(json.dumps([c.get("page"), c.get("forever"), c.get("short", "expired")]))
        c.put("from-child", [1, 2, 3])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == [_page(1), 7, "expired"]
    with DiskCache(path, 1 << 20) as again:
        assert again.get("from-child") == [1, 2, 3]
        assert again.get("page") == _page(1)


def test_evicts_least_recently_accessed_to_stay_under_max_bytes(tmp_path: Path) -> None:
    value = b"v" * 1000
    with DiskCache(tmp_path, 3500) as c:  # room for three entries
        for key in ("a", "b", "c"):
            assert c.put(key, value)
        assert c.get("a") == value  # a is now more recent than b
        assert c.put("d", value)
        assert "b" not in c
        assert all(k in c for k in ("a", "c", "d"))
        stats = c.stats()
        assert stats.evictions == 1 and stats.bytes <= 3500 and stats.entries == 3


def test_bytes_never_exceed_the_bound_under_many_sizes(tmp_path: Path) -> None:
    rng = random.Random(7)
    with DiskCache(tmp_path, 50_000) as c:
        for i in range(300):
            c.put(i, rng.randbytes(rng.randint(10, 8000)))
            assert c.stats().bytes <= 50_000
        raw = sqlite3.connect(c.path)
        row = raw.execute("SELECT COUNT(*), SUM(size) FROM kotoba_cache").fetchone()
        assert (row[0], row[1]) == (len(c), c.stats().bytes)
        # No orphaned values: every overwrite and eviction removed the old value row.
        assert raw.execute("SELECT COUNT(*) FROM kotoba_cache_values").fetchone()[0] == row[0]
        raw.close()


def test_purge_expired_drops_every_expired_row(cache: DiskCache) -> None:
    # Expiry as seen through get/contains/ttl_remaining is in the contract suite (test_contract.py).
    cache.put("soon", 1, ttl=0.05)
    cache.put("later", 2, ttl=60)
    cache.put_many({f"k{i}": i for i in range(10)}, ttl=0.05)
    time.sleep(0.1)
    assert cache.get("soon", "x") == "x"  # a read drops the expired row it finds
    assert cache.purge_expired() == 10
    assert len(cache) == 1
    assert cache.stats().expirations == 11


def test_ttl_is_an_alias_of_ttl_remaining(cache: DiskCache) -> None:
    cache.put("later", 2, ttl=60)
    cache.put("forever", 3)
    assert 59 < (cache.ttl("later") or 0) <= 60
    assert cache.ttl("forever") is None
    with pytest.raises(KeyError):
        cache.ttl("absent")


def test_bad_config_raises_clearly(cache: DiskCache) -> None:
    # Bad input to the methods (keys, ttls, unpicklable values) is in the contract suite.
    with pytest.raises(ValueError, match="max_bytes"):
        DiskCache(cache.path.parent / "other", 0)
    with pytest.raises(TypeError, match="max_bytes"):
        DiskCache(cache.path.parent / "other", "big")  # type: ignore[arg-type]


def test_checksum_mismatch_is_a_miss_never_a_wrong_value(cache: DiskCache) -> None:
    cache.put("k", "the real value" * 10)
    cache.put("other", 1)
    raw = sqlite3.connect(cache.path)
    vid, blob = raw.execute(
        "SELECT v.vid, v.value FROM kotoba_cache c JOIN kotoba_cache_values v USING (vid) WHERE c.key = ?",
        (b"sk",),
    ).fetchone()
    flipped = bytes([blob[0]]) + bytes([blob[1] ^ 0xFF]) + blob[2:]
    with raw:
        raw.execute("UPDATE kotoba_cache_values SET value = ? WHERE vid = ?", (flipped, vid))
    raw.close()
    assert cache.get("k", "miss") == "miss"
    assert cache.stats().corrupt == 1
    assert "k" not in cache  # dropped
    assert cache.get("other") == 1


def test_value_that_no_longer_unpickles_is_a_miss(cache: DiskCache) -> None:
    blob = pickle.dumps(1)
    # A pickle naming a class that does not exist (e.g. removed since the value was stored).
    bogus = blob.replace(b"K\x01", b"\x8c\x08no.such\x94\x8c\x05Thing\x94\x93\x94)\x81\x94")
    cache.put("k", "x")
    raw = sqlite3.connect(cache.path)
    import zlib

    with raw:
        raw.execute("UPDATE kotoba_cache SET checksum = ? WHERE key = ?", (zlib.crc32(bogus), b"sk"))
        raw.execute(
            "UPDATE kotoba_cache_values SET value = ?"
            " WHERE vid = (SELECT vid FROM kotoba_cache WHERE key = ?)",
            (bogus, b"sk"),
        )
    raw.close()
    assert cache.get("k", "miss") == "miss"
    assert cache.stats().corrupt == 1


def test_compression_ratio_is_reported(tmp_path: Path) -> None:
    with DiskCache(tmp_path, 1 << 22, compression="zstd", compress_min_bytes=256) as c:
        for i in range(20):
            c.put(f"page{i}", _page(i))
        c.put("noise", os.urandom(4096))
        c.put("tiny", "x")
        assert c.get("page3") == _page(3)
        assert c.get("noise") is not None
        stats = c.stats()
        assert isinstance(stats, DiskCacheStats)
        assert stats.compression is not None
        assert stats.compression.values_compressed == 20
        assert stats.compression.values_stored_raw == 1
        assert stats.compression.ratio is not None and stats.compression.ratio > 2
        assert stats.compression_ratio is not None and stats.compression_ratio > 1.5
        assert stats.raw_bytes > stats.bytes
    # Reopened without compression it still reads the compressed values.
    with DiskCache(tmp_path, 1 << 22) as plain:
        assert plain.get("page7") == _page(7)


def test_unusable_files_and_closed_cache_raise_disk_cache_error(tmp_path: Path) -> None:
    future = tmp_path / "future.sqlite3"
    conn = sqlite3.connect(future)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(DiskCacheError, match="format 99"):
        DiskCache(future, 1000)
    c = DiskCache(tmp_path / "ok", 1000)
    c.close()
    with pytest.raises(DiskCacheError, match="closed"):
        c.get("k")


def test_async_twins_run_off_the_event_loop(cache: DiskCache) -> None:
    loop_threads: set[int] = set()
    seen: list[int] = []
    real_get = cache.get

    def spy(key: object, default: object = None) -> object:
        seen.append(threading.get_ident())
        return real_get(key, default)  # type: ignore[arg-type]

    cache.get = spy  # type: ignore[method-assign]

    async def main() -> list[object]:
        loop_threads.add(threading.get_ident())
        assert await cache.aput("a", 1)
        await cache.aput_many({"b": 2, "c": 3})
        assert await cache.aadd("a", 9) is False
        assert await cache.atouch("a", 30)
        got = [await cache.aget("a"), await cache.aget_many(["b", "c", "zz"])]
        assert await cache.adelete("b")
        got.append(await cache.aget_or_set("d", lambda: 4))
        await cache.aput("short", 1, ttl=0.01)
        await asyncio.sleep(0.05)
        assert await cache.apurge_expired() == 1
        await cache.aclear()
        got.append(len(cache))
        return got

    assert asyncio.run(main()) == [1, {"b": 2, "c": 3}, 4, 0]
    assert seen and loop_threads.isdisjoint(seen)


_WRITER = textwrap.dedent(
    """
    import random, sys
    from kotoba_memory.cache_manager.disk import DiskCache
    path, start = sys.argv[1], int(sys.argv[2])
    cache = DiskCache(path, 256 << 20)
    for i in range(start, start + 10_000):
        size = random.Random(i).randint(100_000, 600_000)
        value = (i, random.Random(i).randbytes(size))
        print("begin", i, flush=True)
        cache.put(f"slot{i % 5}", value)  # overwrites: a killed write must leave the old value whole
        print("end", i, flush=True)
    """
)


def _check_payload(number: int, payload: bytes) -> None:
    assert len(payload) == random.Random(number).randint(100_000, 600_000)
    assert payload == random.Random(number).randbytes(len(payload))


def test_sigkill_mid_write_never_yields_a_corrupt_value(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    # slot -> the write numbers it may hold: the last finished write, plus any write a kill interrupted
    # after it (that one may or may not have committed). None: possibly never written.
    possible: dict[int, set[int | None]] = {}
    start = 0
    for round_no in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        finished = 0
        wanted = 6 + round_no * 2  # kill at a different point each round
        while True:
            line = proc.stdout.readline()
            assert line, "writer died early"
            what, number_text = line.split()
            number = int(number_text)
            if what == "end":
                possible[number % 5] = {number}
                finished += 1
            elif finished >= wanted:
                # The writer has started this put (it takes milliseconds): kill it inside the write.
                time.sleep(round_no * 0.002)
                os.kill(proc.pid, signal.SIGKILL)
                possible[number % 5] = possible.get(number % 5, {None}) | {number}
                break
        proc.wait(timeout=30)
        # On a busy machine the writer may have got further before the kill landed: what it reported
        # after the line we acted on is still in the pipe.
        for line in proc.stdout.read().splitlines():
            what, number_text = line.split()
            number = int(number_text)
            if what == "end":
                possible[number % 5] = {number}
            else:
                possible[number % 5] = possible.get(number % 5, {None}) | {number}
        proc.stdout.close()
        start = number + 1

    with DiskCache(path, 256 << 20) as c:
        for slot, numbers in possible.items():
            value = c.get(f"slot{slot}")
            if value is None:
                assert None in numbers, f"slot{slot} lost its committed value"
                continue
            # The old value, or the interrupted write if it committed before the kill: never a mix.
            assert value[0] in numbers, (slot, value[0], numbers)
            _check_payload(*value)
        assert c.stats().corrupt == 0
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_its_own_connection(cache: DiskCache) -> None:
    cache.put("before-fork", "v")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 3
        try:
            ok = cache.get("before-fork") == "v" and cache.put("from-child", [1])
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cache.get("from-child") == [1]
    assert cache.get("before-fork") == "v"


def test_a_write_lock_held_too_long_is_a_disk_cache_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    with DiskCache(path, 1 << 20, timeout=0.05) as c:
        c.put("k", "kept")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing for longer than our timeout
        try:
            with pytest.raises(DiskCacheError, match="locked"):
                c.put("k", "new")
            with pytest.raises(OSError):
                c.delete("k")
            assert c.get("k") == "kept"  # WAL readers are not blocked by a writer
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert c.put("k", "new")
        assert c.get("k") == "new"


def _wait_child(pid: int, limit: float = 60.0) -> int:
    """The child's exit code; a child still running after ``limit`` seconds (hung) is killed: -9."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_waits_for_a_call_in_flight_in_another_thread(cache: DiskCache) -> None:
    import warnings

    cache.put("k", "v")
    inside, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def busy() -> None:
        with cache._lock:  # a request thread in the middle of a cache call when the fork is asked for
            inside.set()
            release.wait(10)
            finished.append("call done")

    thread = threading.Thread(target=busy)
    thread.start()
    assert inside.wait(10)
    threading.Timer(0.2, release.set).start()  # the call ends while the fork is waiting for it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads running
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 3
        try:
            # The fork happened after the call finished, and the cache works in the child.
            code = 0 if finished == ["call done"] and cache.get("k") == "v" else 1
        finally:
            os._exit(code)
    thread.join(10)
    assert _wait_child(pid) == 0
    assert cache.put("parent", 1) and cache.get("parent") == 1  # the parent reopened its connection


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("tiered", [False, True], ids=["disk", "tiered"])
def test_forks_while_threads_hammer_writes_leave_the_child_a_working_cache(
    tmp_path: Path, tiered: bool
) -> None:
    """Issue 11 item 1: a fork caught inside a write left the child's cache "database is locked"."""
    import warnings

    from kotoba_memory.cache_manager.memory import CacheManager
    from kotoba_memory.cache_manager.tiers import TieredCache

    disk = DiskCache(tmp_path / "forked.sqlite3", 1 << 22, timeout=2.0)
    cache: DiskCache | TieredCache = disk
    if tiered:  # every value goes straight to disk, as heavy ones do
        cache = TieredCache(CacheManager(max_bytes=1 << 20), disk, spill_threshold_bytes=0)
    stop = threading.Event()
    written = [0] * 3

    def writer(n: int) -> None:
        while not stop.is_set():
            cache.put(f"w{n}-{written[n] % 50}", "x" * 2000)
            written[n] += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    codes = []
    try:
        for attempt in range(12):
            before = sum(written)
            while sum(written) < before + 20:  # writers are busy when we fork
                time.sleep(0.001)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads
                pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                code = 3
                try:
                    ok = cache.put(f"child-{attempt}", attempt) and cache.get(f"child-{attempt}") == attempt
                    code = 0 if ok else 1
                except Exception:
                    code = 2
                finally:
                    os._exit(code)
            codes.append(_wait_child(pid))  # a child hung on an inherited SQLite lock is killed: -9
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert codes == [0] * 12
    assert [cache.get(f"child-{i}") for i in range(12)] == list(range(12))  # the children's writes landed
    assert cache.put("parent", 1) and cache.get("parent") == 1
    disk.close()


def test_reopening_with_a_smaller_budget_shrinks_the_file(tmp_path: Path) -> None:
    with DiskCache(tmp_path, 1 << 20) as big:
        for i in range(50):
            big.put(i, b"x" * 1000)
        big.get(0)  # the most recently used: survives the shrink
    with DiskCache(tmp_path, 10_000) as small:
        stats = small.stats()
        assert stats.bytes <= 10_000 and stats.evictions == 50 - stats.entries
        assert small.get(0) == b"x" * 1000
        assert 1 not in small


_CONCURRENT_WRITER = textwrap.dedent(
    """
    import random, sys
    from kotoba_memory.cache_manager.disk import DiskCache
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    cache = DiskCache(path, 50_000)
    for i in range(100):
        key = rng.randrange(100)
        if rng.random() < 0.7:
            cache.put(key, (key, rng.randbytes(rng.randint(10, 3000))))
        else:
            got = cache.get(key)
            assert got is None or got[0] == key
    cache.close()
    """
)


def test_processes_sharing_one_file_keep_it_bounded_and_consistent(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    DiskCache(path, 50_000).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT_WRITER, str(path), str(seed)])
        for seed in (1, 2, 3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with DiskCache(path, 50_000) as c:
        stats = c.stats()
        assert 0 < stats.bytes <= 50_000
        raw = sqlite3.connect(path)
        count, total = raw.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM kotoba_cache").fetchone()
        values = raw.execute("SELECT COUNT(*) FROM kotoba_cache_values").fetchone()[0]
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        raw.close()
        assert (count, total, values) == (stats.entries, stats.bytes, stats.entries)
        for key in range(100):
            got = c.get(key)
            assert got is None or got[0] == key


def test_get_many_reads_in_batches_with_the_same_checks_as_get(tmp_path: Path) -> None:
    with DiskCache(tmp_path, 1 << 22) as c:
        c.put_many({i: f"v{i}" for i in range(1200)})
        c.put("soon", 1, ttl=0.05)
        c.put("bad", "will be corrupted")
        raw = sqlite3.connect(c.path)
        with raw:
            raw.execute(
                "UPDATE kotoba_cache_values SET value = X'00' WHERE vid = (SELECT vid FROM kotoba_cache"
                " WHERE key = ?)",
                (b"sbad",),
            )
        raw.close()
        time.sleep(0.1)
        keys = [*range(0, 1300, 3), "soon", "bad", 5, 5, "absent"]
        got = c.get_many(keys)
        assert got == {i: f"v{i}" for i in range(0, 1200, 3)} | {5: "v5"}
        stats = c.stats()
        assert stats.hits == len([k for k in keys if isinstance(k, int) and k < 1200])
        assert stats.misses == len(keys) - stats.hits
        assert stats.expirations == 1 and stats.corrupt == 1
        assert "soon" not in c and "bad" not in c


def test_get_many_counts_as_an_access_for_lru(tmp_path: Path) -> None:
    with DiskCache(tmp_path, 3500) as c:
        for key in ("a", "b", "c"):
            c.put(key, b"v" * 1000)
        assert c.get_many(["a"]) == {"a": b"v" * 1000}
        c.put("d", b"v" * 1000)
        assert "b" not in c and "a" in c


def test_lookup_many_gives_ttls_and_can_take_entries_out(cache: DiskCache) -> None:
    cache.put("a", 1, ttl=100)
    cache.put("b", 2)
    hits = cache.lookup_many(["a", "b", "c"], remove=True)
    assert set(hits) == {"a", "b"}
    assert hits["a"].value == 1 and 95 < (hits["a"].ttl_remaining or 0) <= 100
    assert hits["b"].ttl_remaining is None and hits["b"].stored_bytes > 0
    assert len(cache) == 0


def _filled(path: Path) -> int:
    """Write a cache file of 200 incompressible values at ``path`` and close it; return its size."""
    with DiskCache(path, 1 << 24) as c:
        for i in range(200):
            c.put(f"k{i}", os.urandom(3000))
    return path.stat().st_size


def _damage(path: Path, kind: str, size: int) -> None:
    with path.open("r+b") as f:
        if kind == "zeroed pages":
            f.seek(4096 * 3)
            f.write(bytes(4096 * 20))
        elif kind == "zeroed value pages":  # found by a read, not when the file is opened
            f.seek(size - 4096 * 30)
            f.write(bytes(4096 * 30))
        elif kind == "broken header":
            f.write(b"garbage!" * 12)
        else:  # truncated
            f.truncate(size // 2)


@pytest.mark.parametrize("kind", ["zeroed pages", "zeroed value pages", "broken header", "truncated"])
def test_a_damaged_file_is_quarantined_and_the_cache_starts_afresh(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11 item 7: structural damage made every call raise, for good."""
    path = tmp_path / "damaged.sqlite3"
    _damage(path, kind, _filled(path))
    damaged_bytes = path.read_bytes()
    with caplog.at_level("WARNING", logger="kotoba_memory.cache_manager.disk"), DiskCache(path, 1 << 24) as c:
        read = [c.get(f"k{i}") for i in range(200)]  # no call raises
        assert c.stats().quarantined == 1
        assert c.get(f"k{read.index(None)}") is None  # the contents are lost, the cache is not
        assert c.put("k5", b"new") and c.get("k5") == b"new"
        assert len(c) == 1
        assert c.stats().quarantined == 1
    aside = [
        p
        for p in tmp_path.iterdir()
        if p.name.startswith("damaged.sqlite3.corrupt-") and not p.name.endswith(("-wal", "-shm"))
    ]
    assert len(aside) == 1 and aside[0].stat().st_size > 0  # kept for a post-mortem, not deleted
    if kind != "zeroed value pages":  # found on open: moved exactly as it was
        assert aside[0].read_bytes() == damaged_bytes
    assert any("damaged" in r.getMessage() and str(aside[0]) in r.getMessage() for r in caplog.records)
    with DiskCache(path, 1 << 24) as again:  # the fresh file is a healthy cache
        assert again.get("k5") == b"new" and again.stats().quarantined == 0


def test_damage_found_by_another_process_moves_this_one_to_the_fresh_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kotoba_memory.cache_manager import disk as disk_module

    monkeypatch.setattr(disk_module, "_IDENTITY_CHECK_EVERY", 0.0)
    path = tmp_path / "shared.sqlite3"
    with DiskCache(path, 1 << 24) as c:
        c.put("old", "value")
        c.flush()
        assert c._conn is not None
        c._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with path.open("r+b") as f:
            f.write(b"garbage!" * 12)
        code = textwrap.dedent(
            f"""
            from kotoba_memory.cache_manager.disk import DiskCache
            with DiskCache({str(path)!r}, 1 << 24) as other:
                assert other.stats().quarantined == 1
                other.put("fresh", "from the other process")
            """
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert c.get("fresh") == "from the other process"
        assert c.get("old") is None
        assert c.stats().quarantined == 0  # the other process moved the file aside, not this one
    moved = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len([name for name in moved if not name.endswith(("-wal", "-shm"))]) == 1  # moved once


def test_a_full_disk_says_so_stays_usable_for_reads_and_recovers(
    small_disk: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11 item 6: "cannot rollback" masked "disk is full", and the cache stayed stuck."""
    from kotoba_memory.cache_manager.disk import DiskFullError

    with DiskCache(small_disk.root / "c.sqlite3", 1 << 30, timeout=0.5) as c:
        c.put("kept", "a value written before the disk filled up")
        c.put("expiring", "soon gone", ttl=0.01)
        small_disk.fill()
        errors = []
        with caplog.at_level("WARNING", logger="kotoba_memory.cache_manager.disk"):
            for i in range(50):  # whatever slack the WAL still has, the disk runs out
                try:
                    c.put(f"big{i}", os.urandom(20_000))
                except DiskCacheError as exc:
                    errors.append(exc)
                    if len(errors) == 3:
                        break
            assert len(errors) == 3
            assert all(isinstance(e, DiskFullError) and "full" in str(e) for e in errors)
            assert not any("rollback" in str(e) for e in errors)
            time.sleep(0.02)
            assert c.get("kept") == "a value written before the disk filled up"  # reads still work
            assert c.get("expiring") is None  # an expired row is a miss even when it cannot be deleted
            assert len(c) >= 1
            with pytest.raises(DiskFullError):
                c.delete("kept")  # never reported done when it was not
        said = [r for r in caplog.records if "full" in r.getMessage()]
        assert len(said) == 1  # said once, not once per failed call
        assert c.stats().disk_full >= 3
        small_disk.free()
        assert c.put("after", "space is back")
        assert c.delete("kept")
        assert c.get("after") == "space is back" and c.get("kept") is None
