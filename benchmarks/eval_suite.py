"""Evaluation speed: the paper suite through `tulu.eval.runner` on random weights.

The time is what matters here (random weights score nothing, and never stop early, so every
generation runs to its token limit: the slowest case). On a GPU the default is the
Pythia-6.9B shape in bfloat16 with each task's protocol size (GSM 200, BBH 40 per task, ...);
on a CPU a tiny model and `--max-examples` per task (per subject / per task / per language),
since the full suite would take hours there. TyDi QA runs when the data directory has train
data for every language. AlpacaFarm is timed as its generation alone (`alpaca_farm_gen`: the
805 prompts, greedy, up to 2,048 new tokens): its judge is a remote API, not this machine's
work. The peer is transformers' `generate` on the first `--peer-examples` GSM CoT prompts, one
batch at a time, against tulu on the same prompts, in the same run.

Tasks run in the order given (`--tasks`; default: the paper suite, cheapest first); the
results file is rewritten after each task, so a run stopped by a time limit keeps what it
finished, and `--time-budget` starts no task after that many seconds. A suite too long for
one sitting can be timed in parts (`--tasks` lists) on the same machine and summed.

    python benchmarks/eval_suite.py --data-dir ../shared/data/eval                  # CPU
    python benchmarks/eval_suite.py --data-dir DATA/eval --preset pythia-6.9b       # GPU
    python benchmarks/eval_suite.py --data-dir DATA/eval --tasks codex_pass1,codex_pass10
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import time
from pathlib import Path

import torch

from tulu.bench.workloads import random_model, require_positive, transformers_twin
from tulu.engine.engine import LLM
from tulu.errors import TuluError
from tulu.eval.backends import EngineBackend
from tulu.eval.runner import PAPER_SUITE, EvalContext, check_tasks, missing_files, run_tasks
from tulu.jsonl import check_output, write_json
from tulu.model import GPTNeoXForCausalLM, preset
from tulu.model.config import dtype_name, parse_dtype
from tulu.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


#: AlpacaFarm's generation, timed without its judge (a remote API).
ALPACA_GENERATION = "alpaca_farm_gen"
#: The default order: cheapest first, so a time budget keeps the most tasks.
DEFAULT_TASKS = (
    "tydiqa_cb",
    "tydiqa_gp",
    "mmlu_0shot",
    "mmlu_5shot",
    "gsm_direct",
    "gsm_cot",
    "bbh_direct",
    "bbh_cot",
    "codex_pass1",
    "codex_pass10",
    ALPACA_GENERATION,
)


def build_model(args, device: torch.device, dtype: torch.dtype, vocab: int) -> GPTNeoXForCausalLM:
    if args.preset == "tiny":
        config = preset(
            "pythia-70m",
            num_hidden_layers=2,
            hidden_size=128,
            num_attention_heads=4,
            intermediate_size=512,
            torch_dtype=dtype_name(dtype),
        )
    else:
        config = preset(args.preset, torch_dtype=dtype_name(dtype))
    config = type(config).from_dict(
        {**config.to_dict(), "vocab_size": max(config.vocab_size, vocab)}
    )
    return random_model(config, device, seed=0)


def time_alpaca_generation(ctx: EvalContext) -> tuple[float, dict]:
    """AlpacaFarm's generations (its protocol's prompts and decoding), without the judge."""
    from tulu.eval import alpaca_farm

    examples = alpaca_farm.load_alpaca_farm(ctx.data_dir / "alpaca_farm")
    if ctx.max_examples is not None:
        examples = examples[: ctx.max_examples]
    started = time.perf_counter()
    outputs = ctx.backend.generate([e.prompt for e in examples], alpaca_farm.GENERATION)
    seconds = time.perf_counter() - started
    return seconds, {"prompts": len(examples), "outputs": sum(len(o) for o in outputs)}


def peer_gsm(
    model: GPTNeoXForCausalLM, tokenizer: Tokenizer, prompts: list[str], device, batch: int
):
    """transformers' generate on the same prompts (greedy, 512 tokens, stop at a newline), on
    the very tensors of `model` (`transformers_twin`: no second copy of a 6.9B model)."""
    from tulu.eval import gsm

    hf = transformers_twin(model)
    newline = tokenizer.encode("\n")
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = [tokenizer.encode(p) for p in prompts[start : start + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        with torch.no_grad():
            hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=gsm.GENERATION.max_tokens,
                do_sample=False,
                eos_token_id=newline[-1],
                pad_token_id=0,
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def peer_prompts(args: argparse.Namespace) -> list[str]:
    """The GSM CoT prompts the peer comparison runs, built before the suite so that a missing
    file fails at once rather than after the suite's minutes."""
    from tulu.eval import gsm

    try:
        questions = gsm.sample_questions(
            gsm.load_gsm(args.data_dir / "gsm/test.jsonl"),
            None if args.full else (args.max_examples or gsm.DEFAULT_MAX_EXAMPLES),
        )[: args.peer_examples]
        source = gsm.resolve_exemplars(args.exemplars)
    except TuluError as err:
        raise TuluError(f"the GSM CoT peer: {err} (--peer-examples 0 runs no peer)") from None
    return [gsm.build_prompt(q.question, source.exemplars, "cot", "paper") for q in questions]


