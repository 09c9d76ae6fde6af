"""``tulu bench``: argument parsing, model loading and output; the work is in `workloads`.

Building the parser imports nothing heavy (``tulu --help`` stays fast). Everything the user can
get wrong (counts, preset, device, dtype, lengths beyond the context window, a missing model) is
refused before the model's weights are built or loaded, with a message naming the flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tulu.errors import TuluError

if TYPE_CHECKING:
    from tulu.bench.workloads import BenchSettings

from tulu.engine.options import add_engine_arguments, engine_settings

__all__ = ["add_bench_parser", "cmd_bench"]

WORKLOAD_NAMES = "single, fixed, mixed, prefill"


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="measure generation speed (throughput, latency, prefill), optionally vs transformers",
        description=(
            "Measure tulu's engine on MODEL, or on random weights of a Pythia shape (--preset): "
            "single-stream time to first token and decode rate, offline throughput of "
            "--num-requests requests, prefill tokens/s and peak memory. Greedy, EOS ignored: "
            "every request generates exactly its requested tokens. With --compare-transformers "
            "transformers' generate runs on the same weights and prompts in the same run."
        ),
    )
    b.add_argument(
        "model", metavar="MODEL", nargs="?", help="checkpoint directory or hub id (or --preset)"
    )
    b.add_argument("--preset", help="random weights of a Pythia shape: pythia-14m ... pythia-12b")
    b.add_argument("--layers", type=int, help="with --preset: override the number of layers")
    b.add_argument("--revision", help="hub revision (branch, tag or commit) for hub ids")
    b.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="requests of the throughput workloads (default: 1000 on GPU, 16 on CPU)",
    )
    b.add_argument(
        "--prompt-len",
        type=int,
        default=128,
        help="prompt tokens per request (default: %(default)s)",
    )
    b.add_argument(
        "--output-len",
        type=int,
        default=256,
        help="output tokens per request (default: %(default)s)",
    )
    b.add_argument(
        "--mixed",
        action="store_true",
        help="also --num-requests requests of random lengths (16-1024 in / 16-512 out)",
    )
    b.add_argument(
        "--single-new-tokens",
        type=int,
        default=128,
        help="output tokens of the single stream (default: %(default)s)",
    )
    b.add_argument(
        "--prefill-tokens",
        type=int,
        default=None,
        help="prompt of the prefill measurement (default: the context window - 1)",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="single-stream and prefill runs, the median is reported (default: %(default)s)",
    )
    b.add_argument("--skip", default="", help=f"comma list of workloads to skip: {WORKLOAD_NAMES}")
    add_engine_arguments(b, max_model_len=False)
    b.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    b.add_argument(
        "--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)"
    )
    b.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random prompts and random weights (default: %(default)s)",
    )
    b.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also run transformers' generate on the same weights and prompts; print ratios",
    )
    b.add_argument(
        "--hf-batch-size",
        type=int,
        default=64,
        help="transformers' generate batch size (default: %(default)s)",
    )
    b.add_argument(
        "--hf-num-requests",
        type=int,
        help="transformers runs only the first N requests of each throughput workload (its "
        "figure is a rate; default: all)",
    )
    b.add_argument("--output", type=Path, help="also write the results as JSON to this file")


def settings_from_args(args: argparse.Namespace, gpu: bool) -> BenchSettings:
    """The `BenchSettings` of the command line (validated later, against the model's config)."""
    from tulu.bench.workloads import BenchSettings

    num_requests = args.num_requests if args.num_requests is not None else (1000 if gpu else 16)
    engine = engine_settings(args)  # checks the engine flags, naming each
    return BenchSettings(
        num_requests=num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        mixed_requests=num_requests if args.mixed else None,
        single_new_tokens=args.single_new_tokens,
        prefill_tokens=args.prefill_tokens,
        repeats=args.repeats,
        skip=frozenset(filter(None, (s.strip() for s in args.skip.split(",")))),
        max_num_seqs=engine["max_num_seqs"],
        max_num_batched_tokens=engine["max_num_batched_tokens"],
        kv_cache_gb=args.kv_cache_gb,
        gpu_memory_fraction=engine["gpu_memory_fraction"],
        enable_prefix_caching=engine["enable_prefix_caching"],
        decode_attention=engine["decode_attention"],
        cuda_graphs=engine["cuda_graphs"],
        speculative=engine["speculative"],
        compare_transformers=args.compare_transformers,
        hf_batch_size=args.hf_batch_size,
        hf_num_requests=args.hf_num_requests,
        seed=args.seed,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from tulu.bench.workloads import (
        check_settings,
        format_report,
        import_transformers,
        preset_config,
        random_model,
        resolve_device,
        run_benchmark,
    )
    from tulu.jsonl import check_output
    from tulu.model.config import NeoXConfig, parse_dtype
    from tulu.pretrained import default_dtype

    if args.model is None and args.preset is None:
        raise TuluError(
            "give MODEL (a checkpoint directory or hub id) or --preset (random weights)"
        )
    if args.model is not None and args.preset is not None:
        raise TuluError(f"give MODEL ({args.model}) or --preset ({args.preset}), not both")
    if args.layers is not None and args.preset is None:
        raise TuluError("--layers only applies to --preset (random weights)")
    check_output(args.output)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype, "--dtype") if args.dtype else default_dtype(device)
    settings = settings_from_args(args, device.type == "cuda")
    if settings.compare_transformers:
        import_transformers()

    def say(message: str) -> None:  # progress on stderr: stdout holds only the table
        print(message, file=sys.stderr)

    tokenizer = None
    if args.preset is not None:
        config = preset_config(args.preset, args.layers, dtype)
        check_settings(settings, config)
        torch.manual_seed(args.seed)
        model = random_model(config, device, seed=args.seed)
        name = args.preset
    else:
        from tulu.model.checkpoint import resolve_checkpoint
        from tulu.pretrained import load_pretrained

        directory = resolve_checkpoint(args.model, args.revision)
        check_settings(settings, NeoXConfig.from_json(directory / "config.json"))
        loaded = load_pretrained(directory, dtype=dtype, device=str(device))
        model, tokenizer, name = loaded.model, loaded.tokenizer, args.model

    results = run_benchmark(
        model, settings, name=name, preset_name=args.preset, tokenizer=tokenizer, progress=say
    )
    print(format_report(results))
    if args.output is not None:
        # Written to a temporary name first, so a crash never leaves a truncated file behind.
        args.output.parent.mkdir(parents=True, exist_ok=True)
        partial = args.output.with_name(args.output.name + ".partial")
        partial.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        partial.replace(args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
