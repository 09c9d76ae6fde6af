"""The command-line tools hide the import-time warnings torchao and torch log when PEFT is
imported (a "Failed to load ....so" line per CUDA kernel library this machine cannot load)."""

from __future__ import annotations

import subprocess
import sys

import pytest

IMPORT_PEFT = "import peft"
QUIETED_FIRST = (
    "from tulu.cli import main\n"
    "assert main(['info', '/nonexistent/model']) == 1\n"  # any command: the CLI's set-up ran
    "import peft\n"
)


def stderr_of(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_cli_hides_torchaos_import_warnings() -> None:
    pytest.importorskip("peft")
    noise = stderr_of(IMPORT_PEFT)
    if "Failed to load" not in noise and "_pytree" not in noise:
        pytest.skip("importing PEFT logs nothing here (no torchao, or its kernels load)")
    quiet = stderr_of(QUIETED_FIRST)
    assert "Failed to load" not in quiet and "_pytree" not in quiet, quiet
    assert "tulu info: error:" in quiet  # the command's own errors still show
