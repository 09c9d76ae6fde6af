"""Training metrics (tulu.train.metrics): the MFU formula, the peak table, metrics.jsonl
consistency on resume, TensorBoard events and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tulu.errors import CheckpointError
from tulu.model.config import NeoXConfig, preset
from tulu.train.config import LoggingConfig
from tulu.train.metrics import (
    MetricsLogger,
    Throughput,
    micro_batch_flops,
    non_embedding_parameters,
    peak_flops,
    plot_metrics,
    read_metrics,
)


def test_flops_by_hand() -> None:
    config = NeoXConfig(
        vocab_size=100,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=32,
        tie_word_embeddings=False,
    )
    h, i = 8, 32  # vocabulary 100: its embeddings are not counted
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    params = 2 * per_layer + 2 * h  # layers and final norm; neither embed_in nor the LM head
    assert non_embedding_parameters(config) == params
    rows, seq = 3, 10
    assert micro_batch_flops(config, rows, seq) == rows * seq * (6 * params + 12 * 2 * h * seq)


def test_pythia_6_9b_flops_per_token() -> None:
    """Issue 7's definition: (6 x non-embedding parameters + attention FLOPs) per token. Its
    reference, transformers at 10,459 tokens/s on an H100, is then the 44% it quotes."""
    config = preset("pythia-6.9b")
    per_token = micro_batch_flops(config, 1, 2048) / 2048
    assert non_embedding_parameters(config) == 6_444_163_072  # Pythia's published count
    assert per_token == 6 * 6_444_163_072 + 12 * 32 * 4096 * 2048
    assert round(10_459 * per_token / 989e12, 2) == 0.44


def test_peak_flops() -> None:
    assert peak_flops(LoggingConfig(peak_tflops=100), torch.device("cpu")) == 1e14
    assert peak_flops(LoggingConfig(), torch.device("cpu")) is None


def test_known_gpu_names(monkeypatch: pytest.MonkeyPatch) -> None:
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "Tesla T4": None,
    }
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(LoggingConfig(), torch.device("cuda", 0)) == peak


def test_throughput_rates() -> None:
    meter = Throughput(peak_per_device=1e12, world_size=2)
    meter.add(tokens=1000, flops=1e12, seconds=0.5)
    meter.add(tokens=1000, flops=1e12, seconds=0.5)
    tokens_per_s, mfu = meter.rates()
    assert tokens_per_s == pytest.approx(2000) and mfu == pytest.approx(1.0)
    assert meter.tokens == 0
    assert Throughput(None, 1).rates()[1] is None


def entry(step: int, loss: float) -> dict:
    return {"step": step, "epoch": step / 10, "loss": loss, "lr": 1e-3 * step, "grad_norm": 1.0}


def test_resume_rewrites_the_file_up_to_the_resumed_step(tmp_path: Path) -> None:
    config = LoggingConfig(tensorboard=False, progress=False)
    logger = MetricsLogger(tmp_path, config, enabled=True, total_steps=6)
    for step in range(1, 6):
        logger.log_step(entry(step, 5.0 - step))
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss"')  # torn by a kill
    with (tmp_path / "metrics.jsonl").open("ab") as f:
        f.write(b"\n\x97\xff\n")  # not UTF-8: a UnicodeDecodeError stopped the resume
    history = read_metrics(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5]
    resumed = MetricsLogger(
        tmp_path, config, enabled=True, total_steps=6, start_step=3, history=history
    )
    resumed.log_step(entry(4, 0.5))
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(lines[-1])["loss"] == 0.5


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "out", LoggingConfig(), enabled=False, total_steps=3)
    logger.log_step(entry(1, 1.0))
    logger.log_validation({"step": 1, "val_loss": 1.0})
    logger.close()
    assert logger.plot() is None and not (tmp_path / "out").exists()


def test_tensorboard_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, LoggingConfig(progress=False), enabled=True, total_steps=4)
    for step in range(1, 5):
        logger.log_step(entry(step, 4.0 - step))
    logger.log_validation({"step": 4, "epoch": 0.4, "val_loss": 1.5})
    plot = logger.plot()
    logger.close()
    assert plot == tmp_path / "loss.png" and plot.read_bytes()[:4] == b"\x89PNG"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [s.value for s in events.Scalars("train/loss")] == [3.0, 2.0, 1.0, 0.0]
    assert [s.step for s in events.Scalars("validation/loss")] == [4]


def test_plot_without_training_entries(tmp_path: Path) -> None:
    assert plot_metrics([{"step": 1, "val_loss": 2.0}], tmp_path / "x.png") is None


def test_unwritable_output_is_a_clear_error(tmp_path: Path) -> None:
    """An output directory that cannot be written (here a file stands in its way: the tests
    may run as root, which ignores permissions) names the path and the setting, no traceback
    of OSError."""
    config = LoggingConfig(tensorboard=False, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=r"file/out: cannot write the metrics .*output_dir"):
        MetricsLogger(blocker / "out", config, enabled=True, total_steps=2)

    (tmp_path / "run" / "loss.png").mkdir(parents=True)
    logger = MetricsLogger(tmp_path / "run", config, enabled=True, total_steps=2)
    logger.log_step(entry(1, 1.0))
    with pytest.raises(CheckpointError, match=r"loss\.png: cannot write the loss plot"):
        logger.plot()
    logger.close()
    assert [e["step"] for e in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a full disk)")
def test_a_full_disk_while_logging_is_a_clear_error(tmp_path: Path) -> None:
    config = LoggingConfig(tensorboard=False, progress=False)
    logger = MetricsLogger(tmp_path, config, enabled=True, total_steps=2)
    logger._file.close()
    logger._file = open("/dev/full", "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
    with pytest.raises(
        CheckpointError, match=r"metrics\.jsonl: cannot write the metrics of step 1"
    ):
        logger.log_step(entry(1, 1.0))
    logger.close()  # does not raise again: the failure was reported


def strict_json(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_a_nan_validation_loss_is_written_as_null(tmp_path: Path) -> None:
    """A validation loss over no trained tokens is NaN; Python wrote it as a bare NaN, which
    jq, JavaScript and most JSON readers refuse (the whole file, not just the line)."""
    config = LoggingConfig(tensorboard=False, progress=False)
    logger = MetricsLogger(tmp_path, config, enabled=True, total_steps=4)
    logger.log_step(entry(1, 2.0))
    logger.log_validation({"step": 1, "val_loss": float("nan"), "val_tokens": 0})
    logger.log_step(entry(2, float("inf")))
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    parsed = [strict_json(line) for line in lines]
    assert parsed[1] == {"step": 1, "val_loss": None, "val_tokens": 0}
    assert parsed[2]["loss"] is None and parsed[2]["lr"] == 2e-3
    history = read_metrics(tmp_path / "metrics.jsonl")
    resumed = MetricsLogger(
        tmp_path, config, enabled=True, total_steps=4, start_step=2, history=history
    )  # rewrites the file from the history it read back
    resumed.log_validation({"step": 2, "val_loss": 1.5, "val_tokens": 9})
    assert resumed.plot() == tmp_path / "loss.png"  # the null loss is left out of the plot
    resumed.close()
    rewritten = [
        strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().split("\n")[:-1]
    ]
    assert [e.get("val_loss", "-") for e in rewritten] == ["-", None, "-", 1.5]


def test_progress_lines_without_a_terminal_and_their_eta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """stderr not a terminal: one plain line per logged step, with the ETA = time so far /
    steps done this run x steps left, as h:mm:ss (a resumed run counts from its first step)."""
    import types

    now = [1000.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr("tulu.train.metrics.time", clock)
    config = LoggingConfig(tensorboard=False, progress=True)
    logger = MetricsLogger(tmp_path, config, enabled=True, total_steps=100, start_step=10)
    now[0] += 200.0  # 2 steps in 200 s: 100 s a step, 88 steps left
    logger.log_step({**entry(12, 1.5), "tokens_per_s": 8123.4, "mfu": 0.41})
    now[0] += 1.0  # 3 steps in 201 s, 87 left: 5,829 s
    logger.log_step({**entry(13, 1.25), "tokens_per_s": None, "mfu": None})
    now[0] += 1.0e6
    logger.log_step(entry(100, 1.0))
    logger.close()
    assert capsys.readouterr().err.splitlines() == [
        "step 12/100  loss 1.5000  lr 1.20e-02  8,123 tok/s  MFU 41.0%  ETA 2:26:40",
        "step 13/100  loss 1.2500  lr 1.30e-02  ETA 1:37:09",
        "step 100/100  loss 1.0000  lr 1.00e-01  ETA 0:00:00",
    ]
