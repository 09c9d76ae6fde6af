"""Tests for `tulu bench` and the workloads it shares with benchmarks/generation.py.

Timings are never asserted (they depend on the machine); what is pinned is what must hold on
any machine: every request gets exactly its requested tokens, the JSON's figures agree with
each other (tokens/s = tokens / seconds, ratio = tulu / transformers), the command prints its
table and exits 0, and every bad input fails on one line naming the flag, before any weights
are built. The model is Pythia-14M's shape cut to one layer, with tiny counts.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import weakref
from pathlib import Path

import pytest
import torch

import tulu.bench.workloads as workloads
from tulu.bench.cli import settings_from_args
from tulu.bench.workloads import (
    BenchSettings,
    check_settings,
    format_report,
    generate_timed,
    hf_throughput,
    make_requests,
    preset_config,
    random_model,
    run_benchmark,
    transformers_twin,
    tulu_throughput,
)
from tulu.cli import build_parser, main
from tulu.engine.engine import LLM, EngineConfig
from tulu.engine.kv_cache import bytes_per_block
from tulu.errors import TuluError

TINY = ["--preset", "pythia-14m", "--layers", "1", "--device", "cpu", "--dtype", "float32"]
SMALL = [
    "--num-requests",
    "3",
    "--prompt-len",
    "8",
    "--output-len",
    "5",
    "--single-new-tokens",
    "4",
    "--prefill-tokens",
    "24",
    "--repeats",
    "1",
]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(preset_config("pythia-14m", 1, torch.float32), CPU, seed=0)


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The CLI's error: one line (progress lines aside), no traceback; returns the message."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("tulu bench: error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("tulu bench: error: ")


def check_throughput(figures: dict, requests: int) -> None:
    assert figures["output_tokens_per_s"] == pytest.approx(
        figures["output_tokens"] / figures["seconds"]
    )
    assert figures["requests_per_s"] == pytest.approx(requests / figures["seconds"])


# ------------------------------------------------------------------------------ workloads
@pytest.mark.parametrize("pool_blocks", [None, 6], ids=["default-pool", "tiny-pool-preempts"])
def test_every_request_gets_exactly_its_output_tokens(model, pool_blocks) -> None:
    """Mixed lengths, EOS ignored; with 6 blocks of 16 tokens requests are preempted too."""
    budget = None
    if pool_blocks is not None:
        budget = pool_blocks * bytes_per_block(model.config, 16, torch.float32)
    llm = LLM(model, None, EngineConfig(kv_cache_bytes=budget))
    requests = make_requests(random.Random(0), 6, (3, 40), (1, 30), model.config.vocab_size)
    outs, seconds = generate_timed(llm, requests, CPU)
    assert seconds > 0
    assert [len(o.outputs[0].token_ids) for o in outs] == [n for _, n in requests]
    assert [o.prompt_token_ids for o in outs] == [p for p, _ in requests]
    if pool_blocks is not None:
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.num_used == 0

    figures = tulu_throughput(llm, requests, CPU)
    assert figures["output_tokens"] == sum(n for _, n in requests)
    assert figures["prompt_tokens"] == sum(len(p) for p, _ in requests)
    check_throughput(figures, len(requests))


def test_transformers_counts_the_requested_tokens(model) -> None:
    requests = make_requests(random.Random(1), 3, (2, 9), (1, 6), 1000)
    figures = hf_throughput(transformers_twin(model), requests, 2, CPU)
    assert figures["output_tokens"] == sum(n for _, n in requests)
    check_throughput(figures, len(requests))


def test_transformers_twin_shares_weights_and_agrees(model) -> None:
    twin = transformers_twin(model)
    assert twin.gpt_neox.embed_in.weight.data_ptr() == model.gpt_neox.embed_in.weight.data_ptr()
    ids = torch.tensor([[5, 17, 400, 3, 9]])
    with torch.inference_mode():
        ours = model(ids)
        theirs = twin(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_decode_step_bytes_reads_one_row_of_the_input_embedding(tied) -> None:
    """The roofline's bytes per decode step: the input embedding gives one row (Pythia's is
    untied; a tied one is the LM head, read whole), plus K and V of the context per layer."""
    config = preset_config("pythia-14m", 2, torch.float32)
    if tied:
        config = type(config).from_dict({**config.to_dict(), "tie_word_embeddings": True})
    m = random_model(config, CPU)
    h, v = config.hidden_size, config.vocab_size
    rest = sum(p.numel() for n, p in m.named_parameters() if n != "gpt_neox.embed_in.weight")
    embed = v * h if tied else h
    kv = 2 * 2 * h * 10  # K and V, 2 layers, 10 context tokens
    assert workloads.decode_step_bytes(m, 10) == 4 * (rest + embed + kv)


class _SeenOnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: `run_benchmark` takes its device (and so its GPU
    branch) from the model's first parameter."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")


class _ModelSeenOnCuda:
    """The model as `run_benchmark` would see it on a GPU; everything else is the CPU model."""

    def __init__(self, model) -> None:
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def parameters(self):
        return (p.as_subclass(_SeenOnCuda) for p in self.model.parameters())


def test_roofline_on_a_faked_gpu(model, monkeypatch) -> None:
    """The GPU-only branch of `run_benchmark` and `format_report`'s roofline line, with the
    device and its CUDA calls faked (the engine itself runs the real model on the CPU): the
    limit is the copy bandwidth over the bytes of one decode step at the single stream's mean
    context, and the achieved fraction is the single stream's tokens/s over that limit."""
    cuda = torch.device("cuda")
    config = model.config
    h, v = config.hidden_size, config.vocab_size
    prompt_len, new_tokens = 8, 6
    context = prompt_len + new_tokens // 2
    # Every weight but the input embedding's unread rows, K and V of one layer, float32.
    step_bytes = 4 * (sum(p.numel() for p in model.parameters()) - (v - 1) * h + 2 * h * context)

    calls: list[tuple] = []
    achieved: list[float] = []

    def fake_copy_bandwidth(device):
        calls.append(("copy_bandwidth", device))
        return 4 * step_bytes * achieved[-1]  # a limit of 4x the achieved rate: 25%

    def partial(results):
        if "tulu" in results["workloads"].get("single_stream", {}):
            achieved.append(results["workloads"]["single_stream"]["tulu"]["tokens_per_s"])

    real_run_tulu = workloads._run_tulu
    monkeypatch.setattr(workloads, "_run_tulu", lambda m, *rest: real_run_tulu(m.model, *rest))
    monkeypatch.setattr(workloads, "copy_bandwidth", fake_copy_bandwidth)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache",)))
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device))
    )
    settings = BenchSettings(
        prompt_len=prompt_len,
        single_new_tokens=new_tokens,
        repeats=1,
        skip=frozenset({"fixed", "prefill"}),
    )
    results = run_benchmark(_ModelSeenOnCuda(model), settings, name="tiny", partial=partial)
    json.loads(json.dumps(results))

    assert (results["device"], results["device_name"]) == ("cuda", "Fake GPU")
    freed = [("empty_cache",), ("reset", cuda)]
    assert calls == [*freed, *freed, ("copy_bandwidth", cuda)]  # before and after tulu
    tokens_per_s = results["workloads"]["single_stream"]["tulu"]["tokens_per_s"]
    assert achieved == [tokens_per_s]
    bandwidth = 4 * step_bytes * tokens_per_s
    roofline = results["roofline"]
    assert roofline == {
        "copy_bandwidth_bytes_per_s": bandwidth,
        "decode_step_bytes": step_bytes,
        "single_stream_limit_tokens_per_s": pytest.approx(bandwidth / step_bytes),
        "achieved_fraction": pytest.approx(0.25),
    }
    line = format_report(results).splitlines()[-1]
    assert line == (
        f"roofline: copy bandwidth {bandwidth / 1e12:.2f} TB/s, decode step reads "
        f"{step_bytes / 1e9:.2f} GB -> limit {bandwidth / step_bytes:.0f} tokens/s; achieved 25%"
    )


