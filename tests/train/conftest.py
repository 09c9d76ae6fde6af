"""Shared by the training tests: 2 processes under torchrun (FSDP2 over gloo on the CPU), and
an environment without torchrun's variables for in-process groups."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

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


def random_adapter(base_dir: Path, out: Path, *, seed: int, scale: float, **lora) -> Path:
    """A LoRA adapter of the checkpoint in `base_dir` (r=4, alpha=8 unless `lora` says
    otherwise) with random, non-zero A and B of standard deviation `scale`, saved as PEFT
    saves it; a fresh adapter's B is zero, which would hide any mistake in applying it."""
    import torch

    from tulu.model.checkpoint import load_model
    from tulu.train.config import LoraConfig
    from tulu.train.lora import apply_lora, save_adapter

    config = LoraConfig(**{"r": 4, "alpha": 8, **lora})
    model = apply_lora(load_model(base_dir), config, base_model_path=base_dir)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return save_adapter(model, out)


def transformers_5() -> Any:
    """transformers, skipping a test of its GPT-NeoX's head when that is not ``lm_head``:
    transformers 4 calls the head embed_out, as we do, so an ``lm_head`` adapter would match
    nothing there and silently leave the head alone."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 calls the LM head embed_out, as we do")
    return transformers


def transformers_adapter(
    base_dir: Path, out: Path, ids: torch.Tensor, *, seed: int, scale: float, **lora
) -> tuple[Path, torch.Tensor]:
    """(directory, logits): a LoRA adapter made with PEFT on transformers' own GPT-NeoX loaded
    from `base_dir` (r=4, alpha=8 and `lora`'s fields, e.g. target_modules or
    modules_to_save), as a user of transformers 5 trains one: its LM head is ``lm_head``
    there. Its adapter weights (and saved modules) are random and non-zero, written by
    `PeftModel.save_pretrained`; the logits are that model's on `ids`, the reference for
    loading the adapter into tulu."""
    import peft
    import torch
    import transformers

    if "lm_head" in repr(lora):
        transformers_5()
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", **lora})
    model = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
        logits = model(input_ids=ids).logits
    model.save_pretrained(str(out))
    return out, logits
