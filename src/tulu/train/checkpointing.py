"""Training checkpoints: written atomically, pruned, found again, restored exactly; the export.

A checkpoint is a directory ``output_dir/step-000010/``::

    state/            model + optimizer, torch.distributed.checkpoint (every rank writes its
                      shards; loads into any number of processes)
    rng/rank-00000.pt RNG states of each rank: python, numpy, torch CPU and CUDA
    config.yaml       the run's configuration
    model_config.json the model's config.json, and tokenizer/ its tokenizer: with them a
                      checkpoint exports on its own (`tulu export step-000010`), even after
                      the base model moved
    metrics.jsonl     the metrics up to this step (the run's file is reset to it on resume)
    trainer.json      global step, data position (epoch, step in epoch), scheduler state,
                      elapsed time, plan size, compute dtype; written last

**Atomic**: everything is written into ``output_dir/.tmp-step-000010/`` and renamed into
place when complete, so a ``step-*`` directory is always whole; a run killed while saving
leaves only a ``.tmp-*`` directory, which resume ignores and the next run removes. A
leftover of the same name that is not complete is swapped out the same way (old renamed
aside, new renamed in, old deleted). Pruning to ``checkpoint.keep_last`` deletes trainer.json
first, so a half-deleted directory never looks complete either. A run saves each step once,
after training it, so a complete checkpoint of the same step or a later one is left over from
an abandoned run in the same directory (a ``resume: never`` rerun, or a resume from an earlier
checkpoint): it is moved into ``abandoned/`` (see `_prune`).

**Resume** (``checkpoint.resume``): ``auto`` takes the latest complete checkpoint in
`output_dir` (none: start fresh), ``never`` starts fresh, anything else is the path of a
checkpoint directory. Restoring loads model and optimizer states, the scheduler, this rank's
RNG states and the data position, so the resumed run continues bit for bit as if it had
never stopped (on the same hardware and thread count). A rank without RNG file (a resume on
more processes than the checkpoint had) is seeded from (seed, rank, step) instead.

**Export** (`export_final`): ``output_dir/final/`` is an HF checkpoint directory (full weights
gathered on rank 0, tokenizer included) that `load_model`, `tulu chat` and transformers open;
a LoRA run also writes its PEFT adapter to ``output_dir/final-adapter/`` and ``final/`` holds
the base with the adapter merged in.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from tulu.errors import CheckpointError
from tulu.model.config import NeoXConfig
from tulu.train.config import CheckpointConfig, TrainConfig
from tulu.train.distributed import (
    World,
    barrier,
    full_model_state_dict,
    get_train_state,
    load_sharded,
    save_sharded,
    set_train_state,
)
from tulu.train.metrics import METRICS_FILE, read_metrics, write_metrics

__all__ = [
    "FINAL_ADAPTER_DIR",
    "FINAL_DIR",
    "Restored",
    "checkpoint_name",
    "export_final",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_stale_temps",
    "resolve_resume",
    "restore_scheduler",
    "save_checkpoint",
]

FINAL_DIR = "final"
FINAL_ADAPTER_DIR = "final-adapter"
TRAINER_FILE = "trainer.json"
STATE_DIR = "state"
RNG_DIR = "rng"
CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
TMP_PREFIX = ".tmp-"
ABANDONED_DIR = "abandoned"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def is_complete(path: Path) -> bool:
    """A checkpoint directory with its trainer state and its sharded state's metadata."""
    return (path / TRAINER_FILE).is_file() and (path / STATE_DIR / ".metadata").is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(config: CheckpointConfig) -> Path | None:
    """The checkpoint to resume from per ``checkpoint.resume`` (see the module doc)."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        return latest_checkpoint(config.output_dir)
    path = Path(config.resume).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {path}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint.resume: {path}: not a complete checkpoint (needs {TRAINER_FILE} and "
            f"{STATE_DIR}/.metadata)"
        )
    return path


def remove_stale_temps(output_dir: str | os.PathLike) -> None:
    """Delete ``.tmp-*`` leftovers of a run that was killed while saving (rank 0, at start)."""
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states, in types `torch.load(weights_only=True)` reads back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    """python, numpy and torch (CPU and every GPU) RNGs from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ save
def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(
    config: TrainConfig,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    metrics: list[dict[str, Any]],
    world: World,
    model_config: NeoXConfig | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write the checkpoint of `step` atomically and prune old ones (all ranks call this).

    `trainer_state` holds the plain values (data position, scheduler state, ...) written to
    trainer.json; `metrics` (rank 0's entries so far) becomes the checkpoint's metrics.jsonl.
    `model_config` and `tokenizer` (a `tulu.tokenizer.Tokenizer`), when given, are written
    beside them so that the checkpoint can be exported without the run's other files.
    """
    root = Path(config.checkpoint.output_dir)
    name = checkpoint_name(step)
    final, tmp = root / name, root / f"{TMP_PREFIX}{name}"
    try:
        if world.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)
        barrier(world)
        save_sharded(get_train_state(model, optimizer), tmp / STATE_DIR)
        torch.save(rng_state(), tmp / RNG_DIR / f"rank-{world.rank:05d}.pt")
        barrier(world)
        if world.is_main:
            (tmp / CONFIG_FILE).write_text(
                yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8"
            )
            write_metrics(tmp / METRICS_FILE, metrics)
            if model_config is not None:
                _write_json(tmp / MODEL_CONFIG_FILE, model_config.to_dict())
            if tokenizer is not None:
                tokenizer.save(tmp / TOKENIZER_DIR)
            _write_json(tmp / TRAINER_FILE, {**trainer_state, "step": step})
            if is_complete(final):  # an abandoned run's: kept, as its later ones (`_prune`)
                _set_aside(root, final)
            _swap_in(tmp, final)
            _prune(root, config.checkpoint.keep_last, step)
    except OSError as err:
        raise CheckpointError(
            f"{final}: cannot write the checkpoint of step {step} ({err})"
        ) from err
    barrier(world)
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first, then deleted."""
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the `keep_last` latest checkpoints up to `step`, the one just written.

    Checkpoints after `step` are from an abandoned run (a ``resume: never`` rerun, or a
    resume from an earlier checkpoint, into the same directory). Left in place they would
    push the new ones out of the last `keep_last` (which deleted the checkpoint just
    written) and be what ``resume: auto`` picks next time. They are someone's training
    time, so they are moved into ``abandoned/``, not deleted.
    """
    found = list_checkpoints(root)
    for s, path in found:
        if s > step:
            _set_aside(root, path)
    for path in [path for s, path in found if s <= step][:-keep_last]:
        # Renamed first (atomic), then deleted: a run killed while deleting tens of GB leaves
        # a .tmp-* directory, which the next start removes, not a half-deleted step-*.
        doomed = path.with_name(f"{TMP_PREFIX}pruned-{path.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _set_aside(root: Path, path: Path) -> None:
    """Move an abandoned run's checkpoint to ``root/abandoned/`` (a new name if taken)."""
    aside = root / ABANDONED_DIR
    aside.mkdir(exist_ok=True)
    target = aside / path.name
    for n in itertools.count(2):
        if not target.exists():
            break
        target = aside / f"{path.name}-{n}"
    path.rename(target)
    print(
        f"{path.name} is from an abandoned run (this run has not saved it); "
        f"moved to {target} (resume ignores it; delete it when no longer needed)",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------ load
@dataclass
class Restored:
    """What a checkpoint gives back besides model and optimizer states."""

    path: Path
    step: int
    trainer_state: dict[str, Any]
    metrics: list[dict[str, Any]]


def read_trainer_state(path: Path) -> dict[str, Any]:
    file = path / TRAINER_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable trainer state ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file}: no global step in the trainer state")
    if not isinstance(state.get("scheduler"), dict):
        raise CheckpointError(f"{file}: no scheduler state in the trainer state")
    return state


def restore_scheduler(scheduler: Any, restored: Restored) -> None:
    """Load the checkpoint's scheduler state; one that torch cannot take (an edited or
    foreign trainer.json) is a `CheckpointError` naming the file."""
    try:
        scheduler.load_state_dict(dict(restored.trainer_state["scheduler"]))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{restored.path / TRAINER_FILE}: unusable scheduler state ({err!r})"
        ) from None


def check_model_tensors(state_dir: Path, model_state: dict[str, Any]) -> None:
    """The checkpoint's model tensors against the model's, by name and shape.

    DCP loads only the tensors it is asked for, so without this a checkpoint of a deeper
    model (or one with LoRA) would load into a smaller model and silently leave the rest
    behind. A checkpoint whose metadata cannot be read is left to `load_sharded` to report.
    """
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(state_dir)).read_metadata()
    except Exception:  # noqa: BLE001 - load_sharded reports an unreadable checkpoint
        return
    prefix = "model."
    saved = {
        key[len(prefix) :]: getattr(meta, "size", None)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    hint = f"; the checkpoint was written with the settings in {state_dir.parent / CONFIG_FILE}"
    extra = sorted(set(saved) - set(model_state))
    if extra:
        raise CheckpointError(
            f"{state_dir.parent}: the checkpoint has tensor {extra[0]}, which this model does "
            f"not have ({len(extra)} such tensor(s)){hint}"
        )
    missing = sorted(set(model_state) - set(saved))
    if missing:
        raise CheckpointError(
            f"{state_dir.parent}: tensor {missing[0]} of this model is not in the checkpoint "
            f"({len(missing)} such tensor(s)){hint}"
        )
    for name, tensor in model_state.items():
        shape, size = tuple(getattr(tensor, "shape", ())), saved[name]
        if size is not None and tuple(size) != shape:
            raise CheckpointError(
                f"{state_dir.parent}: tensor {name} has shape {list(size)} in the checkpoint "
                f"and {list(shape)} in this model{hint}"
            )


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World,
    seed: int,
) -> Restored:
    """Restore model, optimizer and this rank's RNG states from `path` (all ranks call this);
    the caller applies the returned trainer state (scheduler, data position)."""
    trainer_state = read_trainer_state(path)
    step = trainer_state["step"]
    state = get_train_state(model, optimizer)
    check_model_tensors(path / STATE_DIR, state["model"])
    load_sharded(state, path / STATE_DIR)
    set_train_state(model, optimizer, state)
    rng_file = path / RNG_DIR / f"rank-{world.rank:05d}.pt"
    if rng_file.is_file():
        try:
            set_rng_state(torch.load(rng_file, weights_only=True))
        except (
            RuntimeError,
            OSError,
            KeyError,
            ValueError,
            TypeError,
            EOFError,
            pickle.UnpicklingError,
        ) as err:
            # torch's unpickling messages run to a paragraph: its first sentence is enough.
            detail = str(err).split("\n")[0].split(". ")[0] or type(err).__name__
            raise CheckpointError(f"{rng_file}: unreadable RNG state ({detail})") from None
    else:
        seed_everything(seed + 1_000_003 * world.rank + step)
    metrics = read_metrics(path / METRICS_FILE) if world.is_main else []
    return Restored(path=path, step=step, trainer_state=trainer_state, metrics=metrics)


