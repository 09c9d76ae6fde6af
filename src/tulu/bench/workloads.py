"""The generation workloads, timed on tulu's engine and (optionally) on transformers' `generate`.

One implementation, two front ends: `tulu bench` and `benchmarks/generation.py` both call
`run_benchmark` and print `format_report`, so a figure in the committed results and a figure
a user measures come from the same code.

Workloads (all greedy, EOS ignored, so every request produces exactly its requested length):

- single stream: time to first token, ms per output token and tokens/s of one request
  (`prompt_len` tokens in, `single_new_tokens` out); the median over `repeats` runs, each with
  a different prompt so that prefix caching cannot serve a repeat;
- fixed: offline throughput of `num_requests` requests of `prompt_len` in / `output_len` out;
- mixed: offline throughput of `mixed_requests` requests with random prompt and output lengths
  (16-1024 in, 16-512 out by default);
- prefill: the time to the first token of a `prefill_tokens` prompt (default: the context
  window minus the one generated token), as tokens/s;
- peak memory, and on a GPU the decode roofline: the bytes one decode step must read (weights
  plus the live KV cache) over the measured device copy bandwidth.

The requests are drawn first. tulu runs every workload, then its engine is dropped (on a GPU
its KV cache holds most of the free memory) before transformers runs the same requests: each
system has the device to itself, and each has its own peak memory (on the CPU the second is
the process's high-water mark, which may be tulu's).

transformers (when compared) runs its batched `generate` on length-sorted, left-padded batches
of `hf_batch_size` requests, each batch generating up to its longest requested output; only the
requested tokens are counted, as in vLLM's throughput benchmark for its HF backend. Its model
shares the very tensors of ours, so both run the same weights without a second copy. With
`hf_num_requests` it runs only the first N of each throughput workload's requests (the same
random requests, so the same length distribution): its figure is a rate, and at batch 64 a
few hundred requests give it in a fraction of the time a thousand take on a GPU.

Invalid settings raise `TuluError` naming the command-line flag (the flags are the same in both
front ends), so `tulu bench` prints them on one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tulu.engine.engine import LLM, EngineConfig, RequestOutput
from tulu.engine.options import check_gpu_memory_utilization, check_token_budget
from tulu.engine.sampling import SamplingParams
from tulu.engine.speculative import SpeculativeConfig
from tulu.errors import ConfigError, GenerationError, TuluError
from tulu.model.config import NeoXConfig, dtype_name, parse_dtype, preset
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.tokenizer import Tokenizer

__all__ = [
    "WORKLOADS",
    "BenchSettings",
    "Request",
    "check_settings",
    "copy_bandwidth",
    "decode_step_bytes",
    "format_report",
    "generate_timed",
    "hf_generate",
    "hf_single_stream",
    "hf_static_compile_single_stream",
    "hf_throughput",
    "import_transformers",
    "make_requests",
    "median_of",
    "peak_memory_bytes",
    "preset_config",
    "random_model",
    "require_positive",
    "resolve_device",
    "resolve_random_model_arguments",
    "run_benchmark",
    "transformers_twin",
    "tulu_single_stream",
    "tulu_throughput",
]

Request = tuple[list[int], int]
"""(prompt token ids, number of output tokens to generate)."""

WORKLOADS = ("single", "fixed", "mixed", "prefill")

# Random prompt ids stay below this: under every Pythia tokenizer's 50,277 ids, so a prompt is
# also valid text for the checkpoint's tokenizer, and the same ids as the committed results.
PROMPT_VOCAB_CAP = 50_000

# The flag each setting is given by; error messages name the flag the user typed.
FLAGS = {
    "num_requests": "--num-requests",
    "prompt_len": "--prompt-len",
    "output_len": "--output-len",
    "mixed_requests": "--mixed-requests",
    "single_new_tokens": "--single-new-tokens",
    "prefill_tokens": "--prefill-tokens",
    "repeats": "--repeats",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "hf_batch_size": "--hf-batch-size",
    "hf_num_requests": "--hf-num-requests",
}


@dataclass
class BenchSettings:
    """What to measure. `check_settings` validates it against the model's config."""

    num_requests: int = 16
    prompt_len: int = 128
    output_len: int = 256
    mixed_requests: int | None = None  # None: no mixed-length workload
    mixed_prompt_range: tuple[int, int] = (16, 1024)
    mixed_output_range: tuple[int, int] = (16, 512)
    single_new_tokens: int = 128
    prefill_tokens: int | None = None  # None: the context window minus one
    repeats: int = 3  # single-stream and prefill runs; the median is reported
    skip: frozenset[str] = field(default_factory=frozenset)
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: the engine's default (8192 GPU, 2048 CPU)
    kv_cache_gb: float | None = None  # None: gpu_memory_fraction of free memory (GPU)
    gpu_memory_fraction: float = 0.9  # EngineConfig.gpu_memory_fraction
    enable_prefix_caching: bool = True
    decode_attention: str = "loop"  # EngineConfig.decode_attention
    cuda_graphs: bool | None = None  # EngineConfig.cuda_graphs (None: on where supported)
    speculative: SpeculativeConfig | None = None  # EngineConfig.speculative (None: off)
    compare_transformers: bool = False
    hf_batch_size: int = 64
    hf_num_requests: int | None = None  # None: transformers runs every throughput request
    hf_compile: bool = False  # also transformers with static cache + torch.compile (GPU only)
    seed: int = 0  # the random prompts (and, in the front ends, the random weights)

    def runs(self, workload: str) -> bool:
        """Whether `workload` (one of WORKLOADS) is measured."""
        if workload == "mixed" and self.mixed_requests is None:
            return False
        return workload not in self.skip

    def prefill_length(self, config: NeoXConfig) -> int:
        """The prefill prompt: by default it and its one generated token fill the window."""
        return self.prefill_tokens or config.max_position_embeddings - 1

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["skip"] = sorted(self.skip)
        out["mixed_prompt_range"] = list(self.mixed_prompt_range)
        out["mixed_output_range"] = list(self.mixed_output_range)
        if self.speculative is not None:
            out["speculative"] = dataclasses.asdict(self.speculative)
        return out


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TuluError(f"{FLAGS[name]} must be a positive integer, got {value!r}")


