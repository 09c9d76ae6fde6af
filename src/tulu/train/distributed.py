"""One code path for CPU, one GPU and many GPUs (torchrun + FSDP2).

The training loop uses this module the same way however it was launched::

    world = init_distributed(config.distributed)  # reads torchrun's env vars, if any
    model = prepare_model(model, world, config)  # device, dtype, checkpointing, FSDP2
    optimizer = AdamW(model.parameters(), ...)  # after prepare_model: sharded params
    A = accumulation_steps(config, world)  # micro-batches per rank per step
    for step_batches in ...:  # A * world_size micro-batches per optimizer step
        mine = micro_batches_for_rank(step_batches, world)
        count = all_reduce_sum(sum of trained tokens of all micro-batches in `mine`, world)
        for mb in mine:
            loss_sum, _ = model.loss(**mb)
            (loss_sum / count).backward()
        clip_grad_norm(model, config.optim.max_grad_norm, world)
        optimizer.step(); optimizer.zero_grad()
    ...
    shutdown(world)

What makes one process and N processes train identically:

- **Gradients are summed over ranks**, not averaged: FSDP's reduce-scatter is set to a plain
  sum (`set_gradient_divide_factor(1.0)`). A step's gradient is then the sum of the gradients of
  all its micro-batches wherever they ran, exactly what one process gets by accumulating them.
  Normalise the loss by counts over the whole global batch (`all_reduce_sum`), never by
  `world_size`.
- **Micro-batches are dealt round-robin** (`micro_batches_for_rank`): one process with
  accumulation A*W sees the same micro-batches as W processes with accumulation A.
- **Gradient clipping uses the norm over all shards** (`clip_grad_norm`).

Decisions (see `prepare_model` for details):

- With FSDP the trainable parameters are sharded in **float32** (master weights) and
  all-gathered in the compute dtype (bfloat16 on GPUs), with gradients reduced in float32.
- Activation checkpointing is the model's own per-layer `torch.utils.checkpoint` call, which
  FSDP2 supports as "module-hook-based activation checkpointing".
- `distributed.fsdp: never` with more than one process is a `ConfigError` (no DDP).
- A checkpoint is never loaded whole under FSDP: the model is built on the meta device,
  sharded, and every rank reads the checkpoint into its own shards
  (`load_checkpoint_shards`), holding its shards plus one full tensor at a time.

Under FSDP every forward must go through the root module's call: `model(...)`, or
`model.loss(...)` on a bare `GPTNeoXForCausalLM` (it calls `self(...)`). `hidden_states`, or
`.loss` reached through a wrapper's attribute pass-through (PEFT), skips FSDP's root hooks.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tulu.errors import CheckpointError, ConfigError, TuluError
from tulu.model.config import parse_dtype
from tulu.model.gpt_neox import GPTNeoXForCausalLM, GPTNeoXLayer
from tulu.pretrained import parse_device
from tulu.train.config import DistributedConfig, TrainConfig

__all__ = [
    "World",
    "accumulation_steps",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "checkpoint_slots",
    "clip_grad_norm",
    "compute_dtype",
    "full_model_state_dict",
    "get_train_state",
    "init_distributed",
    "load_checkpoint_shards",
    "load_sharded",
    "master_dtype",
    "micro_batches_for_rank",
    "on_every_rank",
    "prepare_model",
    "save_sharded",
    "set_train_state",
    "shutdown",
    "transformer_blocks",
    "uses_fsdp",
]

T = TypeVar("T")


# ------------------------------------------------------------------------------ the world


@dataclass(frozen=True)
class World:
    """Where this process sits: its rank among `world_size` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, exports and writes anything that is not sharded."""
        return self.rank == 0

    @property
    def has_process_group(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise TuluError(f"environment variable {name}={raw!r} is not an integer") from None


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    """`device` as given, else cuda:LOCAL_RANK when CUDA is there, else the CPU.

    A bare "cuda" means this process's GPU (cuda:LOCAL_RANK), so that the same command line works
    for every rank. Any other device is probed (`tulu.pretrained.parse_device`): "meta" or a
    backend torch was built without would otherwise be accepted here and fail deep inside the
    first training step, after the data was tokenized and the model built.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not a valid torch device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {dev}: this machine has {torch.cuda.device_count()} GPU(s) "
                f"(LOCAL_RANK={local_rank}); start at most that many processes per node"
            )
        return dev
    return parse_device(dev, "device")


