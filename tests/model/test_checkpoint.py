"""Checkpoint loading and saving: round trips with transformers, every layout, every error."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from tulu.errors import CheckpointError, ConfigError
from tulu.model import GPTNeoXForCausalLM, preset
from tulu.model.checkpoint import load_model, resolve_checkpoint, save_model

transformers = pytest.importorskip("transformers")


def tiny_model(seed: int = 0, **overrides) -> GPTNeoXForCausalLM:
    fields = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        torch_dtype="float32",
    )
    fields.update(overrides)
    model = GPTNeoXForCausalLM(preset("pythia-14m", **fields))
    model.init_weights(seed)
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up cannot go unnoticed
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "layer_norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shard_bytes", [5 * 1000**3, 200_000])
def test_save_load_round_trip_and_transformers_loads_it(tmp_path, shard_bytes):
    model = tiny_model()
    save_model(model, tmp_path, max_shard_bytes=shard_bytes)
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard_bytes < 1000**3:
        assert "model.safetensors.index.json" in files
        assert sum(f.endswith(".safetensors") for f in files) > 1
    else:
        assert "model.safetensors" in files
    assert {"config.json", "generation_config.json"} <= set(files)

    again = load_model(tmp_path)
    assert torch.equal(logits(model, IDS), logits(again, IDS))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model, IDS), logits(hf, IDS))


def test_a_resave_replaces_its_own_weights_and_keeps_a_users_file(tmp_path):
    """Saving again (as shards, then as one file) removes the earlier save's weight files so
    that no stale shard is read, but not a user's model_backup.safetensors beside them."""
    save_model(tiny_model(seed=1), tmp_path, max_shard_bytes=200_000)
    (tmp_path / "model_backup.safetensors").write_bytes(b"the user's")
    save_model(tiny_model(seed=2), tmp_path)
    weights = sorted(p.name for p in tmp_path.glob("*.safetensors*"))
    assert weights == ["model.safetensors", "model_backup.safetensors"]
    assert (tmp_path / "model_backup.safetensors").read_bytes() == b"the user's"
    assert torch.equal(logits(load_model(tmp_path), IDS), logits(tiny_model(seed=2), IDS))


def test_single_file_beside_an_index_loads_what_transformers_loads(tmp_path):
    """With both model.safetensors and a shard index present, transformers reads the single
    file; reading the index instead loaded other weights than the reference does."""
    save_model(tiny_model(seed=1), tmp_path / "sharded", max_shard_bytes=200_000)
    save_model(tiny_model(seed=2), tmp_path / "both")
    for shard in (tmp_path / "sharded").glob("model*"):
        shard.rename(tmp_path / "both" / shard.name)
    assert (tmp_path / "both" / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path / "both")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "both").eval()
    assert torch.equal(logits(ours, IDS), logits(hf, IDS))
    assert torch.equal(logits(ours, IDS), logits(tiny_model(seed=2), IDS))


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert again.embed_out.weight is again.gpt_neox.embed_in.weight
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(model, IDS), logits(hf, IDS), atol=1e-5)


def test_loads_what_transformers_saves(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "ours")
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "theirs")
    again = load_model(tmp_path / "theirs")
    assert torch.equal(logits(model, IDS), logits(again, IDS))


def test_loads_into_requested_dtype(tmp_path):
    save_model(tiny_model(), tmp_path)
    model = load_model(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_a_config_without_torch_dtype_loads_in_the_stored_weights_dtype(tmp_path, stored):
    """Without torch_dtype, `load_model`'s default dtype was NeoXConfig's float16 (Pythia's),
    so bfloat16 weights came back as float32 on the CPU (and float32 ones as float16 on a
    GPU); transformers loads the dtype the weights are stored in, and so do we now."""
    save_model(tiny_model(), tmp_path, dtype=stored)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_model(tmp_path)
    assert hf.dtype == stored
    assert {p.dtype for p in ours.parameters()} == {stored}
    assert torch.equal(logits(ours, IDS), logits(hf, IDS))


def _write_bin_checkpoint(model, directory: Path, shards: int = 1) -> None:
    directory.mkdir(parents=True)
    model.config.save(directory)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Old transformers versions saved these buffers; loading must ignore them.
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards]}
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, directory / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_loads_pytorch_bin(tmp_path, shards):
    model = tiny_model()
    _write_bin_checkpoint(model, tmp_path / "ckpt", shards)
    again = load_model(tmp_path / "ckpt")
    assert torch.equal(logits(model, IDS), logits(again, IDS))


