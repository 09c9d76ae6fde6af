"""Engine host overhead: where the time of one `LLMEngine.step` goes, besides the model.

On a GPU the engine reaches its throughput target only if the Python work around the forward
pass (scheduling, building the step's tokens/positions/slots/block tables, sampling-tensor
preparation, per-token sequence updates, stop checks, detokenization, `RequestOutput`s,
prefix-cache hashing) stays within a few milliseconds per step: at 8,000 tokens/s with ~256
sequences per decode step, a whole step has ~32 ms. That host work does not depend on the
model's size, so it can be measured here, on the CPU, with a tiny random model whose forward
pass is cheap (2 layers, hidden 64, the real 50,304-token vocabulary) and the real tokenizer
(so incremental detokenization runs).

N requests (default 256, all admitted at once) of random prompts run to their full length
(EOS ignored); every `step()` is timed and split into
- forward: the model's `hidden_states` and `embed_out` (with the decode fast path, the
  runner's forward over its static buffers, not the filling of those buffers);
- sample: `tulu.engine.sampling.sample` (on a GPU this is device work too; here its sort over
  the vocabulary dominates the sampled workload);
- host: everything else, i.e. the engine's own Python work; "host cpu" is the same in this
  thread's CPU time (mean, and the median step), the figure to compare on a shared machine.
Decode-only steps (no prompt token in them) are reported separately from the whole run.
Two workloads: greedy, and temperature 0.8 / top_p 0.95 with a seed per request.

There is no transformers peer here: it has no scheduler, paged cache or detokenizer whose
overhead would compare. `--baseline` stores the run as the file's `baseline` (measure it on
the code before a change); a later run without it keeps that baseline beside its results.

    python benchmarks/engine_overhead.py --baseline     # before a change
    python benchmarks/engine_overhead.py                # after it
    python benchmarks/engine_overhead.py --requests 64 --output-len 64 --profile 25
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import tulu.engine.engine as engine_module
from tulu.bench.workloads import random_model
from tulu.engine.engine import EngineConfig, LLMEngine
from tulu.engine.sampling import SamplingParams
from tulu.errors import TuluError
from tulu.jsonl import check_output, write_json
from tulu.model.config import NeoXConfig
from tulu.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUTPUT = RESULTS / "engine-overhead-cpu.json"
DEFAULT_TOKENIZER = (
    Path(__file__).resolve().parents[1].parent / "shared/data/tokenizer/gpt-neox-20b/tokenizer.json"
)


class Timers:
    """Seconds spent in the model and in sampling during the current step."""

    def __init__(self) -> None:
        self.forward = 0.0
        self.sample = 0.0
        # The same in this thread's CPU time: the host work is single-threaded Python, and its
        # CPU time barely moves when other processes load the machine, unlike wall time.
        self.forward_cpu = 0.0
        self.sample_cpu = 0.0
        self._depth = 0  # the decode runner calls the timed model methods: count once

    def timed(self, fn: Callable[..., Any], attr: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                setattr(self, attr, getattr(self, attr) + time.perf_counter() - start)
                cpu = attr + "_cpu"
                setattr(self, cpu, getattr(self, cpu) + time.thread_time() - start_cpu)

        return wrapper


def build_engine(
    args: argparse.Namespace, tokenizer: Tokenizer | None, timers: Timers
) -> LLMEngine:
    config = NeoXConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden,
        torch_dtype="float32",
        # No longer than the workload needs: the SDPA decode path gathers the whole window.
        max_position_embeddings=args.prompt_len + args.output_len,
    )
    model = random_model(config, torch.device("cpu"), seed=0)
    tokens_needed = args.requests * (args.prompt_len + args.output_len)
    engine = LLMEngine(
        model,
        tokenizer,
        EngineConfig(
            max_num_seqs=args.requests,
            kv_cache_bytes=config.kv_cache_bytes_per_token(torch.float32) * tokens_needed * 2,
            decode_attention=args.decode_attention,
            max_graph_batch_size=args.requests,
        ),
    )
    # Instance attributes shadow the bound methods: only this engine's model is timed.
    model.hidden_states = timers.timed(model.hidden_states, "forward")
    embed_out = model.embed_out
    embed_out.forward = timers.timed(embed_out.forward, "forward")
    if engine.decode_runner is not None:
        # Its forward only: the host-side filling of its input buffers counts as host work.
        runner = engine.decode_runner
        runner._forward = timers.timed(runner._forward, "forward")
    return engine


def run_workload(args: argparse.Namespace, tokenizer: Tokenizer | None, sampled: bool) -> dict:
    timers = Timers()
    engine = build_engine(args, tokenizer, timers)
    original_sample = engine_module.sample
    engine_module.sample = timers.timed(original_sample, "sample")
    rng = random.Random(args.seed)
    for i in range(args.requests):
        prompt = [rng.randrange(args.vocab) for _ in range(args.prompt_len)]
        params = SamplingParams(
            max_tokens=args.output_len,
            ignore_eos=True,
            temperature=0.8 if sampled else 0.0,
            top_p=0.95 if sampled else 1.0,
            seed=i if sampled else None,
        )
        engine.add_request(prompt, params)

    profiler = cProfile.Profile() if args.profile else None
    steps: list[dict[str, float]] = []
    output_tokens = 0
    try:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            decode_only = (
                all(s.num_computed >= s.num_prompt_tokens for s in engine.scheduler.running)
                and not engine.scheduler.waiting
            )
            timers.forward = timers.sample = timers.forward_cpu = timers.sample_cpu = 0.0
            t0, t0_cpu = time.perf_counter(), time.thread_time()
            if profiler is not None and decode_only:
                profiler.enable()
            outputs = engine.step()
            if profiler is not None:
                profiler.disable()
            elapsed = time.perf_counter() - t0
            host_cpu = time.thread_time() - t0_cpu - timers.forward_cpu - timers.sample_cpu
            output_tokens += sum(len(c.delta_token_ids) for o in outputs for c in o.outputs)
            steps.append(
                {
                    "total": elapsed,
                    "forward": timers.forward,
                    "sample": timers.sample,
                    "host_cpu": host_cpu,
                    "decode_only": decode_only,
                }
            )
        wall = time.perf_counter() - start
    finally:
        engine_module.sample = original_sample
    if profiler is not None:
        print(f"\n--- cProfile of the decode-only steps ({'sampled' if sampled else 'greedy'}) ---")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)

    def summary(rows: list[dict[str, float]]) -> dict[str, float]:
        n = max(len(rows), 1)
        total = sum(r["total"] for r in rows) / n
        forward = sum(r["forward"] for r in rows) / n
        sample = sum(r["sample"] for r in rows) / n
        return {
            "steps": len(rows),
            "ms_per_step": 1e3 * total,
            "forward_ms": 1e3 * forward,
            "sample_ms": 1e3 * sample,
            "host_ms": 1e3 * (total - forward - sample),
            "host_cpu_ms": 1e3 * sum(r["host_cpu"] for r in rows) / n,
            # The middle step: the mean suffers from steps slowed by other processes.
            "host_cpu_median_ms": 1e3 * statistics.median([r["host_cpu"] for r in rows] or [0]),
        }

    decode_rows = [r for r in steps if r["decode_only"]]
    return {
        "all_steps": summary(steps),
        "decode_steps": summary(decode_rows),
        "wall_s": wall,
        "steps_per_s": len(steps) / wall,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall,
    }


def format_table(runs_by_label: list[tuple[str, dict[str, dict]]]) -> str:
    header = (
        f"{'workload':<9} {'steps':<7} {'n':>5} {'ms/step':>9} {'forward':>9} {'sample':>9} "
        f"{'host':>9} {'host cpu':>9} {'(median)':>9} {'steps/s':>8} {'out tok/s':>10}"
    )
    lines = [header, "-" * len(header)]
    for label, runs in runs_by_label:
        lines.append(f"[{label}]")
        for name, run in runs.items():
            for kind in ("decode_steps", "all_steps"):
                s = run[kind]
                lines.append(
                    f"{name:<9} {kind.split('_')[0]:<7} {s['steps']:>5} {s['ms_per_step']:>9.2f} "
                    f"{s['forward_ms']:>9.2f} {s['sample_ms']:>9.2f} {s['host_ms']:>9.2f} "
                    f"{s['host_cpu_ms']:>9.2f} {s['host_cpu_median_ms']:>9.2f} "
                    + (
                        f"{run['steps_per_s']:>8.2f} {run['output_tokens_per_s']:>10.0f}"
                        if kind == "all_steps"
                        else ""
                    )
                )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument(
        "--decode-attention",
        default="sdpa",
        help="EngineConfig.decode_attention: sdpa (default) runs decode steps through the "
        "fast path's DecodeGraphRunner, as a GPU does (eagerly, without graphs); loop runs "
        "them through the per-sequence PagedAttention",
    )
    parser.add_argument(
        "--tokenizer",
        default=str(DEFAULT_TOKENIZER),
        help="tokenizer.json for detokenization; 'none' runs without (no text is produced)",
    )
    parser.add_argument(
        "--workloads", default="greedy,sampled", help="comma list of: greedy, sampled"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print cProfile's top N functions"
    )
    parser.add_argument("--baseline", action="store_true", help="store this run as the baseline")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    try:
        for name in ("requests", "prompt_len", "output_len", "layers", "hidden", "heads", "vocab"):
            if getattr(args, name) < 1:
                raise TuluError(f"--{name.replace('_', '-')} must be >= 1")
        workloads = [w for w in args.workloads.split(",") if w]
        unknown = sorted(set(workloads) - {"greedy", "sampled"})
        if unknown or not workloads:
            raise TuluError(f"--workloads: unknown workload(s) {unknown} (use greedy, sampled)")
        check_output(args.output)
        tokenizer = None
        if args.tokenizer != "none":
            if not Path(args.tokenizer).is_file():
                raise TuluError(
                    f"--tokenizer {args.tokenizer}: no such file (pass 'none' to run without)"
                )
            tokenizer = Tokenizer.from_file(args.tokenizer)
            if len(tokenizer) > args.vocab:
                raise TuluError(
                    f"--vocab {args.vocab} is smaller than the tokenizer's {len(tokenizer)}"
                )
    except TuluError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    previous: dict[str, Any] = {}
    if args.output.is_file():
        try:
            previous = json.loads(args.output.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
    runs: dict[str, Any] = previous.get("runs", {}) if isinstance(previous, dict) else {}
    command = "python " + " ".join(sys.argv)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("baseline", "output", "profile", "workloads")
    }
    settings["torch"] = torch.__version__
    settings["torch_threads"] = torch.get_num_threads()
    shown: dict[str, dict[str, Any]] = {}
    current: dict[str, dict[str, Any]] = {}
    # A short untimed run first: the first steps of a process pay one-time costs (kernel
    # selection, allocator growth, lazy imports) that belong to neither engine version.
    warm_up = argparse.Namespace(**{**vars(args), "requests": 4, "output_len": 4, "profile": 0})
    for name in workloads:
        run_workload(warm_up, tokenizer, name == "sampled")
    for name in workloads:
        result = run_workload(args, tokenizer, name == "sampled")
        # One entry per workload: each keeps its own settings, command and baseline, so that
        # workloads run with different sizes share the file.
        entry = runs.get(name, {})
        if args.baseline:
            entry = {"settings": settings, "baseline": {"command": command, **result}}
        else:
            if entry.get("settings") != settings:
                entry = {"settings": settings}  # a baseline of other settings does not compare
            elif "baseline" in entry:
                shown[name] = entry["baseline"]
            entry["results"] = {"command": command, **result}
        current[name] = result
        runs[name] = entry
    table = [("baseline", shown)] if shown else []
    table.append(("baseline" if args.baseline else "this run", current))
    print(format_table(table))
    write_json(args.output, {"description": __doc__.split("\n")[0], "runs": runs})
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