def check_settings(settings: BenchSettings, config: NeoXConfig) -> None:
    """Refuse settings that could not run, naming the flag, before any model work is done."""
    for name in ("num_requests", "prompt_len", "output_len", "single_new_tokens", "repeats"):
        _positive(name, getattr(settings, name))
    for name in ("max_num_seqs", "hf_batch_size"):
        _positive(name, getattr(settings, name))
    for name in ("mixed_requests", "prefill_tokens", "hf_num_requests", "max_num_batched_tokens"):
        if getattr(settings, name) is not None:
            _positive(name, getattr(settings, name))
    gb = settings.kv_cache_gb
    if gb is not None and not (isinstance(gb, (int, float)) and math.isfinite(gb) and gb > 0):
        raise TuluError(f"--kv-cache-gb must be a positive number, got {gb!r}")
    check_gpu_memory_utilization(settings.gpu_memory_fraction)
    check_token_budget(settings.max_num_batched_tokens, settings.max_num_seqs)
    unknown = sorted(set(settings.skip) - set(WORKLOADS))
    if unknown:
        raise TuluError(f"--skip: unknown workload {unknown[0]!r} (known: {', '.join(WORKLOADS)})")
    for name in ("mixed_prompt_range", "mixed_output_range"):
        lo, hi = getattr(settings, name)
        if not 1 <= lo <= hi:
            raise TuluError(f"{name} must be 1 <= low <= high, got {(lo, hi)}")

    window = config.max_position_embeddings

    def fits(tokens: int, what: str) -> None:
        if tokens > window:
            raise TuluError(
                f"{what} = {tokens:,} tokens exceed the model's context window of {window:,} tokens"
            )

    if settings.runs("fixed"):
        fits(
            settings.prompt_len + settings.output_len,
            f"--prompt-len {settings.prompt_len} + --output-len {settings.output_len}",
        )
    if settings.runs("single"):
        fits(
            settings.prompt_len + settings.single_new_tokens,
            f"--prompt-len {settings.prompt_len} + --single-new-tokens {settings.single_new_tokens}",
        )
    if settings.runs("mixed"):
        p, o = settings.mixed_prompt_range[1], settings.mixed_output_range[1]
        fits(p + o, f"--mixed: the longest mixed-length request ({p} in + {o} out)")
    if settings.runs("prefill"):
        n = settings.prefill_length(config)
        fits(n + 1, f"--prefill-tokens {n} + 1 generated token")


