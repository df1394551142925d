"""Session fixtures for the real servers some tests need (Redis, PostgreSQL) on loopback.

Locally a missing server binary skips those tests with the reason; under CI (``CI`` set) it fails them,
so they never skip silently there. Under CI any other skip (a missing extra behind ``importorskip``, a
``skipif``) also fails the run, except the C-only tests on the pure-Python run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import local_services

IN_CI = bool(os.environ.get("CI"))

# Fleet spools written by the apps and servers the tests start (they inherit the environment) go to a
# directory of this session, never into the user's own runtime directory.
_FLEET_DIR = tempfile.mkdtemp(prefix="kotoba-fleet-tests-")
os.environ["KOTOBA_MEMORY_FLEET_DIR"] = _FLEET_DIR


# Under CI every skip is a failure unless it is one of these, expected on the run that forces the
# pure-Python implementation (the C-only differential and fuzz tests have nothing to test there).
_PURE = os.environ.get("KOTOBA_MEMORY_PURE_PYTHON") == "1"
_EXPECTED_CI_SKIPS = ("is not in use", "pure Python in use") if _PURE else ()
_ci_skips: list[str] = []


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    if not any(expected in reason for expected in _EXPECTED_CI_SKIPS):
        _ci_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)  # a module-level importorskip


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_FLEET_DIR, ignore_errors=True)
    if _ci_skips:
        print(f"\nCI: {len(_ci_skips)} tests skipped; CI must run every test:", file=sys.stderr)
        for line in _ci_skips:
            print(f"  {line}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI must provide it (scripts/bootstrap.sh installs it)")
    pytest.skip(reason)


def _eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


@pytest.fixture
def eventually() -> Callable[..., bool]:
    """``eventually(predicate, timeout=10.0)``: poll until it holds and return its last value; a bound on
    convergence between processes, not a speed claim."""
    return _eventually


@pytest.fixture(scope="session")
def wrk() -> str:
    """Path of the wrk load generator (fails under CI when missing: bootstrap installs it)."""
    path = shutil.which("wrk")
    if path is None:
        _unavailable("wrk is not installed")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a private redis-server on 127.0.0.1 for this test session."""
    try:
        with local_services.redis_server() as url:
            yield url
    except local_services.ServiceUnavailable as exc:
        _unavailable(str(exc))


@pytest.fixture()
def restartable_redis() -> Iterator[local_services.RedisProcess]:
    """A private redis-server with AOF for one test, which it may kill and restart from its AOF."""
    try:
        with local_services.restartable_redis_server() as server:
            yield server
    except local_services.ServiceUnavailable as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a private PostgreSQL on 127.0.0.1 for this test session."""
    try:
        with local_services.postgres_server() as url:
            yield url
    except local_services.ServiceUnavailable as exc:
        _unavailable(str(exc))


@pytest.fixture(autouse=True)
def _rss_descriptor_kept(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every request's RSS figure reads the shared reader's kept statm descriptor: a test whose code
    closes a descriptor it does not own (so the number reads another file) fails here, by name."""
    from kotoba_memory.process.memory import shared_reader

    yield
    reader = shared_reader()
    fd = reader._fd
    if not reader.descriptor_is_ours():  # also drops it, so one failure stays one failure
        pytest.fail(f"{request.node.nodeid} left the shared RSS reader's descriptor {fd} naming another file")


@pytest.fixture(autouse=True)
def _no_component_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that leaves an optimizer, GC optimizer or profiler running would tune the collector
    under the next tests: stop it and name the test that leaked it."""
    from kotoba_memory.process import activity, registry

    before = registry.snapshot()
    yield
    if activity.in_flight():
        # A failed test can leave a request marked in flight; every later request would then read as
        # overlapped. Clear it so one failure stays one failure.
        count = activity.in_flight()
        print(f"\nLEAKED by {request.node.nodeid}: {count} request(s) in flight", file=sys.stderr)
        activity._reinit_after_fork()  # what a fork does: nothing in flight
    leaked = {kind: obj for kind, obj in registry.snapshot().items() if before.get(kind) is not obj}
    for obj in leaked.values():
        try:
            obj.stop()
        except Exception:
            pass
    if leaked:
        print(f"\nLEAKED by {request.node.nodeid}: {sorted(leaked)}", file=sys.stderr)


class SmallDisk:
    """A 2 MiB tmpfs mounted for one test: a real file system that runs out of space."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._filler = root / "filler"

    def fill(self) -> None:
        """Take every free block, so the next write that needs space fails with ENOSPC."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\xff" * 4096)
        except OSError as exc:
            if exc.errno != 28:  # ENOSPC
                raise
        finally:
            os.close(fd)

    def free(self) -> None:
        """Give the space back."""
        self._filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A real full-able file system: a 2 MiB tmpfs (needs root, as CI has), unmounted afterwards."""
    import subprocess

    root = tmp_path / "small-disk"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        _unavailable(f"cannot mount a tmpfs for the full-disk tests: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
