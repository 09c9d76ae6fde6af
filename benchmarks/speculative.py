"""N-gram speculative decoding: tulu's engine with and without it, and transformers' greedy
`generate` with and without its prompt lookup (the same idea), in one run.

Greedy decoding, exactly `--new-tokens` per prompt (EOS ignored), on random weights. Two
prompt workloads of `--prompt-len` tokens:
- "repeat": a random motif of 16-64 tokens repeated (text that quotes its context: the case
  speculation is for);
- "random": random tokens (nothing in the prompt to look up).
Random weights decide what is generated, and their greedy continuations fall into loops that
any n-gram lookup then predicts: the kept share of proposals here says how the machinery
behaves, not how often a trained model's text repeats. Read the figures as the cost and the
benefit of verifying proposals per step, at this acceptance.

Single stream (each prompt alone, one after another: transformers' prompt lookup takes one
sequence) for all four systems; then all prompts of a set at once through tulu's engine, with
and without speculation (a full batch is where verifying proposals costs most). tulu
speculates with `{"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
"prompt_lookup_min": 2}` (K = `--num-speculative-tokens`); transformers with
`prompt_lookup_num_tokens=K` (its n-gram of 2). Every figure is the median of `--repeats`
runs after a warm-up, each run on its own prompt set. In float32 the greedy tokens of all
systems must be equal (exit 1 if not). Writes `results/speculative-PRESET-DEVICE.json`.

    python benchmarks/speculative.py                          # CPU: pythia-70m, float32
    python benchmarks/speculative.py --preset pythia-6.9b --decode-attention auto  # a GPU

On a GPU, `--decode-attention auto` gives both tulu engines the CUDA-graph decode step: the
baseline to beat, since a step with proposals takes the general path.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

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
from tulu.dependency_noise import quiet_dependency_noise
from tulu.engine.engine import LLM, EngineConfig
from tulu.engine.options import add_decode_path_arguments, decode_path_settings
from tulu.engine.sampling import SamplingParams
from tulu.engine.speculative import SpeculativeConfig
from tulu.errors import TuluError
from tulu.jsonl import check_output, write_json

RESULTS = Path(__file__).parent / "results"
WORKLOADS = ("repeat", "random")


def prompt_sets(
    workload: str, count: int, num_prompts: int, length: int, vocab: int
) -> list[list[list[int]]]:
    """`count` seeded sets of `num_prompts` prompts of `length` tokens of the workload."""
    rng = random.Random(f"{workload}-{length}")
    sets = []
    for _ in range(count):
        prompts = []
        for _ in range(num_prompts):
            if workload == "repeat":
                motif = [rng.randrange(vocab) for _ in range(rng.randint(16, 64))]
                prompts.append((motif * (length // len(motif) + 1))[:length])
            else:
                prompts.append([rng.randrange(vocab) for _ in range(length)])
        sets.append(prompts)
    return sets


def tulu_run(llm: LLM, prompts: list[list[int]], new_tokens: int, device, *, alone: bool) -> dict:
    """The prompts through the engine, one at a time (`alone`) or all at once; figures, the
    proposals made and kept during the run, and each prompt's tokens."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.engine.pool.reset_prefix_cache()  # the other mode ran these prompts before
    before = llm.engine.stats()
    sync(device)
    start = time.perf_counter()
    if alone:
        outputs = [llm.generate([p], params, progress=False)[0] for p in prompts]
    else:
        outputs = llm.generate(prompts, params, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    after = llm.engine.stats()
    tokens = [o.outputs[0].token_ids for o in outputs]
    drafts = after["spec_decode_draft_tokens"] - before["spec_decode_draft_tokens"]
    kept = after["spec_decode_accepted_tokens"] - before["spec_decode_accepted_tokens"]
    return output_rate(sum(map(len, tokens)), seconds) | {
        "draft_tokens": drafts,
        "accepted_tokens": kept,
        "acceptance": kept / drafts if drafts else None,
        "tokens": tokens,
    }


def hf_run(model, prompts: list[list[int]], new_tokens: int, device, lookup: int | None) -> dict:
    """transformers' greedy `generate`, one prompt at a time; with `lookup`, its prompt-lookup
    decoding proposing that many tokens."""
    extra = {} if lookup is None else {"prompt_lookup_num_tokens": lookup}
    tokens = []
    sync(device)
    start = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **extra,
            )
        tokens.append(out[0, len(prompt) :].tolist())
    sync(device)
    return output_rate(sum(map(len, tokens)), time.perf_counter() - start) | {"tokens": tokens}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_random_model_arguments(parser)
    add_decode_path_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=None, help="per set; 64 GPU, 4 CPU")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=None, help="256 GPU, 96 CPU")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    positive = ("num_prompts", "prompt_len", "new_tokens", "num_speculative_tokens", "repeats")
    require_positive(parser, args, positive)
    return args


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Every workload on every system; the summary and the prompts whose tokens differ."""
    device, dtype, config = resolve_random_model_arguments(args)
    gpu = device.type == "cuda"
    output = args.output or RESULTS / f"speculative-{args.preset}-{device.type}.json"
    check_output(output)
    num_prompts = args.num_prompts or (64 if gpu else 4)
    new_tokens = args.new_tokens or (256 if gpu else 96)
    if args.prompt_len + new_tokens > config.max_position_embeddings:
        raise TuluError(
            f"--prompt-len {args.prompt_len} + --new-tokens {new_tokens} exceed the model's "
            f"{config.max_position_embeddings}-token context"
        )
    decode_path = decode_path_settings(args)  # both tulu engines: the baseline's too
    k = args.num_speculative_tokens
    speculative = SpeculativeConfig(num_speculative_tokens=k)
    model = random_model(config, device, seed=0)
    runs = args.repeats + 1
    results: dict[str, dict[str, Any]] = {}
    mismatches: list[str] = []
    for workload in WORKLOADS:
        sets = prompt_sets(workload, runs, num_prompts, args.prompt_len, config.vocab_size)
        figures: dict[str, Any] = {}
        for name, spec in (("tulu", None), ("tulu_ngram", speculative)):
            llm = LLM(model, None, EngineConfig(speculative=spec, **decode_path))
            figures[name] = median_run(
                lambda i, llm=llm: tulu_run(llm, sets[i], new_tokens, device, alone=True), runs
            )
            figures[f"{name}_batch"] = median_run(
                lambda i, llm=llm: tulu_run(llm, sets[i], new_tokens, device, alone=False), runs
            )
            del llm
            free_device_memory(device)
        hf = transformers_twin(model)
        for name, lookup in (("transformers", None), ("transformers_lookup", k)):
            figures[name] = median_run(
                lambda i, lookup=lookup, hf=hf: hf_run(hf, sets[i], new_tokens, device, lookup),
                runs,
            )
        del hf
        free_device_memory(device)
        reference = figures["tulu"]["tokens"]
        for name, figure in figures.items():
            if figure["tokens"] != reference and dtype == torch.float32:
                mismatches.append(f"{workload}: {name} gives other greedy tokens than tulu")
            figure.pop("tokens")
        results[workload] = figures
    summary = {
        "benchmark": "speculative",
        "preset": args.preset,
        "layers": config.num_hidden_layers,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "num_prompts": num_prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": new_tokens,
        "speculative_config": dataclasses.asdict(speculative),
        "decode_attention": args.decode_attention,
        "enforce_eager": args.enforce_eager,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "threads": torch.get_num_threads(),
        "results": results,
        "output": str(output),
    }
    return summary, mismatches


def report(summary: dict[str, Any]) -> None:
    rate = "output_tokens_per_s"
    for workload, figures in summary["results"].items():
        print(
            f"\n{workload} prompts ({summary['num_prompts']} per run, "
            f"{summary['prompt_len']} tokens in, {summary['new_tokens']} out, greedy):"
        )
        print(f"  {'system':<34}{'tokens/s':>10}{'kept proposals':>16}")
        rows = [
            ("tulu, one at a time", "tulu"),
            ("tulu + n-gram, one at a time", "tulu_ngram"),
            ("transformers, one at a time", "transformers"),
            ("transformers + prompt lookup", "transformers_lookup"),
            ("tulu, all at once", "tulu_batch"),
            ("tulu + n-gram, all at once", "tulu_ngram_batch"),
        ]
        for label, key in rows:
            figure = figures[key]
            kept = figure.get("acceptance")
            shown = f"{kept:.0%}" if kept is not None else "-"
            print(f"  {label:<34}{figure[rate]:>10.1f}{shown:>16}")
        ratio = figures["tulu_ngram"][rate]
        print(
            f"  ratios, one at a time: tulu+ngram / tulu {ratio / figures['tulu'][rate]:.2f}x, "
            f"/ transformers {ratio / figures['transformers'][rate]:.2f}x, "
            f"/ transformers+lookup {ratio / figures['transformers_lookup'][rate]:.2f}x; "
            f"transformers+lookup / transformers "
            f"{figures['transformers_lookup'][rate] / figures['transformers'][rate]:.2f}x"
        )
        batch = figures["tulu_ngram_batch"][rate] / figures["tulu_batch"][rate]
        print(f"  all at once: tulu+ngram / tulu {batch:.2f}x")


def main() -> int:
    quiet_dependency_noise()  # transformers' import of torchao logs harmless warnings
    args = parse_args()
    try:
        summary, mismatches = measure(args)
    except TuluError as err:
        print(f"speculative.py: error: {err}", file=sys.stderr)
        return 1
    report(summary)
    write_json(Path(summary["output"]), summary)
    print(f"\nwrote {summary['output']}")
    for problem in mismatches:
        print(f"speculative.py: error: {problem}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
