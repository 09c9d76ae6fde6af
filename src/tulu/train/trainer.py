"""The training loop: `train(config)` fine-tunes a GPT-NeoX on a records file, on the CPU, one
GPU, or N GPUs under torchrun (one code path, `tulu.train.distributed`).

What a run does, in order: set up the process group (if any); seed python, numpy and torch
from ``seed``; load the tokenizer and the model (a checkpoint, or a fresh model from
``model.preset`` / ``model.config`` initialised with ``model.init_seed``); wrap it with LoRA
when enabled; `prepare_model` (device, dtypes, activation checkpointing, FSDP2), all in
`model_for_training`. Under FSDP a checkpoint is not loaded whole: the model is built on the
meta device and each rank reads the checkpoint into its own shards after `prepare_model`
(`tulu.train.distributed.load_checkpoint_shards`). Then the run tokenizes the training and
validation files (rank 0 first, the others then hit the cache); builds the optimizer and
schedule; resumes from a checkpoint if there is one (it holds every weight, so a resumed run
reads only the config.json of ``model.path``, never its weights; settings changed since the
checkpoint, such as ``optim.lr`` or ``max_steps``, apply from the first resumed step and are
listed on stderr); runs the steps of the `DataPlan`; writes checkpoints, metrics, the
validation loss, the loss plot and the final HF export (`tulu.train.checkpointing`,
`tulu.train.metrics`).

Paths in the config (data files, tokenizer, output directory) are used as written: relative
ones resolve against the current directory, not the config file's.

**Loss normalisation** (``optim.loss_normalization``). A step has M micro-batches (over
gradient accumulation and ranks), micro-batch m has n_m trained tokens with summed token loss
S_m, and N = sum of n_m.

- ``paper`` (open-instruct, and so the Tulu paper): each micro-batch's loss is its mean
  S_m / n_m, and the step's loss is the average over the step's micro-batches:
  (1/M) sum_m S_m / n_m. The micro-batch loss is divided by M before its backward pass, so
  the summed gradients are those of that average.
- ``unbiased``: every trained token of the step weighs the same: sum_m S_m / N. N is counted
  before the backward passes (the step's micro-batches are known in advance) and summed over
  ranks, and each S_m is divided by N before its backward pass.

With ``paper`` a token's weight is 1 / (M n_m): tokens of micro-batches with few trained
tokens (short answers) count for more than tokens of micro-batches with many (long answers),
so long responses are under-weighted, and the objective changes with the micro-batch size
(with one example per micro-batch each example weighs the same, whatever its length). With
``unbiased`` the step's loss is the mean token loss of the global batch, whatever the
micro-batch size or the number of processes. Both divide by counts over the whole step,
never by the world size, because gradients are summed over ranks (see
`tulu.train.distributed`): the logged loss is the step's normalised loss as defined above,
reduced over ranks, and the same number on any number of processes.

Micro-batches are passed to the model without their attention mask: with right padding (or
packing's segment ids) and causal attention a real token never attends to a padded one, so
the mask changes nothing but would keep SDPA off its fused causal kernels.

A NaN or infinite loss (or gradient norm) stops the run with a `TuluError` naming the step,
before the optimizer applies it and before any checkpoint of that step is written: the last
good checkpoint stays the latest.

Under FSDP the gradients are reduce-scattered after every micro-batch's backward pass
(FSDP2's default), and accumulate in the sharded gradients: correct for any accumulation, at
the cost of one reduce-scatter per micro-batch rather than per step. Skipping the sync on
non-final micro-batches (`set_requires_gradient_sync(False)`) would trade that
communication for keeping unsharded gradients in memory.

Multi-process notes: rank 0 tokenizes while the others wait at a barrier, so a first
tokenization longer than the process group's timeout (10 to 30 minutes) fails; tokenize
beforehand with ``tulu data tokenize`` (same tokenizer, max_seq_length and cache directory)
for very large mixtures.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from torch import Tensor, nn

from tulu.data.batching import padded_share
from tulu.errors import CheckpointError, ConfigError, TuluError
from tulu.model.config import NeoXConfig, dtype_name, preset
from tulu.model.gpt_neox import GPTNeoXForCausalLM, next_token_loss
from tulu.tokenizer import Tokenizer
from tulu.train.checkpointing import (
    CONFIG_FILE,
    FINAL_DIR,
    export_final,
    load_checkpoint,
    remove_stale_temps,
    resolve_resume,
    restore_scheduler,
    save_checkpoint,
    seed_everything,
)
from tulu.train.config import TrainConfig
from tulu.train.data_loader import (
    DataPlan,
    count_trained,
    validation_micro_batches,
)
from tulu.train.distributed import (
    World,
    accumulation_steps,
    all_reduce_sum,
    allocate_shards,
    barrier,
    broadcast_object,
    checkpoint_slots,
    clip_grad_norm,
    compute_dtype,
    init_distributed,
    load_checkpoint_shards,
    master_dtype,
    on_every_rank,
    prepare_model,
    shutdown,
    uses_fsdp,
)
from tulu.train.metrics import MetricsLogger, Throughput, micro_batch_flops, peak_flops
from tulu.train.optim import build_optimizer, build_scheduler

__all__ = [
    "StepLoss",
    "TrainResult",
    "backward_step",
    "build_model_config",
    "check_context",
    "check_data_files",
    "check_export_target",
    "evaluate",
    "load_tokenizer",
    "micro_batch_loss",
    "model_for_training",
    "tokenize_data_file",
    "train",
]

T = TypeVar("T")
MODEL_INPUTS = ("position_ids", "segment_ids")  # passed on; attention_mask is not (see above)


@dataclass
class TrainResult:
    """What `train` did: the last completed step, the losses of the steps it ran, and where
    everything went (paths are None when not written)."""

    final_step: int
    total_steps: int
    losses: dict[int, float]
    output_dir: Path
    checkpoint: Path | None
    resumed_from: Path | None = None
    validation_loss: float | None = None
    export_dir: Path | None = None
    adapter_dir: Path | None = None
    metrics_file: Path | None = None
    plot: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ loss
def micro_batch_loss(model: nn.Module, micro_batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(summed next-token loss over trained tokens, trained tokens) of one micro-batch.

    The same computation as `GPTNeoXForCausalLM.loss` (`next_token_loss`), but through the
    model's own call, so that a wrapper's forward (FSDP's hooks on a `PeftModel` root) runs.
    """
    kwargs = {k: micro_batch[k] for k in MODEL_INPUTS if k in micro_batch}
    return next_token_loss(model(micro_batch["input_ids"], **kwargs), micro_batch["labels"])


