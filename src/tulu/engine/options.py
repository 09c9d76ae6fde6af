"""Command-line options for the engine: its decode path (shared by `tulu serve`, `tulu
generate`, `tulu eval` and `tulu bench`), and its sizes (`tulu serve`, `tulu generate` and
`tulu eval`), named as in vLLM so that a vLLM command line carries over.

Kept free of torch imports so that building the `tulu` parser stays fast.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

from tulu.errors import GenerationError, TuluError

__all__ = [
    "DECODE_ATTENTION_CHOICES",
    "add_decode_path_arguments",
    "add_engine_arguments",
    "decode_path_settings",
    "engine_settings",
    "named_by_flags",
]

#: `EngineConfig.decode_attention` values (see docs/engine.md, "Fast paths").
DECODE_ATTENTION_CHOICES = ("auto", "loop", "sdpa", "triton")


def add_decode_path_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--decode-attention",
        choices=DECODE_ATTENTION_CHOICES,
        default="loop",
        help="attention of decode-only steps: loop (per sequence, the default until the GPU "
        "paths are measured), sdpa or triton (batched, graph-safe), auto (triton on CUDA)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="never capture the decode step as CUDA graphs",
    )


def decode_path_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineConfig` fields the options above set."""
    return {
        "decode_attention": args.decode_attention,
        "cuda_graphs": False if args.enforce_eager else None,
    }


def add_engine_arguments(parser: argparse.ArgumentParser, *, max_model_len: bool = True) -> None:
    """The engine's sizes and its decode path, as one 'engine' group of options (without
    --max-model-len for a command that defines its own)."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--max-num-seqs", type=int, default=256, help="sequences decoded together (default: 256)"
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens one step computes at most; longer prompts are prefilled in chunks "
        "(default: 8192 on GPU, 2048 on CPU)",
    )
    if max_model_len:
        group.add_argument(
            "--max-model-len",
            type=int,
            default=None,
            help="longest prompt + output a request may have (default: the model's context window)",
        )
    group.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="KV-cache size in GiB (default: --gpu-memory-utilization of free GPU memory; on "
        "CPU, 16 full contexts)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        metavar="FRACTION",
        help="share of the GPU memory free once the weights are loaded that the KV cache "
        "takes (default: 0.9; vLLM's flag of this name counts the whole GPU)",
    )
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of prompt blocks shared with earlier requests (default: on)",
    )
    group.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='n-gram speculative decoding, as vLLM\'s: \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\'; '
        'also "disable_by_batch_size": N; requests land several tokens per step when the '
        "text repeats its context, greedy ones with the output they have without it, "
        "unseeded sampled ones with its distribution (default: off)",
    )
    add_decode_path_arguments(group)


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineConfig` fields of the options of `add_engine_arguments`, each checked and
    a bad one named by its flag before the model loads (minutes for a 6.9B model). A command
    without a --max-model-len of any kind leaves the engine's default (the context window)."""
    max_model_len = getattr(args, "max_model_len", None)
    for flag, value in (
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-num-batched-tokens", args.max_num_batched_tokens),
        ("--max-model-len", max_model_len),
    ):
        if value is not None and value < 1:
            raise TuluError(f"{flag} must be >= 1, got {value}")
    check_token_budget(args.max_num_batched_tokens, args.max_num_seqs)
    # argparse's float() takes "nan" and "inf", which pass or fail comparisons wrongly.
    gb = args.kv_cache_gb
    if gb is not None and not (math.isfinite(gb) and gb > 0):
        raise TuluError(f"--kv-cache-gb must be a finite number > 0, got {gb}")
    fraction = args.gpu_memory_utilization
    check_gpu_memory_utilization(fraction)
    speculative = None
    if args.speculative_config is not None:
        from tulu.engine.speculative import parse_speculative_config

        try:
            speculative = parse_speculative_config(args.speculative_config)
        except GenerationError as err:
            raise TuluError(f"--speculative-config: {err}") from None
    return {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": max_model_len,
        "kv_cache_bytes": int(gb * 2**30) if gb is not None else None,
        "gpu_memory_fraction": fraction,
        "enable_prefix_caching": args.enable_prefix_caching,
        "speculative": speculative,
        **decode_path_settings(args),
    }


def check_token_budget(budget: int | None, max_num_seqs: int) -> None:
    """Refuse a --max-num-batched-tokens below --max-num-seqs, as vLLM does: each running
    sequence decodes one token per step, so a smaller budget leaves sequences waiting on
    every step."""
    if budget is not None and budget < max_num_seqs:
        raise TuluError(
            f"--max-num-batched-tokens ({budget}) must be at least --max-num-seqs "
            f"({max_num_seqs}): every running sequence takes one token of each step"
        )


def check_gpu_memory_utilization(fraction: float) -> None:
    """Refuse a --gpu-memory-utilization outside (0, 1] (NaN included)."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise TuluError(f"--gpu-memory-utilization must be in (0, 1], got {fraction}")


def named_by_flags(err: GenerationError) -> TuluError:
    """The error with the flags the user typed for the fields it names: "SamplingParams.top_p
    must be ..." becomes "--top-p must be ...", "EngineConfig.max_model_len is ..." becomes
    "--max-model-len is ..."."""
    return TuluError(
        re.sub(
            r"(?:SamplingParams|EngineConfig)\.(\w+)",
            lambda m: "--" + m[1].replace("_", "-"),
            str(err),
        )
    )
