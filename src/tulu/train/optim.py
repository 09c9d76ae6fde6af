"""The optimizer and learning-rate schedule of a training run, built from `OptimConfig`.

Weight decay goes to matrices only (parameters with two or more dimensions: the embeddings,
the LM head, every linear weight, LoRA's A and B), never to biases or LayerNorm weights. That
is the usual rule (BERT, GPT-2, transformers' Trainer); the paper trains with weight decay 0,
where the split changes nothing, but a user who turns decay on gets the standard behaviour.

Optimizers (`optim.optimizer`):

- ``adamw``: `torch.optim.AdamW`, fused when every parameter is on a device with a fused
  kernel (CUDA and CPU in current PyTorch), else foreach. Its states take the parameters'
  dtype: 8 bytes per parameter with float32 parameters, 4 with bfloat16 ones, and then updates
  are rounded to nearest bfloat16, so steps smaller than half a bfloat16 ulp of a weight are
  lost (at lr 2e-5 most are). Prefer ``adamw_bf16`` for bfloat16 parameters.
- ``adamw_bf16``: torchao's `_AdamW` with ``bf16_stochastic_round=True``: bfloat16 states
  (4 bytes per parameter) and stochastic rounding of the bfloat16 parameters, which keeps
  small updates right on average without float32 master weights. It needs bfloat16
  parameters (float32 ones would simply get float32 states); with LoRA the adapters are
  float32 (PEFT upcasts them), so use ``adamw`` there.
- ``adamw_8bit``: torchao's `AdamW8bit`: block-wise 8-bit states (about 2 bytes per
  parameter) for tensors of at least 4096 elements; smaller ones keep states like the param.

torchao's optimizers run their update through `torch.compile`: that works on CUDA and, with a
C++ compiler (g++/clang++), on CPU too; the first step compiles (seconds per distinct shape).
``offload_optimizer: true`` wraps the chosen optimizer in torchao's `CPUOffloadOptimizer`
(states and the update on the CPU, for single-GPU runs): it needs CUDA, and no gradient
clipping (its gradients leave for the CPU during backward, before the trainer clips).

Schedules (`optim.scheduler`), all after a linear warmup from 0 to lr over
ceil(warmup_ratio * total_steps) steps, as in transformers' `get_*_schedule_with_warmup`:
``linear`` decays to 0 at total_steps, ``cosine`` follows half a cosine to 0, ``constant``
stays at lr. As there, the first optimizer step runs at the scheduler's step 0 (lr 0 with
warmup) and `scheduler.step()` is called after each optimizer step.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tulu.errors import ConfigError
from tulu.train.config import OptimConfig

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "decays",
    "lr_lambda",
    "param_groups",
    "warmup_steps",
]

NamedParams = Iterable[tuple[str, nn.Parameter]]


# ------------------------------------------------------------------------------ param groups
def _named_trainable(params: nn.Module | NamedParams) -> list[tuple[str, nn.Parameter]]:
    named = params.named_parameters() if isinstance(params, nn.Module) else params
    out, seen = [], set()
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise ConfigError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
        if p.requires_grad and id(p) not in seen:  # tied weights appear once
            seen.add(id(p))
            out.append((name, p))
    return out


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices (embeddings, linear weights), not biases or norms."""
    return param.ndim >= 2