@dataclass
class StepLoss:
    """One step's normalised loss and token counts, summed over ranks."""

    loss: float
    tokens: int  # real (non-padding) tokens of the real micro-batches
    trained_tokens: int
    flops: float
    slots: int = 0  # token slots (rows x width) of the real micro-batches, padding included

    @property
    def padded_fraction(self) -> float:
        """Padding's share of the step's token slots (0 with no slots)."""
        return padded_share(self.tokens, self.slots)


def backward_step(
    model: nn.Module,
    micro_batches: list[dict[str, Tensor]],
    world: World,
    *,
    normalization: str,
    num_micro_batches: int,
    model_config: NeoXConfig | None = None,
    real: list[bool] | None = None,
) -> StepLoss:
    """Forward and backward this rank's `micro_batches` of one step, with the loss
    normalisation of the module doc; gradients accumulate in the parameters' `.grad`.

    `num_micro_batches` is M, the step's real micro-batches over all ranks; `real` flags this
    rank's fillers (False), which count for nothing. The micro-batches are given on the CPU
    (counts are taken there, without a device sync) and moved to `world.device` one by one;
    the only syncs are the count's all-reduce ("unbiased") and the final one.
    """
    if normalization not in ("paper", "unbiased"):
        raise ConfigError(
            f"optim.loss_normalization: expected paper or unbiased, got {normalization!r}"
        )
    real = real if real is not None else [True] * len(micro_batches)
    counts = [count_trained(mb) for mb in micro_batches]
    if normalization == "unbiased":
        total = torch.tensor([float(sum(counts))], dtype=torch.float64)
        denominator = max(float(all_reduce_sum(total, world)[0]), 1.0)
    else:
        denominator = float(max(num_micro_batches, 1))
    summed = torch.zeros((), dtype=torch.float64, device=world.device)
    tokens = flops = slots = 0.0
    for mb, n, is_real in zip(micro_batches, counts, real, strict=True):
        if is_real:
            mask = mb.get("attention_mask")
            tokens += float(mask.sum()) if mask is not None else float(mb["input_ids"].numel())
            slots += float(mb["input_ids"].numel())
            if model_config is not None:
                rows, width = mb["input_ids"].shape
                flops += float(micro_batch_flops(model_config, rows, width))
        on_device = {k: v.to(world.device, non_blocking=True) for k, v in mb.items()}
        loss_sum, _ = micro_batch_loss(model, on_device)
        term = loss_sum / max(n, 1) if normalization == "paper" else loss_sum
        (term / denominator).backward()
        summed += term.detach().double()
    stats = torch.tensor([0.0, tokens, float(sum(counts)), flops, slots], dtype=torch.float64)
    stats[0] = summed.cpu()
    all_reduce_sum(stats, world)
    return StepLoss(
        loss=float(stats[0]) / denominator,
        tokens=int(stats[1]),
        trained_tokens=int(stats[2]),
        flops=float(stats[3]),
        slots=int(stats[4]),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[dict[str, Tensor], bool]], world: World
) -> tuple[float, int]:
    """Validation loss: summed token loss / trained tokens over the whole validation set (the
    token mean, whatever the batching), and the trained token count; all ranks call it."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=world.device)
    try:
        for mb, _ in batches:
            mb = {k: v.to(world.device, non_blocking=True) for k, v in mb.items()}
            loss_sum, count = micro_batch_loss(model, mb)
            total += torch.stack([loss_sum.double(), count.double()])
    finally:
        model.train(was_training)
    total = all_reduce_sum(total.cpu(), world)
    count = int(total[1])
    return (float(total[0]) / count if count else math.nan), count


# ------------------------------------------------------------------------------ setup
def _rank0_first(world: World, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks (cache downloads, tokenization): they find
    rank 0's result in the cache. An error on rank 0 is raised on every rank (no hang)."""
    if world.world_size == 1:
        return fn()
    if world.is_main:
        try:
            result = fn()
        except Exception as err:
            barrier(world)
            broadcast_object(f"{type(err).__name__}: {err}", world)
            raise
        barrier(world)
        broadcast_object(None, world)
        return result
    barrier(world)
    failure = broadcast_object(None, world)
    if failure is not None:
        raise TuluError(f"rank 0 failed: {failure}")
    return fn()