def init_distributed(config: DistributedConfig, device: str | None = None) -> World:
    """The `World` of this process, with the process group initialised when one is needed.

    torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are read from the
    environment; a plain `python` run (no variables) is rank 0 of 1 and needs no process group.
    A group is created when WORLD_SIZE > 1, and also for a single process with
    `distributed.fsdp: always` (a 1-process group over an in-memory store, so FSDP can be used
    as the mixed-precision engine on one GPU without any launcher).

    The backend is `distributed.backend`, else nccl for CUDA (with gloo beside it for CPU
    tensors under `cpu_offload`) and gloo for the CPU. Each process
    drives the GPU cuda:LOCAL_RANK. An already initialised group (e.g. set up by a test or a
    notebook) is reused.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise TuluError(f"environment: RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    world = World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise TuluError(
                f"a process group of {dist.get_world_size()} processes (rank "
                f"{dist.get_rank()}) is already initialised, but the environment says rank "
                f"{rank} of {world_size}"
            )
        return world
    if world_size == 1 and config.fsdp != "always":
        return world
    if not dist.is_available():
        raise ConfigError("distributed: this torch build has no torch.distributed support")
    backend = config.backend or _default_backend(dev, config)
    kwargs: dict[str, Any] = {"backend": backend}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise TuluError(
                    f"environment: WORLD_SIZE={world_size} but {name} is not set; "
                    "start multi-process runs with torchrun"
                )
    try:
        dist.init_process_group(**kwargs)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"distributed.backend: cannot initialise the {backend!r} process group ({err})"
        ) from err
    return world


def _default_backend(device: torch.device, config: DistributedConfig) -> str:
    """nccl on CUDA, gloo on the CPU; both on CUDA with `cpu_offload`.

    With `cpu_offload` FSDP2 keeps gradients on the CPU, and the all-reduce of their norm
    (`clip_grad_norm`, every step) then runs on CPU tensors, which NCCL cannot reduce ("No
    backend type associated with device type cpu"); torchtitan pairs the backends the same
    way for its CPU offload.
    """
    if device.type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if config.cpu_offload else "nccl"


def shutdown(world: World, *, synchronize: bool | None = None) -> None:
    """Tear the process group down (if any) so the process exits cleanly; every rank calls it.

    With `synchronize`, it first waits for the other ranks, so that none tears down while
    another still communicates (e.g. during export). The default synchronises unless an
    exception is propagating (`shutdown` called from a `finally` after an error): the other
    ranks may never arrive, and waiting would hang until the collective timeout.

    With gloo, a worker thread may still be releasing the last collectives' tensors after the
    caller has moved on; if the interpreter is already finalising by then, its taking the GIL
    aborts the process ("terminate called without an active exception", pytorch#179291; seen
    here in about one run in five on a loaded 2-core machine). A short pause after the last
    collective lets those threads finish first.
    """
    if not world.has_process_group:
        return
    gloo = "gloo" in str(dist.get_backend())
    if synchronize is None:
        synchronize = sys.exc_info()[0] is None
    if synchronize:
        barrier(world)
    dist.destroy_process_group()
    if gloo:
        time.sleep(0.2)  # releases the GIL for gloo's worker threads


# ------------------------------------------------------------------------------ collectives


def all_reduce_sum(tensor: Tensor, world: World) -> Tensor:
    """Sum `tensor` over all processes, in place, and return it (a no-op for one process).

    The tensor may live anywhere: it is moved to the world's device for the collective (NCCL
    reduces only GPU tensors) and the result copied back.
    """
    if not world.has_process_group or dist.get_world_size() == 1:
        return tensor
    work = tensor.to(world.device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_object(obj: T, world: World, src: int = 0) -> T:
    """Rank `src`'s `obj` (any picklable value) on every rank; `obj` itself for one process."""
    if not world.has_process_group or dist.get_world_size() == 1:
        return obj
    box = [obj]
    device = world.device if world.device.type == "cuda" else None
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def barrier(world: World) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if world.has_process_group and dist.get_world_size() > 1:
        if world.device.type == "cuda":
            dist.barrier(device_ids=[world.device.index])
        else:
            dist.barrier()


