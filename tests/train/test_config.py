"""The training config: strict keys, typed values, overrides, the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulu.errors import ConfigError
from tulu.train.config import TrainConfig, apply_overrides, load_train_config, parse_train_config

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"model": {"preset": "pythia-14m"}, "data": {"train": "train.jsonl"}}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_papers_recipe():
    config = parse_train_config(MINIMAL)
    o = config.optim
    assert (o.lr, o.scheduler, o.warmup_ratio, o.weight_decay, o.epochs) == (
        2e-5,
        "linear",
        0.03,
        0.0,
        2,
    )
    assert o.global_batch_size == 128 and o.loss_normalization == "paper"
    assert config.data.max_seq_length == 2048


def test_yaml_exponent_floats_and_overrides(tmp_path):
    path = _write(
        tmp_path,
        "model: {preset: pythia-70m}\ndata: {train: a.jsonl}\noptim: {lr: 2e-5, betas: [0.9, 0.95]}\n",
    )
    config = load_train_config(path, ["optim.lr=1e-4", "data.batching=packing", "seed=7"])
    assert config.optim.lr == pytest.approx(1e-4)
    assert config.optim.betas == (0.9, 0.95)
    assert config.data.batching == "packing" and config.seed == 7
    assert load_train_config(path).optim.lr == pytest.approx(2e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], "optim.lrr: unknown setting (valid keys of optim: optimizer, lr,"),
        (["modle.path=x"], "modle: unknown setting (valid keys: model, data, optim,"),
        (["optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
        (["optim.lr=-1"], "optim.lr: must be positive"),
        (["data.batching=pack"], "data.batching: expected one of padding, packing, got 'pack'"),
        (["optim.epochs=1.5"], "optim.epochs: expected an integer, got 1.5"),
        (
            ["model.gradient_checkpointing=yes please"],
            "model.gradient_checkpointing: expected true or false",
        ),
        (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values"),
        (
            ["optim.micro_batch_size=3", "optim.global_batch_size=8"],
            "optim.global_batch_size: must be a positive multiple of optim.micro_batch_size (3)",
        ),
        (["optim"], "expected key=value"),
        (["data.train="], "data.train: the training records file is required"),
        (["optim=3"], "optim: expected a mapping of settings, got 3"),
        (["seed=-1"], "seed: must be in [0, 2**63)"),
        (["seed=99999999999999999999"], "seed: must be in [0, 2**63)"),
        (["model.init_seed=99999999999999999999"], "model.init_seed: must be in [0, 2**63)"),
        (["optim..lr=1"], "override 'optim..lr=1': empty name in the key 'optim..lr'"),
        ([".lr=1"], "empty name in the key '.lr'"),
    ],
)
def test_errors_name_the_key(tmp_path, overrides, message):
    path = _write(tmp_path, "model: {preset: pythia-14m}\ndata: {train: a.jsonl}\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(path, overrides)
    assert message in str(info.value)
    assert str(info.value).startswith(str(path))


def test_model_source_is_required():
    with pytest.raises(ConfigError, match="give model.path"):
        parse_train_config({"data": {"train": "x"}})


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "model:\n  preset: [\n")
    with pytest.raises(ConfigError, match=r"train\.yaml:\d+: invalid YAML"):
        load_train_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "optim: {lr: 0.1}\noptim: {epochs: 3}\n",
            r"train\.yaml:4: .*duplicate key 'optim' \(first on line 3\)",
        ),
        (
            "optim:\n  lr: 0.1\n  lr: 0.2\n",
            r"train\.yaml:5: .*duplicate key 'lr' \(first on line 4\)",
        ),
        ("optim: {lr: 0.1, lr: 0.2}\n", r"train\.yaml:3: .*duplicate key 'lr'"),
    ],
)
def test_duplicate_keys_are_an_error(tmp_path, text, message):
    """PyYAML keeps the last duplicate: a second section would silently reset the first's
    settings to their defaults."""
    path = _write(tmp_path, "model: {preset: pythia-14m}\ndata: {train: a.jsonl}\n" + text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(path)


def test_yaml_merge_keys_still_work(tmp_path):
    """The duplicate-key check leaves YAML's ``<<`` merge keys alone."""
    path = _write(tmp_path, "data: {train: a.jsonl}\nmodel:\n  <<: {preset: pythia-14m}\n")
    assert load_train_config(path).model.preset == "pythia-14m"


def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_bytes(b"model: {preset: pythia-14m}\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: not UTF-8 text"):
        load_train_config(path)


def test_round_trip_through_a_dict():
    config = parse_train_config(MINIMAL)
    again = parse_train_config(config.to_dict())
    assert again == config
    assert isinstance(config, TrainConfig)


def test_overrides_create_sections():
    data = apply_overrides({}, ["lora.enabled=true", "lora.r=4"])
    assert data == {"lora": {"enabled": True, "r": 4}}
    assert apply_overrides({"optim": None}, ["optim.lr=1e-5"]) == {"optim": {"lr": 1e-5}}


def test_an_override_into_a_value_that_is_no_section_is_refused(tmp_path):
    """``optim: 5`` in the file is a bad section; an override of ``optim.lr`` replaced it with
    a fresh one, so the file's mistake was never reported."""
    path = tmp_path / "c.yaml"
    path.write_text("optim: 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"override 'optim\.lr=1e-5': optim holds 5 \(int\)"):
        load_train_config(path, ["optim.lr=1e-5"])
    with pytest.raises(ConfigError, match=r"model\.config holds 'x' \(str\)"):
        apply_overrides({"model": {"config": "x"}}, ["model.config.hidden_size=8"])


@pytest.mark.parametrize("name", ["pythia-6.9b-tulu-v1.yaml", "tiny-demo.yaml"])
def test_shipped_configs_parse(name):
    path = ROOT / "configs" / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    load_train_config(path)


def test_paper_recipe_config():
    path = ROOT / "configs" / "pythia-6.9b-tulu-v1.yaml"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    config = load_train_config(path)
    o = config.optim
    assert (o.lr, o.scheduler, o.warmup_ratio, o.weight_decay, o.epochs) == (
        2e-5,
        "linear",
        0.03,
        0.0,
        2,
    )
    assert o.global_batch_size == 128 and config.data.max_seq_length == 2048
    assert config.model.dtype == "bfloat16" and o.optimizer.startswith("adamw")
