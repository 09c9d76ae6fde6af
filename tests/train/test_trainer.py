"""The training loop end to end (tulu.train.trainer): a tiny GPT-NeoX learns, both loss
normalisations match their definitions, a run killed with SIGKILL resumes bit for bit (with
dropout), a diverging run stops at the right step, the outputs (checkpoints, metrics,
TensorBoard, plot, HF export) are there and load, MFU, the progress lines and the padded
fraction agree with the micro-batches the trainer ran, and 2 processes train like 1.

Everything runs on the CPU with the demo's tiny tokenizer and a synthetic records file;
subprocesses get OMP_NUM_THREADS=1 and in-process runs one torch thread, so that runs are
bitwise reproducible and fast on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from train.conftest import ENV, torchrun
from tulu.demo import corpus_text, train_tokenizer
from tulu.errors import CheckpointError, ConfigError, TuluError
from tulu.model.checkpoint import load_model
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.tokenizer import Tokenizer
from tulu.train.cli import add_train_parser, cmd_train
from tulu.train.config import TrainConfig, apply_overrides, parse_train_config
from tulu.train.distributed import World
from tulu.train.metrics import read_metrics
from tulu.train.trainer import backward_step, build_model_config, train

TRAIN_EXAMPLES = 45  # odd: the last micro-batch and the last step of an epoch are short


# ------------------------------------------------------------------------------ fixtures
def records(n: int, offset: int) -> list[dict[str, Any]]:
    """Simple arithmetic conversations: a pattern a tiny model picks up in a few steps."""
    out = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, (3 * i) % 11 + 1
        out.append(
            {
                "dataset": "synthetic",
                "id": f"s{i}",
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ],
            }
        )
    return out


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def write_assets(root: Path) -> Path:
    """The demo's tokenizer trained on its corpus, and the train and validation records."""
    train_tokenizer(corpus_text()).save(root / "tokenizer")
    write_jsonl(root / "train.jsonl", records(TRAIN_EXAMPLES, 0))
    write_jsonl(root / "validation.jsonl", records(6, 1000))
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config_data(assets: Path, output_dir: Path, *overrides: str) -> dict[str, Any]:
    data = {
        "model": {
            "config": {
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            },
            "tokenizer": str(assets / "tokenizer"),
            "gradient_checkpointing": False,
        },
        "data": {
            "train": str(assets / "train.jsonl"),
            "max_seq_length": 64,
            "num_workers": 1,
            "cache_dir": str(assets / "cache"),
        },
        "optim": {
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "epochs": 2,
            "micro_batch_size": 4,
            "global_batch_size": 8,
        },
        "checkpoint": {"output_dir": str(output_dir), "every_steps": 4, "keep_last": 2},
        "logging": {"progress": False},
        "seed": 3,
    }
    return apply_overrides(data, overrides)


def make_config(assets: Path, output_dir: Path, *overrides: str) -> TrainConfig:
    return parse_train_config(config_data(assets, output_dir, *overrides))


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tulu.train", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_losses(path: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_metrics(path) if "loss" in e}