class Payload:
    """An object whose unpickling would run code: weights_only must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/tulu-pwned",))


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    model = tiny_model()
    _write_bin_checkpoint(model, tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "pytorch_model.bin", weights_only=True)
    state["evil"] = Payload()
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(tmp_path / "ckpt")
    assert not Path("/tmp/tulu-pwned").exists()


# ------------------------------------------------------------------------------- errors
def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path)
    tiny_model().config.save(tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path)


def test_wrong_model_type(tmp_path):
    save_model(tiny_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'llama'"):
        load_model(tmp_path)


def test_wrong_shape_names_the_tensor(tmp_path):
    save_model(tiny_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"tensor .gpt_neox\.layers\.0\.mlp\.dense_(h_to_4h|4h_to_h)\.weight. has shape",
    ):
        load_model(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(tiny_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    del state["gpt_neox.final_layer_norm.bias"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensors: gpt_neox.final_layer_norm.bias"):
        load_model(tmp_path)
    state["gpt_neox.final_layer_norm.bias"] = torch.zeros(64)
    state["lm_head.extra"] = torch.zeros(3)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'lm_head.extra'"):
        load_model(tmp_path)


def test_truncated_and_corrupt_safetensors(tmp_path):
    save_model(tiny_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)
    path.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path)
    header_len = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:8] + b"{not json" + data[17 : 8 + header_len] + data[8 + header_len :])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(tmp_path)


def test_overlapping_safetensors_entries(tmp_path):
    save_model(tiny_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    a, b = "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"
    header[b]["data_offsets"] = header[a]["data_offsets"]  # same shape: b would read a's bytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (header_len - len(raw))  # keep the data offsets valid
    path.write_bytes(data[:8] + raw + data[8 + header_len :])
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header: tensors .* overlap"):
        load_model(tmp_path)


def test_truncated_bin(tmp_path):
    _write_bin_checkpoint(tiny_model(), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "ckpt")


def test_missing_shard(tmp_path):
    save_model(tiny_model(), tmp_path, max_shard_bytes=200_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-.*' is listed but missing"):
        load_model(tmp_path)


def _sharded(tmp_path) -> tuple[list[Path], dict]:
    """A checkpoint in several safetensors shards: (shard paths, index dict)."""
    save_model(tiny_model(), tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    return sorted(tmp_path.glob("model-*.safetensors")), index


def test_tensor_stored_in_two_shards_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    shards, _ = _sharded(tmp_path)
    first, second = load_file(shards[0]), load_file(shards[1])
    name = next(iter(first))
    second[name] = torch.zeros_like(first[name])  # a stale copy: which one is right?
    save_file(second, shards[1], metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"'{name}' is stored twice .*{shards[0].name}"):
        load_model(tmp_path)


def test_embed_out_and_lm_head_together_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(tiny_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"] = state["embed_out.weight"] * 2  # both names of the same head
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' is stored twice"):
        load_model(tmp_path)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("head", ["embed_out.weight", "lm_head.weight"])
def test_a_tied_config_with_a_different_stored_head_loads_untied_like_transformers(
    tmp_path, head, layout
):
    """config.json ties the head, the weights hold another one: transformers keeps both (and
    warns). We refused such checkpoints; now both libraries give the same logits."""
    from safetensors.torch import load_file, save_file

    save_model(tiny_model(tie_word_embeddings=True), tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state[head] = state["gpt_neox.embed_in.weight"].flip(0).contiguous()
    if layout == "bin":
        path.unlink()
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        save_file(state, path, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="tie_word_embeddings true.*differs.*untied"):
        ours = load_model(tmp_path)
    assert not ours.config.tie_word_embeddings
    assert ours.embed_out.weight is not ours.gpt_neox.embed_in.weight
    assert torch.equal(ours.embed_out.weight, state[head])
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(ours, IDS), logits(hf, IDS))
    save_model(ours, tmp_path / "again")  # re-saved untied: no warning next time
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(logits(load_model(tmp_path / "again"), IDS), logits(ours, IDS))


def test_a_tied_config_with_an_equal_stored_head_stays_tied(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(tiny_model(tie_word_embeddings=True), tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"] = state["gpt_neox.embed_in.weight"].clone()
    save_file(state, path, metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = load_model(tmp_path)
    assert ours.embed_out.weight is ours.gpt_neox.embed_in.weight
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(ours, IDS), logits(hf, IDS))


def test_tensor_not_in_the_shard_its_index_names(tmp_path):
    from safetensors.torch import load_file, save_file

    shards, index = _sharded(tmp_path)
    first, second = load_file(shards[0]), load_file(shards[1])
    name = next(iter(first))
    second[name] = first.pop(name)  # moved to another shard; the index still says shards[0]
    save_file(first, shards[0], metadata={"format": "pt"})
    save_file(second, shards[1], metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=rf"index.json: lists tensor '{name}' in '{shards[0].name}', but that file",
    ):
        load_model(tmp_path)


@pytest.mark.parametrize("shard", [["model-00001.safetensors"], {"a": 1}, 3, None])
def test_index_naming_a_shard_by_a_non_string_is_an_error(tmp_path, shard):
    """A list or object as a shard name used to crash with a raw TypeError (unhashable)."""
    _, index = _sharded(tmp_path)
    index["weight_map"]["gpt_neox.embed_in.weight"] = shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"index.json: invalid shard index \(tensor 'gpt_neox.embed_in.weight' is "
        r"mapped to .*, not a file name\)",
    ):
        load_model(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux /proc/self/mem")
def test_an_unreadable_shard_index_is_an_error(tmp_path):
    """An OSError reading the index (permissions, I/O) escaped as a raw traceback."""
    _sharded(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.unlink()
    index.symlink_to("/proc/self/mem")  # a regular file whose first bytes fail with EIO
    with pytest.raises(CheckpointError, match=r"index.json: cannot read"):
        load_model(tmp_path)


def test_checkpoint_without_the_gpt_neox_prefix_loads_like_transformers(tmp_path):
    """transformers adds the missing `gpt_neox.` prefix when it loads such a file (a trunk
    saved on its own plus a head); we refused it as 'not part of a GPT-NeoX model'."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    save_model(model, tmp_path)
    path = tmp_path / "model.safetensors"
    state = {k.removeprefix("gpt_neox."): v for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_model(tmp_path)
    assert torch.equal(logits(ours, IDS), logits(model, IDS))
    assert torch.equal(logits(ours, IDS), logits(hf, IDS))
    # A trunk alone (GPTNeoXModel.save_pretrained) lacks the head: refused, naming it
    # (transformers would give the LM head random values).
    del state["embed_out.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors: embed_out.weight$"):
        load_model(tmp_path)
    # Both spellings of one tensor: refused, as any tensor stored twice.
    state["embed_out.weight"] = model.embed_out.weight.detach().clone()
    state["gpt_neox.final_layer_norm.bias"] = state["final_layer_norm.bias"].clone()
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'.*final_layer_norm.bias' is stored twice"):
        load_model(tmp_path)


def test_bin_shard_lacking_an_indexed_tensor(tmp_path):
    _write_bin_checkpoint(tiny_model(), tmp_path / "ckpt", shards=2)
    index_path = tmp_path / "ckpt" / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["gpt_neox.embed_in.weight"] = "pytorch_model-00002-of-00002.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists tensor 'gpt_neox.embed_in.weight' in"):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_non_float_weight_names_the_tensor(tmp_path, layout):
    from safetensors.torch import save_file

    state = dict(tiny_model().state_dict())
    state["gpt_neox.final_layer_norm.bias"] = torch.zeros(64, dtype=torch.int64)
    tiny_model().config.save(tmp_path)
    if layout == "bin":
        torch.save(state, tmp_path / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match="'gpt_neox.final_layer_norm.bias' has dtype int64, expected a float"
    ):
        load_model(tmp_path)