def new_token_counts(monkeypatch, function: str) -> list[int]:
    """The new-token count (the 4th argument) of every call to `workloads.<function>`."""
    counts: list[int] = []
    real = getattr(workloads, function)

    def spy(m, prompt_or_batch, new_tokens, device, **kwargs):
        counts.append(new_tokens)
        return real(m, prompt_or_batch, new_tokens, device, **kwargs)

    monkeypatch.setattr(workloads, function, spy)
    return counts


def test_static_compile_warms_up_at_the_measured_length(model, monkeypatch) -> None:
    """The static cache is sized by the new tokens: a compiling run with fewer would leave
    the timed run to rebuild it and recompile (GPU only; torch.compile is skipped here)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **_kwargs: fn)
    lengths = new_token_counts(monkeypatch, "hf_single_stream")
    twin = transformers_twin(model)
    figures = workloads.hf_static_compile_single_stream(twin, [1, 2, 3], [4, 5, 6], 5, CPU)
    assert lengths == [5, 5]
    assert twin.generation_config.cache_implementation == "static"
    assert figures["compile_seconds"] > 0 and figures["tokens_per_s"] > 0


def test_transformers_single_stream_is_timed_in_one_call(model, monkeypatch) -> None:
    """TTFT is when the first new token is streamed out of the same generate call whose end
    gives the total: two calls (one of a single token for the TTFT) could make the time per
    later token negative."""
    calls = new_token_counts(monkeypatch, "hf_generate")
    figures = workloads.hf_single_stream(transformers_twin(model), [4, 5, 6], 6, CPU)
    assert calls == [6]
    assert figures["ttft_ms"] > 0 and figures["ms_per_token"] >= 0
    total_ms = 6 / figures["tokens_per_s"] * 1e3
    assert figures["ttft_ms"] + 5 * figures["ms_per_token"] == pytest.approx(total_ms)


def test_random_prompts_are_deterministic() -> None:
    a = make_requests(random.Random(3), 4, (2, 9), (1, 6), 100)
    b = make_requests(random.Random(3), 4, (2, 9), (1, 6), 100)
    assert a == b
    assert all(2 <= len(p) <= 9 and 1 <= n <= 6 and max(p) < 100 for p, n in a)


def test_run_benchmark_figures_are_consistent(model) -> None:
    settings = BenchSettings(
        num_requests=3,
        prompt_len=6,
        output_len=4,
        mixed_requests=3,
        mixed_prompt_range=(2, 12),
        mixed_output_range=(1, 7),
        single_new_tokens=3,
        prefill_tokens=20,
        repeats=2,
        compare_transformers=True,
        hf_batch_size=2,
    )
    results = run_benchmark(model, settings, name="tiny", preset_name="pythia-14m")
    json.loads(json.dumps(results))  # JSON-ready as it is

    w = results["workloads"]
    assert set(w) == {"single_stream", "fixed_6_4", "mixed", "prefill_21"}
    assert w["fixed_6_4"]["tulu"]["output_tokens"] == 3 * 4
    assert w["fixed_6_4"]["transformers"]["output_tokens"] == 3 * 4
    mixed = w["mixed"]["tulu"]["output_tokens"]
    assert 3 * 1 <= mixed <= 3 * 7 and w["mixed"]["transformers"]["output_tokens"] == mixed
    for key in ("fixed_6_4", "mixed"):
        assert w[key]["requests"] == 3
        for system in ("tulu", "transformers"):
            check_throughput(w[key][system], 3)
    assert w["prefill_21"]["prompt_tokens"] == 20
    for system in ("tulu", "transformers"):
        single = w["single_stream"][system]
        assert set(single) == {"ttft_ms", "ms_per_token", "tokens_per_s"}
        assert all(v > 0 for v in single.values())

    table = {(r["workload"], r["metric"]): r for r in results["table"]}
    assert len(table) == len(results["table"]) == 6
    for row in results["table"]:
        lower_is_better = "ms" in row["metric"]
        expected = (
            row["transformers"] / row["tulu"]
            if lower_is_better
            else row["tulu"] / row["transformers"]
        )
        assert row["ratio"] == pytest.approx(expected)
    fixed = table[("3 x (6 in / 4 out)", "output tokens/s")]
    assert fixed["tulu"] == w["fixed_6_4"]["tulu"]["output_tokens_per_s"]
    prefill = table[("prefill 20 tokens", "tokens/s")]
    assert prefill["tulu"] == w["prefill_21"]["tulu_tokens_per_s"]

    assert results["layers"] == 1 and results["preset"] == "pythia-14m"
    assert results["settings"]["num_requests"] == 3
    assert results["kv_cache_blocks"] > 0 and results["peak_memory_bytes"] > 0
    assert "roofline" not in results  # GPU only
    report = format_report(results)
    assert "tulu/HF" in report and "3 mixed (2-12 in / 1-7 out)" in report


def test_transformers_runs_a_sample_of_the_throughput_requests(model) -> None:
    """--hf-num-requests: transformers gets the first N of the same requests, tulu all of them;
    both figures are rates, so the ratio stays meaningful."""
    settings = BenchSettings(
        num_requests=5,
        prompt_len=4,
        output_len=3,
        mixed_requests=5,
        mixed_prompt_range=(2, 8),
        mixed_output_range=(1, 5),
        skip=frozenset({"single", "prefill"}),
        compare_transformers=True,
        hf_batch_size=2,
        hf_num_requests=2,
    )
    results = run_benchmark(model, settings, name="tiny")
    w = results["workloads"]
    assert w["fixed_4_3"]["tulu"]["output_tokens"] == 5 * 3
    assert w["fixed_4_3"]["transformers"]["output_tokens"] == 2 * 3
    for key in ("fixed_4_3", "mixed"):
        assert w[key]["requests"] == 5 and w[key]["transformers_requests"] == 2
        check_throughput(w[key]["tulu"], 5)
        check_throughput(w[key]["transformers"], 2)
    assert results["settings"]["hf_num_requests"] == 2


def test_the_engine_is_gone_before_transformers_runs(model, monkeypatch) -> None:
    """On a GPU the engine's KV cache holds most of the free memory: transformers' batched
    generate would run out of memory beside it, so the engine is dropped first."""
    engines: list[weakref.ref] = []
    real_init, real_twin = workloads.LLM.__init__, workloads.transformers_twin

    def tracked_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        engines.append(weakref.ref(self))

    alive_when_twin_built: list[bool] = []

    def twin(m):
        gc.collect()
        alive_when_twin_built.extend(ref() is not None for ref in engines)
        return real_twin(m)

    monkeypatch.setattr(workloads.LLM, "__init__", tracked_init)
    monkeypatch.setattr(workloads, "transformers_twin", twin)
    settings = BenchSettings(
        num_requests=2, prompt_len=4, output_len=2, repeats=1, compare_transformers=True
    )
    results = run_benchmark(model, settings, name="tiny")
    assert alive_when_twin_built == [False]
    assert results["transformers_peak_memory_bytes"] > 0
    assert "(transformers " in format_report(results)


def test_partial_results_follow_every_workload(model) -> None:
    """Each workload's figures are handed out (JSON-ready) as soon as they exist, tulu's first,
    then transformers', so a run stopped at a time limit keeps what it measured."""
    snapshots: list[dict] = []
    settings = BenchSettings(
        num_requests=2, prompt_len=4, output_len=2, repeats=1, compare_transformers=True
    )
    results = run_benchmark(
        model, settings, name="tiny", partial=lambda d: snapshots.append(json.loads(json.dumps(d)))
    )
    keys = list(results["workloads"])
    assert len(snapshots) == 2 * len(keys)
    first = snapshots[0]
    assert first["partial"] and first["engine_startup_seconds"] > 0
    assert [k for k, v in first["workloads"].items() if v] == keys[:1]
    assert "tulu" in first["workloads"][keys[0]]
    assert all("tulu" in w for w in snapshots[len(keys) - 1]["workloads"].values())
    assert all("transformers" in w for w in snapshots[-1]["workloads"].values())