def on_every_rank(fn: Callable[[], T], world: World) -> T:
    """`fn()` run by every rank, failing on all of them if it fails on any.

    For work each rank does on its own (`fn` must not communicate) before the next collective:
    a rank whose `fn` raised re-raises its own error, the others a `TuluError` naming the
    first rank that failed and its message. A failure on one rank therefore stops every rank
    instead of leaving the others waiting in a collective until the process group times out.
    """
    if not world.has_process_group or dist.get_world_size() == 1:
        return fn()
    error: Exception | None = None
    try:
        result = fn()
    except Exception as err:
        error = err
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise TuluError(f"rank {rank} failed: {failure}")
    return result


# ------------------------------------------------------------------------------ batches


def accumulation_steps(config: TrainConfig, world: World) -> int:
    """Micro-batches each process runs per optimizer step.

    `optim.global_batch_size` rows per step = micro_batch_size * accumulation * world_size; it
    must divide evenly, or ranks would run different numbers of forward passes (and hang in
    FSDP's collectives) or the batch would silently change size.
    """
    o = config.optim
    per_pass = o.micro_batch_size * world.world_size
    if o.global_batch_size % per_pass:
        raise ConfigError(
            f"optim.global_batch_size: {o.global_batch_size} is not a multiple of "
            f"optim.micro_batch_size ({o.micro_batch_size}) x processes ({world.world_size}) "
            f"= {per_pass}"
        )
    return o.global_batch_size // per_pass


def micro_batches_for_rank(micro_batches: Sequence[T], world: World) -> list[T]:
    """This rank's share of one optimizer step's micro-batches: mb[r], mb[r+W], mb[r+2W], ...

    Dealing round-robin means the step's global batch (and hence, with summed gradients, the
    update) does not depend on how many processes run it. Every rank must get the same number
    of micro-batches, so the count must be a multiple of the world size: drop or pad a short
    last step before calling this.
    """
    if len(micro_batches) % world.world_size:
        raise TuluError(
            f"an optimizer step has {len(micro_batches)} micro-batches, not a multiple of the "
            f"{world.world_size} processes; every process must run the same number"
        )
    return list(micro_batches[world.rank :: world.world_size])


# ------------------------------------------------------------------------------ the model


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype forward and backward run in: `model.dtype`, else bfloat16 on GPUs, float32
    on the CPU (the documented default of the setting)."""
    if config.model.dtype is not None:
        return parse_dtype(config.model.dtype, "model.dtype")
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def master_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype trainable parameters are stored (and updated by the optimizer) in under FSDP.

    float32, except with `optim.optimizer: adamw_bf16`, whose whole point is bfloat16
    parameters. A bfloat16 master copy cannot absorb fine-tuning updates: near 1.0 its spacing
    is 2**-7 ~ 0.008, so an Adam step of ~lr = 2e-5 rounds away to nothing.
    """
    compute = compute_dtype(config, device)
    if config.optim.optimizer == "adamw_bf16":
        return compute
    return torch.float32


