"""Load a model and its tokenizer together, and describe a checkpoint without loading it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tulu.errors import TuluError
from tulu.model.checkpoint import (
    checkpoint_dtype,
    find_weight_files,
    load_model,
    read_checkpoint_config,
    refuse_local_revision,
    resolve_checkpoint,
)
from tulu.model.config import PRESET_NAMES, NeoXConfig, dtype_name, parse_dtype, preset
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.tokenizer import TOKENIZER_FILE, Tokenizer


@dataclass
class Pretrained:
    model: GPTNeoXForCausalLM
    tokenizer: Tokenizer
    directory: Path
    # Every file the weights came from (a LoRA adapter's and its base's): what a cache of
    # this model's outputs must be keyed on.
    weight_files: list[Path]

    def identity(self) -> dict[str, Any]:
        """What a cache of this model's outputs is keyed on (`tulu eval`'s cache, `tulu
        generate`'s progress file): the checkpoint directory, each weight file's name, size
        and modification time (a retrained or replaced checkpoint changes them), the dtype."""
        return {
            "checkpoint": str(Path(self.directory).resolve()),
            "weights": [
                [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in self.weight_files
            ],
            "dtype": str(next(self.model.parameters()).dtype),
        }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(value: str | torch.device | None, where: str = "--device") -> torch.device:
    """The device `value` names (None or "": `default_device()`), checked to be usable here.

    torch rejects a misspelt device or a GPU that is not there deep inside the first tensor
    operation, with a raw RuntimeError, AssertionError or ImportError (a backend torch was
    built without); probing turns each into one error naming the option, before anything is
    loaded. The probe reads a value back, because a device can hold tensors and still not
    compute: "meta" tensors have no data, so every generation would fail at its first token.
    """
    try:
        device = torch.device(value or default_device())
        torch.zeros(1, device=device).tolist()
    except (RuntimeError, AssertionError, TypeError, ImportError) as err:
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
        raise TuluError(f"{where}: cannot use device {str(value)!r} ({reason})") from None
    return device


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on GPUs (what the model was trained in); float32 on CPU, where it is fastest."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_pretrained(
    model: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> Pretrained:
    """A checkpoint directory or hub id -> model (eval mode) + its tokenizer.

    A LoRA adapter directory (PEFT's adapter_config.json naming its base) loads as its base
    with the adapter merged in, as `tulu export --merge-lora` writes it: merged in float32 on
    the CPU, then cast to `dtype` on `device`; its tokenizer is the adapter's own, else the
    base's.
    """
    device = parse_device(device)
    target = parse_dtype(dtype, "--dtype") if dtype is not None else default_dtype(device)
    local = Path(model).expanduser()
    if local.is_dir() and (local / "adapter_config.json").is_file():
        refuse_local_revision(local, revision)
        return _load_merged_adapter(local, target, device)
    directory = resolve_checkpoint(model, revision)
    tokenizer = Tokenizer.from_dir(directory)
    net = load_model(directory, dtype=target, device=device)
    net.requires_grad_(False)
    return Pretrained(net, tokenizer, directory, find_weight_files(directory).files)


def _load_merged_adapter(adapter_dir: Path, dtype: torch.dtype, device: torch.device) -> Pretrained:
    from tulu.train.lora import adapter_base, load_adapter, merge_lora

    base = adapter_base(adapter_dir)
    has_own = (adapter_dir / TOKENIZER_FILE).is_file()
    tokenizer = Tokenizer.from_dir(adapter_dir if has_own else base)
    rows = read_checkpoint_config(base).vocab_size
    if len(tokenizer) > rows:
        raise TuluError(
            f"{adapter_dir}: the tokenizer has {len(tokenizer):,} ids but the base model "
            f"({base}) has {rows:,} embedding rows"
        )
    net = merge_lora(load_adapter(load_model(base, dtype=torch.float32), adapter_dir))
    net = net.to(device=device, dtype=dtype).eval()
    net.requires_grad_(False)
    adapter_files = sorted(p for p in adapter_dir.glob("adapter_model.*") if p.is_file())
    files = [adapter_dir / "adapter_config.json", *adapter_files, *find_weight_files(base).files]
    return Pretrained(net, tokenizer, adapter_dir, files)


def _merged_adapter_config(adapter_dir: Path) -> tuple[NeoXConfig, Path]:
    """The config of the model `load_pretrained` makes of a LoRA adapter directory, and its
    base: the base's config, untied when the adapter changes the LM head of a tied base
    (`merge_lora` gives such a head its own weight)."""
    from tulu.train.lora import adapter_base, adapts_head

    base = adapter_base(adapter_dir)
    config = read_checkpoint_config(base)
    if config.tie_word_embeddings and adapts_head(adapter_dir):
        config = config.with_(tie_word_embeddings=False)
    return config, base


def describe(
    model: str | os.PathLike, dtype: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """Sizes and memory needs of a checkpoint (or a preset name) from its config alone.

    A LoRA adapter directory is described as `load_pretrained` loads it: its base with the
    adapter merged in (the same shapes, but for an adapted tied head, which gets its own).
    """
    source: str
    local = Path(model).expanduser()
    if str(model) in PRESET_NAMES:
        refuse_local_revision(f"preset {model}", revision)
        config, source, tokenizer = preset(str(model)), f"preset {model}", None
        stored, stored_from = config.torch_dtype, "preset"
    elif local.is_dir() and (local / "adapter_config.json").is_file():
        refuse_local_revision(local, revision)
        config, base = _merged_adapter_config(local)
        source = f"{local} (LoRA adapter over {base})"
        has_own = (local / TOKENIZER_FILE).is_file()  # as load_pretrained picks it
        tokenizer_dir = local if has_own else base
        has_tokenizer = (tokenizer_dir / TOKENIZER_FILE).is_file()
        tokenizer = Tokenizer.from_dir(tokenizer_dir) if has_tokenizer else None
        stored, stored_from = checkpoint_dtype(base, config)
    else:
        # Config and tokenizer only: weights already here are read for a tied head below.
        directory = resolve_checkpoint(model, revision, weights=False)
        config = read_checkpoint_config(directory)  # as it loads (a tied head may untie)
        source = str(directory)
        # info still works for a directory without tokenizer files; a broken one is an error
        # (generate, chat and serve would fail on it), not an omission.
        has_tokenizer = (directory / TOKENIZER_FILE).is_file()
        tokenizer = Tokenizer.from_dir(directory) if has_tokenizer else None
        stored, stored_from = checkpoint_dtype(directory, config)
    target = parse_dtype(dtype, "--dtype") if dtype else parse_dtype(stored, "checkpoint dtype")
    itemsize = torch.empty((), dtype=target).element_size()
    params = config.num_parameters()
    info: dict[str, Any] = {
        "source": source,
        "architecture": "GPT-NeoX",
        "parameters": params,
        "non_embedding_parameters": config.num_parameters(include_embeddings=False),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "head_size": config.head_size,
        "rotary_dims": config.rotary_ndims,
        "parallel_residual": config.use_parallel_residual,
        "vocab_size": config.vocab_size,
        "context_window": config.max_position_embeddings,
        "checkpoint_dtype": stored,
        "checkpoint_dtype_from": stored_from,
        "dtype": dtype_name(target),
        "weights_bytes": params * itemsize,
        "kv_cache_bytes_per_token": config.kv_cache_bytes_per_token(target),
        "kv_cache_bytes_full_context": config.kv_cache_bytes_per_token(target)
        * config.max_position_embeddings,
    }
    if tokenizer is not None:
        info["tokenizer_size"] = len(tokenizer)
        info["special_tokens"] = {
            k: v for k, v in tokenizer.special_tokens.items() if v is not None
        }
    return info
