"""NeoXConfig: every config.json spelling, validation errors, Pythia presets and sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tulu.errors import ConfigError, TuluError
from tulu.model import GPTNeoXForCausalLM, NeoXConfig, preset
from tulu.model.config import PRESET_NAMES, parse_dtype

# EleutherAI/pythia-6.9b's config.json as first published (transformers 4.24 era).
PYTHIA_6_9B_OLD = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.24.0",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50432,
}

# The same model as transformers 5 writes it: rope settings in `rope_parameters`, `dtype`.
PYTHIA_6_9B_V5 = {
    "architectures": ["GPTNeoXForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "classifier_dropout": 0.1,
    "dtype": "float16",
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "is_decoder": False,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": None,
    "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000, "rope_type": "default"},
    "tie_word_embeddings": False,
    "transformers_version": "5.0.0",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50432,
}

# In between (transformers 4.4x): top-level rope_theta / partial_rotary_factor, rope_scaling.
PYTHIA_6_9B_V4 = {
    **{k: v for k, v in PYTHIA_6_9B_OLD.items() if k not in ("rotary_emb_base", "rotary_pct")},
    "rope_theta": 10000,
    "partial_rotary_factor": 0.25,
    "rope_scaling": None,
    "attention_bias": True,
    "transformers_version": "4.46.0",
}


def test_pythia_6_9b_configs_of_every_transformers_generation_agree() -> None:
    expected = preset("pythia-6.9b")
    for raw in (PYTHIA_6_9B_OLD, PYTHIA_6_9B_V4, PYTHIA_6_9B_V5):
        config = NeoXConfig.from_dict(raw)
        assert config == expected, raw.get("transformers_version")
        assert config.rotary_emb_base == 10000.0 and config.rotary_pct == 0.25
        assert config.head_size == 128 and config.rotary_ndims == 32
        assert config.torch_dtype == "float16" and config.dtype == torch.float16
        assert config.rope_scaling is None and config.rope_type == "default"
    # Unknown-to-us keys survive a round trip (transformers reads them back).
    v5 = NeoXConfig.from_dict(PYTHIA_6_9B_V5)
    assert v5.extra["classifier_dropout"] == 0.1
    assert v5.to_dict()["classifier_dropout"] == 0.1
    assert "transformers_version" not in v5.to_dict()


# ----------------------------------------------------------------------- spellings of one config
# Every spelling below means: rope theta 20000, partial rotary 0.5, bfloat16.
_BASE = {
    "model_type": "gpt_neox",
    "vocab_size": 1024,
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
}
_EXPECTED = NeoXConfig(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=1024,
    rotary_emb_base=20000.0,
    rotary_pct=0.5,
    torch_dtype="bfloat16",
)

ROPE_SPELLINGS = {
    "original": {"rotary_emb_base": 20000, "rotary_pct": 0.5},
    "top-level-new-names": {"rope_theta": 20000.0, "partial_rotary_factor": 0.5},
    "mixed": {"rotary_emb_base": 20000, "partial_rotary_factor": 0.5},
    "rope_scaling": {
        "rope_scaling": {"rope_type": "default", "rope_theta": 20000, "partial_rotary_factor": 0.5}
    },
    "rope_scaling-type-key": {
        "rope_scaling": {"type": "default", "rope_theta": 20000},
        "rotary_pct": 0.5,
    },
    "rope_parameters": {
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 20000,
            "partial_rotary_factor": 0.5,
        }
    },
    # rope_parameters (transformers 5) wins over stale top-level values.
    "rope_parameters-over-top-level": {
        "rotary_emb_base": 10000,
        "rotary_pct": 0.25,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 20000,
            "partial_rotary_factor": 0.5,
        },
    },
    "null-rope_scaling": {"rope_scaling": None, "rope_theta": 20000, "rotary_pct": 0.5},
}
DTYPE_SPELLINGS = {
    "torch_dtype": {"torch_dtype": "bfloat16"},
    "dtype": {"dtype": "bfloat16"},
    "torch-prefixed": {"torch_dtype": "torch.bfloat16"},
    "dtype-over-null-torch_dtype": {"dtype": "bfloat16", "torch_dtype": None},
    "short": {"dtype": "bf16"},
}


@pytest.mark.parametrize("rope", list(ROPE_SPELLINGS.values()), ids=list(ROPE_SPELLINGS))
@pytest.mark.parametrize("dtype", list(DTYPE_SPELLINGS.values()), ids=list(DTYPE_SPELLINGS))
def test_every_spelling_gives_the_same_config(rope: dict, dtype: dict) -> None:
    config = NeoXConfig.from_dict({**_BASE, **rope, **dtype})
    assert config == _EXPECTED
    assert config.rotary_emb_base == 20000.0 and config.rotary_pct == 0.5
    assert config.rotary_ndims == 32  # head 64 x 0.5
    assert config.torch_dtype == "bfloat16" and config.dtype == torch.bfloat16
    assert config.rope_scaling is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_parallel_residual", False),
        ("attention_bias", False),
        ("hidden_act", "gelu_new"),
        ("hidden_act", "gelu_fast"),
        ("layer_norm_eps", 1e-6),
        ("tie_word_embeddings", True),
        ("max_position_embeddings", 4096),
        ("initializer_range", 0.01),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ],
)
def test_architecture_fields_are_read(key: str, value: object) -> None:
    config = NeoXConfig.from_dict({**_BASE, key: value})
    assert getattr(config, key) == value
    assert getattr(NeoXConfig.from_dict(config.to_dict()), key) == value


def test_lists_and_nulls_for_token_ids() -> None:
    config = NeoXConfig.from_dict({**_BASE, "eos_token_id": [2, 3], "bos_token_id": None})
    assert config.eos_token_id == 2 and config.bos_token_id == 0


def test_missing_fields_take_pythia_defaults() -> None:
    config = NeoXConfig.from_dict(dict(_BASE))  # nothing but the sizes: Pythia defaults
    assert (config.rotary_pct, config.rotary_emb_base, config.hidden_act) == (0.25, 10000.0, "gelu")
    assert config.use_parallel_residual and config.attention_bias and not config.tie_word_embeddings


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_scaling": {"rope_type": "linear", "factor": 2}},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000}},
    ],
)
def test_linear_rope_scaling(rope: dict) -> None:
    config = NeoXConfig.from_dict({**_BASE, **rope})
    assert config.rope_type == "linear" and config.rope_linear_factor == 2.0
    assert config.rotary_emb_base == 10000.0
    again = NeoXConfig.from_dict(config.to_dict())
    assert again == config and again.rope_linear_factor == 2.0


@pytest.mark.parametrize(
    "scaling",
    [{"type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 4}],
)
def test_an_edited_rope_scaling_replaces_rope_parameters_as_in_transformers(
    scaling: dict,
) -> None:
    """Our config.json holds both rope_scaling and rope_parameters; transformers (4.x and 5)
    uses rope_scaling whole when it is set. Editing it (to extend the context) must take
    effect here too, not be outvoted by the untouched rope_parameters."""
    transformers = pytest.importorskip("transformers")
    raw = {**_EXPECTED.to_dict(), "rope_scaling": scaling}
    theirs = transformers.GPTNeoXConfig(**raw).rope_parameters
    config = NeoXConfig.from_dict(raw)
    assert config.rope_type == theirs["rope_type"] == "linear"
    assert config.rope_linear_factor == theirs["factor"]
    assert config.rotary_emb_base == theirs["rope_theta"]
    assert config.rotary_pct == theirs["partial_rotary_factor"]


def test_an_unsupported_edited_rope_scaling_is_refused() -> None:
    raw = {**_EXPECTED.to_dict(), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(ConfigError, match="'dynamic'.*rope_scaling"):
        NeoXConfig.from_dict(raw)


def test_round_trip_through_to_dict_and_json(tmp_path: Path) -> None:
    for config in (
        preset("pythia-160m"),
        preset(
            "pythia-70m",
            tie_word_embeddings=True,
            use_parallel_residual=False,
            torch_dtype="bfloat16",
        ),
        NeoXConfig.from_dict(PYTHIA_6_9B_V5),
        preset(
            "pythia-14m",
            rotary_emb_base=500000.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
    ):
        assert NeoXConfig.from_dict(config.to_dict()) == config
        path = config.save(tmp_path)
        assert path == tmp_path / "config.json"
        assert NeoXConfig.from_json(path) == config
        assert json.loads(path.read_text())["model_type"] == "gpt_neox"


def test_with_revalidates() -> None:
    config = preset("pythia-70m")
    assert config.with_(num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ConfigError, match="num_attention_heads"):
        config.with_(num_attention_heads=7)


# ----------------------------------------------------------------------- transformers reads ours
transformers_configs = [
    pytest.param(NeoXConfig.from_dict(PYTHIA_6_9B_OLD), id="pythia-6.9b-old"),
    pytest.param(NeoXConfig.from_dict(PYTHIA_6_9B_V5), id="pythia-6.9b-v5"),
    pytest.param(
        NeoXConfig.from_dict({**_BASE, **ROPE_SPELLINGS["original"]}), id="theta-20000-pct-0.5"
    ),
    pytest.param(
        preset("pythia-70m", rope_scaling={"rope_type": "linear", "factor": 2.0}, rotary_pct=1.0),
        id="linear-scaling",
    ),
    pytest.param(
        preset(
            "pythia-410m",
            tie_word_embeddings=True,
            use_parallel_residual=False,
            attention_bias=False,
        ),
        id="variants",
    ),
]


@pytest.mark.parametrize("config", transformers_configs)
def test_transformers_reads_our_to_dict(config: NeoXConfig) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GPTNeoXConfig(**config.to_dict())
    rope = theirs.rope_parameters
    assert rope["rope_theta"] == config.rotary_emb_base
    assert rope["partial_rotary_factor"] == config.rotary_pct
    assert rope["rope_type"] == config.rope_type
    if config.rope_type == "linear":
        assert rope["factor"] == config.rope_linear_factor
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "layer_norm_eps",
        "hidden_act",
        "use_parallel_residual",
        "attention_bias",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(theirs, name) == getattr(config, name), name
    assert theirs.dtype == config.dtype
    # ...and we read what transformers writes.
    assert NeoXConfig.from_dict(theirs.to_dict()) == config


# ----------------------------------------------------------------------- errors
_DROP = object()


def raw(**changes: object) -> dict:
    """_BASE with some fields changed (or removed, with the value _DROP)."""
    out = {**_BASE, **changes}
    return {k: v for k, v in out.items() if v is not _DROP}


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (raw(model_type="llama"), "llama"),
        (raw(model_type="gpt2"), "gpt2"),
        (raw(model_type=_DROP), "model_type None"),
        (raw(hidden_size="4096"), "hidden_size"),
        (raw(hidden_size=4096.0), "hidden_size"),
        (raw(num_hidden_layers=True), "num_hidden_layers"),
        (raw(vocab_size=0), "vocab_size"),
        (raw(num_attention_heads=-4), "num_attention_heads"),
        (raw(hidden_size=250), "not divisible by num_attention_heads"),
        (raw(use_parallel_residual="yes"), "use_parallel_residual"),
        (raw(tie_word_embeddings=1), "tie_word_embeddings"),
        (raw(hidden_act="gelu_10"), "hidden_act"),
        (raw(hidden_act=3), "hidden_act"),
        (raw(layer_norm_eps=0), "layer_norm_eps"),
        (raw(rotary_pct=0), "rotary_pct"),
        (raw(rotary_pct=1.5), "rotary_pct"),
        (raw(rotary_pct="0.25"), "rotary_pct"),
        (raw(rotary_emb_base=-1), "rotary_emb_base"),
        (raw(rope_theta=float("nan")), "rope_theta"),
        # head 18 x 0.5 = 9 rotary dims: odd
        (raw(hidden_size=72, rotary_pct=0.5), "must be even"),
        (raw(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
        (raw(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000}), "yarn"),
        (raw(rope_scaling={"type": "linear"}), "factor"),
        (raw(rope_scaling={"type": "linear", "factor": -2}), "factor"),
        (raw(rope_scaling={"type": "linear", "factor": True}), "factor"),
        (raw(rope_scaling="linear"), "rope_scaling"),
        (raw(torch_dtype="float8"), "float8"),
        (raw(dtype="int4"), "int4"),
        (raw(torch_dtype=16), "torch_dtype"),
        (raw(hidden_dropout=1.0), "hidden_dropout.*must be in"),
        (raw(attention_dropout=-0.1), "attention_dropout.*must be in"),
        (raw(attention_dropout="0.1"), "attention_dropout.*must be a finite number"),
    ],
)
def test_bad_configs_are_config_errors(config: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        NeoXConfig.from_dict(config, source="models/x/config.json")
    assert isinstance(info.value, TuluError)
    assert "models/x/config.json" in str(info.value)  # names the file


UNREADABLE = Path("/proc/self/mem")  # a regular file whose first bytes fail with EIO


@pytest.mark.skipif(not UNREADABLE.is_file(), reason="needs Linux /proc/self/mem")
def test_an_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    """An OSError reading config.json (permissions, I/O) escaped as a raw traceback."""
    config = tmp_path / "config.json"
    config.symlink_to(UNREADABLE)
    with pytest.raises(ConfigError, match=r"config.json: cannot read") as info:
        NeoXConfig.from_json(config)
    assert str(config) in str(info.value)


def test_not_a_json_object() -> None:
    with pytest.raises(ConfigError, match="expected a JSON object"):
        NeoXConfig.from_dict([_BASE])  # type: ignore[arg-type]


def test_from_json_errors_name_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "gpt_neox", "hidden_size": 64,')  # truncated
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        NeoXConfig.from_json(bad)
    assert str(bad) in str(info.value)

    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 16)
    with pytest.raises(ConfigError) as info:
        NeoXConfig.from_json(binary)
    assert str(binary) in str(info.value)

    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ConfigError, match="not found") as info:
        NeoXConfig.from_json(missing)
    assert str(missing) in str(info.value)

    with pytest.raises(ConfigError, match="not found"):
        NeoXConfig.from_json(tmp_path)  # a directory is not a config file

    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(ConfigError, match="llama") as info:
        NeoXConfig.from_json(llama)
    assert str(llama) in str(info.value)


def test_parse_dtype() -> None:
    assert parse_dtype("torch.float32") is torch.float32
    assert parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="--dtype"):
        parse_dtype("float64", where="--dtype")


# ----------------------------------------------------------------------- Pythia presets
#                hidden, layers, heads, vocab, total params, non-embedding params (model card)
PYTHIA = {
    "pythia-14m": (128, 6, 4, 50304, None, None),
    "pythia-70m": (512, 6, 8, 50304, 70_426_624, 18_915_328),
    "pythia-160m": (768, 12, 12, 50304, 162_322_944, 85_056_000),
    "pythia-410m": (1024, 24, 16, 50304, 405_334_016, 302_311_424),
    "pythia-1b": (2048, 16, 8, 50304, 1_011_781_632, 805_736_448),
    "pythia-1.4b": (2048, 24, 16, 50304, 1_414_647_808, 1_208_602_624),
    "pythia-2.8b": (2560, 32, 32, 50304, 2_775_208_960, 2_517_652_480),
    "pythia-6.9b": (4096, 32, 32, 50432, 6_857_302_016, 6_444_163_072),
    "pythia-12b": (5120, 36, 40, 50688, 11_846_072_320, 11_327_027_200),
}


def test_all_nine_presets_exist() -> None:
    assert set(PRESET_NAMES) == set(PYTHIA)


@pytest.mark.parametrize("name", list(PYTHIA))
def test_preset_shapes_and_published_parameter_counts(name: str) -> None:
    hidden, layers, heads, vocab, total, non_embedding = PYTHIA[name]
    config = preset(name)
    assert (config.hidden_size, config.num_hidden_layers) == (hidden, layers)
    assert (config.num_attention_heads, config.vocab_size) == (heads, vocab)
    assert config.intermediate_size == 4 * hidden
    assert config.rotary_pct == 0.25 and config.rotary_emb_base == 10000.0
    assert config.rotary_ndims == hidden // heads // 4
    assert config.max_position_embeddings == 2048
    assert config.use_parallel_residual and config.attention_bias
    assert not config.tie_word_embeddings
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-5
    if total is not None:
        assert config.num_parameters() == total
        assert config.num_parameters(include_embeddings=False) == non_embedding
        assert total - non_embedding == 2 * vocab * hidden  # untied embed_in + embed_out


@pytest.mark.parametrize("name", list(PYTHIA))
def test_num_parameters_matches_the_model(name: str) -> None:
    """Our formula == the parameters our module actually has (built on meta: no memory)."""
    config = preset(name)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    assert model.num_parameters() == config.num_parameters()
    embeddings = model.gpt_neox.embed_in.weight.numel() + model.embed_out.weight.numel()
    assert config.num_parameters(include_embeddings=False) == config.num_parameters() - embeddings


@pytest.mark.parametrize(
    "config",
    [
        preset("pythia-14m"),
        preset("pythia-70m"),
        preset("pythia-70m", tie_word_embeddings=True),
        preset("pythia-14m", attention_bias=False, use_parallel_residual=False),
    ],
    ids=["pythia-14m", "pythia-70m", "tied", "no-attention-bias"],
)
def test_num_parameters_matches_transformers(config: NeoXConfig) -> None:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        theirs = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_dict()))
        ours = GPTNeoXForCausalLM(config)
    assert theirs.num_parameters() == config.num_parameters()
    assert sum(p.numel() for p in ours.parameters()) == config.num_parameters()
    # Same names and shapes too, apart from the LM head's name.
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    ours_shapes["lm_head.weight"] = ours_shapes.pop("embed_out.weight")
    assert ours_shapes == theirs_shapes


def test_preset_names_and_overrides() -> None:
    assert preset("EleutherAI/pythia-410m-deduped") == preset("pythia-410m")
    assert preset("Pythia-1B") == preset("pythia-1b")
    small = preset("pythia-70m", num_hidden_layers=2, torch_dtype="bfloat16")
    assert small.num_hidden_layers == 2 and small.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="pythia-3b") as info:
        preset("pythia-3b")
    assert "pythia-6.9b" in str(info.value)  # lists the known presets
    with pytest.raises(ConfigError, match="num_attention_heads"):
        preset("pythia-70m", num_attention_heads=7)


def test_kv_cache_bytes_per_token() -> None:
    big = preset("pythia-6.9b")
    assert big.kv_cache_bytes_per_token(torch.bfloat16) == 2 * 32 * 4096 * 2 == 524_288
    assert big.kv_cache_bytes_per_token() == 524_288  # config dtype float16: also 2 bytes
    assert big.kv_cache_bytes_per_token(torch.float32) == 1_048_576
    assert preset("pythia-70m").kv_cache_bytes_per_token(torch.bfloat16) == 2 * 6 * 512 * 2
