"""The training configuration: typed sections read from YAML, overridable from the command line.

``tulu train CONFIG.yaml optim.lr=1e-5 data.max_seq_length=1024`` reads the file, applies the
``key=value`` overrides (values parsed as YAML scalars), and checks everything before any work
starts: an unknown or misspelt key is an error that lists the valid keys of its section, and a
value of the wrong type or out of range names its dotted key. The dataclasses below are the
single source of truth for the keys; docs/training.md describes each one.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tulu.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "load_train_config",
    "parse_train_config",
]


@dataclass
class ModelConfig:
    """What to fine-tune: a checkpoint, or a fresh model for demos and tests.

    `path` is an HF checkpoint directory or hub id. Without a path, `preset` (a Pythia size,
    e.g. ``pythia-70m``) and/or `config` (a dict of `NeoXConfig` fields) build a randomly
    initialised model with seed `init_seed`; that is how ``configs/tiny-demo.yaml`` trains on a
    CPU in a minute.
    """

    path: str | None = None
    revision: str | None = None
    preset: str | None = None
    config: dict[str, Any] | None = None
    init_seed: int = 0
    tokenizer: str | None = None  # directory, tokenizer.json or hub id; default: the checkpoint's
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: bf16 GPU, fp32 CPU
    gradient_checkpointing: bool = True


@dataclass
class DataConfig:
    """Records files (``tulu data``) and how they are batched."""

    train: str = ""
    validation: str | None = None
    max_seq_length: int = 2048
    batching: Literal["padding", "packing"] = "padding"
    padding_order: Literal["random", "sorted"] = "random"
    num_workers: int | None = None  # tokenization processes (default: all cores)
    cache_dir: str | None = None
    skip_bad: bool = False


@dataclass
class OptimConfig:
    """The optimisation recipe. Batch sizes count rows of the batch tensor: one example each
    with padding, several examples per row with packing."""

    optimizer: Literal["adamw", "adamw_bf16", "adamw_8bit"] = "adamw"
    lr: float = 2e-5
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None  # None: no clipping (the paper's recipe)
    epochs: int = 2
    max_steps: int | None = None  # stop early after this many optimizer steps
    micro_batch_size: int = 1  # rows per forward/backward on one device
    global_batch_size: int = 128  # rows per optimizer step, over accumulation and devices
    loss_normalization: Literal["paper", "unbiased"] = "paper"
    offload_optimizer: bool = False  # keep optimizer states on the CPU


@dataclass
class CheckpointConfig:
    output_dir: str = "runs/train"
    every_steps: int | None = 500  # None: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (latest in output_dir if any) | never | a checkpoint path
    export: bool = True  # write an HF directory (with tokenizer) at the end


@dataclass
class LoggingConfig:
    every_steps: int = 1
    tensorboard: bool = True
    progress: bool = True
    plot: bool = True  # PNG of loss and learning rate at the end
    peak_tflops: float | None = None  # for MFU; default: known GPUs (H100 989), else no MFU


@dataclass
class DistributedConfig:
    """FSDP2 settings; used when the run has more than one process (torchrun)."""

    fsdp: Literal["auto", "always", "never"] = "auto"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    backend: str | None = None  # default: nccl on CUDA (+ gloo with cpu_offload), gloo on CPU


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """asdict output with tuples as lists, so it round-trips through YAML and JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------ value checks


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple, dict):
        return {list: "a list", tuple: "a list", dict: "a mapping"}[origin]
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise wrong
    if tp is type(None):
        if value is None:
            return None
        raise wrong
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise wrong
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ConfigError(f"{key}: expected a list of {len(items)} values, got {value!r}")
        return tuple(
            _coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong
        return dict(value)
    raise ConfigError(f"{key}: unsupported setting type {tp}")  # a bug in this module


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown setting (valid keys{' of ' + where if prefix else ''}: "
            f"{', '.join(names)})"
        )
    values = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            values[name] = _coerce(data[name], tp, f"{prefix}{name}")
    return cls(**values)


def _check_ranges(config: TrainConfig) -> None:
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    m, d, o, c, g = config.model, config.data, config.optim, config.checkpoint, config.logging
    need(
        bool(m.path) or bool(m.preset) or bool(m.config),
        "model",
        "give model.path (a checkpoint) or model.preset / model.config (a fresh model)",
    )
    need(bool(d.train), "data.train", "the training records file is required")
    need(d.max_seq_length > 0, "data.max_seq_length", "must be positive")
    need(d.num_workers is None or d.num_workers > 0, "data.num_workers", "must be positive")
    need(o.lr > 0, "optim.lr", "must be positive")
    need(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(all(0 <= b < 1 for b in o.betas), "optim.betas", "each must be in [0, 1)")
    need(o.eps > 0, "optim.eps", "must be positive")
    need(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0")
    need(o.epochs > 0, "optim.epochs", "must be positive")
    need(o.max_steps is None or o.max_steps > 0, "optim.max_steps", "must be positive")
    need(o.micro_batch_size > 0, "optim.micro_batch_size", "must be positive")
    need(
        o.global_batch_size > 0 and o.global_batch_size % o.micro_batch_size == 0,
        "optim.global_batch_size",
        f"must be a positive multiple of optim.micro_batch_size ({o.micro_batch_size})",
    )
    need(c.every_steps is None or c.every_steps > 0, "checkpoint.every_steps", "must be > 0")
    need(c.keep_last > 0, "checkpoint.keep_last", "must be positive")
    need(g.every_steps > 0, "logging.every_steps", "must be positive")
    need(g.peak_tflops is None or g.peak_tflops > 0, "logging.peak_tflops", "must be positive")
    # torch's generators take seeds below 2**64 and numpy's none below 0; 2**63 leaves room for
    # the seed + epoch and seed + rank offsets derived from it.
    need(0 <= config.seed < 2**63, "seed", "must be in [0, 2**63)")
    need(0 <= m.init_seed < 2**63, "model.init_seed", "must be in [0, 2**63)")
    lora = config.lora
    need(lora.r > 0, "lora.r", "must be positive")
    need(lora.alpha > 0, "lora.alpha", "must be positive")
    need(0 <= lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(bool(lora.target_modules), "lora.target_modules", "must not be empty")


def parse_train_config(data: Any, origin: str = "config") -> TrainConfig:
    """Build and check a `TrainConfig` from parsed YAML (errors are prefixed with `origin`)."""
    try:
        config = _build(TrainConfig, data, "")
        _check_ranges(config)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    return config


class _Loader(yaml.SafeLoader):
    """PyYAML reads ``2e-5`` as a string (YAML 1.1 wants ``2.0e-5``); a learning rate written
    the way everyone writes it must be a number, so exponent floats without a dot resolve too."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    """A mapping whose keys are unique: PyYAML keeps the last of duplicate keys, so a second
    ``optim:`` section would silently reset every setting of the first to its default."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``, merged by PyYAML
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key; PyYAML's own constructor reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _parse_scalar(text: str) -> Any:
    try:
        return _yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-5", "data.batching=packing"]`` applied to the raw config mapping.

    The values are YAML scalars (``1e-5``, ``true``, ``null``, ``[0.9, 0.95]``); a key that
    does not exist is caught later, by the same check as a misspelt key in the file.
    """
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-5")
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty name in the key {key!r}")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, Mapping):
                # Replacing it with {} would hide the bad value from the checks that follow.
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: depth + 1])} holds {child!r} "
                    f"({type(child).__name__}), not a section of keys"
                )
            child = dict(child) if child is not None else {}
            node[part] = child
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read `path` (YAML), apply `overrides`, and check every key and value."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = _yaml(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, optim, ...)")
    try:
        data = apply_overrides(dict(data), overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return parse_train_config(data, str(path))
