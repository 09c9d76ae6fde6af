"""What a training run reports: a progress bar, metrics.jsonl, TensorBoard events, a loss plot.

Only rank 0 reports (`MetricsLogger(enabled=world.is_main)`); every value it gets is already
reduced over the ranks by the trainer.

``output_dir/metrics.jsonl`` has one JSON object per logged step (every
``logging.every_steps`` steps, and the last step)::

    {"step": 10, "epoch": 0.5, "loss": 2.31, "lr": 1.9e-05, "grad_norm": 1.2,
     "tokens": 51234, "trained_tokens": 20345, "padded_fraction": 0.12,
     "tokens_per_s": 8123.4, "mfu": 0.41, "elapsed": 63.2}

`loss` is that step's normalised loss (not an average over the logging interval), `epoch`
the epochs done so far as a fraction, `tokens` / `trained_tokens` the step's real (non-padding)
and loss-bearing tokens over all ranks, `padded_fraction` the share of the step's token
slots (rows x width of its micro-batches) that hold padding, `tokens_per_s` real tokens per
second over the interval since the previous log line, `mfu` null when unknown, `elapsed`
seconds of training since the run began (resumed runs continue the count). Validation
losses are lines of their own:
``{"step": 10, "epoch": 0.5, "val_loss": 2.4, "val_tokens": 4321, "elapsed": 64.0}``.
A non-finite value (a validation loss over no trained tokens is NaN) is written as null, so
the file is strict JSON that jq or JavaScript can read.
On resume the file is rewritten with the checkpoint's snapshot of it, so it never holds steps
after the resumed one twice (or steps of a run that was cut off and never checkpointed), and
TensorBoard is told to purge events after the resumed step the same way (``purge_step``).

**MFU** (model FLOPs utilisation) is the FLOPs the model needs per second divided by the
hardware's peak, as issue 7 defines it: (6 x non-embedding parameters + attention FLOPs) x
tokens per second over the peak. Per token of a row of length T, with P the non-embedding
parameters (Pythia's own count: everything but the input embedding and the LM head, 6.44e9
of Pythia-6.9B's 6.86e9), L layers and hidden size h:

- each weight costs 2 FLOPs per token forward (multiply, add) and 4 backward (the gradient
  with respect to the input and the one with respect to the weight): **6 P**;
- attention: per layer and row, the scores Q K^T are T x T dot products of length h (all
  heads together) = 2 T^2 h FLOPs, and the weighted sum of values another 2 T^2 h: 4 T^2 h
  forward, twice that backward, 12 T^2 h per row = **12 L h T per token** over the layers.
  That counts the whole T x T matrix, as the PaLM paper's MFU does, although a causal kernel
  needs only half of it: numbers stay comparable with published MFU.

FLOPs of a micro-batch = rows x T x (6 P + 12 L h T), with T the row length actually computed
(the micro-batch's padded width with padding, `max_seq_length` with packing): padding costs
the hardware as much as real tokens, so it is counted in the FLOPs (the work done) while
`tokens_per_s` counts real tokens (the work that matters). The recomputed forward of
activation checkpointing is not counted (that would be "hardware FLOPs utilisation"), nor is
LoRA's saving of the frozen weights' gradients: MFU with LoRA uses the same 6 P.

The peak is ``logging.peak_tflops`` per device if set, else looked up by
`torch.cuda.get_device_name` in `KNOWN_PEAK_TFLOPS` (dense bfloat16 tensor-core peaks: H100
SXM and H200 989 TFLOP/s, H100 PCIe 756, A100 312), else unknown: no MFU (on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tulu.errors import CheckpointError, ConfigError
from tulu.model.config import NeoXConfig
from tulu.train.config import LoggingConfig

__all__ = [
    "KNOWN_PEAK_TFLOPS",
    "METRICS_FILE",
    "MetricsLogger",
    "Throughput",
    "non_embedding_parameters",
    "micro_batch_flops",
    "peak_flops",
    "plot_metrics",
    "read_metrics",
]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"

#: (substring of torch.cuda.get_device_name, dense bfloat16 TFLOP/s), first match wins.
KNOWN_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)


# ------------------------------------------------------------------------------ FLOPs
def non_embedding_parameters(config: NeoXConfig) -> int:
    """P of the module doc: every parameter but the input embedding and the LM head, the
    count MFU is defined on (issue 7; Pythia's "non-embedding parameters"). The LM head's
    matmul does run, so this MFU is a little lower than one counting it (3% for 6.9B)."""
    return config.num_parameters(include_embeddings=False)


def micro_batch_flops(config: NeoXConfig, rows: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) of `rows` rows of `seq_len` tokens."""
    per_token = 6 * non_embedding_parameters(config) + 12 * config.num_hidden_layers * (
        config.hidden_size * seq_len
    )
    return rows * seq_len * per_token


def peak_flops(config: LoggingConfig, device: Any) -> float | None:
    """Peak FLOP/s of one device: ``logging.peak_tflops``, else the known-GPU table, else None."""
    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tflops in KNOWN_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


class Throughput:
    """Real tokens and model FLOPs since the last report, and the rates they give."""

    def __init__(self, peak_per_device: float | None, world_size: int) -> None:
        self.peak = peak_per_device * world_size if peak_per_device else None
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.seconds = 0.0

    def add(self, tokens: int, flops: float, seconds: float) -> None:
        self.tokens += tokens
        self.flops += flops
        self.seconds += seconds

    def rates(self) -> tuple[float, float | None]:
        """(real tokens per second, MFU or None), then start a new interval."""
        seconds = max(self.seconds, 1e-9)
        tokens_per_s = self.tokens / seconds
        mfu = self.flops / seconds / self.peak if self.peak else None
        self.reset()
        return tokens_per_s, mfu


# ------------------------------------------------------------------------------ the file
def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a metrics.jsonl; a torn last line (a killed run) is ignored, as is any
    other line that is not an entry (bytes that are not UTF-8 included)."""
    entries = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


def json_line(entry: dict[str, Any]) -> str:
    """One metrics.jsonl line: strict JSON, with a non-finite value (a validation loss over
    no trained tokens is NaN) written as null. Python's default ``NaN`` is not JSON: jq,
    JavaScript and most JSON readers other than Python's refuse the whole file."""
    finite = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in entry.items()
    }
    return json.dumps(finite, allow_nan=False) + "\n"


