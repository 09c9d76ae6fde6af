"""Tests for `tulu demo` (tulu.demo.run_demo): what it writes, and that its checkpoint is a real
Hugging Face checkpoint (transformers loads it and computes the same logits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tulu.cli import main
from tulu.demo import corpus_text, run_demo
from tulu.engine.reference import generate_text
from tulu.engine.sampling import SamplingParams
from tulu.model.checkpoint import load_model
from tulu.model.config import NeoXConfig
from tulu.pretrained import load_pretrained
from tulu.tokenizer import Tokenizer

EOT = "<|endoftext|>"
PROMPT = "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only adds synchronisation
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("demo")
    return output, run_demo(output)


def test_run_demo_writes_checkpoint_and_summary(demo) -> None:
    output, summary = demo
    checkpoint = output / "model"
    for name in CHECKPOINT_FILES:
        assert (checkpoint / name).is_file(), name
    written = json.loads((output / "demo.json").read_text(encoding="utf-8"))
    assert written == summary
    assert written["checkpoint"] == str(checkpoint)
    assert isinstance(written["reply"], str) and written["reply"]
    assert 1 <= written["reply_tokens"] <= 40
    assert written["finish_reason"] in ("stop", "length")
    config = NeoXConfig.from_json(checkpoint / "config.json")
    assert written["parameters"] == config.num_parameters()
    assert config.max_position_embeddings == 512
    assert written["seconds"] >= 0


def test_demo_prompt_is_the_tulu_chat_format(demo) -> None:
    _, summary = demo
    assert summary["prompt"] == PROMPT


def test_demo_reply_is_reproducible(demo) -> None:
    output, summary = demo
    loaded = load_pretrained(output / "model", device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = generate_text(loaded.model, loaded.tokenizer, messages, params)
    assert result.text == summary["reply"]
    assert len(result.token_ids) == summary["reply_tokens"]
    assert loaded.tokenizer.decode(result.prompt_token_ids) == PROMPT


def test_demo_checkpoint_loads_in_transformers(demo) -> None:
    transformers = pytest.importorskip("transformers")
    checkpoint = demo[0] / "model"
    ours = load_model(checkpoint, dtype="float32")
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(
        checkpoint, attn_implementation="eager"
    ).eval()
    assert theirs.dtype == torch.float32
    tokenizer = Tokenizer.from_dir(checkpoint)
    ids = torch.tensor([tokenizer.encode(PROMPT + corpus_text()[:300])])
    with torch.no_grad():
        expected = ours(ids)
        actual = theirs(ids).logits
    assert actual.shape == expected.shape == (1, ids.shape[1], 640)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_demo_tokenizer_loads_in_transformers(demo) -> None:
    transformers = pytest.importorskip("transformers")
    checkpoint = demo[0] / "model"
    theirs = transformers.AutoTokenizer.from_pretrained(checkpoint)
    ours = Tokenizer.from_dir(checkpoint)
    assert theirs.eos_token == ours.eos_token == EOT
    assert theirs.eos_token_id == ours.eos_token_id == 0
    assert len(theirs) == len(ours) == 600
    for text in (PROMPT, corpus_text()[:500], f"Hi{EOT}\n<|user|>\ncafé ☕"):
        assert theirs.encode(text) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text


def test_tulu_demo_command(demo, tmp_path: Path, capsys) -> None:
    # `make demo` runs `tulu demo --output runs/demo`
    output = tmp_path / "runs" / "demo"
    assert main(["demo", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in out
    assert "reloaded logits identical" in out
    assert f"Next: tulu chat {output / 'model'}" in out
    summary = json.loads((output / "demo.json").read_text(encoding="utf-8"))
    assert summary["prompt"] == PROMPT
    # same default seed as run_demo(): the same reply
    assert summary["reply"] == demo[1]["reply"]
    assert f"reply:  {summary['reply']}" in out
