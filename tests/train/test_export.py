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
from train.conftest import random_adapter, transformers_adapter
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


def tiny_tokenizer(eos_token: str | None = None) -> Tokenizer:
    """A byte-level BPE (GPT-NeoX's kind) of 300 ids, trained on a few words in milliseconds;
    `eos_token` adds that special token (id 1) as EOS, instead of <|endoftext|> (id 0)."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", *([eos_token] if eos_token else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT, "hello world", "tulu exports models"] * 4, trainer)
    return Tokenizer(backend, eos_token=eos_token, pad_token="<|endoftext|>")


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return save_model(build_model(TINY, seed=11), tmp_path / "base", tokenizer=tiny_tokenizer())


@pytest.fixture
def adapter_dir(base_dir: Path, tmp_path: Path) -> Path:
    return random_adapter(base_dir, tmp_path / "adapter", seed=0, scale=0.05)


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


def test_a_bin_checkpoint_without_torch_dtype_exports_its_float32_weights_unrounded(
    base_dir: Path, tmp_path: Path
) -> None:
    """With no torch_dtype in config.json, the default export dtype of a .bin checkpoint was
    NeoXConfig's float16 default, rounding float32 weights; it is now `checkpoint_dtype`'s
    lossless float32, as transformers loads these weights."""
    from safetensors.torch import load_file

    source = tmp_path / "bin"
    source.mkdir()
    raw = json.loads((base_dir / "config.json").read_text())
    del raw["torch_dtype"]
    (source / "config.json").write_text(json.dumps(raw))
    (source / "tokenizer.json").write_text((base_dir / "tokenizer.json").read_text())
    torch.save(load_file(base_dir / "model.safetensors"), source / "pytorch_model.bin")
    assert transformers.GPTNeoXForCausalLM.from_pretrained(source).dtype == torch.float32
    out = export_checkpoint(source, tmp_path / "out", merge_lora=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert torch.equal(ours(out), ours(base_dir))


# ---------------------------------------------------------------------------- adapters
def test_adapter_needs_merge_flag(adapter_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--merge-lora"):
        export_checkpoint(adapter_dir, tmp_path / "out", merge_lora=False)
    assert not (tmp_path / "out").exists()


def test_an_adapter_peft_cannot_merge_is_a_clear_error(adapter_dir: Path, tmp_path: Path) -> None:
    """aLoRA adapters (PEFT >= 0.17) load but cannot be merged: PEFT's NotImplementedError
    was a traceback from `tulu export --merge-lora` and from loading ADAPTER_DIR."""
    if not hasattr(peft.LoraConfig(), "alora_invocation_tokens"):
        pytest.skip("this PEFT has no aLoRA")
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "alora_invocation_tokens": [7, 8]}))
    with pytest.raises(CheckpointError, match="PEFT cannot merge this adapter: .*aLoRA"):
        export_checkpoint(adapter_dir, tmp_path / "merged", merge_lora=True)
    assert not (tmp_path / "merged").exists()


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


# ---------------------------------------------------------------------------- regressions
def test_tied_head_adapter_leaves_the_input_embedding_alone(tmp_path: Path) -> None:
    """A LoRA on the head of a tied model adapts the head only; merging into the shared
    weight used to change the input embedding too (logits off by ~0.1)."""
    from tulu.train.lora import apply_lora, save_adapter

    tied = TINY.with_(tie_word_embeddings=True)
    base = save_model(build_model(tied, seed=5), tmp_path / "base", tokenizer=tiny_tokenizer())
    lora = LoraConfig(r=4, alpha=8, target_modules=["query_key_value", "embed_out"])
    model = apply_lora(load_model(base), lora, base_model_path=base)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = save_adapter(model, tmp_path / "adapter")
    out = export_checkpoint(adapter, tmp_path / "merged", merge_lora=True)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    expected = adapted_logits(adapter, base)
    torch.testing.assert_close(ours(out), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(out), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["query_key_value", "lm_head"]},
        {"target_modules": ["query_key_value"], "modules_to_save": ["lm_head"]},
    ],
    ids=["lora-on-lm_head", "modules_to_save"],
)
def test_a_tied_head_adapted_on_transformers_5_exports_untied(tmp_path: Path, lora: dict) -> None:
    """An adapter made with PEFT on transformers 5 that changes the LM head (lm_head there) of
    a tied base: it was refused; then a head from modules_to_save was merged as its own
    module but saved tied again, i.e. dropped for the input embedding (logits off by ~5)."""
    tied = TINY.with_(tie_word_embeddings=True)
    base = save_model(build_model(tied, seed=5), tmp_path / "base", tokenizer=tiny_tokenizer())
    adapter, expected = transformers_adapter(
        base, tmp_path / "adapter", IDS, seed=1, scale=0.05, **lora
    )
    out = export_checkpoint(adapter, tmp_path / "merged", merge_lora=True)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(ours(out), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs(out), expected, atol=1e-5, rtol=1e-5)


def test_unusable_output_fails_before_loading(base_dir: Path, tmp_path: Path, capsys) -> None:
    from tulu.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    loop = tmp_path / "loop"  # pathlib's RuntimeError when compared with the source
    loop.symlink_to(loop)
    for output in (a_file, a_file / "sub", loop):
        capsys.readouterr()
        assert main(["export", str(base_dir), "--output", str(output)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"tulu export: error: --output {output}:" in err
    assert a_file.read_text() == "mine"


def test_existing_output_is_replaced_only_when_it_is_an_export(
    base_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    save_model(load_model(base_dir), out, tokenizer=tiny_tokenizer(), max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()  # a sharded previous export
    export_checkpoint(base_dir, out, merge_lora=False, dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base_dir.iterdir())
    assert stored_dtype(out) == torch.bfloat16
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("notes")
    (mine / "model_v1.safetensors").write_bytes(b"weights")
    (mine / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"--output .*mine: holds 2 item.*'README.md'"):
        export_checkpoint(base_dir, mine, merge_lora=False)
    assert sorted(p.name for p in mine.iterdir()) == [
        "README.md",
        "config.json",
        "model_v1.safetensors",
    ]
    assert (mine / "config.json").read_text() == "{}"


def test_failed_write_keeps_the_previous_export(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    out = export_checkpoint(base_dir, tmp_path / "out", merge_lora=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"--output .*out.*No space left"):
        export_checkpoint(base_dir, out, merge_lora=False, dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # no staging left


def test_bad_adapter_config_values_name_the_file(adapter_dir: Path, tmp_path: Path) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # PEFT: TypeError, ValueError, re.error (a traceback)
    for bad in ({"r": "four"}, {"layers_pattern": "layers"}, {"target_modules": ".*(dense"}):
        config_path.write_text(json.dumps({**config, **bad}))
        with pytest.raises(CheckpointError, match="adapter_config.json: PEFT cannot"):
            export_checkpoint(adapter_dir, tmp_path / "o1", merge_lora=True)

    moved = str(tmp_path / "elsewhere" / "base")  # the base moved since training
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": moved}))
    with pytest.raises(CheckpointError, match="adapter_config.json.*base_model_name_or_path"):
        export_checkpoint(adapter_dir, tmp_path / "o2", merge_lora=True)


def test_tokenizer_larger_than_the_vocabulary_is_refused(base_dir: Path, tmp_path: Path) -> None:
    from tokenizers import models as tokenizer_models

    words = {f"w{i}": i for i in range(TINY.vocab_size + 1)}  # one id past the embeddings
    big = Tokenizer(Backend(tokenizer_models.WordLevel(words, unk_token="w0")))
    with pytest.raises(TokenizerError, match=r"321 ids but the model .*base.* has 320"):
        export_checkpoint(base_dir, tmp_path / "out", merge_lora=False, tokenizer=big)
    assert not (tmp_path / "out").exists()


def test_generation_config_stops_at_the_tokenizers_eos(base_dir: Path, tmp_path: Path) -> None:
    """tulu stops at the tokenizer's EOS and the chat template ends turns with it; the
    generation_config.json that transformers' generate (and vLLM, TGI) stop at said the
    model config's id instead, so a model exported with a tokenizer whose EOS is another
    token ran on past every assistant turn outside tulu."""
    with_end = tiny_tokenizer(eos_token="<|end|>")
    config_eos = json.loads((base_dir / "config.json").read_text())["eos_token_id"]
    assert with_end.eos_token_id == 1 != config_eos
    out = export_checkpoint(base_dir, tmp_path / "out", merge_lora=False, tokenizer=with_end)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == 1
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == 1
    assert (generation.bos_token_id, generation.pad_token_id) == (0, 0)


def test_a_run_directory_points_at_what_it_can_export(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "step-000004" / "state").mkdir(parents=True)
    (run / "step-000004" / "state" / ".metadata").write_bytes(b"")
    (run / "step-000004" / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"export .*run/final or .*run/step-000004$"):
        export_checkpoint(run, tmp_path / "out", merge_lora=False)


def test_an_adapter_directory_loads_merged_for_generate_chat_serve_and_eval(
    adapter_dir: Path, base_dir: Path, tmp_path: Path, capsys
) -> None:
    """`tulu generate/chat/serve/eval ADAPTER_DIR` run the base with the adapter merged, as
    `tulu export --merge-lora` would write it (they used to refuse: no config.json)."""
    from tulu.cli import main
    from tulu.pretrained import load_pretrained

    loaded = load_pretrained(adapter_dir, dtype="float32", device="cpu")
    exported = export_checkpoint(adapter_dir, tmp_path / "merged", merge_lora=True, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(IDS), adapted_logits(adapter_dir, base_dir), rtol=1e-5, atol=1e-5
        )
        assert torch.equal(loaded.model(IDS), ours(exported))
    assert not any(p.requires_grad for p in loaded.model.parameters())
    with pytest.raises(CheckpointError, match="revision 'v1' applies to hub ids only"):
        load_pretrained(adapter_dir, dtype="float32", device="cpu", revision="v1")
    names = {p.name for p in loaded.weight_files}  # the eval cache's key covers both
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= names
    texts = []
    for model in (adapter_dir, exported):
        argv = ["generate", str(model), "--device", "cpu", "--dtype", "float32", "--raw"]
        assert main([*argv, "--prompt", TEXT, "--max-tokens", "8"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
