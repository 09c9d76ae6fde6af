"""Training throughput: tulu's training step vs transformers' GPTNeoX, same weights, one run.

Measurements on the same random micro-batches, one after the other:

- **tulu**, once per `--optimizer` in the comma list (each optimizer built afresh, so each
  peak holds its own states; on a GPU each is printed beside `tulu train --dry-run`'s
  estimate): the trainer's whole optimizer step for one micro-batch, with the model prepared
  as `tulu.train` prepares it for a single process (`init_distributed`, `prepare_model`,
  `build_optimizer`, `build_scheduler`): `backward_step` (forward + backward with our loss),
  `clip_grad_norm` (the norm is always measured; clipping is off, `max_grad_norm: null`),
  `optimizer.step()`, `scheduler.step()`, `optimizer.zero_grad()`.
- **transformers fwd+bwd**: `transformers.GPTNeoXForCausalLM` (SDPA attention, activation
  checkpointing through its own `activation_checkpointing_enable` /
  `gradient_checkpointing_enable`), `model(input_ids, labels=...)` with its own loss, then
  `loss.backward()` and `zero_grad()`: no optimizer.
- **transformers fwd+bwd+AdamW**: the same plus a `torch.optim.AdamW` step with our
  `optimizer: adamw` settings (fused where torch has the kernel), for a like-for-like step.

The transformers model is built from our config (`NeoXConfig.to_dict()` ->
`transformers.GPTNeoXConfig`) and gets our weights by name: its parameters share our
parameters' storage (no second copy on the device), so its first step sees exactly our
initial weights; before any step the two losses on the same batch are compared.

Every step is timed alone between two `torch.cuda.synchronize()` calls (on a GPU); the figures
use the median step time (the mean and every step's time are in the JSON). Reported:
tokens/s (micro-batch x sequence / step time), ms/step, MFU
(`tulu.train.metrics.micro_batch_flops` x steps/s / peak; the peak from `peak_flops`, i.e. the
known-GPU table or `--peak-tflops`; "n/a" on the CPU without it), and peak memory per
measurement: `torch.cuda.max_memory_allocated` on a GPU (all of it, weights included), the
growth of the resident set over the measurement on the CPU (its high-water mark reset
through /proc/self/clear_refs; weights excluded, gradients, optimizer states and activations
included). Ratios are tulu / transformers for every figure.

    python benchmarks/train.py                        # CPU: 4 layers x 256, float32, 512 tokens
    python benchmarks/train.py --optimizer adamw_bf16 # on a GPU: Pythia-6.9B, bfloat16, 4 x 2048
    python benchmarks/train.py --optimizer adamw_bf16,adamw_8bit   # both options' peaks
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from tulu.bench.workloads import require_positive, resolve_device
from tulu.errors import TuluError
from tulu.jsonl import check_output, write_json
from tulu.model import GPTNeoXForCausalLM, NeoXConfig, preset
from tulu.model.config import dtype_name, parse_dtype
from tulu.train.config import DataConfig, LoggingConfig, ModelConfig, OptimConfig, TrainConfig
from tulu.train.distributed import World, clip_grad_norm, init_distributed, prepare_model
from tulu.train.memory import OPTIMIZERS, estimate_memory
from tulu.train.metrics import micro_batch_flops, peak_flops
from tulu.train.optim import build_optimizer, build_scheduler
from tulu.train.trainer import backward_step, micro_batch_loss

RESULTS = Path(__file__).parent / "results"
#: The CPU default: small enough for a 2-core machine to run the three measurements in about
#: a minute, with Pythia's vocabulary (its LM head dominates at this width).
TINY = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
TOKEN_IDS = 50277  # ids of the Pythia tokenizer; the padded vocabularies are larger


# ------------------------------------------------------------------------------ machine
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:  # hand freed heap pages back, so that the next measurement starts from a low RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of one measurement: CUDA's max allocated, or the CPU RSS growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        _release_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = 0
            self.ok = True
            return
        self.base = _status_bytes("VmRSS") or 0
        try:  # "5" resets the VmHWM high-water mark to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.ok = _status_bytes("VmHWM") is not None
        except OSError:
            self.ok = False

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if not self.ok:
            return None
        return max((_status_bytes("VmHWM") or 0) - self.base, 0)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# ------------------------------------------------------------------------------ models
def model_config(args: argparse.Namespace, gpu: bool, dtype: torch.dtype) -> NeoXConfig:
    overrides: dict[str, Any] = {"torch_dtype": dtype_name(dtype)}
    name = args.preset or ("pythia-6.9b" if gpu else "tiny")
    if name == "tiny":
        overrides.update(TINY)
        name = "pythia-70m"
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    if args.hidden_size:
        overrides["hidden_size"] = args.hidden_size
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    if "hidden_size" in overrides:
        overrides["intermediate_size"] = 4 * overrides["hidden_size"]
    overrides["max_position_embeddings"] = max(2048, args.seq_len)
    return preset(name, **overrides)


def build_ours(config: NeoXConfig, train_config: TrainConfig, world: World, seed: int):
    """A fresh model in the compute dtype (as `tulu.model.checkpoint.load_model` loads a
    checkpoint for a single-process run), then `prepare_model` and train mode, as the trainer
    does; built on the meta device so that a 6.9B model is never materialised in float32."""
    dtype = parse_dtype(config.torch_dtype)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    model = model.to(dtype).to_empty(device=world.device)
    model.init_weights(seed, on_device=True)
    model = prepare_model(model, world, train_config)
    model.train()
    return model


def build_theirs(config: NeoXConfig, ours: GPTNeoXForCausalLM, device: torch.device, ckpt: bool):
    """transformers' model over our weights (shared storage, same names)."""
    hf_config = transformers.GPTNeoXConfig(**config.to_dict(), attn_implementation="sdpa")
    hf_config.use_cache = False
    with torch.device("meta"):
        theirs = transformers.GPTNeoXForCausalLM(hf_config)
    state = {
        ("lm_head.weight" if k == "embed_out.weight" else k): v
        for k, v in ours.state_dict().items()
    }
    theirs.load_state_dict(state, assign=True, strict=True)
    # The rotary tables are buffers outside the state dict: build them for real.
    rotary = type(theirs.gpt_neox.rotary_emb)(hf_config)
    theirs.gpt_neox.rotary_emb = rotary.to(device)
    for name, tensor in [*theirs.named_parameters(), *theirs.named_buffers()]:
        if tensor.device.type == "meta":
            raise RuntimeError(f"transformers' {name} was not filled in")
    if ckpt:
        kwargs = {"use_reentrant": False}  # as our per-layer torch.utils.checkpoint call
        if hasattr(theirs, "activation_checkpointing_enable"):
            theirs.activation_checkpointing_enable(kwargs)
        else:
            theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    theirs.train()
    return theirs


