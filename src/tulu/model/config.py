"""NeoXConfig: the shape of a GPT-NeoX model, parsed from any Hugging Face `config.json`.

Pythia checkpoints were written by several generations of transformers, and each spelled the
rotary settings differently (`rotary_pct` / `rotary_emb_base` in the originals, `rope_theta`,
`rope_scaling`, `partial_rotary_factor` and finally `rope_parameters` in newer ones). We accept
every spelling and normalise to one set of fields, so the rest of the code never has to care.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from tulu.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("gpt_neox",)
SUPPORTED_ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "relu",
    "silu",
    "swish",
)
SUPPORTED_ROPE_TYPES = ("default", "linear")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(value: str | torch.dtype, where: str = "dtype") -> torch.dtype:
    """Turn 'bfloat16' / 'bf16' / torch.bfloat16 into a torch dtype, or raise naming `where`."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ConfigError(
            f"{where}: unknown dtype {value!r} (use one of float32, float16, bfloat16)"
        )
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class NeoXConfig:
    """Every hyper-parameter the GPT-NeoX forward pass depends on.

    Field names follow the original GPT-NeoX/Pythia `config.json` so a saved config is readable
    by every version of transformers.
    """

    vocab_size: int = 50304
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    torch_dtype: str = "float16"
    bos_token_id: int = 0
    eos_token_id: int = 0
    initializer_range: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Not part of the architecture; kept so that a round-tripped config keeps it.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._check()

    # ----------------------------------------------------------------------------- derived
    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """Number of dimensions of each head that get rotary embeddings (even, as in HF)."""
        return int(self.head_size * self.rotary_pct)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def rope_linear_factor(self) -> float:
        """Positions are divided by this factor ('linear' scaling); 1.0 otherwise."""
        if self.rope_type == "linear":
            return float(self.rope_scaling["factor"])  # type: ignore[index]
        return 1.0

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.torch_dtype, "config.torch_dtype")

    def num_parameters(self, include_embeddings: bool = True) -> int:
        h, i, v, n = (
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
            self.num_hidden_layers,
        )
        bias = 1 if self.attention_bias else 0
        attn = h * 3 * h + 3 * h * bias + h * h + h * bias
        mlp = h * i + i + i * h + h
        norms = 4 * h
        total = n * (attn + mlp + norms) + 2 * h  # final layer norm
        if include_embeddings:
            total += v * h * (1 if self.tie_word_embeddings else 2)
        return total

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V one token occupies across all layers."""
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_hidden_layers * self.hidden_size * itemsize

    # ----------------------------------------------------------------------------- checks
    def _check(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field {name!r} {why} (got {getattr(self, name)!r})")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if not (0.0 < float(self.rotary_pct) <= 1.0):
            raise bad("rotary_pct", "must be in (0, 1]")
        if self.rotary_ndims % 2:
            raise ConfigError(
                f"config: rotary dimensions per head ({self.head_size} x rotary_pct "
                f"{self.rotary_pct} = {self.rotary_ndims}) must be even"
            )
        if not (isinstance(self.rotary_emb_base, (int, float)) and self.rotary_emb_base > 0):
            raise bad("rotary_emb_base", "must be a positive number")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise bad("layer_norm_eps", "must be a positive number")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise bad(
                "hidden_act", f"is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"config: rope_type {self.rope_type!r} (field 'rope_scaling' or "
                f"'rope_parameters') is not supported (supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.rope_type == "linear":
            factor = self.rope_scaling.get("factor") if self.rope_scaling else None
            if (
                isinstance(factor, bool)
                or not isinstance(factor, (int, float))
                or not math.isfinite(factor)
                or factor <= 0
            ):
                raise ConfigError(
                    f"config: linear rope scaling needs a positive 'factor', got {factor!r}"
                )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(name, "must be a number in [0, 1)")
            if not 0.0 <= value < 1.0:
                raise bad(name, "must be in [0, 1)")
        parse_dtype(self.torch_dtype, "config field 'torch_dtype'")

    # ----------------------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> NeoXConfig:
        """Parse an HF config dict, accepting all historical spellings of each field."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; tulu runs GPT-NeoX "
                f"models (model_type 'gpt_neox', e.g. the Pythia family)"
            )
        data = dict(raw)
        kwargs: dict[str, Any] = {}

        # Rotary settings: rope_scaling or rope_parameters (transformers >= 5) > top-level keys.
        # A rope_scaling that is set replaces rope_parameters whole, as transformers 5 reads it
        # (and 4.x, which ignores rope_parameters): a config whose rope_scaling was edited
        # (context extension) beside an older rope_parameters gets the edited scaling.
        rope_params = data.pop("rope_parameters", None) or {}
        rope_scaling = data.pop("rope_scaling", None) or {}
        for name, value in (("rope_parameters", rope_params), ("rope_scaling", rope_scaling)):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: field {name!r} must be an object, got {value!r}")
        merged_rope = dict(rope_scaling or rope_params)
        theta = _first(merged_rope, data, ("rope_theta",), ("rotary_emb_base", "rope_theta"))
        pct = _first(
            merged_rope, data, ("partial_rotary_factor",), ("rotary_pct", "partial_rotary_factor")
        )
        data.pop("rotary_emb_base", None), data.pop("rope_theta", None)
        data.pop("rotary_pct", None), data.pop("partial_rotary_factor", None)
        if theta is not None:
            kwargs["rotary_emb_base"] = float(_number(theta, "rope_theta", source))
        if pct is not None:
            kwargs["rotary_pct"] = float(_number(pct, "rotary_pct", source))
        scaling = {
            k: v for k, v in merged_rope.items() if k not in ("rope_theta", "partial_rotary_factor")
        }
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            kwargs["rope_scaling"] = scaling

        dtype = data.pop("dtype", None) or data.pop("torch_dtype", None)
        data.pop("torch_dtype", None)
        if dtype is not None:
            kwargs["torch_dtype"] = dtype_name(parse_dtype(dtype, f"{source}: field 'torch_dtype'"))

        known = {f.name for f in fields(cls)} - {"extra", "rope_scaling", "torch_dtype"}
        for name in known:
            if name in data:
                value = data.pop(name)
                if value is None:
                    continue
                kwargs[name] = _coerce(name, value, cls, source)
        # Tokens ids may be lists in some configs; keep the first for our scalar fields.
        kwargs["extra"] = {k: v for k, v in data.items() if k not in _DROPPED_KEYS}
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> NeoXConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        except OSError as err:  # unreadable (permissions, I/O error)
            raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """An HF `config.json` dict that old and new transformers versions both read."""
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_scaling")}
        out.update(self.extra)
        out["model_type"] = "gpt_neox"
        out["architectures"] = ["GPTNeoXForCausalLM"]
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        # New transformers reads rope_parameters; old versions ignore it.
        out["rope_parameters"] = {
            **(dict(self.rope_scaling) if self.rope_scaling else {"rope_type": "default"}),
            "rope_theta": self.rotary_emb_base,
            "partial_rotary_factor": self.rotary_pct,
        }
        out["use_cache"] = True
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    def with_(self, **changes: Any) -> NeoXConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


