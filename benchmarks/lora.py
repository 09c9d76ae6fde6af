"""Multi-LoRA serving speed: tulu's unmerged adapters vs transformers + PEFT, same weights, one run.

N requests (fixed prompt and output lengths, greedy, EOS ignored) spread round-robin over K
random LoRA adapters (r=16 on the attention and MLP projections, as `tulu train`'s default
targets), all in one batch:
- tulu, base model only (no adapters loaded): the reference speed;
- tulu with the K adapters loaded, every request on the base (the cost of the idle hooks);
- tulu with the K adapters, requests mixed over them (`LLM.generate(..., lora=names)`);
- transformers, base model only, in batches of `--hf-batch-size`;
- transformers + PEFT, unmerged, the same mixed batches (`generate(..., adapter_names=...)`,
  PEFT's mixed-adapter batches).
Each figure is the median of `--repeats` runs after one warm-up run. It prints the output
tokens/s of each, the ratios (tulu vs PEFT, and what the adapters cost each of them against
its own base), and how many requests' greedy tokens agree between tulu and PEFT, and writes
`results/lora-PRESET-DEVICE.json`.

    python benchmarks/lora.py                          # CPU: pythia-70m, float32
    python benchmarks/lora.py --preset pythia-6.9b --num-requests 256 --output-len 128   # GPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from tulu.bench.workloads import (
    add_random_model_arguments,
    free_device_memory,
    hf_generate,
    make_requests,
    median_run,
    output_rate,
    random_model,
    require_positive,
    resolve_random_model_arguments,
    sync,
    transformers_twin,
)
from tulu.engine.engine import LLM, EngineConfig
from tulu.engine.sampling import SamplingParams
from tulu.errors import TuluError
from tulu.jsonl import check_output, write_json

RESULTS = Path(__file__).parent / "results"
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def write_adapter(model: torch.nn.Module, directory: Path, rank: int, seed: int) -> Path:
    """A PEFT-format LoRA adapter of random A and B on `TARGETS`, written without PEFT."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            prefix = f"base_model.model.{name}"
            a = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=gen) * 0.02
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "random",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "bias": "none",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def tulu_run(llm: LLM, requests: list, names: list[str | None], device: torch.device) -> dict:
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in requests]
    sync(device)
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params, progress=False, lora=names)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outputs]
    return output_rate(sum(len(t) for t in tokens), seconds) | {"tokens": tokens}