def load_tokenizer(config: TrainConfig) -> Tokenizer:
    """``model.tokenizer`` (a directory, tokenizer.json or hub id), else the checkpoint's own."""
    m = config.model
    if m.tokenizer:
        return Tokenizer.load(m.tokenizer)
    if m.path:
        from tulu.model.checkpoint import resolve_checkpoint

        return Tokenizer.from_dir(resolve_checkpoint(m.path, m.revision))
    raise ConfigError("model.tokenizer: a fresh model (no model.path) needs a tokenizer path")


def build_model_config(config: TrainConfig, tokenizer: Tokenizer | None) -> NeoXConfig:
    """The `NeoXConfig` of a fresh model: ``model.preset`` with ``model.config`` on top.

    Without a preset, and without ``vocab_size`` in ``model.config``, the vocabulary is the
    tokenizer's rounded up to a multiple of 64 (as Pythia pads its embeddings), and the
    BOS/EOS ids default to the tokenizer's.
    """
    m = config.model
    raw = dict(m.config or {})
    valid = [f.name for f in dataclasses.fields(NeoXConfig) if f.name != "extra"]
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise ConfigError(
            f"model.config.{unknown[0]}: unknown model setting (valid keys: {', '.join(valid)})"
        )
    if tokenizer is not None:
        if "vocab_size" not in raw and m.preset is None:
            raw["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
        for key, value in (
            ("bos_token_id", tokenizer.bos_token_id),
            ("eos_token_id", tokenizer.eos_token_id),
        ):
            if key not in raw and value is not None:
                raw[key] = value
    try:
        return preset(m.preset, **raw) if m.preset else NeoXConfig(**raw)
    except ConfigError as err:
        raise ConfigError(f"model.{'preset' if m.preset else 'config'}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"model.config: {err}") from None


def _load_model(
    config: TrainConfig, tokenizer: Tokenizer, world: World, *, resuming: bool
) -> tuple[GPTNeoXForCausalLM, Callable[[nn.Module], None] | None]:
    """The model to train, and the step that fills it in after `prepare_model` (or None).

    A checkpoint under FSDP: the model is built on the meta device (nothing allocated) in the
    master dtype, from the checkpoint's config.json (a hub id downloads on rank 0 first). The
    returned step, called with the prepared (sharded) model, makes every rank read the
    checkpoint and keep only its own shards (`load_checkpoint_shards`); it fails on every rank
    if it fails on one. Otherwise the model comes back whole: a checkpoint loaded in the
    compute dtype (one process), or a fresh model initialised from ``model.init_seed``.

    `resuming`: a training checkpoint will be loaded over every weight, so the checkpoint's
    weights are not read at all (only its config.json): the model gets uninitialised
    storage (`allocate_shards` under FSDP, `empty_model` otherwise).
    """
    m = config.model
    fill: Callable[[nn.Module], None] | None = None
    if m.path and uses_fsdp(config, world):
        from tulu.model.checkpoint import read_checkpoint_config, resolve_checkpoint

        directory = _rank0_first(world, lambda: resolve_checkpoint(m.path, m.revision))
        with torch.device("meta"):
            model = GPTNeoXForCausalLM(read_checkpoint_config(directory))
        # The master dtype (float32 unless adamw_bf16), as a whole load under FSDP used: PEFT
        # first creates adapters in the base's dtype, so they get the same initial values.
        model.to(master_dtype(config, world.device))
        slots = checkpoint_slots(model)

        def fill(prepared: nn.Module) -> None:
            if resuming:
                on_every_rank(lambda: allocate_shards(prepared, world), world)
            else:
                on_every_rank(
                    lambda: load_checkpoint_shards(prepared, directory, slots, world), world
                )

    elif m.path and resuming:
        from tulu.model.checkpoint import empty_model, read_checkpoint_config, resolve_checkpoint

        directory = _rank0_first(world, lambda: resolve_checkpoint(m.path, m.revision))
        model = empty_model(read_checkpoint_config(directory), compute_dtype(config, world.device))
    elif m.path:
        from tulu.model.checkpoint import load_model

        dtype = compute_dtype(config, world.device)
        model = _rank0_first(world, lambda: load_model(m.path, dtype=dtype, revision=m.revision))
    else:
        model = GPTNeoXForCausalLM(build_model_config(config, tokenizer))
        model.init_weights(m.init_seed)
        if not uses_fsdp(config, world):  # as a loaded checkpoint: in the compute dtype
            model.to(compute_dtype(config, world.device))
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model: the model's vocabulary ({model.config.vocab_size}) is smaller than the "
            f"tokenizer's ({tokenizer.vocab_size}); token ids would fall outside the embeddings"
        )
    return model, fill


def check_data_files(config: TrainConfig) -> None:
    """The training and validation files exist and can be opened: checked before the model
    is built, which takes minutes for 6.9B, rather than when they are tokenized after it."""
    for key in ("train", "validation"):
        path = getattr(config.data, key)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise ConfigError(f"data.{key}: {path}: cannot open ({err.strerror})") from None


def check_output_dir(output_dir: Path, rank: int) -> None:
    """``checkpoint.output_dir`` can be created and written to, checked before the model is
    built: otherwise a read-only or mistyped path surfaced only at the first metrics line or
    checkpoint, minutes (or hours) into the run. Each rank writes and removes its own probe
    file, since every rank writes its shards of a checkpoint."""
    probe = output_dir / f".tulu-write-probe-{rank}-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(
            f"checkpoint.output_dir: {output_dir}: cannot write there ({reason})"
        ) from None


