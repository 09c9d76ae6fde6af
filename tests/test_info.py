"""`tulu info` (tulu.pretrained.describe): numbers against transformers, and broken inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.conftest import build_model
from tulu.cli import main
from tulu.model import preset
from tulu.model.checkpoint import save_model
from tulu.pretrained import describe
from tulu.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TINY = preset("pythia-14m", num_hidden_layers=2, vocab_size=320)  # hidden 128, 4 heads


def tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    vocab = {"<|endoftext|>": 0, **{chr(97 + i): i + 1 for i in range(26)}}
    return Tokenizer(Backend(models.WordLevel(vocab, unk_token="<|endoftext|>")))


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_match_transformers(tied: bool, tmp_path: Path) -> None:
    config = TINY.with_(tie_word_embeddings=tied)
    with torch.device("meta"):
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_dict()))
    info = describe(save_model(build_model(config), tmp_path / "model"))
    assert info["parameters"] == hf.num_parameters()
    assert info["weights_bytes"] == 4 * hf.num_parameters()  # float32, as saved


def test_broken_tokenizer_is_an_error_not_an_omission(tmp_path: Path, capsys) -> None:
    directory = save_model(build_model(TINY), tmp_path / "model", tokenizer=tokenizer())
    assert describe(directory)["tokenizer_size"] == 27
    (directory / "tokenizer.json").write_text("{not json")
    assert main(["info", str(directory)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tulu info: error: ") and len(err.splitlines()) == 1, err
    assert "tokenizer.json" in err
    (directory / "tokenizer.json").unlink()  # no tokenizer at all: info without one
    info = describe(directory)
    assert "tokenizer_size" not in info and info["parameters"] == TINY.num_parameters()


def test_a_tied_config_with_a_separate_stored_head_counts_it(tmp_path: Path) -> None:
    """Such a checkpoint loads untied (as in transformers): info counts the head it loads."""
    from safetensors.torch import load_file, save_file

    directory = save_model(build_model(TINY.with_(tie_word_embeddings=True)), tmp_path / "m")
    tied = describe(directory)["parameters"]
    state = load_file(directory / "model.safetensors")
    state["embed_out.weight"] = state["gpt_neox.embed_in.weight"] + 1
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="untied"):
        info = describe(directory)
    assert info["parameters"] == tied + TINY.vocab_size * TINY.hidden_size
    (directory / "model.safetensors").unlink()  # config only: the config stands
    assert describe(directory)["parameters"] == tied


@pytest.mark.parametrize("tied", [False, True])
def test_a_lora_adapter_directory_is_described_as_it_loads(tied: bool, tmp_path: Path) -> None:
    """`tulu chat/serve/generate ADAPTER_DIR` load the base with the adapter merged in; info
    describes that model (an adapted tied head gets its own weight when merged)."""
    pytest.importorskip("peft")
    from tulu.pretrained import load_pretrained
    from tulu.train.config import LoraConfig
    from tulu.train.lora import apply_lora, save_adapter

    config = TINY.with_(tie_word_embeddings=tied)
    base = save_model(build_model(config), tmp_path / "base", tokenizer=tokenizer())
    lora = LoraConfig(r=2, target_modules=["query_key_value", "embed_out"])
    adapter = save_adapter(
        apply_lora(build_model(config), lora, base_model_path=base), tmp_path / "adapter"
    )
    info = describe(adapter)
    loaded = load_pretrained(adapter, dtype="float32", device="cpu").model
    assert info["parameters"] == sum(p.numel() for p in loaded.parameters())
    assert info["tokenizer_size"] == 27 and str(base) in info["source"]
    assert main(["info", str(adapter)]) == 0


@pytest.mark.parametrize(
    ("lora", "untied"),
    [
        ({"target_modules": ["query_key_value", "lm_head"]}, True),
        ({"target_modules": ["query_key_value"], "modules_to_save": ["lm_head"]}, True),
        ({"target_modules": ["query_key_value", "embed_out"]}, False),  # matched no layer
    ],
    ids=["lora-on-lm_head", "modules_to_save", "embed_out-unmatched"],
)
def test_an_adapter_made_on_transformers_5_is_described_as_it_loads(
    tmp_path: Path, lora: dict, untied: bool
) -> None:
    """Whether the merged model of a tied base gets a head of its own follows the adapter's
    tensors: transformers 5 calls the head lm_head, and may save a head in modules_to_save
    or none for a target embed_out; info read target_modules for embed_out only."""
    pytest.importorskip("peft")
    from train.conftest import transformers_adapter
    from tulu.pretrained import load_pretrained

    config = TINY.with_(tie_word_embeddings=True)
    base = save_model(build_model(config), tmp_path / "base", tokenizer=tokenizer())
    ids = torch.zeros(1, 1, dtype=torch.long)
    adapter, _ = transformers_adapter(base, tmp_path / "adapter", ids, seed=0, scale=0.1, **lora)
    info = describe(adapter)
    loaded = load_pretrained(adapter, dtype="float32", device="cpu").model
    assert info["parameters"] == sum(p.numel() for p in loaded.parameters())
    own_head = TINY.vocab_size * TINY.hidden_size
    assert info["parameters"] == config.num_parameters() + untied * own_head
    from safetensors.torch import load_file  # PEFT's older pickle format reads the same

    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()
    assert describe(adapter)["parameters"] == info["parameters"]


def test_a_hub_id_is_described_without_downloading_its_weights(tmp_path: Path, monkeypatch) -> None:
    """info needs config.json (and tokenizer.json): fetching a 6.9B model's 14 GB of weights
    for it would be a needless download."""
    from model.test_checkpoint import fake_hub

    save_model(build_model(TINY), tmp_path / "remote" / "org" / "m", tokenizer=tokenizer())
    calls = fake_hub(monkeypatch, tmp_path / "remote", tmp_path / "cache")
    info = describe("org/m")
    assert info["parameters"] == TINY.num_parameters() and info["tokenizer_size"] == 27
    fetched = (tmp_path / "cache" / "org" / "m").iterdir()
    assert [f.name for f in fetched if f.suffix in (".safetensors", ".bin")] == []
    assert len(calls) == 1


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_a_config_without_torch_dtype_reports_the_stored_weights_dtype(
    stored: torch.dtype, tmp_path: Path, capsys
) -> None:
    """config.json without torch_dtype was reported (and sized) as float16, NeoXConfig's
    Pythia default; transformers loads such a checkpoint in the dtype its weights are in."""
    import json

    directory = save_model(build_model(TINY), tmp_path / "m", dtype=stored)
    raw = json.loads((directory / "config.json").read_text())
    del raw["torch_dtype"]
    (directory / "config.json").write_text(json.dumps(raw))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(directory)
    assert hf.dtype == stored
    info = describe(directory)
    name = str(stored).removeprefix("torch.")
    assert info["checkpoint_dtype"] == info["dtype"] == name
    assert info["checkpoint_dtype_from"] == "weights"
    assert info["weights_bytes"] == stored.itemsize * hf.num_parameters()
    assert info["kv_cache_bytes_per_token"] == TINY.kv_cache_bytes_per_token(stored)
    assert main(["info", str(directory)]) == 0
    rows = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    note = "read from the weights: config.json names none"
    assert rows["dtype"].strip() == f"{name} (checkpoint: {name}, {note})"
    (directory / "model.safetensors").unlink()  # nothing to read: torch's default, said so
    info = describe(directory)
    assert (info["checkpoint_dtype"], info["checkpoint_dtype_from"]) == ("float32", "assumed")
    assert info["weights_bytes"] == 4 * hf.num_parameters()
