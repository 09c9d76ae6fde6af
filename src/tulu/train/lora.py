"""LoRA on our GPTNeoXForCausalLM through PEFT, with adapters that Hugging Face tools load.

PEFT wraps any `nn.Module`; from ours it needs only what the model already has: the named
linear layers (transformers' names, so target modules are the same strings and adapter keys
the same tensor names) and a `config` whose `to_dict()` gives ``model_type``, which
`NeoXConfig.to_dict()` does. We wrap with ``task_type=None`` (a plain `PeftModel`): PEFT's
causal-LM wrapper would call transformers' generation hooks (`prepare_inputs_for_generation`)
and forward keyword arguments (`inputs_embeds`, `return_dict`, ...) that our model does not
take. The saved `adapter_config.json` says ``task_type: CAUSAL_LM`` all the same, so that
`peft.PeftModel.from_pretrained(transformers_model, directory)` (and `AutoPeftModelForCausalLM`)
give the usual causal-LM wrapper, with `generate`, on transformers' GPT-NeoX.

PEFT creates the adapters in float32 whatever the base dtype (``autocast_adapter_dtype``) and
casts each adapted layer's input to the adapters' dtype; the trainer then stores and computes
them like any trainable parameter (`tulu.train.distributed.prepare_model`). Under FSDP the
base is still on the meta device when the adapters are added (its checkpoint is read into
the shards later); `apply_lora` shows PEFT zero-memory CPU stand-ins of the base weights so
that the adapters get their usual initial values.

Gradient checkpointing needs nothing special: the model checkpoints each layer with
``use_reentrant=False``, which back-propagates into adapters inside a checkpointed layer
even though the layer's input (frozen embeddings) does not require grad. Set the flag on the
base model (`peft_model.get_base_model().gradient_checkpointing = True`).

One naming caveat: our LM head is ``embed_out``; transformers 5 calls it ``lm_head``.
`save_adapter` writes an adapter that adapts the head as PEFT on transformers 5 writes it,
naming the head ``lm_head`` in its config's module fields and its tensor names (transformers
4, which calls it ``embed_out``, would leave the head unadapted); `load_adapter` renames it
back to ``embed_out``, in those adapters and in any trained on transformers 5, and still
loads the adapters that older versions of tulu saved under ``embed_out``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tulu.errors import CheckpointError, ConfigError
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.train.config import LoraConfig

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapts_head",
    "apply_lora",
    "is_adapter_dir",
    "load_adapter",
    "lora_targets",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
SAVED_TASK_TYPE = "CAUSAL_LM"

#: transformers 5 calls GPT-NeoX's LM head ``lm_head``; its checkpoints, transformers 4 and we
#: call it ``embed_out``. PEFT applies the mapping to tensor names without the
#: ``base_model.model.`` prefix.
_HEAD_KEY_MAPPING = {r"^lm_head\.": "embed_out."}
_TRANSFORMERS5_HEAD = re.compile(r"\blm_head\b")
_TRANSFORMERS5_HEAD_KEY = "base_model.model.lm_head."
_OUR_HEAD = re.compile(r"\bembed_out\b")
_OUR_HEAD_KEY = "base_model.model.embed_out."
#: The LoraConfig fields that hold module names (or regular expressions over them).
_MODULE_NAME_FIELDS = (
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
)


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ConfigError(
            f"lora: LoRA needs the peft package (pip install 'tulu[train]'): {err}"
        ) from None
    return peft


def lora_targets(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Names of the linear layers that `target_modules` selects, by PEFT's rule: a module
    matches a target when its name is the target or ends with ``.`` + target (so ``dense``
    is the attention output projection, not ``dense_h_to_4h``)."""
    targets = list(target_modules)
    matched = []
    for name, module in model.named_modules():
        if not name or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"lora.target_modules: {name!r} is a {type(module).__name__}, not a linear "
                "layer (LoRA adapts query_key_value, dense, dense_h_to_4h, dense_4h_to_h, "
                "embed_out)"
            )
        matched.append(name)
    unused = [t for t in targets if not any(n == t or n.endswith("." + t) for n in matched)]
    if unused:
        raise ConfigError(
            f"lora.target_modules: {', '.join(map(repr, unused))} names no layer of the model "
            "(linear layers: query_key_value, dense, dense_h_to_4h, dense_4h_to_h, embed_out)"
        )
    return matched


def _base_path(path: str | os.PathLike | None) -> str | None:
    """An existing local directory becomes absolute (the adapter works from any directory);
    anything else (a hub id) is kept as written."""
    if path is None:
        return None
    local = Path(path).expanduser()
    return str(local.resolve()) if local.is_dir() else str(path)


