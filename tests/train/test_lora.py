"""LoRA through PEFT on our model (tulu.train.lora).

The interoperability oracle is the real thing: an adapter we save is loaded by
`peft.PeftModel.from_pretrained` onto transformers' GPTNeoXForCausalLM (built by
`from_pretrained` on the base checkpoint we wrote with `save_model`), and must give our
logits. The adapters' B matrices are randomised first: PEFT initialises B to zero, and an
adapter that changes nothing would make every comparison pass trivially.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from model.conftest import build_model
from train.conftest import transformers_5, transformers_adapter
from tulu.errors import CheckpointError, ConfigError
from tulu.model import GPTNeoXForCausalLM, preset
from tulu.model.checkpoint import load_model, save_model
from tulu.train.config import LoraConfig
from tulu.train.lora import (
    adapter_base,
    apply_lora,
    load_adapter,
    lora_targets,
    merge_lora,
    save_adapter,
)

peft = pytest.importorskip("peft")

TINY = preset(
    "pythia-70m",
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=256,
    num_attention_heads=4,
    vocab_size=256,
)
LORA = LoraConfig(enabled=True, r=4, alpha=8)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def randomize_adapters(peft_model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return save_model(build_model(TINY, seed=5), tmp_path / "base")


@pytest.fixture
def adapted(base_dir: Path) -> nn.Module:
    model = apply_lora(load_model(base_dir, dtype=torch.float32), LORA, base_model_path=base_dir)
    randomize_adapters(model)
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS)


def test_only_adapters_train(adapted: nn.Module) -> None:
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x 4 target modules x (A, B)
    assert len(trainable) == 2 * 4 * 2
    assert any(n.endswith("attention.dense.lora_A.default.weight") for n in trainable)
    frozen = [n for n, p in adapted.named_parameters() if not p.requires_grad]
    assert any("embed_out" in n for n in frozen) and any("layernorm" in n for n in frozen)


def test_targets_follow_peft_suffix_rule() -> None:
    model = build_model(TINY)
    names = lora_targets(model, ["dense"])
    assert names == ["gpt_neox.layers.0.attention.dense", "gpt_neox.layers.1.attention.dense"]
    with pytest.raises(ConfigError, match="'nope'.*names no layer"):
        lora_targets(model, ["dense", "nope"])
    with pytest.raises(ConfigError, match="not a linear layer"):
        apply_lora(model, LoraConfig(target_modules=["layers"]))


def test_adapter_loads_in_transformers_with_same_logits(
    adapted: nn.Module, base_dir: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    directory = save_adapter(adapted, tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (directory / "adapter_model.safetensors").is_file()
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert sorted(config["target_modules"]) == sorted(LORA.target_modules)
    assert "auto_mapping" not in config or config["auto_mapping"] is None

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], dtype=torch.float32
    ).eval()
    with torch.no_grad():
        plain = hf(input_ids=IDS).logits
    hf_adapted = peft.PeftModel.from_pretrained(hf, str(directory)).eval()
    assert isinstance(hf_adapted, peft.PeftModelForCausalLM)
    with torch.no_grad():
        theirs = hf_adapted(input_ids=IDS).logits
    ours = logits(adapted)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the adapter does change the output


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["query_key_value", "lm_head"]},  # PEFT saves the head's weight too
        {"target_modules": ["query_key_value"], "modules_to_save": ["lm_head"]},
        {"target_modules": r".*\.dense|lm_head"},
        # no layer of transformers 5's is called embed_out: PEFT adapts only query_key_value
        {"target_modules": ["query_key_value", "embed_out"]},
    ],
    ids=["lora-on-lm_head", "modules_to_save", "regex", "embed_out-unmatched"],
)
def test_adapters_trained_on_transformers_5_merge_to_their_logits(
    base_dir: Path, tmp_path: Path, lora: dict
) -> None:
    """transformers 5 calls the LM head lm_head, we embed_out: adapters that name it were
    refused as "not the base it was trained on" (and by `tulu serve --lora-modules` with a
    hint to merge them, which failed the same way)."""
    directory, expected = transformers_adapter(
        base_dir, tmp_path / "adapter", IDS, seed=1, scale=0.05, **lora
    )
    merged = merge_lora(load_adapter(load_model(base_dir, dtype=torch.float32), directory))
    torch.testing.assert_close(logits(merged.eval()), expected, atol=1e-5, rtol=1e-5)
    assert (expected - logits(load_model(base_dir, dtype=torch.float32))).abs().max() > 1e-2


@torch.no_grad()
def logits_in_transformers(base_dir: Path, adapter: Path) -> torch.Tensor:
    """The logits on IDS of `adapter` loaded by PEFT onto transformers' GPT-NeoX."""
    hf = transformers_5().GPTNeoXForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, str(adapter)).eval()(input_ids=IDS).logits


