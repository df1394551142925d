"""NearCache specifics against real redis-servers: coherence between processes, tampering, faults.

The BaseCache contract is in test_contract.py. Processes here are plain ``python`` subprocesses sharing
one Redis; fault tests start a private redis-server of their own (``restartable_redis``) and kill,
pause (SIGSTOP) or restart it. Deadlines below are generous bounds on convergence, not speed claims
(speed is measured by benchmarks/near_cache.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kotoba_memory.cache_manager.near import CacheUnavailableError, NearCache
from kotoba_memory.cache_manager.signing import Signer
from kotoba_memory.errors import ConfigError

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
SECRET = "test-secret"


@pytest.fixture
def namespace() -> str:
    return f"near-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make(redis_url: str, namespace: str) -> Iterator[Callable[..., NearCache]]:
    made: list[NearCache] = []

    def factory(url: str | None = None, **options: Any) -> NearCache:
        options.setdefault("secret", SECRET)
        options.setdefault("namespace", namespace)
        options.setdefault("socket_timeout", 1.0)  # semantics tests; the fault tests set a short one
        cache = NearCache(url or redis_url, **options)
        made.append(cache)
        return cache

    yield factory
    for cache in made:
        try:
            cache.close()
        except Exception:
            pass


class _Payload:
    """A pickle that creates a marker file when unpickled: must never run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


# -- configuration --------------------------------------------------------------------------------


def test_bad_configuration_names_the_field(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="secret"):
        NearCache(redis_url, secret="")
    with pytest.raises(ValueError, match="socket_timeout"):
        NearCache(redis_url, secret=SECRET, socket_timeout=0)
    with pytest.raises(ValueError, match="outage_ttl"):
        NearCache(redis_url, secret=SECRET, outage_ttl=-1)
    with pytest.raises(TypeError, match="redis"):
        NearCache(42, secret=SECRET)
    with pytest.raises(ConfigError, match="decode_responses"):
        NearCache(redis.Redis.from_url(redis_url, decode_responses=True), secret=SECRET)
    with pytest.raises(ValueError, match="namespace"):
        NearCache(redis_url, secret=SECRET, namespace="has space")


# -- coherence within one process (two caches = two processes' worth of state) ----------------------


def test_a_write_in_one_cache_drops_the_copy_in_the_other(
    make: Callable[..., NearCache], eventually: Callable[..., bool]
) -> None:
    a, b = make(), make()
    assert a.wait_coherent() and b.wait_coherent()
    a.put("k", "v1")
    assert b.get("k") == "v1"
    assert b.get("k") == "v1" and b.stats().l1_hits == 1  # the second read is an L1 hit
    a.put("k", "v2")
    assert eventually(lambda: b.get("k") == "v2")
    a.delete("k")
    assert eventually(lambda: b.get("k", "gone") == "gone")
    b.put("k", "from-b")
    assert eventually(lambda: a.get("k") == "from-b")
    a.clear()
    assert eventually(lambda: b.get("k", "gone") == "gone")
    assert b.stats().invalidations >= 4


def test_own_writes_stay_in_l1(make: Callable[..., NearCache], eventually: Callable[..., bool]) -> None:
    a = make()
    assert a.wait_coherent()
    for i in range(50):
        a.put(f"k{i}", i)
    assert eventually(lambda: a.stats().invalidations >= 50)  # our own messages came back ...
    assert all(a.get(f"k{i}") == i for i in range(50))
    stats = a.stats()
    assert stats.l1_hits == 50 and stats.redis_hits == 0  # ... and did not drop our copies