def _largest_request(settings: BenchSettings, config: NeoXConfig) -> int:
    sizes = [0]
    if settings.runs("fixed"):
        sizes.append(settings.prompt_len + settings.output_len)
    if settings.runs("single"):
        sizes.append(settings.prompt_len + settings.single_new_tokens)
    if settings.runs("mixed"):
        sizes.append(settings.mixed_prompt_range[1] + settings.mixed_output_range[1])
    if settings.runs("prefill"):
        sizes.append(settings.prefill_length(config) + 1)
    return max(sizes)


# ------------------------------------------------------------------------------ devices, models
def resolve_device(value: str | None) -> torch.device:
    """`--device` (default: cuda when available), refused at once when it cannot be used."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise TuluError(
            f"--device: unknown device {value!r} (use cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TuluError(f"--device {value}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise TuluError(f"--device {value}: only cpu and cuda devices are supported")
    return device


def preset_config(name: str, layers: int | None, dtype: torch.dtype) -> NeoXConfig:
    """The config of a Pythia preset, optionally with fewer (or more) layers."""
    if layers is not None and (
        isinstance(layers, bool) or not isinstance(layers, int) or layers < 1
    ):
        raise TuluError(f"--layers must be a positive integer, got {layers!r}")
    overrides: dict[str, Any] = {"torch_dtype": dtype_name(dtype)}
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    try:
        return preset(name, **overrides)
    except ConfigError as err:
        raise TuluError(f"--preset: {err}") from None


def add_random_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --layers, --device, --dtype: the random-weight model of a benchmark script."""
    parser.add_argument("--preset", default="pythia-70m")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")


def resolve_random_model_arguments(
    args: argparse.Namespace,
) -> tuple[torch.device, torch.dtype, NeoXConfig]:
    """The device, dtype and config that `add_random_model_arguments`' flags give, each flag
    checked (TuluError names it) before any weights are built."""
    device = resolve_device(args.device)
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = parse_dtype(args.dtype or default_dtype, "--dtype")
    return device, dtype, preset_config(args.preset, args.layers, dtype)


def require_positive(
    parser: argparse.ArgumentParser, args: argparse.Namespace, flags: Sequence[str]
) -> None:
    """Exit through `parser.error` (status 2, the flag named) when one of `flags` (attribute
    names: ``"hf_batch_size"`` is ``--hf-batch-size``) is below 1, before any model is built;
    None passes, for a flag whose default is resolved later (on the device)."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def random_model(config: NeoXConfig, device: torch.device, seed: int = 0) -> GPTNeoXForCausalLM:
    """Random weights of `config`'s shape: speed does not depend on the values.

    Built on the meta device and materialised once on `device` in the config's dtype, so a
    6.9B model never exists twice (or in float32 first) in memory; the numbers are drawn on
    `device` (`init_weights(on_device=True)`), seconds for 6.9B on a GPU.
    """
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    model = model.to(config.dtype).to_empty(device=device)
    model.init_weights(seed, on_device=True)
    return model.eval().requires_grad_(False)


def import_transformers() -> Any:
    """transformers is a test oracle, not a dependency: a clear error when it is absent."""
    try:
        import transformers
    except ImportError:
        raise TuluError(
            "--compare-transformers needs the transformers package (pip install transformers)"
        ) from None
    return transformers


def transformers_twin(model: GPTNeoXForCausalLM) -> Any:
    """transformers' GPTNeoXForCausalLM on the very tensors of `model` (no second copy)."""
    transformers = import_transformers()
    hf_config = transformers.GPTNeoXConfig(**model.config.to_dict())
    hf_config.pad_token_id = 0
    with torch.device("meta"):
        theirs = transformers.GPTNeoXForCausalLM(hf_config)
    names = set(theirs.state_dict())
    state = {}
    for key, value in model.state_dict().items():
        # transformers 5 calls the output projection lm_head; 4.x kept GPT-NeoX's embed_out.
        if key == "embed_out.weight" and key not in names and "lm_head.weight" in names:
            key = "lm_head.weight"
        state[key] = value
    theirs.load_state_dict(state, assign=True, strict=False)
    device = next(model.parameters()).device
    # Its rotary tables are buffers computed at construction (on meta): compute them for real.
    theirs.gpt_neox.rotary_emb = type(theirs.gpt_neox.rotary_emb)(hf_config).to(device)
    missing = [
        name
        for name, tensor in itertools.chain(theirs.named_parameters(), theirs.named_buffers())
        if tensor.is_meta
    ]
    if missing:  # a transformers version with names we do not map: a bug, not a user error
        raise RuntimeError(f"transformers' GPTNeoX has tensors tulu's model lacks: {missing[:5]}")
    return theirs.eval()