def hf_run(model, requests: list, names: list[str] | None, batch_size: int, device) -> dict:
    """transformers' greedy `hf_generate` in batches (the prompts share a length: no
    padding); with `names`, PEFT's unmerged mixed-adapter batches (`adapter_names`, one per
    row)."""
    tokens: list[list[int]] = []
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        adapters = {} if names is None else {"adapter_names": names[i : i + batch_size]}
        out = hf_generate(model, batch, max(o for _, o in batch), device, **adapters)
        tokens += out[:, len(batch[0][0]) :].tolist()
    sync(device)
    seconds = time.perf_counter() - start
    return output_rate(sum(o for _, o in requests), seconds) | {"tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_random_model_arguments(parser)
    parser.add_argument("--num-requests", type=int, default=None, help="default: 256 GPU, 32 CPU")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    positive = ("num_requests", "prompt_len", "output_len", "adapters", "rank", "hf_batch_size")
    require_positive(parser, args, (*positive, "repeats"))
    try:
        from peft import PeftModel
    except ImportError:
        print("lora.py: error: the peer needs peft (pip install 'tulu[train]')", file=sys.stderr)
        return 1

    try:
        device, dtype, config = resolve_random_model_arguments(args)
        gpu = device.type == "cuda"
        out = args.output or RESULTS / f"lora-{args.preset}-{device.type}.json"
        check_output(out)
        model = random_model(config, device, seed=0)
        n = args.num_requests or (256 if gpu else 32)
        rng = random.Random(0)
        lengths = (args.prompt_len, args.prompt_len), (args.output_len, args.output_len)
        requests = make_requests(rng, n, *lengths, config.vocab_size)
        names = [f"adapter-{i}" for i in range(args.adapters)]
        mixed = [names[i % len(names)] for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            dirs = {
                name: write_adapter(model, Path(tmp) / name, args.rank, seed=i)
                for i, name in enumerate(names)
            }
            log = lambda message: print(message, file=sys.stderr)  # noqa: E731
            reps = args.repeats
            log("tulu: base model only")
            plain = LLM(model, None, EngineConfig())
            base = median_run(
                lambda _, e=plain: tulu_run(e, requests, [None] * n, device), reps + 1
            )
            # On a GPU each engine's KV cache takes 90% of the free memory: one engine at a
            # time, or the next one gets a tenth of the cache (and transformers none).
            del plain
            free_device_memory(device)
            llm = LLM(model, None, EngineConfig(), lora_modules=dirs)
            log(f"tulu: {len(names)} adapters loaded, requests on the base")
            idle = median_run(lambda _, e=llm: tulu_run(e, requests, [None] * n, device), reps + 1)
            log(f"tulu: {len(names)} adapters, requests mixed over them")
            lora = median_run(lambda _, e=llm: tulu_run(e, requests, mixed, device), reps + 1)
            llm.engine.lora.remove()
            del llm
            free_device_memory(device)
            twin = transformers_twin(model)
            batch = args.hf_batch_size
            log("transformers: base model only")
            hf_base = median_run(lambda _: hf_run(twin, requests, None, batch, device), reps + 1)
            log("transformers + PEFT: the same mixed batches")
            peer = PeftModel.from_pretrained(twin, str(dirs[names[0]]), names[0])
            for name in names[1:]:
                peer.load_adapter(str(dirs[name]), name)
            peer.eval()
            peft = median_run(lambda _: hf_run(peer, requests, mixed, batch, device), reps + 1)
    except TuluError as err:
        print(f"lora.py: error: {err}", file=sys.stderr)
        return 1

    # Every run serves the same requests greedily: the last run's tokens stand for all.
    agree = sum(a == b for a, b in zip(lora.pop("tokens")[-1], peft.pop("tokens")[-1], strict=True))
    assert base.pop("tokens") == idle.pop("tokens"), "idle adapters changed the base's tokens"
    hf_base.pop("tokens")
    results = {
        "preset": args.preset,
        "device": str(device),
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "requests": n,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "adapters": len(names),
        "rank": args.rank,
        "tulu_base": base,
        "tulu_adapters_loaded_unused": idle,
        "tulu_mixed_adapters": lora,
        "transformers_base": hf_base,
        "peft_mixed_adapters": peft,
        "repeats": args.repeats,
        "ratio_tulu_vs_peft": lora["output_tokens_per_s"] / peft["output_tokens_per_s"],
        "ratio_tulu_vs_transformers_base": base["output_tokens_per_s"]
        / hf_base["output_tokens_per_s"],
        "ratio_peft_vs_transformers_base": peft["output_tokens_per_s"]
        / hf_base["output_tokens_per_s"],
        "ratio_mixed_vs_base": lora["output_tokens_per_s"] / base["output_tokens_per_s"],
        "ratio_idle_vs_base": idle["output_tokens_per_s"] / base["output_tokens_per_s"],
        "greedy_agreement_with_peft": f"{agree}/{n}",
    }
    print(
        f"\n{n} requests x ({args.prompt_len} in / {args.output_len} out), "
        f"{len(names)} adapters of r={args.rank}, {args.preset} {dtype} on {device}"
    )
    for label, key in (
        ("tulu, base only", "tulu_base"),
        ("tulu, adapters loaded, unused", "tulu_adapters_loaded_unused"),
        ("tulu, mixed adapters", "tulu_mixed_adapters"),
        ("transformers, base only", "transformers_base"),
        ("transformers + PEFT, mixed adapters", "peft_mixed_adapters"),
    ):
        print(f"  {label:<38} {results[key]['output_tokens_per_s']:>9.1f} output tokens/s")
    print(
        f"  tulu / PEFT, mixed adapters: {results['ratio_tulu_vs_peft']:.2f}x "
        f"(base models: tulu / transformers {results['ratio_tulu_vs_transformers_base']:.2f}x)\n"
        f"  adapters' cost, mixed / own base: tulu {results['ratio_mixed_vs_base']:.2f}x, "
        f"PEFT {results['ratio_peft_vs_transformers_base']:.2f}x; "
        f"tulu's idle hooks / base: {results['ratio_idle_vs_base']:.2f}x\n"
        f"  greedy tokens equal to PEFT's: {agree}/{n}"
    )
    write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