def test_a_head_adapter_we_save_loads_in_transformers_5_with_our_logits(
    base_dir: Path, tmp_path: Path
) -> None:
    """An adapter of ours on embed_out named it so; transformers 5 calls the head lm_head, so
    PEFT there left the head unadapted, with at most a warning (logits off by ~0.2)."""
    head = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["query_key_value", "embed_out"])
    adapted = apply_lora(load_model(base_dir, dtype=torch.float32), head, base_model_path=base_dir)
    randomize_adapters(adapted)
    directory = save_adapter(adapted.eval(), tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["lm_head", "query_key_value"]
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as handle:
        heads = sorted(k for k in handle.keys() if "gpt_neox" not in k)
    # as PEFT on transformers 5 names them (it also saves the base weight, which we leave out)
    assert heads == [f"base_model.model.lm_head.lora_{half}.weight" for half in "AB"]
    expected = logits(adapted)
    torch.testing.assert_close(logits_in_transformers(base_dir, directory), expected)
    ours = load_adapter(load_model(base_dir, dtype=torch.float32), directory).eval()
    torch.testing.assert_close(logits(ours), expected, atol=0, rtol=0)

    # what tulu saved before: PEFT's names for our model, embed_out; still loads
    old = tmp_path / "old"
    adapted.save_pretrained(str(old), save_embedding_layers=False)
    assert "embed_out" in (old / "adapter_config.json").read_text()
    ours = load_adapter(load_model(base_dir, dtype=torch.float32), old).eval()
    torch.testing.assert_close(logits(ours), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["query_key_value", "lm_head"]},
        {"target_modules": ["query_key_value"], "modules_to_save": ["lm_head"]},
    ],
    ids=["lora-on-lm_head", "modules_to_save"],
)
def test_a_head_adapter_from_transformers_5_saved_again_loads_there(
    base_dir: Path, tmp_path: Path, lora: dict
) -> None:
    """Loaded into tulu, an adapter of transformers 5's head names it embed_out (LoRA or
    modules_to_save); saved again, it named the head so and lost it on transformers 5."""
    directory, expected = transformers_adapter(
        base_dir, tmp_path / "adapter", IDS, seed=1, scale=0.05, **lora
    )
    loaded = load_adapter(load_model(base_dir, dtype=torch.float32), directory)
    again = save_adapter(loaded, tmp_path / "again")
    config = json.loads((again / "adapter_config.json").read_text())
    assert "embed_out" not in json.dumps({k: config[k] for k in lora})
    torch.testing.assert_close(logits_in_transformers(base_dir, again), expected)


