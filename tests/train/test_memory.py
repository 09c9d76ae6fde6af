"""The analytic memory estimate (tulu.train.memory) against real tensors on CPU.

- parameters, gradients and optimizer states: byte for byte against a real optimizer step
  (sum of nbytes), for full fine-tuning in float32 and bfloat16 and for LoRA;
- activations: against what autograd really saves, counted with saved-tensor hooks (each
  storage once, parameters excluded), with and without activation checkpointing, for both
  residual forms, float32 and bfloat16, full fine-tuning and LoRA.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from model.conftest import build_model
from tulu.errors import ConfigError
from tulu.model import preset
from tulu.train.config import LoraConfig, OptimConfig, TrainConfig
from tulu.train.memory import (
    GIB,
    activation_bytes,
    estimate_memory,
    estimate_table,
    format_estimate,
    optimizer_state_bytes,
)
from tulu.train.optim import build_optimizer

TINY = preset(
    "pythia-70m",
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=256,
    num_attention_heads=4,
    vocab_size=512,
)


def train_config(**sections) -> TrainConfig:
    config = TrainConfig()
    config.model.dtype = "float32"
    config.optim.micro_batch_size = 2
    config.data.max_seq_length = 16
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


def tensor_bytes(t: torch.Tensor) -> int:
    """nbytes of a tensor, or of the inner tensors of torchao's quantized states."""
    inner = getattr(t, "tensor_attrs", None)
    if inner:
        return sum(getattr(t, name).nbytes for name in inner)
    return t.nbytes


def real_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return {
        "parameters": sum(p.nbytes for p in params),
        "gradients": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_states": sum(
            tensor_bytes(v) for s in optimizer.state.values() for v in s.values()
        ),
    }


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    total, count = model.loss(ids, ids)
    (total / count).backward()
    optimizer.step()


def estimated(config: TrainConfig, world_size: int = 1, **kw) -> dict[str, int]:
    e = estimate_memory(TINY, config, world_size, overhead_bytes=0, **kw)
    return {
        "parameters": e.parameters,
        "gradients": e.gradients,
        "optimizer_states": e.optimizer_states,
    }


# ---------------------------------------------------------------------------- static memory
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_finetune_bytes_are_exact(dtype: torch.dtype) -> None:
    model = build_model(TINY, dtype=dtype).train()
    optimizer = build_optimizer(model, OptimConfig())
    one_step(model, optimizer)
    config = train_config(model={"dtype": str(dtype).removeprefix("torch.")})
    assert estimated(config) == real_bytes(model, optimizer)


def test_lora_bytes_are_exact() -> None:
    peft = pytest.importorskip("peft")
    from tulu.train.lora import apply_lora

    lora = LoraConfig(enabled=True, r=4, alpha=8)
    model = apply_lora(build_model(TINY).train(), lora)
    assert isinstance(model, peft.PeftModel)
    optimizer = build_optimizer(model, OptimConfig())
    one_step(model, optimizer)
    real = real_bytes(model, optimizer)
    assert estimated(train_config(lora=lora.__dict__)) == real
    full = estimated(train_config())
    assert real["gradients"] < full["gradients"] / 20  # only the adapters train


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="torchao compiles its step (C++ on CPU)")
def test_8bit_state_bytes_are_exact() -> None:
    pytest.importorskip("torchao")
    module = nn.Module()
    gen = torch.Generator().manual_seed(0)
    module.big = nn.Parameter(torch.randn(64, 128, generator=gen))  # 8192 values: quantized
    module.odd = nn.Parameter(torch.randn(4097, generator=gen))  # not a multiple of 256: plain
    module.small = nn.Parameter(torch.randn(100, generator=gen))  # under 4096: plain states
    optimizer = build_optimizer(module, OptimConfig(optimizer="adamw_8bit"))
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p in module.parameters():
        real = sum(tensor_bytes(v) for v in optimizer.state[p].values())
        assert real == optimizer_state_bytes(p.numel(), p.dtype, "adamw_8bit"), p.shape
    # about a quarter of fp32 AdamW's 8 bytes per value once the 2 KiB of tables amortise
    assert optimizer_state_bytes(1 << 20, torch.float32, "adamw_8bit") < (1 << 20) * 8 / 3.9


