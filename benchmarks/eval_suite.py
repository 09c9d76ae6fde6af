"""Evaluation speed: the paper suite through `tulu.eval.runner` on random weights.

The time is what matters here (random weights score nothing): on a GPU the default is the
Pythia-6.9B shape in bfloat16 with each task's full protocol size; on a CPU a tiny model and
`--max-examples` per task (per subject / per task / per language), since the full suite would
take hours there. AlpacaFarm needs a judge and is left out; TyDi QA runs when the data
directory has train data for every language. The peer is transformers' `generate` on the same
GSM CoT prompts, one batch at a time, in the same run.

    python benchmarks/eval_suite.py --data-dir ../shared/data/eval                  # CPU
    python benchmarks/eval_suite.py --data-dir DATA/eval --preset pythia-6.9b --full  # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tulu.engine.engine import LLM
from tulu.eval.backends import Decoding, EngineBackend
from tulu.eval.runner import PAPER_SUITE, EvalContext, missing_files, run_tasks
from tulu.model import GPTNeoXForCausalLM, preset
from tulu.model.config import dtype_name, parse_dtype
from tulu.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


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
    with torch.device(device):
        model = GPTNeoXForCausalLM(config).to(dtype)
    model.init_weights(seed=0)
    return model.eval()


def peer_gsm(model_dir_model, tokenizer: Tokenizer, prompts: list[str], device, batch: int):
    """transformers' generate on the same prompts (greedy, 512 tokens, stop at a newline)."""
    import transformers

    config = transformers.GPTNeoXConfig(
        **{k: v for k, v in model_dir_model.config.to_dict().items() if k != "architectures"}
    )
    hf = transformers.GPTNeoXForCausalLM(config).to(
        device=device, dtype=next(model_dir_model.parameters()).dtype
    )
    hf.load_state_dict(model_dir_model.state_dict(), strict=False)
    hf.eval()
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
                max_new_tokens=512,
                do_sample=False,
                eos_token_id=newline[-1],
                pad_token_id=0,
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--codex-samples", type=int, default=20)
    parser.add_argument("--peer-batch", type=int, default=8)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("pythia-6.9b" if device.type == "cuda" else "tiny")
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.max_examples is None and not args.full and device.type == "cpu":
        args.max_examples = 2
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
    tasks = [t for t in PAPER_SUITE if t != "alpaca_farm"]
    skipped = sorted({line.split(":")[0] for line in missing_files(tasks, ctx)})
    tasks = [t for t in tasks if t not in skipped]

    started = time.perf_counter()
    results = run_tasks(tasks, ctx)
    total = time.perf_counter() - started

    from tulu.eval import gsm

    questions = gsm.sample_questions(
        gsm.load_gsm(args.data_dir / "gsm/test.jsonl"),
        None if args.full else (args.max_examples or gsm.DEFAULT_MAX_EXAMPLES),
    )
    source = gsm.resolve_exemplars(args.exemplars)
    prompts = [gsm.build_prompt(q.question, source.exemplars, "cot", "paper") for q in questions]
    t0 = time.perf_counter()
    EngineBackend(llm, progress=False).generate(prompts, Decoding(max_tokens=512, stop=("\n",)))
    ours_gsm = time.perf_counter() - t0
    peer = peer_gsm(model, tokenizer, prompts, device, args.peer_batch)

    rows = [(r.task, r.seconds) for r in results]
    print(
        f"\n{args.preset} ({dtype_name(dtype)}, {device.type}), max_examples "
        f"{'full' if args.full else args.max_examples}; skipped: {', '.join(skipped) or '-'}"
    )
    for task, seconds in rows:
        print(f"  {task:<14} {seconds:8.1f} s")
    print(f"  {'suite':<14} {total:8.1f} s")
    print(
        f"GSM CoT generation ({len(prompts)} prompts): tulu {ours_gsm:.1f} s, transformers "
        f"{peer:.1f} s, ratio {peer / ours_gsm:.2f}x"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"eval-suite-{device.type}.json"
    out.write_text(
        json.dumps(
            {
                "preset": args.preset,
                "dtype": dtype_name(dtype),
                "device": torch.cuda.get_device_name()
                if device.type == "cuda"
                else platform.processor(),
                "max_examples": None if args.full else args.max_examples,
                "codex_samples": args.codex_samples,
                "skipped": skipped,
                "seconds": dict(rows),
                "suite_seconds": total,
                "gsm_cot": {
                    "prompts": len(prompts),
                    "tulu_s": ours_gsm,
                    "transformers_s": peer,
                    "ratio": peer / ours_gsm,
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