def make_batches(n: int, rows: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    """Random rows of real tokens, every position trained (labels = inputs; both losses
    shift them), on the CPU as the trainer's data loader gives them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, min(vocab, TOKEN_IDS), (rows, seq_len), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


# ------------------------------------------------------------------------------ timing
def measure(
    name: str,
    step: Callable[[dict], float],
    batches: list[dict],
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, Any]:
    """Warm-up steps (untimed; optimizer states get allocated there), then `steps` timed one
    by one; the peak memory covers both."""
    memory = PeakMemory(device)
    losses = []
    for i in range(warmup):
        losses.append(step(batches[i % len(batches)]))
    seconds = []
    for i in range(warmup, warmup + steps):
        sync(device)
        start = time.perf_counter()
        losses.append(step(batches[i % len(batches)]))
        sync(device)
        seconds.append(time.perf_counter() - start)
    peak = memory.peak()
    mean, median = statistics.fmean(seconds), statistics.median(seconds)
    print(
        f"  {name}: median {median * 1e3:,.1f} ms/step (mean {mean * 1e3:,.1f}, "
        f"min {min(seconds) * 1e3:,.1f}), last loss {losses[-1]:.4f}",
        flush=True,
    )
    return {
        "median_seconds_per_step": median,
        "mean_seconds_per_step": mean,
        "min_seconds_per_step": min(seconds),
        "step_seconds": seconds,
        "peak_memory_bytes": peak,
        "losses": losses,
    }


def time_tulu(
    ours: GPTNeoXForCausalLM,
    config: NeoXConfig,
    train_config: TrainConfig,
    world: World,
    batches: list[dict],
    warmup: int,
    steps: int,
    label: str = "tulu step",
) -> dict[str, Any]:
    """The trainer's optimizer step (`_Run._run_step` without its logging). The optimizer is
    built here and dropped on return, so the next measurement starts without its states."""
    optimizer = build_optimizer(ours, train_config.optim)
    scheduler = build_scheduler(optimizer, train_config.optim, warmup + steps)

    def step(mb: dict) -> float:
        stats = backward_step(
            ours,
            [mb],
            world,
            normalization=train_config.optim.loss_normalization,
            num_micro_batches=1,
            model_config=config,
        )
        clip_grad_norm(ours, train_config.optim.max_grad_norm, world)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return stats.loss

    try:
        return measure(label, step, batches, warmup, steps, world.device)
    finally:
        optimizer.zero_grad(set_to_none=True)


def time_transformers(
    theirs: transformers.GPTNeoXForCausalLM,
    optim: OptimConfig | None,
    device: torch.device,
    batches: list[dict],
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """transformers' forward + backward with its own loss; with `optim`, plus that optimizer's
    step (torch AdamW for `adamw`, fused where torch has the kernel)."""
    optimizer = build_optimizer(theirs, optim) if optim is not None else None

    def step(mb: dict) -> float:
        ids = mb["input_ids"].to(device, non_blocking=True)
        labels = mb["labels"].to(device, non_blocking=True)
        loss = theirs(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        theirs.zero_grad(set_to_none=True)
        return float(loss.detach())

    name = "transformers fwd+bwd" + ("+AdamW" if optimizer is not None else "")
    try:
        return measure(name, step, batches, warmup, steps, device)
    finally:
        theirs.zero_grad(set_to_none=True)


def figures(result: dict, tokens: int, flops: float, peak: float | None) -> dict[str, Any]:
    step_s = result["median_seconds_per_step"]  # robust to a stray slow step on a shared box
    return {
        "tokens_per_s": tokens / step_s,
        "ms_per_step": step_s * 1e3,
        "mfu": flops / step_s / peak if peak else None,
        "peak_memory_gib": (
            result["peak_memory_bytes"] / 2**30 if result["peak_memory_bytes"] is not None else None
        ),
    }


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="a Pythia size (pythia-6.9b, ...) or 'tiny' (4 layers x 256, Pythia's vocabulary); "
        "default: pythia-6.9b on GPU, tiny on CPU",
    )
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the width")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 2048 GPU, 512 CPU")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 4 GPU, 2 CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (3 GPU, 2 CPU)")
    parser.add_argument(
        "--optimizer",
        default="adamw",
        help="tulu's optimizer, or a comma list (adamw, adamw_bf16, adamw_8bit): each is timed "
        "in turn on the same model, with its own peak memory and dry-run estimate",
    )
    parser.add_argument("--no-checkpointing", action="store_true", help="keep all activations")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: results/train-<dev>.json")
    args = parser.parse_args()
    optimizers = [o.strip() for o in args.optimizer.split(",") if o.strip()]
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown or not optimizers or len(set(optimizers)) != len(optimizers):
        parser.error(
            f"--optimizer: expected some of {', '.join(OPTIMIZERS)}, got {args.optimizer!r}"
        )

    check_args(parser, args)
    gpu = resolve_device(args.device).type == "cuda"
    dtype = parse_dtype(args.dtype or ("bfloat16" if gpu else "float32"), "--dtype")
    # `build_optimizer` refuses it for every optimizer: refused before the model is built.
    if dtype == torch.float16:
        parser.error(
            "--dtype float16: one process keeps float16 parameters, whose Adam second moment "
            "underflows (tulu train refuses it); use bfloat16 or float32"
        )
    out = args.out or RESULTS / f"train-{'cuda' if gpu else 'cpu'}.json"
    check_output(out, "--out")
    args.seq_len = args.seq_len or (2048 if gpu else 512)
    micro_batch = args.micro_batch or (4 if gpu else 2)
    steps = args.steps or 10
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    checkpointing = not args.no_checkpointing
    torch.manual_seed(args.seed)

    config = model_config(args, gpu, dtype)
    train_config = TrainConfig(
        model=ModelConfig(
            dtype=dtype_name(dtype),
            gradient_checkpointing=checkpointing,
        ),
        data=DataConfig(train="(random batches)", max_seq_length=args.seq_len),
        optim=OptimConfig(
            optimizer=optimizers[0],
            micro_batch_size=micro_batch,
            global_batch_size=micro_batch,
            max_grad_norm=None,
        ),
        logging=LoggingConfig(peak_tflops=args.peak_tflops),
    )
    world = init_distributed(train_config.distributed, device=args.device)
    device = world.device
    if world.world_size != 1:
        raise SystemExit("run this benchmark as one plain process, not under torchrun")

    started = time.perf_counter()
    ours = build_ours(config, train_config, world, args.seed)
    theirs = build_theirs(config, ours, device, checkpointing)
    build_seconds = time.perf_counter() - started
    batches = make_batches(
        min(warmup + steps, 4), micro_batch, args.seq_len, config.vocab_size, args.seed
    )
    tokens = micro_batch * args.seq_len
    flops = float(micro_batch_flops(config, micro_batch, args.seq_len))
    peak = peak_flops(train_config.logging, device)
    device_name = torch.cuda.get_device_name(device) if gpu else cpu_name()
    print(
        f"{config.num_parameters() / 1e6:,.1f}M parameters ({config.num_hidden_layers} layers x "
        f"{config.hidden_size}, vocab {config.vocab_size}), {dtype_name(dtype)}, "
        f"micro-batch {micro_batch} x {args.seq_len} tokens, activation checkpointing "
        f"{'on' if checkpointing else 'off'}, optimizer {', '.join(optimizers)}; {device_name}, "
        f"{torch.get_num_threads()} threads; built in {build_seconds:.1f} s",
        flush=True,
    )

    # ---- the same loss on the same batch, before any step (both in eval mode, no grad)
    check = {k: v.to(device) for k, v in batches[0].items()}
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        total, count = micro_batch_loss(ours, check)
        ours_loss = float(total / count)
        hf_loss = float(theirs(input_ids=check["input_ids"], labels=check["labels"]).loss)
    ours.train()
    theirs.train()
    print(
        f"step-0 loss: tulu {ours_loss:.6f}, transformers {hf_loss:.6f}, "
        f"difference {abs(ours_loss - hf_loss):.2e}",
        flush=True,
    )
    del check, total, count

    report: dict[str, Any] = {
        "config": {
            "preset": args.preset or ("pythia-6.9b" if gpu else "tiny"),
            "model": config.to_dict(),
            "parameters": config.num_parameters(),
            "dtype": dtype_name(dtype),
            "seq_len": args.seq_len,
            "micro_batch": micro_batch,
            "tokens_per_step": tokens,
            "steps": steps,
            "warmup": warmup,
            "activation_checkpointing": checkpointing,
            "optimizers": optimizers,
            "transformers_optimizer": "torch.optim.AdamW (tulu's adamw settings)",
            "attn_implementation": "sdpa",
            "model_flops_per_step": flops,
            "peak_flops": peak,
        },
        "step0_loss": {
            "tulu": ours_loss,
            "transformers": hf_loss,
            "abs_difference": abs(ours_loss - hf_loss),
        },
        "machine": {
            "device": str(device),
            "device_name": device_name,
            "memory_metric": "torch.cuda.max_memory_allocated" if gpu else "VmHWM - VmRSS at start",
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda if gpu else None,
        },
        "build_seconds": build_seconds,
    }
    # `tulu train --dry-run`'s estimate for each optimizer, beside a GPU's measured peak
    # (max_memory_allocated, which excludes the estimate's fixed overhead: CUDA context,
    # slack). The CPU's figure (RSS growth, weights excluded) is not comparable.
    estimates = {
        name: estimate_memory(config, train_config, 1, optimizer=name)
        for name in (optimizers if gpu else ())
    }
    measurements: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        (
            f"tulu_{name}",
            f"tulu step ({name})",
            lambda name=name: time_tulu(
                ours,
                config,
                dataclasses.replace(
                    train_config, optim=dataclasses.replace(train_config.optim, optimizer=name)
                ),
                world,
                batches,
                warmup,
                steps,
                label=f"tulu step ({name})",
            ),
        )
        for name in optimizers
    ]
    measurements += [
        (
            "transformers",
            "HF fwd+bwd",
            lambda: time_transformers(theirs, None, device, batches, warmup, steps),
        ),
        (
            "transformers_adamw",
            "HF fwd+bwd+AdamW",
            lambda: time_transformers(
                theirs,
                dataclasses.replace(train_config.optim, optimizer="adamw"),
                device,
                batches,
                warmup,
                steps,
            ),
        ),
    ]

    print("timing:", flush=True)
    results: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for key, label, measure_one in measurements:
        results[key] = measure_one()
        labels[key] = label
        # Written after every measurement: a run stopped by a time limit keeps what it has.
        report.update(tabulate(results, labels, estimates, tokens, flops, peak))
        write_json(out, report)

    print_table(report["table"], gpu)
    if peak is None:
        print("MFU: n/a (no known peak for this device; pass --peak-tflops)")
    else:
        print(f"MFU against a peak of {peak / 1e12:,.0f} TFLOP/s")
    print(f"model FLOPs per step {flops / 1e12:,.3f} TFLOP (tulu.train.metrics.micro_batch_flops)")
    if gpu:
        print(
            "dry-run GiB: `tulu train --dry-run`'s estimate, with its 1 GiB CUDA-context overhead"
        )
    else:
        print("RSS growth GiB: the resident set's growth over the measurement (weights excluded)")
    print(f"wrote {out}")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse sizes that could not run (or that `or` defaults would silently replace: a
    `--steps 0` must not time 10 steps), naming the flag, before a model is built."""
    positive = ("layers", "hidden_size", "vocab_size", "seq_len", "micro_batch", "steps")
    require_positive(parser, args, positive)
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    tflops = args.peak_tflops
    if tflops is not None and not (math.isfinite(tflops) and tflops > 0):
        parser.error(f"--peak-tflops must be a positive number, got {tflops}")


def tabulate(
    results: dict[str, dict[str, Any]],
    labels: dict[str, str],
    estimates: dict[str, Any],
    tokens: int,
    flops: float,
    peak: float | None,
) -> dict[str, Any]:
    """The report's `figures`, `table` and `raw` for the measurements done so far; ratios are
    tokens/s over transformers' once it has been measured."""
    fig = {k: figures(v, tokens, flops, peak) for k, v in results.items()}
    for name, estimate in estimates.items():
        if f"tulu_{name}" in fig:
            fig[f"tulu_{name}"]["estimate_gib"] = estimate.total / 2**30
            fig[f"tulu_{name}"]["estimate_without_overhead_gib"] = (
                estimate.total - estimate.overhead
            ) / 2**30

    def ratio(a: float | None, key: str) -> float | None:
        b = fig.get(key, {}).get("tokens_per_s")
        return a / b if a is not None and b else None

    table = [
        {
            "measurement": labels[key],
            "tokens_per_s": f["tokens_per_s"],
            "ms_per_step": f["ms_per_step"],
            "mfu": f["mfu"],
            "peak_memory_gib": f["peak_memory_gib"],
            "estimate_gib": f.get("estimate_gib"),
            "ratio_vs_fwd_bwd": ratio(f["tokens_per_s"], "transformers"),
            "ratio_vs_fwd_bwd_adamw": ratio(f["tokens_per_s"], "transformers_adamw"),
        }
        for key, f in fig.items()
    ]
    return {"figures": fig, "table": table, "raw": results}


def print_table(table: list[dict[str, Any]], gpu: bool) -> None:
    def cell(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else fmt.format(value)

    memory_label = "peak GiB" if gpu else "RSS growth GiB"
    print(
        f"\n{'':<26}{'tokens/s':>10}{'ms/step':>10}{'MFU':>8}{memory_label:>16}"
        f"{'dry-run GiB':>13}{'vs HF fb':>10}{'vs HF +A':>10}"
    )
    for row in table:
        print(
            f"{row['measurement']:<26}{cell(row['tokens_per_s'], '{:,.0f}'):>10}"
            f"{cell(row['ms_per_step'], '{:,.1f}'):>10}{cell(row['mfu'], '{:.1%}'):>8}"
            f"{cell(row['peak_memory_gib'], '{:.2f}'):>16}{cell(row['estimate_gib'], '{:.2f}'):>13}"
            f"{cell(row['ratio_vs_fwd_bwd'], '{:.2f}x'):>10}"
            f"{cell(row['ratio_vs_fwd_bwd_adamw'], '{:.2f}x'):>10}"
        )


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            main()
        except TuluError as err:  # bad settings: one line, as the tulu commands print them
            raise SystemExit(f"train.py: error: {err}") from None