def check_export_target(config: TrainConfig) -> None:
    """``model.path`` is not ``output_dir/final``, which the export at the end replaces:
    continuing from a run's export into the same output directory would delete the base
    model, and a LoRA run's adapter would name as its base the merged model written over it
    (loading the adapter would then apply it twice)."""
    m, c = config.model, config.checkpoint
    if not (c.export and m.path) or not Path(m.path).expanduser().is_dir():
        return
    target = Path(c.output_dir).expanduser() / FINAL_DIR
    if target.resolve() == Path(m.path).expanduser().resolve():
        raise ConfigError(
            f"model.path: {m.path} is {target}, which this run's export replaces at the end; "
            "copy the model elsewhere or choose another checkpoint.output_dir"
        )


def check_context(config: TrainConfig, model_config: NeoXConfig) -> None:
    """``data.max_seq_length`` within the model's context: rotary positions have no table to
    overflow, so longer examples would train silently at positions the model never saw, and
    the exported config.json would still claim the shorter context."""
    context = model_config.max_position_embeddings
    if config.data.max_seq_length > context:
        raise ConfigError(
            f"data.max_seq_length: {config.data.max_seq_length} is longer than the model's "
            f"context (max_position_embeddings {context}); lower it to {context} or less"
        )


def model_for_training(
    config: TrainConfig, tokenizer: Tokenizer, world: World, *, resuming: bool = False
) -> tuple[nn.Module, NeoXConfig]:
    """The model `train` trains, in training mode, and its `NeoXConfig`: the checkpoint
    (``model.path``) or a fresh model, wrapped with LoRA when enabled, prepared for this world
    (`prepare_model`: device, dtypes, activation checkpointing, FSDP2). Under FSDP a
    checkpoint is read into the shards after `prepare_model`, each rank keeping only its own
    (see `_load_model`). Seed first (`seed_everything`): LoRA draws its initial adapters
    from torch's global generator. Every rank calls it. `resuming` (a training checkpoint
    will be loaded next): the weights of ``model.path`` are not read, see `_load_model`.
    """
    model, fill = _load_model(config, tokenizer, world, resuming=resuming)
    model_config = model.config
    if config.lora.enabled:
        from tulu.train.lora import apply_lora

        model = apply_lora(
            model,
            config.lora,
            base_model_path=config.model.path,
            base_model_revision=config.model.revision,
        )
    model = prepare_model(model, world, config)
    if fill is not None:
        fill(model)
    # prepare_model sets the flag on the object it gets; a PeftModel keeps its own copy.
    _base_model(model).gradient_checkpointing = config.model.gradient_checkpointing
    model.train()
    return model, model_config