def apply_lora(
    model: GPTNeoXForCausalLM,
    config: LoraConfig,
    *,
    base_model_path: str | os.PathLike | None = None,
    base_model_revision: str | None = None,
) -> Any:
    """Wrap `model` in a `peft.PeftModel` with LoRA adapters on `config.target_modules`.

    The base weights are frozen (only ``lora_A``/``lora_B`` train); the model is modified in
    place. `base_model_path` (the checkpoint the model was loaded from) and, for a hub id,
    `base_model_revision` (the revision it was loaded at) are written to adapter_config.json
    as ``base_model_name_or_path`` and ``revision`` when the adapter is saved.

    A base on the meta device (the trainer's FSDP load, which fills it in after sharding) gets
    adapters with real values all the same: PEFT sees zero-memory CPU placeholders of the
    base weights (`_cpu_placeholders`), so it creates and initialises the adapters on the CPU
    exactly as on a loaded model, drawing the same random numbers; the base goes back to the
    meta device afterwards. (PEFT would otherwise move the adapters to the base's device,
    meta, and their initial values would be lost.)
    """
    peft = _peft()
    lora_targets(model, config.target_modules)
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type=None,
    )
    try:
        with _cpu_placeholders(model):
            peft_model = peft.get_peft_model(model, peft_config)
    except ValueError as err:
        raise ConfigError(f"lora: PEFT refused the configuration: {err}") from None
    # Set afterwards: get_peft_model replaces it with the model's `name_or_path` attribute
    # (a transformers convention we do not carry), warning that it did.
    _active_config(peft_model).base_model_name_or_path = _base_path(base_model_path)
    _active_config(peft_model).revision = base_model_revision
    return peft_model


@contextmanager
def _cpu_placeholders(model: nn.Module) -> Iterator[None]:
    """Within the block, every parameter of `model` on the meta device is a CPU tensor of the
    same shape and dtype that occupies no memory (one zero, expanded); afterwards they are on
    the meta device again, with the requires_grad PEFT gave them. Tied parameters stay tied.

    PEFT's default LoRA initialisation reads only the layers' shapes, never the base weights.
    """
    placeholders = _replace_parameters(
        model, lambda p: p.is_meta, lambda p: torch.zeros((), dtype=p.dtype).expand(p.shape)
    )
    try:
        yield
    finally:
        ids = {id(p) for p in placeholders}
        _replace_parameters(
            model,
            lambda p: id(p) in ids,
            lambda p: torch.empty(p.shape, dtype=p.dtype, device="meta"),
        )


def _replace_parameters(
    model: nn.Module,
    select: Callable[[nn.Parameter], bool],
    make: Callable[[nn.Parameter], torch.Tensor],
) -> list[nn.Parameter]:
    """Replace each selected parameter, wherever it is registered, by `make(p)` as a
    parameter with the same requires_grad; returns the new parameters. One replacement per
    parameter object, so ties hold."""
    memo: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (old, new): keeps old alive
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or (id(p) not in memo and not select(p)):
                continue
            if id(p) not in memo:
                memo[id(p)] = (p, nn.Parameter(make(p), requires_grad=p.requires_grad))
            module._parameters[name] = memo[id(p)][1]
    return [new for _, new in memo.values()]


def _active_config(peft_model: Any) -> Any:
    name = peft_model.active_adapter
    return peft_model.peft_config[name]


