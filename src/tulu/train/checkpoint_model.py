"""A training checkpoint's model outside a training run: what `tulu export step-N` writes.

A step checkpoint (`tulu.train.checkpointing`) holds the model in
torch.distributed.checkpoint shards next to the optimizer state, which nothing but the
trainer reads. To evaluate or serve an intermediate step, `load_checkpoint_model` rebuilds the
run's model in one process, on the CPU, and reads only the model's tensors (not the
optimizer's, which are twice their size) into it, resharding from however many processes
wrote them. A LoRA run's checkpoint holds base and adapter weights; the adapter is merged.

What the model is comes from the checkpoint itself (``model_config.json``, ``tokenizer/``).
Checkpoints written before those files existed fall back on the run's settings
(``config.yaml``): the ``model.path`` checkpoint's config.json or the fresh model's preset and
config, and ``model.tokenizer`` (or the base's tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tulu.errors import CheckpointError
from tulu.model.checkpoint import empty_model
from tulu.model.config import NeoXConfig, parse_dtype
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.tokenizer import Tokenizer
from tulu.train.checkpointing import (
    CONFIG_FILE,
    MODEL_CONFIG_FILE,
    STATE_DIR,
    TOKENIZER_DIR,
    TRAINER_FILE,
    check_model_tensors,
    read_trainer_state,
)
from tulu.train.config import TrainConfig, load_train_config
from tulu.train.distributed import get_train_state, load_sharded, set_train_state

__all__ = ["CheckpointModel", "is_training_checkpoint", "load_checkpoint_model"]


@dataclass
class CheckpointModel:
    """The model of a step checkpoint (LoRA merged), its tokenizer, and the dtype the run
    computed in (what its final export would be written in)."""

    model: GPTNeoXForCausalLM
    tokenizer: Tokenizer
    compute_dtype: torch.dtype
    step: int


def is_training_checkpoint(path: Path) -> bool:
    """Whether `path` is a complete step checkpoint (trainer.json is written last)."""
    return (path / TRAINER_FILE).is_file() and (path / STATE_DIR).is_dir()


def _run_config(path: Path) -> TrainConfig:
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: {CONFIG_FILE} is missing (not a tulu training checkpoint)")
    return load_train_config(path / CONFIG_FILE)


def checkpoint_tokenizer(path: Path) -> Tokenizer:
    """The run's tokenizer: the checkpoint's copy, else what the run's settings name."""
    if (path / TOKENIZER_DIR).is_dir():
        return Tokenizer.from_dir(path / TOKENIZER_DIR)
    from tulu.train.trainer import load_tokenizer

    return load_tokenizer(_run_config(path))


def _model_config(path: Path, config: TrainConfig, tokenizer: Tokenizer) -> NeoXConfig:
    if (path / MODEL_CONFIG_FILE).is_file():
        return NeoXConfig.from_json(path / MODEL_CONFIG_FILE)
    if config.model.path:
        from tulu.model.checkpoint import read_checkpoint_config, resolve_checkpoint

        return read_checkpoint_config(resolve_checkpoint(config.model.path, config.model.revision))
    from tulu.train.trainer import build_model_config

    return build_model_config(config, tokenizer)


def _stored_dtype(state_dir: Path) -> torch.dtype | None:
    """The dtype the checkpoint's model weights are stored in (its master dtype)."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(str(state_dir)).read_metadata()
    except Exception:  # noqa: BLE001 - load_sharded reports an unreadable checkpoint
        return None
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and key.endswith("embed_in.weight"):
            return getattr(getattr(meta, "properties", None), "dtype", None)
    return None


def load_checkpoint_model(path: str | Path, tokenizer: Tokenizer | None = None) -> CheckpointModel:
    """The model of the step checkpoint at `path`, on the CPU (see the module doc).

    Full fine-tuning: the weights are read in the dtype they are stored in, so a bfloat16 run
    needs no float32 copy. LoRA: the base and adapters are read in float32 and merged there,
    as `tulu export --merge-lora` merges.
    """
    path = Path(path)
    trainer_state = read_trainer_state(path)
    config = _run_config(path)
    tokenizer = tokenizer or checkpoint_tokenizer(path)
    model_config = _model_config(path, config, tokenizer)
    state_dir = path / STATE_DIR
    lora = config.lora.enabled
    dtype = torch.float32 if lora else (_stored_dtype(state_dir) or torch.float32)
    model = empty_model(model_config, dtype)
    target: torch.nn.Module = model
    if lora:
        from tulu.train.lora import apply_lora

        target = apply_lora(
            model,
            config.lora,
            base_model_path=config.model.path,
            base_model_revision=config.model.revision,
        )
    state = get_train_state(target)
    check_model_tensors(state_dir, state["model"])
    load_sharded(state, state_dir)
    set_train_state(target, None, state)
    if lora:
        from tulu.train.lora import merge_lora

        model = merge_lora(target)
    recorded = trainer_state.get("compute_dtype") or config.model.dtype
    compute = parse_dtype(recorded, f"{path / TRAINER_FILE}: compute_dtype") if recorded else dtype
    return CheckpointModel(model.eval(), tokenizer, compute, trainer_state["step"])