def test_an_old_peft_that_cannot_rename_lm_head_is_a_clear_error(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEFT < 0.16 has no key_mapping: it would ignore the argument and leave the head's LoRA
    at its fresh values."""
    lora = {"target_modules": ["query_key_value", "lm_head"]}
    directory, _ = transformers_adapter(base_dir, tmp_path / "a", IDS, seed=1, scale=0.05, **lora)
    original = peft.PeftModel.from_pretrained

    def before_0_16(model, model_id, adapter_name="default", is_trainable=False, config=None, **kw):
        return original(model, model_id, adapter_name, is_trainable, config, **kw)

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", before_0_16)
    with pytest.raises(CheckpointError, match=r"name the LM head lm_head .*needs peft >= 0.16"):
        load_adapter(load_model(base_dir, dtype=torch.float32), directory)


def test_load_adapter_round_trip(adapted: nn.Module, base_dir: Path, tmp_path: Path) -> None:
    directory = save_adapter(adapted, tmp_path / "adapter")
    frozen = load_adapter(load_model(base_dir, dtype=torch.float32), directory).eval()
    assert not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(logits(frozen), logits(adapted), atol=0, rtol=0)
    trainable = load_adapter(load_model(base_dir), directory, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


def test_load_adapter_rejects_a_mismatched_model(adapted: nn.Module, tmp_path: Path) -> None:
    directory = save_adapter(adapted, tmp_path / "adapter")
    other = build_model(TINY.with_(hidden_size=32, intermediate_size=128))
    with pytest.raises(CheckpointError, match=r"does not fit .*size mismatch for \S+lora_A"):
        load_adapter(other, directory)
    # PEFT itself only warns when layers are missing or left over: the adapter of a deeper
    # base lost its last layer's tensors, and a shallower base's left a layer untrained.
    shallower = build_model(TINY.with_(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match=r"tensor \S+layers\.1\.\S+, which matches no"):
        load_adapter(shallower, directory)
    deeper = build_model(TINY.with_(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"tensor \S+layers\.2\.\S+ is not in the adapter"):
        load_adapter(deeper, directory)
    (directory / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable adapter weights"):
        load_adapter(build_model(TINY), directory)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_adapter(build_model(TINY), directory)


def test_save_keeps_a_hub_id_and_restores_the_live_config(
    adapted: nn.Module, tmp_path: Path
) -> None:
    directory = save_adapter(adapted, tmp_path / "a", base_model_path="EleutherAI/pythia-70m")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "EleutherAI/pythia-70m"
    live = adapted.peft_config[adapted.active_adapter]
    assert live.task_type is None  # our wrapper stays the plain PeftModel


def test_the_base_revision_is_saved_and_loaded_as_peft_does(
    adapted: nn.Module, tmp_path: Path, monkeypatch
) -> None:
    """An adapter of a hub base at a revision (Pythia's intermediate steps are branches such
    as ``step3000``) records it in PEFT's ``revision`` field and its base is fetched at that
    revision, as `AutoPeftModelForCausalLM` does; the revision was dropped on both sides, so
    the adapter was merged into the ``main`` weights, a different model, without an error."""
    remote = {
        rev: save_model(build_model(TINY, seed=seed), tmp_path / "remote" / rev)
        for rev, seed in (("main", 5), ("step3000", 6))
    }
    fetched: list[tuple[str, str | None]] = []

    def snapshot(repo_id, *, revision, allow_patterns, error):
        fetched.append((repo_id, revision))
        return remote[revision or "main"]

    monkeypatch.setattr("tulu.model.checkpoint.snapshot", snapshot)
    directory = save_adapter(
        adapted, tmp_path / "a", base_model_path="org/pythia", base_model_revision="step3000"
    )
    config = json.loads((directory / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/pythia", "step3000")
    assert peft.PeftConfig.from_pretrained(str(directory)).revision == "step3000"
    assert adapted.peft_config[adapted.active_adapter].revision is None  # restored

    assert adapter_base(directory) == remote["step3000"]
    assert fetched == [("org/pythia", "step3000")]
    # The revision matters: the same adapter merged into main's weights is another model.
    merged = merge_lora(load_adapter(load_model(adapter_base(directory)), directory))
    on_main = merge_lora(load_adapter(load_model(remote["main"]), directory))
    assert not torch.allclose(logits(merged.eval()), logits(on_main.eval()))

    # apply_lora records it too; a revision of a local base would be ignored: refused.
    model = apply_lora(
        build_model(TINY), LORA, base_model_path="org/pythia", base_model_revision="v1"
    )
    assert (
        json.loads((save_adapter(model, tmp_path / "b") / "adapter_config.json").read_text())[
            "revision"
        ]
        == "v1"
    )
    config.update(base_model_name_or_path=str(remote["main"]))
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: .*revision 'step3000'"):
        adapter_base(directory)
    config.update(base_model_name_or_path="org/pythia", revision=3000)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="revision must be a string"):
        adapter_base(directory)


def test_merge_gives_a_plain_model_with_the_same_logits(adapted: nn.Module) -> None:
    before = logits(adapted)
    merged = merge_lora(adapted)
    assert type(merged) is GPTNeoXForCausalLM
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    assert set(merged.state_dict()) == set(build_model(TINY).state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits(merged.eval()), before, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(base_dir: Path) -> None:
    grads = []
    for checkpointing in (False, True):
        model = apply_lora(load_model(base_dir, dtype=torch.float32), LORA)
        randomize_adapters(model)
        model.train()
        model.get_base_model().gradient_checkpointing = checkpointing
        calls: list[int] = []
        layer = model.get_base_model().gpt_neox.layers[0].attention
        layer.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        total, count = model.loss(IDS, IDS)
        (total / count).backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    assert all(g is not None and g.abs().max() > 0 for g in checkpointed.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_a_tied_model_with_an_adapted_head_prepares_for_training() -> None:
    """LoRA on ``embed_out`` of a tied model: the trainer's device move re-ties the head
    (`tie_weights`), which raised KeyError on PEFT's wrapper ("attribute 'weight' already
    exists"), so such a run crashed before its first step."""
    from tulu.train.config import TrainConfig
    from tulu.train.distributed import World, prepare_model

    model = build_model(TINY.with_(tie_word_embeddings=True), seed=5)
    lora = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["query_key_value", "embed_out"])
    config = TrainConfig(lora=lora)
    peft_model = prepare_model(apply_lora(model, lora), World(), config)
    base = peft_model.get_base_model()
    assert base.embed_out.get_base_layer().weight is base.gpt_neox.embed_in.weight
