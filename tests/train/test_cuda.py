"""Training on a GPU: the paths the CPU suite cannot reach (bfloat16 compute, torchao's
compiled optimizers on CUDA, FSDP2 over NCCL, CUDA RNG state in checkpoints). Skipped without
CUDA; `benchmarks/device_check.py` runs them on a lent GPU machine."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from train.test_trainer import make_config, write_assets
from tulu.train.metrics import read_metrics
from tulu.train.trainer import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("no_torchrun_env"),
]

STEPS = 10


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_assets(tmp_path_factory.mktemp("assets"))


def _run(assets: Path, out: Path, *overrides: str):
    config = make_config(
        assets,
        out,
        f"optim.max_steps={STEPS}",
        "checkpoint.every_steps=5",
        "checkpoint.export=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        *overrides,
    )
    return train(config)


@pytest.mark.parametrize(
    "options",
    [
        ["optim.optimizer=adamw"],
        ["optim.optimizer=adamw_bf16"],
        ["optim.optimizer=adamw_8bit"],
        ["optim.optimizer=adamw_bf16", "optim.offload_optimizer=true"],
        ["lora.enabled=true", "lora.r=4", "optim.optimizer=adamw"],
    ],
    ids=["adamw", "adamw_bf16", "adamw_8bit", "adamw_bf16-offload", "lora"],
)
def test_bfloat16_training_on_cuda_learns(assets: Path, tmp_path: Path, options) -> None:
    result = _run(assets, tmp_path, "model.dtype=bfloat16", *options)
    losses = [result.losses[s] for s in range(1, STEPS + 1)]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses  # LoRA r=4 learns the slowest
    logged = [e for e in read_metrics(result.metrics_file) if "loss" in e]
    assert logged and all(e["tokens_per_s"] > 0 for e in logged)
    if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name():
        assert all(0 < e["mfu"] < 1 for e in logged)  # a known peak: MFU is reported


def test_fsdp_on_one_gpu_over_nccl_trains_like_the_plain_run(assets: Path, tmp_path: Path) -> None:
    """float32 compute on both sides, so FSDP2's mixed-precision policy changes nothing: the
    NCCL process group, sharding and float32 reductions must give the plain run's losses."""
    plain = _run(assets, tmp_path / "plain", "model.dtype=float32", "distributed.fsdp=never")
    fsdp = _run(assets, tmp_path / "fsdp", "model.dtype=float32", "distributed.fsdp=always")
    for step in range(1, STEPS + 1):
        assert fsdp.losses[step] == pytest.approx(plain.losses[step], rel=1e-4, abs=1e-5), step


@pytest.mark.parametrize("cpu_offload", [False, True], ids=["on-gpu", "cpu-offload"])
def test_fsdp_loads_a_checkpoint_into_cuda_shards(
    assets: Path, tmp_path: Path, cpu_offload: bool
) -> None:
    """model.path under FSDP: each tensor read on the CPU and sliced into CUDA shards (or
    pinned CPU shards with cpu_offload), then trained over NCCL like the whole model loaded
    in one process."""
    from tulu.model import GPTNeoXForCausalLM, NeoXConfig
    from tulu.model.checkpoint import save_model
    from tulu.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(assets / "tokenizer")
    fields = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    fields |= {"intermediate_size": 63, "max_position_embeddings": 64, "vocab_size": 641}
    model = GPTNeoXForCausalLM(NeoXConfig(**fields, torch_dtype="float32"))
    model.init_weights(5)
    checkpoint = save_model(model, tmp_path / "checkpoint", tokenizer=tokenizer)
    common = (f"model.path={checkpoint}", "model.config=null", "model.dtype=float32")
    plain = _run(assets, tmp_path / "plain", *common, "distributed.fsdp=never")
    sharded = _run(
        assets,
        tmp_path / "sharded",
        *common,
        "distributed.fsdp=always",
        f"distributed.cpu_offload={str(cpu_offload).lower()}",
    )
    for step in range(1, STEPS + 1):
        assert sharded.losses[step] == pytest.approx(plain.losses[step], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("fsdp", ["never", "always"])
def test_resume_on_cuda_continues_the_same_run(assets: Path, tmp_path: Path, fsdp: str) -> None:
    """10 steps straight; then the step-10 checkpoint removed and the run resumed from step 5:
    steps 6-10 again, with the model, optimizer, scheduler, data position and CUDA RNG restored
    (adamw_bf16's stochastic rounding draws from it). CUDA kernels with atomics may differ in
    the last bits, hence a tolerance instead of the CPU test's bitwise equality."""
    out = tmp_path / "run"
    overrides = ("model.dtype=bfloat16", "optim.optimizer=adamw_bf16", f"distributed.fsdp={fsdp}")
    straight = _run(assets, out, *overrides)
    assert straight.final_step == STEPS
    shutil.rmtree(out / f"step-{STEPS:06d}")
    resumed = _run(assets, out, *overrides)
    assert resumed.resumed_from == out / "step-000005"
    for step in range(6, STEPS + 1):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=2e-3), step
