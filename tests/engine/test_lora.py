"""Unmerged multi-LoRA (`tulu.engine.lora`): each row computes as its own merged adapter.

The reference for every adapter is PEFT's merge of it into the base (`tulu.train.lora`),
the path `tulu export --merge-lora` and `tulu serve ADAPTER_DIR` take.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.conftest import check_idle, random_model, tiny_config
from train.conftest import random_adapter, transformers_adapter
from tulu.engine.engine import EngineConfig, LLMEngine, RequestOutput
from tulu.engine.reference import generate_ids
from tulu.engine.sampling import SamplingParams
from tulu.errors import CheckpointError, GenerationError
from tulu.model.checkpoint import load_model, save_model

peft = pytest.importorskip("peft")

from tulu.engine.lora import LoraAdapters, parse_lora_modules  # noqa: E402 - needs peft
from tulu.train.lora import load_adapter, merge_lora  # noqa: E402

TINY = tiny_config(vocab_size=320)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def make_adapter(base_dir: Path, out: Path, seed: int, **lora) -> Path:
    return random_adapter(base_dir, out, seed=seed, scale=0.2, **lora)


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = save_model(random_model(TINY, seed=11), root / "base")
    poet = make_adapter(base, root / "poet", seed=2, r=2, alpha=6, target_modules=["dense_h_to_4h"])
    _edit_config(poet, use_rslora=True)  # another rank, fewer layers, rsLoRA's scale
    return {"base": base, "sql": make_adapter(base, root / "sql", seed=1), "poet": poet}


@torch.no_grad()
def merged_logits(lora_dirs: dict[str, Path], name: str | None, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    if name is not None:
        model = merge_lora(load_adapter(model, lora_dirs[name]))
    return model(ids)


@torch.no_grad()
def test_each_row_computes_as_its_merged_adapter(lora_dirs: dict[str, Path]) -> None:
    model = load_model(lora_dirs["base"], dtype=torch.float32).eval()
    adapters = LoraAdapters(model, {"sql": lora_dirs["sql"], "poet": lora_dirs["poet"]})
    assert adapters.names == ["sql", "poet"] and adapters.slot(None) == 0
    ids = torch.randint(0, 320, (3, 7), generator=torch.Generator().manual_seed(3))
    names = [None, "sql", "poet"]
    # one batch, each sequence with its own adapter: slots per flattened row
    adapters.use([adapters.slot(n) for n in names for _ in range(7)], "cpu")
    mixed = model(ids)
    for i, name in enumerate(names):
        expected = merged_logits(lora_dirs, name, ids[i : i + 1])[0]
        torch.testing.assert_close(mixed[i], expected, rtol=1e-5, atol=1e-5)
        if name is not None:  # the adapter really changes the output
            assert not torch.allclose(mixed[i], merged_logits(lora_dirs, None, ids[i : i + 1])[0])
    # no adapter in a step: the plain base, bit for bit; after remove(), too
    adapters.use([0] * 21, "cpu")
    plain = merged_logits(lora_dirs, None, ids)
    assert torch.equal(model(ids), plain)
    adapters.use([1] * 21, "cpu")
    adapters.remove()
    assert torch.equal(model(ids), plain)


def test_unknown_adapter_name_is_a_clear_error(lora_dirs: dict[str, Path]) -> None:
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    adapters = LoraAdapters(model, {"sql": lora_dirs["sql"]})
    with pytest.raises(GenerationError, match="no adapter named 'sq1' \\(loaded: 'sql'\\)"):
        adapters.slot("sq1")


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (["sql=runs/sql"], "lora_modules must map adapter names to directories, got list"),
        ({1: "runs/sql"}, "LoRA adapter name 1: must be a non-empty string"),
        ({" sql": "runs/sql"}, "without leading or trailing spaces"),
        ({"sql": 5}, "LoRA adapter 'sql': its directory must be a path, got int"),
    ],
)
def test_malformed_lora_modules_are_clear_errors(
    lora_dirs: dict[str, Path], modules: object, message: str
) -> None:
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    with pytest.raises(CheckpointError, match=message):
        LoraAdapters(model, modules)  # type: ignore[arg-type]


def test_paths_that_cannot_be_looked_up_are_clear_errors(
    lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A path the OS refuses to look up (here a name longer than the file system allows;
    a directory without permission does the same) is bad input: reading it raised a raw
    OSError, which a runtime load answered with a 500 and `tulu serve` with a traceback."""
    too_long = tmp_path / ("a" * 300)
    adapters = LoraAdapters(load_model(lora_dirs["base"], dtype=torch.float32), {})
    with pytest.raises(CheckpointError, match="LoRA adapter 'x': cannot read .*aaaa"):
        adapters.read("x", too_long)
    assert adapters.loaded == {}
    with pytest.raises(CheckpointError, match="is not a LoRA adapter directory"):
        parse_lora_modules([f"x={too_long}"])


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "use_dora is set"),
        ({"bias": "all"}, "bias is set"),
        ({"lora_bias": True}, "lora_bias is set"),
        ({"modules_to_save": ["embed_out"]}, "modules_to_save is set"),
        ({"rank_pattern": {"dense": 2}}, "rank_pattern is set"),
        ({"alora_invocation_tokens": [7, 8]}, "alora_invocation_tokens is set"),
        ({"arrow_config": {"top_k": 2}}, "arrow_config is set"),
        ({"r": 8}, r"lora_A.weight has shape \[4, 64\], expected \[8, 64\]"),
        ({"lora_alpha": "x"}, "lora_alpha must be a finite number"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
    ],
)
def test_bad_adapters_are_refused_and_leave_the_model_alone(
    lora_dirs: dict[str, Path], tmp_path: Path, change: dict, message: str
) -> None:
    bad = make_adapter(lora_dirs["base"], tmp_path / "bad", seed=3)
    _edit_config(bad, **change)
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    with pytest.raises(CheckpointError, match=message):
        LoraAdapters(model, {"good": lora_dirs["sql"], "bad": bad})
    assert not any(m._forward_hooks for m in model.modules())