def test_skip_leaves_workloads_out(model) -> None:
    settings = BenchSettings(
        num_requests=2, prompt_len=4, output_len=2, repeats=1, skip=frozenset({"single", "prefill"})
    )
    results = run_benchmark(model, settings, name="tiny")
    assert list(results["workloads"]) == ["fixed_4_2"]
    assert results["transformers"] is None
    assert [r["transformers"] for r in results["table"]] == [None]
    assert [r["ratio"] for r in results["table"]] == [None]
    assert "tulu/HF" not in format_report(results)


def test_mixed_flag_uses_num_requests() -> None:
    args = build_parser().parse_args(["bench", *TINY, "--num-requests", "7", "--mixed"])
    settings = settings_from_args(args, gpu=False)
    assert settings.mixed_requests == 7 and settings.runs("mixed")
    args = build_parser().parse_args(["bench", *TINY])
    settings = settings_from_args(args, gpu=False)
    assert settings.mixed_requests is None and not settings.runs("mixed")
    assert settings.num_requests == 16  # the CPU default


def test_mixed_workload_needs_its_longest_request_in_the_window() -> None:
    config = preset_config("pythia-14m", 1, torch.float32)
    small = type(config).from_dict({**config.to_dict(), "max_position_embeddings": 1024})
    with pytest.raises(TuluError, match="--mixed: the longest mixed-length request"):
        check_settings(BenchSettings(mixed_requests=2, prompt_len=8, output_len=8), small)