def _plain(value: Any) -> Any:
    """`value` with one-element tensors as Python numbers, for JSON: torchao's optimizers keep
    the learning rate as a tensor (so that a new rate does not recompile their step), and the
    scheduler's state then holds tensors. Loading the numbers back sets the same rates."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def _optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings from this run's config (weight decay, betas, eps, ...),
    but not its rates, which the schedule sets."""
    skip = ("params", "lr", "initial_lr")
    return [{k: v for k, v in g.items() if k not in skip} for g in optimizer.param_groups]


def _apply_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    settings: list[dict[str, Any]],
    base_lrs: list[float],
) -> None:
    """Put this run's optimizer settings and schedule back after a checkpoint was loaded.

    Loading restores the checkpoint's param-group settings and the scheduler's base rates, so
    ``optim.lr``, ``weight_decay``, ``betas`` or ``eps`` changed for the resumed run were
    ignored, and its first step ran at the old schedule's rate (0 after a finished linear
    decay when ``max_steps`` grew). Unchanged settings give back exactly the restored values.
    """
    for group, saved in zip(optimizer.param_groups, settings, strict=True):
        group.update(saved)
    scheduler.base_lrs = list(base_lrs)
    rates = [
        base * fn(scheduler.last_epoch)
        for fn, base in zip(scheduler.lr_lambdas, base_lrs, strict=True)
    ]
    for group, base, rate in zip(optimizer.param_groups, base_lrs, rates, strict=True):
        group["initial_lr"] = base
        if isinstance(group["lr"], Tensor):  # torchao keeps it a tensor (see `_plain`)
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports for the next step


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 2e-05, ...} from nested mappings."""
    if not isinstance(data, dict) or not data:
        return {prefix.rstrip("."): data}
    return {k: v for key, val in data.items() for k, v in _flat(val, f"{prefix}{key}.").items()}


def _report_changed_settings(path: Path, config: TrainConfig) -> None:
    """Tell the user which settings differ from the checkpoint's (its config.yaml): they take
    effect from the first resumed step. A checkpoint without a readable config says nothing."""
    try:
        saved = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(saved, dict):
        return
    before, now = _flat(saved), _flat(config.to_dict())
    changed = [
        f"{key}: {before.get(key)} -> {now.get(key)}"
        for key in [*now, *(k for k in before if k not in now)]
        if key != "checkpoint.resume" and before.get(key) != now.get(key)
    ]
    if changed:
        print(
            f"resuming from {path} with settings changed since the checkpoint: "
            + "; ".join(changed),
            file=sys.stderr,
            flush=True,
        )


def _base_model(model: nn.Module) -> GPTNeoXForCausalLM:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model  # type: ignore[return-value]


def tokenize_data_file(path: str | Path, tokenizer: Tokenizer, d: Any, progress: bool) -> Any:
    """A training or validation file tokenized with the run's data settings `d` (through the
    cache: the dry run's check and the run share it)."""
    from tulu.data.tokenize import tokenize_records

    return tokenize_records(
        path,
        tokenizer,
        d.max_seq_length,
        cache_dir=d.cache_dir,
        num_workers=d.num_workers,
        skip_bad=d.skip_bad,
        progress=progress,
    )