def test_lm_head_adapters_are_refused(lora_dirs: dict[str, Path], tmp_path: Path) -> None:
    head = make_adapter(
        lora_dirs["base"], tmp_path / "head", seed=4, target_modules=["dense", "embed_out"]
    )
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    # saved as transformers 5 names the head (lm_head), and as older versions of tulu did
    with pytest.raises(CheckpointError, match="lm_head.lora_A.weight adapts the LM head.*merge-"):
        LoraAdapters(model, {"head": head})
    from safetensors.torch import load_file, save_file

    weights = head / "adapter_model.safetensors"
    renamed = {k.replace("lm_head", "embed_out"): v for k, v in load_file(weights).items()}
    save_file(renamed, weights)
    with pytest.raises(CheckpointError, match="embed_out.lora_A.weight adapts the LM head"):
        LoraAdapters(model, {"head": head})


def test_a_transformers_5_lm_head_adapter_is_refused_with_a_hint_that_holds(
    lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT on transformers 5 saves an adapted head's base weight too (lm_head.base_layer):
    that tensor was refused as "not a LoRA A/B matrix (embedding LoRA, DoRA ...)"."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    lora = {"target_modules": ["dense", "lm_head"]}
    head, _ = transformers_adapter(
        lora_dirs["base"], tmp_path / "h", ids, seed=4, scale=0.2, **lora
    )
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    with pytest.raises(
        CheckpointError, match=r"lm_head.base_layer.weight adapts the LM head.*merge"
    ):
        LoraAdapters(model, {"head": head})
    assert not any(m._forward_hooks for m in model.modules())
    merge_lora(load_adapter(model, head))  # what the hint says to do works


@torch.no_grad()
def test_a_negative_alpha_subtracts_the_adapter_as_in_peft(
    lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT takes any lora_alpha; a negative one (subtracting an adapter) was refused."""
    import shutil

    negative = Path(shutil.copytree(lora_dirs["sql"], tmp_path / "negative"))
    _edit_config(negative, lora_alpha=-8)
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    adapters = LoraAdapters(model, {"neg": negative})
    ids = torch.arange(3, 13).unsqueeze(0)
    adapters.use([1] * 10, "cpu")
    got = model(ids)
    want = merge_lora(load_adapter(load_model(lora_dirs["base"]), negative))(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    adapters.remove()


@torch.no_grad()
def test_a_float16_adapter_on_a_float32_model_computes_as_its_merge(
    lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """An adapter saved in half precision (trained on a half-precision base) is read in the
    model's dtype, as PEFT's load does."""
    import shutil

    from safetensors.torch import load_file, save_file

    half = Path(shutil.copytree(lora_dirs["sql"], tmp_path / "half"))
    weights = half / "adapter_model.safetensors"
    save_file({k: t.half() for k, t in load_file(weights).items()}, weights)
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    adapters = LoraAdapters(model, {"half": half})
    ids = torch.arange(3, 13).unsqueeze(0)
    adapters.use([1] * 10, "cpu")
    got = model(ids)
    adapters.remove()
    want = merge_lora(load_adapter(load_model(lora_dirs["base"]), half))(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_adapter_of_another_base_is_refused(lora_dirs: dict[str, Path], tmp_path: Path) -> None:
    deeper = save_model(random_model(TINY.with_(num_hidden_layers=3), seed=1), tmp_path / "deep")
    adapter = make_adapter(deeper, tmp_path / "deep-lora", seed=5)
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    with pytest.raises(CheckpointError, match="layers.2.*no linear layer of the model"):
        LoraAdapters(model, {"deep": adapter})


def test_wrong_weights_are_refused_from_their_header_before_any_tensor_is_read(
    lora_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole weights file was read before its names and shapes were checked: a wrong
    file (another base, a whole model) cost its size in memory before the error. Names and
    shapes now come from the safetensors header (a memory map for PEFT's .bin), and no
    tensor is read until all of them fit the model."""
    import safetensors
    import safetensors.torch
    from safetensors.torch import load_file, save_file

    reads: list[str] = []
    real_open = safetensors.safe_open

    class CountingOpen:
        """safe_open that records each tensor it reads (wherever it is imported from)."""

        def __init__(self, *args, **kwargs) -> None:
            self._file = real_open(*args, **kwargs)

        def __enter__(self) -> CountingOpen:
            self._file.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self._file.__exit__(*exc)

        def __getattr__(self, name: str):
            return getattr(self._file, name)

        def get_tensor(self, key: str) -> torch.Tensor:
            reads.append(key)
            return self._file.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    monkeypatch.setattr(safetensors.torch, "safe_open", CountingOpen)
    model = load_model(lora_dirs["base"], dtype=torch.float32)

    wider = save_model(random_model(TINY.with_(hidden_size=128), seed=1), tmp_path / "wide")
    adapter = make_adapter(wider, tmp_path / "wide-lora", seed=5, target_modules=["dense"])
    dense = "base_model.model.gpt_neox.layers.0.attention.dense.lora_A.weight"
    with pytest.raises(CheckpointError, match=rf"{dense} has shape \[4, 128\], expected \[4, 64\]"):
        LoraAdapters(model, {"wide": adapter})
    assert reads == []

    weights = adapter / "adapter_model.safetensors"
    whole_model = {"base_model.model.gpt_neox.layers.0.mlp.dense_h_to_4h.weight": torch.ones(2)}
    lora_only = load_file(weights)
    save_file({**lora_only, **whole_model}, weights)
    reads.clear()
    with pytest.raises(CheckpointError, match="tensor .*dense_h_to_4h.weight is not a LoRA A/B"):
        LoraAdapters(model, {"wide": adapter})
    assert reads == []

    adapters = LoraAdapters(model, {"sql": lora_dirs["sql"]})  # a right one is read, once
    assert sorted(reads) == sorted(load_file(lora_dirs["sql"] / "adapter_model.safetensors"))
    adapters.remove()

    # PEFT's pickle format: memory-mapped, so its shapes are known before its data is read
    maps = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: maps.append(k.get("mmap")) or real_load(*a, **k)
    )
    torch.save(lora_only, adapter / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match=rf"{dense} has shape \[4, 128\]"):
        LoraAdapters(model, {"wide": adapter})
    assert maps == [True]


# ------------------------------------------------------------------------------------ engine


def run_engine(engine: LLMEngine, requests: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Add every (prompt ids, adapter) at once and step until all finish; output ids in order."""
    ids = [engine.add_request(p, GREEDY, lora=name) for p, name in requests]
    done: dict[str, RequestOutput] = {}
    while len(done) < len(ids):
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
    return [done[i].outputs[0].token_ids for i in ids]


@pytest.fixture(scope="module")
def merged_models(lora_dirs: dict[str, Path]) -> dict[str | None, torch.nn.Module]:
    models: dict[str | None, torch.nn.Module] = {None: load_model(lora_dirs["base"]).eval()}
    for name in ("sql", "poet"):
        models[name] = merge_lora(load_adapter(load_model(lora_dirs["base"]), lora_dirs[name]))
        models[name].eval()
    return models


ENGINE_CONFIGS = {
    "plain": dict(block_size=4),
    # a pool for about two requests at a time (preemption), steps of 7 tokens (chunked prefill)
    "tiny-pool-chunked": dict(
        block_size=4, kv_cache_bytes=120 * 2 * 2 * 64 * 4, max_num_batched_tokens=7
    ),
    "no-prefix-caching": dict(block_size=4, enable_prefix_caching=False),
}


@pytest.mark.parametrize("config", ENGINE_CONFIGS.values(), ids=ENGINE_CONFIGS.keys())
def test_engine_mixes_adapters_in_a_batch_token_for_token(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list, config: dict
) -> None:
    """Requests of the base and of two adapters, in one batch, sharing a 16-token prefix: each
    gets its merged model's greedy tokens (a block cached by one adapter and reused by another
    would change them), under preemption and chunked prefill too."""
    model = load_model(lora_dirs["base"]).eval()
    engine = LLMEngine(
        model,
        None,
        EngineConfig(**config),
        lora_modules={"sql": lora_dirs["sql"], "poet": lora_dirs["poet"]},
    )
    _engines.append(engine)
    gen = torch.Generator().manual_seed(7)
    common = torch.randint(0, 320, (16,), generator=gen).tolist()
    names = [None, "sql", "poet"] * 3
    prompts = [common + torch.randint(0, 320, (n,), generator=gen).tolist() for n in range(1, 10)]
    requests = list(zip(prompts, names, strict=True))
    want = [generate_ids(merged_models[n], p, GREEDY).token_ids for p, n in requests]
    assert run_engine(engine, requests) == want
    # the adapters matter: the same prompt gives three different continuations
    same = [
        generate_ids(merged_models[n], prompts[0], GREEDY).token_ids for n in (None, "sql", "poet")
    ]
    assert len({tuple(t) for t in same}) == 3
    # and a second wave hits the prefix cache of its own adapter only
    assert run_engine(engine, requests[:3]) == want[:3]
    if config.get("enable_prefix_caching", True) and "kv_cache_bytes" not in config:
        assert engine.scheduler.prefix_hits > 0
    if "kv_cache_bytes" in config:
        assert engine.stats()["preemptions"] > 0
    check_idle(engine)


def test_engine_refuses_unknown_adapters(lora_dirs: dict[str, Path], _engines: list) -> None:
    model = load_model(lora_dirs["base"]).eval()
    plain = LLMEngine(model, None, EngineConfig())
    with pytest.raises(
        GenerationError, match="no adapter named 'sql' \\(no adapters are loaded\\)"
    ):
        plain.add_request([1, 2, 3], GREEDY, lora="sql")
    engine = LLMEngine(model, None, EngineConfig(), lora_modules={"sql": lora_dirs["sql"]})
    _engines.extend([plain, engine])
    with pytest.raises(GenerationError, match="no adapter named 'poet'"):
        engine.add_request([1, 2, 3], GREEDY, lora="poet")
    with pytest.raises(GenerationError, match="lora must be an adapter name"):
        engine.add_request([1, 2, 3], GREEDY, lora=3)  # type: ignore[arg-type]
    engine.lora.remove()


def test_async_streams_pick_their_adapter(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list
) -> None:
    import asyncio

    from tulu.engine.async_engine import AsyncLLM

    model = load_model(lora_dirs["base"]).eval()
    engine = LLMEngine(model, None, EngineConfig(), lora_modules={"sql": lora_dirs["sql"]})
    _engines.append(engine)
    prompt = list(range(5, 25))

    async def main() -> tuple[list[list[int]], str]:
        llm = AsyncLLM(engine)
        llm.start()

        async def tokens(lora: str | None) -> list[int]:
            return [
                t
                async for out in llm.generate(prompt, GREEDY, lora=lora)
                for t in out.outputs[0].delta_token_ids
            ]

        got = await asyncio.gather(tokens(None), tokens("sql"))
        try:
            await tokens("nope")
            refusal = ""
        except GenerationError as err:
            refusal = str(err)
        await llm.shutdown()
        return list(got), refusal

    got, refusal = asyncio.run(main())
    assert got == [generate_ids(merged_models[n], prompt, GREEDY).token_ids for n in (None, "sql")]
    assert "no adapter named 'nope'" in refusal


def test_llm_generate_takes_one_adapter_or_one_per_prompt(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list
) -> None:
    from tulu.engine.engine import LLM

    model = load_model(lora_dirs["base"]).eval()
    llm = LLM(model, None, EngineConfig(), lora_modules={"sql": lora_dirs["sql"]})
    _engines.append(llm.engine)
    prompts = [list(range(3, 13)), list(range(40, 47))]

    def want(names):
        return [
            generate_ids(merged_models[n], p, GREEDY).token_ids
            for p, n in zip(prompts, names, strict=True)
        ]

    def got(outputs):
        return [o.outputs[0].token_ids for o in outputs]

    assert got(llm.generate(prompts, GREEDY, lora="sql")) == want(["sql", "sql"])
    assert got(llm.generate(prompts, GREEDY, lora=[None, "sql"])) == want([None, "sql"])
    with pytest.raises(GenerationError, match="2 prompts but 1 lora names"):
        llm.generate(prompts, GREEDY, lora=["sql"])
    with pytest.raises(GenerationError, match="prompt 1: lora: no adapter named 'x'"):
        llm.generate(prompts, GREEDY, lora=["sql", "x"])
    with pytest.raises(GenerationError, match="lora must be an adapter name or a list of them"):
        llm.generate(prompts, GREEDY, lora=3)  # type: ignore[arg-type]


def test_pickled_adapters_load_and_damaged_weights_are_refused(
    lora_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT's .bin format loads as its safetensors twin; damaged weights name the directory."""
    import shutil

    from safetensors.torch import load_file

    pickled = Path(shutil.copytree(lora_dirs["sql"], tmp_path / "pickled"))
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    model = load_model(lora_dirs["base"], dtype=torch.float32)
    ids = torch.arange(5, 15).unsqueeze(0)
    adapters = LoraAdapters(model, {"sql": pickled})
    adapters.use([1] * 10, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), merged_logits(lora_dirs, "sql", ids))
    adapters.remove()
    torch.save([1, 2], pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickled: the adapter weights are not a dict"):
        LoraAdapters(model, {"sql": pickled})
    # a key that is not a name raised a raw AttributeError (a 500 for a runtime load)
    torch.save({1: torch.ones(2)}, pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickled: .* not a dict of named tensors"):
        LoraAdapters(model, {"sql": pickled})
    (pickled / "adapter_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="pickled: unreadable adapter weights"):
        LoraAdapters(model, {"sql": pickled})


def test_adapter_names_that_prefix_each_other_share_no_cached_blocks(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list
) -> None:
    """The salt "lora:s" followed by the tokens "25,3,..." once hashed as "lora:s2" followed
    by "5,3,...": the second adapter reused the first one's keys and values (other tokens,
    other adapter). Each name now seeds its hashes with a fixed-size digest."""
    model = load_model(lora_dirs["base"]).eval()
    engine = LLMEngine(
        model, None, EngineConfig(block_size=4), {"s": lora_dirs["sql"], "s2": lora_dirs["poet"]}
    )
    _engines.append(engine)
    tail = [3, 4, 5, 6, 7, 8, 9, 10]
    assert run_engine(engine, [([25, *tail], "s")]) == [
        generate_ids(merged_models["sql"], [25, *tail], GREEDY).token_ids
    ]
    assert run_engine(engine, [([5, *tail], "s2")]) == [
        generate_ids(merged_models["poet"], [5, *tail], GREEDY).token_ids
    ]
    assert engine.scheduler.prefix_hits == 0


def test_an_engine_leaves_no_adapter_on_the_model_for_other_engines(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list
) -> None:
    """The rows of an adapter engine's last step stayed set on its hooks: a plain engine (or a
    second adapter engine) on the same model then added that adapter to its own rows."""
    import gc

    model = load_model(lora_dirs["base"]).eval()
    prompt = list(range(5, 25))
    want = {n: generate_ids(merged_models[n], prompt, GREEDY).token_ids for n in (None, "sql")}
    first = LLMEngine(model, None, EngineConfig(), lora_modules={"sql": lora_dirs["sql"]})
    plain = LLMEngine(model, None, EngineConfig())
    _engines.extend([first, plain])
    assert run_engine(first, [(prompt, "sql")]) == [want["sql"]]
    assert run_engine(plain, [(prompt, None)]) == [want[None]]  # while `first` lives
    _engines.remove(first)
    del first
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())  # its hooks went with it
    second = LLMEngine(model, None, EngineConfig(), lora_modules={"sql": lora_dirs["sql"]})
    _engines.append(second)
    assert run_engine(second, [(prompt, "sql"), (prompt, None)]) == [want["sql"], want[None]]


def test_the_decode_fast_path_is_turned_off_with_a_warning_only_when_it_was_on(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list, caplog
) -> None:
    """`sdpa` would run decode steps through static buffers without the adapters' rows: it
    is turned off (with graphs, which would otherwise demand it) and said; `auto`, which is
    the plain path on a CPU anyway, says nothing."""
    model = load_model(lora_dirs["base"]).eval()
    prompt = list(range(30, 50))
    for attention, warned in (("sdpa", True), ("auto", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="tulu.engine.engine"):
            engine = LLMEngine(
                model,
                None,
                EngineConfig(decode_attention=attention),
                lora_modules={"sql": lora_dirs["sql"]},
            )
        _engines.append(engine)
        assert engine.decode_runner is None and engine.cuda_graphs is False
        assert ("decode fast path (sdpa) is off" in caplog.text) is warned
        want = generate_ids(merged_models["sql"], prompt, GREEDY).token_ids
        assert run_engine(engine, [(prompt, "sql")]) == [want]


def test_adapters_load_and_unload_at_run_time(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list
) -> None:
    """As vLLM's runtime LoRA updates: an engine made with enable_lora and no adapters takes
    one later; an unload takes the name away at once while the requests running with it
    finish with it (it was refused while they ran); a name loaded again with another adapter,
    even while the first still serves them, never meets the first one's cached blocks (slots
    are never reused)."""
    model = load_model(lora_dirs["base"]).eval()
    engine = LLMEngine(model, None, EngineConfig(block_size=4), enable_lora=True)
    _engines.append(engine)
    prompt = list(range(40, 66))
    with pytest.raises(GenerationError, match="no adapter named 'x' \\(loaded: none are loaded\\)"):
        engine.add_request(prompt, GREEDY, lora="x")
    engine.load_lora("x", lora_dirs["sql"])
    assert engine.lora.loaded == {"x": str(lora_dirs["sql"])}
    want_sql = generate_ids(merged_models["sql"], prompt, GREEDY).token_ids
    assert run_engine(engine, [(prompt, "x")]) == [want_sql]
    with pytest.raises(CheckpointError, match="'x' is already loaded"):
        engine.load_lora("x", lora_dirs["poet"])

    other = list(range(70, 90))  # no prefix-cache hit: it computes under the adapter
    engine.add_request(other, GREEDY, request_id="running", lora="x")
    engine.step()
    engine.unload_lora("x")
    assert engine.lora.loaded == {}
    with pytest.raises(GenerationError, match="no adapter named 'x'"):
        engine.add_request(prompt, GREEDY, lora="x")

    hits = engine.scheduler.prefix_hits
    engine.load_lora("x", lora_dirs["poet"])  # the same name, another adapter, at once
    assert len(engine.lora._adapters) == 2  # the first 'x' still serves "running"
    engine.add_request(prompt, GREEDY, request_id="new", lora="x")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    want_poet = generate_ids(merged_models["poet"], prompt, GREEDY).token_ids
    assert done["new"] == want_poet != want_sql
    assert engine.scheduler.prefix_hits == hits  # no block of the first 'x' was reused
    want_other = generate_ids(merged_models["sql"], other, GREEDY).token_ids
    assert done["running"] == want_other  # it finished with its adapter
    assert list(engine.lora._adapters) == [engine.lora.slot("x")]  # the first one is freed

    engine.add_request(other, GREEDY, request_id="aborted", lora="x")
    engine.step()
    engine.unload_lora("x")
    assert len(engine.lora._adapters) == 1
    engine.abort("aborted")  # its last user gone, the adapter's weights go too
    assert engine.lora._adapters == {}
    engine.step()

    plain = LLMEngine(model, None, EngineConfig())
    _engines.append(plain)
    with pytest.raises(GenerationError, match="LoRA is not enabled on this engine"):
        plain.load_lora("x", lora_dirs["sql"])


def test_removing_the_hooks_forgets_the_adapters(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list
) -> None:
    """`engine.lora.remove()` took the hooks off but left the names loaded: a request naming
    an adapter then ran on the bare base, and on the blocks its adapter had cached, giving
    tokens of neither. It is refused now; an adapter loaded afterwards hooks on again."""
    model = load_model(lora_dirs["base"]).eval()
    engine = LLMEngine(model, None, EngineConfig(block_size=4), {"sql": lora_dirs["sql"]})
    _engines.append(engine)
    prompt = list(range(40, 66))
    want = generate_ids(merged_models["sql"], prompt, GREEDY).token_ids
    assert run_engine(engine, [(prompt, "sql")]) == [want]
    engine.lora.remove()
    assert engine.lora.loaded == {} and not any(m._forward_hooks for m in model.modules())
    with pytest.raises(GenerationError, match="no adapter named 'sql'"):
        engine.add_request(prompt, GREEDY, lora="sql")
    engine.load_lora("sql", lora_dirs["sql"])
    assert run_engine(engine, [(prompt, "sql")]) == [want]
    engine.lora.remove()


# --------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_adapters_on_cuda_match_their_merged_models(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list
) -> None:
    """The same mixed batch on a CUDA model: float32 greedy tokens equal the merged models'
    (computed on the CPU), with `auto` (the fast path on CUDA) turned off for the adapters;
    in bfloat16 the adapted logits stay within bfloat16 rounding of the merged model's."""
    model = load_model(lora_dirs["base"], dtype=torch.float32, device="cuda").eval()
    engine = LLMEngine(
        model,
        None,
        EngineConfig(decode_attention="auto", kv_cache_bytes=64 << 20, block_size=4),
        lora_modules={"sql": lora_dirs["sql"], "poet": lora_dirs["poet"]},
    )
    _engines.append(engine)
    assert engine.decode_runner is None
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (5, 17, 30, 9)]
    requests = list(zip(prompts, [None, "sql", "poet", "sql"], strict=True))
    want = [generate_ids(merged_models[n], p, GREEDY).token_ids for p, n in requests]
    assert run_engine(engine, requests) == want

    half = load_model(lora_dirs["base"], dtype=torch.bfloat16, device="cuda").eval()
    adapters = LoraAdapters(half, {"sql": lora_dirs["sql"]})
    ids = torch.tensor([prompts[2]], device="cuda")
    adapters.use([1] * ids.shape[1], "cuda")
    with torch.no_grad():
        got = half(ids).float().cpu()
        ref = merged_models["sql"](ids.cpu())
    adapters.remove()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_async_load_and_unload_between_steps(
    lora_dirs: dict[str, Path], merged_models: dict, _engines: list
) -> None:
    """AsyncLLM loads an adapter while serving (read off the engine thread), unloads it while
    a stream uses it (the stream finishes with it), and a call after shutdown fails instead of
    hanging."""
    import asyncio

    from tulu.engine.async_engine import AsyncLLM, EngineDeadError

    model = load_model(lora_dirs["base"]).eval()
    engine = LLMEngine(model, None, EngineConfig(), enable_lora=True)
    _engines.append(engine)
    prompt = list(range(7, 27))

    async def main() -> tuple[list[int], str]:
        llm = AsyncLLM(engine)
        llm.start()
        await llm.load_lora("sql", str(lora_dirs["sql"]))
        stream = llm.generate(prompt, GREEDY, lora="sql")
        tokens = list((await anext(stream)).outputs[0].delta_token_ids)
        await llm.unload_lora("sql")
        assert engine.lora.loaded == {}
        tokens += [t async for out in stream for t in out.outputs[0].delta_token_ids]
        assert engine.lora._adapters == {}
        await llm.shutdown()
        with pytest.raises(EngineDeadError):
            await llm.load_lora("poet", str(lora_dirs["poet"]))
        return tokens

    tokens = asyncio.run(main())
    assert tokens == generate_ids(merged_models["sql"], prompt, GREEDY).token_ids