# ------------------------------------------------------------------------------ measurement helpers
def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer stops when the work is done, not queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's peak resident set (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return 0


def make_requests(
    rng: random.Random,
    n: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab: int,
) -> list[Request]:
    """`n` random-token prompts with lengths drawn uniformly from the (inclusive) ranges."""
    out = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        o = rng.randint(*output_range)
        out.append(([rng.randrange(vocab) for _ in range(p)], o))
    return out


def median_run(run: Callable[[int], dict[str, Any]], count: int) -> dict[str, Any]:
    """`run(0)` as a warm-up, then `run(1)` ... `run(count - 1)` timed: the timed run with the
    median tokens/s (the faster of the middle two for an even count), with every timed run's
    tokens/s, and every run's tokens (warm-up included, by index; None for a run that returns
    none) under "tokens", for comparing systems run on the same prompts."""
    runs = [run(index) for index in range(count)]
    tokens = [r.pop("tokens", None) for r in runs]
    timed = runs[1:]
    middle = sorted(timed, key=lambda r: r["output_tokens_per_s"])[len(timed) // 2]
    return middle | {
        "runs_tokens_per_s": [r["output_tokens_per_s"] for r in timed],
        "tokens": tokens,
    }


def median_of(fn: Callable[[list[int]], dict[str, float]], prompts: Sequence[list[int]]) -> dict:
    """Run a single-stream measurement once per prompt; the median of each figure.

    Every run gets a different prompt so that prefix caching cannot serve a repeat.
    """
    runs = [fn(prompt) for prompt in prompts]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


# ------------------------------------------------------------------------------ tulu
def generate_timed(
    llm: LLM, requests: Sequence[Request], device: torch.device
) -> tuple[list[RequestOutput], float]:
    """All requests through the engine at once; the outputs and the wall time in seconds."""
    params = [_greedy(o) for _, o in requests]
    sync(device)
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params, progress=False)
    sync(device)
    return outs, time.perf_counter() - start


def _throughput(requests: Sequence[Request], seconds: float, output_tokens: int) -> dict:
    return {
        "seconds": seconds,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / seconds,
        "prompt_tokens": sum(len(p) for p, _ in requests),
        "requests_per_s": len(requests) / seconds,
    }


def tulu_throughput(llm: LLM, requests: Sequence[Request], device: torch.device) -> dict:
    """Offline throughput; every request must have produced exactly its requested tokens."""
    outs, elapsed = generate_timed(llm, requests, device)
    for i, (out, (_, wanted)) in enumerate(zip(outs, requests, strict=True)):
        got = len(out.outputs[0].token_ids)
        if got != wanted:  # EOS is ignored, so anything else is an engine bug
            raise RuntimeError(f"request {i} produced {got} tokens, not the {wanted} requested")
    return _throughput(requests, elapsed, sum(o for _, o in requests))


def tulu_single_stream(llm: LLM, prompt: list[int], new_tokens: int, device: torch.device) -> dict:
    """One request alone: TTFT from the first streamed output, then the decode rate."""
    first: list[float] = []
    sync(device)
    start = time.perf_counter()
    llm.generate(
        [prompt],
        _greedy(new_tokens),
        progress=False,
        on_output=lambda _: first.append(time.perf_counter()) if not first else None,
    )
    sync(device)
    total = time.perf_counter() - start
    ttft = first[0] - start
    return {
        "ttft_ms": ttft * 1e3,
        "ms_per_token": (total - ttft) / max(new_tokens - 1, 1) * 1e3,
        "tokens_per_s": new_tokens / total,
    }


# ------------------------------------------------------------------------------ transformers
def hf_generate(
    model: Any, batch: Sequence[Request], max_new: int, device: torch.device, **kwargs: Any
) -> torch.Tensor:
    """transformers' greedy `generate` on one left-padded batch, exactly `max_new` new tokens."""
    width = max(len(p) for p, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (p, _) in enumerate(batch):  # left padding, as decoder-only generation needs
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            pad_token_id=0,
            **kwargs,
        )
    if out.shape[1] != width + max_new:
        raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens, not {max_new}")
    return out