def _tokenize(path: str, tokenizer: Tokenizer, config: TrainConfig, world: World) -> Any:
    # The tokenize bar, like the training bar, only on a terminal (a job log gets none).
    progress = config.logging.progress and world.is_main and sys.stderr.isatty()
    return _rank0_first(world, lambda: tokenize_data_file(path, tokenizer, config.data, progress))


def pad_token_id(tokenizer: Tokenizer) -> int:
    """The id padding slots get (never trained on, never attended to): pad, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


# ------------------------------------------------------------------------------ the run
def train(config: TrainConfig) -> TrainResult:
    """Train per `config` (see the module doc); every process of a torchrun launch calls it."""
    world = init_distributed(config.distributed)
    try:
        return _Run(config, world).run()
    finally:
        shutdown(world)


class _Run:
    def __init__(self, config: TrainConfig, world: World) -> None:
        self.config = config
        self.world = world
        self.output_dir = Path(config.checkpoint.output_dir)

    # ------------------------------------------------------------------------ setup
    def setup(self) -> None:
        config, world = self.config, self.world
        accumulation_steps(config, world)  # the batch must divide over the processes
        seed_everything(config.seed)
        check_data_files(config)  # on every rank: each fails alike, none waits for rank 0
        check_output_dir(self.output_dir, world.rank)  # every rank writes checkpoint shards
        check_export_target(config)
        if world.is_main:
            remove_stale_temps(self.output_dir)
        resume = resolve_resume(config.checkpoint) if world.is_main else None
        self.resume_path: Path | None = broadcast_object(resume, world)
        self.tokenizer = _rank0_first(world, lambda: load_tokenizer(config))
        self.model, self.model_config = model_for_training(
            config, self.tokenizer, world, resuming=self.resume_path is not None
        )
        check_context(config, self.model_config)
        self.pad_id = pad_token_id(self.tokenizer)
        train_set = _tokenize(config.data.train, self.tokenizer, config, world)
        self.plan = DataPlan(train_set, config, world, pad_token_id=self.pad_id)
        self.plan_fingerprint = self.plan.fingerprint()
        # The plan holds example numbers, not contents: an edited file would keep it.
        self.train_sha256 = train_set.meta.get("source_sha256")
        self.validation = None
        self.validation_sha256 = None
        if config.data.validation:
            val_set = _tokenize(config.data.validation, self.tokenizer, config, world)
            self.validation_sha256 = val_set.meta.get("source_sha256")
            if len(val_set):
                self.validation = validation_micro_batches(
                    val_set, config.optim.micro_batch_size, world, pad_token_id=self.pad_id
                )
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.plan.total_steps)

    def resume(self) -> None:
        config, world = self.config, self.world
        path = self.resume_path
        self.resumed_from = path
        self.last_checkpoint = path
        self.step = 0
        self.elapsed_before = 0.0
        history: list[dict[str, Any]] = []
        if path is not None:
            settings = _optimizer_settings(self.optimizer)  # before the checkpoint's replace them
            restored = load_checkpoint(
                Path(path),
                model=self.model,
                optimizer=self.optimizer,
                world=world,
                seed=config.seed,
            )
            state = restored.trainer_state
            saved_sha256 = state.get("train_sha256")  # None: a checkpoint older than it
            if saved_sha256 and self.train_sha256 and saved_sha256 != self.train_sha256:
                raise CheckpointError(
                    f"{path}: data.train {config.data.train} changed since this checkpoint was "
                    "written (its contents differ from the file the run trained on), so "
                    f"resuming at step {restored.step} would continue on other examples than "
                    "the run planned; restore the file the run started with, or set "
                    "checkpoint.resume: never to train on the new one from the start"
                )
            if state.get("steps_per_epoch") != self.plan.steps_per_epoch:
                raise CheckpointError(
                    f"{path}: the checkpoint's run had {state.get('steps_per_epoch')} steps per "
                    f"epoch, this configuration gives {self.plan.steps_per_epoch} (the data, "
                    "batching or batch sizes changed); resume with the same settings or set "
                    "checkpoint.resume: never"
                )
            if state.get("plan", self.plan_fingerprint) != self.plan_fingerprint:
                raise CheckpointError(
                    f"{path}: the checkpoint's run had a different data plan: its steps held "
                    "other examples (seed, data.padding_order, data.batching, "
                    "optim.global_batch_size or the data changed), so resuming at step "
                    f"{restored.step} would train some examples twice and skip others; resume "
                    "with the checkpoint's settings or set checkpoint.resume: never"
                )
            if restored.step > self.plan.total_steps:
                # Resuming would run no step and export a model trained past this run's end.
                raise CheckpointError(
                    f"{path}: the checkpoint is at step {restored.step}, past this run's "
                    f"{self.plan.total_steps} steps (optim.max_steps or the epochs were "
                    "lowered); raise them, export that checkpoint with `tulu export`, or set "
                    "checkpoint.resume: never to train from the start"
                )
            base_lrs = list(self.scheduler.base_lrs)
            restore_scheduler(self.scheduler, restored)
            _apply_settings(self.optimizer, self.scheduler, settings, base_lrs)
            if world.is_main:
                _report_changed_settings(Path(path), config)
                saved_validation = state.get("validation_sha256")
                if saved_validation and self.validation_sha256 not in (None, saved_validation):
                    # Training is unaffected (unlike an edited data.train), but the curve is.
                    print(
                        f"resuming from {path}: data.validation {config.data.validation} "
                        "changed since the checkpoint was written, so the validation losses "
                        f"from step {restored.step} on are not comparable with those before",
                        file=sys.stderr,
                        flush=True,
                    )
            self.step = restored.step
            self.elapsed_before = float(state.get("elapsed", 0.0))
            history = restored.metrics
        self.position = self.plan.position_after(self.step)
        self.metrics = MetricsLogger(
            self.output_dir,
            config.logging,
            enabled=world.is_main,
            total_steps=self.plan.total_steps,
            start_step=self.step,
            history=history,
        )

    # ------------------------------------------------------------------------ pieces
    def _trainer_state(self, loss: float | None) -> dict[str, Any]:
        return {
            **self.plan.position_after(self.step).as_dict(),
            "scheduler": _plain(self.scheduler.state_dict()),
            "elapsed": self._elapsed(),
            "steps_per_epoch": self.plan.steps_per_epoch,
            "plan": self.plan_fingerprint,  # refused on resume if it differs
            "train_sha256": self.train_sha256,  # and so is an edited data.train
            "validation_sha256": self.validation_sha256,  # an edited one is reported
            "total_steps": self.plan.total_steps,
            "world_size": self.world.world_size,
            "loss": loss,
            # what the final export is written in; `tulu export step-N` defaults to it too
            "compute_dtype": dtype_name(compute_dtype(self.config, self.world.device)),
        }

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.started)

    def _validate(self) -> float | None:
        if self.validation is None:
            return None
        loss, tokens = evaluate(self.model, self.validation, self.world)
        self.metrics.log_validation(
            {
                "step": self.step,
                "epoch": self.plan.epoch_progress(self.step),
                "val_loss": loss,
                "val_tokens": tokens,
                "elapsed": self._elapsed(),
            }
        )
        return loss

    def _checkpoint(self, loss: float | None) -> Path:
        self.last_checkpoint = save_checkpoint(
            self.config,
            step=self.step,
            model=self.model,
            optimizer=self.optimizer,
            trainer_state=self._trainer_state(loss),
            metrics=self.metrics.entries,
            world=self.world,
            model_config=self.model_config,
            tokenizer=self.tokenizer,
        )
        return self.last_checkpoint

    def _run_step(self, planned: Any, throughput: Throughput) -> float:
        config, world = self.config, self.world
        started = time.perf_counter()
        lr = float(self.scheduler.get_last_lr()[0])  # a tensor with torchao's optimizers
        stats = backward_step(
            self.model,
            planned.micro_batches,
            world,
            normalization=config.optim.loss_normalization,
            num_micro_batches=planned.num_micro_batches,
            model_config=self.model_config,
            real=planned.real,
        )
        grad_norm = float(clip_grad_norm(self.model, config.optim.max_grad_norm, world))
        for name, value in (("loss", stats.loss), ("gradient norm", grad_norm)):
            if not math.isfinite(value):
                raise TuluError(
                    f"step {planned.number}: the {name} is {value} (training diverged); "
                    "stopped before applying the step, nothing of it was saved"
                    + self._last_good_hint()
                )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = planned.number
        seconds = time.perf_counter() - started
        throughput.add(stats.tokens, stats.flops, seconds)
        every = config.logging.every_steps
        if self.step % every == 0 or self.step == self.plan.total_steps:
            tokens_per_s, mfu = throughput.rates()
            self.metrics.log_step(
                {
                    "step": self.step,
                    "epoch": self.plan.epoch_progress(self.step),
                    "loss": stats.loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": stats.tokens,
                    "trained_tokens": stats.trained_tokens,
                    "padded_fraction": stats.padded_fraction,
                    "tokens_per_s": tokens_per_s,
                    "mfu": mfu,
                    "elapsed": self._elapsed(),
                }
            )
        self.metrics.advance(self.step)
        return stats.loss

    def _last_good_hint(self) -> str:
        if self.last_checkpoint is None:
            return ""
        return f"; the last checkpoint is {self.last_checkpoint}"

    # ------------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        config, world = self.config, self.world
        self.setup()
        self.resume()
        self.started = time.perf_counter()
        total = self.plan.total_steps
        every = config.checkpoint.every_steps
        throughput = Throughput(peak_flops(config.logging, world.device), world.world_size)
        losses: dict[int, float] = {}
        validation_loss: float | None = None
        result_paths: dict[str, Path] = {}
        try:
            loss: float | None = None
            for planned in self.plan.steps(self.position):
                loss = self._run_step(planned, throughput)
                losses[self.step] = loss
                if (every is not None and self.step % every == 0) or self.step == total:
                    validation_loss = self._validate()
                    self._checkpoint(loss)
            if config.checkpoint.export:
                dtype = compute_dtype(config, world.device)
                result_paths = export_final(
                    self.model,
                    config,
                    model_config=self.model_config,
                    tokenizer=self.tokenizer,
                    dtype=dtype,
                    world=world,
                )
            plot = self.metrics.plot()
        finally:
            self.metrics.close()
        return TrainResult(
            final_step=self.step,
            total_steps=total,
            losses=losses,
            output_dir=self.output_dir,
            checkpoint=self.last_checkpoint,
            resumed_from=self.resumed_from,
            validation_loss=validation_loss,
            export_dir=result_paths.get("model"),
            adapter_dir=result_paths.get("adapter"),
            metrics_file=self.metrics.path if world.is_main else None,
            plot=plot,
            data=self.plan.summary(),
        )