def save_adapter(
    peft_model: Any,
    directory: str | os.PathLike,
    *,
    base_model_path: str | os.PathLike | None = None,
    base_model_revision: str | None = None,
) -> Path:
    """Write the active adapter in PEFT's format (adapter_config.json +
    adapter_model.safetensors) so that `peft.PeftModel.from_pretrained` loads it onto
    transformers' GPTNeoXForCausalLM as well as onto ours (`load_adapter`). A given
    `base_model_path` replaces the base recorded by `apply_lora`, with its
    `base_model_revision`. The LM head is named as transformers 5 names it
    (`_name_head_as_transformers_5`)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = _active_config(peft_model)
    saved = (config.task_type, config.base_model_name_or_path, config.revision)
    config.task_type = SAVED_TASK_TYPE
    if base_model_path is not None:
        config.base_model_name_or_path = _base_path(base_model_path)
        config.revision = base_model_revision
    try:
        # save_embedding_layers="auto" would compare vocab sizes through the config class's
        # `from_pretrained` (a transformers API) and may query the hub; we never resize or
        # adapt embeddings, so there is nothing to save beyond the adapters.
        peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    finally:
        config.task_type, config.base_model_name_or_path, config.revision = saved
    if not (out / ADAPTER_WEIGHTS).is_file():  # pragma: no cover - PEFT contract
        raise CheckpointError(f"{out}: PEFT did not write {ADAPTER_WEIGHTS}")
    _name_head_as_transformers_5(out)
    return out


def _name_head_as_transformers_5(directory: Path) -> None:
    """Rename our LM head ``embed_out`` to transformers 5's ``lm_head`` in the adapter PEFT
    has just written to `directory`: in adapter_config.json's module fields and in the tensor
    names. PEFT on transformers 5 matches no layer named ``embed_out`` and ignores (with at
    most a warning) the tensors of one, so the head's adapter would be silently lost there.

    PEFT on transformers 5 also saves the base weight of an adapted ``lm_head``, in case it
    was resized; we never resize it, so the adapter stays without that full-size copy.
    """
    config_path = directory / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    fields = {f: config[f] for f in _MODULE_NAME_FIELDS if f in config}
    renamed = {f: _head_name(value, _OUR_HEAD, "lm_head") for f, value in fields.items()}
    weights_path = directory / ADAPTER_WEIGHTS
    with safe_open(weights_path, framework="pt") as handle:  # the names only, no tensor data
        names = list(handle.keys())
    if renamed == fields and not any(name.startswith(_OUR_HEAD_KEY) for name in names):
        return  # the usual adapter, of the transformer layers only
    tensors = load_file(weights_path)
    config.update(renamed)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    tensors = {_transformers5_head_key(key): tensor for key, tensor in tensors.items()}
    partial = weights_path.with_name(weights_path.name + ".partial")
    save_file(tensors, partial, metadata={"format": "pt"})  # PEFT's metadata
    partial.replace(weights_path)


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of `directory`, checked to be a LoRA adapter with its weights."""
    path = Path(directory)
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{path}: {ADAPTER_CONFIG} not found (is this an adapter directory?)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters "
            "('LORA') are supported"
        )
    if not (path / ADAPTER_WEIGHTS).is_file() and not (path / ADAPTER_WEIGHTS_BIN).is_file():
        raise CheckpointError(
            f"{path}: adapter weights not found (looked for {ADAPTER_WEIGHTS}, "
            f"{ADAPTER_WEIGHTS_BIN})"
        )
    return config


def adapts_head(directory: str | os.PathLike) -> bool:
    """Whether merging the adapter in `directory` changes the LM head: whether it holds a
    tensor of it (LoRA on it, or its trained copy from ``modules_to_save``) under our name
    ``embed_out`` or transformers 5's ``lm_head``. Only the tensor names are read (the
    safetensors header, or a memory map of the pickle), for `tulu info`."""
    path = Path(directory)
    read_adapter_config(path)
    try:
        if (path / ADAPTER_WEIGHTS).is_file():
            with safe_open(path / ADAPTER_WEIGHTS, framework="pt") as handle:
                names = list(handle.keys())
        else:
            pickle = path / ADAPTER_WEIGHTS_BIN
            mmap = zipfile.is_zipfile(pickle)  # only torch.save's zip format can be mapped
            names = list(torch.load(pickle, map_location="cpu", weights_only=True, mmap=mmap))
    except Exception as err:  # noqa: BLE001 - safetensors and pickle raise their own types
        raise CheckpointError(
            f"{path}: unreadable adapter weights ({type(err).__name__}: {err})"
        ) from None
    heads = ("base_model.model.embed_out.", "base_model.model.lm_head.")
    return any(isinstance(name, str) and name.startswith(heads) for name in names)


def adapter_base(directory: str | os.PathLike) -> Path:
    """The base checkpoint of the adapter in `directory`, from its adapter_config.json's
    ``base_model_name_or_path``: as written (a path from the current directory, or a hub id),
    or a path relative to the adapter directory.

    A hub id is fetched at PEFT's ``revision`` field when set, as `AutoPeftModelForCausalLM`
    does: an adapter trained on an intermediate Pythia checkpoint (``revision: step3000``)
    merged into the ``main`` weights would be a different model, with no error.
    """
    adapter_dir = Path(directory)
    adapter_config = read_adapter_config(adapter_dir)
    base = adapter_config.get("base_model_name_or_path")
    revision = adapter_config.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise CheckpointError(
            f"{adapter_dir / ADAPTER_CONFIG}: revision must be a string (a branch, tag or "
            f"commit of the base model), got {revision!r}"
        )
    if not base:
        raise CheckpointError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is empty; it must name "
            "the base checkpoint the adapter was trained on"
        )
    base = str(base)
    beside = adapter_dir / base
    from tulu.model.checkpoint import refuse_local_revision, resolve_checkpoint

    fields = "base_model_name_or_path" + (f" (revision {revision!r})" if revision else "")
    try:
        if (
            not Path(base).expanduser().is_dir()
            and not Path(base).is_absolute()
            and beside.is_dir()
        ):
            refuse_local_revision(beside, revision or None)
            return beside
        return resolve_checkpoint(base, revision or None)
    except CheckpointError as err:  # e.g. an absolute path from the machine it was trained on
        raise CheckpointError(
            f"{adapter_dir / ADAPTER_CONFIG}: {fields}: {err}; set it to the base checkpoint "
            "the adapter was trained on"
        ) from None


