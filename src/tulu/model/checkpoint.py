"""Load and save Hugging Face checkpoint directories (and resolve hub ids through the HF cache).

Loading builds the model on the meta device (no memory), validates every tensor's name and
shape against the config before reading anything, then reads tensors one by one straight into
the requested dtype and device. Peak memory is the loaded weights plus one read chunk.
`checkpoint_tensors` is that validated stream of tensors on its own, for callers that place
each tensor themselves: the FSDP trainer keeps only each rank's slice
(`tulu.train.distributed.load_checkpoint_shards`).

Supported layouts, in order of preference:
- `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- `pytorch_model.bin`, or shards listed in `pytorch_model.bin.index.json`, read with
  `torch.load(weights_only=True)`: pickled code is never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tulu.errors import CheckpointError
from tulu.hub import looks_like_hub_id, snapshot
from tulu.model.config import NeoXConfig, dtype_name, parse_dtype
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.model.safetensors_reader import TensorEntry, read_header, read_tensor, read_tensors

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SHARD_BYTES = 5 * 1000**3  # transformers' default max_shard_size "5GB"

# Buffers that old transformers versions saved with GPT-NeoX checkpoints; recomputed, not loaded.
_IGNORED = re.compile(r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
# Hub files by need: config, index and tokenizer files; then the weights, safetensors first.
_HUB_META_FILES = ["*.json", "*.txt", "*.model"]
_HUB_SAFETENSORS_FILES = [*_HUB_META_FILES, "*.safetensors"]
_HUB_FILES = [*_HUB_SAFETENSORS_FILES, "*.bin"]


HEAD = "embed_out.weight"
EMBEDDING = "gpt_neox.embed_in.weight"
_TRUNK_PREFIX = "gpt_neox."


def canonical_name(name: str) -> str:
    """Map the names other writers use onto ours: transformers 5 calls embed_out lm_head, and
    a trunk saved on its own has no `gpt_neox.` prefix, which transformers adds on loading."""
    if name == "lm_head.weight":
        return HEAD
    if name != HEAD and not name.startswith(_TRUNK_PREFIX):
        return _TRUNK_PREFIX + name
    return name


# ---------------------------------------------------------------------------------- resolve
def refuse_local_revision(source: str | os.PathLike, revision: str | None) -> None:
    """A revision names a hub commit; given with a local directory or a preset it would be
    silently ignored (as transformers does), so the user would not get the version asked for."""
    if revision is not None:
        raise CheckpointError(
            f"{source}: revision {revision!r} applies to hub ids only, and this is not one"
        )


def resolve_checkpoint(
    model: str | os.PathLike, revision: str | None = None, *, weights: bool = True
) -> Path:
    """A local checkpoint directory for `model`: a directory path, or a hub id `org/name`.

    Hub ids go through huggingface_hub's cache (`tulu.hub`), so HF_HOME / HF_HUB_CACHE and
    HF_HUB_OFFLINE behave as they do for every other HF tool. Like transformers, only one copy
    of the weights is fetched: the safetensors files, and the `.bin` files only for a repository
    without them (a repository may hold both, each the size of the model). `weights=False`
    fetches config and tokenizer files only (`tulu info`).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        refuse_local_revision(path, revision)
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    if not looks_like_hub_id(model):
        raise CheckpointError(f"{model}: no such checkpoint directory (and not a hub id org/name)")
    patterns = _HUB_SAFETENSORS_FILES if weights else _HUB_META_FILES
    directory = snapshot(
        str(model), revision=revision, allow_patterns=patterns, error=CheckpointError
    )
    if weights and not any((directory / name).is_file() for name in (SAFE_SINGLE, SAFE_INDEX)):
        directory = snapshot(
            str(model), revision=revision, allow_patterns=_HUB_FILES, error=CheckpointError
        )
    return directory


# ---------------------------------------------------------------------------------- weights
@dataclass
class WeightFiles:
    """The weight files of a checkpoint directory and their format."""

    kind: str  # "safetensors" or "bin"
    files: list[Path]
    # The shard index (`*.index.json`) and its tensor -> shard file name map, when sharded.
    index: Path | None = None
    weight_map: dict[str, str] | None = None

    def check_shard(self, shard: Path, names: set[str]) -> None:
        """Raise unless `shard` holds every tensor the index assigns to it.

        A shard that lacks a tensor its index promises means the index and the shards come
        from different saves (or a shard was rewritten): refuse rather than guess.
        """
        if self.weight_map is None:
            return
        for name, listed in self.weight_map.items():
            if listed == shard.name and name not in names:
                raise CheckpointError(
                    f"{self.index}: lists tensor {name!r} in {shard.name!r}, but that file "
                    f"does not contain it"
                )


