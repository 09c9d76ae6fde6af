"""How much accelerator memory a fine-tuning run needs per device, before anything is loaded.

`estimate_memory(model_config, train_config, world_size)` adds up, in bytes per device:

- parameters, gradients and optimizer states, tensor by tensor from the model's real shapes
  (built on the meta device, so a 12B model costs nothing): exact for a single device, as
  tests/train/test_memory.py checks against the tensors of a real optimizer step;
- activations kept for the backward pass, from what autograd saves in our GPT-NeoX forward
  (counted with saved-tensor hooks on CPU, see the test), and the loss's peak;
- FSDP buffers (unsharded layers in flight) when the run is sharded;
- a fixed overhead for the CUDA context, kernels' workspaces and allocator slack.

Assumptions (each one a line below, so a surprise can be traced). The dtypes follow
`tulu.train.distributed.prepare_model`:

- Compute runs in `model.dtype` (default bfloat16, as on GPUs). Without FSDP every parameter
  is stored in that dtype too ("pure" bfloat16 on a GPU). With FSDP, trainable parameters are
  float32 master shards (bfloat16 with ``adamw_bf16``, whose stochastic rounding replaces
  master weights) all-gathered in the compute dtype; frozen ones (LoRA's base) stay in the
  compute dtype. Gradients take the stored parameter's dtype and persist across
  gradient-accumulation micro-steps.
- Optimizer states: ``adamw`` and ``adamw_bf16`` keep two moments in the parameter's dtype
  (8 bytes per float32 parameter, 4 per bfloat16 one); ``adamw_8bit`` keeps uint8 codes plus
  one float32 scale per 256 values and a 256-entry float32 table per moment, for tensors of
  at least 4096 values divisible by 256 (smaller ones: like ``adamw``); each tensor has a
  4-byte step counter.
- LoRA (PEFT): base weights frozen, adapters ``A`` (r x in) and ``B`` (out x r) train. Each
  adapted layer saves its input in the adapter's compute dtype (PEFT casts it) and A's
  output; a frozen linear layer saves nothing.
- Activations per layer and token, for our forward with flash/efficient SDPA (no T x T
  scores): the layer input, the fused QKV output (V is a view of it), rotated Q and K, the
  attention output, the four linear inputs and the GELU input: ``10h + 2i`` values (``+h``
  with sequential residual), plus float32 norm statistics and the attention's log-sum-exp.
  With activation checkpointing only each layer's input is kept, and during backward one
  layer is recomputed at a time.
- The loss upcasts logits to float32: the log-probabilities (4 bytes x tokens x vocab) are
  saved, and the backward pass briefly holds their gradient and the logits' gradient
  (8 bytes x tokens x vocab more). Counted at the micro batch's full max_seq_length.
- FSDP2 (``distributed.fsdp: always``, or ``auto`` with more than one device): parameters,
  gradients and states are split over the devices (dim 0, largest shard counted); each layer
  is a unit and the root unit (embeddings, final norm, head) stays unsharded for the whole
  step; two layer units are unsharded at a time (the current one and the prefetched one), or
  all of them from forward to backward with ``reshard_after_forward: false``; one unit's
  gradients wait unsharded (compute dtype, plus a float32 copy for the reduce-scatter).
  ``distributed.cpu_offload`` keeps the shards, their gradients and states on the CPU.
- ``optim.offload_optimizer`` (torchao's CPUOffloadOptimizer, single device) moves the states
  of tensors of at least 4096 values, plus a pinned copy of those parameters and gradients,
  to the CPU (`host` below).
- Overhead: 1 GiB for the CUDA context, cuBLAS/NCCL workspaces and fragmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tulu.errors import ConfigError
from tulu.model.config import NeoXConfig, dtype_name, parse_dtype
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.train.config import LoraConfig, TrainConfig

__all__ = [
    "GIB",
    "OPTIMIZERS",
    "Activations",
    "MemoryEstimate",
    "TensorSpec",
    "activation_bytes",
    "estimate_memory",
    "estimate_table",
    "format_estimate",
    "optimizer_state_bytes",
    "parameter_specs",
]

GIB = 1024**3
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit")
DEFAULT_OVERHEAD = 1 * GIB
DEFAULT_CAPACITY = 80 * GIB  # an 80 GB H100 / A100
EIGHT_BIT_MIN_NUMEL = 4096  # torchao (after bitsandbytes): smaller tensors keep plain states
EIGHT_BIT_BLOCK = 256
OFFLOAD_MIN_NUMEL = 4096  # CPUOffloadOptimizer keeps smaller tensors on the device
STEP_BYTES = 4  # one float32 step counter per tensor
NORM_STAT_BYTES = 4  # LayerNorm mean/rstd are float32 on CUDA


# ------------------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor: its name, shape, dtype and whether it trains."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool
    unit: str  # FSDP unit: "layers.N" or "root"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_numel(self, shards: int) -> int:
        """Elements on the first (largest) shard when dim 0 is split `shards` ways (FSDP2)."""
        if shards <= 1 or not self.shape:
            return self.numel
        return math.ceil(self.shape[0] / shards) * math.prod(self.shape[1:])


def _unit(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "gpt_neox" and parts[1] == "layers":
        return f"layers.{parts[2]}"
    return "root"


def _meta_model(config: NeoXConfig) -> GPTNeoXForCausalLM:
    with torch.device("meta"):
        return GPTNeoXForCausalLM(config)


def parameter_specs(
    config: NeoXConfig,
    dtype: torch.dtype,
    lora: LoraConfig | None = None,
    *,
    trainable_dtype: torch.dtype | None = None,
) -> list[TensorSpec]:
    """Every parameter tensor of the model (tied weights once), plus LoRA's adapters when
    `lora` is enabled (then only the adapters train). Frozen tensors are in `dtype`,
    trainable ones in `trainable_dtype` (default: `dtype`)."""
    from tulu.train.lora import lora_targets

    trainable_dtype = trainable_dtype or dtype
    model = _meta_model(config)
    use_lora = lora is not None and lora.enabled
    base_dtype = dtype if use_lora else trainable_dtype
    specs = [
        TensorSpec(name, tuple(p.shape), base_dtype, not use_lora, _unit(name))
        for name, p in model.named_parameters()
    ]
    if use_lora:
        assert lora is not None
        for name in lora_targets(model, lora.target_modules):
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            for part, shape in (
                ("lora_A", (lora.r, linear.in_features)),
                ("lora_B", (linear.out_features, lora.r)),
            ):
                spec_name = f"{name}.{part}.weight"
                specs.append(TensorSpec(spec_name, shape, trainable_dtype, True, _unit(name)))
    return specs


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def optimizer_state_bytes(numel: int, dtype: torch.dtype, optimizer: str) -> int:
    """Bytes of the AdamW states (two moments + step) of one parameter tensor."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer: unknown optimizer {optimizer!r}")
    if optimizer == "adamw_8bit" and numel >= EIGHT_BIT_MIN_NUMEL and numel % EIGHT_BIT_BLOCK == 0:
        per_state = numel + (numel // EIGHT_BIT_BLOCK) * 4 + 256 * 4  # codes, scales, qmap
        return 2 * per_state + STEP_BYTES
    return 2 * numel * _itemsize(dtype) + STEP_BYTES


# ------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Activations:
    """Activation memory of one micro batch, in bytes.

    saved: what autograd keeps from the forward pass until backward (all layers' tensors, or
    only layer inputs with checkpointing), the loss's float32 log-probabilities included.
    logits: extra held at the loss's backward (gradients of log-probs and logits, float32).
    layer_backward: extra held while one layer runs backward: its recomputed activations
    (checkpointing only) plus the gradients of its intermediate tensors.
    """

    saved: int
    logits: int
    layer_backward: int

    @property
    def peak(self) -> int:
        return self.saved + max(self.logits, self.layer_backward)


_LAYER_LINEARS = (
    ("attention.query_key_value", "hidden"),
    ("attention.dense", "hidden"),
    ("mlp.dense_h_to_4h", "hidden"),
    ("mlp.dense_4h_to_h", "intermediate"),
)


def _lora_matches(suffix: str, lora: LoraConfig | None) -> bool:
    if lora is None or not lora.enabled:
        return False
    return any(("." + suffix).endswith("." + t) for t in lora.target_modules)


def _linear_input_bytes(
    in_features: int, adapted: bool, s: int, lora: LoraConfig | None, a: int
) -> int:
    """Per token: what a linear layer saves for backward. Trained base weight: its input.
    LoRA-adapted: its input cast to the adapter dtype (+ dropout mask) and A's output.
    Frozen and not adapted: nothing (the input gradient needs only the weight)."""
    if lora is None or not lora.enabled:
        return in_features * s
    if not adapted:
        return 0
    mask = in_features if lora.dropout > 0 else 0
    return in_features * a + mask + lora.r * a


def _layer_saved_per_token(config: NeoXConfig, s: int, lora: LoraConfig | None, a: int) -> int:
    h, i = config.hidden_size, config.intermediate_size
    # layer input + fused QKV output (V is a view of it) + rotated Q and K + attention output
    # + GELU input; the four linear layers' inputs are added below.
    values = h + 3 * h + 2 * h + h + i
    if not config.use_parallel_residual:
        values += h  # the second norm's input (x + attention)
    total = values * s
    for suffix, kind in _LAYER_LINEARS:
        in_features = h if kind == "hidden" else i
        total += _linear_input_bytes(in_features, _lora_matches(suffix, lora), s, lora, a)
    total += 4 * NORM_STAT_BYTES  # two LayerNorms x (mean, rstd)
    total += 4 * config.num_attention_heads  # float32 log-sum-exp per head
    if config.hidden_dropout > 0:
        total += 2 * h  # CUDA's one-byte masks of the attention and MLP output dropouts
    # attention_dropout adds nothing on a GPU: the fused SDPA kernels regenerate their masks.
    return total


def activation_bytes(
    config: NeoXConfig,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype,
    *,
    checkpointing: bool,
    lora: LoraConfig | None = None,
    adapter_dtype: torch.dtype | None = None,
) -> Activations:
    """Activation memory for one forward/backward of a [batch_size, seq_len] micro batch in
    `dtype`; LoRA adapters compute in `adapter_dtype` (default `dtype`: the trainer casts or
    all-gathers them so; bare PEFT on a bfloat16 model keeps them in float32)."""
    s = _itemsize(dtype)
    a = _itemsize(adapter_dtype or dtype)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    tokens = batch_size * seq_len
    # The loss runs over every position (labels are shifted, the last one is ignored), so
    # the log-probabilities cover all T positions of a row.
    positions = tokens
    use_lora = lora is not None and lora.enabled
    layers = config.num_hidden_layers
    per_layer = _layer_saved_per_token(config, s, lora, a)

    constant = 2 * config.rotary_ndims * s  # cos and sin, shared by every layer
    constant += h * s + 2 * NORM_STAT_BYTES  # final norm: input and statistics
    constant += _linear_input_bytes(h, _lora_matches("embed_out", lora), s, lora, a)  # head
    if use_lora:
        # The embeddings are frozen: the first layer's input needs no gradient, so neither
        # its norms nor the embedding lookup save anything.
        first_layer = -(h * s + 4 * NORM_STAT_BYTES)
        ids = 0
    else:
        first_layer, ids = 0, 8  # embedding backward keeps the int64 ids
        if config.hidden_dropout > 0:
            constant += h  # the embedding dropout's one-byte mask (CUDA)
    if checkpointing:
        saved = tokens * (layers * h * s + constant + ids)
        recompute = tokens * per_layer
    else:
        saved = tokens * (layers * per_layer + constant + first_layer + ids)
        recompute = 0
    saved += positions * (4 * v + 8)  # float32 log-probabilities and int64 labels
    # Gradients alive inside one layer's backward: about two MLP-wide tensors (GELU) or the
    # attention's q/k/v gradients plus the QKV gradient.
    workspace = tokens * max(2 * i, 8 * h) * s
    return Activations(saved=saved, logits=8 * positions * v, layer_backward=recompute + workspace)


# ------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device memory of a training configuration, in bytes (see the module doc)."""

    optimizer: str
    world_size: int
    dtype: str  # compute
    master_dtype: str  # trainable parameters as stored and updated
    micro_batch_size: int
    seq_len: int
    checkpointing: bool
    sharded: bool
    parameters: int
    gradients: int
    optimizer_states: int
    fsdp_buffers: int
    activations: int  # saved for backward
    logits: int  # loss backward transient
    layer_backward: int  # recompute + layer gradients transient
    overhead: int
    host: int  # CPU memory per process for offloaded tensors
    trainable_parameters: int
    total_parameters: int
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        """Peak device bytes: static memory + saved activations + the larger transient."""
        return (
            self.parameters
            + self.gradients
            + self.optimizer_states
            + self.fsdp_buffers
            + self.activations
            + max(self.logits, self.layer_backward)
            + self.overhead
        )

    def fits(self, capacity_bytes: int = DEFAULT_CAPACITY) -> bool:
        return self.total <= capacity_bytes

    def breakdown(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer states": self.optimizer_states,
            "FSDP buffers": self.fsdp_buffers,
            "activations (saved)": self.activations,
            "loss backward (peak)": self.logits,
            "layer backward (peak)": self.layer_backward,
            "overhead": self.overhead,
        }


def _sharding(train: TrainConfig, world_size: int) -> bool:
    mode = train.distributed.fsdp
    return mode == "always" or (mode == "auto" and world_size > 1)


def _unit_numel(specs: Iterable[TensorSpec], unit: str, trainable_only: bool = False) -> int:
    return sum(t.numel for t in specs if t.unit == unit and (t.trainable or not trainable_only))


def _fsdp_buffers(
    specs: list[TensorSpec], train: TrainConfig, layers: int, compute: torch.dtype
) -> int:
    """Unsharded units in the compute dtype: the root for the whole step, two layers in
    flight (all of them with reshard_after_forward false); gradients: the root's (the head's
    come first in backward and wait for the root's reduce-scatter at the end) and one layer's,
    in the compute dtype plus a float32 copy for its reduce-scatter."""
    s = _itemsize(compute)
    units = [f"layers.{n}" for n in range(layers)]
    layer = max((_unit_numel(specs, u) for u in units), default=0)
    layer_grads = max((_unit_numel(specs, u, trainable_only=True) for u in units), default=0)
    root = _unit_numel(specs, "root")
    root_grads = _unit_numel(specs, "root", trainable_only=True)
    in_flight = layers if not train.distributed.reshard_after_forward else min(2, layers)
    return (root + in_flight * layer + root_grads) * s + layer_grads * (s + 4)


def estimate_memory(
    model_config: NeoXConfig,
    train_config: TrainConfig,
    world_size: int = 1,
    *,
    optimizer: str | None = None,
    dtype: str | torch.dtype | None = None,
    overhead_bytes: int = DEFAULT_OVERHEAD,
) -> MemoryEstimate:
    """Per-device memory of `train_config` on `world_size` devices (see the module doc).

    `optimizer` and `dtype` (the compute dtype) override the config's, to compare options;
    `dtype` defaults to ``model.dtype``, else bfloat16 (what a GPU run uses).
    """
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1, got {world_size}")
    optimizer = optimizer or train_config.optim.optimizer
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer: unknown optimizer {optimizer!r}")
    if train_config.distributed.fsdp == "never" and world_size > 1:
        raise ConfigError(
            f"distributed.fsdp: 'never' trains in one process, not on {world_size} devices"
        )
    compute = parse_dtype(dtype or train_config.model.dtype or "bfloat16", "model.dtype")
    sharded = _sharding(train_config, world_size)
    master = torch.float32 if sharded and optimizer != "adamw_bf16" else compute
    lora = train_config.lora if train_config.lora.enabled else None
    specs = parameter_specs(model_config, compute, lora, trainable_dtype=master)
    shards = world_size if sharded else 1
    notes: list[str] = []

    params = grads = states = host = 0
    offload_states = train_config.optim.offload_optimizer and not sharded
    if train_config.optim.offload_optimizer and sharded:
        notes.append("optim.offload_optimizer is single-device only: not counted with FSDP")
    for t in specs:
        n, size = t.local_numel(shards), _itemsize(t.dtype)
        params += n * size
        if not t.trainable:
            continue
        grads += n * size
        state = optimizer_state_bytes(n, t.dtype, optimizer)
        if offload_states and n >= OFFLOAD_MIN_NUMEL:
            host += state + 2 * n * size  # states + pinned parameter and gradient copies
        else:
            states += state
    if sharded and train_config.distributed.cpu_offload:
        host += params + grads + states
        params = grads = states = 0
    buffers = 0
    if sharded:
        buffers = _fsdp_buffers(specs, train_config, model_config.num_hidden_layers, compute)

    if optimizer == "adamw_bf16" and master != torch.bfloat16:
        notes.append("adamw_bf16 needs bfloat16 parameters: build_optimizer refuses this setup")
    if optimizer == "adamw" and master == torch.bfloat16:
        notes.append(
            "adamw on bfloat16 parameters (no FSDP) rounds each update to nearest: most "
            "fine-tuning steps are lost; use adamw_bf16 or distributed.fsdp: always"
        )

    micro, seq = train_config.optim.micro_batch_size, train_config.data.max_seq_length
    checkpointing = train_config.model.gradient_checkpointing
    acts = activation_bytes(
        model_config, micro, seq, compute, checkpointing=checkpointing, lora=lora
    )
    return MemoryEstimate(
        optimizer=optimizer,
        world_size=world_size,
        dtype=dtype_name(compute),
        master_dtype=dtype_name(master),
        micro_batch_size=micro,
        seq_len=seq,
        checkpointing=checkpointing,
        sharded=sharded,
        parameters=params,
        gradients=grads,
        optimizer_states=states,
        fsdp_buffers=buffers,
        activations=acts.saved,
        logits=acts.logits,
        layer_backward=acts.layer_backward,
        overhead=overhead_bytes,
        host=host,
        trainable_parameters=sum(t.numel for t in specs if t.trainable),
        total_parameters=sum(t.numel for t in specs),
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------ reports
def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _dtypes(e: MemoryEstimate) -> str:
    if e.master_dtype == e.dtype:
        return e.dtype
    return f"{e.dtype} compute / {e.master_dtype} master"


def _describe(e: MemoryEstimate) -> str:
    mode = "FSDP" if e.sharded else ("1 device" if e.world_size == 1 else "replicated")
    return (
        f"{e.optimizer}, {_dtypes(e)}, {e.world_size} device(s) ({mode}), micro batch "
        f"{e.micro_batch_size} x {e.seq_len} tokens, checkpointing "
        f"{'on' if e.checkpointing else 'off'}; trainable {e.trainable_parameters:,} of "
        f"{e.total_parameters:,} parameters"
    )


def format_estimate(estimate: MemoryEstimate, capacity_bytes: int = DEFAULT_CAPACITY) -> str:
    """A breakdown table (GiB per device) of one estimate."""
    rows = list(estimate.breakdown().items())
    width = max(len(k) for k, _ in rows + [("total (device peak)", 0)])
    lines = [_describe(estimate), f"{'component':<{width}}  {'GiB':>8}"]
    lines += [f"{name:<{width}}  {_gib(value):>8}" for name, value in rows]
    verdict = "fits" if estimate.fits(capacity_bytes) else "does not fit"
    lines.append(
        f"{'total (device peak)':<{width}}  {_gib(estimate.total):>8}  "
        f"({verdict} in {capacity_bytes / GIB:.0f} GiB)"
    )
    if estimate.host:
        lines.append(f"{'host (CPU, offloaded)':<{width}}  {_gib(estimate.host):>8}")
    lines += [f"note: {n}" for n in estimate.notes]
    return "\n".join(lines)


_TABLE_COLUMNS = (
    ("optimizer", 10),
    ("devices", 7),
    ("master", 8),
    ("params", 7),
    ("grads", 7),
    ("states", 7),
    ("fsdp", 6),
    ("acts", 7),
    ("peak+", 7),
    ("total", 7),
    ("host", 6),
    ("fits", 4),
)


def estimate_table(
    model_config: NeoXConfig,
    train_config: TrainConfig,
    world_sizes: Sequence[int] = (1, 8),
    *,
    optimizers: Sequence[str] = OPTIMIZERS,
    capacity_bytes: int = DEFAULT_CAPACITY,
    overhead_bytes: int = DEFAULT_OVERHEAD,
) -> str:
    """Every optimizer option x world size, in GiB per device (for ``tulu train --dry-run``).

    ``peak+`` is the larger backward transient (loss or one layer) on top of the saved
    activations; ``fits`` compares the total with `capacity_bytes`.
    """
    estimates, skipped = [], []
    for opt in optimizers:
        for ws in world_sizes:
            try:
                estimates.append(
                    estimate_memory(
                        model_config, train_config, ws, optimizer=opt, overhead_bytes=overhead_bytes
                    )
                )
            except ConfigError as err:
                skipped.append(str(err))
    if not estimates:
        raise ConfigError(skipped[0] if skipped else "estimate_table: nothing to estimate")
    first = estimates[0]
    header = (
        f"per-device memory (GiB), {first.dtype} compute, micro batch {first.micro_batch_size} x "
        f"{first.seq_len} tokens, checkpointing {'on' if first.checkpointing else 'off'}, "
        f"LoRA {'on' if train_config.lora.enabled else 'off'}; fits = within "
        f"{capacity_bytes / GIB:.0f} GiB"
    )
    lines = [header, "  ".join(f"{name:>{w}}" for name, w in _TABLE_COLUMNS)]
    for e in estimates:
        cells = (
            e.optimizer,
            str(e.world_size),
            {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[e.master_dtype],
            _gib(e.parameters),
            _gib(e.gradients),
            _gib(e.optimizer_states),
            _gib(e.fsdp_buffers),
            _gib(e.activations),
            _gib(max(e.logits, e.layer_backward)),
            _gib(e.total),
            _gib(e.host),
            "yes" if e.fits(capacity_bytes) else "no",
        )
        lines.append(
            "  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, _TABLE_COLUMNS, strict=True))
        )
    notes = dict.fromkeys([*(n for e in estimates for n in e.notes), *skipped])
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