def hf_throughput(
    model: Any, requests: Sequence[Request], batch_size: int, device: torch.device, **kwargs: Any
) -> dict:
    """Length-sorted batches; each generates to its longest request, only requested tokens count."""
    ordered = sorted(requests, key=lambda r: len(r[0]))
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(ordered), batch_size):
        batch = ordered[i : i + batch_size]
        hf_generate(model, batch, max(o for _, o in batch), device, **kwargs)
    sync(device)
    elapsed = time.perf_counter() - start
    return _throughput(requests, elapsed, sum(o for _, o in requests))


def hf_single_stream(
    model: Any, prompt: list[int], new_tokens: int, device: torch.device, **kwargs: Any
) -> dict:
    """One `generate` call, timed as tulu's stream is: TTFT when its first new token reaches
    the host (a streamer's second `put`: the first is the prompt), the rest per token after.
    (Two calls, one of a single token for the TTFT, could give a negative per-token time.)"""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        def __init__(self) -> None:
            self.puts, self.first_token_at = 0, None

        def put(self, value: torch.Tensor) -> None:  # generate moves each token to the CPU
            self.puts += 1
            if self.puts == 2:
                self.first_token_at = time.perf_counter()

        def end(self) -> None:
            pass

    clock = FirstTokenClock()
    sync(device)
    start = time.perf_counter()
    hf_generate(model, [(prompt, new_tokens)], new_tokens, device, streamer=clock, **kwargs)
    sync(device)
    total = time.perf_counter() - start
    if clock.first_token_at is None:
        raise RuntimeError("transformers' generate never streamed its first token")
    ttft = clock.first_token_at - start
    return {
        "ttft_ms": ttft * 1e3,
        "ms_per_token": (total - ttft) / max(new_tokens - 1, 1) * 1e3,
        "tokens_per_s": new_tokens / total,
    }


def hf_static_compile_single_stream(
    model: Any, warm_prompt: list[int], prompt: list[int], new_tokens: int, device: torch.device
) -> dict:
    """`hf_single_stream` with a static cache and ``torch.compile`` (GPU), on `prompt`, after
    an untimed compiling run on `warm_prompt`; adds ``compile_seconds``.

    The compiling run generates the measured `new_tokens`: a static cache sized for fewer
    would be rebuilt, and the forward recompiled, inside the timed run.
    """
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    started = time.perf_counter()
    hf_single_stream(model, warm_prompt, new_tokens, device)
    compile_seconds = time.perf_counter() - started
    return {
        **hf_single_stream(model, prompt, new_tokens, device),
        "compile_seconds": compile_seconds,
    }


# ------------------------------------------------------------------------------ roofline
def decode_step_bytes(model: GPTNeoXForCausalLM, context_tokens: int) -> int:
    """Bytes one single-stream decode step must read: every weight, except that the input
    embedding gives only its one row (unless tied to the LM head, which reads it whole), plus
    the K and V of `context_tokens` tokens in every layer."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.gpt_neox.embed_in.weight
    if embed is not model.embed_out.weight:
        weights -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    kv = model.config.kv_cache_bytes_per_token(embed.dtype) * context_tokens
    return weights + kv


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ the run
@dataclass
class _Workload:
    """One workload's inputs, drawn before anything is timed so both systems get the same."""

    kind: str  # single | throughput | prefill
    key: str  # in results["workloads"]
    label: str  # the table's workload column
    requests: list[Request]


