"""``tulu export`` and ``tulu train``: argument parsing only.

Building the parser must stay cheap (``tulu --help`` should not import torch), so the commands
import the training modules when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["add_export_parser", "add_train_parser", "cmd_export", "cmd_train", "main"]


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help=(
            "write a Hugging Face checkpoint (with tokenizer) from a model, a LoRA adapter or "
            "a training step checkpoint"
        ),
        description=(
            "Write a full Hugging Face checkpoint directory from a model directory, a LoRA "
            "adapter directory (merged into its base with --merge-lora) or a step checkpoint "
            "of a tulu train run (output_dir/step-N)."
        ),
    )
    export.add_argument(
        "source",
        metavar="SOURCE",
        help="model directory, hub id, LoRA adapter directory, or step checkpoint of a run",
    )
    export.add_argument(
        "--output",
        required=True,
        type=Path,
        help="directory to write: a new or empty one, or an earlier export (replaced)",
    )
    export.add_argument(
        "--merge-lora",
        action="store_true",
        help="merge a LoRA adapter into its base (required for an adapter directory)",
    )
    export.add_argument(
        "--dtype",
        help=(
            "float32, bfloat16 or float16 (default: the source's stored dtype; a step "
            "checkpoint: its run's compute dtype)"
        ),
    )
    export.add_argument(
        "--tokenizer",
        help="checkpoint directory, tokenizer.json or hub id org/name (default: the source's)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from tulu.model.config import NeoXConfig, dtype_name, parse_dtype
    from tulu.train.export import export_checkpoint

    out = export_checkpoint(
        args.source,
        args.output,
        merge_lora=args.merge_lora,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
    )
    config = NeoXConfig.from_json(out / "config.json")
    print(
        f"wrote {out} ({config.num_parameters():,} parameters, "
        f"{dtype_name(parse_dtype(config.torch_dtype))})",
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------------------ tulu train
def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="CONFIG", help="training config (YAML)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="settings that replace the file's, e.g. optim.lr=1e-5 data.batching=packing",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the config, the data plan and a memory estimate, then exit without training",
    )


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="fine-tune a GPT-NeoX model on records (CPU, one GPU, or torchrun for many)",
        description=(
            "Fine-tune per CONFIG (see configs/). Paths in the config resolve against the "
            "current directory. For several GPUs: torchrun --nproc-per-node N -m tulu.train "
            "CONFIG [KEY=VALUE ...]."
        ),
    )
    _add_train_arguments(train)


def cmd_train(args: argparse.Namespace) -> int:
    from tulu.train.config import load_train_config

    config = load_train_config(args.config, args.overrides)
    if args.dry_run:
        report = dry_run(config, args.config)
        print(report.text)
        if report.problems:
            print(
                f"tulu train: dry run found {len(report.problems)} problem(s) that would stop "
                f"the run: {'; '.join(report.problems)}",
                file=sys.stderr,
            )
            return 1
        return 0
    from tulu.train.trainer import train

    result = train(config)
    if result.metrics_file is not None:  # rank 0
        last = result.losses.get(result.final_step)
        loss = f", loss {last:.4f}" if last is not None else ""
        resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
        print(
            f"trained to step {result.final_step}/{result.total_steps}{loss}{resumed}; "
            f"output in {result.output_dir}"
            + (f"; model in {result.export_dir}" if result.export_dir else ""),
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tulu.train CONFIG [KEY=VALUE ...] [--dry-run]`` (the torchrun entry)."""
    from tulu.dependency_noise import quiet_dependency_noise
    from tulu.errors import TuluError

    quiet_dependency_noise()
    parser = argparse.ArgumentParser(prog="python -m tulu.train", description="tulu train")
    _add_train_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE may follow --dry-run
    try:
        return cmd_train(args)
    except TuluError as err:
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "", "0") else ""
        print(f"tulu train{where}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------ --dry-run
def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _hub_file(repo: str, filename: str, revision: str | None) -> Path | None:
    """A file of a hub repository if it is in the local HF cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency
        return None
    try:
        found = try_to_load_from_cache(repo, filename, revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is simply "not cached"
        return None
    return Path(found) if isinstance(found, str) else None


def _local_tokenizer(config: Any) -> Any:
    """The run's tokenizer if it is on disk (no download), else None."""
    from tulu.hub import looks_like_hub_id
    from tulu.tokenizer import Tokenizer

    m = config.model
    if m.tokenizer:
        if Path(m.tokenizer).expanduser().exists() or not looks_like_hub_id(m.tokenizer):
            return Tokenizer.load(m.tokenizer)  # a missing local path fails as in the run
        cached = _hub_file(m.tokenizer, "tokenizer.json", None)  # a hub id already in the cache
        return Tokenizer.from_dir(cached.parent) if cached is not None else None
    if m.path:
        local = Path(m.path).expanduser()
        if local.is_dir():
            return Tokenizer.from_dir(local)
        cached = _hub_file(m.path, "tokenizer.json", m.revision)
        if cached is not None:
            return Tokenizer.from_dir(cached.parent)
    return None


def _model_config(config: Any, tokenizer: Any) -> tuple[Any, str]:
    """(NeoXConfig or None, where it came from), without downloading weights."""
    from tulu.errors import TuluError
    from tulu.hub import looks_like_hub_id
    from tulu.model.checkpoint import (
        read_checkpoint_config,
        refuse_local_revision,
        resolve_checkpoint,
    )
    from tulu.model.config import NeoXConfig, preset
    from tulu.train.trainer import build_model_config

    m = config.model
    if not m.path:
        return build_model_config(config, tokenizer), "fresh model"
    local = Path(m.path).expanduser()
    if local.is_dir():  # the real run refuses a revision here (`resolve_checkpoint`)
        refuse_local_revision(local, m.revision)
    if (local / "config.json").is_file():
        return NeoXConfig.from_json(local / "config.json"), str(local / "config.json")
    if local.exists() or not looks_like_hub_id(m.path):
        # A path the real run refuses (missing, a file, a directory without config.json):
        # fail with its message. Not a hub id, so nothing is downloaded.
        return read_checkpoint_config(resolve_checkpoint(m.path, m.revision)), str(local)
    cached = _hub_file(m.path, "config.json", m.revision)
    if cached is not None:
        return NeoXConfig.from_json(cached), f"{m.path} (HF cache)"
    try:
        return preset(m.path), f"preset {m.path} (not downloaded)"
    except TuluError:
        return None, f"{m.path} is neither local nor cached nor a Pythia preset"


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


@dataclass
class DryRunReport:
    """What ``tulu train --dry-run`` found: the printed report, and the problems in it that
    would stop a real run (any of them makes the dry run exit 1, so that
    ``tulu train C --dry-run && torchrun ... C`` never launches a run bound to fail)."""

    text: str
    problems: list[str]


def _output_dir_problem(output_dir: Path) -> str | None:
    """Why ``checkpoint.output_dir`` could not be created or written to, without creating it
    (the dry run writes nothing): its nearest existing ancestor must be a writable directory."""
    existing = output_dir.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"checkpoint.output_dir: {output_dir}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"checkpoint.output_dir: {output_dir}: {existing} is not writable"
    return None


def dry_run(config: Any, source: Path | str = "config") -> DryRunReport:
    """What ``tulu train --dry-run`` prints: the settings, the data plan and memory needs."""
    from tulu.errors import TuluError
    from tulu.train.checkpointing import resolve_resume
    from tulu.train.memory import estimate_table

    m, d, o, c = config.model, config.data, config.optim, config.checkpoint
    world_size = _world_size()
    lines = [f"config: {source}"]
    problems: list[str] = []

    def problem(line: str, message: str) -> None:
        lines.append(line)
        problems.append(message)

    tokenizer = None
    try:
        tokenizer = _local_tokenizer(config)
    except TuluError as err:
        problem(f"tokenizer: {err}", str(err))
    model_config, origin, model_error = None, "", None
    try:
        model_config, origin = _model_config(config, tokenizer)
    except TuluError as err:  # an invalid model.config or config.json stops the run too
        model_error = str(err)
    what = m.path or f"fresh ({m.preset or 'custom'}{', ' + str(m.config) if m.config else ''})"
    if model_error is None:
        lines.append(f"model: {what}; config from {origin}")
    else:
        problem(f"model: {what}; error: {model_error}", model_error)
    if model_config is not None:
        lines.append(
            f"  {model_config.num_parameters():,} parameters "
            f"({model_config.num_parameters(False):,} without embeddings), "
            f"{model_config.num_hidden_layers} layers, hidden {model_config.hidden_size}, "
            f"vocab {model_config.vocab_size}"
        )
        from tulu.train.trainer import check_context

        try:
            check_context(config, model_config)
        except TuluError as err:
            problem(f"  error: {err}", str(err))
    lines.append(
        f"  dtype {m.dtype or 'default (bfloat16 on GPU, float32 on CPU)'}, gradient "
        f"checkpointing {'on' if m.gradient_checkpointing else 'off'}, LoRA "
        + (f"r={config.lora.r} alpha={config.lora.alpha}" if config.lora.enabled else "off")
    )
    lines.append(
        f"data: train {d.train}, validation {d.validation or '-'}; max_seq_length "
        f"{d.max_seq_length}, {d.batching}"
        + (f" ({d.padding_order})" if d.batching == "padding" else "")
    )
    lines.append(
        f"optim: {o.optimizer}, lr {o.lr:g}, {o.scheduler} after {o.warmup_ratio:g} warmup, "
        f"weight decay {o.weight_decay:g}, clip {o.max_grad_norm or 'none'}, {o.epochs} "
        f"epoch(s){f', max {o.max_steps} steps' if o.max_steps else ''}, loss "
        f"{o.loss_normalization}"
    )
    per_pass = o.micro_batch_size * world_size
    accumulation = f"{o.global_batch_size // per_pass}"
    if o.global_batch_size % per_pass:
        accumulation = "(does not divide!)"
        problems.append(
            f"optim.global_batch_size: {o.global_batch_size} is not a multiple of "
            f"micro_batch_size x processes = {per_pass}"
        )
    lines.append(
        f"  global batch {o.global_batch_size} rows = micro batch {o.micro_batch_size} x "
        f"accumulation {accumulation} x {world_size} process(es)"
    )
    lines.append(
        f"checkpoint: {c.output_dir}, every {c.every_steps or 'end only'} steps, keep "
        f"{c.keep_last}, resume {c.resume}, export {'on' if c.export else 'off'}"
    )
    unwritable = _output_dir_problem(Path(c.output_dir))
    if unwritable:
        problem(f"  error: {unwritable}", unwritable)
    from tulu.train.trainer import check_export_target

    try:
        check_export_target(config)
    except TuluError as err:
        problem(f"  error: {err}", str(err))
    try:
        resolve_resume(c)
    except TuluError as err:
        problem(f"  error: {err}", str(err))
    for key in ("train", "validation"):
        data_file = getattr(d, key)
        if data_file and not Path(data_file).is_file():
            message = f"data.{key}: {data_file} is not a file"
            problem(f"data: error: {message}", message)
    plan, plan_problem = _data_plan(config, tokenizer, world_size)
    lines.append(plan)
    if plan_problem:
        problems.append(plan_problem)
    if tokenizer is not None and d.validation and Path(d.validation).is_file():
        # The run tokenizes it before its first step, where a bad file stops it: check it
        # here as the training file is (cached, so the run does not do it again).
        from tulu.train.trainer import tokenize_data_file

        try:
            tokenize_data_file(Path(d.validation), tokenizer, d, progress=False)
        except TuluError as err:
            problem(f"data: error: data.validation: {err}", f"data.validation: {err}")
    if model_config is not None:
        sizes = sorted({1, 8, world_size})
        try:
            lines.append(estimate_table(model_config, config, sizes))
        except TuluError as err:
            problem(f"memory estimate: {err}", str(err))
    else:
        lines.append("memory estimate: needs the model's config (see above)")
    return DryRunReport("\n".join(lines), problems)


def _data_plan(config: Any, tokenizer: Any, world_size: int) -> tuple[str, str | None]:
    """The data-plan line, and the problem it found (None if the plan is sound or unknown)."""
    from tulu.errors import TuluError
    from tulu.train.distributed import World
    from tulu.train.optim import warmup_steps

    d, o = config.data, config.optim
    path = Path(d.train)
    if not path.is_file():
        return "data plan: needs the training file (see above)", None
    if tokenizer is None:
        records = _count_lines(path) if path.suffix == ".jsonl" else None
        if records is None or d.batching != "padding":
            return "data plan: needs the tokenizer on disk", None
        micro = -(-records // o.micro_batch_size)
        steps = o.epochs * -(-micro // (o.global_batch_size // o.micro_batch_size))
        if o.max_steps:
            steps = min(steps, o.max_steps)
        plan = f"data plan: {records:,} records, about {steps:,} steps (tokenizer not on disk)"
        return plan, None
    try:
        from tulu.train.data_loader import DataPlan
        from tulu.train.trainer import pad_token_id, tokenize_data_file

        dataset = tokenize_data_file(path, tokenizer, d, progress=False)
        plan = DataPlan(
            dataset, config, World(world_size=world_size), pad_token_id=pad_token_id(tokenizer)
        )
    except TuluError as err:
        return f"data plan: error: {err}", str(err)
    s = plan.summary()
    summary = (
        f"data plan: {s['examples']:,} examples ({dataset.num_tokens:,} tokens, "
        f"{dataset.num_trained_tokens:,} trained), {s['rows_per_epoch']:,} rows and "
        f"{s['micro_batches_per_epoch']:,} micro-batches per epoch, {s['steps_per_epoch']:,} "
        f"steps per epoch, {s['total_steps']:,} steps in total "
        f"({warmup_steps(o, plan.total_steps)} warmup); padded fraction "
        f"{plan.padded_fraction():.1%} (first epoch)"
    )
    return summary, None