def find_weight_files(directory: Path) -> WeightFiles:
    """The weight files transformers' `from_pretrained` would read from `directory`, in its
    order of preference: a single file before a shard index, safetensors before pickles. A
    directory holding both a single file and an index (a model re-saved at another shard size
    by a tool that left the old files) thus loads the same weights in both libraries."""
    for single, index_name, kind in (
        (SAFE_SINGLE, SAFE_INDEX, "safetensors"),
        (BIN_SINGLE, BIN_INDEX, "bin"),
    ):
        if (directory / single).is_file():
            return WeightFiles(kind, [directory / single])
        if (directory / index_name).is_file():
            files, weight_map = _index_files(directory / index_name)
            return WeightFiles(kind, files, directory / index_name, weight_map)
    raise CheckpointError(
        f"{directory}: no weights found (looked for {SAFE_SINGLE}, {SAFE_INDEX}, "
        f"{BIN_SINGLE}, {BIN_INDEX})"
    )


def _index_files(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: invalid shard index ({err})") from None
    except OSError as err:  # unreadable (permissions, I/O error)
        raise CheckpointError(f"{index_path}: cannot read ({err.strerror or err})") from None
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{index_path}: invalid shard index (tensor {name!r} is mapped to {shard!r}, "
                f"not a file name)"
            )
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = index_path.parent / str(shard)
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard!r} is listed but missing")
        files.append(shard_path)
    return files, {str(name): str(shard) for name, shard in weight_map.items()}


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint must provide (tied weights appear once)."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def read_checkpoint_config(directory: Path) -> NeoXConfig:
    """The `NeoXConfig` the checkpoint in `directory` loads as: its config.json, untied when
    config.json ties the LM head to the input embedding but the weights hold a head of other
    values. transformers then keeps both (with a warning) rather than dropping the stored head,
    and so do we: the same checkpoint gives the same logits in both libraries. A stored head
    equal to the embedding stays tied."""
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{directory}: config.json not found (is this a checkpoint directory?)"
        )
    config = NeoXConfig.from_json(directory / "config.json")
    if config.tie_word_embeddings:
        stored = _stored_embeddings(directory)
        head, embedding = stored.get(HEAD), stored.get(EMBEDDING)
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            warnings.warn(
                f"{directory}: config.json sets tie_word_embeddings true, but the checkpoint "
                "holds an LM head that differs from the input embedding: loading both, "
                "untied, as transformers does (set tie_word_embeddings to false to silence "
                "this warning)",
                stacklevel=2,
            )
            config = config.with_(tie_word_embeddings=False)
    return config