def _plan(
    settings: BenchSettings, config: NeoXConfig, rng: random.Random, vocab: int
) -> list[_Workload]:
    p_len, new = settings.prompt_len, settings.single_new_tokens
    plan: list[_Workload] = []
    if settings.runs("single"):
        reqs = make_requests(rng, settings.repeats, (p_len, p_len), (new, new), vocab)
        plan.append(_Workload("single", "single_stream", "single stream", reqs))
    for workload, n, prompt_range, output_range, key, label in (
        (
            "fixed",
            settings.num_requests,
            (p_len, p_len),
            (settings.output_len, settings.output_len),
            f"fixed_{p_len}_{settings.output_len}",
            f"{settings.num_requests} x ({p_len} in / {settings.output_len} out)",
        ),
        (
            "mixed",
            settings.mixed_requests,
            settings.mixed_prompt_range,
            settings.mixed_output_range,
            "mixed",
            f"{settings.mixed_requests} mixed ({settings.mixed_prompt_range[0]}-"
            f"{settings.mixed_prompt_range[1]} in / {settings.mixed_output_range[0]}-"
            f"{settings.mixed_output_range[1]} out)",
        ),
    ):
        if settings.runs(workload):
            reqs = make_requests(rng, n, prompt_range, output_range, vocab)
            plan.append(_Workload("throughput", key, label, reqs))
    if settings.runs("prefill"):
        n = settings.prefill_length(config)
        reqs = make_requests(rng, settings.repeats, (n, n), (1, 1), vocab)
        plan.append(_Workload("prefill", f"prefill_{n + 1}", f"prefill {n:,} tokens", reqs))
    return plan


def _measure(work: _Workload, single: Callable, throughput: Callable) -> dict[str, Any]:
    """One system's figures for `work`: `single(prompt, new_tokens)` for the single stream and
    the prefill (a one-token request: its time to first token is the prefill),
    `throughput(requests)` for the offline workloads."""
    prompts = [p for p, _ in work.requests]
    if work.kind == "single":
        new = work.requests[0][1]
        return median_of(lambda prompt: single(prompt, new), prompts)
    if work.kind == "prefill":
        ms = median_of(lambda prompt: single(prompt, 1), prompts)["ttft_ms"]
        return {"tokens_per_s": len(prompts[0]) / ms * 1e3}
    return throughput(work.requests)


def free_device_memory(device: torch.device) -> None:
    """Give a dropped engine's KV cache (or model) back to the device before the next system
    is measured: on a GPU an engine's cache takes most of the free memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def output_rate(output_tokens: int, seconds: float) -> dict[str, float]:
    """A run's output tokens, wall time and output tokens/s."""
    return {
        "seconds": seconds,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / seconds,
    }


def _run_tulu(
    model: GPTNeoXForCausalLM,
    tokenizer: Tokenizer | None,
    settings: BenchSettings,
    plan: list[_Workload],
    say: Callable[[str], None],
    measured: Callable[[str, dict[str, Any], float], None],
) -> dict[str, Any]:
    """Every workload of `plan` on a fresh engine; its figures, start-up time, peak memory and
    KV-cache size. `measured(key, figures, startup_seconds)` is called as each workload
    finishes. The engine is dropped on return."""
    config = model.config
    device = next(model.parameters()).device
    started = time.perf_counter()
    gb = settings.kv_cache_gb
    try:
        llm = LLM(
            model,
            tokenizer,
            EngineConfig(
                kv_cache_bytes=int(gb * 2**30) if gb else None,
                gpu_memory_fraction=settings.gpu_memory_fraction,
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
                enable_prefix_caching=settings.enable_prefix_caching,
                decode_attention=settings.decode_attention,
                cuda_graphs=settings.cuda_graphs,
                speculative=settings.speculative,
            ),
        )
    except GenerationError as err:
        raise TuluError(f"--kv-cache-gb {gb:g}: {err}" if gb else str(err)) from None
    startup = time.perf_counter() - started
    pool = llm.engine.pool
    capacity = pool.num_blocks * pool.block_size
    largest = _largest_request(settings, config)
    if largest > capacity:
        held = f"--kv-cache-gb {gb:g} holds" if gb else "the default KV cache holds"
        raise TuluError(
            f"{held} {capacity:,} tokens, fewer than the {largest:,} tokens of the largest "
            "request (raise --kv-cache-gb)"
        )
    # One short warm-up request, so that one-off costs (allocator, kernels) are not timed.
    llm.generate([[1, 2, 3]], _greedy(4), progress=False)
    figures = {}
    for work in plan:
        say(f"tulu: {work.label}")
        figures[work.key] = _measure(
            work,
            lambda prompt, new: tulu_single_stream(llm, prompt, new, device),
            lambda reqs: tulu_throughput(llm, reqs, device),
        )
        measured(work.key, figures[work.key], startup)
    return {
        "figures": figures,
        "startup": startup,
        "peak": peak_memory_bytes(device),
        "num_blocks": pool.num_blocks,
        "block_size": pool.block_size,
    }


