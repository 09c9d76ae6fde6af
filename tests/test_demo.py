"""`tulu demo` (what `make demo` runs), end to end at a reduced size: one epoch of training and
one example per benchmark task, so that the README's first command cannot silently rot.

The reduced run still goes through every real command (convert, mix, train, eval, serve in a
child process, a streamed chat request); the tests check what each step left behind and that
the served answer is the model's own greedy answer.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from tulu.cli import main
from tulu.demo import corpus_text
from tulu.demo.pipeline import OUTPUTS, DemoError, prepare_output, run_demo
from tulu.engine.reference import generate_text
from tulu.engine.sampling import SamplingParams
from tulu.eval.runner import PAPER_SUITE
from tulu.model.checkpoint import load_model
from tulu.pretrained import load_pretrained
from tulu.tokenizer import Tokenizer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-demo.yaml"
REDUCED = ["optim.epochs=1", "checkpoint.every_steps=4"]
SOURCES = ["flan_v2", "cot", "dolly", "oasst1", "gpt4_alpaca", "code_alpaca", "sharegpt"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    output = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("tulu.demo.pipeline._say", lambda message="": lines.append(message))
    try:
        summary = run_demo(
            output, CONFIG, train_overrides=REDUCED, max_examples=1, codex_samples=10
        )
    finally:
        capture.undo()
    return output, summary, "\n".join(lines)


def test_every_artefact_is_under_the_output_directory(demo) -> None:
    output, summary, printed = demo
    assert summary["output"] == str(output)
    for label, path in summary["artefacts"].items():
        assert Path(path).exists(), label
        assert Path(path).is_relative_to(output), label
        assert str(path) in printed  # named at the end
    assert sorted(p.name for p in output.iterdir()) == sorted(OUTPUTS)
    assert json.loads((output / "demo.json").read_text(encoding="utf-8")) == summary
    assert (output / "train" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "data" / "mix.lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_step_converts_seven_sources_and_mixes_them(demo) -> None:
    output, _, printed = demo
    for source in SOURCES:
        converted = output / "data" / "sources" / f"{source}.jsonl"
        records = [json.loads(line) for line in converted.read_text().splitlines()]
        assert records and all(r["messages"] for r in records), source
        assert f"tulu data convert --source {source}" in printed
    stats = json.loads((output / "data" / "mix.stats.json").read_text())
    train = (output / "data" / "mix.jsonl").read_text().splitlines()
    validation = (output / "data" / "mix.validation.jsonl").read_text().splitlines()
    assert stats["train"] == str(output / "data" / "mix.jsonl")
    assert len(train) > 100 and len(validation) > 5
    datasets = {json.loads(line)["dataset"] for line in train}
    assert datasets == set(SOURCES)


def test_training_loss_falls_and_the_model_is_exported(demo) -> None:
    output, _, printed = demo
    rows = [
        json.loads(line) for line in (output / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == rows[-1]["step"] >= 5
    assert losses[-1] < losses[0] - 0.5
    assert "loss: step 1:" in printed
    assert any("val_loss" in r for r in rows)
    assert "validation loss: step " in printed
    assert "tulu train " + str(CONFIG) in printed


def test_the_suggested_dry_run_works_as_printed(demo, capsys) -> None:
    """The closing line's `tulu train ... --dry-run` names this demo's files: the config's
    own paths are the default output's (runs/demo/...), not this one's."""
    output, _, printed = demo
    [command] = [
        part.strip() for part in printed.splitlines()[-1].split("|") if "--dry-run" in part
    ]
    argv = shlex.split(command)
    assert argv[:3] == ["tulu", "train", str(CONFIG)]
    assert f"data.train={output / 'data' / 'mix.jsonl'}" in argv
    assert all(override in argv for override in REDUCED)
    assert main(argv[1:]) == 0
    assert "data plan: " in capsys.readouterr().out


def test_eval_table_has_every_task_but_the_judged_one(demo) -> None:
    output, summary, _ = demo
    expected = [task for task in PAPER_SUITE if task != "alpaca_farm"]
    assert list(summary["scores"]) == expected
    assert all(0 <= value <= 100 for value in summary["scores"].values())
    table = (output / "eval" / "results.md").read_text(encoding="utf-8")
    header = table.splitlines()[0]
    for task in expected:
        assert PAPER_SUITE[task] in header
    results = json.loads((output / "eval" / "results.json").read_text(encoding="utf-8"))
    assert results["model"] == str(output / "train" / "final")
    mmlu = next(r for r in results["results"] if r["task"] == "mmlu_0shot")
    assert mmlu["details"]["questions"] == 57  # one per subject


def test_served_answer_is_the_models_greedy_answer(demo) -> None:
    output, summary, printed = demo
    chat = json.loads((output / "chat.json").read_text(encoding="utf-8"))
    question = chat["request"]["messages"][0]["content"]
    assert chat["prompt"].startswith("<|user|>\n" + question.strip())
    assert chat["prompt"].endswith("\n<|assistant|>\n")
    assert chat["server_exit_code"] == 0
    assert chat["finish_reason"] in ("stop", "length")
    loaded = load_pretrained(output / "train" / "final", device="cpu", dtype="float32")
    messages = [{"role": "user", "content": question}]
    local = generate_text(
        loaded.model, loaded.tokenizer, messages, SamplingParams(max_tokens=64, temperature=0)
    )
    assert chat["answer"] == local.text == summary["answer"]
    assert loaded.tokenizer.decode(local.prompt_token_ids) == chat["prompt"]
    log = (output / "server.log").read_text(encoding="utf-8")
    assert "serving 'tulu-demo'" in log
    assert "stopped (exit code 0)" in printed


def test_demo_checkpoint_loads_in_transformers(demo) -> None:
    transformers = pytest.importorskip("transformers")
    checkpoint = demo[0] / "train" / "final"
    ours = load_model(checkpoint, dtype="float32")
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(
        checkpoint, attn_implementation="eager"
    ).eval()
    tokenizer = Tokenizer.from_dir(checkpoint)
    ids = torch.tensor([tokenizer.encode("<|user|>\nHi\n<|assistant|>\n" + corpus_text()[:300])])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    text = "<|user|>\ncafé ☕\n<|assistant|>\n"
    assert hf_tokenizer.encode(text) == tokenizer.encode(text)


def test_prepare_output_clears_an_earlier_demo_but_nothing_else(tmp_path: Path) -> None:
    earlier = tmp_path / "demo"
    (earlier / "train").mkdir(parents=True)
    (earlier / "train" / "x.bin").write_bytes(b"1")
    (earlier / "demo.json").write_text("{}")
    prepare_output(earlier)
    assert list(earlier.iterdir()) == []

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DemoError, match="thesis.tex"):
        prepare_output(foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_demo_command_errors_are_one_line(tmp_path: Path, capsys) -> None:
    code = main(["demo", "--output", str(tmp_path / "d"), "--config", str(tmp_path / "no.yaml")])
    assert code == 1
    err = capsys.readouterr().err
    assert "no.yaml not found" in err and "Traceback" not in err
    for flag, value in (("--max-examples", "0"), ("--codex-samples", "5")):
        argv = ["demo", "--output", str(tmp_path / "d"), "--config", str(CONFIG), flag, value]
        assert main(argv) == 1
        assert f"{flag} must be at least" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything was written
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--output", str(tmp_path / "file"), "--config", str(CONFIG)]) == 1
    assert "is not a directory" in capsys.readouterr().err
    # a dangling link and an unwritable place were FileExistsError / OSError tracebacks
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for output, message in (("link", "is not a directory"), ("file/sub", "cannot create it")):
        assert main(["demo", "--output", str(tmp_path / output), "--config", str(CONFIG)]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