def _stored_embeddings(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's input embedding and separate LM head, those it has (our names)."""
    wanted = (HEAD, EMBEDDING)
    found: dict[str, torch.Tensor] = {}
    try:
        weights = find_weight_files(directory)
    except CheckpointError:  # no weights: the config stands (`tulu info`); loading says so
        return found
    for path in weights.files:
        if weights.kind == "safetensors":
            for entry in read_header(path).values():
                if canonical_name(entry.name) in wanted:
                    found[canonical_name(entry.name)] = read_tensor(path, entry)
        else:
            for name, tensor in _torch_load(path).items():
                if canonical_name(name) in wanted and isinstance(tensor, torch.Tensor):
                    found[canonical_name(name)] = tensor
    return found


def checkpoint_dtype(directory: Path, config: NeoXConfig) -> tuple[str, str]:
    """The dtype the checkpoint in `directory` (whose config is `config`) holds, and where it
    was found ("config.json", "weights" or "assumed"): what `load_model` loads by default and
    `tulu info` reports (and `tulu export` writes from .bin weights).

    config.json's `torch_dtype` when it names one. Without it, `NeoXConfig` falls back on
    Pythia's float16, which says nothing about this checkpoint: transformers then loads the
    dtype of the stored weights, read here from the safetensors headers (no tensor data; the
    dtype most elements are in). Where those are not at hand (.bin files, or a hub id, whose
    weights `tulu info` does not fetch), torch's default float32 is assumed: a lossless
    choice, where float16 could overflow or round the weights.
    """
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if raw.get("dtype") or raw.get("torch_dtype"):  # as NeoXConfig.from_dict reads it
        return config.torch_dtype, "config.json"
    try:
        weights = find_weight_files(directory)
    except CheckpointError:  # no weights here: nothing to read
        return "float32", "assumed"
    elements: Counter[torch.dtype] = Counter()
    if weights.kind == "safetensors":
        for path in weights.files:
            for entry in read_header(path).values():
                if entry.dtype.is_floating_point:
                    elements[entry.dtype] += entry.numel
    if not elements:
        return "float32", "assumed"
    return dtype_name(elements.most_common(1)[0][0]), "weights"


def load_model(
    model: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> GPTNeoXForCausalLM:
    """Load a GPT-NeoX checkpoint (directory or hub id) into `dtype` on `device`.

    dtype defaults to the checkpoint's (`checkpoint_dtype`: config.json's `torch_dtype`, else
    the stored weights', as transformers loads it); float16 checkpoints load as float32 on CPU,
    where half-precision matmuls are slow or unsupported.
    """
    directory = resolve_checkpoint(model, revision)
    config = read_checkpoint_config(directory)
    if dtype is None:
        target = parse_dtype(checkpoint_dtype(directory, config)[0], "checkpoint dtype")
        if torch.device(device).type == "cpu" and target == torch.float16:
            target = torch.float32
    else:
        target = parse_dtype(dtype, "dtype")
    with torch.device("meta"):
        net = GPTNeoXForCausalLM(config)
    tensors = checkpoint_tensors(
        directory, expected_shapes(net), lambda _, stored: _target_dtype(stored, target), device
    )
    for name, tensor in tensors:
        module_name, _, attr = name.rpartition(".")
        net.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor)
    net.tie_weights()  # a tied head shares the loaded embedding (tied checkpoints store one)
    net.eval()
    return net


def empty_model(
    config: NeoXConfig, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> GPTNeoXForCausalLM:
    """A model with uninitialised weights in `dtype` (default float32) on `device`, for
    callers that fill every weight next (a state dict, a training checkpoint). Fast even at
    6.9B: built on the meta device, then given storage in the target dtype directly, so it
    never holds a float32 copy of a bfloat16 model. The tied LM head is tied again.
    """
    with torch.device("meta"):
        net = GPTNeoXForCausalLM(config)
    if dtype is not None:
        net.to(dtype)
    net.to_empty(device=device)
    net.tie_weights()
    return net


def checkpoint_tensors(
    directory: Path,
    wanted: dict[str, tuple[int, ...]],
    dtype_for: Callable[[str, torch.dtype], torch.dtype],
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the checkpoint in `directory`, one at a time: (our name, tensor).

    `wanted` is `expected_shapes` of the model; `dtype_for(name, stored dtype)` picks the dtype
    each tensor is read into, on `device`. Nothing is kept: a caller that drops each tensor
    holds one at a time. Every error is a `CheckpointError` that names the file and tensor:
    an unknown name, a wrong shape or non-float dtype (buffers old transformers versions saved
    are skipped), a tensor stored twice, a shard lacking what its index lists, and
    tensors the checkpoint lacks, which names the checkpoint directory. The weight files and
    names are checked when this is called, before anything is read: for safetensors that
    covers every name, shape and missing tensor; `.bin` files are checked as each is loaded,
    and missing tensors after the last one.
    """
    weights = find_weight_files(directory)
    if weights.kind == "safetensors":
        plan = _plan_safetensors(weights, wanted)
        _check_complete(directory, wanted, {e.name for _, keep in plan for e in keep})
        return _read_safetensors(plan, dtype_for, device)
    return _read_bin(directory, weights, wanted, dtype_for, device)


def _check_tensor(
    source: Path,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    wanted: dict,
    seen: dict[str, tuple[Path, str]],
) -> bool:
    """True if the tensor is one we load; raises on a wrong shape, dtype or an unknown name,
    and on a tensor already found (`seen`: our name -> file and stored name), which would
    otherwise silently replace the first copy (shards from two saves, or both `embed_out` and
    `lm_head`)."""
    if _IGNORED.search(name):
        return False
    key = canonical_name(name)
    if key == HEAD and key not in wanted:
        # A tied model's head is its embedding; `read_checkpoint_config` untied the config
        # if this stored copy differs, so here it is equal and redundant.
        _check_duplicate(source, name, key, seen)
        return False
    if key not in wanted:
        raise CheckpointError(
            f"{source}: unexpected tensor {name!r} (not part of a GPT-NeoX model)"
        )
    if tuple(shape) != wanted[key]:
        raise CheckpointError(
            f"{source}: tensor {name!r} has shape {list(shape)}, the config expects "
            f"{list(wanted[key])}"
        )
    if not dtype.is_floating_point:  # every GPT-NeoX weight is floating point
        raise CheckpointError(
            f"{source}: tensor {name!r} has dtype {dtype_name(dtype)}, expected a "
            f"floating-point dtype"
        )
    _check_duplicate(source, name, key, seen)
    return True


def _check_duplicate(source: Path, name: str, key: str, seen: dict[str, tuple[Path, str]]) -> None:
    """Record `name` (our `key`) as found in `source`; raise if it was found before."""
    if key in seen:
        other_file, other_name = seen[key]
        raise CheckpointError(
            f"{source}: tensor {name!r} is stored twice (also as {other_name!r} in "
            f"{other_file}); refusing to guess which copy to load"
        )
    seen[key] = (source, name)


def _check_complete(directory: Path, wanted: dict, names: set[str]) -> None:
    missing = sorted(set(wanted) - {canonical_name(n) for n in names})
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise CheckpointError(f"{directory}: checkpoint is missing tensors: {shown}")


def _plan_safetensors(weights: WeightFiles, wanted: dict) -> list[tuple[Path, list[TensorEntry]]]:
    """Each file with the entries to load, every header validated before any data is read."""
    plan = []
    seen: dict[str, tuple[Path, str]] = {}
    for path in weights.files:
        header = read_header(path)
        weights.check_shard(path, set(header))
        keep = [
            e
            for e in header.values()
            if _check_tensor(path, e.name, e.shape, e.dtype, wanted, seen)
        ]
        plan.append((path, keep))
    return plan


def _read_safetensors(
    plan: list[tuple[Path, list[TensorEntry]]], dtype_for, device
) -> Iterator[tuple[str, torch.Tensor]]:
    for path, keep in plan:
        for entry, tensor in read_tensors(
            path, keep, lambda e: dtype_for(canonical_name(e.name), e.dtype), device
        ):
            yield canonical_name(entry.name), tensor
            del tensor  # before the next read: the caller may have dropped it already


def _target_dtype(stored: torch.dtype, requested: torch.dtype) -> torch.dtype:
    return requested if stored.is_floating_point else stored


def _read_bin(
    directory: Path, weights: WeightFiles, wanted: dict, dtype_for, device
) -> Iterator[tuple[str, torch.Tensor]]:
    seen: dict[str, tuple[Path, str]] = {}
    for path in weights.files:
        state = _torch_load(path)
        weights.check_shard(path, set(state))
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
            if _check_tensor(path, name, tuple(tensor.shape), tensor.dtype, wanted, seen):
                key = canonical_name(name)
                yield key, tensor.to(device=device, dtype=dtype_for(key, tensor.dtype))
        del state
    _check_complete(directory, wanted, set(seen))


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    # mmap keeps the whole file out of memory for zip-format files (torch >= 1.6 saves those);
    # weights_only refuses to unpickle anything but tensors and plain containers.
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refusing to load: the file contains objects other than tensors "
            f"(weights_only=True): {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch file ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


# ---------------------------------------------------------------------------------- save
def save_model(
    model: GPTNeoXForCausalLM,
    directory: str | os.PathLike,
    *,
    tokenizer=None,
    max_shard_bytes: int = SHARD_BYTES,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write an HF checkpoint directory that transformers' `from_pretrained` loads as is.

    config.json + generation_config.json + safetensors (sharded at `max_shard_bytes`, with
    `model.safetensors.index.json` when there is more than one shard) + tokenizer files when
    a `tulu.tokenizer.Tokenizer` is given.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_dtype = parse_dtype(dtype, "dtype") if dtype is not None else None
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "embed_out.weight":
            continue  # tied to embed_in; transformers re-ties on load
        t = tensor.detach()
        if save_dtype is not None and t.is_floating_point():
            t = t.to(save_dtype)
        state[name] = t.contiguous().cpu()
    config = model.config
    stored_dtype = save_dtype or next(iter(state.values())).dtype
    config = config.with_(torch_dtype=dtype_name(stored_dtype))
    config.save(out)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if tokenizer is not None:
        # tulu stops generating at the tokenizer's EOS, and the saved chat template ends each
        # turn with it; transformers' generate stops at this file's. A tokenizer whose EOS is
        # not the config's id (`tulu export --tokenizer`) would run on past every turn there.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key) is not None:
                generation[key] = getattr(tokenizer, key)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    # An earlier save's weights (one file, or shards of another count): only the names this
    # function writes, never a user's model_backup.safetensors beside them.
    ours = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
    for stale in list(out.glob("model*.safetensors")):
        if ours.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    (out / SAFE_INDEX).unlink(missing_ok=True)
    shards = _plan_shards(state, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / SAFE_SINGLE, metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / shard_name, metadata=metadata)
            weight_map.update({name: shard_name for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
