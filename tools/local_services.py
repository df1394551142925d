"""Start throwaway Redis and PostgreSQL servers on loopback, for tests and benchmarks.

The servers come from Debian's packages (``scripts/bootstrap.sh`` installs them), run in a private
temporary directory on a free port, and are always stopped and removed on exit.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator


class ServiceUnavailable(RuntimeError):
    """The server's binary is not installed on this machine."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"{name} exited with code {proc.returncode} while starting:\n{out[-4000:]}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not become ready within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Run a private redis-server on loopback; yields its ``redis://`` URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        raise ServiceUnavailable("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kotoba-redis-")
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_until(lambda: _redis_ping(port), proc, "redis-server", 20)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


class RedisProcess:
    """A private redis-server with an append-only file that a test can kill and restart (same port, data)."""

    def __init__(self, binary: str, workdir: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's ``redis://`` URL (unchanged across restarts)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server (again), loading whatever its AOF holds; returns once it answers PING."""
        # appendfsync always: every write acknowledged before a kill is in the AOF, as after a crash of
        # a durably configured server.
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "yes", "--appendfsync", "always", "--dir", self.workdir,
               "--daemonize", "no", "--loglevel", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _wait_until(lambda: _redis_ping(self.port), self.proc, "redis-server", 20)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final save) and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server politely."""
        if self.proc is not None:
            _stop(self.proc)


@contextlib.contextmanager
def restartable_redis_server() -> Iterator[RedisProcess]:
    """Run a private redis-server with AOF persistence that the caller may ``kill()`` and ``start()``."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        raise ServiceUnavailable("redis-server is not installed (Debian package redis-server)")
    workdir = tempfile.mkdtemp(prefix="kotoba-redis-aof-")
    server = RedisProcess(binary, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _postgres_bindir() -> str:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not candidates:
        raise ServiceUnavailable("PostgreSQL server binaries are not installed (Debian package postgresql)")
    return os.path.dirname(candidates[-1])


def _as_postgres_user() -> tuple[list[str], int | None, int | None]:
    """initdb refuses to run as root: when we are root, run the server as the 'postgres' account."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServiceUnavailable("running as root but no 'postgres' user exists") from exc
    return ["runuser", "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid


@contextlib.contextmanager
def postgres_server(database: str = "kotoba_test") -> Iterator[str]:
    """Run a private PostgreSQL on loopback; yields a SQLAlchemy ``postgresql+psycopg://`` URL."""
    bindir = _postgres_bindir()
    prefix, uid, gid = _as_postgres_user()
    workdir = tempfile.mkdtemp(prefix="kotoba-pg-")
    datadir = os.path.join(workdir, "data")
    if uid is not None and gid is not None:
        os.chown(workdir, uid, gid)
    user = "kotoba"
    subprocess.run(
        [*prefix, f"{bindir}/initdb", "-D", datadir, "-U", user, "-A", "trust", "-E", "UTF8",
         "--no-sync", "--no-instructions"],
        check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    port = free_port()
    cmd = [*prefix, f"{bindir}/postgres", "-D", datadir, "-p", str(port), "-k", workdir,
           "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
           "-c", "full_page_writes=off", "-c", "max_connections=100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def ready() -> bool:
        probe = subprocess.run([f"{bindir}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)],
                               check=False)
        return probe.returncode == 0

    try:
        _wait_until(ready, proc, "postgres", 60)
        subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", user, database],
                       check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/{database}"
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
