"""Optimizer and schedule construction (tulu.train.optim).

The schedules are checked step by step against transformers' `get_*_schedule_with_warmup`
(the reference the Tulu recipe was run with); the optimizers against `torch.optim.AdamW`
with hand-made parameter groups. torchao's optimizers compile their step with
torch.compile (a few seconds per shape on CPU), so their tests use a one-tensor model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from model.conftest import build_model
from tulu.errors import ConfigError
from tulu.model import preset
from tulu.train.config import OptimConfig
from tulu.train.optim import (
    build_optimizer,
    build_scheduler,
    param_groups,
    warmup_steps,
)

TINY = preset(
    "pythia-70m",
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    vocab_size=96,
)


def tiny_model(seed: int = 0, **overrides) -> nn.Module:
    return build_model(TINY.with_(**overrides) if overrides else TINY, seed).train()


def step_once(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 1) -> None:
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    total, count = model.loss(ids, ids)
    (total / count).backward()
    optimizer.step()
    optimizer.zero_grad()


# ---------------------------------------------------------------------------- param groups
def test_weight_decay_only_on_matrices() -> None:
    model = tiny_model()
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "gpt_neox.embed_in.weight" in decayed and "embed_out.weight" in decayed
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in decayed
    assert "gpt_neox.layers.0.mlp.dense_4h_to_h.weight" in decayed
    assert "gpt_neox.layers.0.attention.query_key_value.bias" in plain
    assert "gpt_neox.layers.1.input_layernorm.weight" in plain
    assert "gpt_neox.final_layer_norm.bias" in plain
    assert decayed.isdisjoint(plain)
    assert len(decayed) + len(plain) == len(list(model.parameters()))


def test_groups_skip_frozen_and_count_tied_weights_once() -> None:
    model = tiny_model(tie_word_embeddings=True)
    model.gpt_neox.final_layer_norm.requires_grad_(False)
    groups = param_groups(model.named_parameters(), 0.0)
    params = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in params}) == len(params)
    assert not any(p is model.gpt_neox.final_layer_norm.weight for p in params)
    assert sum(p is model.embed_out.weight for p in params) == 1


def test_no_trainable_parameters_is_an_error() -> None:
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig())


# ---------------------------------------------------------------------------- adamw
def test_adamw_matches_torch_adamw_with_manual_groups() -> None:
    config = OptimConfig(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    ours_model, ref_model = tiny_model(), tiny_model()
    ours = build_optimizer(ours_model, config)
    assert isinstance(ours, torch.optim.AdamW)
    assert ours.defaults["fused"] is True  # CPU has a fused AdamW kernel
    decay = [p for n, p in ref_model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in ref_model.named_parameters() if p.ndim < 2]
    ref = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-6,
    )
    for seed in range(3):
        step_once(ours_model, ours, seed)
        step_once(ref_model, ref, seed)
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    moved = (ours_model.embed_out.weight - tiny_model().embed_out.weight).abs().max()
    assert moved > 1e-4  # the optimizer did update


def test_weight_decay_spares_biases_and_norms() -> None:
    """With zero gradients AdamW only decays: matrices shrink by (1 - lr * wd), the rest stay."""
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


def test_offload_optimizer_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    with pytest.raises(ConfigError, match="offload_optimizer.*CUDA"):
        build_optimizer(tiny_model(), OptimConfig(offload_optimizer=True))


def test_offload_optimizer_refuses_gradient_clipping() -> None:
    """torchao's CPUOffloadOptimizer takes each gradient to the CPU during backward, before
    the trainer clips: with max_grad_norm the large parameters would step unclipped."""
    with pytest.raises(ConfigError, match="max_grad_norm.*silently ignored"):
        build_optimizer(tiny_model(), OptimConfig(offload_optimizer=True, max_grad_norm=1.0))


def test_adamw_bf16_refuses_float32_parameters() -> None:
    with pytest.raises(ConfigError, match="adamw_bf16.*float32"):
        build_optimizer(tiny_model(), OptimConfig(optimizer="adamw_bf16"))


def test_float16_trainable_parameters_are_refused() -> None:
    """Adam's second moment of a float16 parameter underflows to 0 for gradients below ~7e-3
    and the update blows up (torch's own AdamW gives -inf here); the run used to diverge
    silently with model.dtype: float16 in one process."""
    with torch.no_grad():
        p = nn.Parameter(torch.ones(4, dtype=torch.float16))
        p.grad = torch.full((4,), 1e-3, dtype=torch.float16)
        torch.optim.AdamW([p], lr=1e-3, foreach=False).step()
        assert not torch.isfinite(p).all()  # why the refusal below
    with pytest.raises(ConfigError, match=r"model\.dtype: float16.*bfloat16 or float32"):
        build_optimizer(tiny_model().half(), OptimConfig())
    # float16 frozen weights with float32 trainable ones (LoRA, FSDP master weights) are fine
    model = tiny_model().half().requires_grad_(False)
    head = model.embed_out.float().requires_grad_(True)
    optimizer = build_optimizer(model, OptimConfig())
    assert [p for g in optimizer.param_groups for p in g["params"]] == [head.weight]


# ---------------------------------------------------------------------------- torchao
needs_compiler = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("clang++")),
    reason="torchao's optimizers compile their step; on CPU that needs a C++ compiler",
)


def _ones_param(dtype: torch.dtype) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(torch.ones(64, 64, dtype=dtype))
    return module


@pytest.mark.slow
@needs_compiler
def test_adamw_bf16_keeps_small_updates_by_stochastic_rounding() -> None:
    """A step of 1e-3 on weights of 1.0 is below half a bfloat16 ulp (2**-8): round to nearest
    (torch's AdamW on bf16 params) loses it, stochastic rounding keeps it on average."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    config = OptimConfig(optimizer="adamw_bf16", lr=1e-3, warmup_ratio=0.0, scheduler="constant")
    results = {}
    for name in ("adamw", "adamw_bf16"):
        module = _ones_param(torch.bfloat16)
        optimizer = build_optimizer(module, OptimConfig(**{**config.__dict__, "optimizer": name}))
        scheduler = build_scheduler(optimizer, config, total_steps=10)
        module.weight.grad = torch.ones_like(module.weight)
        optimizer.step()
        scheduler.step()
        results[name] = module.weight.detach().float()
        state = optimizer.state[module.weight]
        assert state["exp_avg"].dtype == torch.bfloat16
        assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(1e-3)
    assert torch.equal(results["adamw"], torch.ones(64, 64))
    assert results["adamw_bf16"].mean().item() == pytest.approx(1 - 1e-3, abs=2e-4)
    assert {1.0, 1.0 - 2**-8} >= set(results["adamw_bf16"].unique().tolist())


@pytest.mark.slow
@needs_compiler
def test_adamw_8bit_states_and_scheduled_lr() -> None:
    pytest.importorskip("torchao")
    module = _ones_param(torch.float32)
    config = OptimConfig(optimizer="adamw_8bit", lr=1e-2, warmup_ratio=0.5)
    optimizer = build_optimizer(module, config)
    scheduler = build_scheduler(optimizer, config, total_steps=4)
    lrs = []
    for _ in range(4):
        module.weight.grad = torch.full_like(module.weight, 0.5)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    # torchao keeps lr as a tensor; LambdaLR must update it in place.
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    state = optimizer.state[module.weight]
    assert type(state["exp_avg"]).__name__ == "OptimState8bit"
    assert state["exp_avg"].codes.dtype == torch.uint8
    assert module.weight.detach().mean().item() == pytest.approx(1 - 2e-2, abs=1e-3)


# ---------------------------------------------------------------------------- schedules
def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("total", "ratio"), [(100, 0.03), (37, 0.1), (10, 0.0), (5, 0.5)])
def test_schedules_match_transformers(kind: str, total: int, ratio: float) -> None:
    transformers = pytest.importorskip("transformers")
    reference = {
        "linear": transformers.get_linear_schedule_with_warmup,
        "cosine": transformers.get_cosine_schedule_with_warmup,
        "constant": lambda opt, warmup, _total: transformers.get_constant_schedule_with_warmup(
            opt, warmup
        ),
    }[kind]
    config = OptimConfig(lr=2e-5, scheduler=kind, warmup_ratio=ratio)
    warmup = warmup_steps(config, total)
    ours_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    ours = _lrs(build_scheduler(ours_opt, config, total), total + 2)
    ref = _lrs(reference(ref_opt, warmup, total), total + 2)
    assert ours == pytest.approx(ref, abs=1e-15)
    if warmup:
        assert ours[0] == 0.0 and ours[warmup] == pytest.approx(2e-5)
    if kind != "constant":
        assert ours[total] == pytest.approx(0.0, abs=1e-15)


def test_warmup_rounds_up() -> None:
    assert warmup_steps(OptimConfig(warmup_ratio=0.03), 100) == 3
    assert warmup_steps(OptimConfig(warmup_ratio=0.03), 10) == 1  # 0.3 -> 1
    assert warmup_steps(OptimConfig(warmup_ratio=0.03), 1000) == 30
    assert warmup_steps(OptimConfig(warmup_ratio=0.0), 1000) == 0


def test_scheduler_needs_positive_total_steps() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="positive"):
        build_scheduler(optimizer, OptimConfig(), 0)


def test_torchao_and_peft_are_imported_only_when_used() -> None:
    """Importing torchao prints warnings (and costs seconds): only its options may load it."""
    code = (
        "import sys, torch\n"
        "from tulu.train import export, lora, memory, optim\n"
        "from tulu.train.config import OptimConfig\n"
        "optim.build_optimizer(torch.nn.Linear(2, 2), OptimConfig())\n"
        "print(sorted(m for m in ('torchao', 'peft', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
