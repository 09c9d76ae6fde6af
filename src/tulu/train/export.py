"""``tulu export``: turn a training result into a plain Hugging Face checkpoint directory.

The source is a model directory (config.json + weights; e.g. a full fine-tune's output, to
change its dtype or add a tokenizer), a LoRA adapter directory (PEFT's adapter_config.json +
adapter_model.safetensors, naming its base checkpoint in ``base_model_name_or_path``), or a
training run's step checkpoint (``output_dir/step-000500``, `tulu.train.checkpoint_model`), to
evaluate or serve an intermediate step. An adapter is exported by merging it into the base
weights, which the user asks for explicitly with ``--merge-lora``: the result is a full-size
copy of the base, not a few megabytes of adapter, and it no longer works as an adapter. A LoRA
run's step checkpoint is merged the same way (it has no adapter format to keep).

The output holds config.json, generation_config.json, safetensors weights and the tokenizer
files, and opens in transformers (`AutoModelForCausalLM`, `AutoTokenizer`) and in our
`load_model` / `Tokenizer.from_dir` with the same logits as the source.

Merging happens in float32 (the base is loaded in float32, W + scale * B @ A is computed
there) and the result is then stored in `dtype`: by default the dtype the base's weights are
stored in (Pythia: float16), so an export is the size of its base. A step checkpoint is stored
by default in the dtype its run computed in, as the run's own final export would be.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from tulu.errors import CheckpointError, ConfigError, TokenizerError
from tulu.jsonl import same_file
from tulu.model.checkpoint import (
    checkpoint_dtype,
    find_weight_files,
    load_model,
    resolve_checkpoint,
    save_model,
)
from tulu.model.config import NeoXConfig, parse_dtype
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.model.safetensors_reader import read_header
from tulu.tokenizer import Tokenizer
from tulu.train.checkpoint_model import (
    checkpoint_tokenizer,
    is_training_checkpoint,
    load_checkpoint_model,
)
from tulu.train.lora import (
    ADAPTER_CONFIG,
    adapter_base,
    is_adapter_dir,
    load_adapter,
)
from tulu.train.lora import merge_lora as merge_adapter

__all__ = ["export_checkpoint", "stored_dtype"]

TOKENIZER_FILE = "tokenizer.json"
#: The files an export writes (`save_model` and `Tokenizer.save`). An existing --output that
#: holds nothing else is an earlier export and is replaced; anything else belongs to the user.
_EXPORT_FILES = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json"
    r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
)
_STAGING = re.compile(r"\.tmp-export-\d+")


def stored_dtype(directory: Path) -> torch.dtype:
    """The dtype a checkpoint's floating-point weights are stored in (from the safetensors
    header, without reading data); for .bin checkpoints `checkpoint_dtype`'s: config.json's
    torch_dtype, else float32 (not NeoXConfig's float16 default, which would round them)."""
    weights = find_weight_files(directory)
    if weights.kind == "safetensors":
        for entry in read_header(weights.files[0]).values():
            if entry.dtype.is_floating_point:
                return entry.dtype
    config = NeoXConfig.from_json(directory / "config.json")
    return parse_dtype(checkpoint_dtype(directory, config)[0], "checkpoint dtype")


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


def _check_vocabulary(tokenizer: Tokenizer, rows: int, model_dir: Path) -> None:
    """The tokenizer's ids fit the model's `rows` embedding rows, checked before the model is
    loaded where possible: a mismatched --tokenizer would otherwise give an export that fails
    on its first prompt."""
    if len(tokenizer) > rows:
        raise TokenizerError(
            f"the tokenizer has {len(tokenizer):,} ids but the model ({model_dir}) has "
            f"{rows:,} embedding rows; is --tokenizer the model's tokenizer?"
        )


def _check_output(output: Path, *sources: Path) -> None:
    for source in sources:
        if same_file(output.expanduser(), source):
            raise ConfigError(
                f"--output {output}: is the source directory {source}; export to a new one"
            )


def _check_writable(output: Path) -> None:
    """Refuse, before minutes of loading and merging, an --output that cannot be written or
    that holds files of the user's (an export never deletes or overwrites those)."""
    target = output.expanduser()
    existing = next(p for p in (target, *target.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--output {output}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: {existing} is not writable")
    if existing == target:
        foreign = sorted(p.name for p in target.iterdir() if not _ours(p))
        if foreign:
            raise ConfigError(
                f"--output {output}: holds {len(foreign)} item(s) that an export does not "
                f"write, e.g. {foreign[0]!r}; choose a new or empty directory (one that holds "
                "only an earlier export is replaced)"
            )


def _ours(path: Path) -> bool:
    """A file an export writes, or the staging directory of an interrupted one."""
    if path.is_dir() and not path.is_symlink():
        return _STAGING.fullmatch(path.name) is not None
    return path.is_file() and _EXPORT_FILES.fullmatch(path.name) is not None


def _write(
    model: GPTNeoXForCausalLM, output: Path, tokenizer: Tokenizer, dtype: torch.dtype
) -> Path:
    """Write the export into a staging directory inside `output`, then move it into place.

    A failed or interrupted write (a full disk, Ctrl-C during minutes of writing) leaves any
    earlier export as it was, and never a partial one. The swap itself deletes config.json
    first and moves the new one in last, so a directory with config.json is complete. Files
    are moved, not the directory, so that --output may be a mount point.
    """
    target = output.expanduser()
    created = not target.exists()
    staging = target / f".tmp-export-{os.getpid()}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for leftover in target.iterdir():  # staging of an interrupted export
            if leftover.is_dir() and _STAGING.fullmatch(leftover.name):
                shutil.rmtree(leftover)
        save_model(model, staging, tokenizer=tokenizer, dtype=dtype)
        last = "config.json"
        for old in sorted(target.iterdir(), key=lambda p: p.name != last):
            if old != staging and _ours(old):  # an earlier export's files, nothing else
                old.unlink()
        for new in sorted(staging.iterdir(), key=lambda p: p.name == last):
            new.rename(target / new.name)
    except OSError as err:
        raise CheckpointError(f"--output {output}: cannot write the export ({err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
    return output


def _run_dir_hint(directory: Path) -> str:
    """For a training run's output directory: what in it can be exported."""
    from tulu.train.checkpointing import FINAL_DIR, latest_checkpoint

    candidates = [directory / FINAL_DIR, latest_checkpoint(directory)]
    found = [str(p) for p in candidates if p is not None and p.is_dir()]
    return f"; a training run's output? export {' or '.join(found)}" if found else ""


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
    model directory; a LoRA run's step checkpoint is always merged. tokenizer: a `Tokenizer`,
    or where to read one; default: the source's (an adapter's own, else its base's). dtype: of the stored weights; default: as the source
    (the base's, for an adapter).
    """
    output = Path(output_dir)
    local = Path(source).expanduser()
    if local.is_dir() and is_training_checkpoint(local):
        _check_output(output, local)
        _check_writable(output)
        tokenizer = (
            _load_tokenizer(tokenizer, []) if tokenizer is not None else checkpoint_tokenizer(local)
        )
        loaded = load_checkpoint_model(local, tokenizer)
        _check_vocabulary(tokenizer, loaded.model.config.vocab_size, local)
        target = parse_dtype(dtype, "--dtype") if dtype is not None else loaded.compute_dtype
        return _write(loaded.model, output, tokenizer, target)
    if local.is_dir() and is_adapter_dir(local):
        if not merge_lora:
            raise ConfigError(
                f"{local}: is a LoRA adapter directory ({ADAPTER_CONFIG}); pass --merge-lora "
                "to write its base model with the adapter merged into the weights"
            )
        base = adapter_base(local)
        _check_output(output, local, base)
        _check_writable(output)
        target = parse_dtype(dtype, "--dtype") if dtype is not None else stored_dtype(base)
        tokenizer = _load_tokenizer(tokenizer, [local, base])
        _check_vocabulary(tokenizer, NeoXConfig.from_json(base / "config.json").vocab_size, base)
        model = merge_adapter(load_adapter(load_model(base, dtype=torch.float32), local))
    else:
        directory = resolve_checkpoint(source)
        if not (directory / "config.json").is_file():
            raise CheckpointError(
                f"{directory}: neither config.json (a model), {ADAPTER_CONFIG} (a LoRA "
                f"adapter) nor trainer.json (a step checkpoint) found{_run_dir_hint(directory)}"
            )
        _check_output(output, directory)
        _check_writable(output)
        target = parse_dtype(dtype, "--dtype") if dtype is not None else stored_dtype(directory)
        tokenizer = _load_tokenizer(tokenizer, [directory])
        rows = NeoXConfig.from_json(directory / "config.json").vocab_size
        _check_vocabulary(tokenizer, rows, directory)
        model = load_model(directory, dtype=target)
    return _write(model, output, tokenizer, target)


# ------------------------------------------------------------------------------ command line