# ------------------------------------------------------------------------------ the command
def test_cli_prints_table_and_writes_json(tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "sub" / "bench.json"
    rc, out, err = run(capsys, "bench", *TINY, *SMALL, "--output", out_file)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("pythia-14m (1 layers), torch.float32")
    assert "transformers" not in lines[0]
    assert lines[1].split() == ["workload", "metric", "tulu"]
    assert any(line.startswith("3 x (8 in / 5 out)") for line in lines)
    assert any(line.startswith("prefill 24 tokens") for line in lines)
    assert lines[-1].startswith("peak memory")
    assert f"wrote {out_file}" in err

    results = json.loads(out_file.read_text())
    assert set(results["workloads"]) == {"single_stream", "fixed_8_5", "prefill_25"}
    fixed = results["workloads"]["fixed_8_5"]["tulu"]
    assert fixed["output_tokens"] == 3 * 5
    check_throughput(fixed, 3)
    assert results["settings"]["prompt_len"] == 8 and results["device"] == "cpu"
    assert results["transformers"] is None


def test_cli_compare_transformers(capsys) -> None:
    pytest.importorskip("transformers")
    rc, out, err = run(capsys, "bench", *TINY, *SMALL, "--compare-transformers")
    assert rc == 0, err
    lines = out.splitlines()
    assert ", transformers " in lines[0]
    assert lines[1].split() == ["workload", "metric", "tulu", "transformers", "tulu/HF"]
    rows = [line for line in lines[2:] if line.endswith("x")]
    assert len(rows) == 5  # TTFT, ms/token, tokens/s, throughput, prefill


def test_cli_loads_a_checkpoint(tmp_path: Path, capsys) -> None:
    from tulu.demo import corpus_text, tiny_model, train_tokenizer
    from tulu.model.checkpoint import save_model

    tokenizer = train_tokenizer(corpus_text())
    directory = save_model(tiny_model(len(tokenizer), seed=0), tmp_path / "m", tokenizer=tokenizer)
    rc, out, err = run(capsys, "bench", directory, "--device", "cpu", *SMALL, "--skip", "single")
    assert rc == 0, err
    assert out.splitlines()[0].startswith(f"{directory} (")


BAD = [
    (["--num-requests", "0"], "--num-requests"),
    (["--num-requests", "-3"], "--num-requests"),
    (["--prompt-len", "0"], "--prompt-len"),
    (["--output-len", "-1"], "--output-len"),
    (["--single-new-tokens", "0"], "--single-new-tokens"),
    (["--prefill-tokens", "0"], "--prefill-tokens"),
    (["--repeats", "0"], "--repeats"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--hf-batch-size", "0"], "--hf-batch-size"),
    (["--hf-num-requests", "0"], "--hf-num-requests"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb"),
    (["--kv-cache-gb", "nan"], "--kv-cache-gb"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
    (["--max-num-batched-tokens", "8", "--max-num-seqs", "16"], "--max-num-batched-tokens (8)"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--gpu-memory-utilization", "nan"], "--gpu-memory-utilization"),
    (["--skip", "single,bogus"], "--skip"),
    (["--prompt-len", "2000", "--output-len", "100"], "--output-len 100"),
    (["--prompt-len", "100", "--single-new-tokens", "2000"], "--single-new-tokens 2000"),
    (["--prefill-tokens", "2048"], "--prefill-tokens 2048"),
    (["--dtype", "float8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--device", "not a device"], "--device"),
]


@pytest.mark.parametrize(("extra", "flag"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_input_fails_before_building_the_model(extra, flag, capsys, monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr(workloads, "random_model", no_model)
    rc, _out, err = run(capsys, "bench", *TINY, *SMALL, *extra)
    assert rc == 1
    assert flag in error_line(err)


def test_prompt_beyond_window_names_both_sizes(capsys) -> None:
    rc, _out, err = run(capsys, "bench", *TINY, "--prompt-len", "2000", "--output-len", "100")
    assert rc == 1
    message = error_line(err)
    assert "--prompt-len 2000 + --output-len 100 = 2,100 tokens" in message
    assert "context window of 2,048 tokens" in message


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--preset", "pythia-3m"], "--preset"),
        (["--preset", "pythia-14m", "--layers", "0"], "--layers"),
        ([], "--preset"),  # neither MODEL nor --preset
        (["some/dir", "--preset", "pythia-14m"], "--preset"),  # both
        (["some-dir", "--layers", "2"], "--layers"),
    ],
)
def test_bad_model_choice(argv, flag, capsys) -> None:
    rc, _out, err = run(capsys, "bench", *argv, "--device", "cpu")
    assert rc == 1
    assert flag in error_line(err)


def test_unknown_preset_lists_known_ones(capsys) -> None:
    rc, _out, err = run(capsys, "bench", "--preset", "pythia-3m", "--device", "cpu")
    assert rc == 1 and "pythia-70m" in error_line(err)


def test_missing_model_directory(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-model"
    rc, _out, err = run(capsys, "bench", missing, "--device", "cpu")
    assert rc == 1
    assert str(missing) in error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu(capsys) -> None:
    rc, _out, err = run(capsys, "bench", "--preset", "pythia-14m", "--device", "cuda")
    assert rc == 1
    assert "--device cuda" in error_line(err)


@pytest.mark.parametrize("gb", ["0.00001", "0.0001"], ids=["under-one-block", "under-request"])
def test_kv_cache_too_small(gb, capsys) -> None:
    """0.00001 GB is less than one 16-token block; 0.0001 GB holds 96 tokens, fewer than 384."""
    rc, _out, err = run(
        capsys, "bench", *TINY, "--kv-cache-gb", gb, "--skip", "single,prefill", "--repeats", "1"
    )
    assert rc == 1
    assert f"--kv-cache-gb {float(gb):g}" in error_line(err)


def test_compare_without_transformers(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    rc, _out, err = run(capsys, "bench", *TINY, *SMALL, "--compare-transformers")
    assert rc == 1
    assert "--compare-transformers" in error_line(err)


def test_output_is_a_directory(tmp_path: Path, capsys) -> None:
    rc, _out, err = run(capsys, "bench", *TINY, *SMALL, "--output", tmp_path)
    assert rc == 1
    assert "--output" in error_line(err)


def test_cli_engine_flags_reach_the_engine(tmp_path: Path, capsys, monkeypatch) -> None:
    """vLLM's engine flags size the benchmarked engine as they size `tulu serve`'s."""
    configs: list[EngineConfig] = []
    real_init = LLM.__init__

    def recording_init(self, model, tokenizer, config, *args, **kwargs):
        configs.append(config)
        real_init(self, model, tokenizer, config, *args, **kwargs)

    monkeypatch.setattr(LLM, "__init__", recording_init)
    out_file = tmp_path / "bench.json"
    argv = ["bench", *TINY, *SMALL, "--max-num-seqs", "4", "--max-num-batched-tokens", "24"]
    argv += ["--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching"]
    rc, _out, err = run(capsys, *argv, "--output", out_file)
    assert rc == 0, err
    (config,) = configs
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (4, 24)
    assert config.gpu_memory_fraction == 0.5 and config.enable_prefix_caching is False
    settings = json.loads(out_file.read_text())["settings"]
    assert settings["max_num_batched_tokens"] == 24 and settings["enable_prefix_caching"] is False


def test_cli_decode_attention_sdpa_runs_the_fast_path(tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "bench.json"
    argv = ["bench", *TINY, *SMALL, "--decode-attention", "sdpa", "--output", out_file]
    rc, _out, err = run(capsys, *argv)
    assert rc == 0, err
    results = json.loads(out_file.read_text())
    assert results["settings"]["decode_attention"] == "sdpa"
    assert results["settings"]["cuda_graphs"] is None
    assert results["workloads"]["fixed_8_5"]["tulu"]["output_tokens"] == 3 * 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--decode-attention", "triton"], "triton"),
        (["--decode-attention", "sdpa", "--enforce-eager"], None),
    ],
    ids=["triton-on-cpu", "eager-sdpa"],
)
def test_cli_decode_path_choices_on_cpu(extra, message, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc, _out, err = run(capsys, "bench", *TINY, *SMALL, *extra)
    if message is None:
        assert rc == 0, err
    else:  # the Triton kernel needs CUDA (or the interpreter): one clear line, no traceback
        assert rc == 1
        assert message in error_line(err) and "Traceback" not in err


def test_output_that_cannot_be_written_fails_before_the_run(tmp_path: Path, capsys, monkeypatch):
    """A results path under a regular file cannot be created: refused at once, not after the
    benchmark has run (then with a traceback, and its figures lost)."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before --output was checked")

    monkeypatch.setattr(workloads, "random_model", no_model)
    (tmp_path / "file").write_text("")
    rc, _out, err = run(capsys, "bench", *TINY, *SMALL, "--output", tmp_path / "file" / "b.json")
    assert rc == 1
    assert "--output" in error_line(err)


# ------------------------------------------------------------------------------ benchmarks/*.py
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class _Started(Exception):
    """Raised where a benchmark script, its arguments accepted, would start the real work."""


def run_script(
    name: str, argv: list[str], monkeypatch, capsys, work: tuple[object, str]
) -> tuple[object, str]:
    """Run benchmarks/`name` with `argv` in this process, `work` (owner, attribute) replaced by
    a function that raises _Started; returns (exit code, or _Started if the work began; stderr).
    """
    import runpy

    def started(*_args, **_kwargs):
        raise _Started

    # The script's imports first: a module first imported while `work` is replaced would keep
    # the replacement (a from-import binds it) after this test, for every later test.
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    monkeypatch.setattr(*work, started)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    capsys.readouterr()
    try:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    except _Started:
        return _Started, capsys.readouterr().err
    except SystemExit as exit_:
        err = capsys.readouterr().err
        code = exit_.code
        if isinstance(code, str):  # SystemExit("message"): printed to stderr, exit status 1
            return 1, err + code
        return code, err
    return 0, capsys.readouterr().err


def test_generation_script_refuses_an_output_directory(tmp_path, monkeypatch, capsys) -> None:
    argv = ["--preset", "pythia-14m", "--layers", "1", "--output", str(tmp_path)]
    work = (workloads, "random_model")
    code, err = run_script("generation.py", argv, monkeypatch, capsys, work)
    assert code == 1 and "Traceback" not in err
    assert f"generation.py: error: --output {tmp_path}: is a directory" in err


GENERATION_BAD = [
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--mixed-requests", "-1"], "--mixed-requests must be a positive integer"),
    (["--skip", "bogus"], "--skip: unknown workload 'bogus'"),
    (["--single-new-tokens", "5000"], "exceed the model's context window"),
    (["--max-num-batched-tokens", "100"], "must be at least --max-num-seqs (256)"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be in (0, 1]"),
]


@pytest.mark.parametrize(
    ("extra", "message"), GENERATION_BAD, ids=[" ".join(e) for e, _ in GENERATION_BAD]
)
def test_generation_script_refuses_bad_settings_at_once(
    extra, message, tmp_path, monkeypatch, capsys
) -> None:
    """Refused before the random weights are built (a 6.9B model takes a while), not after."""
    argv = ["--preset", "pythia-14m", "--layers", "1", "--output", str(tmp_path / "g.json")]
    work = (workloads, "random_model")
    code, err = run_script("generation.py", [*argv, *extra], monkeypatch, capsys, work)
    assert code == 1 and "Traceback" not in err
    assert "generation.py: error: " in err and message in err


TRAIN_BAD = [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--steps", "-1"], "--steps must be a positive integer"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--seq-len", "0"], "--seq-len must be a positive integer"),
    (["--micro-batch", "-1"], "--micro-batch must be a positive integer"),
    (["--layers", "0"], "--layers must be a positive integer"),
    (["--peak-tflops", "nan"], "--peak-tflops must be a positive number"),
    (["--device", "bogus"], "--device: unknown device 'bogus'"),
    (["--dtype", "float8"], "--dtype: unknown dtype"),
    (["--out", "."], "--out .: is a directory"),
    (["--dtype", "float16"], "--dtype float16: one process keeps float16 parameters"),
]


@pytest.mark.parametrize(("extra", "message"), TRAIN_BAD, ids=[" ".join(e) for e, _ in TRAIN_BAD])
def test_train_script_refuses_bad_settings_at_once(extra, message, monkeypatch, capsys) -> None:
    pytest.importorskip("transformers")
    import tulu.train.distributed

    work = (tulu.train.distributed, "init_distributed")
    code, err = run_script("train.py", ["--preset", "tiny", *extra], monkeypatch, capsys, work)
    assert code in (1, 2) and "Traceback" not in err
    assert f"train.py: error: {message}" in err


EVAL_BAD = [
    (["--peer-batch", "0"], "--peer-batch must be a positive integer"),
    (["--peer-examples", "-1"], "--peer-examples must be 0 (no peer) or more"),
    (["--output", "."], "--output .: is a directory"),
    (["--peer-examples", "1"], "the GSM CoT peer: "),  # no gsm/test.jsonl in --data-dir
    (["--max-examples", "0"], "--max-examples must be a positive integer"),
    (["--codex-samples", "0"], "--codex-samples must be a positive integer"),
    (["--time-budget", "nan"], "--time-budget must be a positive number of seconds"),
    (["--time-budget", "-1"], "--time-budget must be a positive number of seconds"),
]


@pytest.mark.parametrize(("extra", "message"), EVAL_BAD, ids=[" ".join(e) for e, _ in EVAL_BAD])
def test_eval_suite_script_refuses_bad_settings_at_once(
    extra, message, tmp_path, monkeypatch, capsys
) -> None:
    """Refused before the tokenizer and the model load, not after the suite has run."""
    from tulu.tokenizer import Tokenizer

    argv = ["--data-dir", str(tmp_path), "--tasks", "mmlu_0shot", *extra]
    code, err = run_script("eval_suite.py", argv, monkeypatch, capsys, (Tokenizer, "load"))
    assert code in (1, 2) and "Traceback" not in err
    assert f"eval_suite.py: error: {message}" in err


SERVING_BAD = [
    (["--request-timeout", "-1"], "--request-timeout must be a positive number"),
    (["--idle-timeout", "nan"], "--idle-timeout must be a positive number"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--name", "a/b"], "--name 'a/b': a file name part"),
]


@pytest.mark.parametrize(
    ("extra", "message"), SERVING_BAD, ids=[" ".join(e) for e, _ in SERVING_BAD]
)
def test_serving_script_refuses_bad_settings(extra, message, monkeypatch, capsys) -> None:
    pytest.importorskip("httpx")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import serving
    finally:
        sys.path.remove(str(BENCHMARKS))
    with pytest.raises(SystemExit) as exit_:
        serving.parse_args(["--url", "http://127.0.0.1:9", *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


TOKENIZATION_BAD = [
    (["--examples", "0"], "--examples must be a positive integer"),
    (["--peer-examples", "0"], "--peer-examples must be a positive integer"),
    (["--workers", "0"], "--workers must be a positive integer"),
    (["--output", "."], "--output .: is a directory"),
]


@pytest.mark.parametrize(
    ("extra", "message"), TOKENIZATION_BAD, ids=[" ".join(e) for e, _ in TOKENIZATION_BAD]
)
def test_tokenization_script_refuses_bad_settings(extra, message, monkeypatch, capsys) -> None:
    import tulu.data.tokenize

    work = (tulu.data.tokenize, "tokenize_records")
    code, err = run_script("tokenization.py", extra, monkeypatch, capsys, work)
    assert code == 2 and "Traceback" not in err
    assert f"tokenization.py: error: {message}" in err


def test_tokenization_script_writes_where_output_says(tmp_path, monkeypatch, capsys) -> None:
    """A trial run must not overwrite the committed results/tokenize.json."""
    pytest.importorskip("transformers")
    out = tmp_path / "tok.json"
    argv = ["--examples", "40", "--peer-examples", "20", "--mode-examples", "20"]
    argv += ["--tokenizer", str(tmp_path / "absent.json"), "--workers", "1"]
    argv += ["--output", str(out)]
    monkeypatch.setattr(sys, "argv", ["tokenization.py", *argv])
    import runpy

    runpy.run_path(str(BENCHMARKS / "tokenization.py"), run_name="__main__")
    results = json.loads(out.read_text())
    assert results["examples"] == 40 and results["open_instruct"]["identical_to_tulu"]


LORA_BAD = [
    (["--rank", "0"], "--rank must be a positive integer"),
    (["--num-requests", "-1"], "--num-requests must be a positive integer"),
    (["--output-len", "0"], "--output-len must be a positive integer"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--output", "."], "--output .: is a directory"),
]


@pytest.mark.parametrize(("extra", "message"), LORA_BAD, ids=[" ".join(e) for e, _ in LORA_BAD])
def test_lora_script_refuses_bad_settings_at_once(extra, message, monkeypatch, capsys) -> None:
    pytest.importorskip("peft")
    work = (workloads, "random_model")
    code, err = run_script("lora.py", ["--preset", "pythia-14m", *extra], monkeypatch, capsys, work)
    assert code in (1, 2) and "Traceback" not in err
    assert f"lora.py: error: {message}" in err


def test_lora_script_measures_and_agrees_with_peft(tmp_path, monkeypatch, capsys) -> None:
    """A small run end to end: every figure is there, and tulu's unmerged adapters give PEFT's
    greedy tokens for every request (float32)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import runpy

    out = tmp_path / "lora.json"
    argv = ["--preset", "pythia-14m", "--layers", "2", "--num-requests", "6"]
    argv += ["--prompt-len", "12", "--output-len", "5", "--adapters", "3", "--rank", "4"]
    argv += ["--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["lora.py", *argv, "--output", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCHMARKS / "lora.py"), run_name="__main__")
    assert exit_.value.code == 0
    results = json.loads(out.read_text())
    assert results["greedy_agreement_with_peft"] == "6/6"
    for key in ("tulu_base", "tulu_adapters_loaded_unused", "tulu_mixed_adapters"):
        assert results[key]["output_tokens"] == 30
    for key in ("transformers_base", "peft_mixed_adapters"):
        assert results[key]["output_tokens"] == 30 and len(results[key]["runs_tokens_per_s"]) == 1
    assert results["ratio_tulu_vs_peft"] > 0 and "tulu / PEFT" in capsys.readouterr().out


def test_lora_script_runs_one_engine_at_a_time(tmp_path, monkeypatch, capsys) -> None:
    """On a GPU each engine's KV cache takes 90% of the free memory: the adapters' engine must
    not start beside the base one (it would get a tenth of the cache, and so a smaller batch),
    nor transformers + PEFT beside either (they would run out of memory)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import runpy

    engines: list[weakref.ref] = []
    alive: list[int] = []  # engines still alive as each engine, then the twin, is built
    real_init, real_twin = LLM.__init__, workloads.transformers_twin

    def count_alive() -> None:
        gc.collect()
        alive.append(sum(ref() is not None for ref in engines))

    def tracked_init(self, *args, **kwargs):
        count_alive()
        real_init(self, *args, **kwargs)
        engines.append(weakref.ref(self))

    def twin(m):
        count_alive()
        return real_twin(m)

    monkeypatch.setattr(LLM, "__init__", tracked_init)
    monkeypatch.setattr(workloads, "transformers_twin", twin)
    argv = ["--preset", "pythia-14m", "--layers", "1", "--num-requests", "2", "--prompt-len", "4"]
    argv += ["--output-len", "2", "--adapters", "2", "--rank", "2", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["lora.py", *argv, "--output", str(tmp_path / "l.json")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCHMARKS / "lora.py"), run_name="__main__")
    assert exit_.value.code == 0
    assert alive == [0, 0, 0]


PARALLEL_BAD = [
    (["--n", "0"], "--n must be a positive integer"),
    (["--num-prompts", "-1"], "--num-prompts must be a positive integer"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--prompt-len", "2000", "--output-len", "100"], "--prompt-len + --output-len = 2100 exceeds"),
    (["--output", "."], "--output .: is a directory"),
]


@pytest.mark.parametrize(
    ("extra", "message"), PARALLEL_BAD, ids=[" ".join(e) for e, _ in PARALLEL_BAD]
)
def test_parallel_sampling_script_refuses_bad_settings_at_once(
    extra, message, monkeypatch, capsys
) -> None:
    work = (workloads, "random_model")
    argv = ["--preset", "pythia-14m", *extra]
    code, err = run_script("parallel_sampling.py", argv, monkeypatch, capsys, work)
    assert code in (1, 2) and "Traceback" not in err
    assert f"parallel_sampling.py: error: {message}" in err


def test_parallel_sampling_script_computes_each_prompt_once(tmp_path, monkeypatch, capsys) -> None:
    """A small run end to end: with prefix caching each prompt's full blocks are computed by
    one sample only (the siblings compute the partial last block), without it by every sample;
    both engines draw the same seeded tokens."""
    pytest.importorskip("transformers")
    import runpy

    out = tmp_path / "p.json"
    argv = ["--preset", "pythia-14m", "--layers", "1", "--num-prompts", "2", "--n", "3"]
    argv += ["--prompt-len", "40", "--output-len", "3", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["parallel_sampling.py", *argv, "--output", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCHMARKS / "parallel_sampling.py"), run_name="__main__")
    assert exit_.value.code == 0
    results = json.loads(out.read_text())
    assert results["same_tokens_with_and_without_prefix_caching"] is True
    # 40 tokens = 2 full blocks of 16 + 8: the first sample computes 40, each sibling 8.
    assert results["tulu"]["prompt_tokens_computed"] == 2 * (40 + 8 + 8)
    assert results["tulu_no_prefix_caching"]["prompt_tokens_computed"] == 2 * 3 * 40
    for key in ("tulu", "tulu_no_prefix_caching", "transformers"):
        assert results[key]["output_tokens"] == 2 * 3 * 3
    assert "sharing / no prefix caching" in capsys.readouterr().out


def _structured_output_module():
    """benchmarks/structured_output.py as a module (its schema checker and bound)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import structured_output
    finally:
        sys.path.remove(str(BENCHMARKS))
    return structured_output


def test_structured_output_schema_checker_and_token_bound() -> None:
    """The benchmark's oracle: Python's own check of the schema, and the token budget that
    lets every constrained request finish (its longest text, a byte or more per token, + EOS)."""
    module = _structured_output_module()
    longest = module.longest_instance(module.SCHEMA)
    assert module.MAX_TOKENS == 147  # 146 bytes of the longest text, + the EOS
    # ...as xgrammar writes it: json.dumps's ", " and ": " separators, no other whitespace
    xgrammar = pytest.importorskip("xgrammar")
    from tulu.demo import corpus_text, train_tokenizer
    from tulu.engine.structured import StructuredOutput, grammar_compiler

    tokenizer = train_tokenizer(corpus_text())
    compiler = grammar_compiler(tokenizer, len(tokenizer), tokenizer.eos_token_id)
    compiled = compiler.compile(StructuredOutput(json=module.SCHEMA))
    for text, accepted in (
        (json.dumps(longest), True),
        (json.dumps(longest, separators=(",", ":")), False),
    ):
        matcher = xgrammar.GrammarMatcher(compiled)
        assert matcher.accept_string(text) == accepted, text
        assert matcher.is_completed() == accepted, text
    assert module.text_violations(json.dumps(longest)) == []
    assert module.text_violations('{"category": "book"')[0].startswith("not JSON")
    bad = dict(longest, color="pink", quantity=1000, in_stock=1)
    bad["shipping"] = {"express": True}
    assert module.violations(bad, module.SCHEMA) == [
        "$.color: 'pink' is not one of ['red', 'green', 'blue', 'black', 'white']",
        "$.in_stock: 1 is not a boolean",
        "$.quantity: 1000 is not an integer in [0, 999]",
        "$.shipping: keys ['express'], expected ['days', 'express']",
    ]
    assert module.violations(dict(longest, rating=True), module.SCHEMA) == [
        "$.rating: True is not an integer in [1, 5]"
    ]


STRUCTURED_BAD = [
    (["--num-prompts", "0"], "--num-prompts must be a positive integer"),
    (["--repeats", "-1"], "--repeats must be a positive integer"),
    (["--prompt-len", "2000"], "--prompt-len 2000 + the schema's 147 output tokens exceed"),
    (["--output", "."], "--output .: is a directory"),
    (["--tokenizer", "absent.json"], "--tokenizer: absent.json: no such tokenizer"),
    (["--device", "bogus"], "--device: unknown device 'bogus'"),
]


@pytest.mark.parametrize(
    ("extra", "message"), STRUCTURED_BAD, ids=[" ".join(e) for e, _ in STRUCTURED_BAD]
)
def test_structured_output_script_refuses_bad_settings_at_once(
    extra, message, monkeypatch, capsys
) -> None:
    pytest.importorskip("xgrammar")
    pytest.importorskip("transformers")
    work = (workloads, "random_model")
    argv = ["--preset", "pythia-14m", *extra]
    code, err = run_script("structured_output.py", argv, monkeypatch, capsys, work)
    assert code in (1, 2) and "Traceback" not in err
    assert f"structured_output.py: error: {message}" in err


def test_structured_output_script_meets_the_schema_as_transformers_does(
    tmp_path, monkeypatch, capsys
) -> None:
    """A small run end to end: every constrained output (tulu's, transformers') satisfies the
    schema, tulu's greedy tokens are transformers' + xgrammar's, and the unconstrained run
    generated exactly as many tokens as the constrained one."""
    pytest.importorskip("xgrammar")
    pytest.importorskip("transformers")
    import runpy

    from tulu.demo import corpus_text, train_tokenizer

    train_tokenizer(corpus_text()).save(tmp_path / "tok")
    out = tmp_path / "s.json"
    argv = ["--preset", "pythia-14m", "--layers", "1", "--num-prompts", "3", "--prompt-len", "8"]
    argv += ["--hf-batch-size", "2", "--repeats", "1", "--tokenizer", str(tmp_path / "tok")]
    monkeypatch.setattr(sys, "argv", ["structured_output.py", *argv, "--output", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCHMARKS / "structured_output.py"), run_name="__main__")
    assert exit_.value.code == 0
    results = json.loads(out.read_text())
    # Two prompt sets (warm-up + 1 timed) of 3 prompts each, all checked.
    assert results["valid_outputs"] == {"tulu": "6/6", "transformers": "6/6"}
    assert results["greedy_agreement_with_transformers"] == "6/6"
    tokens = {
        key: results[key]["output_tokens"]
        for key in ("tulu_constrained", "tulu_unconstrained_same_lengths", "transformers_xgrammar")
    }
    assert len(set(tokens.values())) == 1 and tokens["tulu_constrained"] > 3
    assert "constrained / unconstrained" in capsys.readouterr().out


SPECULATIVE_BAD = [
    (["--num-speculative-tokens", "0"], "--num-speculative-tokens must be a positive integer"),
    (["--new-tokens", "-1"], "--new-tokens must be a positive integer"),
    (["--prompt-len", "2000", "--new-tokens", "100"], "--prompt-len 2000 + --new-tokens 100"),
    (["--output", "."], "--output .: is a directory"),
]


@pytest.mark.parametrize(
    ("extra", "message"), SPECULATIVE_BAD, ids=[" ".join(e) for e, _ in SPECULATIVE_BAD]
)
def test_speculative_script_refuses_bad_settings_at_once(extra, message, monkeypatch, capsys):
    work = (workloads, "random_model")
    argv = ["--preset", "pythia-14m", *extra]
    code, err = run_script("speculative.py", argv, monkeypatch, capsys, work)
    assert code in (1, 2) and "Traceback" not in err
    assert f"speculative.py: error: {message}" in err


def test_speculative_script_gives_every_system_the_same_tokens(tmp_path, monkeypatch, capsys):
    """A small run end to end (it exits 1 when a system's greedy tokens differ): tulu with
    and without n-gram speculation, transformers with and without its prompt lookup."""
    pytest.importorskip("transformers")
    import runpy

    out = tmp_path / "s.json"
    argv = ["--preset", "pythia-14m", "--layers", "1", "--num-prompts", "2", "--prompt-len", "48"]
    argv += ["--new-tokens", "12", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", ["speculative.py", *argv, "--output", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCHMARKS / "speculative.py"), run_name="__main__")
    assert exit_.value.code == 0
    results = json.loads(out.read_text())["results"]
    for workload in ("repeat", "random"):
        figures = results[workload]
        assert set(figures) == {
            "tulu",
            "tulu_batch",
            "tulu_ngram",
            "tulu_ngram_batch",
            "transformers",
            "transformers_lookup",
        }
        assert all(f["output_tokens"] == 2 * 12 for f in figures.values())
    assert "tulu+ngram / tulu" in capsys.readouterr().out