# ------------------------------------------------------------------------------ a whole run
@pytest.fixture(scope="module")
def trained(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """12 steps (2 epochs of 6), checkpoints every 4 keeping 2, validation, export."""
    out = tmp_path_factory.mktemp("run")
    config = make_config(assets, out, f"data.validation={assets / 'validation.jsonl'}")
    started = time.perf_counter()
    result = train(config)
    return {
        "result": result,
        "out": out,
        "config": config,
        "seconds": time.perf_counter() - started,
    }


def test_tiny_model_learns(trained: dict[str, Any]) -> None:
    result = trained["result"]
    assert result.final_step == result.total_steps == 12
    assert result.data["steps_per_epoch"] == 6 and result.data["examples"] == TRAIN_EXAMPLES
    losses = [result.losses[s] for s in range(1, 13)]
    assert losses[0] > 6.0  # about ln(640) at initialisation
    assert sum(losses[-3:]) / 3 < losses[0] - 2.0, losses
    assert result.validation_loss is not None and result.validation_loss < losses[0] - 2.0


def test_checkpoints_are_pruned_to_keep_last(trained: dict[str, Any]) -> None:
    out = trained["out"]
    steps = sorted(p.name for p in out.glob("step-*"))
    assert steps == ["step-000008", "step-000012"]
    assert not list(out.glob(".tmp-*"))
    state = json.loads((out / "step-000012" / "trainer.json").read_text())
    assert state["step"] == 12 and (state["epoch"], state["step_in_epoch"]) == (2, 0)
    saved = yaml.safe_load((out / "step-000012" / "config.yaml").read_text())
    assert parse_train_config(saved) == trained["config"]


def test_metrics_tensorboard_and_plot(trained: dict[str, Any]) -> None:
    out = trained["out"]
    entries = read_metrics(out / "metrics.jsonl")
    steps = [e["step"] for e in entries if "loss" in e]
    assert steps == list(range(1, 13))
    keys = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "trained_tokens"}
    keys |= {"padded_fraction", "tokens_per_s", "mfu", "elapsed"}
    assert set(entries[0]) == keys
    assert entries[0]["mfu"] is None  # CPU: no known peak
    assert 0 < entries[0]["trained_tokens"] < entries[0]["tokens"]
    assert [e["step"] for e in entries if "val_loss" in e] == [4, 8, 12]
    assert trained["result"].losses == {e["step"]: e["loss"] for e in entries if "loss" in e}
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_export_loads_in_tulu_and_transformers(trained: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    final = trained["out"] / "final"
    assert trained["result"].export_dir == final
    tokenizer = Tokenizer.from_dir(final)
    ids = torch.tensor([tokenizer.encode("<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n")])
    ours = load_model(final, dtype=torch.float32)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ours(ids)
        got = hf(input_ids=ids).logits
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_step_checkpoint_exports_as_an_hf_model(trained: dict[str, Any], tmp_path: Path) -> None:
    """`tulu export step-N`: an intermediate step becomes a model every tool opens; the last
    step's export is the run's own final export."""
    from tulu.cli import main

    out = trained["out"]
    last = out / "step-000012"
    assert json.loads((last / "trainer.json").read_text())["compute_dtype"] == "float32"
    assert (last / "model_config.json").is_file() and (last / "tokenizer").is_dir()
    assert main(["export", str(last), "--output", str(tmp_path / "s12")]) == 0
    assert main(["export", str(out / "step-000008"), "--output", str(tmp_path / "s8")]) == 0
    ids = torch.tensor([Tokenizer.from_dir(tmp_path / "s12").encode("What is 2 plus 3?")])
    with torch.no_grad():
        final = load_model(out / "final")(ids)
        torch.testing.assert_close(load_model(tmp_path / "s12")(ids), final, rtol=0, atol=0)
        assert not torch.allclose(load_model(tmp_path / "s8")(ids), final, atol=1e-3)
    assert (tmp_path / "s12" / "tokenizer.json").read_bytes() == (
        out / "final" / "tokenizer.json"
    ).read_bytes()

    # A checkpoint from before model_config.json and tokenizer/ existed: the run's settings
    # (config.yaml) rebuild the same model.
    old = tmp_path / "old-step"
    shutil.copytree(last, old)
    (old / "model_config.json").unlink()
    shutil.rmtree(old / "tokenizer")
    state = json.loads((old / "trainer.json").read_text())
    del state["compute_dtype"]
    (old / "trainer.json").write_text(json.dumps(state))
    assert main(["export", str(old), "--output", str(tmp_path / "old")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "old")(ids), final, rtol=0, atol=0)


def test_a_step_checkpoint_of_another_model_is_refused(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    step = tmp_path / "step-000012"
    shutil.copytree(trained["out"] / "step-000012", step)
    config = json.loads((step / "model_config.json").read_text())
    (step / "model_config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    from tulu.train.export import export_checkpoint

    with pytest.raises(CheckpointError, match=r"gpt_neox\.layers\.1\..*which this model does not"):
        export_checkpoint(step, tmp_path / "out", merge_lora=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ MFU, progress, padding
PEAK_TFLOPS = 0.001  # 1 GFLOP/s per device: the tiny model on one CPU thread is near it


def recorded_run(assets: Path, out: Path, *overrides: str) -> dict[str, Any]:
    """A run whose every `backward_step` call is recorded (the micro-batches it got and
    which are real), with stderr captured: what the tests recompute the metrics from."""
    import tulu.train.trainer as trainer

    calls: list[tuple[list[dict[str, torch.Tensor]], list[bool]]] = []

    def recording(model, micro_batches, world, **kwargs):
        calls.append((micro_batches, kwargs["real"]))
        return backward_step(model, micro_batches, world, **kwargs)

    config = make_config(
        assets,
        out,
        "checkpoint.every_steps=null",
        "checkpoint.export=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        *overrides,
    )
    stderr = io.StringIO()  # not a terminal: the progress display prints plain lines
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setattr(trainer, "backward_step", recording)
        result = train(config)
    entries = [e for e in read_metrics(result.metrics_file) if "loss" in e]
    real = [[mb for mb, r in zip(mbs, flags, strict=True) if r] for mbs, flags in calls]
    return {"config": config, "entries": entries, "steps": real, "stderr": stderr.getvalue()}


@pytest.fixture(scope="module")
def padded_run(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The first epoch (6 steps) with padding, logged every 2 steps, a peak set, progress on."""
    return recorded_run(
        assets,
        tmp_path_factory.mktemp("padded"),
        "optim.max_steps=6",
        "logging.every_steps=2",
        f"logging.peak_tflops={PEAK_TFLOPS}",
        "logging.progress=true",
    )


def padding_count(micro_batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(padded slots, all slots) of `micro_batches`, counted from their attention masks."""
    padded = sum(int((mb["attention_mask"] == 0).sum()) for mb in micro_batches)
    return padded, sum(mb["input_ids"].numel() for mb in micro_batches)


def test_mfu_on_the_cpu_with_a_peak_set(padded_run: dict[str, Any], assets: Path) -> None:
    """MFU of a logged interval (2 steps) = the FLOPs of its steps' real micro-batches at
    their padded widths x (steps/s = real tokens/s / real tokens) / the peak, recomputed from
    the micro-batches the trainer ran and metrics.jsonl's token rate."""
    from tulu.train.metrics import micro_batch_flops

    model_config = build_model_config(padded_run["config"], Tokenizer.load(assets / "tokenizer"))
    steps, entries = padded_run["steps"], padded_run["entries"]
    assert [e["step"] for e in entries] == [2, 4, 6] and len(steps) == 6
    for entry in entries:
        interval = steps[entry["step"] - 2 : entry["step"]]
        flops = sum(
            micro_batch_flops(model_config, *mb["input_ids"].shape) for s in interval for mb in s
        )
        tokens = sum(int(mb["attention_mask"].sum()) for s in interval for mb in s)
        assert entry["tokens"] == sum(int(mb["attention_mask"].sum()) for mb in interval[-1])
        seconds = tokens / entry["tokens_per_s"]
        assert entry["mfu"] == pytest.approx(flops / seconds / (PEAK_TFLOPS * 1e12), rel=1e-9)
        assert entry["mfu"] > 0


def test_progress_lines_without_a_terminal(padded_run: dict[str, Any]) -> None:
    """Not a terminal (nohup, CI): one line per logged step with the loss, lr, tokens/s, MFU
    (a peak is set) and an ETA (its value, from a fake clock, is pinned in test_metrics: this
    run's steps take milliseconds, so every ETA here reads 0:00:00)."""
    lines = [line for line in padded_run["stderr"].splitlines() if line.startswith("step ")]
    assert len(lines) == 3, padded_run["stderr"]
    for line, entry in zip(lines, padded_run["entries"], strict=True):
        match = re.fullmatch(rf"step {entry['step']}/6  (.*)  ETA \d+:\d\d:\d\d", line)
        assert match, line
        stats = match.group(1).split("  ")
        assert stats == [
            f"loss {entry['loss']:.4f}",
            f"lr {entry['lr']:.2e}",
            f"{entry['tokens_per_s']:,.0f} tok/s",
            f"MFU {100 * entry['mfu']:.1f}%",
        ]


def test_padded_fraction_of_a_padded_run(
    padded_run: dict[str, Any], assets: Path, tmp_path: Path, capsys
) -> None:
    """metrics.jsonl's padded_fraction is the logged step's padded slots over its slots; the
    dry run prints the first epoch's, which these 6 steps are."""
    steps, entries = padded_run["steps"], padded_run["entries"]
    for entry in entries:
        padded, slots = padding_count(steps[entry["step"] - 1])
        assert padded > 0 and entry["padded_fraction"] == pytest.approx(padded / slots, rel=1e-12)
    from tulu.cli import main

    data = config_data(assets, tmp_path / "out")
    assert main(["train", str(write_config(tmp_path / "c.yaml", data)), "--dry-run"]) == 0
    padded, slots = (sum(c) for c in zip(*(padding_count(s) for s in steps), strict=True))
    assert f"; padded fraction {padded / slots:.1%} (first epoch)" in capsys.readouterr().out


def test_padded_fraction_of_a_packed_run(assets: Path, tmp_path: Path, capsys) -> None:
    """Packing: rows of max_seq_length slots, few of them padding."""
    run = recorded_run(
        assets,
        tmp_path / "out",
        "data.batching=packing",
        "optim.max_steps=2",
        "logging.progress=false",
    )
    assert [e["step"] for e in run["entries"]] == [1, 2]
    for entry, step in zip(run["entries"], run["steps"], strict=True):
        padded, slots = padding_count(step)
        assert {mb["input_ids"].shape[1] for mb in step} == {64}
        assert entry["padded_fraction"] == pytest.approx(padded / slots, rel=1e-12)
        assert 0 < entry["padded_fraction"] < 0.5
    assert run["stderr"] == ""  # logging.progress false: nothing printed
    # The dry run's first epoch: every row max_seq_length (64) slots wide.
    from tulu.cli import main

    data = config_data(assets, tmp_path / "out", "data.batching=packing")
    assert main(["train", str(write_config(tmp_path / "c.yaml", data)), "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data plan:"))
    match = re.search(r"\(([\d,]+) tokens, .*\), ([\d,]+) rows .*padded fraction ([\d.]+)%", line)
    assert match, line
    tokens, rows = (int(g.replace(",", "")) for g in match.groups()[:2])
    assert float(match.group(3)) == pytest.approx(100 * (1 - tokens / (rows * 64)), abs=0.05)


# ------------------------------------------------------------------------------ normalisation
def test_loss_normalisations_by_hand(assets: Path, tmp_path: Path) -> None:
    """Two micro-batches with 2 and 9 trained tokens: "paper" averages their means, "unbiased"
    averages all tokens; the gradients are those of the same expressions."""
    config = make_config(assets, tmp_path)
    model = GPTNeoXForCausalLM(build_model_config(config, Tokenizer.load(assets / "tokenizer")))
    model.init_weights(0)
    gen = torch.Generator().manual_seed(0)
    micro_batches = []
    for trained_from in (8, 1):  # labels from this position on: 2 and 9 trained tokens
        ids = torch.randint(2, 600, (1, 10), generator=gen)
        labels = ids.clone()
        labels[:, :trained_from] = -100
        micro_batches.append(
            {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        )
    sums, counts = zip(
        *(model.loss(mb["input_ids"], mb["labels"]) for mb in micro_batches), strict=True
    )
    assert [int(c) for c in counts] == [2, 9]
    expected = {
        "paper": (sums[0] / 2 + sums[1] / 9) / 2,
        "unbiased": (sums[0] + sums[1]) / 11,
    }
    for mode, value in expected.items():
        grads_expected = torch.autograd.grad(value, list(model.parameters()), retain_graph=True)
        model.zero_grad(set_to_none=True)
        stats = backward_step(
            model, micro_batches, World(), normalization=mode, num_micro_batches=2
        )
        assert stats.loss == pytest.approx(float(value.detach()), rel=1e-6)
        assert stats.trained_tokens == 11 and stats.tokens == 20
        for p, g in zip(model.parameters(), grads_expected, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    paper, unbiased = (float(v.detach()) for v in expected.values())
    assert paper != pytest.approx(unbiased, rel=1e-3)


# ------------------------------------------------------------------------------ resume
def test_sigkilled_run_resumes_exactly(assets: Path, tmp_path: Path) -> None:
    """20 steps straight == 10 steps, SIGKILL, resume: the same 20 losses, bit for bit.

    With dropout, so that every step draws from torch's generator: the losses match only if
    the checkpoint's RNG state is restored exactly where the straight run stood."""

    def config_for(out: Path) -> Path:
        data = config_data(
            assets,
            out,
            "model.config.hidden_dropout=0.1",
            "model.config.attention_dropout=0.1",
            "optim.micro_batch_size=2",
            "optim.global_batch_size=4",
            "optim.epochs=4",
            "optim.max_steps=20",
            "optim.warmup_ratio=0.1",
            "optim.max_grad_norm=1.0",
            "checkpoint.every_steps=10",
            "checkpoint.export=false",
            "logging.tensorboard=false",
            "logging.plot=false",
            f"data.validation={assets / 'validation.jsonl'}",
        )
        return write_config(tmp_path / f"{out.name}.yaml", data)

    straight = run_module(str(config_for(tmp_path / "straight")))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "tulu.train", str(config_for(out))]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "step-000010").is_dir() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint at step 10"
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()[-3000:]
    proc.stderr.close()
    # However far it got, make it as if it died right after step 10: its later checkpoints go,
    # its metrics.jsonl may hold steps after 10, and a half-written checkpoint is left over.
    for later in out.glob("step-*"):
        if later.name != "step-000010":
            later.rename(out / f".tmp-{later.name}")
    (out / ".tmp-step-000015" / "state").mkdir(parents=True)

    resumed = run_module(str(config_for(out)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(resumed from {out / 'step-000010'})" in resumed.stderr
    assert not list(out.glob(".tmp-*"))
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000010", "step-000020"]

    saved = json.loads((out / "step-000020" / "model_config.json").read_text())
    assert (saved["hidden_dropout"], saved["attention_dropout"]) == (0.1, 0.1)
    expected = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    got = read_metrics(out / "metrics.jsonl")
    assert [e["step"] for e in got] == [e["step"] for e in expected]  # no duplicates/orphans
    assert len(train_losses(out / "metrics.jsonl")) == 20
    for key in ("loss", "lr", "grad_norm", "val_loss", "tokens", "trained_tokens"):
        assert [e.get(key) for e in got] == [e.get(key) for e in expected], key


def test_adamw_bf16_run_logs_checkpoints_and_resumes(assets: Path, tmp_path: Path) -> None:
    """The shipped 6.9B recipe's optimizer end to end, on a fresh model: model.dtype bfloat16
    makes its parameters bfloat16 (a fresh model used to stay float32, which adamw_bf16
    refuses), and torchao's tensor learning rate reaches metrics.jsonl and trainer.json as a
    number (it used to stop the run at its first log line). A resumed run continues the
    same losses: the scheduler state read back from JSON sets the same rates."""
    overrides = (
        "model.dtype=bfloat16",
        "optim.optimizer=adamw_bf16",
        "optim.max_steps=6",
        "optim.warmup_ratio=0.2",
        "checkpoint.every_steps=3",
        "checkpoint.export=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    )
    out = tmp_path / "run"
    straight = train(make_config(assets, out, *overrides))
    entries = [e for e in read_metrics(straight.metrics_file) if "loss" in e]
    assert [type(e["lr"]) for e in entries] == [float] * 6
    assert len({e["lr"] for e in entries}) > 2  # warmup, then decay
    state = json.loads((out / "step-000003" / "trainer.json").read_text())
    assert all(isinstance(x, float) for x in state["scheduler"]["base_lrs"])
    shutil.rmtree(out / "step-000006")  # as if it had died after step 5
    resumed = train(make_config(assets, out, *overrides))
    assert resumed.resumed_from == out / "step-000003"
    assert [resumed.losses[s] for s in (4, 5, 6)] == [straight.losses[s] for s in (4, 5, 6)]


def test_settings_changed_for_a_resumed_run_apply_and_are_reported(
    assets: Path, tmp_path: Path, capsys
) -> None:
    """A run of 2 steps resumed with a new lr, a longer run and weight decay: the checkpoint
    restored its optimizer's and scheduler's settings over the config's, so the new lr and
    weight decay were silently ignored, and the first resumed step ran at the old schedule's
    last rate (0 for a linear decay that had ended), not at the longer schedule's."""
    base = (
        "optim.max_steps=2",
        "checkpoint.every_steps=2",
        "checkpoint.export=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    )
    first = tmp_path / "first"
    train(make_config(assets, first, *base))
    capsys.readouterr()
    longer = (*base, "optim.max_steps=4", "optim.lr=2e-3")
    runs = {}
    for decay in ("0.0", "0.5"):
        out = tmp_path / f"decay-{decay}"
        shutil.copytree(first, out)
        runs[decay] = train(make_config(assets, out, *longer, f"optim.weight_decay={decay}"))
        assert runs[decay].resumed_from == out / "step-000002"
    lrs = {e["step"]: e["lr"] for e in read_metrics(runs["0.0"].metrics_file) if "loss" in e}
    assert [lrs[s] for s in (3, 4)] == pytest.approx([2e-3 * 2 / 4, 2e-3 * 1 / 4])
    assert runs["0.5"].losses[4] != runs["0.0"].losses[4]  # the weight decay took effect
    err = capsys.readouterr().err
    assert "settings changed since the checkpoint" in err
    assert "optim.lr: 0.01 -> 0.002" in err and "optim.max_steps: 2 -> 4" in err
    assert "optim.weight_decay: 0.0 -> 0.5" in err


def test_a_checkpoint_past_a_lowered_max_steps_is_refused(assets: Path, tmp_path: Path) -> None:
    """Resuming a 3-step checkpoint with max_steps=2 ran no step and exported the 3-step model
    as if it were the 2-step run's result."""
    base = ("checkpoint.every_steps=3", "logging.tensorboard=false", "logging.plot=false")
    out = tmp_path / "run"
    train(make_config(assets, out, *base, "optim.max_steps=3", "checkpoint.export=false"))
    with pytest.raises(CheckpointError, match=r"step-000003: the checkpoint is at step 3, past"):
        train(make_config(assets, out, *base, "optim.max_steps=2"))
    assert not (out / "final").exists()


#: A run of 20-example steps checkpointing every step, with nothing else written.
ONE_STEP_CHECKPOINTS = (
    "optim.global_batch_size=20",
    "checkpoint.every_steps=1",
    "checkpoint.export=false",
    "logging.tensorboard=false",
    "logging.plot=false",
)


@pytest.mark.parametrize(
    "changed",
    [
        ("optim.global_batch_size=16",),  # 12 micro-batches: 3 steps per epoch with 5 or 4
        ("seed=4",),  # another order of the same examples
        ("data.padding_order=sorted",),
    ],
)
def test_resuming_into_another_data_plan_is_refused(
    assets: Path, tmp_path: Path, changed: tuple[str, ...]
) -> None:
    """Only the steps per epoch were compared: a checkpoint after step 1 of 3 (micro-batches
    0-4) resumed with global_batch_size 16, which also gives 3 steps per epoch, trained
    micro-batch 4 again in step 2 (4-7); a new seed or padding order re-shuffled the rest of
    the epoch, training some examples twice and others never, all silently."""
    base = ONE_STEP_CHECKPOINTS
    out = tmp_path / "run"
    train(make_config(assets, out, *base, "optim.max_steps=1"))
    with pytest.raises(CheckpointError, match=r"step-000001: .*different data plan"):
        train(make_config(assets, out, *base, "optim.max_steps=2", *changed))
    assert not (out / "step-000002").exists()
    # A different micro-batch size gives the same steps with padding in random order: allowed.
    result = train(make_config(assets, out, *base, "optim.max_steps=2", "optim.micro_batch_size=2"))
    assert result.resumed_from == out / "step-000001" and result.final_step == 2


def test_resuming_on_an_edited_training_file_is_refused(assets: Path, tmp_path: Path) -> None:
    """The data plan holds example numbers: a file rewritten with as many records (regenerated
    data) kept it, and the run went on from the saved position over other examples."""
    mine = tmp_path / "assets"
    shutil.copytree(assets, mine, ignore=shutil.ignore_patterns("cache"))
    base = ONE_STEP_CHECKPOINTS
    out = tmp_path / "run"
    train(make_config(mine, out, *base, "optim.max_steps=1"))
    original = (mine / "train.jsonl").read_bytes()
    write_jsonl(mine / "train.jsonl", records(TRAIN_EXAMPLES, 500))
    with pytest.raises(CheckpointError, match=r"step-000001: data.train .*train.jsonl changed"):
        train(make_config(mine, out, *base, "optim.max_steps=2"))
    assert not (out / "step-000002").exists()
    (mine / "train.jsonl").write_bytes(original)  # the same contents again: allowed
    result = train(make_config(mine, out, *base, "optim.max_steps=2"))
    assert result.resumed_from == out / "step-000001" and result.final_step == 2


def test_resuming_on_an_edited_validation_file_says_so(
    assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training goes on (its data did not change), but the validation curve now mixes two
    data sets: the run says so rather than plotting them as one."""
    mine = tmp_path / "assets"
    shutil.copytree(assets, mine, ignore=shutil.ignore_patterns("cache"))
    base = [*ONE_STEP_CHECKPOINTS, f"data.validation={mine / 'validation.jsonl'}"]
    out = tmp_path / "run"
    train(make_config(mine, out, *base, "optim.max_steps=1"))
    capsys.readouterr()
    write_jsonl(mine / "validation.jsonl", records(6, 2000))
    result = train(make_config(mine, out, *base, "optim.max_steps=2"))
    assert result.resumed_from == out / "step-000001" and result.final_step == 2
    err = capsys.readouterr().err
    assert "data.validation" in err and "validation.jsonl changed since the checkpoint" in err
    assert "from step 1 on are not comparable" in err


# ------------------------------------------------------------------------------ divergence
def test_nan_loss_stops_at_the_step_and_keeps_the_last_checkpoint(
    assets: Path, tmp_path: Path
) -> None:
    config = make_config(
        assets,
        tmp_path,
        "optim.lr=1e30",
        "optim.max_steps=4",
        "checkpoint.every_steps=1",
        "logging.tensorboard=false",
    )
    with pytest.raises(TuluError, match=r"step 2: the loss is (nan|inf)") as info:
        train(config)
    assert "step-000001" in str(info.value)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000001"]
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "final").exists()
    assert list(train_losses(tmp_path / "metrics.jsonl")) == [1]


# ------------------------------------------------------------------------------ LoRA
def test_lora_run_exports_adapter_and_merged_model(assets: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from tulu.train.lora import load_adapter

    config = make_config(
        assets,
        tmp_path,
        "lora.enabled=true",
        "lora.r=4",
        "optim.max_steps=3",
        "checkpoint.every_steps=3",
        "logging.tensorboard=false",
        "logging.plot=false",
    )
    result = train(config)
    assert result.adapter_dir == tmp_path / "final-adapter"
    assert (result.adapter_dir / "adapter_config.json").is_file()
    base = GPTNeoXForCausalLM(build_model_config(config, Tokenizer.load(assets / "tokenizer")))
    base.init_weights(config.model.init_seed)
    adapted = load_adapter(base, result.adapter_dir).eval()
    merged = load_model(result.export_dir, dtype=torch.float32)
    ids = torch.randint(2, 600, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), rtol=1e-4, atol=1e-5)
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(ids), merged(ids), atol=1e-4)  # it trained
    # The step checkpoint (base + adapters in DCP shards) exports merged, as the final model.
    from tulu.train.export import export_checkpoint

    export_checkpoint(tmp_path / "step-000003", tmp_path / "from-step", merge_lora=False)
    with torch.no_grad():
        from_step = load_model(tmp_path / "from-step", dtype=torch.float32)(ids)
        torch.testing.assert_close(from_step, merged(ids), rtol=0, atol=0)


def test_lora_run_from_a_hub_revision_records_it_in_the_adapter(
    assets: Path, tmp_path: Path, monkeypatch
) -> None:
    """A LoRA run on ``model.path`` = a hub id at ``model.revision`` writes PEFT's
    ``revision`` beside ``base_model_name_or_path``: without it the adapter named the hub id
    alone, and its base was fetched (and merged) at ``main``, a different model."""
    pytest.importorskip("peft")
    from tulu.model.checkpoint import save_model
    from tulu.train.lora import adapter_base

    config = build_model_config(make_config(assets, tmp_path), Tokenizer.load(assets / "tokenizer"))
    remote = save_model(GPTNeoXForCausalLM(config), tmp_path / "remote-step3")
    fetched: list[tuple[str, str | None]] = []

    def snapshot(repo_id, *, revision, allow_patterns, error):
        fetched.append((repo_id, revision))
        return remote

    monkeypatch.setattr("tulu.model.checkpoint.snapshot", snapshot)
    data = config_data(
        assets, tmp_path / "out", "lora.enabled=true", "lora.r=4", "optim.max_steps=1"
    )
    data["model"].pop("config")
    data["model"].update(path="org/base", revision="step3")
    data["logging"].update(tensorboard=False, plot=False)
    result = train(parse_train_config(data))
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("org/base", "step3")
    assert set(fetched) == {("org/base", "step3")}
    assert adapter_base(result.adapter_dir) == remote


# ------------------------------------------------------------------------------ command line
def test_dry_run_prints_plan_and_memory(assets: Path, tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path / "c.yaml", config_data(assets, tmp_path / "out"))
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", str(path), "optim.epochs=3", "--dry-run"])
    assert cmd_train(args) == 0
    out = capsys.readouterr().out
    assert f"data plan: {TRAIN_EXAMPLES} examples" in out
    assert "6 steps per epoch, 18 steps in total" in out
    assert "per-device memory (GiB)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("adamw ")]
    assert sorted({int(r[1]) for r in rows}) == [1, 8]
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_dry_run_for_16_processes(
    assets: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``WORLD_SIZE=16 tulu train C --dry-run`` (as under torchrun): the accumulation over 16
    processes, and memory rows for 16 devices whose shards are 1/16 of the model (Pythia-1B
    in float32 master weights: 4 bytes a parameter, Adam's 2 moments 8), next to 1 and 8."""
    from tulu.cli import main
    from tulu.model.config import preset

    monkeypatch.setenv("WORLD_SIZE", "16")
    data = config_data(assets, tmp_path / "out", "model.preset=pythia-1b")
    data["model"].pop("config")
    path = write_config(tmp_path / "c.yaml", data)
    assert main(["train", str(path), "optim.global_batch_size=128", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "global batch 128 rows = micro batch 4 x accumulation 2 x 16 process(es)" in out
    rows = {
        (r[0], int(r[1])): r
        for r in (line.split() for line in out.splitlines())
        if r and r[0].startswith("adamw") and r[1].isdigit()
    }
    assert sorted(rows) == [
        (o, n) for o in ("adamw", "adamw_8bit", "adamw_bf16") for n in (1, 8, 16)
    ]
    gib = preset("pythia-1b").num_parameters() / 16 / 2**30
    master, params, grads, states = rows[("adamw", 16)][2:6]
    assert master == "fp32"
    assert float(params) == pytest.approx(4 * gib, abs=0.01)
    assert float(grads) == pytest.approx(4 * gib, abs=0.01)
    assert float(states) == pytest.approx(8 * gib, abs=0.01)
    assert float(rows[("adamw", 8)][3]) == pytest.approx(8 * gib, abs=0.01)  # 1/8 each
    # 128 rows do not divide over 16 processes of micro-batches of 16: refused.
    tiny = write_config(tmp_path / "tiny.yaml", config_data(assets, tmp_path / "out"))
    overrides = ["optim.global_batch_size=128", "optim.micro_batch_size=16"]
    assert main(["train", str(tiny), *overrides, "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert "micro batch 16 x accumulation (does not divide!) x 16 process(es)" in out
    assert "global_batch_size: 128 is not a multiple of micro_batch_size x processes = 256" in err


@pytest.mark.parametrize(
    "order", [["optim.epochs=3", "--dry-run"], ["--dry-run", "optim.epochs=3"]]
)
def test_overrides_before_or_after_dry_run(assets: Path, tmp_path: Path, capsys, order) -> None:
    from tulu.cli import main
    from tulu.train.cli import main as module_main  # python -m tulu.train

    path = write_config(tmp_path / "c.yaml", config_data(assets, tmp_path / "out"))
    assert main(["train", str(path), *order]) == 0
    assert "18 steps in total" in capsys.readouterr().out
    assert module_main([str(path), *order]) == 0
    assert "18 steps in total" in capsys.readouterr().out


def test_misspelt_key_is_one_line_and_exit_code_1(assets: Path, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", config_data(assets, tmp_path / "out"))
    proc = run_module(str(path), "optim.lrr=1e-5")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tulu train: error:")
    assert "optim.lrr: unknown setting" in lines[0]


def test_max_seq_length_beyond_the_models_context(assets: Path, tmp_path: Path, capsys) -> None:
    """Rotary positions have no table to overflow: without a check, examples longer than
    the model's context trained silently at positions it never saw."""
    config = make_config(assets, tmp_path / "out", "data.max_seq_length=65")
    message = r"data\.max_seq_length: 65 is longer than the model's context \(max_position_emb"
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    path = write_config(tmp_path / "c.yaml", config_data(assets, tmp_path / "out"))
    from tulu.cli import main

    assert main(["train", str(path), "data.max_seq_length=65", "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert "error: data.max_seq_length: 65 is longer" in out
    assert "dry run found 1 problem(s)" in err and "data.max_seq_length: 65" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("checkpoint.output_dir={blocker}/out", r"checkpoint\.output_dir: .*is not a directory"),
        ("data.train={tmp}/missing.jsonl", r"data\.train: .*missing\.jsonl is not a file"),
        ("data.validation={tmp}/missing.jsonl", r"data\.validation: .*missing\.jsonl is not a"),
        # a validation file the run refuses before its first step passed the dry run
        ("data.validation={blocker}", r"data\.validation: .*a-file:1: "),
        ("checkpoint.resume={tmp}/nowhere", r"checkpoint\.resume: .*nowhere: no such checkpoint"),
    ],
)
def test_dry_run_exits_1_when_the_run_would_fail(
    assets: Path, tmp_path: Path, capsys, override: str, expected: str
) -> None:
    """The dry run answers "would this run?": a problem that stops the real run makes it exit
    1 (it printed an error line and exited 0, so `--dry-run && torchrun ...` went ahead)."""
    from tulu.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    path = write_config(tmp_path / "c.yaml", config_data(assets, tmp_path / "out"))
    setting = override.format(blocker=blocker, tmp=tmp_path)
    assert main(["train", str(path), setting, "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert "per-device memory (GiB)" in out  # the rest of the report is still printed
    assert re.search(expected, err), err
    assert blocker.read_text() == "x" and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.config.hidden_size=33", r"hidden_size 33 is not divisible by num_attention_heads"),
        ("model.config.hiden=3", r"model\.config\.hiden: unknown model setting"),
    ],
)
def test_dry_run_exits_1_on_an_invalid_model_config(
    assets: Path, tmp_path: Path, capsys, override: str, expected: str
) -> None:
    """A model config the real run refuses was printed as "config from <error>" by a dry run
    that exited 0."""
    from tulu.cli import main

    path = write_config(tmp_path / "c.yaml", config_data(assets, tmp_path / "out"))
    assert main(["train", str(path), override, "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert re.search(r"model: fresh .*; error: .*" + expected, out), out
    assert "dry run found 1 problem(s)" in err and re.search(expected, err), err
    with pytest.raises(ConfigError, match=expected):
        train(make_config(assets, tmp_path / "out", override))


def test_dry_run_exits_1_on_a_revision_with_a_local_model_path(
    assets: Path, tmp_path: Path, capsys
) -> None:
    """The real run refuses ``model.revision`` with a local ``model.path`` (it could not
    apply); the dry run read the directory's config.json and exited 0."""
    from tulu.cli import main
    from tulu.model.checkpoint import save_model

    config = build_model_config(make_config(assets, tmp_path), Tokenizer.load(assets / "tokenizer"))
    local = save_model(GPTNeoXForCausalLM(config), tmp_path / "local")
    data = config_data(assets, tmp_path / "out")
    data["model"].pop("config")
    data["model"].update(path=str(local), revision="v1")
    path = write_config(tmp_path / "c.yaml", data)
    expected = f"{local}: revision 'v1' applies to hub ids only"
    assert main(["train", str(path), "--dry-run"]) == 1
    out, err = capsys.readouterr()
    assert f"model: {local}; error: {expected}" in out
    assert "dry run found 1 problem(s)" in err and expected in err
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        train(parse_train_config(data))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("path", "{tmp}/runs/typo/final", r"typo/final: no such checkpoint directory"),
        ("path", "{tmp}", r": config\.json not found \(is this a checkpoint directory\?\)"),
        ("tokenizer", "{tmp}/tokenizers/typo", r"tokenizers/typo: no such tokenizer"),
    ],
)
def test_dry_run_exits_1_on_a_local_model_or_tokenizer_path_the_run_refuses(
    assets: Path, tmp_path: Path, capsys, key: str, value: str, expected: str
) -> None:
    """A mistyped local ``model.path`` / ``model.tokenizer`` (not a hub id: nothing to
    download) or a directory without config.json stops the real run at once; the dry run
    printed "neither local nor cached" or "tokenizer not on disk" and exited 0."""
    from tulu.cli import main

    data = config_data(assets, tmp_path / "out")
    data["model"][key] = value.format(tmp=tmp_path)
    if key == "path":
        data["model"].pop("config")
    path = write_config(tmp_path / "c.yaml", data)
    assert main(["train", str(path), "--dry-run"]) == 1
    _, err = capsys.readouterr()
    assert "dry run found 1 problem(s)" in err and re.search(expected, err), err
    with pytest.raises(TuluError, match=expected):
        train(parse_train_config(data))


def test_model_path_that_the_export_would_replace_is_refused(
    assets: Path, tmp_path: Path, capsys
) -> None:
    """Fine-tuning ``OUT/final`` with ``checkpoint.output_dir: OUT`` replaced the base model
    with the export at the end; with LoRA, final-adapter then named the merged model as its
    base, so loading the adapter applied it twice."""
    from tulu.cli import main
    from tulu.model.checkpoint import save_model

    config = build_model_config(make_config(assets, tmp_path), Tokenizer.load(assets / "tokenizer"))
    base = save_model(GPTNeoXForCausalLM(config), tmp_path / "out" / "final")
    before = (base / "model.safetensors").read_bytes()
    data = config_data(assets, tmp_path / "out", "lora.enabled=true", "optim.max_steps=1")
    data["model"].pop("config")
    data["model"]["path"] = str(tmp_path / "out" / "." / "final")
    expected = r"model\.path: .*final is .*final, which this run's export replaces at the end"
    with pytest.raises(ConfigError, match=expected):
        train(parse_train_config(data))
    path = write_config(tmp_path / "c.yaml", data)
    assert main(["train", str(path), "--dry-run"]) == 1
    assert re.search(expected, capsys.readouterr().err)
    assert (base / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["final"]
    data["checkpoint"]["export"] = False  # nothing is replaced: allowed
    train(parse_train_config(data))


@pytest.mark.parametrize("key", ["train", "validation"])
def test_a_missing_data_file_stops_the_run_before_the_model_is_built(
    assets: Path, tmp_path: Path, monkeypatch, key: str
) -> None:
    """Building a 6.9B model takes minutes: a missing file is reported before it starts."""
    import tulu.train.trainer as trainer

    def not_yet(*_args, **_kwargs):
        raise AssertionError("the model was built before the data files were checked")

    monkeypatch.setattr(trainer, "model_for_training", not_yet)
    missing = tmp_path / "missing.jsonl"
    config = make_config(assets, tmp_path / "out", f"data.{key}={missing}")
    with pytest.raises(ConfigError, match=rf"data\.{key}: {missing}: cannot open \(No such file"):
        train(config)


def test_an_unwritable_output_dir_stops_the_run_before_the_model_is_built(
    assets: Path, tmp_path: Path, monkeypatch
) -> None:
    """A mistyped or read-only checkpoint.output_dir surfaced at the first metrics line,
    after the model was built (minutes for 6.9B); now it is the first thing reported."""
    import tulu.train.trainer as trainer

    def not_yet(*_args, **_kwargs):
        raise AssertionError("the model was built before the output directory was checked")

    monkeypatch.setattr(trainer, "model_for_training", not_yet)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = make_config(assets, blocker / "out")
    with pytest.raises(ConfigError, match=r"checkpoint\.output_dir: .*a-file/out: cannot write"):
        train(config)
    assert blocker.read_text() == "not a directory"  # nothing lost


def test_the_output_dir_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    from tulu.train.trainer import check_output_dir

    check_output_dir(tmp_path / "new" / "out", rank=3)
    assert (tmp_path / "new" / "out").is_dir()
    assert list((tmp_path / "new" / "out").iterdir()) == []


# ------------------------------------------------------------------------------ 2 processes
@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["paper", "unbiased"])
def test_two_processes_train_like_one(assets: Path, tmp_path: Path, normalization: str) -> None:
    """torchrun --nproc-per-node 2 (FSDP2 over gloo) vs one process, same global batches:
    4 micro-batches of 2 rows a step; 45 examples make 23 micro-batches an epoch (the last
    of 1 row), so each epoch's last step has 3 and rank 1 runs a filler."""
    overrides = (
        f"optim.loss_normalization={normalization}",
        "optim.micro_batch_size=2",
        "optim.global_batch_size=8",
        "optim.epochs=2",
        "optim.lr=3e-3",
        "optim.max_grad_norm=1.0",
        "checkpoint.every_steps=6",
        "logging.tensorboard=false",
        "logging.plot=false",
    )
    data = config_data(assets, tmp_path / "two", *overrides)
    path = write_config(tmp_path / "two.yaml", data)
    proc = torchrun("-m", "tulu.train", str(path), tmp=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    one = train(make_config(assets, tmp_path / "one", *overrides))
    two = train_losses(tmp_path / "two" / "metrics.jsonl")
    assert one.total_steps == 12 and sorted(two) == list(range(1, 13))
    for step, loss in one.losses.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    # The same rows each step: the same counts, fillers (rank 1, last step of an epoch) excluded.
    counted = ("tokens", "trained_tokens", "padded_fraction")
    logged = [
        {e["step"]: tuple(e[k] for k in counted) for e in read_metrics(path) if "loss" in e}
        for path in (one.metrics_file, tmp_path / "two" / "metrics.jsonl")
    ]
    assert logged[1] == logged[0]
    state = json.loads((tmp_path / "two" / "step-000012" / "trainer.json").read_text())
    assert state["world_size"] == 2
    a = load_model(tmp_path / "one" / "final", dtype=torch.float32).state_dict()
    b = load_model(tmp_path / "two" / "final", dtype=torch.float32).state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    # The 2-rank sharded checkpoint exports in one process as the run's own final export.
    from tulu.train.export import export_checkpoint

    export_checkpoint(tmp_path / "two" / "step-000012", tmp_path / "export", merge_lora=False)
    c = load_model(tmp_path / "export", dtype=torch.float32).state_dict()
    for name in b:
        torch.testing.assert_close(c[name], b[name], rtol=0, atol=0)
