"""`tulu export` (tulu.train.export): model and LoRA-adapter directories -> HF checkpoints.

Each export is opened twice, by our `load_model` and by transformers' `from_pretrained`, and
must give the source's logits: bit for bit for a model directory kept in its dtype, within
float32 rounding for a merged adapter (compared with the unmerged PEFT model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from model.conftest import build_model
from tulu.errors import CheckpointError, ConfigError, TokenizerError
from tulu.model import preset
from tulu.model.checkpoint import load_model, save_model
from tulu.tokenizer import Tokenizer
from tulu.train.cli import add_export_parser, cmd_export
from tulu.train.config import LoraConfig
from tulu.train.export import export_checkpoint, stored_dtype

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = preset(
    "pythia-70m",
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=256,
    num_attention_heads=4,
    vocab_size=320,
)
IDS = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(4))
TEXT = "Hello tulu, export the world!"


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE (GPT-NeoX's kind) of 300 ids, trained on a few words in milliseconds."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT, "hello world", "tulu exports models"] * 4, trainer)
    return Tokenizer(backend, pad_token="<|endoftext|>")


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return save_model(build_model(TINY, seed=11), tmp_path / "base", tokenizer=tiny_tokenizer())


@pytest.fixture
def adapter_dir(base_dir: Path, tmp_path: Path) -> Path:
    from tulu.train.lora import apply_lora, save_adapter

    model = apply_lora(load_model(base_dir), LoraConfig(r=4, alpha=8), base_model_path=base_dir)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_adapter(model, tmp_path / "adapter")


@torch.no_grad()
def ours(directory: Path) -> torch.Tensor:
    return load_model(directory, dtype=torch.float32)(IDS)


@torch.no_grad()
def theirs(directory: Path) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return hf.eval()(input_ids=IDS).logits


@torch.no_grad()
def adapted_logits(adapter: Path, base: Path) -> torch.Tensor:
    from tulu.train.lora import load_adapter

    return load_adapter(load_model(base, dtype=torch.float32), adapter).eval()(IDS)


def assert_full_checkpoint(directory: Path) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (directory / name).is_file(), name
    assert not (directory / "adapter_config.json").exists()
    ids = Tokenizer.from_dir(directory).encode(TEXT)
    assert ids == tiny_tokenizer().encode(TEXT) and len(ids) < len(TEXT)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert hf(TEXT, add_special_tokens=False).input_ids == ids
    assert hf.eos_token == hf.pad_token == "<|endoftext|>"


# ---------------------------------------------------------------------------- model dirs
def test_model_dir_exports_identically(base_dir: Path, tmp_path: Path) -> None:
    out = export_checkpoint(base_dir, tmp_path / "out", merge_lora=False)
    assert_full_checkpoint(out)
    source, exported = load_model(base_dir), load_model(out)
    for (name, a), b in zip(
        source.state_dict().items(), exported.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(ours(out), ours(base_dir))
    torch.testing.assert_close(theirs(out), ours(base_dir), atol=1e-5, rtol=1e-5)


def test_dtype_conversion_and_given_tokenizer(base_dir: Path, tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save(tok_dir)
    out = export_checkpoint(
        base_dir, tmp_path / "bf16", merge_lora=False, dtype="bfloat16", tokenizer=tok_dir
    )
    assert stored_dtype(out) == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    expected = load_model(base_dir, dtype=torch.bfloat16).float()(IDS)
    torch.testing.assert_close(ours(out), expected, atol=0, rtol=0)
    # a second export from the bf16 one keeps bf16 by default
    again = export_checkpoint(out, tmp_path / "again", merge_lora=True)  # nothing to merge
    assert stored_dtype(again) == torch.bfloat16


# ---------------------------------------------------------------------------- adapters
def test_adapter_needs_merge_flag(adapter_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--merge-lora"):
        export_checkpoint(adapter_dir, tmp_path / "out", merge_lora=False)
    assert not (tmp_path / "out").exists()


def test_merged_adapter_has_the_adapted_logits(
    adapter_dir: Path, base_dir: Path, tmp_path: Path
) -> None:
    out = export_checkpoint(adapter_dir, tmp_path / "merged", merge_lora=True)
    assert_full_checkpoint(out)  # the tokenizer comes from the base
    assert stored_dtype(out) == torch.float32  # the base's dtype
    expected = adapted_logits(adapter_dir, base_dir)
    assert (expected - ours(base_dir)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours(out), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(out), expected, atol=1e-5, rtol=1e-5)


def test_relative_base_path_beside_the_adapter(
    adapter_dir: Path, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../base"
    config_path.write_text(json.dumps(config))
    monkeypatch.chdir(base_dir)  # "../base" means nothing from here
    out = export_checkpoint(adapter_dir, tmp_path / "merged", merge_lora=True)
    torch.testing.assert_close(
        ours(out), adapted_logits(adapter_dir, base_dir), atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_missing_file(adapter_dir: Path, base_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json.*adapter_config.json"):
        export_checkpoint(empty, tmp_path / "o1", merge_lora=True)

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(CheckpointError, match="base_model_name_or_path"):
        export_checkpoint(adapter_dir, tmp_path / "o2", merge_lora=True)

    config_path.write_text(json.dumps(config))
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        export_checkpoint(adapter_dir, tmp_path / "o3", merge_lora=True)

    (base_dir / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json.*--tokenizer"):
        export_checkpoint(base_dir, tmp_path / "o4", merge_lora=False)

    with pytest.raises(ConfigError, match="source directory"):
        export_checkpoint(base_dir, base_dir, merge_lora=False, tokenizer=tiny_tokenizer())


# ---------------------------------------------------------------------------- command line
def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tulu")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_command_line(adapter_dir: Path, base_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    args = parse(["export", str(adapter_dir), "--output", str(out), "--merge-lora"])
    assert (args.merge_lora, args.dtype, args.tokenizer) == (True, None, None)
    assert cmd_export(args) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    torch.testing.assert_close(
        ours(out), adapted_logits(adapter_dir, base_dir), atol=1e-5, rtol=1e-5
    )
    args = parse(["export", str(adapter_dir), "--output", str(tmp_path / "x"), "--dtype", "bf16"])
    with pytest.raises(ConfigError, match="pass --merge-lora"):
        cmd_export(args)
    with pytest.raises(SystemExit):
        parse(["export", str(adapter_dir)])  # --output is required