def test_incr_and_update_are_atomic_across_caches(make: Callable[..., NearCache]) -> None:
    caches = [make() for _ in range(3)]
    caches[0].put("n", 0, ttl=60)

    def bump(cache: NearCache) -> None:
        for _ in range(50):
            cache.incr("n")

    threads = [threading.Thread(target=bump, args=(c,)) for c in caches for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert caches[1].incr("n", 0) == 300
    assert 50 < (caches[2].ttl_remaining("n") or 0) <= 60  # incr keeps the ttl
    with pytest.raises(KeyError):
        caches[0].incr("absent")
    caches[0].put("s", "text")
    with pytest.raises(ValueError, match="not an int"):
        caches[0].incr("s")
    with pytest.raises(TypeError, match="delta"):
        caches[0].incr("n", 1.5)  # type: ignore[arg-type]


_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from kotoba_memory.cache_manager.near import NearCache
    url, namespace, role = sys.argv[1], sys.argv[2], sys.argv[3]
    cache = NearCache(url, secret="test-secret", namespace=namespace)
    assert cache.wait_coherent(10)
    print("ready", flush=True)
    if role == "reader":
        seen, backwards, reads, misses = -1, 0, 0, 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            value = cache.get("counter", -1)
            reads += 1
            if value == -1:  # a miss (Redis slower than the socket timeout on a loaded machine)
                misses += 1
                continue
            if value < seen:
                backwards += 1
            seen = max(seen, value)
            if seen == 300:
                break
        stats = cache.stats()
        print(json.dumps({"seen": seen, "backwards": backwards, "reads": reads, "misses": misses,
                          "l1_hits": stats.l1_hits, "invalidations": stats.invalidations}), flush=True)
    elif role == "writer":
        sys.stdin.readline()
        for i in range(301):
            cache.put("counter", i)
            time.sleep(0.001)
        print(json.dumps({"done": True}), flush=True)
    elif role == "stampede":
        sys.stdin.readline()
        def factory():
            cache.client.incr(namespace + "-factory-runs")
            time.sleep(0.3)
            return "computed"
        value = cache.get_or_set("hot", factory, ttl=60)
        stats = cache.stats()
        print(json.dumps({"value": value, "errors": stats.redis_errors, "waits": stats.lock_waits,
                          "wins": stats.lock_wins}), flush=True)
    cache.close()
    """
)


def _spawn(redis_url: str, namespace: str, role: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "core"), str(ROOT)])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, redis_url, namespace, role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
def test_processes_see_each_others_writes_in_order(redis_url: str, namespace: str) -> None:
    readers = [_spawn(redis_url, namespace, "reader") for _ in range(3)]
    writer = _spawn(redis_url, namespace, "writer")
    try:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert json.loads(writer.stdout.readline())["done"]
        for proc in readers:
            assert proc.stdout is not None
            result = json.loads(proc.stdout.readline())
            assert result["seen"] == 300  # every reader converged on the last write
            assert result["backwards"] == 0  # and never went back to an older value
            assert result["l1_hits"] > 0 and result["invalidations"] > 0
    finally:
        for proc in [*readers, writer]:
            proc.wait(timeout=60)


@pytest.mark.slow
def test_get_or_set_runs_the_factory_once_across_processes(redis_url: str, namespace: str) -> None:
    procs = [_spawn(redis_url, namespace, "stampede") for _ in range(4)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    values = []
    for proc in procs:
        assert proc.stdout is not None
        values.append(json.loads(proc.stdout.readline())["value"])
        proc.wait(timeout=60)
    assert values == ["computed"] * 4
    raw = redis.Redis.from_url(redis_url)
    try:
        assert int(raw.get(namespace + "-factory-runs") or 0) == 1
    finally:
        raw.delete(namespace + "-factory-runs")
        raw.close()


def test_a_forked_child_gets_its_own_listener(
    make: Callable[..., NearCache], eventually: Callable[..., bool]
) -> None:
    parent = make()
    assert parent.wait_coherent()
    parent.put("k", "before")
    parent_wid_prefix = parent._new_wid()[:8]
    read_fd, write_fd = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_fd)
            os.close(go_write)
            ok = parent.get("k") == "before" and parent.wait_coherent(10)
            ok = ok and parent._new_wid()[:8] != parent_wid_prefix  # the child mints its own write ids
            os.write(write_fd, b"1" if ok else b"0")
            os.read(go_read, 1)
            ok = eventually(lambda: parent.get("k") == "after")
            os.write(write_fd, b"1" if ok else b"0")
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    os.close(go_read)
    try:
        assert os.read(read_fd, 1) == b"1"
        parent.put("k", "after")
        os.write(go_write, b"x")
        assert os.read(read_fd, 1) == b"1"
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(read_fd)
        os.close(go_write)
    assert os.waitstatus_to_exitcode(status) == 0


# -- tampering ------------------------------------------------------------------------------------


def test_tampered_values_are_refused_and_never_unpickled(
    make: Callable[..., NearCache], redis_url: str, tmp_path: Path
) -> None:
    cache = make()
    assert cache.wait_coherent()
    marker = tmp_path / "executed"
    evil = pickle.dumps(_Payload(str(marker)))
    raw = redis.Redis.from_url(redis_url)
    prefix = f"{cache.namespace}:".encode()
    try:
        forgeries = {
            "plain-pickle": evil,  # no signature at all
            "bad-tag": b"\x00KS1" + os.urandom(32) + os.urandom(16) + evil,  # looks signed
            "other-secret": Signer("not-our-secret", "near-cache").sign(
                prefix + b"other-secret", os.urandom(16) + evil
            ),
        }
        for key, data in forgeries.items():
            raw.set(prefix + key.encode(), data)
        # a genuine value moved to another key: the tag covers the key, so it fails too
        cache.put("genuine", {"ok": 1})
        raw.set(prefix + b"moved", raw.get(prefix + b"genuine") or b"")
        for key in [*forgeries, "moved"]:
            assert cache.get(key, "refused") == "refused"
            assert key not in cache.get_many([key])
        assert cache.get_or_set("plain-pickle", lambda: "from the source") == "from the source"
        assert cache.get("genuine") == {"ok": 1}
    finally:
        raw.close()
    assert not marker.exists()
    assert cache.stats().refused >= 9


def test_forged_invalidations_are_ignored(
    make: Callable[..., NearCache], redis_url: str, eventually: Callable[..., bool]
) -> None:
    cache = make()
    assert cache.wait_coherent()
    cache.put("k", "v")
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.publish(cache.channel, b"F" + os.urandom(16))
        raw.publish(cache.channel, b"\x00KS1" + os.urandom(48) + b"K" + b"x" * 16 + b"k")
        assert eventually(lambda: cache.stats().forged_messages == 2)
    finally:
        raw.close()
    assert cache.get("k") == "v" and cache.stats().l1_hits == 1


# -- faults ---------------------------------------------------------------------------------------


def test_a_dropped_channel_flushes_l1_and_resubscribes(
    make: Callable[..., NearCache], redis_url: str, eventually: Callable[..., bool]
) -> None:
    cache = make()
    assert cache.wait_coherent()
    cache.put("k", "v")
    assert cache.l1.get("k") is not None
    raw = redis.Redis.from_url(redis_url)
    try:
        raw.client_kill_filter(_type="pubsub", skipme=True)
    finally:
        raw.close()
    assert eventually(lambda: cache.stats().subscriptions >= 2 and cache.stats().coherent)
    stats = cache.stats()
    assert stats.flushes >= 1 and "k" not in cache.l1
    assert cache.get("k") == "v"  # read again from Redis


@pytest.mark.slow
def test_redis_killed_and_restarted_mid_load(
    make: Callable[..., NearCache], restartable_redis: Any, eventually: Callable[..., bool]
) -> None:
    cache = make(restartable_redis.url)
    other = make(restartable_redis.url)
    assert cache.wait_coherent() and other.wait_coherent()
    cache.put("stored", "v1")
    calls = []

    def source() -> str:
        calls.append(1)
        return "from-source"

    restartable_redis.kill()
    # every call answers (no exception), from L1 or the source
    for _ in range(200):
        assert cache.get_or_set("computed", source, ttl=60) == "from-source"
        assert cache.get("stored", "miss") in ("v1", "miss")
    other.put("stored", "written-while-down")  # cannot reach Redis: remembered as pending
    stats = cache.stats()
    assert stats.breaker_open and stats.redis_errors >= 1
    # The listener notices the lost channel at its next health check (a caller may notice first).
    assert eventually(lambda: not cache.stats().coherent)
    restartable_redis.start()
    assert eventually(lambda: not cache.breaker_open and cache.stats().coherent)
    assert eventually(lambda: not other.breaker_open and other.stats().pending_writes == 0)
    # the AOF brought "stored" = v1 back; the write made during the outage deleted it on recovery
    assert eventually(lambda: cache.get("stored", "miss") == "miss")
    cache.put("after", "ok")
    assert eventually(lambda: other.get("after") == "ok")


@pytest.mark.slow
def test_redis_paused_costs_at_most_a_timeout_and_recovers(
    make: Callable[..., NearCache], restartable_redis: Any, eventually: Callable[..., bool]
) -> None:
    cache = make(restartable_redis.url, socket_timeout=0.05)
    assert cache.wait_coherent()
    cache.put("k", "v")
    assert restartable_redis.proc is not None
    restartable_redis.proc.send_signal(signal.SIGSTOP)
    try:
        slow_calls = 0
        for i in range(100):
            started = time.monotonic()
            assert cache.get_or_set(f"paused-{i}", lambda: "source") == "source"
            if time.monotonic() - started > 0.04:
                slow_calls += 1
        assert cache.breaker_open
        assert slow_calls <= 2  # only the call(s) that found Redis paused waited for the timeout
    finally:
        restartable_redis.proc.send_signal(signal.SIGCONT)
    assert eventually(lambda: not cache.breaker_open and cache.stats().coherent)
    assert cache.get("k") == "v"


def test_ignore_exceptions_false_raises(make: Callable[..., NearCache], restartable_redis: Any) -> None:
    cache = make(restartable_redis.url, ignore_exceptions=False)
    assert cache.wait_coherent()
    restartable_redis.kill()
    with pytest.raises(CacheUnavailableError):
        cache.get("k")
    with pytest.raises(CacheUnavailableError):
        cache.put("k", 1)
    with pytest.raises(CacheUnavailableError):
        asyncio.run(cache.aget("k"))


# -- the disk tier: signed values, private files, as a larger L1 ------------------------------------


def test_signed_disk_cache_refuses_rows_written_behind_its_back(tmp_path: Path) -> None:
    import sqlite3

    from kotoba_memory.cache_manager.disk import DiskCache

    marker = tmp_path / "ran"
    path = tmp_path / "private" / "cache.sqlite3"
    disk = DiskCache(path, 1 << 20, secret=SECRET)
    try:
        disk.put("genuine", {"ok": 1})
        disk.put("victim", "v")
        assert disk.get("genuine") == {"ok": 1}
        assert (path.stat().st_mode & 0o777) == 0o600
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        disk.flush()
        conn = sqlite3.connect(path)
        try:
            evil = pickle.dumps(_Payload(str(marker)))
            vid = conn.execute("SELECT vid FROM kotoba_cache WHERE key = ?", (b"svictim",)).fetchone()[0]
            conn.execute("UPDATE kotoba_cache_values SET value = ? WHERE vid = ?", (evil, vid))
            import zlib

            conn.execute("UPDATE kotoba_cache SET checksum = ? WHERE key = ?", (zlib.crc32(evil), b"svictim"))
            conn.commit()
        finally:
            conn.close()
        assert disk.get("victim", "refused") == "refused"
        assert disk.get_many(["genuine", "victim"]) == {"genuine": {"ok": 1}}
        assert disk.stats().refused == 1
    finally:
        disk.close()
    assert not marker.exists()
    other = DiskCache(path, 1 << 20, secret="another secret")
    try:
        assert other.get("genuine", "refused") == "refused"  # signed with a different secret
    finally:
        other.close()


def test_a_tiered_l1_spills_to_disk_and_stays_coherent(
    make: Callable[..., NearCache], tmp_path: Path, eventually: Callable[..., bool]
) -> None:
    from kotoba_memory.cache_manager import CacheManager
    from kotoba_memory.cache_manager.disk import DiskCache
    from kotoba_memory.cache_manager.tiers import TieredCache

    l1 = TieredCache(
        CacheManager(4000, "lru"),
        DiskCache(tmp_path / "l1.sqlite3", 1 << 20, secret=SECRET),
        spill_threshold_bytes=1000,
    )
    a, b = make(l1=l1), make()
    assert a.wait_coherent() and b.wait_coherent()
    for i in range(40):
        a.put(f"k{i}", "x" * 200)
    stats = a.stats()
    assert stats.l1.spills > 0  # type: ignore[attr-defined]
    assert all(a.get(f"k{i}") == "x" * 200 for i in range(40))
    assert a.stats().redis_hits == 0  # every read answered by memory or the disk tier
    b.put("k0", "new")
    assert eventually(lambda: a.get("k0") == "new")
    b.clear()
    assert eventually(lambda: a.get("k5", "gone") == "gone")


def test_an_idle_channel_answers_its_health_checks(
    make: Callable[..., NearCache], eventually: Callable[..., bool]
) -> None:
    cache = make(health_interval=0.02)
    assert cache.wait_coherent()
    cache.put("k", "v")
    time.sleep(0.3)  # about 15 health checks with nothing else on the channel
    stats = cache.stats()
    assert stats.flushes == 0 and stats.subscriptions == 1 and stats.coherent
    assert cache.get("k") == "v" and cache.stats().l1_hits == 1  # L1 kept its copy
    # a request failure opens the breaker; the listener's next PING (not a reconnect) closes it
    cache._failed(redis.ConnectionError("simulated"))
    assert cache.breaker_open
    assert eventually(lambda: not cache.breaker_open)
    assert cache.stats().subscriptions == 1


def test_an_own_invalidation_does_not_keep_a_copy_of_another_write(make: Callable[..., NearCache]) -> None:
    """White-box race: our write W is in flight; another thread fills L1 with X (read from Redis after
    X's message, before W was applied); W's message then comes back. Keeping "our" copy would keep X."""
    cache = make()
    assert cache.wait_coherent()
    rkey = cache._keys("k")[1]
    own, other = cache._new_wid(), cache._new_wid()
    cache._note_own("k", own)
    cache._fill("k", "X", other, None, cache._seq)
    assert cache.l1.get("k") == ("X", other)
    cache._on_message(cache._message(rkey, own))
    assert "k" not in cache.l1
    # the normal case: our own copy stays when our message comes back
    cache._note_own("k", own)
    cache._fill("k", "W", own, None, cache._seq)
    cache._on_message(cache._message(rkey, own))
    assert cache.l1.get("k") == ("W", own)