def run_benchmark(
    model: GPTNeoXForCausalLM,
    settings: BenchSettings,
    *,
    name: str,
    preset_name: str | None = None,
    tokenizer: Tokenizer | None = None,
    progress: Callable[[str], None] | None = None,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every workload `settings` asks for; the results as a JSON-ready dict.

    The requests are drawn first; tulu's engine then runs every workload, and is shut down
    (its KV cache, which takes most of a GPU's free memory, given back) before transformers
    runs the same workloads on the same weights: each system has the device to itself.

    The dict holds `workloads` (each workload's raw figures per system), the run's metadata
    (`peak_memory_bytes` is tulu's, `transformers_peak_memory_bytes` transformers'),
    `roofline` on a GPU, and `table`: one row per figure with tulu's value, transformers'
    value and the ratio (> 1 means tulu is better: faster, or less time), both None when
    transformers was not run. `format_report` prints it.

    `partial`, if given, gets ``{"partial": True, "workloads": ..., "engine_startup_seconds":
    ...}`` after every workload of either system, so that a run stopped at a time limit (a
    short GPU session) keeps the figures it has measured.
    """
    config = model.config
    check_settings(settings, config)
    say = progress or (lambda _message: None)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gpu = device.type == "cuda"
    rng = random.Random(settings.seed)
    vocab = min(config.vocab_size, PROMPT_VOCAB_CAP, len(tokenizer) if tokenizer else math.inf)
    plan = _plan(settings, config, rng, vocab)
    results: dict[str, Any] = {"workloads": {w.key: {} for w in plan}}
    workloads = results["workloads"]

    startup: list[float] = []

    def report() -> None:
        if partial is not None:
            so_far = {"engine_startup_seconds": startup[0]} if startup else {}
            partial({"partial": True, "workloads": workloads, **so_far})

    def tulu_measured(key: str, figures: dict[str, Any], startup_seconds: float) -> None:
        workloads[key]["tulu"] = figures
        startup[:] = [startup_seconds]
        report()

    # ---- tulu (its engine, and the KV cache it holds, are gone when this returns)
    free_device_memory(device)
    engine_info = _run_tulu(model, tokenizer, settings, plan, say, tulu_measured)
    for key, figures in engine_info.pop("figures").items():
        workloads[key]["tulu"] = figures
    free_device_memory(device)

    # ---- transformers, on the same requests (throughput: the first hf_num_requests)
    theirs = transformers_twin(model) if settings.compare_transformers else None
    hf_peak = None
    if theirs is not None:
        hf_generate(theirs, [([1, 2, 3], 4)], 4, device)
        for work in plan:
            sample = work.requests
            if work.kind == "throughput":
                sample = sample[: settings.hf_num_requests]
                workloads[work.key]["transformers_requests"] = len(sample)
            say(f"transformers: {work.label}")
            workloads[work.key]["transformers"] = _measure(
                _Workload(work.kind, work.key, work.label, sample),
                lambda prompt, new: hf_single_stream(theirs, prompt, new, device),
                lambda reqs: hf_throughput(theirs, reqs, settings.hf_batch_size, device),
            )
            report()
        hf_peak = peak_memory_bytes(device)

    # ---- the table (and the committed JSON layout: prefill figures flat, requests counts)
    rows: list[tuple[str, str, float, float | None, float | None]] = []

    def add(workload: str, metric: str, ours: float, hf: float | None, higher: bool = True) -> None:
        ratio = None if hf is None else (ours / hf if higher else hf / ours)
        rows.append((workload, metric, ours, hf, ratio))

    for work in plan:
        entry = workloads[work.key]
        a, b = entry["tulu"], entry.get("transformers")
        if work.kind == "single":
            p_len = len(work.requests[0][0])
            for metric, key, higher in (
                (f"TTFT ms ({p_len}-token prompt)", "ttft_ms", False),
                ("ms / output token", "ms_per_token", False),
                ("tokens/s", "tokens_per_s", True),
            ):
                add(work.label, metric, a[key], None if b is None else b[key], higher)
        elif work.kind == "throughput":
            entry["requests"] = len(work.requests)
            add(
                work.label,
                "output tokens/s",
                a["output_tokens_per_s"],
                None if b is None else b["output_tokens_per_s"],
            )
        else:
            flat: dict[str, Any] = {"prompt_tokens": len(work.requests[0][0])}
            flat["tulu_tokens_per_s"] = a["tokens_per_s"]
            if b is not None:
                flat["transformers_tokens_per_s"] = b["tokens_per_s"]
            workloads[work.key] = flat
            add(work.label, "tokens/s", a["tokens_per_s"], None if b is None else b["tokens_per_s"])

    single = next((w for w in plan if w.kind == "single"), None)
    if gpu and settings.hf_compile and theirs is not None and single is not None:
        say("transformers with static cache + torch.compile: compiling")
        p_len, new = len(single.requests[0][0]), single.requests[0][1]
        prompt = make_requests(rng, 1, (p_len, p_len), (1, 1), vocab)[0][0]
        c = hf_static_compile_single_stream(theirs, single.requests[0][0], prompt, new, device)
        workloads["single_stream"]["transformers_static_compile"] = c
        add(
            "single stream",
            "tokens/s vs HF static+compile",
            workloads["single_stream"]["tulu"]["tokens_per_s"],
            c["tokens_per_s"],
        )

    results.update(
        {
            "model": name,
            "preset": preset_name,
            "layers": config.num_hidden_layers,
            "dtype": str(dtype),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if gpu
            else (platform.processor() or "cpu"),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": import_transformers().__version__ if theirs is not None else None,
            "engine_startup_seconds": engine_info["startup"],
            "peak_memory_bytes": engine_info["peak"],
            "transformers_peak_memory_bytes": hf_peak,
            "kv_cache_blocks": engine_info["num_blocks"],
            "block_size": engine_info["block_size"],
            "settings": settings.as_dict(),
        }
    )
    if gpu:
        bandwidth = copy_bandwidth(device)
        # The single stream's mean context over its decode steps.
        step_bytes = decode_step_bytes(model, settings.prompt_len + settings.single_new_tokens // 2)
        limit = bandwidth / step_bytes
        achieved = workloads.get("single_stream", {}).get("tulu", {}).get("tokens_per_s")
        results["roofline"] = {
            "copy_bandwidth_bytes_per_s": bandwidth,
            "decode_step_bytes": step_bytes,
            "single_stream_limit_tokens_per_s": limit,
            "achieved_fraction": achieved / limit if achieved else None,
        }
    results["table"] = [
        dict(zip(("workload", "metric", "tulu", "transformers", "ratio"), row, strict=True))
        for row in rows
    ]
    return results


def format_report(results: dict[str, Any]) -> str:
    """The human-readable table of a `run_benchmark` result (tulu/HF > 1: tulu is better)."""
    compared = results.get("transformers") is not None
    versions = f"torch {results['torch']}"
    if compared:
        versions += f", transformers {results['transformers']}"
    lines = [
        f"{results['model']} ({results['layers']} layers), {results['dtype']}, "
        f"{results['device_name']}, {versions}, {results['threads']} threads"
    ]
    if compared:
        lines.append(
            f"{'workload':<40} {'metric':<32} {'tulu':>10} {'transformers':>13} {'tulu/HF':>8}"
        )
    else:
        lines.append(f"{'workload':<40} {'metric':<32} {'tulu':>10}")
    for row in results["table"]:
        line = f"{row['workload']:<40} {row['metric']:<32} {row['tulu']:>10.1f}"
        if compared:
            hf, ratio = row["transformers"], row["ratio"]
            line += f" {hf:>13.1f} {ratio:>7.2f}x" if hf is not None else f" {'-':>13} {'-':>8}"
        lines.append(line)
    memory = f"peak memory {results['peak_memory_bytes'] / 2**20:,.0f} MiB"
    if results.get("transformers_peak_memory_bytes") is not None:
        memory += f" (transformers {results['transformers_peak_memory_bytes'] / 2**20:,.0f} MiB)"
    lines.append(
        f"{memory}; engine start-up "
        f"{results['engine_startup_seconds']:.1f} s; KV cache {results['kv_cache_blocks']} blocks "
        f"x {results['block_size']} tokens"
    )
    if "roofline" in results:
        r = results["roofline"]
        lines.append(
            f"roofline: copy bandwidth {r['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, decode "
            f"step reads {r['decode_step_bytes'] / 1e9:.2f} GB -> limit "
            f"{r['single_stream_limit_tokens_per_s']:.0f} tokens/s; achieved "
            f"{100 * (r['achieved_fraction'] or 0):.0f}%"
        )
    return "\n".join(lines)
