"""Command-line options for the engine's decode path, shared by `tulu serve` and `tulu bench`.

Kept free of torch imports so that building the `tulu` parser stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["DECODE_ATTENTION_CHOICES", "add_decode_path_arguments", "decode_path_settings"]

#: `EngineConfig.decode_attention` values (see docs/engine.md, "Fast paths").
DECODE_ATTENTION_CHOICES = ("auto", "loop", "sdpa", "triton")


def add_decode_path_arguments(parser: argparse.ArgumentParser) -> None:
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