# ------------------------------------------------------------------------------- hub ids
def _fake_hub_cache(cache: Path, repo_id: str, model) -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_model(model, repo / "snapshots" / commit)


def test_hub_id_resolves_through_offline_cache(tmp_path):
    model = tiny_model()
    _fake_hub_cache(tmp_path / "hub", "EleutherAI/pythia-tiny", model)
    script = textwrap.dedent(
        """
        import sys, torch
        from tulu.errors import CheckpointError
        from tulu.model.checkpoint import load_model
        m = load_model("EleutherAI/pythia-tiny")
        ids = torch.arange(10).unsqueeze(0)
        with torch.no_grad():
            print(float(m(ids).sum()))
        try:
            load_model("EleutherAI/not-cached")
        except CheckpointError as err:
            print("ERR", err)
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    with torch.no_grad():
        expected = float(model(torch.arange(10).unsqueeze(0)).sum())
    assert float(lines[0]) == pytest.approx(expected, rel=1e-6)
    assert lines[1].startswith("ERR EleutherAI/not-cached: not found in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in lines[1]


def fake_hub(monkeypatch, remote: Path, cache: Path) -> list[list[str]]:
    """Route hub ids to `remote` (one folder per repo id): each snapshot "downloads" the
    files its allow_patterns match into `cache`, as huggingface_hub does; returns the calls'
    patterns."""
    import fnmatch
    import shutil

    calls: list[list[str]] = []

    def snapshot(repo_id, *, revision, allow_patterns, error):
        calls.append(list(allow_patterns))
        out = cache / repo_id
        out.mkdir(parents=True, exist_ok=True)
        for f in (remote / repo_id).iterdir():
            if any(fnmatch.fnmatch(f.name, pattern) for pattern in allow_patterns):
                shutil.copy(f, out / f.name)
        return out

    monkeypatch.setattr("tulu.model.checkpoint.snapshot", snapshot)
    return calls


def test_hub_download_fetches_one_copy_of_the_weights(tmp_path, monkeypatch):
    """A repository with both safetensors and .bin weights (as many have) downloads the
    safetensors only, as transformers does; one with .bin weights only still loads."""
    model = tiny_model()
    both = save_model(model, tmp_path / "remote" / "org" / "both")
    torch.save(model.state_dict(), both / "pytorch_model.bin")
    bin_only = tmp_path / "remote" / "org" / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((both / "config.json").read_text())
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")
    calls = fake_hub(monkeypatch, tmp_path / "remote", tmp_path / "cache")

    assert torch.equal(logits(load_model("org/both"), IDS), logits(model, IDS))
    assert not list((tmp_path / "cache" / "org" / "both").glob("*.bin"))
    assert len(calls) == 1
    assert torch.equal(logits(load_model("org/bin-only"), IDS), logits(model, IDS))
    assert len(calls) == 3 and "*.bin" in calls[-1]


def test_local_looking_paths_are_not_hub_ids(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint("./models/pythia")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "a" / "b"))


# ------------------------------------------------------------------------------- memory
# VmHWM (this process's peak RSS) rather than ru_maxrss, which survives exec and so reports the
# parent's peak in a child process.
PEAK_RSS_SCRIPT = """
import sys, torch
import torch._dynamo  # imported by nn.init on first use; with triton installed it maps
                      # libtriton, which must not count as the loader's memory
from tulu.model.checkpoint import load_model

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

torch.set_num_threads(1)
base = peak_kib()
model = load_model(sys.argv[1], dtype=sys.argv[2])
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print((peak_kib() - base) * 1024, weights)
"""


@pytest.mark.slow
def test_peak_memory_while_loading_100m_checkpoint(tmp_path):
    """Loading must not hold a second full copy of the weights (meta init + streamed reads)."""
    config = preset(
        "pythia-70m",
        hidden_size=640,
        num_hidden_layers=10,
        num_attention_heads=10,
        intermediate_size=2560,
        torch_dtype="float32",
    )
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(0.01)
    assert 100e6 < config.num_parameters() < 130e6
    save_model(model, tmp_path)
    del model
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS_SCRIPT, str(tmp_path), dtype],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        grown, weights = map(int, out.stdout.split())
        print(
            f"{dtype}: peak RSS growth {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights "
            f"({grown / weights:.2f}x)"
        )
        assert grown < 1.5 * weights, (dtype, grown / weights)
