"""Generation speed: tulu's engine vs transformers' `generate`, same weights, same prompts, one run.

Workloads (all greedy, EOS ignored so every request produces exactly its requested length):
- single stream: time to first token, ms per output token, tokens/s;
- offline throughput, fixed shape: N requests of 128 prompt / 256 output tokens;
- offline throughput, mixed: N requests with prompts 16-1024 and outputs 16-512 tokens;
- prefill: one 2,048-token prompt (tokens/s);
- peak memory.
transformers runs its batched `generate` on length-sorted, left-padded batches of
`--hf-batch-size` requests, each batch generating up to its longest requested output; only the
requested tokens are counted, as in vLLM's throughput benchmark for its HF backend.

On a GPU it also measures the device copy bandwidth and prints the decode roofline: bytes one
decode step must read (weights + live KV cache) over that bandwidth.

    python benchmarks/generation.py                                    # CPU: pythia-70m, float32
    python benchmarks/generation.py --preset pythia-6.9b --num-requests 1000   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import transformers

from tulu.engine.engine import LLM, EngineConfig
from tulu.engine.sampling import SamplingParams
from tulu.model import GPTNeoXForCausalLM, preset
from tulu.model.config import dtype_name, parse_dtype

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def build_models(args, device: torch.device, dtype: torch.dtype):
    overrides = {"torch_dtype": dtype_name(dtype)}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    config = preset(args.preset, **overrides)
    with torch.device("meta"):
        ours = GPTNeoXForCausalLM(config)
    ours = ours.to_empty(device=device)
    ours.init_weights(0)
    ours = ours.to(dtype).eval().requires_grad_(False)
    hf_config = transformers.GPTNeoXConfig(**config.to_dict())
    hf_config.pad_token_id = 0
    with torch.device("meta"):
        theirs = transformers.GPTNeoXForCausalLM(hf_config)
    # Share the very same tensors: no second copy of the weights.
    state = {
        ("lm_head.weight" if k == "embed_out.weight" else k): v
        for k, v in ours.state_dict().items()
    }
    theirs.load_state_dict(state, assign=True, strict=False)
    theirs.gpt_neox.rotary_emb = type(theirs.gpt_neox.rotary_emb)(hf_config).to(device)
    return config, ours, theirs.eval()


def make_requests(rng: random.Random, n: int, prompt_range, output_range, vocab: int):
    out = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        o = rng.randint(*output_range)
        out.append(([rng.randrange(vocab) for _ in range(p)], o))
    return out


# ------------------------------------------------------------------------------ tulu
def tulu_throughput(llm: LLM, requests, device) -> dict:
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in requests]
    sync(device)
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params, progress=False)
    sync(device)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(o for _, o in requests)
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def median_of(fn, prompts) -> dict:
    """Run a single-stream measurement once per prompt; the median of each figure.

    Every run gets a different prompt so that prefix caching cannot serve a repeat.
    """
    runs = [fn(prompt) for prompt in prompts]
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def tulu_single_stream(llm: LLM, prompt, new_tokens: int, device) -> dict:
    first: list[float] = []
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    llm.generate(
        [prompt],
        params,
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
def hf_generate(model, batch, max_new: int, device, **kwargs):
    width = max(len(p) for p, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (p, _) in enumerate(batch):  # left padding, as decoder-only generation needs
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        return model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            pad_token_id=0,
            **kwargs,
        )


def hf_throughput(model, requests, batch_size: int, device, **kwargs) -> dict:
    ordered = sorted(requests, key=lambda r: len(r[0]))
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(ordered), batch_size):
        batch = ordered[i : i + batch_size]
        hf_generate(model, batch, max(o for _, o in batch), device, **kwargs)
    sync(device)
    elapsed = time.perf_counter() - start
    tokens = sum(o for _, o in requests)
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def hf_single_stream(model, prompt, new_tokens: int, device, **kwargs) -> dict:
    sync(device)
    start = time.perf_counter()
    hf_generate(model, [(prompt, 1)], 1, device, **kwargs)
    sync(device)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    hf_generate(model, [(prompt, new_tokens)], new_tokens, device, **kwargs)
    sync(device)
    total = time.perf_counter() - start
    return {
        "ttft_ms": ttft * 1e3,
        "ms_per_token": (total - ttft) / max(new_tokens - 1, 1) * 1e3,
        "tokens_per_s": new_tokens / total,
    }


# ------------------------------------------------------------------------------ roofline
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="pythia-70m")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument(
        "--num-requests", type=int, default=None, help="default: 1000 on GPU, 24 on CPU"
    )
    parser.add_argument(
        "--mixed-requests", type=int, default=None, help="default: 1000 on GPU, 24 on CPU"
    )
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--single-new-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-gb", type=float, default=None)
    parser.add_argument(
        "--repeats", type=int, default=5, help="single-stream and prefill runs (median)"
    )
    parser.add_argument(
        "--skip", default="", help="comma list of workloads to skip: single,fixed,mixed,prefill"
    )
    parser.add_argument(
        "--hf-compile",
        action="store_true",
        help="also run transformers with static cache + torch.compile (GPU)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = parse_dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    n_fixed = args.num_requests or (1000 if gpu else 24)
    n_mixed = args.mixed_requests or (1000 if gpu else 24)
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    config, ours, theirs = build_models(args, device, dtype)
    rng = random.Random(0)
    vocab = min(config.vocab_size, 50000)

    started = time.perf_counter()
    engine_config = EngineConfig(
        kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None
    )
    llm = LLM(ours, None, engine_config)
    warmup = time.perf_counter() - started
    # One short warm-up request each, so that one-off costs (allocator, kernels) are not timed.
    llm.generate(
        [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), progress=False
    )
    hf_generate(theirs, [([1, 2, 3], 4)], 4, device)

    results: dict = {"workloads": {}}
    rows = []

    def add(name, metric, ours_v, hf_v, higher_is_better=True):
        ratio = (ours_v / hf_v) if higher_is_better else (hf_v / ours_v)
        rows.append((name, metric, ours_v, hf_v, ratio))

    if "single" not in skip:
        prompts = [p for p, _ in make_requests(rng, args.repeats, (128, 128), (1, 1), vocab)]
        a = median_of(lambda p: tulu_single_stream(llm, p, args.single_new_tokens, device), prompts)
        b = median_of(
            lambda p: hf_single_stream(theirs, p, args.single_new_tokens, device), prompts
        )
        results["workloads"]["single_stream"] = {"tulu": a, "transformers": b}
        add("single stream", "TTFT ms (128-token prompt)", a["ttft_ms"], b["ttft_ms"], False)
        add("single stream", "ms / output token", a["ms_per_token"], b["ms_per_token"], False)
        add("single stream", "tokens/s", a["tokens_per_s"], b["tokens_per_s"])
    if "fixed" not in skip:
        reqs = make_requests(rng, n_fixed, (128, 128), (256, 256), vocab)
        a = tulu_throughput(llm, reqs, device)
        b = hf_throughput(theirs, reqs, args.hf_batch_size, device)
        results["workloads"]["fixed_128_256"] = {"requests": n_fixed, "tulu": a, "transformers": b}
        add(
            f"{n_fixed} x (128 in / 256 out)",
            "output tokens/s",
            a["output_tokens_per_s"],
            b["output_tokens_per_s"],
        )
    if "mixed" not in skip:
        reqs = make_requests(rng, n_mixed, (16, 1024), (16, 512), vocab)
        a = tulu_throughput(llm, reqs, device)
        b = hf_throughput(theirs, reqs, args.hf_batch_size, device)
        results["workloads"]["mixed"] = {"requests": n_mixed, "tulu": a, "transformers": b}
        add(
            f"{n_mixed} mixed (16-1024 in / 16-512 out)",
            "output tokens/s",
            a["output_tokens_per_s"],
            b["output_tokens_per_s"],
        )
    if "prefill" not in skip:
        prompts = [p for p, _ in make_requests(rng, args.repeats, (2047, 2047), (1, 1), vocab)]
        # A 2,047-token prompt and one new token fill the 2,048-token window: the time to the
        # first token is the prefill.
        a = median_of(lambda p: tulu_single_stream(llm, p, 1, device), prompts)["ttft_ms"]
        b = median_of(lambda p: hf_single_stream(theirs, p, 1, device), prompts)["ttft_ms"]
        results["workloads"]["prefill_2048"] = {
            "tulu_tokens_per_s": 2047 / a * 1e3,
            "transformers_tokens_per_s": 2047 / b * 1e3,
        }
        add("prefill 2,047 tokens", "tokens/s", 2047 / a * 1e3, 2047 / b * 1e3)

    if gpu and args.hf_compile and "single" not in skip:
        theirs.generation_config.cache_implementation = "static"
        theirs.forward = torch.compile(theirs.forward, mode="reduce-overhead", fullgraph=True)
        t0 = time.perf_counter()
        hf_single_stream(theirs, prompts[0], 8, device)  # compile
        compile_s = time.perf_counter() - t0
        c = hf_single_stream(
            theirs,
            make_requests(rng, 1, (128, 128), (1, 1), vocab)[0][0],
            args.single_new_tokens,
            device,
        )
        results["workloads"]["single_stream"]["transformers_static_compile"] = {
            **c,
            "compile_seconds": compile_s,
        }
        add(
            "single stream",
            "tokens/s vs HF static+compile",
            results["workloads"]["single_stream"]["tulu"]["tokens_per_s"],
            c["tokens_per_s"],
        )

    peak = peak_memory_bytes(device)
    results.update(
        {
            "preset": args.preset,
            "layers": config.num_hidden_layers,
            "dtype": str(dtype),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if gpu
            else (platform.processor() or "cpu"),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "engine_startup_seconds": warmup,
            "peak_memory_bytes": peak,
            "kv_cache_blocks": llm.engine.pool.num_blocks,
            "block_size": llm.engine.pool.block_size,
        }
    )
    if gpu:
        bandwidth = copy_bandwidth(device)
        weights = sum(p.numel() * p.element_size() for p in ours.parameters())
        kv_per_token = config.kv_cache_bytes_per_token(dtype)
        step_bytes = weights + kv_per_token * (128 + args.single_new_tokens // 2)
        limit = bandwidth / step_bytes
        achieved = results["workloads"].get("single_stream", {}).get("tulu", {}).get("tokens_per_s")
        results["roofline"] = {
            "copy_bandwidth_bytes_per_s": bandwidth,
            "decode_step_bytes": step_bytes,
            "single_stream_limit_tokens_per_s": limit,
            "achieved_fraction": achieved / limit if achieved else None,
        }

    print(
        f"\n{args.preset} ({config.num_hidden_layers} layers), {dtype}, {results['device_name']}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'workload':<40} {'metric':<32} {'tulu':>10} {'transformers':>13} {'tulu/HF':>8}")
    for name, metric, a, b, ratio in rows:
        print(f"{name:<40} {metric:<32} {a:>10.1f} {b:>13.1f} {ratio:>7.2f}x")
    print(
        f"peak memory {peak / 2**20:,.0f} MiB; engine start-up {warmup:.1f} s; "
        f"KV cache {llm.engine.pool.num_blocks} blocks x {llm.engine.pool.block_size} tokens"
    )
    if "roofline" in results:
        r = results["roofline"]
        print(
            f"roofline: copy bandwidth {r['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, decode step reads "
            f"{r['decode_step_bytes'] / 1e9:.2f} GB -> limit {r['single_stream_limit_tokens_per_s']:.0f} tokens/s; "
            f"achieved {100 * (r['achieved_fraction'] or 0):.0f}%"
        )
    results["table"] = [
        dict(zip(("workload", "metric", "tulu", "transformers", "ratio"), row, strict=True))
        for row in rows
    ]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"generation-{args.preset}-{device.type}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