def write_metrics(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with `entries`, atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json_line(entry))
    os.replace(tmp, path)


def _fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f} tok/s"


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Writes metrics.jsonl, TensorBoard events and the progress display (see the module doc).

    With `enabled` False (ranks other than 0) every method does nothing. `history` is the
    checkpoint's snapshot of the metrics when resuming (entries up to `start_step`), else
    empty: either way the file is rewritten with it, so it starts consistent.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        config: LoggingConfig,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        history: Iterable[dict[str, Any]] = (),
    ) -> None:
        self.enabled = enabled
        self.config = config
        self.total_steps = total_steps
        self.start_step = start_step
        self.entries: list[dict[str, Any]] = [e for e in history if e["step"] <= start_step]
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self._writer: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._started = time.perf_counter()
        self._file: Any = None
        if not enabled:
            return
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_metrics(self.path, self.entries)
            self._file = self.path.open("a", encoding="utf-8")
            if config.tensorboard:
                self._writer = _summary_writer(self.output_dir / TENSORBOARD_DIR, start_step + 1)
        except OSError as err:
            self.close()
            raise _unwritable(self.output_dir, "the metrics and TensorBoard events", err) from None
        if config.progress and sys.stderr.isatty():
            self._start_progress()

    # ------------------------------------------------------------------------ display
    def _start_progress(self) -> None:
        from tulu.progress import progress_bar

        self._progress = progress_bar("train", detail="{task.fields[stats]}")
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=self.start_step, stats=""
        )

    def _stats(self, entry: dict[str, Any]) -> str:
        parts = [f"loss {entry['loss']:.4f}", f"lr {entry['lr']:.2e}"]
        if entry.get("tokens_per_s") is not None:
            parts.append(_fmt_rate(entry["tokens_per_s"]))
        if entry.get("mfu") is not None:
            parts.append(f"MFU {100 * entry['mfu']:.1f}%")
        return "  ".join(parts)

    def advance(self, step: int) -> None:
        """Move the progress bar to `step` (called every step)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def _print_line(self, entry: dict[str, Any]) -> None:
        """Without a terminal: one plain line per logged step (logs, nohup, CI)."""
        done = entry["step"] - self.start_step
        spent = time.perf_counter() - self._started
        eta = spent / done * (self.total_steps - entry["step"]) if done > 0 else math.inf
        print(
            f"step {entry['step']}/{self.total_steps}  {self._stats(entry)}  ETA {_fmt_eta(eta)}",
            file=sys.stderr,
            flush=True,
        )

    # ------------------------------------------------------------------------ entries
    def _append(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        try:
            self._file.write(json_line(entry))
            self._file.flush()
        except OSError as err:
            raise _unwritable(self.path, f"the metrics of step {entry['step']}", err) from None

    def log_step(self, entry: dict[str, Any]) -> None:
        """Record a training step's metrics (keys as in the module doc)."""
        if not self.enabled:
            return
        self._append(entry)
        if self._writer is not None:
            step = entry["step"]
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if entry.get(key) is not None:
                    self._writer.add_scalar(f"train/{key}", entry[key], step)
            self._writer.flush()
        if self._progress is not None:
            self._progress.update(self._task, completed=entry["step"], stats=self._stats(entry))
        elif self.config.progress:
            self._print_line(entry)

    def log_validation(self, entry: dict[str, Any]) -> None:
        """Record a validation result (``step``, ``val_loss``, ...)."""
        if not self.enabled:
            return
        self._append(entry)
        if self._writer is not None:
            self._writer.add_scalar("validation/loss", entry["val_loss"], entry["step"])
            self._writer.flush()
        message = f"step {entry['step']}: validation loss {entry['val_loss']:.4f}"
        if self._progress is not None:
            self._progress.console.print(message)
        elif self.config.progress:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the display and close the files. Every line was flushed when it was logged
        (a failure raised then), so a failing close has nothing left to lose and must not
        hide the error that ends the run."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def plot(self) -> Path | None:
        """Write output_dir/loss.png (see `plot_metrics`); None when disabled or empty."""
        if not self.enabled or not self.config.plot:
            return None
        try:
            return plot_metrics(self.entries, self.output_dir / PLOT_FILE)
        except OSError as err:
            raise _unwritable(self.output_dir / PLOT_FILE, "the loss plot", err) from None


def _unwritable(path: Path, what: str, err: OSError) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot write {what} ({err.strerror or err}); check checkpoint.output_dir"
    )


def _summary_writer(directory: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            f"logging.tensorboard: needs the tensorboard package (pip install 'tulu[train]'), "
            f"or set logging.tensorboard: false ({err})"
        ) from None
    return SummaryWriter(log_dir=str(directory), purge_step=purge_step)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def plot_metrics(entries: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """A PNG with the training (and validation) loss and the learning rate against the step."""
    train = [e for e in entries if "loss" in e]
    if not train:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    val = [e for e in entries if _finite(e.get("val_loss"))]
    fig = Figure(figsize=(8, 6))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    ax_loss.plot([e["step"] for e in train], [e["loss"] for e in train], label="train")
    if val:
        ax_loss.plot(
            [e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="validation"
        )
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([e["step"] for e in train], [e["lr"] for e in train], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out
