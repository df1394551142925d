"""Start and stop real HTTP servers (gunicorn, uvicorn) on loopback for tests and benchmarks.

::

    with servers.serve(["gunicorn", "-w", "3", ...], cwd=..., env=..., port=port) as server:
        httpx.get(server.base + "/")

The server runs in its own session (process group) with its output in a log file (a pipe nobody reads
would fill up and stall it); ``serve`` waits, bounded, until it answers, and always stops the whole
group: SIGTERM, then SIGKILL. Needs only the standard library (psutil for ``Server.workers``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["Server", "ServerFailed", "free_port", "serve", "stop", "wait_ready", "wrk", "wrk_routes"]


class ServerFailed(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(port: int, path: str = "/", timeout: float = 2.0) -> int | None:
    """The status code of ``GET path`` on 127.0.0.1:``port`` (HTTP/1.0, new connection), None if none."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    return int(parts[1])


class Server:
    """A started server: its process, port, base URL and log."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def workers(self) -> list[int]:
        """Pids of the master's live child processes (the workers of gunicorn or uvicorn ``--workers``)."""
        import psutil

        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE)


def wait_ready(
    server: Server, *, timeout: float = 45.0, path: str = "/", status: int | None = 200
) -> None:
    """Return once ``GET path`` answers (with ``status``, or any status when None); raise ServerFailed
    when the server exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise ServerFailed(f"server exited early ({server.proc.returncode}):\n{server.log()}")
        got = http_status(server.port, path)
        if got is not None and (status is None or got == status):
            return
        if time.monotonic() > deadline:
            raise ServerFailed(f"server did not answer {path} within {timeout:g} s:\n{server.log()}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes], *, timeout: float = 15.0) -> None:
    """Stop ``proc``'s process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def serve(
    cmd: Sequence[str],
    *,
    cwd: str | Path,
    env: Mapping[str, str],
    port: int,
    timeout: float = 45.0,
    path: str = "/",
    status: int | None = 200,
    log_dir: str | Path | None = None,
) -> Iterator[Server]:
    """Run ``cmd`` until it answers on ``port``, yield the :class:`Server`, always stop it."""
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in the finally below)
        prefix="server-", suffix=".log", dir=log_dir, delete=False
    )
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=dict(env), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = Server(proc, port, Path(log_file.name))
    try:
        wait_ready(server, timeout=timeout, path=path, status=status)
        yield server
    finally:
        stop(server.proc)
        log_file.close()
        if log_dir is None:
            with contextlib.suppress(OSError):
                os.unlink(log_file.name)


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int = 4,
    threads: int = 2,
    script: str | Path | None = None,
    timeout_s: float = 5.0,
) -> str:
    """Run wrk against ``url`` and return its report (RuntimeError with wrk's output when it fails)."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout_s:g}s"]
    if script is not None:
        cmd += ["-s", str(script)]
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout


_ROUTES_LUA = """
local paths = {PATHS}
function init(args) math.randomseed(os.time()) end
request = function() return wrk.format("GET", paths[math.random(#paths)]) end
"""


def wrk_routes(
    base: str,
    paths: Sequence[str],
    *,
    seconds: float,
    work_dir: str | Path,
    connections: int = 4,
    threads: int = 2,
) -> str:
    """wrk on ``base`` with each request's path picked at random from ``paths`` (as real traffic is);
    the Lua script is written to ``work_dir``."""
    script = Path(work_dir) / "routes.lua"
    script.write_text(_ROUTES_LUA.replace("{PATHS}", "{" + ", ".join(f'"{p}"' for p in paths) + "}"))
    url = base.rstrip("/") + "/"
    return wrk(url, seconds=seconds, connections=connections, threads=threads, script=script)