# ---------------------------------------------------------------------------- activations
def saved_activation_bytes(model: nn.Module, batch: int, seq: int) -> int:
    """Bytes autograd keeps for backward (each storage once), parameters excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(
        0, TINY.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(ids, ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("lora_r", [0, 8], ids=["finetune", "lora"])
def test_saved_activations_match_autograd(
    checkpointing: bool, dtype: torch.dtype, parallel: bool, lora_r: int
) -> None:
    config = TINY.with_(use_parallel_residual=parallel)
    model = build_model(config, dtype=dtype).train()
    model.gradient_checkpointing = checkpointing
    lora = None
    if lora_r:
        pytest.importorskip("peft")
        from tulu.train.lora import apply_lora

        lora = LoraConfig(enabled=True, r=lora_r)
        model = apply_lora(model, lora)
    batch, seq = 2, 24
    real = saved_activation_bytes(model, batch, seq)
    # Bare PEFT keeps adapters in float32 whatever the base dtype.
    adapter_dtype = torch.float32 if lora else None
    est = activation_bytes(
        config,
        batch,
        seq,
        dtype,
        checkpointing=checkpointing,
        lora=lora,
        adapter_dtype=adapter_dtype,
    )
    # LayerNorm statistics are counted as float32 (CUDA); CPU keeps bf16 ones: 0.3% here.
    assert est.saved == pytest.approx(real, rel=0.005)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointing"])
def test_hidden_dropout_masks_are_counted(checkpointing: bool) -> None:
    config = TINY.with_(hidden_dropout=0.1)
    model = build_model(config, dtype=torch.bfloat16).train()
    model.gradient_checkpointing = checkpointing
    real = saved_activation_bytes(model, 2, 24)
    est = activation_bytes(config, 2, 24, torch.bfloat16, checkpointing=checkpointing)
    without = activation_bytes(TINY, 2, 24, torch.bfloat16, checkpointing=checkpointing)
    # CUDA's fused dropout keeps a bool mask (counted); the CPU kernel keeps it in the
    # activations' dtype, a second byte per masked value here.
    h, layers = config.hidden_size, config.num_hidden_layers
    masks = 2 * 24 * (h if checkpointing else (2 * layers + 1) * h)
    assert est.saved + masks == pytest.approx(real, rel=0.005)
    assert est.saved - without.saved == masks
    assert est.layer_backward - without.layer_backward == (2 * 24 * 2 * h if checkpointing else 0)


def test_checkpointing_keeps_only_layer_inputs() -> None:
    big = preset("pythia-1b")
    full = activation_bytes(big, 1, 2048, torch.bfloat16, checkpointing=False)
    ckpt = activation_bytes(big, 1, 2048, torch.bfloat16, checkpointing=True)
    per_layer_full = 2048 * (18 * 2048 * 2)  # 18 h-sized values per token in bfloat16
    assert full.saved - ckpt.saved == pytest.approx(
        16 * (per_layer_full - 2048 * 2048 * 2), rel=0.01
    )
    assert ckpt.layer_backward > full.layer_backward  # one layer is recomputed
    assert full.logits == ckpt.logits == 8 * 2048 * big.vocab_size


# ---------------------------------------------------------------------------- options
def test_sharding_offload_and_lora_move_memory() -> None:
    base = estimate_memory(TINY, train_config(model={"dtype": "bfloat16"}), 1)
    fsdp8 = estimate_memory(TINY, train_config(model={"dtype": "bfloat16"}), 8)
    assert fsdp8.sharded and not base.sharded
    assert fsdp8.master_dtype == "float32" and base.master_dtype == "bfloat16"
    # float32 master shards: twice the bytes per value, an eighth of the values (+ padding)
    assert fsdp8.parameters == pytest.approx(base.parameters * 2 / 8, rel=0.02)
    assert fsdp8.fsdp_buffers > 0 and base.fsdp_buffers == 0
    assert fsdp8.activations == base.activations

    offload = estimate_memory(
        TINY, train_config(distributed={"cpu_offload": True}), 8, overhead_bytes=0
    )
    assert offload.parameters == offload.gradients == offload.optimizer_states == 0
    assert offload.host > 0

    opt_offload = estimate_memory(TINY, train_config(optim={"offload_optimizer": True}), 1)
    plain = estimate_memory(TINY, train_config(), 1)
    assert opt_offload.optimizer_states < plain.optimizer_states / 10
    assert opt_offload.host > plain.optimizer_states

    lora = estimate_memory(TINY, train_config(lora={"enabled": True}), 1)
    assert lora.trainable_parameters < plain.trainable_parameters / 10
    assert lora.optimizer_states < plain.optimizer_states / 10


def test_fsdp_never_cannot_span_devices() -> None:
    config = train_config(distributed={"fsdp": "never"})
    with pytest.raises(ConfigError, match="distributed.fsdp"):
        estimate_memory(TINY, config, 8)
    table = estimate_table(TINY, config, world_sizes=(1, 8))
    assert "note: distributed.fsdp" in table
    assert len([line for line in table.splitlines() if line.strip().startswith("adamw")]) == 3


def test_pythia_6_9b_on_one_80gb_gpu() -> None:
    """The numbers the docs quote: seq 2048, micro batch 1, bfloat16, checkpointing."""
    model = preset("pythia-6.9b")
    config = TrainConfig()
    assert config.model.gradient_checkpointing and config.data.max_seq_length == 2048
    single = {
        opt: estimate_memory(model, config, 1, optimizer=opt)
        for opt in ("adamw", "adamw_bf16", "adamw_8bit")
    }
    assert single["adamw"].total_parameters == model.num_parameters()
    assert single["adamw_bf16"].optimizer_states == pytest.approx(
        4 * model.num_parameters(), rel=1e-3
    )
    assert single["adamw_8bit"].optimizer_states == pytest.approx(
        2.03 * model.num_parameters(), rel=0.01
    )
    assert all(e.fits() for e in single.values())
    # float32 master weights + fp32 AdamW (FSDP on one GPU): 16 bytes per parameter
    masters = estimate_memory(model, _fsdp_always(), 1)
    assert masters.total > 100 * GIB and not masters.fits()
    no_ckpt = TrainConfig()
    no_ckpt.model.gradient_checkpointing = False
    no_ckpt.optim.micro_batch_size = 4
    assert not estimate_memory(model, no_ckpt, 1, optimizer="adamw_8bit").fits()


def _fsdp_always() -> TrainConfig:
    config = TrainConfig()
    config.distributed.fsdp = "always"
    return config


def test_reports_name_every_component() -> None:
    estimate = estimate_memory(TINY, train_config(), 1)
    text = format_estimate(estimate)
    for label in ("parameters", "gradients", "optimizer states", "activations", "total"):
        assert label in text
    assert f"{estimate.total / GIB:.2f}" in text
    table = estimate_table(TINY, train_config(), world_sizes=(1, 8))
    rows = [line.split() for line in table.splitlines() if line.strip().startswith("adamw")]
    assert [(r[0], r[1]) for r in rows] == [
        (opt, ws) for opt in ("adamw", "adamw_bf16", "adamw_8bit") for ws in ("1", "8")
    ]
