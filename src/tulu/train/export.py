"""``tulu export``: turn a training result into a plain Hugging Face checkpoint directory.

The source is either a model directory (config.json + weights; e.g. a full fine-tune's
output, to change its dtype or add a tokenizer) or a LoRA adapter directory (PEFT's
adapter_config.json + adapter_model.safetensors, naming its base checkpoint in
``base_model_name_or_path``). An adapter is exported by merging it into the base weights,
which the user asks for explicitly with ``--merge-lora``: the result is a full-size copy of the
base, not a few megabytes of adapter, and it no longer works as an adapter.

The output holds config.json, generation_config.json, safetensors weights and the tokenizer
files, and opens in transformers (`AutoModelForCausalLM`, `AutoTokenizer`) and in our
`load_model` / `Tokenizer.from_dir` with the same logits as the source.

Merging happens in float32 (the base is loaded in float32, W + scale * B @ A is computed
there) and the result is then stored in `dtype`: by default the dtype the base's weights are
stored in (Pythia: float16), so an export is the size of its base.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tulu.errors import CheckpointError, ConfigError, TokenizerError
from tulu.model.checkpoint import find_weight_files, load_model, resolve_checkpoint, save_model
from tulu.model.config import NeoXConfig, parse_dtype
from tulu.model.safetensors_reader import read_header
from tulu.tokenizer import Tokenizer
from tulu.train.lora import (
    ADAPTER_CONFIG,
    is_adapter_dir,
    load_adapter,
    read_adapter_config,
)
from tulu.train.lora import merge_lora as merge_adapter

__all__ = ["export_checkpoint", "stored_dtype"]

TOKENIZER_FILE = "tokenizer.json"


def stored_dtype(directory: Path) -> torch.dtype:
    """The dtype a checkpoint's floating-point weights are stored in (from the safetensors
    header, without reading data); config.json's torch_dtype for .bin checkpoints."""
    weights = find_weight_files(directory)
    if weights.kind == "safetensors":
        for entry in read_header(weights.files[0]).values():
            if entry.dtype.is_floating_point:
                return entry.dtype
    return NeoXConfig.from_json(directory / "config.json").dtype


def _resolve_base(adapter_dir: Path, base: str) -> Path:
    """The adapter's base: as written (a path from the current directory, or a hub id), or a
    path relative to the adapter directory."""
    as_written = Path(base).expanduser()
    beside = adapter_dir / base
    if not as_written.is_dir() and not Path(base).is_absolute() and beside.is_dir():
        return beside
    return resolve_checkpoint(base)


def _load_tokenizer(
    given: Tokenizer | str | os.PathLike | None, candidates: list[Path]
) -> Tokenizer:
    if isinstance(given, Tokenizer):
        return given
    if given is not None:
        return Tokenizer.load(given)
    for directory in candidates:
        if (directory / TOKENIZER_FILE).is_file():
            return Tokenizer.from_dir(directory)
    looked = ", ".join(str(d / TOKENIZER_FILE) for d in candidates)
    raise TokenizerError(
        f"no tokenizer to export: {TOKENIZER_FILE} not found (looked for {looked}); "
        "pass --tokenizer (a checkpoint directory, a tokenizer.json or a hub id)"
    )


def _check_output(output: Path, *sources: Path) -> None:
    resolved = output.expanduser().resolve()
    for source in sources:
        if resolved == source.resolve():
            raise ConfigError(
                f"--output {output}: is the source directory {source}; export to a new one"
            )


def export_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    merge_lora: bool,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write a full HF checkpoint directory for `source` (see the module doc) to `output_dir`.

    merge_lora: required (True) when `source` is an adapter directory; nothing to merge for a
    model directory. tokenizer: a `Tokenizer`, or where to read one; default: the source's
    (an adapter's own, else its base's). dtype: of the stored weights; default: as the source
    (the base's, for an adapter).
    """
    output = Path(output_dir)
    local = Path(source).expanduser()
    if local.is_dir() and is_adapter_dir(local):
        if not merge_lora:
            raise ConfigError(
                f"{local}: is a LoRA adapter directory ({ADAPTER_CONFIG}); pass --merge-lora "
                "to write its base model with the adapter merged into the weights"
            )
        config = read_adapter_config(local)
        base_name = config.get("base_model_name_or_path")
        if not base_name:
            raise CheckpointError(
                f"{local / ADAPTER_CONFIG}: base_model_name_or_path is empty; the export needs "
                "the base checkpoint the adapter was trained on"
            )
        base = _resolve_base(local, str(base_name))
        _check_output(output, local, base)
        target = parse_dtype(dtype, "--dtype") if dtype is not None else stored_dtype(base)
        model = merge_adapter(load_adapter(load_model(base, dtype=torch.float32), local))
        tokenizer = _load_tokenizer(tokenizer, [local, base])
    else:
        directory = resolve_checkpoint(source)
        if not (directory / "config.json").is_file():
            raise CheckpointError(
                f"{directory}: neither config.json (a model) nor {ADAPTER_CONFIG} (a LoRA "
                "adapter) found"
            )
        _check_output(output, directory)
        target = parse_dtype(dtype, "--dtype") if dtype is not None else stored_dtype(directory)
        model = load_model(directory, dtype=target)
        tokenizer = _load_tokenizer(tokenizer, [directory])
    return save_model(model, output, tokenizer=tokenizer, dtype=target)


# ------------------------------------------------------------------------------ command line
