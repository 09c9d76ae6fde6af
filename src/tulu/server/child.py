"""Run `tulu serve` as a child process: start it on a free local port, wait until it answers
``GET /health``, and stop it (SIGTERM, then SIGKILL).

`tulu demo` and `benchmarks/serving.py` use it, so that what they talk to is the real command
a user starts, with its own process, logs and shutdown path, not an in-process app.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tulu.errors import TuluError

__all__ = ["ServerProcess", "ServerStartError", "free_port", "start_server", "wait_healthy"]


class ServerStartError(TuluError):
    """The server exited or did not become healthy; the message carries its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(log_path: Path | None, chars: int = 4000) -> str:
    if log_path is None or not log_path.is_file():
        return ""
    return log_path.read_text(encoding="utf-8", errors="replace")[-chars:]


def wait_healthy(
    url: str,
    timeout: float,
    process: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll ``GET url/health`` until it answers 200; raise ServerStartError if `process` exits
    first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerStartError(
                f"tulu serve exited with code {process.returncode} before it was healthy:\n"
                + _log_tail(log_path)
            )
        if _healthy(url):
            return
        time.sleep(0.2)
    raise ServerStartError(
        f"{url}/health did not answer 200 within {timeout:g} s\n" + _log_tail(log_path)
    )


@dataclass
class ServerProcess:
    """A running `tulu serve` child: its process, base URL and log file."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def stop(self, timeout: float = 30.0) -> int | None:
        """Ask it to shut down (SIGTERM: drain and exit), kill it if it does not; its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_server(
    model: str | Path,
    log_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 120.0,
) -> ServerProcess:
    """Start ``tulu serve MODEL --host HOST --port PORT EXTRA_ARGS...`` with stdout and stderr
    in `log_path`, and return once it is healthy (the child is stopped if it never is)."""
    port = port or free_port(host)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-c",
        "import sys; from tulu.cli import main; sys.exit(main())",
        "serve",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        *extra_args,
    ]
    with log_path.open("w", encoding="utf-8") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://{host}:{port}", log_path)
    try:
        wait_healthy(server.url, startup_timeout, process, log_path)
    except BaseException:
        server.stop()
        raise
    return server
