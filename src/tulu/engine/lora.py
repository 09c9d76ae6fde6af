"""Several LoRA adapters served over one base model, unmerged (vLLM's multi-LoRA).

`tulu serve BASE --lora-modules name=DIR ...` keeps one copy of the base weights and lets
each request pick an adapter (or none); a batch mixes requests of different adapters. Each
adapted linear layer gets a forward hook that adds ``scale * (x @ A.T) @ B.T`` to the rows
of the step's tokens that belong to that adapter. The hooks leave the model's modules, names
and state dict untouched, and cost nothing but a Python call when a step uses no adapter.

Why not merge: a merged adapter is a whole model copy per adapter; unmerged, an adapter costs
only its A and B matrices. The price is a little extra compute on adapted rows, and no CUDA
graphs (the rows of each adapter change from step to step), which the engine turns off when
adapters are loaded.

Scope, each refused with a message that names the adapter and points to `tulu export
--merge-lora`, which handles them: LoRA on the embeddings or the LM head, DoRA, trained
biases, ``modules_to_save``, per-module ``rank_pattern``/``alpha_pattern``, and the variants
that compute otherwise (aLoRA, Arrow, KaSA).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tulu.errors import CheckpointError, GenerationError

__all__ = ["LoraAdapters", "UnknownLoraAdapter", "parse_lora_modules"]

_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_MERGE_HINT = "serve it merged instead (tulu export --merge-lora, or tulu serve ADAPTER_DIR)"


class UnknownLoraAdapter(GenerationError):
    """No adapter of that name is loaded. Its own type because a server checks the name
    first and the adapter may be unloaded before the request reaches the engine: the answer
    is then the one an unknown model gets (404), not a bad request."""


@dataclass(frozen=True)
class _Adapter:
    """One adapter's per-layer (A, B * scale) pairs, on the model's device and dtype."""

    name: str
    path: Path
    rank: int
    layers: dict[str, tuple[Tensor, Tensor]]


def _number(
    config: Mapping[str, Any], key: str, default: Any, where: Path, *, positive: bool = True
) -> Any:
    value = config.get(key, default)
    wrong = isinstance(value, bool) or not isinstance(value, int | float)
    if wrong or not math.isfinite(value) or (positive and value <= 0):
        need = "a positive number" if positive else "a finite number"
        raise CheckpointError(f"{where}: {key} must be {need}, got {value!r}")
    return value


def _check_scope(config: Mapping[str, Any], where: Path) -> None:
    """Refuse the LoRA variants this path does not compute (they would be silently wrong)."""
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias": config.get("bias", "none") not in (None, "none"),
        "lora_bias": bool(config.get("lora_bias")),  # a bias on lora_B (PEFT >= 0.14)
        # PEFT's LoRA variants whose tensors look plain but which compute otherwise: aLoRA
        # adapts only the tokens from its invocation sequence on, Arrow routes between
        # adapters, KaSA changes the base weight.
        "alora_invocation_tokens": bool(config.get("alora_invocation_tokens")),
        "arrow_config": bool(config.get("arrow_config")),
        "kasa_config": bool(config.get("kasa_config")),
    }
    found = [key for key, used in unsupported.items() if used]
    if found:
        raise CheckpointError(
            f"{where}: {found[0]} is set, which unmerged LoRA serving does not support; "
            + _MERGE_HINT
        )


def _read_adapter(
    name: str, directory: Path, linears: Mapping[str, nn.Linear], dtype: torch.dtype
) -> _Adapter:
    """Read and check one adapter directory against the model's linear layers."""
    from tulu.train.lora import ADAPTER_CONFIG, read_adapter_config

    config = read_adapter_config(directory)
    where = directory / ADAPTER_CONFIG
    _check_scope(config, where)
    rank = _number(config, "r", 8, where)
    # PEFT takes any alpha: a negative one subtracts an adapter, zero switches it off.
    alpha = _number(config, "lora_alpha", 8, where, positive=False)
    if not isinstance(rank, int):
        raise CheckpointError(f"{where}: r must be an integer, got {rank!r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights = _Weights(directory)
    halves = _check_names(directory, weights.shapes, linears)
    for layer, pair in halves.items():
        _check_shapes(directory, layer, pair, weights.shapes, linears[layer], rank)
    # Only now, every name and shape checked against the model, are the tensors read.
    layers = {
        layer: _to_model(
            weights.read(pair["A"]), weights.read(pair["B"]), linears[layer], scale, dtype
        )
        for layer, pair in sorted(halves.items())
    }
    return _Adapter(name, directory, rank, layers)


class _Weights:
    """An adapter's weights file (PEFT's safetensors, else its weights-only pickle), open:
    the tensor names and shapes come first, from the safetensors header or a memory map of
    the pickle, and a tensor is read only when asked for, so a wrong file (another base,
    a whole model) is refused before its tensors cost any memory. Read here so that serving
    adapters does not need PEFT installed."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        from tulu.train.lora import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN

        self.directory = directory
        with self._reading():
            if (directory / ADAPTER_WEIGHTS).is_file():
                handle = safe_open(directory / ADAPTER_WEIGHTS, framework="pt", device="cpu")
                self.shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
                self._get = handle.get_tensor
                return
            path = directory / ADAPTER_WEIGHTS_BIN
            # Only the zip format (torch.save's since torch 1.6) can be memory-mapped.
            saved = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        named = isinstance(saved, dict) and all(isinstance(k, str) for k in saved)
        if not named or not all(isinstance(t, Tensor) for t in saved.values()):
            raise CheckpointError(
                f"{directory}: the adapter weights are not a dict of named tensors"
            )
        self.shapes = {k: tuple(t.shape) for k, t in saved.items()}
        self._get = saved.__getitem__

    def read(self, key: str) -> Tensor:
        with self._reading():
            return self._get(key)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except Exception as err:  # noqa: BLE001 - safetensors and pickle raise their own types
            raise CheckpointError(
                f"{self.directory}: unreadable adapter weights ({type(err).__name__}: {err})"
            ) from None


def _split_key(key: str) -> tuple[str | None, str]:
    """``base_model.model.<layer>.lora_A.weight`` -> (``<layer>``, "A"); (None, "") otherwise."""
    if not key.startswith(_PREFIX):
        return None, ""
    for suffix, half in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[len(_PREFIX) : -len(suffix)], half
    return None, ""


def _check_names(
    directory: Path, shapes: Mapping[str, tuple[int, ...]], linears: Mapping[str, nn.Linear]
) -> dict[str, dict[str, str]]:
    """{layer: {"A": tensor name, "B": tensor name}}, each layer one of the model's."""
    halves: dict[str, dict[str, str]] = {}
    for key in shapes:
        # transformers 5 calls the LM head lm_head, GPT-NeoX (and tulu) embed_out; PEFT on
        # transformers 5 saves the adapted head's base weight beside its A and B.
        if key.startswith(tuple(_PREFIX + head + "." for head in ("embed_out", "lm_head"))):
            raise CheckpointError(
                f"{directory}: tensor {key} adapts the LM head, which unmerged LoRA serving "
                f"does not support; {_MERGE_HINT}"
            )
        layer, half = _split_key(key)
        if layer is None:
            raise CheckpointError(
                f"{directory}: tensor {key} is not a LoRA A/B matrix of a linear layer "
                f"(embedding LoRA, DoRA or saved modules); {_MERGE_HINT}"
            )
        if layer not in linears:
            raise CheckpointError(
                f"{directory}: tensor {key} adapts no linear layer of the model; is the base "
                "the one it was trained on?"
            )
        halves.setdefault(layer, {})[half] = key
    if not halves:
        raise CheckpointError(f"{directory}: the adapter holds no LoRA tensors")
    return halves


def _check_shapes(
    directory: Path,
    layer: str,
    pair: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    linear: nn.Linear,
    rank: int,
) -> None:
    for half in ("A", "B"):
        if half not in pair:
            raise CheckpointError(f"{directory}: {layer} has no lora_{half} tensor")
    expected = {"A": (rank, linear.in_features), "B": (linear.out_features, rank)}
    for half, key in sorted(pair.items()):
        if shapes[key] != expected[half]:
            raise CheckpointError(
                f"{directory}: {key} has shape {list(shapes[key])}, expected "
                f"{list(expected[half])} (r={rank} and the layer's size); is the base the one "
                "it was trained on?"
            )


def _to_model(
    a: Tensor, b: Tensor, linear: nn.Linear, scale: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(A, B * scale) on `linear`'s device in `dtype`; copies, never views of the file."""
    device = linear.weight.device
    a = a.to(device=device, dtype=dtype, copy=True).contiguous()
    b = (b.to(torch.float32) * scale).to(device=device, dtype=dtype).contiguous()
    return a, b


def parse_lora_modules(specs: Sequence[str], *, reserved: str | None = None) -> dict[str, str]:
    """``--lora-modules NAME=DIR ...`` (`tulu serve`, `tulu generate`) as {name: directory},
    checked before anything loads. vLLM's JSON form, ``{"name": NAME, "path": DIR}``, is
    taken too, so that its command lines work unchanged (its ``base_model_name`` is accepted
    and not used: an adapter's parent is always the served base).

    A name is what requests put in ``model`` (OpenAI), ``adapter_id`` (TGI) or a record's
    ``lora`` field, so it must be unique and differ from `reserved` (the base model's name).
    """
    modules: dict[str, str] = {}
    for spec in specs:
        name, directory = _split_module(spec)
        if name == reserved:
            raise CheckpointError(
                f"--lora-modules: {name!r} is the base model's served name; give the adapter "
                "another name"
            )
        if name in modules:
            raise CheckpointError(f"--lora-modules: the name {name!r} is given twice")
        if not _is_file(Path(directory).expanduser() / "adapter_config.json"):
            raise CheckpointError(
                f"--lora-modules {name}: {directory} is not a LoRA adapter directory (no "
                "adapter_config.json)"
            )
        modules[name] = str(Path(directory).expanduser())
    return modules


_JSON_MODULE_KEYS = ("name", "path", "base_model_name")


def _split_module(spec: str) -> tuple[str, str]:
    """(name, directory) of one ``--lora-modules`` value: NAME=DIR or vLLM's JSON object."""
    if not spec.lstrip().startswith("{"):
        name, sep, directory = spec.partition("=")
        name, directory = name.strip(), directory.strip()
        if not sep or not name or not directory:
            raise CheckpointError(
                f"--lora-modules: expected NAME=DIR (or a JSON object), got {spec!r}"
            )
        return name, directory
    try:
        module = json.loads(spec)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"--lora-modules: {spec!r} is not valid JSON ({err})") from None
    if not isinstance(module, dict):
        raise CheckpointError(f"--lora-modules: {spec!r} is not a JSON object")
    unknown = sorted(set(module) - set(_JSON_MODULE_KEYS))
    if unknown:
        raise CheckpointError(
            f"--lora-modules: {spec!r}: unknown key {unknown[0]!r}; the keys are "
            + ", ".join(_JSON_MODULE_KEYS)
        )
    for key in ("name", "path"):
        if not isinstance(module.get(key), str) or not module[key].strip():
            raise CheckpointError(f"--lora-modules: {spec!r}: {key!r} must be a non-empty string")
    return module["name"].strip(), module["path"].strip()


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False where the path cannot even be looked at (a name too long,
    a directory without permission), which `Path.is_file` raises for."""
    try:
        return path.is_file()
    except OSError:
        return False


class LoraAdapters:
    """Named LoRA adapters hooked onto `model`'s linear layers; a request picks one by name.

    Before each forward pass the engine calls `use` with one adapter slot per input row
    (0 = the base model, unchanged), and clears them after it. The adapters given here are
    all read and checked before any hook is added, so a bad one leaves the model as it was.
    More can be added later (`read` then `install`) and removed (`unload`, then `forget` when
    its last request is done), as vLLM's runtime LoRA updates; a slot is never reused, so a
    name loaded again gets fresh prefix-cache keys.
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, str | os.PathLike[str]]) -> None:
        # The LM head runs outside the hidden-state pass, on other rows (the sampled ones).
        self._linears = {
            n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "embed_out"
        }
        self._dtype = next(model.parameters()).dtype
        if not isinstance(adapters, Mapping):
            raise CheckpointError(
                "lora_modules must map adapter names to directories, got " + type(adapters).__name__
            )
        self._adapters: dict[int, _Adapter] = {}
        self._slot_of: dict[str, int] = {}
        self._next_slot = 1
        self._groups: list[tuple[int, Tensor]] = []
        self._hooks: dict[str, RemovableHandle] = {}
        # The hooks hold only a weak reference to this object, so that dropping it (its
        # engine) takes them off the model, with the adapters' memory.
        weakref.finalize(self, _remove_hooks, self._hooks)
        self.loaded: dict[str, str] = {}  # name -> directory; replaced whole on each change
        read: dict[str, _Adapter] = {}
        for name, directory in adapters.items():
            if name in read:
                raise CheckpointError(f"LoRA adapter name {name!r} is given twice")
            read[name] = self.read(name, directory)
        for adapter in read.values():
            self.install(adapter)

    def read(self, name: str, directory: str | os.PathLike[str]) -> _Adapter:
        """Read and check adapter `name` from `directory` without changing anything (so it
        may run on another thread than the one stepping the engine)."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise CheckpointError(
                f"LoRA adapter name {name!r}: must be a non-empty string without leading "
                "or trailing spaces"
            )
        if not isinstance(directory, str | os.PathLike):
            raise CheckpointError(
                f"LoRA adapter {name!r}: its directory must be a path, got "
                + type(directory).__name__
            )
        if name in self.loaded:
            raise CheckpointError(f"a LoRA adapter named {name!r} is already loaded")
        try:
            return _read_adapter(name, Path(directory), self._linears, self._dtype)
        except OSError as err:  # unreadable, name too long, I/O error: the path is at fault
            raise CheckpointError(
                f"LoRA adapter {name!r}: cannot read {directory} ({err.strerror or err})"
            ) from None

    def install(self, adapter: _Adapter) -> int:
        """Make a `read` adapter available to requests; its slot."""
        if adapter.name in self._slot_of:
            raise CheckpointError(f"a LoRA adapter named {adapter.name!r} is already loaded")
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        self._adapters[slot] = adapter
        self._slot_of[adapter.name] = slot
        for layer in sorted(adapter.layers):
            if layer not in self._hooks:
                hook = _hook(weakref.ref(self), layer)
                self._hooks[layer] = self._linears[layer].register_forward_hook(hook)
        self._publish()
        return slot

    def unload(self, name: str) -> int:
        """Unload adapter `name`: new requests can no longer name it (and the name may be
        loaded again), while the requests already running with it keep its weights until the
        caller `forget`s its slot, which it returns (as vLLM lets them finish)."""
        slot = self.slot(name)
        del self._slot_of[name]
        self._publish()
        return slot

    def forget(self, slot: int) -> None:
        """Free the weights of an unloaded adapter's slot, once no request runs with it."""
        if slot in self._slot_of.values():
            raise ValueError(f"LoRA slot {slot} is still loaded")
        self._adapters.pop(slot, None)

    def _publish(self) -> None:
        # A new dict, never one changed in place: other threads (the server's routes) read it.
        self.loaded = {n: str(self._adapters[s].path) for n, s in self._slot_of.items()}

    @property
    def names(self) -> list[str]:
        return list(self.loaded)

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (0 for None: the base model)."""
        if name is None:
            return 0
        if name not in self._slot_of:
            known = ", ".join(map(repr, self.names)) or "none are loaded"
            raise UnknownLoraAdapter(f"lora: no adapter named {name!r} (loaded: {known})")
        return self._slot_of[name]

    def salt(self, slot: int) -> bytes:
        """The seed of the block hashes of `slot`'s sequences: a fixed-size digest (the name's
        own bytes would run into the first block's tokens: "s" + "25,3" is "s2" + "5,3"), of
        the slot too, so that a name unloaded and loaded again never meets its old blocks."""
        name = self._adapters[slot].name
        return hashlib.blake2b(f"lora:{slot}:{name}".encode(), digest_size=16).digest()

    def use(self, slots: Sequence[int], device: torch.device | str) -> None:
        """Set the adapter of each row of the next forward pass's flattened input."""
        rows: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot:
                rows.setdefault(slot, []).append(row)
        self._groups = [
            (slot, torch.tensor(indices, device=device)) for slot, indices in rows.items()
        ]

    def remove(self) -> None:
        """Take the hooks off the model (it computes as the plain base again) and forget the
        adapters: a request naming one is then refused, where it would have run on the bare
        base (and on blocks its adapter cached). No request may still run with an adapter."""
        _remove_hooks(self._hooks)
        self._groups = []
        self._adapters.clear()
        self._slot_of.clear()
        self._publish()


def _remove_hooks(hooks: dict[str, RemovableHandle]) -> None:
    for hook in hooks.values():
        hook.remove()
    hooks.clear()


def _hook(ref: weakref.ref[LoraAdapters], layer: str):
    """The forward hook of `layer`: adds each adapter's update to its rows. It reaches the
    adapters through a weak reference: a hook on the model must not keep them alive."""

    def add_lora(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        adapters = ref()
        if adapters is None or not adapters._groups:
            return output
        x = args[0].reshape(-1, args[0].shape[-1])
        flat = output.view(-1, output.shape[-1])  # a Linear output: contiguous
        for slot, rows in adapters._groups:
            adapter = adapters._adapters.get(slot)
            pair = adapter.layers.get(layer) if adapter is not None else None
            if pair is not None:
                a, b = pair
                flat.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
        return output

    return add_lora