# ------------------------------------------------------------------------------ export
def _replace_dir(tmp: Path, final: Path) -> Path:
    _swap_in(tmp, final)
    return final


def export_final(
    model: nn.Module,
    config: TrainConfig,
    *,
    model_config: NeoXConfig,
    tokenizer: Any,
    dtype: torch.dtype,
    world: World,
) -> dict[str, Path]:
    """Write ``final/`` (and ``final-adapter/`` for LoRA) under the output directory; all
    ranks call it (the weights are gathered), rank 0 writes. Returns the paths written."""
    from tulu.model.checkpoint import empty_model, save_model

    state = full_model_state_dict(model, world)
    written: dict[str, Path] = {}
    if world.is_main:
        root = Path(config.checkpoint.output_dir)
        net = empty_model(model_config)
        try:
            if config.lora.enabled:
                from tulu.train.lora import apply_lora, merge_lora, save_adapter

                peft_model = apply_lora(
                    net,
                    config.lora,
                    base_model_path=config.model.path,
                    base_model_revision=config.model.revision,
                )
                peft_model.load_state_dict(state, strict=True)
                tmp = root / f"{TMP_PREFIX}{FINAL_ADAPTER_DIR}"
                shutil.rmtree(tmp, ignore_errors=True)
                save_adapter(
                    peft_model,
                    tmp,
                    base_model_path=config.model.path,
                    base_model_revision=config.model.revision,
                )
                tokenizer.save(tmp)
                written["adapter"] = _replace_dir(tmp, root / FINAL_ADAPTER_DIR)
                net = merge_lora(peft_model)
            else:
                net.load_state_dict(state, strict=True)
            del state
            tmp = root / f"{TMP_PREFIX}{FINAL_DIR}"
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(net, tmp, tokenizer=tokenizer, dtype=dtype)
            written["model"] = _replace_dir(tmp, root / FINAL_DIR)
        except OSError as err:
            raise CheckpointError(f"{root / FINAL_DIR}: cannot export the model ({err})") from err
    barrier(world)
    return written
