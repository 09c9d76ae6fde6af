"""Generation speed: tulu's engine vs transformers' `generate`, same weights, same prompts, one run.

Workloads (all greedy, EOS ignored so every request produces exactly its requested length):
- single stream: time to first token, ms per output token, tokens/s;
- offline throughput, fixed shape: N requests of 128 prompt / 256 output tokens;
- offline throughput, mixed: N requests with prompts 16-1024 and outputs 16-512 tokens;
- prefill: one 2,047-token prompt plus one new token, filling the 2,048-token window (tokens/s);
- peak memory.
transformers runs its batched `generate` on length-sorted, left-padded batches of
`--hf-batch-size` requests, each batch generating up to its longest requested output; only the
requested tokens are counted, as in vLLM's throughput benchmark for its HF backend.

On a GPU it also measures the device copy bandwidth and prints the decode roofline: bytes one
decode step must read (weights + live KV cache) over that bandwidth.

The workloads themselves are `tulu.bench.workloads`, the code behind `tulu bench`: this script
only fixes the committed benchmark's settings (always against transformers, 5 repeats, the
mixed workload on) and writes `results/generation-PRESET-DEVICE.json`.

    python benchmarks/generation.py                                    # CPU: pythia-70m, float32
    python benchmarks/generation.py --preset pythia-6.9b --num-requests 1000   # on a GPU
    python benchmarks/generation.py --num-requests 4 --mixed-requests 4 --output /tmp/g.json
    python benchmarks/generation.py --preset pythia-6.9b --decode-attention triton \
        --hf-num-requests 128          # the GPU fast paths; transformers on a sample (a rate)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tulu.bench.workloads import (
    BenchSettings,
    add_random_model_arguments,
    check_settings,
    format_report,
    random_model,
    resolve_random_model_arguments,
    run_benchmark,
)
from tulu.engine.options import add_engine_arguments, engine_settings
from tulu.errors import TuluError
from tulu.jsonl import check_output, write_json

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_random_model_arguments(parser)
    parser.add_argument(
        "--num-requests", type=int, default=None, help="default: 1000 on GPU, 24 on CPU"
    )
    parser.add_argument(
        "--mixed-requests", type=int, default=None, help="default: 1000 on GPU, 24 on CPU"
    )
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument(
        "--hf-num-requests",
        type=int,
        default=None,
        help="transformers runs the first N requests of each throughput workload (default: all)",
    )
    add_engine_arguments(parser, max_model_len=False)
    parser.add_argument("--single-new-tokens", type=int, default=128)
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
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results file (default: results/generation-PRESET-DEVICE.json; quick runs: /tmp)",
    )
    args = parser.parse_args()

    try:
        device, dtype, config = resolve_random_model_arguments(args)
        gpu = device.type == "cuda"
        out = args.output or RESULTS / f"generation-{args.preset}-{device.type}.json"
        check_output(out)
        default_requests = 1000 if gpu else 24
        engine = engine_settings(args)  # the engine flags, each checked and named
        settings = BenchSettings(
            num_requests=args.num_requests if args.num_requests is not None else default_requests,
            prompt_len=128,
            output_len=256,
            mixed_requests=(
                args.mixed_requests if args.mixed_requests is not None else default_requests
            ),
            single_new_tokens=args.single_new_tokens,
            prefill_tokens=2047,
            repeats=args.repeats,
            skip=frozenset(filter(None, args.skip.split(","))),
            max_num_seqs=engine["max_num_seqs"],
            max_num_batched_tokens=engine["max_num_batched_tokens"],
            kv_cache_gb=args.kv_cache_gb,
            gpu_memory_fraction=engine["gpu_memory_fraction"],
            enable_prefix_caching=engine["enable_prefix_caching"],
            decode_attention=engine["decode_attention"],
            cuda_graphs=engine["cuda_graphs"],
            speculative=engine["speculative"],
            compare_transformers=True,
            hf_batch_size=args.hf_batch_size,
            hf_num_requests=args.hf_num_requests,
            hf_compile=args.hf_compile,
            seed=0,
        )
        check_settings(settings, config)  # bad flags fail now, not after the weights are built
        torch.manual_seed(0)
        model = random_model(config, device, seed=0)
        results = run_benchmark(
            model,
            settings,
            name=args.preset,
            preset_name=args.preset,
            progress=lambda message: print(message, file=sys.stderr),
            # Each workload's figures as soon as they exist: a run stopped at a time limit
            # (device_check.py's engine part) keeps what it measured.
            partial=lambda so_far: write_json(out, so_far),
        )
    except TuluError as err:
        print(f"generation.py: error: {err}", file=sys.stderr)
        return 1

    print()
    print(format_report(results))
    write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