def parse_tasks(text: str | None) -> list[str]:
    if text is None:
        return list(DEFAULT_TASKS)
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    known = [t for t in PAPER_SUITE if t != "alpaca_farm"] + [ALPACA_GENERATION]
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise SystemExit(
            f"eval_suite.py: --tasks: unknown task {unknown[0]!r}; known: {', '.join(known)}"
            if unknown
            else "eval_suite.py: --tasks: no task given"
        )
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/eval")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=REPO.parent / "shared/data/tokenizer/gpt-neox-20b/tokenizer.json",
    )
    parser.add_argument(
        "--exemplars", type=Path, default=REPO.parent / "shared/recipes/gsm_8shot_exemplars.json"
    )
    parser.add_argument("--preset", default=None, help="tiny (CPU default) or pythia-6.9b (GPU)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-examples", type=int, default=None, help="per task, at least 1")
    parser.add_argument("--full", action="store_true", help="GSM: all 1,319 questions")
    parser.add_argument("--codex-samples", type=int, default=20)
    parser.add_argument("--tasks", default=None, help="comma list (default: the whole suite)")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="start no task after this many seconds"
    )
    parser.add_argument(
        "--peer-examples", type=int, default=None, help="GSM CoT prompts for the peer (0: none)"
    )
    parser.add_argument("--peer-batch", type=int, default=8)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    tasks = parse_tasks(args.tasks)
    # --max-examples and --codex-samples are checked by the tasks too, but only after the load
    require_positive(parser, args, ("peer_batch", "max_examples", "codex_samples"))
    if args.peer_examples is not None and args.peer_examples < 0:
        parser.error(f"--peer-examples must be 0 (no peer) or more, got {args.peer_examples}")
    budget = args.time_budget
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        parser.error(f"--time-budget must be a positive number of seconds, got {budget}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("pythia-6.9b" if device.type == "cuda" else "tiny")
    dtype = parse_dtype(
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32"), "--dtype"
    )
    if args.max_examples is None and not args.full and device.type == "cpu":
        args.max_examples = 2
    out = args.output or RESULTS / f"eval-suite-{device.type}.json"
    check_output(out)
    prompts = peer_prompts(args) if args.peer_examples != 0 else []
    began = time.perf_counter()
    tokenizer = Tokenizer.load(args.tokenizer)
    model = build_model(args, device, dtype, len(tokenizer))
    llm = LLM(model, tokenizer)
    ctx = EvalContext(
        backend=EngineBackend(llm, progress=False),
        tokenizer=tokenizer,
        data_dir=args.data_dir,
        max_examples=args.max_examples,
        full=args.full,
        context_window=model.config.max_position_embeddings,
        options={"gsm_exemplars": args.exemplars, "codex_samples": args.codex_samples},
    )
    runner_tasks = [t for t in tasks if t != ALPACA_GENERATION]
    skipped = sorted({line.split(":")[0] for line in missing_files(runner_tasks, ctx)})
    if ALPACA_GENERATION in tasks and not (args.data_dir / "alpaca_farm").is_dir():
        skipped.append(ALPACA_GENERATION)
    tasks = [t for t in tasks if t not in skipped]
    check_tasks([t for t in tasks if t != ALPACA_GENERATION], ctx)  # bad settings fail now
    report: dict = {
        "preset": args.preset,
        "dtype": dtype_name(dtype),
        "device": (
            torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
        ),
        "max_examples": None if args.full else args.max_examples,
        "codex_samples": args.codex_samples,
        "skipped": skipped,
        "not_reached": [],
        "setup_seconds": time.perf_counter() - began,
        "seconds": {},
        "suite_seconds": 0.0,
        # Full prompt blocks taken from the prefix cache, per task: shared few-shot prefixes
        # computed once (the engine's share of the suite's speed on a GPU).
        "prefix_cache_hit_rate": {},
    }

    def save() -> None:
        write_json(out, report)

    print(
        f"{args.preset} ({dtype_name(dtype)}, {device.type}); skipped: {', '.join(skipped) or '-'}"
    )
    started = time.perf_counter()
    for i, task in enumerate(tasks):
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            report["not_reached"] = tasks[i:]
            break
        hits, queries = llm.engine.scheduler.prefix_hits, llm.engine.scheduler.prefix_queries
        if task == ALPACA_GENERATION:
            seconds, report["alpaca_farm_gen"] = time_alpaca_generation(ctx)
        else:
            (result,) = run_tasks([task], ctx)
            seconds = result.seconds
        report["seconds"][task] = seconds
        report["suite_seconds"] = sum(report["seconds"].values())
        queries = llm.engine.scheduler.prefix_queries - queries
        hit_rate = (llm.engine.scheduler.prefix_hits - hits) / queries if queries else 0.0
        report["prefix_cache_hit_rate"][task] = hit_rate
        save()
        print(f"  {task:<16} {seconds:8.1f} s   prefix cache hits {hit_rate:6.1%}", flush=True)
    print(f"  {'suite':<16} {report['suite_seconds']:8.1f} s")
    if report["not_reached"]:
        print(f"  not reached in --time-budget {args.time_budget:g} s: {report['not_reached']}")

    if prompts:
        from tulu.eval import gsm

        t0 = time.perf_counter()
        EngineBackend(llm, progress=False).generate(prompts, gsm.GENERATION)
        ours_gsm = time.perf_counter() - t0
        # The engine's KV cache took most of a GPU's free memory: give it back for the peer.
        del ctx, llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        peer = peer_gsm(model, tokenizer, prompts, device, args.peer_batch)
        report["gsm_cot"] = {
            "prompts": len(prompts),
            "tulu_s": ours_gsm,
            "transformers_s": peer,
            "ratio": peer / ours_gsm,
        }
        print(
            f"GSM CoT generation ({len(prompts)} prompts): tulu {ours_gsm:.1f} s, transformers "
            f"{peer:.1f} s, ratio {peer / ours_gsm:.2f}x"
        )
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except TuluError as err:  # bad data or settings: one line, as the tulu commands print them
        raise SystemExit(f"eval_suite.py: error: {err}") from None