_DROPPED_KEYS = {
    "model_type",
    "architectures",
    "transformers_version",
    "use_cache",
    "_name_or_path",
    "torch_dtype",
    "dtype",
}


def _first(primary: dict, secondary: dict, primary_keys: tuple, secondary_keys: tuple) -> Any:
    for key in primary_keys:
        if primary.get(key) is not None:
            return primary[key]
    for key in secondary_keys:
        if secondary.get(key) is not None:
            return secondary[key]
    return None


def _number(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: field {name!r} must be a finite number, got {value!r}")
    return value


def _coerce(name: str, value: Any, cls: type, source: str) -> Any:
    default = next(f.default for f in fields(cls) if f.name == name)
    if name in ("bos_token_id", "eos_token_id") and isinstance(value, list):
        value = value[0] if value else 0
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: field {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: field {name!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        return float(_number(value, name, source))
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{source}: field {name!r} must be a string, got {value!r}")
        return value
    return value


# Exact shapes of the Pythia suite (EleutherAI/pythia-*). Vocabularies are padded for
# tensor-parallel efficiency, which is why they differ from the tokenizer's 50,277 ids.
_PYTHIA_SHAPES: dict[str, tuple[int, int, int, int]] = {
    #        hidden, layers, heads, vocab
    "14m": (128, 6, 4, 50304),
    "70m": (512, 6, 8, 50304),
    "160m": (768, 12, 12, 50304),
    "410m": (1024, 24, 16, 50304),
    "1b": (2048, 16, 8, 50304),
    "1.4b": (2048, 24, 16, 50304),
    "2.8b": (2560, 32, 32, 50304),
    "6.9b": (4096, 32, 32, 50432),
    "12b": (5120, 36, 40, 50688),
}

PRESET_NAMES = tuple(f"pythia-{size}" for size in _PYTHIA_SHAPES)


def preset(name: str, **overrides: Any) -> NeoXConfig:
    """The config of a Pythia size: `preset("pythia-6.9b")`, optionally with fields overridden."""
    key = name.lower().removeprefix("eleutherai/").removeprefix("pythia-").removesuffix("-deduped")
    if key not in _PYTHIA_SHAPES:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    hidden, layers, heads, vocab = _PYTHIA_SHAPES[key]
    base = NeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
    )
    return replace(base, **overrides) if overrides else base
