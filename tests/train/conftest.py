"""Shared by the training tests: 2 processes under torchrun (FSDP2 over gloo on the CPU), and
an environment without torchrun's variables for in-process groups."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# One thread per process: bitwise-reproducible runs, and 2 processes on a busy 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TESTS = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, tmp: Path, timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 ARGS`` on a free local port, output captured.

    TMPDIR: torchrun's own scratch directories land in the test's `tmp`, not in /tmp.
    PYTHONPATH: a test file run as the worker script imports its helpers as the tests do
    (``from train.conftest import ...``).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]
    env = {**ENV, "TMPDIR": str(tmp), "PYTHONPATH": str(TESTS)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