def uses_fsdp(config: TrainConfig, world: World) -> bool:
    """Whether `prepare_model` shards the model: auto = with more than one process."""
    fsdp = config.distributed.fsdp
    if fsdp == "never" and world.world_size > 1:
        raise ConfigError(
            f"distributed.fsdp: 'never' trains in a single process, but {world.world_size} "
            "processes were started; use 'auto' or 'always' (FSDP2) to train on several GPUs"
        )
    return fsdp == "always" or (fsdp == "auto" and world.world_size > 1)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The GPT-NeoX layers, found by type so that wrappers (e.g. LoRA) do not hide them."""
    return [m for m in model.modules() if isinstance(m, GPTNeoXLayer)]


def prepare_model(model: nn.Module, world: World, config: TrainConfig) -> nn.Module:
    """Make `model` ready to train on this world, in place; returns it for convenience.

    Pass the model as loaded (on the CPU), or under FSDP built on the meta device and filled
    afterwards by `load_checkpoint_shards` (what the trainer does with a checkpoint: no rank
    ever holds the whole model); build the optimizer afterwards, over the returned model's
    parameters. Wrappers such as a PEFT `PeftModel` are fine: blocks and models are found by
    type.

    Activation checkpointing: `gradient_checkpointing` of every `GPTNeoXForCausalLM` in
    `model` is set from `model.gradient_checkpointing` of the config; the model then wraps
    each layer's call in `torch.utils.checkpoint` (non-reentrant). Under FSDP2 the layer's
    FSDP hooks run inside the checkpointed call and FSDP2 handles the recomputation (its
    "module-hook-based activation checkpointing": the layer is unsharded by its pre-backward
    hook and its forward hooks stand aside in that state), so one mechanism serves every
    launch; the tests check that gradients are the same with and without it, with and
    without FSDP. (torch's checkpoint_wrapper around each block would also work, but would
    rename every parameter (``_checkpoint_wrapped_module``) in checkpoints and exports.)

    Without FSDP (one process, `distributed.fsdp` auto or never) the model moves to the
    device; frozen parameters are cast to the compute dtype (`compute_dtype`) and trainable
    ones keep the dtype they were loaded or created in. Load the model in the compute dtype:
    a full fine-tune on one GPU is then pure bfloat16 (pair it with `adamw_bf16`, or use
    `distributed.fsdp: always` for float32 master weights), while LoRA adapters, which PEFT
    creates in float32, train in float32.

    With FSDP2 (`uses_fsdp`): `fully_shard` on each transformer block, then on the root (the
    embeddings, final norm and LM head, so tied embeddings stay one parameter in one group).

    - Trainable parameters are stored in `master_dtype` (float32) shards and all-gathered in
      the compute dtype: `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`,
      i.e. bfloat16 parameters for compute, float32 gradient reductions and float32 optimizer
      updates. Frozen parameters (LoRA's base) stay in the compute dtype: they are never
      updated. For a 6.9B model on 8 x 80 GB that is 16 bytes per parameter / 8 = ~14 GB of
      shards (weights, gradients, Adam moments) per GPU, plus the unsharded bfloat16 units in
      flight, where bfloat16 shards would save only ~7 GB and lose the updates.
    - Parameters are upcast block by block just before that block is sharded, so a model
      loaded in bfloat16 is never whole in float32 (on the meta device this costs nothing,
      and `load_checkpoint_shards` reads each tensor straight into its shard's dtype).
    - `reshard_after_forward` applies to the blocks; the root stays unsharded after forward
      (FSDP2's default for the root) because backward needs the LM head first.
    - `cpu_offload` keeps shards, gradients and optimizer state in (pinned) CPU memory; it is
      ignored on the CPU, where everything is in CPU memory already.
    - Gradients are summed over ranks, not averaged (see the module docstring).
    """
    device = world.device
    compute = compute_dtype(config, device)
    fsdp = uses_fsdp(config, world)
    _set_gradient_checkpointing(model, config.model.gradient_checkpointing)
    if not fsdp:
        return _to_device(model, device, compute)
    if not world.has_process_group:
        raise TuluError("FSDP needs a process group: call init_distributed before prepare_model")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    master = master_dtype(config, device)
    mesh = init_device_mesh(device.type, (world.world_size,))
    mp = MixedPrecisionPolicy(
        param_dtype=compute if compute != master else None,
        reduce_dtype=torch.float32,
    )
    common: dict[str, Any] = {"mesh": mesh, "mp_policy": mp}
    if config.distributed.cpu_offload and device.type != "cpu":
        common["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for block in transformer_blocks(model):
        _set_dtypes(block, master, compute)
        fully_shard(block, reshard_after_forward=config.distributed.reshard_after_forward, **common)
    _set_dtypes(model, master, compute)
    root_reshard = None if config.distributed.reshard_after_forward else False
    fully_shard(model, reshard_after_forward=root_reshard, **common)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # Sum, do not average, over ranks; plain SUM collectives (gloo has no PREMUL_SUM).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def _set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, GPTNeoXForCausalLM):
            module.gradient_checkpointing = enabled


def _to_device(model: nn.Module, device: torch.device, compute: torch.dtype) -> nn.Module:
    """Move the model to `device`; frozen floating parameters in `compute`, trainable ones
    as they are."""
    model.to(device=device)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.requires_grad and p.dtype != compute:
                p.data = p.data.to(compute)
    for module in model.modules():
        if isinstance(module, GPTNeoXForCausalLM):
            module.tie_weights()  # a no-op unless the move gave a tied parameter new storage
    return model


@torch.no_grad()
def _set_dtypes(module: nn.Module, master: torch.dtype, compute: torch.dtype) -> None:
    """Trainable floating parameters in `master`, frozen ones in `compute`, in place.

    Assigning `.data` keeps each Parameter object, so tied parameters stay tied and references
    held by wrappers stay valid. Parameters already sharded by FSDP (DTensors) are left alone.
    """
    from torch.distributed.tensor import DTensor

    for p in module.parameters():
        if isinstance(p, DTensor) or not p.is_floating_point():
            continue
        want = master if p.requires_grad else compute
        if p.dtype != want:
            p.data = p.data.to(want)


# ------------------------------------------------------------------------------ loading shards

Slot = tuple[nn.Module, str]  # (module, attribute name) of a parameter


def checkpoint_slots(model: GPTNeoXForCausalLM) -> dict[str, Slot]:
    """Where each tensor of `model`'s checkpoints goes: name (as in `expected_shapes`, a tied
    head appears once) -> (module, attribute).

    Take them from the bare model, before a wrapper renames parameters (PEFT's LoRA layers
    hold a linear layer's weight as ``...base_layer.weight``) and before `prepare_model`:
    FSDP replaces each parameter with a sharded one, on the same module under the same name.
    """
    slots: dict[str, Slot] = {}
    for name, _ in model.named_parameters():
        module_name, _, attr = name.rpartition(".")
        slots[name] = (model.get_submodule(module_name), attr)
    return slots


@torch.no_grad()
def allocate_shards(model: nn.Module, world: World) -> dict[Slot, str]:
    """Give `model`, built on the meta device and sharded by `prepare_model`, real (and
    uninitialised) storage for this rank's shards; returns the slots still without a value,
    by name.

    `to_empty(device=world.device)` allocates the shards (FSDP2 re-pads them and, with
    `cpu_offload`, pins them). Tensors that already had values (LoRA adapters, which PEFT
    creates and initialises before sharding) are saved before and restored after. A tied LM
    head stays tied: FSDP2 swaps the contents of each parameter object.

    A resumed run calls this alone: its DCP checkpoint holds every parameter, so reading
    the HF checkpoint first (`load_checkpoint_shards`) would be wasted work (14 GB for
    6.9B in bfloat16, on every rank).
    """
    names: dict[Slot, str] = {}
    kept: dict[Slot, Tensor] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        module_name, _, attr = name.rpartition(".")
        slot = (model.get_submodule(module_name), attr)
        names[slot] = name
        if not tensor.is_meta:
            kept[slot] = _local(tensor).clone()
    model.to_empty(device=world.device)
    for (module, attr), value in kept.items():
        _local(getattr(module, attr)).copy_(value)
    for net in model.modules():
        if isinstance(net, GPTNeoXForCausalLM) and net.config.tie_word_embeddings:
            if net.embed_out.weight is not net.gpt_neox.embed_in.weight:
                raise TuluError("to_empty untied the tied LM head of the sharded model")
    return {slot: name for slot, name in names.items() if slot not in kept}


@torch.no_grad()
def load_checkpoint_shards(
    model: nn.Module, directory: Path, slots: dict[str, Slot], world: World
) -> None:
    """Fill `model`, built on the meta device and sharded by `prepare_model`, from the HF
    checkpoint in `directory`: each rank reads the checkpoint itself and keeps only its shards.

    1. The checkpoint is checked before anything is allocated (names, shapes, missing
       tensors: `tulu.model.checkpoint.checkpoint_tensors`, with `load_model`'s messages).
    2. `allocate_shards` allocates this rank's shards, keeping values already set (LoRA).
    3. The checkpoint tensors are read one at a time in their parameter's dtype (the float32
       master dtype for trainable ones, the compute dtype for frozen ones); each rank copies
       its slice of each into the parameter's local shard and drops the tensor. The slice is
       cut on the host (`_local_shard`), so only this rank's part travels to its device.

    Host memory per rank while loading: its shards plus the largest single tensor (and one
    read chunk when the dtype changes). GPT-NeoX has no buffers to recompute (its rotary
    tables are computed in each forward); any tensor that was on the meta device and is
    neither restored nor in the checkpoint is an error. Call it through `on_every_rank`.
    """
    from tulu.model.checkpoint import checkpoint_tensors

    shapes = {name: tuple(getattr(module, attr).shape) for name, (module, attr) in slots.items()}
    tensors = checkpoint_tensors(
        directory, shapes, lambda name, _: getattr(*slots[name]).dtype, device="cpu"
    )
    missing = allocate_shards(model, world)
    for name, full in tensors:
        slot = slots[name]
        target = getattr(*slot)
        _local(target).copy_(_local_shard(full, target, name))
        missing.pop(slot, None)
        del full
    if missing:
        unfilled = ", ".join(sorted(missing.values()))
        raise TuluError(f"{directory}: no value for {unfilled} (not in the checkpoint)")


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view FSDP2 all-gathers from), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _local_shard(full: Tensor, target: Tensor, name: str) -> Tensor:
    """This rank's part of `full`, laid out as the (sharded) parameter `target`, cut where
    `full` lies (the host), so that only the part travels to the device.

    Each `Shard(dim)` placement cuts as FSDP2 shards: ``torch.chunk`` along `dim` over that
    mesh dimension (a smaller last chunk, empty chunks for ranks past the end); `Replicate`
    keeps the whole. (`distribute_tensor` would first copy the whole tensor to the device:
    the 0.8 GB embedding of 6.9B, on every rank.) The shape is checked against the shard.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(target, DTensor):
        return full
    mesh = target.device_mesh
    shard = full
    for mesh_dim, placement in enumerate(target.placements):
        if isinstance(placement, Shard):
            chunks = shard.chunk(mesh.size(mesh_dim), dim=placement.dim)
            index = mesh.get_local_rank(mesh_dim)
            if index < len(chunks):
                shard = chunks[index]
            else:
                shard = shard.narrow(placement.dim, 0, 0)
        elif not isinstance(placement, Replicate):
            raise TuluError(f"{name}: cannot load into a parameter placed as {placement}")
    if shard.shape != target.to_local().shape:
        raise TuluError(
            f"{name}: the slice of the checkpoint tensor has shape {list(shard.shape)}, this "
            f"rank's shard {list(target.to_local().shape)}"
        )
    return shard


# ------------------------------------------------------------------------------ gradients


def clip_grad_norm(model: nn.Module, max_norm: float | None, world: World) -> Tensor:
    """Clip gradients to a total 2-norm of `max_norm` (None: only measure); returns the norm
    before clipping, as a float32 scalar on the CPU.

    Under FSDP2 each gradient is a DTensor shard; the norm is taken over all shards of all
    ranks (a DTensor reduction, then `full_tensor()`), so every rank scales by the same factor
    and the result equals one process's `clip_grad_norm_` on the full gradients.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), dtype=torch.float32)
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.detach().float().cpu()


# ------------------------------------------------------------------------------ checkpoints


def get_train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...}: state dicts keyed by parameter name (FQN), sharded
    (DTensors) under FSDP and plain tensors otherwise, ready for `save_sharded`.

    The same names in both cases let a checkpoint written by N processes load into one and
    vice versa. Add plain values (step, data position, scheduler state) to the returned dict
    before saving; `load_sharded` fills them in from the checkpoint.

    An optimizer that has not stepped yet gets its state initialised by torch (a step with
    zero gradients and lr 0), so that there is something to load into; that step counts in
    Adam's bias correction, so call this on a fresh optimizer only to load a checkpoint.

    torchao's `CPUOffloadOptimizer` (``optim.offload_optimizer``) is no torch optimizer
    inside, which `get_state_dict` cannot read: see `_offload_optimizer_state`.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    if _is_cpu_offload_optimizer(optimizer):
        return {
            "model": get_model_state_dict(model),
            "optimizer": _offload_optimizer_state(model, optimizer),
        }
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def set_train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]
) -> None:
    """Load a state from `get_train_state` (filled in by `load_sharded`) into model and
    optimizer; other entries of `state` are the caller's to read."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None or "optimizer" not in state:
        if optimizer is not None:
            raise CheckpointError("the checkpoint state has no optimizer state to load")
        set_model_state_dict(model, state["model"])
        return
    if _is_cpu_offload_optimizer(optimizer):
        set_model_state_dict(model, state["model"])
        _load_offload_optimizer_state(model, optimizer, state["optimizer"])
        return
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def _is_cpu_offload_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is torchao's CPUOffloadOptimizer (torchao is imported if it is)."""
    torchao_optim = sys.modules.get("torchao.optim")
    cls = getattr(torchao_optim, "CPUOffloadOptimizer", None)
    return cls is not None and isinstance(optimizer, cls)


def _offload_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """A CPUOffloadOptimizer's state, for `save_sharded`, keyed by parameter name.

    torchao's CPUOffloadOptimizer subclasses `Optimizer` without being one inside: no `state`,
    one optimizer per large parameter over a pinned CPU copy of it (``optim_dict``,
    ``param_d2h_map``), and one on-device optimizer for the small parameters (``d_opt``), so
    DCP's `get_state_dict` fails on it and its own `state_dict` is keyed by position. Here
    each CPU optimizer's state dict is stored under its parameter's name ("offloaded"), the
    on-device one as DCP gives it ("on_device"). CPU optimizers that have not stepped get
    their state initialised as torch does it (one step with zero gradients and lr 0).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    offloaded = {}
    for name, param in model.named_parameters():
        inner = optimizer.optim_dict.get(param)
        if inner is not None:
            _init_offloaded_state(inner)
            offloaded[name] = inner.state_dict()
    state: dict[str, Any] = {"offloaded": offloaded}
    if optimizer.d_opt is not None:
        state["on_device"] = get_optimizer_state_dict(model, optimizer.d_opt)
    return state


@torch.no_grad()
def _init_offloaded_state(inner: torch.optim.Optimizer) -> None:
    """One step with zero gradients and lr 0, if `inner` has no state yet. Its parameters'
    gradients are torchao's pinned buffers, which must survive, so they are set back after
    (torch's own initialisation would skip an optimizer whose parameters have gradients)."""
    if inner.state:
        return
    params = [p for group in inner.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    lrs = [group["lr"] for group in inner.param_groups]
    for group, lr in zip(inner.param_groups, lrs, strict=True):
        group["lr"] = torch.zeros_like(lr) if isinstance(lr, Tensor) else 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    inner.step()
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    for group, lr in zip(inner.param_groups, lrs, strict=True):
        group["lr"] = lr


@torch.no_grad()
def _load_offload_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load `_offload_optimizer_state`'s dict (filled by `load_sharded`) into `optimizer`.

    The CPU copies of the parameters are refreshed from the (just loaded) model: the
    optimizer took them when it was built, before the checkpoint was read, and each step
    updates the copy and writes it back over the parameter. Its list of the on-device
    optimizer's parameter groups (what its `param_groups`, hence the LR scheduler, sees) is
    pointed at the groups loading created, or the scheduler would set stale copies.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    for name, param in model.named_parameters():
        inner = optimizer.optim_dict.get(param)
        if inner is not None:
            inner.load_state_dict(state["offloaded"][name])
            optimizer.param_d2h_map[param].copy_(param.detach())
    if optimizer.d_opt is not None:
        set_optimizer_state_dict(model, optimizer.d_opt, state["on_device"])
        optimizer.d_param_groups = optimizer.d_opt.param_groups


@contextmanager
def _dcp_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group; that is
    exactly what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled.*")
        yield


def save_sharded(state_dict: dict[str, Any], directory: str | Path) -> None:
    """Write `state_dict` with torch.distributed.checkpoint: every rank writes its own shards
    (all ranks must call this); without a process group, one process writes everything."""
    import torch.distributed.checkpoint as dcp

    with _dcp_quiet():
        dcp.save(state_dict, checkpoint_id=str(directory), no_dist=not _dist_active())


def load_sharded(state_dict: dict[str, Any], directory: str | Path) -> None:
    """Fill `state_dict` in place from a `save_sharded` directory, resharding as needed (the
    checkpoint may come from any number of processes). Keys of `state_dict` absent from the
    checkpoint are a `CheckpointError`."""
    import torch.distributed.checkpoint as dcp

    path = Path(directory)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a sharded checkpoint (no .metadata file)")
    try:
        with _dcp_quiet():
            dcp.load(state_dict, checkpoint_id=str(path), no_dist=not _dist_active())
    except dcp.api.CheckpointException as err:
        # str(err) holds every failing rank's whole traceback; the exceptions themselves
        # say what is wrong (a missing key, a size mismatch naming the tensor, a torn file).
        reasons = "; ".join(
            f"rank {rank}: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
            for rank, (exc, _) in sorted(err.failures.items())
        )
        raise CheckpointError(f"{path}: cannot load the sharded checkpoint ({reasons})") from err


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def full_model_state_dict(model: nn.Module, world: World) -> dict[str, Tensor]:
    """The whole (unsharded) model state dict on the CPU on rank 0, {} on other ranks.

    For exporting an HF checkpoint. All ranks must call it (under FSDP it all-gathers each
    parameter). The tensors are in the parameters' storage dtype (float32 master weights under
    FSDP), so the exporter casts to the dtype it writes. Tied parameters appear under both of
    their names.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not world.is_main:
        return {}
    return {k: v.detach().cpu() for k, v in state.items()}
