"""Parallel sampling (n > 1): tulu's engine vs transformers' `generate`, same weights, one run.

Codex-Eval draws 20 samples of every HumanEval prompt; that is the workload here: N prompts
of `--prompt-len` random tokens, `--n` samples each (temperature 0.8, top_p 0.95, seeded, EOS
ignored so every sample produces exactly `--output-len` tokens). Three systems:
- tulu: one `SamplingParams(n=...)` per prompt. One sample computes the prompt and its
  siblings, admitted in the same step, take its full blocks as that step writes them: the
  prompt is computed once;
- tulu without prefix caching: every sample computes the whole prompt (what tulu did for all
  n > 1 requests before the siblings shared it);
- transformers: `generate(num_return_sequences=n)` on batches of `--hf-batch-size` rows,
  which expands every prompt to n rows before the prefill (n prefills of the prompt).
Each timed run uses new prompts (a repeat must not hit the prefix cache of the one before);
each figure is the median of `--repeats` runs after one warm-up run. It prints output tokens/s,
the ratios, and how many prompt tokens each tulu run computed versus took from the cache,
checks that both tulu runs drew the same tokens (a request's samples depend only on its seed),
and writes `results/parallel-sampling-PRESET-DEVICE.json`.

    python benchmarks/parallel_sampling.py                     # CPU: pythia-70m, float32
    python benchmarks/parallel_sampling.py --preset pythia-6.9b --num-prompts 164 --n 20 \
        --output-len 128                                       # on a GPU: Codex-Eval's shape
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch

from tulu.bench.workloads import (
    add_random_model_arguments,
    free_device_memory,
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
TEMPERATURE, TOP_P = 0.8, 0.95


def prompt_sets(count: int, num_prompts: int, length: int, vocab: int) -> list[list[list[int]]]:
    """`count` disjoint sets of random-token prompts (seeded: every run sees the same sets)."""
    rng = random.Random(0)
    return [
        [[rng.randrange(vocab) for _ in range(length)] for _ in range(num_prompts)]
        for _ in range(count)
    ]


def tulu_run(llm: LLM, prompts: list[list[int]], n: int, new: int, device) -> dict:
    """All prompts through the engine at once, n seeded samples each."""
    params = [
        SamplingParams(
            n=n, max_tokens=new, temperature=TEMPERATURE, top_p=TOP_P, seed=i, ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    scheduler = llm.engine.scheduler
    queries, hits = scheduler.prefix_queries, scheduler.prefix_hits
    sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = [[c.token_ids for c in out.outputs] for out in outputs]
    for i, samples in enumerate(tokens):
        if len(samples) != n or any(len(t) != new for t in samples):
            raise RuntimeError(f"prompt {i}: the engine did not return {n} samples of {new}")
    block = llm.engine.config.block_size
    from_cache = (scheduler.prefix_hits - hits) * block
    prompt_tokens = len(prompts) * n * len(prompts[0])
    return output_rate(len(prompts) * n * new, seconds) | {
        "tokens": tokens,
        "prompt_tokens_of_all_samples": prompt_tokens,
        "prompt_tokens_from_cache": from_cache,
        "prompt_tokens_computed": prompt_tokens - from_cache,
        "prefix_blocks_looked_up": scheduler.prefix_queries - queries,
    }


def hf_run(model, prompts: list[list[int]], n: int, new: int, batch_rows: int, device) -> dict:
    """transformers' sampling with `num_return_sequences`; batches of `batch_rows` rows
    (prompts x n), the prompts share a length so there is no padding."""
    per_batch = max(1, batch_rows // n)
    torch.manual_seed(0)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), per_batch):
        ids = torch.tensor(prompts[i : i + per_batch], device=device)
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                top_k=0,
                num_return_sequences=n,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
    sync(device)
    return output_rate(len(prompts) * n * new, time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_random_model_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 164 GPU, 8 CPU")
    parser.add_argument("--n", type=int, default=None, help="samples per prompt (20 GPU, 8 CPU)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=None, help="default: 128 GPU, 16 CPU")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="rows: prompts x n")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    positive = ("num_prompts", "n", "prompt_len", "output_len", "hf_batch_size", "repeats")
    require_positive(parser, args, positive)

    try:
        device, dtype, config = resolve_random_model_arguments(args)
        gpu = device.type == "cuda"
        out = args.output or RESULTS / f"parallel-sampling-{args.preset}-{device.type}.json"
        check_output(out)
        num_prompts = args.num_prompts or (164 if gpu else 8)
        n = args.n or (20 if gpu else 8)
        new = args.output_len or (128 if gpu else 16)
        if args.prompt_len + new > config.max_position_embeddings:
            parser.error(
                f"--prompt-len + --output-len = {args.prompt_len + new} exceeds the model's "
                f"{config.max_position_embeddings}-token context"
            )
        model = random_model(config, device, seed=0)
        sets = prompt_sets(args.repeats + 1, num_prompts, args.prompt_len, config.vocab_size)
        log = lambda message: print(message, file=sys.stderr)  # noqa: E731
        results: dict = {}
        for key, caching in (("tulu", True), ("tulu_no_prefix_caching", False)):
            log(f"{key}: {num_prompts} prompts x n={n}")
            llm = LLM(model, None, EngineConfig(enable_prefix_caching=caching))
            run = partial(tulu_run, llm, n=n, new=new, device=device)
            results[key] = median_run(lambda k, run=run: run(sets[k]), len(sets))
            # On a GPU each engine's KV cache takes most of the free memory: one at a time.
            del llm, run
            free_device_memory(device)
        twin = transformers_twin(model)
        log("transformers: generate(num_return_sequences=n)")
        rows = args.hf_batch_size
        results["transformers"] = median_run(
            lambda k: hf_run(twin, sets[k], n, new, rows, device), len(sets)
        )
    except TuluError as err:
        print(f"parallel_sampling.py: error: {err}", file=sys.stderr)
        return 1

    shared, unshared = results["tulu"], results["tulu_no_prefix_caching"]
    same = shared.pop("tokens") == unshared.pop("tokens")
    results["transformers"].pop("tokens")
    rate = {key: results[key]["output_tokens_per_s"] for key in results}
    summary = {
        "preset": args.preset,
        "device": str(device),
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "num_prompts": num_prompts,
        "n": n,
        "prompt_len": args.prompt_len,
        "output_len": new,
        "hf_batch_rows": args.hf_batch_size,
        "repeats": args.repeats,
        **results,
        "ratio_tulu_vs_transformers": rate["tulu"] / rate["transformers"],
        "ratio_sharing_vs_no_prefix_caching": rate["tulu"] / rate["tulu_no_prefix_caching"],
        "same_tokens_with_and_without_prefix_caching": same,
    }
    print(
        f"\n{num_prompts} prompts x n={n} samples, {args.prompt_len} in / {new} out, "
        f"{args.preset} {dtype} on {device}"
    )
    for label, key in (
        ("tulu (prompt computed once)", "tulu"),
        ("tulu, no prefix caching", "tulu_no_prefix_caching"),
        ("transformers generate", "transformers"),
    ):
        computed = results[key].get("prompt_tokens_computed")
        note = "" if computed is None else f"   prompt tokens computed: {computed:,}"
        print(f"  {label:<30} {rate[key]:>9.1f} output tokens/s{note}")
    print(
        f"  tulu / transformers: {summary['ratio_tulu_vs_transformers']:.2f}x; "
        f"sharing / no prefix caching: {summary['ratio_sharing_vs_no_prefix_caching']:.2f}x\n"
        f"  same tokens with and without prefix caching: {same}"
    )
    write_json(out, summary)
    print(f"wrote {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