def load_adapter(
    model: GPTNeoXForCausalLM, directory: str | os.PathLike, *, is_trainable: bool = False
) -> Any:
    """`model` wrapped in a `PeftModel` with the adapter saved in `directory` (ours, or one
    trained with transformers' GPT-NeoX: the module names are the same, but for the LM head
    that transformers 5 calls ``lm_head``, renamed here)."""
    peft = _peft()
    read_adapter_config(directory)
    try:
        config = peft.LoraConfig.from_pretrained(str(directory))
    except (TypeError, ValueError) as err:  # PEFT's checks of the values (r: "four", ...)
        raise CheckpointError(
            f"{Path(directory) / ADAPTER_CONFIG}: PEFT cannot read this LoRA config ({err})"
        ) from None
    config.task_type = None  # our model takes no HF generation hooks (see the module doc)
    for field in _MODULE_NAME_FIELDS:
        if hasattr(config, field):  # exclude_modules is new in PEFT 0.14
            value = _head_name(getattr(config, field), _TRANSFORMERS5_HEAD, "embed_out")
            setattr(config, field, value)
    try:
        saved = peft.utils.load_peft_weights(str(directory), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors and pickle raise their own types
        raise CheckpointError(
            f"{directory}: unreadable adapter weights ({type(err).__name__}: {err})"
        ) from None
    renaming = _head_key_mapping(peft, saved, directory)
    saved = {_our_head_key(key): tensor for key, tensor in saved.items()}
    _drop_unmatched_head_target(config, saved, directory)
    try:
        peft_model = peft.PeftModel.from_pretrained(
            model, str(directory), config=config, is_trainable=is_trainable, **renaming
        )
    except (TypeError, re.error) as err:  # r: "four", or a target_modules regex: used here
        raise CheckpointError(
            f"{Path(directory) / ADAPTER_CONFIG}: PEFT cannot use this LoRA config ({err})"
        ) from None
    except (ValueError, RuntimeError, KeyError) as err:
        # load_state_dict's message is a header line, then one line per mismatched tensor.
        detail = " ".join(line.strip() for line in str(err).splitlines()[:2])
        raise CheckpointError(
            f"{directory}: the adapter does not fit the model: {detail}"
        ) from None
    _check_adapter_tensors(peft_model, saved, directory)
    return peft_model


def _head_name(value: Any, head: re.Pattern[str], new: str) -> Any:
    """`value` (a module name, a regular expression, or a list, set or dict of them) with the
    LM head's name that `head` matches (ours or transformers 5's) replaced by `new`."""
    if isinstance(value, str):
        return head.sub(new, value)
    if isinstance(value, list | tuple | set):
        return type(value)(_head_name(v, head, new) for v in value)
    if isinstance(value, dict):
        return {_head_name(k, head, new): v for k, v in value.items()}
    return value


def _our_head_key(key: str) -> str:
    """A saved tensor's name as `_HEAD_KEY_MAPPING` has PEFT load it."""
    if key.startswith(_TRANSFORMERS5_HEAD_KEY):
        return "base_model.model.embed_out." + key[len(_TRANSFORMERS5_HEAD_KEY) :]
    return key


def _transformers5_head_key(key: str) -> str:
    """A saved tensor's name as PEFT on transformers 5 names it (`_our_head_key` reversed)."""
    if key.startswith(_OUR_HEAD_KEY):
        return _TRANSFORMERS5_HEAD_KEY + key[len(_OUR_HEAD_KEY) :]
    return key


def _head_key_mapping(peft: Any, saved: dict[str, Any], directory: Any) -> dict[str, Any]:
    """The keyword argument that has PEFT load an adapter's ``lm_head`` tensors into our
    ``embed_out`` (none when it has no such tensor). PEFT takes it from version 0.16 on; an
    older one would ignore it and leave the head's LoRA at its fresh values."""
    if not any(key.startswith(_TRANSFORMERS5_HEAD_KEY) for key in saved):
        return {}
    if "key_mapping" not in inspect.signature(peft.PeftModel.from_pretrained).parameters:
        raise CheckpointError(
            f"{directory}: the adapter's tensors name the LM head lm_head (transformers 5's "
            f"name; ours is embed_out): loading it needs peft >= 0.16, this is peft "
            f"{peft.__version__} (pip install -U 'peft>=0.16')"
        )
    return {"key_mapping": _HEAD_KEY_MAPPING}


def _drop_unmatched_head_target(config: Any, saved: dict[str, Any], directory: Any) -> None:
    """Leave the LM head unadapted when `target_modules` names ``embed_out`` but the adapter
    holds no tensor of it: PEFT on transformers 5, whose head is ``lm_head``, matched no
    layer of that name and trained the adapter without it. Adapted here, the head would get
    fresh LoRA weights that the adapter does not have (`_check_adapter_tensors` refuses)."""
    targets = config.target_modules
    if not isinstance(targets, set) or "embed_out" not in targets or len(targets) == 1:
        return
    if any(key.startswith("base_model.model.embed_out.") for key in saved):
        return
    config.target_modules = targets - {"embed_out"}
    logger.warning(
        "%s: target_modules names embed_out but the adapter holds no tensor of it (PEFT on "
        "transformers 5 matched no such layer); the LM head stays unadapted, as it was trained",
        Path(directory) / ADAPTER_CONFIG,
    )


def _check_adapter_tensors(peft_model: Any, saved: dict[str, Any], directory: Any) -> None:
    """PEFT only warns about adapter tensors that match no layer of the model (an adapter of
    a deeper base: they are dropped) and leaves layers without saved tensors at their fresh
    values (a shallower base); either way the result is not the trained adapter."""
    from peft.utils import get_peft_model_state_dict

    expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    # PEFT also saves the base weights of the adapted layers it takes for embeddings (those
    # named lm_head or embed_tokens) and loads them back into those layers.
    extra = sorted(set(saved) - set(expected) - set(peft_model.state_dict()))
    if extra:
        raise CheckpointError(
            f"{directory}: the adapter does not fit the model: it has tensor {extra[0]}, which "
            f"matches no layer of the model ({len(extra)} such tensor(s)); is the base the one "
            "it was trained on?"
        )
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise CheckpointError(
            f"{directory}: the adapter does not fit the model: tensor {missing[0]} is not in "
            f"the adapter ({len(missing)} such tensor(s)); is the base the one it was trained on?"
        )


def merge_lora(peft_model: Any) -> GPTNeoXForCausalLM:
    """Fold the adapters into the base weights (W + scale * B @ A) and return the plain model.

    Works in place: the wrapper is spent and the base model comes back with its LoRA layers
    replaced by ordinary (merged) linear layers, every parameter trainable again, as a freshly
    built model would be.
    """
    _untie_adapted_head(peft_model.get_base_model())
    try:
        merged = peft_model.merge_and_unload()
    except (NotImplementedError, ValueError) as err:  # e.g. aLoRA: "does not support merging"
        raise CheckpointError(f"PEFT cannot merge this adapter: {err}") from None
    if not isinstance(merged, GPTNeoXForCausalLM):
        raise ConfigError(
            f"merge_lora: expected a GPTNeoXForCausalLM under the adapter, got "
            f"{type(merged).__name__}"
        )
    merged.requires_grad_(True)
    return merged


def _untie_adapted_head(model: nn.Module) -> None:
    """Give an adapted LM head of a tied model its own weight, and the config
    ``tie_word_embeddings: false``, before merging.

    Unmerged, a LoRA on ``embed_out`` changes only the head: the input embedding is the shared
    base weight. Merged into that shared weight, it would change the input embedding as well.
    A head in ``modules_to_save`` is merged as PEFT's trained copy of it; tied by the config
    again on saving, it would be dropped for the input embedding.
    """
    head = model.embed_out
    # PEFT wraps an adapted head (LoRA, modules_to_save) in a module of its own.
    if not model.config.tie_word_embeddings or isinstance(head, nn.Linear):
        return
    if hasattr(head, "get_base_layer"):  # LoRA: merged into its base layer's weight
        layer = head.get_base_layer()
        weight = layer.weight
        layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    # modules_to_save: the merged head is PEFT's trained copy, with a weight of its own
    model.config = model.config.with_(tie_word_embeddings=False)