def param_groups(params: nn.Module | NamedParams, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and a no-decay group (empty ones
    dropped); raises if nothing is trainable."""
    named = _named_trainable(params)
    if not named:
        raise ConfigError("no trainable parameters: every parameter has requires_grad=False")
    decay = [p for n, p in named if decays(n, p)]
    no_decay = [p for n, p in named if not decays(n, p)]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------ optimizers
def build_optimizer(params: nn.Module | NamedParams, config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names over the trainable parameters of `params` (a
    module, or `(name, parameter)` pairs such as `model.named_parameters()`)."""
    groups = param_groups(params, config.weight_decay)
    flat = [p for g in groups for p in g["params"]]
    _refuse_float16_params(flat)
    kwargs = {"lr": config.lr, "betas": tuple(config.betas), "eps": config.eps}
    if config.optimizer == "adamw":
        cls, extra = torch.optim.AdamW, _torch_adamw_kwargs(flat)
    elif config.optimizer == "adamw_bf16":
        _check_bf16_params(groups)
        cls, extra = _torchao("_AdamW", flat), {"bf16_stochastic_round": True}
    elif config.optimizer == "adamw_8bit":
        cls, extra = _torchao("AdamW8bit", flat), {}
    else:
        raise ConfigError(
            f"optim.optimizer: unknown optimizer {config.optimizer!r} "
            "(use adamw, adamw_bf16 or adamw_8bit)"
        )
    if config.offload_optimizer:
        if config.max_grad_norm is not None:
            # torchao copies each gradient to the CPU in a hook as soon as backward has
            # accumulated it, so the trainer's clipping, which comes later, would only reach
            # the small parameters it keeps on the device: the others would step unclipped.
            raise ConfigError(
                "optim.offload_optimizer: torchao's CPUOffloadOptimizer copies each gradient "
                "to the CPU during backward, before gradient clipping, so optim.max_grad_norm "
                f"({config.max_grad_norm}) would be silently ignored; set optim.max_grad_norm: "
                "null or optim.offload_optimizer: false"
            )
        return _cpu_offload(groups, cls, {**kwargs, **extra}, flat)
    return cls(groups, **kwargs, **extra)


def _torch_adamw_kwargs(params: list[torch.Tensor]) -> dict[str, Any]:
    """fused=True when every parameter is a float tensor on a fused-kernel device (fastest,
    one kernel for all tensors); otherwise let PyTorch pick foreach/for-loop."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    fused_devices = set(_get_fused_kernels_supported_devices())
    ok = all(
        p.is_floating_point() and p.device.type in fused_devices and not _is_dtensor(p)
        for p in params
    )
    return {"fused": True} if ok else {}


def _is_dtensor(p: torch.Tensor) -> bool:
    """FSDP2's sharded parameters are DTensors (kept off the fused path, which is checked for
    plain tensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return False
    return isinstance(p, DTensor)


def _refuse_float16_params(params: list[torch.Tensor]) -> None:
    """Adam cannot keep float16 parameters: its second moment (1 - beta2) * grad**2 is below
    float16's smallest value (6e-8) for every gradient under about 7e-3, so it is stored as
    0 and the update m / (sqrt(v) + eps) blows up (eps 1e-8 is 0 in float16 too): the run
    diverges, or goes to inf, with no error. There is no loss scaling either. Float16
    compute is fine where the trainable parameters are float32 (FSDP's master weights,
    LoRA's adapters); a one-process full fine-tune in float16 is refused here."""
    if any(p.dtype == torch.float16 for p in params):
        raise ConfigError(
            "model.dtype: float16 trainable parameters (a full fine-tune in one process without "
            "FSDP keeps them in the compute dtype) make Adam's second moment underflow to 0 "
            "and the run diverge; set model.dtype: bfloat16 or float32, or "
            "distributed.fsdp: always (float32 master weights)"
        )


def _check_bf16_params(groups: list[dict[str, Any]]) -> None:
    params = [p for g in groups for p in g["params"]]
    if not any(p.dtype == torch.bfloat16 for p in params):
        found = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        raise ConfigError(
            f"optim.optimizer: adamw_bf16 keeps bfloat16 states and stochastically rounds "
            f"bfloat16 parameters, but the trainable parameters are {', '.join(found)} "
            f"(set model.dtype: bfloat16, or use adamw; LoRA adapters are float32, use adamw)"
        )


def _torchao(name: str, params: list[torch.Tensor]) -> type:
    """A torchao optimizer class, imported only now: importing torchao prints warnings."""
    if any(p.device.type == "cpu" for p in params) and not _cpp_compiler():
        raise ConfigError(
            f"optim.optimizer: torchao's {name} compiles its update with torch.compile, which "
            "on CPU needs a C++ compiler (none found: set CXX or install g++); use adamw"
        )
    try:
        import torchao.optim as ao
    except ImportError as err:
        raise ConfigError(
            f"optim.optimizer: this optimizer needs torchao (pip install torchao): {err}"
        ) from None
    cls = getattr(ao, name, None)
    if cls is None:
        raise ConfigError(f"optim.optimizer: the installed torchao has no optim.{name}")
    return cls


def _cpp_compiler() -> str | None:
    """What inductor would compile CPU kernels with (it honours $CXX, then g++ / clang++)."""
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cpu_offload(
    groups: list[dict[str, Any]], cls: type, kwargs: dict[str, Any], params: list[torch.Tensor]
) -> torch.optim.Optimizer:
    if not torch.cuda.is_available() or any(p.device.type != "cuda" for p in params):
        raise ConfigError(
            "optim.offload_optimizer: torchao's CPUOffloadOptimizer moves states from a CUDA "
            "device to the CPU; it needs the model on CUDA (set offload_optimizer: false)"
        )
    if any(_is_dtensor(p) for p in params):
        raise ConfigError(
            "optim.offload_optimizer: single-GPU only; with FSDP use distributed.cpu_offload"
        )
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(groups, optimizer_class=cls, **kwargs)


# ------------------------------------------------------------------------------ schedules
def warmup_steps(config: OptimConfig, total_steps: int) -> int:
    """ceil(warmup_ratio * total_steps): a non-zero ratio always warms up at least one step."""
    return math.ceil(config.warmup_ratio * total_steps)


def lr_lambda(kind: str, warmup: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of lr at scheduler step `step` (transformers' formulas)."""

    def linear(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def constant(step: int) -> float:
        return step / max(1, warmup) if step < warmup else 1.0

    schedules = {"linear": linear, "cosine": cosine, "constant": constant}
    if kind not in schedules:
        raise ConfigError(
            f"optim.scheduler: unknown schedule {kind!r} (use linear, cosine or constant)"
        )
    return schedules[kind]


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
) -> LambdaLR:
    """Warmup then `config.scheduler`, over `total_steps` optimizer steps."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ConfigError(f"total optimizer steps must be a positive integer, got {total_steps!r}")
    warmup = warmup_steps(config, total_steps)
    return LambdaLR(optimizer, lr_lambda(config.scheduler, warmup, total_steps))
