"""Tests for the `tulu` command (tulu.cli): info, generate and chat.

Commands run in-process through `tulu.cli.main([...])` (fast: the tiny checkpoint is built once
per module); two subprocess tests prove the installed console script itself works and that hub
ids resolve through an offline Hugging Face cache. Expected generations come from
`tulu.engine.reference.generate_text`, the generator the CLI is meant to drive.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tulu.engine.engine
import tulu.engine.reference
import tulu.pretrained
from tulu.chat import generation_prompt
from tulu.cli import main
from tulu.demo import corpus_text, tiny_model, train_tokenizer
from tulu.engine.reference import GenerationResult, generate_text
from tulu.engine.sampling import SamplingParams
from tulu.engine.structured import StructuredOutput
from tulu.model.checkpoint import save_model
from tulu.model.config import NeoXConfig
from tulu.pretrained import Pretrained, load_pretrained

EOT = "<|endoftext|>"
CPU = ["--device", "cpu"]


@dataclass
class Checkpoint:
    directory: Path
    loaded: Pretrained  # the checkpoint as the CLI loads it (CPU, float32)
    config: NeoXConfig


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    tokenizer = train_tokenizer(corpus_text())
    model = tiny_model(len(tokenizer), seed=0)
    directory = save_model(model, tmp_path_factory.mktemp("ckpt") / "model", tokenizer=tokenizer)
    loaded = load_pretrained(directory, device="cpu", dtype="float32")
    return Checkpoint(directory, loaded, model.config)


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def reference(ckpt: Checkpoint, prompt, *, chat: bool = True, **params) -> GenerationResult:
    sampling = SamplingParams(**{"temperature": 0.0, **params})
    return generate_text(ckpt.loaded.model, ckpt.loaded.tokenizer, prompt, sampling, chat=chat)


def one_line_error(err: str, command: str) -> str:
    """The CLI's error output: exactly one line, no traceback; returns the message."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"tulu {command}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix) :]


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Spy:
    """Wraps a function and records its calls (to prove what ran, or did not)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, Spy]:
    """Spies on model loading and generation (cmd_generate imports both at call time)."""
    load = Spy(tulu.pretrained.load_pretrained)
    gen = Spy(tulu.engine.engine.LLM.generate)
    monkeypatch.setattr(tulu.pretrained, "load_pretrained", load)
    monkeypatch.setattr(
        tulu.engine.engine.LLM, "generate", lambda self, *a, **k: gen(self, *a, **k)
    )
    return {"load": load, "generate": gen}


# ------------------------------------------------------------------------------------ info


def test_info_json_matches_config_and_tokenizer(ckpt: Checkpoint, capsys) -> None:
    rc, out, err = run(capsys, "info", ckpt.directory, "--json")
    assert rc == 0, err
    info = json.loads(out)
    params = ckpt.config.num_parameters()
    assert info["source"] == str(ckpt.directory)
    assert info["architecture"] == "GPT-NeoX"
    assert info["parameters"] == params
    assert info["non_embedding_parameters"] == ckpt.config.num_parameters(include_embeddings=False)
    assert info["layers"] == 2 and info["hidden_size"] == 64 and info["attention_heads"] == 4
    assert info["vocab_size"] == 640 and info["context_window"] == 512
    assert info["dtype"] == info["checkpoint_dtype"] == "float32"
    assert info["weights_bytes"] == 4 * params
    kv = ckpt.config.kv_cache_bytes_per_token(torch.float32)
    assert info["kv_cache_bytes_per_token"] == kv == 2 * 2 * 64 * 4  # K and V, 2 layers, fp32
    assert info["kv_cache_bytes_full_context"] == kv * 512
    assert info["tokenizer_size"] == len(ckpt.loaded.tokenizer) == 600
    assert info["special_tokens"] == {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}


def test_info_text(ckpt: Checkpoint, capsys) -> None:
    rc, out, _ = run(capsys, "info", ckpt.directory)
    assert rc == 0
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.splitlines()}
    params = ckpt.config.num_parameters()
    assert rows["source"] == str(ckpt.directory)
    assert rows["parameters"].startswith(f"{params:,} (")
    assert rows["vocabulary"] == "640 embedding rows, tokenizer 600 ids"
    assert rows["context window"] == "512 tokens"
    assert rows["dtype"] == "float32 (checkpoint: float32)"
    assert rows["KV cache"].startswith("1,024 bytes/token")
    assert f"eos_token='{EOT}'" in rows["special tokens"]


def test_info_dtype_override_sizes_memory(ckpt: Checkpoint, capsys) -> None:
    rc, out, _ = run(capsys, "info", ckpt.directory, "--dtype", "float16", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["dtype"] == "float16" and info["checkpoint_dtype"] == "float32"
    assert info["weights_bytes"] == 2 * info["parameters"]
    assert info["kv_cache_bytes_per_token"] == 512


def test_info_preset_pythia_6_9b(capsys) -> None:
    rc, out, err = run(capsys, "info", "pythia-6.9b", "--dtype", "bfloat16", "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["source"] == "preset pythia-6.9b"
    assert info["parameters"] == 6_857_302_016
    assert info["kv_cache_bytes_per_token"] == 524_288  # 2 (K, V) * 32 layers * 4096 * 2 bytes
    assert info["kv_cache_bytes_full_context"] == 524_288 * 2048
    assert info["weights_bytes"] == 2 * 6_857_302_016
    assert info["dtype"] == "bfloat16"
    assert "tokenizer_size" not in info and "special_tokens" not in info


def test_info_without_tokenizer_files(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    shutil.copy(ckpt.directory / "config.json", tmp_path / "config.json")
    rc, out, err = run(capsys, "info", tmp_path, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["parameters"] == ckpt.config.num_parameters()
    assert "tokenizer_size" not in info


@pytest.mark.parametrize("where", ["directory", "preset"])
def test_revision_with_a_local_model_is_an_error(where: str, ckpt: Checkpoint, capsys) -> None:
    """--revision names a hub commit; with a directory or preset it used to be ignored, so the
    user silently got another version than the one asked for."""
    model = ckpt.directory if where == "directory" else "pythia-70m"
    rc, out, err = run(capsys, "info", model, "--revision", "v1")
    assert rc == 1 and out == ""
    assert "revision 'v1' applies to hub ids only" in one_line_error(err, "info")


def test_info_missing_directory(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    rc, out, err = run(capsys, "info", missing)
    assert rc == 1 and out == ""
    assert str(missing) in one_line_error(err, "info")


# ---------------------------------------------------------------------- console script


def _tulu_script() -> str:
    script = Path(sys.executable).with_name("tulu")
    found = str(script) if script.is_file() else shutil.which("tulu")
    assert found, "the `tulu` console script is not installed (pip install -e .)"
    return found


def _spawn(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [_tulu_script(), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_console_script_entry_point(ckpt: Checkpoint, tmp_path: Path) -> None:
    # both processes start at once: most of their time is importing torch
    ok = _spawn("info", ckpt.directory, "--json")
    bad = _spawn("info", tmp_path / "missing")
    module = subprocess.Popen(  # `python -m tulu`, for when the scripts directory is not on PATH
        [sys.executable, "-m", "tulu", "info", str(ckpt.directory), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for proc in (ok, module):
        rc, out, err = _finish(proc)
        assert rc == 0, err
        assert json.loads(out)["parameters"] == ckpt.config.num_parameters()
    rc, out, err = _finish(bad)
    assert rc == 1 and out == ""
    assert str(tmp_path / "missing") in one_line_error(err, "info")


def test_output_reader_gone_ends_quietly(ckpt: Checkpoint, tmp_path: Path) -> None:
    """`tulu generate ... | head -1`: when the reader of stdout goes away, the command stops
    with status 141 (128 + SIGPIPE, as shells report it), without a BrokenPipeError traceback
    (`main` handles it for every command)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Hello"}])
    proc = _spawn("generate", ckpt.directory, *CPU, "--max-tokens", "4", "--input", prompts)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_info_hub_id_from_offline_cache(ckpt: Checkpoint, tmp_path: Path) -> None:
    # The layout huggingface_hub keeps: models--{org}--{name}/refs/main holds the commit,
    # snapshots/{commit}/ the files. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE
    # when it is imported, hence a subprocess.
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-tulu"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in ckpt.directory.iterdir():
        shutil.copy(file, snapshot / file.name)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    found = _spawn("info", "tiny-org/tiny-tulu", "--json", env=env)
    missing = _spawn("info", "tiny-org/not-cached", env=env)
    rc, out, err = _finish(found)
    assert rc == 0, err
    info = json.loads(out)
    assert Path(info["source"]).resolve() == snapshot.resolve()
    assert info["parameters"] == ckpt.config.num_parameters()
    assert info["tokenizer_size"] == 600
    rc, out, err = _finish(missing)
    assert rc == 1 and out == ""
    message = one_line_error(err, "info")
    assert "tiny-org/not-cached" in message and "HF_HUB_OFFLINE" in message


# -------------------------------------------------------------------------------- generate


def test_generate_streams_reference_greedy_text(ckpt: Checkpoint, capsys) -> None:
    rc, out, err = run(
        capsys, "generate", ckpt.directory, *CPU, "--prompt", "Hi", "--max-tokens", "12"
    )
    assert rc == 0, err
    expected = reference(ckpt, "Hi", max_tokens=12)
    assert expected.text
    assert out == expected.text + "\n"
    n, finish = len(expected.token_ids), expected.finish_reason
    assert err.strip().splitlines()[-1] == f"[{n} tokens, finish: {finish}]"


def test_generate_streams_while_generating(ckpt: Checkpoint, monkeypatch, capsys) -> None:
    # text reaches stdout in pieces as tokens are produced, not in one write at the end
    writes: list[str] = []
    buffer = io.StringIO()

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return buffer.write(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert (
        main(["generate", str(ckpt.directory), *CPU, "--prompt", "Hi", "--max-tokens", "12"]) == 0
    )
    assert buffer.getvalue() == reference(ckpt, "Hi", max_tokens=12).text + "\n"
    assert len([w for w in writes if w]) > 2


def test_generate_raw(ckpt: Checkpoint, capsys) -> None:
    prompt = "Once upon a time"
    rc, out, _ = run(
        capsys, "generate", ckpt.directory, *CPU, "--prompt", prompt, "--raw", "--max-tokens", "8"
    )
    assert rc == 0
    raw = reference(ckpt, prompt, chat=False, max_tokens=8)
    assert out == raw.text + "\n"
    assert len(raw.prompt_token_ids) == len(ckpt.loaded.tokenizer.encode(prompt))


def test_generate_system_prompt(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    args = [
        "generate",
        ckpt.directory,
        *CPU,
        "--prompt",
        "Hi",
        "--system",
        "Be brief.",
        "--max-tokens",
        "8",
    ]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = reference(ckpt, messages, max_tokens=8)
    rc, out, _ = run(capsys, *args)
    assert rc == 0
    assert out == expected.text + "\n"
    # --prompt with --output writes a JSONL record instead of streaming
    rc, out, _ = run(capsys, *args, "--output", tmp_path / "one.jsonl")
    assert rc == 0 and out == ""
    [record] = read_jsonl((tmp_path / "one.jsonl").read_text())
    prompt_ids = ckpt.loaded.tokenizer.encode(generation_prompt(messages, EOT))
    assert record["prompt_tokens"] == len(prompt_ids) == len(expected.prompt_token_ids)
    assert record["output"] == expected.text


def test_generate_stop_string(ckpt: Checkpoint, capsys) -> None:
    full = reference(ckpt, "Hi", max_tokens=24).text
    # a two-letter ASCII stop string that first occurs somewhere after the start
    at = next(
        i
        for i in range(1, len(full) - 1)
        if full[i : i + 2].isascii()
        and full[i : i + 2].isalpha()
        and full.index(full[i : i + 2]) == i
    )
    stop = full[at : at + 2]
    rc, out, err = run(
        capsys,
        "generate",
        ckpt.directory,
        *CPU,
        "--prompt",
        "Hi",
        "--max-tokens",
        "24",
        "--stop",
        stop,
    )
    assert rc == 0
    assert out == full[:at] + "\n"
    assert out == reference(ckpt, "Hi", max_tokens=24, stop=[stop]).text + "\n"
    assert "finish: stop" in err


def test_generate_jsonl_file_to_file(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ]
    records = [
        {"id": "a", "prompt": "Hi", "meta": {"k": [1, 2]}},
        {"id": "b", "messages": messages},
        "",  # blank lines are skipped
        {"prompt": "What is the capital of France?", "id": 3},
    ]
    source = write_jsonl(tmp_path / "prompts.jsonl", records)
    target = tmp_path / "sub" / "out.jsonl"
    rc, out, err = run(
        capsys,
        "generate",
        ckpt.directory,
        *CPU,
        "--input",
        source,
        "--output",
        target,
        "--max-tokens",
        "6",
    )
    assert rc == 0, err
    assert out == ""
    assert "wrote 3 results" in err
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.jsonl"]  # no .partial left
    results = read_jsonl(target.read_text(encoding="utf-8"))
    prompts = ["Hi", messages, "What is the capital of France?"]
    inputs = [r for r in records if r]
    assert [r.get("id") for r in results] == ["a", "b", 3]
    for record, result, prompt in zip(inputs, results, prompts, strict=True):
        expected = reference(ckpt, prompt, max_tokens=6)
        assert result == {
            **record,
            "output": expected.text,
            "finish_reason": expected.finish_reason,
            "prompt_tokens": len(expected.prompt_token_ids),
            "completion_tokens": len(expected.token_ids),
        }
    assert results[0]["meta"] == {"k": [1, 2]}


def test_generate_with_lora_modules_picks_each_records_adapter(
    ckpt: Checkpoint, tmp_path: Path, capsys
) -> None:
    """`--lora-modules` runs adapters unmerged in one batch; a record's `lora` field (else
    `--lora`, else the base) picks one. Each output is what the merged adapter generates."""
    pytest.importorskip("peft")
    from train.conftest import random_adapter

    adapters = {
        name: random_adapter(ckpt.directory, tmp_path / name, seed=seed, scale=0.3)
        for seed, name in enumerate(("sql", "poet"), start=1)
    }
    records = [
        {"prompt": "Name a color.", "lora": "sql"},
        {"prompt": "Name a color."},
        {"prompt": "Name a color.", "lora": None},
        {"prompt": "Write a line.", "lora": "poet"},
    ]
    source = write_jsonl(tmp_path / "prompts.jsonl", records)
    modules = ["--lora-modules", *(f"{n}={d}" for n, d in adapters.items())]
    argv = ["generate", ckpt.directory, *CPU, "--input", source, "--max-tokens", "8", *modules]
    rc, out, err = run(capsys, *argv, "--lora", "poet")
    assert rc == 0, err
    outputs = [r["output"] for r in read_jsonl(out)]
    assert [r.get("lora") for r in read_jsonl(out)] == ["sql", None, None, "poet"]

    def merged(name: str | None, prompt: str) -> str:
        model = ckpt.directory if name is None else adapters[name]
        rc, out, err = run(capsys, "generate", model, *CPU, "--prompt", prompt, "--max-tokens", "8")
        assert rc == 0, err
        return out.rstrip("\n")

    # record 1 has no field: --lora poet applies; record 2 says null: the base
    wanted = [("sql", "Name a color."), ("poet", "Name a color.")]
    wanted += [(None, "Name a color."), ("poet", "Write a line.")]
    assert outputs == [merged(n, p) for n, p in wanted]
    assert len(set(outputs[:3])) == 3  # three models, three continuations

    for extra, message in [
        (["--lora", "sq1"], "--lora: no adapter named 'sq1'; loaded: 'sql', 'poet'"),
        ([], None),
    ]:
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "lora": "nope"}])
        argv = ["generate", ckpt.directory, *CPU, "--input", bad, *modules, *extra]
        rc, out, err = run(capsys, *argv)
        assert rc == 1 and out == ""
        assert (message or "bad.jsonl:1: field 'lora': no adapter named 'nope'") in err


@pytest.mark.parametrize("link", ["same", "symlink"])
def test_generate_refuses_to_overwrite_its_input(ckpt, tmp_path: Path, capsys, link) -> None:
    # The results replaced the prompts file, whose other records and fields were then lost.
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi", "keep": 1}])
    before = source.read_bytes()
    target = source if link == "same" else tmp_path / "out.jsonl"
    if link == "symlink":
        target.symlink_to(source)
    rc, _, err = run(capsys, "generate", ckpt.directory, "--input", source, "--output", target)
    assert rc == 1
    assert "would overwrite the input" in one_line_error(err, "generate")
    assert source.read_bytes() == before


def test_generate_refuses_a_pipe_as_output(ckpt, tmp_path: Path, capsys) -> None:
    # The results were renamed over the named pipe (over /dev/null, as root, the device).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rc, _, err = run(capsys, "generate", ckpt.directory, "--prompt", "Hi", "--output", fifo)
    assert rc == 1
    assert "not a regular file" in one_line_error(err, "generate")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


@pytest.mark.parametrize("output", [".", "/"])
def test_generate_refuses_a_directory_as_output(ckpt, output: str, capsys) -> None:
    """Named by check_output, not a traceback from the lock beside the output."""
    rc, _, err = run(capsys, "generate", ckpt.directory, "--prompt", "Hi", "--output", output)
    assert rc == 1
    assert "is a directory" in one_line_error(err, "generate")


def test_generate_jsonl_to_stdout_raw(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The sky"}, {"prompt": "Birds", "n": 2}])
    rc, out, _ = run(
        capsys, "generate", ckpt.directory, *CPU, "--input", source, "--raw", "--max-tokens", "4"
    )
    assert rc == 0
    results = read_jsonl(out)
    assert [r["prompt"] for r in results] == ["The sky", "Birds"]
    assert results[1]["n"] == 2
    for result in results:
        expected = reference(ckpt, result["prompt"], chat=False, max_tokens=4)
        assert result["output"] == expected.text
        assert result["prompt_tokens"] == len(ckpt.loaded.tokenizer.encode(result["prompt"]))


def test_generate_reads_standard_input(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    """--input - reads JSON Lines piped in (BOM and blank lines as in a file); a bad line is
    named <stdin>:N."""
    piped = b'\xef\xbb\xbf{"prompt": "Hi"}\n\n{"prompt": "Name a color."}\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped)))
    rc, out, err = run(
        capsys, "generate", ckpt.directory, *CPU, "--input", "-", "--max-tokens", "4"
    )
    assert rc == 0, err
    results = read_jsonl(out)
    assert [r["prompt"] for r in results] == ["Hi", "Name a color."]
    assert [r["output"] for r in results] == [
        reference(ckpt, p, max_tokens=4).text for p in ("Hi", "Name a color.")
    ]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": "Hi"}\n[1]\n')))
    rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, "--input", "-")
    assert rc == 1 and out == ""
    assert one_line_error(err, "generate").startswith("<stdin>:2: ")


def test_generate_n_samples_per_prompt(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    """--n gives each record lists of samples: the engine's n seeded samples, in order."""
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Name a color."}])
    sampling = ["--temperature", "1.5", "--seed", "7", "--max-tokens", "6"]
    rc, out, err = run(
        capsys, "generate", ckpt.directory, *CPU, "--input", source, "--n", "3", *sampling
    )
    assert rc == 0, err
    llm = tulu.engine.engine.LLM(ckpt.loaded.model, ckpt.loaded.tokenizer)
    params = SamplingParams(n=3, temperature=1.5, seed=7, max_tokens=6)
    for result in read_jsonl(out):
        [expected] = llm.generate([{"role": "user", "content": result["prompt"]}], params)
        samples = expected.outputs
        assert result["output"] == [c.text for c in samples]
        assert len(set(result["output"])) == 3  # three samples, not one three times
        assert result["finish_reason"] == [c.finish_reason for c in samples]
        assert result["completion_tokens"] == [len(c.token_ids) for c in samples]
        assert result["prompt_tokens"] == len(expected.prompt_token_ids)
        assert "logprobs" not in result


def test_generate_logprobs_match_the_reference(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    """--logprobs K: each generated token's id, text, bytes and log-probability, and its K
    most likely alternatives, as the reference generator computes them."""
    rc, out, err = run(
        capsys, "generate", ckpt.directory, *CPU, "--prompt", "Hi", "--max-tokens", "6",
        "--logprobs", "2", "--ignore-eos",
    )  # fmt: skip
    assert rc == 0, err
    [result] = read_jsonl(out)  # several fields: printed as JSON, not streamed
    expected = reference(ckpt, "Hi", max_tokens=6, logprobs=2, ignore_eos=True)
    assert result["output"] == expected.text
    entries = result["logprobs"]
    assert [e["token_id"] for e in entries] == expected.token_ids
    assert [e["logprob"] for e in entries] == pytest.approx(
        [t.logprob for t in expected.logprobs], abs=1e-5
    )
    for entry, want in zip(entries, expected.logprobs, strict=True):
        assert [a["token_id"] for a in entry["top_logprobs"]] == [i for i, _ in want.top]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)
    raw = b"".join(bytes(e["bytes"]) for e in entries)
    assert raw.decode("utf-8", errors="replace") == expected.text  # greedy: the chosen tokens


def test_generate_stop_token_ids_and_penalties(ckpt: Checkpoint, capsys, spies) -> None:
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.0, "ignore_eos": True}
    stop_id = reference(ckpt, "Hi", max_tokens=8, **penalties).token_ids[3]
    expected = reference(
        ckpt, "Hi", max_tokens=8, stop_token_ids=[stop_id], min_tokens=2, **penalties
    )
    assert expected.finish_reason == "stop"
    argv = ["generate", ckpt.directory, *CPU, "--prompt", "Hi", "--max-tokens", "8"]
    flags = ["--presence-penalty", "0.5", "--frequency-penalty", "1", "--ignore-eos"]
    rc, out, err = run(capsys, *argv, *flags, "--stop-token-ids", stop_id, "--min-tokens", "2")
    assert rc == 0, err
    assert out == expected.text + "\n"
    assert "finish: stop" in err
    # an id beyond the model's vocabulary: named by its flag, before anything is generated
    spies["generate"].calls.clear()
    rc, out, err = run(capsys, *argv, "--stop-token-ids", "7", "99999")
    assert rc == 1 and out == ""
    assert one_line_error(err, "generate") == (
        f"--stop-token-ids contains 99999, outside the vocabulary [0, {ckpt.config.vocab_size})"
    )
    assert spies["generate"].calls == []


def test_generate_structured_output_flags(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    """Each flag constrains every reply, as the engine's StructuredOutput does (greedy: the
    reference generator's text), and the replies parse."""
    pytest.importorskip("xgrammar")
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "boolean"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema), encoding="utf-8")
    grammar_file = tmp_path / "g.gbnf"
    grammar_file.write_text('root ::= "a" [bc] "!"\n', encoding="utf-8")
    cases = [
        (["--json-schema", schema_file], StructuredOutput(json=schema)),
        (["--regex", "[0-9]{2}-[xy]"], StructuredOutput(regex="[0-9]{2}-[xy]")),
        (["--choice", "yes", "--choice", "no way"], StructuredOutput(choice=["yes", "no way"])),
        (["--grammar", grammar_file], StructuredOutput(grammar='root ::= "a" [bc] "!"\n')),
        (["--json-object", "--max-tokens", "12"], StructuredOutput(json_object=True)),
    ]
    for flags, spec in cases:
        rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, "--prompt", "Hi", *flags)
        assert rc == 0, err
        max_tokens = int(flags[-1]) if flags[-2] == "--max-tokens" else 256
        expected = reference(ckpt, "Hi", max_tokens=max_tokens, structured_output=spec)
        assert out == expected.text + "\n"
        # a random model may not close a free-form object within 12 tokens
        assert expected.finish_reason == "stop" or spec.json_object
    assert json.loads(reference(ckpt, "Hi", structured_output=cases[0][1]).text)["a"] in "xy"


def test_generate_structured_output_errors_name_the_flag(ckpt, tmp_path: Path, capsys) -> None:
    pytest.importorskip("xgrammar")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{", encoding="utf-8")
    array = tmp_path / "array.json"
    array.write_text("[]", encoding="utf-8")
    cases = {
        ("--regex", "[0-9"): "--regex cannot be compiled: Regex parsing error at position ",
        # xgrammar's other refusal named the internal field (structured_output.regex) once.
        ("--regex", r"[^\s\S]"): "--regex matches no text: no token can start it",
        ("--json-schema", bad_json): f"--json-schema {bad_json}: not JSON (line 1, column 2: ",
        ("--json-schema", array): f"--json-schema {array}: a JSON schema is an object, not list",
        ("--grammar", tmp_path / "missing"): f"--grammar {tmp_path / 'missing'}: cannot read it",
        ("--choice", ""): "--choice: expected a non-empty choice, got ['']",
        ("--regex", "a", "--min-tokens", "2"): "--min-tokens cannot be combined with --regex",
    }
    for flags, message in cases.items():
        rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, "--prompt", "Hi", *flags)
        assert rc == 1 and out == ""
        assert one_line_error(err, "generate").startswith(message), err


def test_generate_result_fields_depend_on_logprobs(ckpt, tmp_path: Path, capsys, spies) -> None:
    """A record's own 'logprobs' field is kept unless --logprobs would overwrite it."""
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "logprobs": "mine"}])
    argv = ["generate", ckpt.directory, *CPU, "--input", source, "--max-tokens", "2"]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert read_jsonl(out)[0]["logprobs"] == "mine"
    rc, out, err = run(capsys, *argv, "--logprobs", "1")
    assert rc == 1 and out == ""
    assert one_line_error(err, "generate").startswith(
        f"{source}:1: field 'logprobs' is one that generate writes"
    )


# ----------------------------------------------------------------------- generate: resuming

RESUME_PROMPTS = ["Hi", "Name a color.", "What is 2+2?", "Write a haiku about the sea.", "Go"]
# Seeded sampling that gives each of these prompts another text, so a result put on the wrong
# line would show.
RESUME_ARGS = ["--max-tokens", "8", "--temperature", "1.5", "--top-k", "40", "--seed", "5"]


def resume_run(ckpt, tmp_path, capsys, *extra, output: str = "out.jsonl"):
    source = tmp_path / "in.jsonl"
    if not source.exists():
        write_jsonl(source, [{"id": i, "prompt": p} for i, p in enumerate(RESUME_PROMPTS)])
    argv = ["generate", ckpt.directory, *CPU, "--input", source, "--output", tmp_path / output]
    return run(capsys, *argv, *RESUME_ARGS, *extra)


def interrupted_run(ckpt, tmp_path, capsys, monkeypatch, finished: int, *extra: str) -> Path:
    """A run (with `extra` arguments) stopped as Ctrl-C would stop it, right after its
    `finished`-th result was handled; returns the progress file it leaves (with the results
    kept before, and those)."""
    progress = tmp_path / "out.jsonl.progress"
    # whole lines: a header and results; a cut line after them is dropped
    lines = progress.read_bytes().count(b"\n") if progress.exists() else 0
    kept = max(lines - 1, 0) + finished
    real = tulu.engine.engine.LLM.generate

    def generate(self, prompts, params=None, *, on_output=None, **kwargs):
        seen = 0

        def interrupting(output) -> None:
            nonlocal seen
            on_output(output)
            seen += output.finished
            if seen == finished:
                raise KeyboardInterrupt

        return real(self, prompts, params, on_output=interrupting, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tulu.engine.engine.LLM, "generate", generate)
        rc, out, err = resume_run(ckpt, tmp_path, capsys, *extra)
    assert rc == 130 and out == "", err
    assert f"{kept} of 5 results kept in {progress}: run the same command again" in err
    assert not (tmp_path / "out.jsonl").exists()
    assert progress.read_bytes().endswith(b"\n")
    assert len(progress.read_bytes().splitlines()) == 1 + kept  # the header, the results
    return progress


def prompts_generated(spy: Spy) -> list[int]:
    """The input indices each `LLM.generate` call was given (its request ids)."""
    return [int(rid) for _, kwargs in spy.calls for rid in kwargs["request_ids"]]


@pytest.mark.parametrize(
    ("extra", "engine_flags"),
    [([], []), (["--n", "2", "--logprobs", "1"], []), ([], ["--max-num-seqs", "2"])],
    ids=["one", "n2-logprobs", "other-engine-sizes-on-resume"],
)
def test_generate_resumes_where_an_interrupted_run_stopped(
    ckpt, tmp_path, capsys, monkeypatch, spies, extra, engine_flags
) -> None:
    """Seeded results do not depend on the batch, so engine sizes may change on resume."""
    rc, _, err = resume_run(ckpt, tmp_path, capsys, *extra, output="whole.jsonl")
    assert rc == 0, err
    whole = (tmp_path / "whole.jsonl").read_bytes()
    assert len({json.dumps(r["output"]) for r in read_jsonl(whole.decode())}) == 5
    spies["generate"].calls.clear()

    progress = interrupted_run(ckpt, tmp_path, capsys, monkeypatch, 2, *extra)
    spies["generate"].calls.clear()
    kept = {json.loads(line)["index"] for line in progress.read_text().splitlines()[1:]}
    rc, out, err = resume_run(ckpt, tmp_path, capsys, *extra, *engine_flags)
    assert rc == 0 and out == "", err
    assert f"resuming: 2 of 5 results kept in {progress}" in err
    assert sorted(prompts_generated(spies["generate"])) == sorted({0, 1, 2, 3, 4} - kept)
    assert (tmp_path / "out.jsonl").read_bytes() == whole  # as if never interrupted
    assert not progress.exists()


def test_generate_killed_after_its_last_result(ckpt, tmp_path, capsys, monkeypatch, spies) -> None:
    """Every result kept but OUT not written yet: the rerun writes it, generating nothing."""
    rc, _, err = resume_run(ckpt, tmp_path, capsys, output="whole.jsonl")
    assert rc == 0, err
    interrupted_run(ckpt, tmp_path, capsys, monkeypatch, finished=5)
    spies["generate"].calls.clear()
    rc, out, err = resume_run(ckpt, tmp_path, capsys)
    assert rc == 0, err
    assert "resuming: 5 of 5 results kept" in err
    assert prompts_generated(spies["generate"]) == []
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "whole.jsonl"]


def test_generate_interrupted_before_any_result_leaves_nothing(
    ckpt, tmp_path, capsys, monkeypatch
) -> None:
    real = tulu.engine.engine.LLM.generate

    def generate(self, prompts, params=None, *, on_output=None, **kwargs):
        def interrupting(output) -> None:
            raise KeyboardInterrupt

        return real(self, prompts, params, on_output=interrupting, **kwargs)

    monkeypatch.setattr(tulu.engine.engine.LLM, "generate", generate)
    rc, out, err = resume_run(ckpt, tmp_path, capsys)
    assert rc == 130 and out == ""
    assert err == "interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_generate_refuses_to_resume_with_other_settings(
    ckpt, tmp_path, capsys, monkeypatch, spies
) -> None:
    progress = interrupted_run(ckpt, tmp_path, capsys, monkeypatch, finished=2)
    kept = progress.read_bytes()
    spies["load"].calls.clear()
    spies["generate"].calls.clear()
    rc, out, err = resume_run(
        ckpt, tmp_path, capsys, "--temperature", "1.2", "--system", "Hi", "--max-model-len", "64"
    )
    assert rc == 1 and out == ""
    message = one_line_error(err, "generate")
    assert message == (
        f"{progress} holds the results of a run with other settings (--temperature: 1.5 "
        'before, 1.2 now; --system: null before, "Hi" now; --max-model-len: null before, 64 '
        f"now); rerun with the settings of that run to resume it, or delete {progress} to "
        "start over"
    )
    assert spies["load"].calls == []  # refused before the model loads
    # another model: found once it loads, before anything is generated
    other = tmp_path / "other-model"
    shutil.copytree(ckpt.directory, other)
    argv = ["generate", other, *CPU, "--input", tmp_path / "in.jsonl"]
    rc, out, err = run(capsys, *argv, "--output", tmp_path / "out.jsonl", *RESUME_ARGS)
    assert rc == 1 and out == ""
    assert "other settings (model.checkpoint: " in one_line_error(err, "generate")
    # other input records
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in RESUME_PROMPTS])
    rc, out, err = resume_run(ckpt, tmp_path, capsys)
    assert rc == 1 and "(input.sha256: " in one_line_error(err, "generate")
    assert spies["generate"].calls == []
    assert progress.read_bytes() == kept
    assert not (tmp_path / "out.jsonl").exists()


def test_generate_resume_drops_a_cut_last_line(ckpt, tmp_path, capsys, monkeypatch, spies) -> None:
    """A run killed while writing a result leaves a line without its newline: that result is
    generated again, and the next one is not appended to the cut line."""
    rc, _, err = resume_run(ckpt, tmp_path, capsys, output="whole.jsonl")
    assert rc == 0, err
    progress = interrupted_run(ckpt, tmp_path, capsys, monkeypatch, finished=3)
    lines = progress.read_bytes().splitlines(keepends=True)
    progress.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # the third result cut
    interrupted_run(ckpt, tmp_path, capsys, monkeypatch, finished=1)  # 2 + 1 kept
    spies["generate"].calls.clear()
    rc, out, err = resume_run(ckpt, tmp_path, capsys)
    assert rc == 0, err
    assert "resuming: 3 of 5 results kept" in err
    assert len(prompts_generated(spies["generate"])) == 2
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    # killed while writing the header: nothing was kept, the run starts over
    progress.write_bytes(lines[0][:40])
    rc, out, err = resume_run(ckpt, tmp_path, capsys)
    assert rc == 0, err
    assert "resuming" not in err
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"index": 1, "output": "x"\n', "truncated JSON"),
        (
            b'{"index": 7, "output": "x", "finish_reason": "stop", "prompt_tokens": 1, '
            b'"completion_tokens": 1}\n',
            "index 7 is not that of one of the 5 inputs",
        ),
        (None, "a second result for index"),  # line 2 again
        (
            b'{"index": 4, "output": ["x", 2], "finish_reason": ["stop", "stop"], '
            b'"prompt_tokens": 1, "completion_tokens": [1, 1], "logprobs": [[], []]}\n',
            "field 'output' must be a list of strings",
        ),
        (
            b'{"index": 4, "output": ["x", "y"], "finish_reason": "stop", '
            b'"prompt_tokens": 1, "completion_tokens": [1, 1], "logprobs": [[], []]}\n',
            "field 'finish_reason' must be a list of 2 strings, one per sample",
        ),
        (
            b'{"index": 4, "output": ["x", "y"], "finish_reason": ["stop", "stop"], '
            b'"prompt_tokens": 1, "completion_tokens": [1, 1]}\n',
            "expected a JSON object with the fields index, output, finish_reason, "
            "prompt_tokens, completion_tokens, logprobs",
        ),
    ],
)
def test_generate_resume_refuses_a_corrupt_line(
    ckpt, tmp_path, capsys, monkeypatch, spies, line, problem
) -> None:
    extra = ["--n", "2", "--logprobs", "0"] if line and b'"output": [' in line else []
    progress = interrupted_run(ckpt, tmp_path, capsys, monkeypatch, 3, *extra)
    lines = progress.read_bytes().splitlines(keepends=True)
    lines[3] = line or lines[1]
    progress.write_bytes(b"".join(lines))
    spies["load"].calls.clear()
    spies["generate"].calls.clear()
    rc, out, err = resume_run(ckpt, tmp_path, capsys, *extra)
    assert rc == 1 and out == ""
    message = one_line_error(err, "generate")
    assert message.startswith(f"{progress}:4: {problem}")
    assert message.endswith(
        f"remove that line to generate its result again, or delete {progress} to start over"
    )
    assert spies["load"].calls == [] and spies["generate"].calls == []
    assert progress.read_bytes() == b"".join(lines)


def test_generate_refuses_an_output_another_run_is_writing(
    ckpt, tmp_path, capsys, monkeypatch, spies
) -> None:
    """Two runs on one --output would append to one progress file and overwrite each other's
    OUT; the second is refused before it loads the model. A lock left by a killed run (a
    file its pid is still in) blocks nothing."""
    progress = interrupted_run(ckpt, tmp_path, capsys, monkeypatch, finished=2)
    kept = progress.read_bytes()
    lock = tmp_path / "out.jsonl.lock"
    holding = "import sys, time; from tulu.generate_resume import writing_alone as w\n"
    holding += "with w(__import__('pathlib').Path(sys.argv[1])): print(flush=True); time.sleep(60)"
    other = subprocess.Popen(
        [sys.executable, "-c", holding, str(tmp_path / "out.jsonl")], stdout=subprocess.PIPE
    )
    try:
        assert other.stdout.readline() == b"\n"  # it holds the lock
        spies["load"].calls.clear()
        rc, out, err = resume_run(ckpt, tmp_path, capsys)
        assert rc == 1 and out == ""
        assert one_line_error(err, "generate") == (
            f"another `tulu generate` (pid {other.pid}) is writing {tmp_path / 'out.jsonl'} "
            f"(it holds {lock}); wait for it to end, or stop it, before running this again"
        )
        assert spies["load"].calls == []
        assert progress.read_bytes() == kept
    finally:
        other.kill()
        other.wait()
    assert json.loads(lock.read_text())["pid"] == other.pid  # left by the killed run
    rc, out, err = resume_run(ckpt, tmp_path, capsys)
    assert rc == 0, err
    assert "resuming: 2 of 5 results kept" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


# ------------------------------------------------------------------------ generate: errors

GOOD = json.dumps({"prompt": "Hi"})
LONG_TEXT = "hello " * 600  # about 1,800 tokens; the window is 512


# (records, --raw?, fragment the message must contain); the bad record is always on line 2
INPUT_ERRORS = {
    "invalid-json": ([GOOD, '{"prompt": "Hi"'], False, "truncated JSON"),
    "not-an-object": ([GOOD, '["Hi"]'], False, "expected a JSON object"),
    "no-prompt": ([GOOD, {"id": 2, "text": "Hi"}], False, "'prompt'"),
    "prompt-not-string": ([GOOD, {"prompt": 5}], False, "'prompt'"),
    "empty-messages": ([GOOD, {"messages": []}], False, "'messages'"),
    "messages-with-raw": ([GOOD, {"messages": [{"role": "user", "content": "x"}]}], True, "--raw"),
    # The result fields would silently replace a gold answer (lost in place, --output = input).
    "gold-output": ([GOOD, {"prompt": "Hi", "output": "gold"}], False, "field 'output' is one"),
    "both-prompt-and-messages": (
        [GOOD, {"prompt": "Hi", "messages": [{"role": "user", "content": "x"}]}],
        False,
        "both 'prompt' and 'messages'",
    ),
}
LATE_ERRORS = {
    "unknown-role": ([GOOD, {"messages": [{"role": "robot", "content": "x"}]}], False, "'robot'"),
    "too-long": ([GOOD, {"prompt": LONG_TEXT}], False, "context window is 512 tokens"),
}


def _check_input_error(ckpt, tmp_path, capsys, spies, records, raw, fragment) -> str:
    source = tmp_path / "in.jsonl"
    write_jsonl(source, records)
    target = tmp_path / "out.jsonl"
    argv = [
        "generate",
        ckpt.directory,
        *CPU,
        "--input",
        source,
        "--output",
        target,
        "--max-tokens",
        "3",
    ]
    rc, out, err = run(capsys, *argv, *(["--raw"] if raw else []))
    assert rc == 1 and out == ""
    message = one_line_error(err, "generate")
    assert message.startswith(f"{source}:2: "), message
    assert fragment in message
    assert spies["generate"].calls == [], "generation started before the input was validated"
    assert not target.exists()
    assert not target.with_name("out.jsonl.partial").exists()
    return message


@pytest.mark.parametrize("case", INPUT_ERRORS)
def test_generate_bad_input_fails_before_loading(ckpt, tmp_path, capsys, spies, case) -> None:
    _check_input_error(ckpt, tmp_path, capsys, spies, *INPUT_ERRORS[case])
    assert spies["load"].calls == []  # input is validated before the model is loaded


def test_generate_non_utf8_input(ckpt: Checkpoint, tmp_path: Path, capsys, spies) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(GOOD.encode() + b'\n{"prompt": "caf\xe9"}\n')
    rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, "--input", source)
    assert rc == 1 and out == ""
    message = one_line_error(err, "generate")
    assert message.startswith(f"{source}:2: ") and "UTF-8" in message
    assert spies["load"].calls == [] and spies["generate"].calls == []


@pytest.mark.parametrize(
    ("record", "flags", "named"),
    [
        # Undecodable bytes typed in a flag arrive as surrogates (surrogateescape).
        (None, ["--prompt", "ok", "--system", "caf\udce9"], "--system contains"),
        (None, ["--prompt", "caf\udce9"], "--prompt contains"),
        ({"prompt": "caf\udce9"}, ["--raw"], ":1: field 'prompt' contains"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "caf\ud83d"},
                ]
            },
            [],
            ":1: message 1, field 'content' contains",
        ),
    ],
)
def test_generate_unencodable_text_is_named_by_its_flag_or_field(
    ckpt, tmp_path: Path, capsys, spies, record, flags, named
) -> None:
    """The bad character's place is given in the text it was typed in, not in the rendered
    prompt (which counts the role headers and the system prompt), and --system is blamed, not
    the prompt."""
    argv: list = []
    if record is not None:
        argv = ["--input", write_jsonl(tmp_path / "in.jsonl", [record])]
    rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, *argv, *flags)
    assert rc == 1 and out == ""
    message = one_line_error(err, "generate")
    assert named in message and "unpaired surrogate" in message and "at character 3" in message
    assert spies["load"].calls == []  # refused before the model is loaded


@pytest.mark.parametrize("case", LATE_ERRORS)
def test_generate_late_errors_start_no_generation(ckpt, tmp_path, capsys, spies, case) -> None:
    _check_input_error(ckpt, tmp_path, capsys, spies, *LATE_ERRORS[case])


def test_generate_unknown_role_message(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, "--input", source)
    assert rc == 1 and out == ""
    message = one_line_error(err, "generate")
    assert message.startswith(f"{source}:1: ")
    assert "unknown role 'robot'" in message  # tulu.chat's message, naming the role


def test_generate_prompt_longer_than_window(ckpt: Checkpoint, tmp_path: Path, capsys) -> None:
    n = len(
        ckpt.loaded.tokenizer.encode(
            generation_prompt([{"role": "user", "content": LONG_TEXT}], EOT)
        )
    )
    assert n > 512
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": LONG_TEXT}])
    rc, out, err = run(
        capsys,
        "generate",
        ckpt.directory,
        *CPU,
        "--input",
        source,
        "--output",
        tmp_path / "o.jsonl",
    )
    assert rc == 1 and out == ""
    message = one_line_error(err, "generate")
    assert message.startswith(f"{source}:1: ")
    assert f"{n} tokens" in message and "512 tokens" in message
    assert not (tmp_path / "o.jsonl").exists()
    # the same through --prompt: nothing streamed
    rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, "--prompt", LONG_TEXT)
    assert rc == 1 and out == ""
    assert f"{n} tokens" in one_line_error(err, "generate")


def test_generate_missing_model_directory(tmp_path: Path, capsys, spies) -> None:
    missing = tmp_path / "no-model"
    rc, out, err = run(capsys, "generate", missing, *CPU, "--prompt", "Hi")
    assert rc == 1 and out == ""
    assert str(missing) in one_line_error(err, "generate")
    assert spies["generate"].calls == []


def test_generate_missing_input_file(ckpt: Checkpoint, tmp_path: Path, capsys, spies) -> None:
    rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, "--input", tmp_path / "none.jsonl")
    assert rc == 1 and out == ""
    assert "none.jsonl" in one_line_error(err, "generate")
    assert spies["load"].calls == []


# A typo; a GPU that is not there; a device that holds tensors but cannot compute (meta: no
# data, it failed at the first token with a traceback); a backend torch lacks (ImportError).
@pytest.mark.parametrize("device", ["gpu0", "cuda:99", "meta", "hpu"])
def test_generate_unusable_device(ckpt: Checkpoint, capsys, spies, device: str) -> None:
    rc, out, err = run(capsys, "generate", ckpt.directory, "--device", device, "--prompt", "Hi")
    assert rc == 1 and out == ""
    assert one_line_error(err, "generate").startswith(f"--device: cannot use device '{device}'")
    assert spies["generate"].calls == []


def test_generate_output_is_a_directory(ckpt: Checkpoint, tmp_path: Path, capsys, spies) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    target = tmp_path / "results"
    target.mkdir()
    rc, out, err = run(
        capsys, "generate", ckpt.directory, *CPU, "--input", source, "--output", target
    )
    assert rc == 1 and out == ""
    assert (
        one_line_error(err, "generate")
        == f"--output {target}: is a directory, expected a file name"
    )
    assert spies["load"].calls == [] and spies["generate"].calls == []  # nothing to throw away
    assert list(target.iterdir()) == []


def test_generate_output_under_a_file(ckpt: Checkpoint, tmp_path: Path, capsys, spies) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    target = blocker / "out.jsonl"
    rc, out, err = run(
        capsys, "generate", ckpt.directory, *CPU, "--input", source, "--output", target
    )
    assert rc == 1 and out == ""
    message = one_line_error(err, "generate")
    assert message.startswith(f"--output {target}: cannot write there (")
    assert spies["load"].calls == [] and spies["generate"].calls == []
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--temperature", "-1"),
        ("--top-p", "1.5"),
        ("--typical-p", "0"),
        ("--bad-words", " "),
        ("--max-tokens", "0"),
        ("--repetition-penalty", "0"),
        ("--presence-penalty", "2.5"),
        ("--frequency-penalty", "-3"),
        ("--min-tokens", "-1"),
        ("--n", "0"),
        ("--logprobs", "21"),
    ],
)
def test_generate_invalid_sampling_value(ckpt, capsys, spies, flag, value) -> None:
    rc, out, err = run(capsys, "generate", ckpt.directory, *CPU, "--prompt", "Hi", flag, value)
    assert rc == 1 and out == ""
    assert one_line_error(err, "generate").startswith(f"{flag} must")  # names the flag typed
    assert spies["load"].calls == [] and spies["generate"].calls == []


def test_generate_passes_bad_words_to_the_engine(ckpt, capsys, spies) -> None:
    argv = ["--prompt", "Hi", "--max-tokens", "2", "--bad-words", "cat", "--bad-words", "a dog"]
    rc, _, err = run(capsys, "generate", ckpt.directory, *CPU, *argv)
    assert rc == 0, err
    (_, _, [params]), _ = spies["generate"].calls[0]
    assert params.bad_words == ["cat", "a dog"]


def test_generate_passes_typical_p_to_the_engine(ckpt, capsys, spies) -> None:
    argv = ["--prompt", "Hi", "--temperature", "1", "--seed", "3", "--max-tokens", "2"]
    rc, _, err = run(capsys, "generate", ckpt.directory, *CPU, *argv, "--typical-p", "0.4")
    assert rc == 0, err
    (_, _, [params]), _ = spies["generate"].calls[0]
    assert params.typical_p == 0.4


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_stop_string_with_an_undecodable_byte_is_refused(
    ckpt, capsys, monkeypatch, spies, command
) -> None:
    """A byte typed in that is not UTF-8 arrives as a surrogate, which decoded text never
    holds: the stop string would never match, so it is refused rather than ignored."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    prompt = ["--prompt", "Hi"] if command == "generate" else []
    rc, out, err = run(capsys, command, ckpt.directory, *CPU, *prompt, "--stop", "caf\udce9")
    assert rc == 1 and out == ""
    message = one_line_error(err, command)
    assert message.startswith(
        "--stop must be valid Unicode (no unpaired surrogate: '\\udce9' at character 3 of "
    )
    assert spies["load"].calls == [] and spies["generate"].calls == []


def test_chat_unusable_device(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    """--device meta loaded the model and died with a traceback at the first reply."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    rc, out, err = run(capsys, "chat", ckpt.directory, "--device", "meta")
    assert rc == 1 and out == ""
    assert one_line_error(err, "chat").startswith("--device: cannot use device 'meta'")


def test_chat_invalid_sampling_value(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    rc, out, err = run(capsys, "chat", ckpt.directory, *CPU, "--temperature", "-1")
    assert rc == 1 and out == ""
    assert "temperature" in one_line_error(err, "chat")


# ------------------------------------------------------------------------------------ chat


def chat(capsys, monkeypatch, ckpt: Checkpoint, stdin: str, *extra: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return run(
        capsys, "chat", ckpt.directory, *CPU, "--temperature", "0", "--max-tokens", "6", *extra
    )


def test_chat_stop_token_id_beyond_the_vocabulary_names_the_flag(ckpt, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    rc, out, err = run(capsys, "chat", ckpt.directory, *CPU, "--stop-token-ids", "99999")
    assert rc == 1 and out == ""
    assert one_line_error(err, "chat") == (
        f"--stop-token-ids contains 99999, outside the vocabulary [0, {ckpt.config.vocab_size})"
    )


def test_chat_piped_user_line_gets_reply(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    rc, out, err = chat(capsys, monkeypatch, ckpt, "Hello\n")
    assert rc == 0, err
    reply = reference(ckpt, "Hello", max_tokens=6).text
    assert reply
    assert out.startswith("Chatting in the Tulu format.")
    assert f">>> Hello\n{reply}\n" in out  # the piped line is echoed, then the reply streams
    assert out.endswith(f"{reply}\n\n")  # EOF ends the loop with a newline


def test_chat_piped_last_line_without_newline(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    rc, out, _ = chat(capsys, monkeypatch, ckpt, "Hello")
    assert rc == 0
    reply = reference(ckpt, "Hello", max_tokens=6).text
    assert f">>> Hello\n{reply}\n" in out


def test_chat_second_turn_sees_history(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    rc, out, _ = chat(capsys, monkeypatch, ckpt, "Hello\nAnd then?\n")
    assert rc == 0
    first = reference(ckpt, "Hello", max_tokens=6).text
    conversation = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    second = reference(ckpt, conversation, max_tokens=6).text
    assert f">>> Hello\n{first}\n>>> And then?\n{second}\n" in out


def test_chat_system_command_history_and_reset(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    stdin = "Hello\n/system Be brief.\n/history\nHi\n/history\n/reset\n/history\n/exit\n"
    rc, out, _ = chat(capsys, monkeypatch, ckpt, stdin)
    assert rc == 0
    reply = reference(
        ckpt,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6,
    ).text
    blocks = out.split(">>> ")
    assert blocks[2] == "/system Be brief.\n(system prompt set; conversation reset)\n"
    assert blocks[3] == "/history\n[system] Be brief.\n"  # "Hello" and its reply are gone
    assert blocks[4] == f"Hi\n{reply}\n"
    assert blocks[5] == f"/history\n[system] Be brief.\n[user] Hi\n[assistant] {reply}\n"
    assert blocks[6] == "/reset\n(conversation reset)\n"
    assert blocks[7] == "/history\n[system] Be brief.\n"  # /reset keeps the system prompt
    assert blocks[8] == "/exit\n"


def test_chat_system_flag_and_removal(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    rc, out, _ = chat(
        capsys, monkeypatch, ckpt, "/history\n/system\n/history\n", "--system", "Be kind."
    )
    assert rc == 0
    blocks = out.split(">>> ")
    assert blocks[1] == "/history\n[system] Be kind.\n"
    assert blocks[2] == "/system\n(system prompt removed; conversation reset)\n"
    assert blocks[3] == "/history\n\n"  # nothing to show, then EOF's newline


def test_chat_unknown_command_prints_help(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    rc, out, _ = chat(capsys, monkeypatch, ckpt, "/frobnicate now\n/help\n\n   \n")
    assert rc == 0
    blocks = out.split(">>> ")
    assert blocks[1].startswith("/frobnicate now\nunknown command '/frobnicate'\nCommands:")
    for command in ("/reset", "/system", "/history", "/exit"):
        assert command in blocks[1]
    assert blocks[2].startswith("/help\nCommands:")
    assert len(blocks) == 5  # blank lines are read but send nothing


def test_chat_exit_stops_reading(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\nHello\n"))
    rc, out, _ = run(capsys, "chat", ckpt.directory, *CPU)
    assert rc == 0
    assert "Hello" not in out
    assert out.endswith(">>> /exit\n")


def test_chat_quit_and_empty_input(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    rc, out, _ = chat(capsys, monkeypatch, ckpt, "/quit\n")
    assert rc == 0 and out.endswith(">>> /quit\n")
    rc, out, _ = chat(capsys, monkeypatch, ckpt, "")  # EOF at once: banner, newline, done
    assert rc == 0 and ">>>" not in out and out.endswith("/exit.\n\n")


def test_chat_too_long_message_reports_and_continues(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    rc, out, err = chat(capsys, monkeypatch, ckpt, f"{LONG_TEXT}\n/history\n")
    assert rc == 0, err
    assert "error: the message needs" in out and "512 tokens" in out
    assert out.split(">>> ")[-1] == "/history\n\n"  # the failed turn is not kept


def test_chat_stdin_bytes_that_are_not_utf8(ckpt: Checkpoint, monkeypatch) -> None:
    """With strict UTF-8 standard streams (a UTF-8 locale such as en_US.UTF-8, or
    PYTHONIOENCODING), a line with undecodable bytes is reported like any bad message, not a
    traceback; the chat goes on, and the line is echoed byte for byte."""
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nHello\n"), encoding="utf-8", errors="strict")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["chat", str(ckpt.directory), *CPU, "--temperature", "0", "--max-tokens", "6"]
    assert main(argv) == 0
    stdout.flush()
    blocks = stdout.buffer.getvalue().split(b">>> ")
    assert blocks[1].startswith(b"caf\xe9\n\nerror: ") and b"unpaired surrogate" in blocks[1]
    reply = reference(ckpt, "Hello", max_tokens=6).text
    assert blocks[2] == f"Hello\n{reply}\n\n".encode()


def test_chat_system_flag_that_is_not_valid_text(ckpt: Checkpoint, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    rc, out, err = run(capsys, "chat", ckpt.directory, *CPU, "--system", "caf\udce9")
    assert rc == 1 and out == ""
    assert one_line_error(err, "chat").startswith("the system prompt: the text contains")


def test_chat_missing_model(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    rc, out, err = run(capsys, "chat", tmp_path / "none", *CPU)
    assert rc == 1 and out == ""
    assert str(tmp_path / "none") in one_line_error(err, "chat")


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_engine_options(command: str) -> None:
    """serve and generate take vLLM's engine flags; the defaults are EngineConfig's."""
    from tulu.cli import _parse
    from tulu.engine.engine import EngineConfig
    from tulu.engine.options import engine_settings
    from tulu.engine.speculative import SpeculativeConfig

    required = ["--prompt", "x"] if command == "generate" else []
    defaults = engine_settings(_parse([command, "m", *required]))
    assert EngineConfig(**defaults) == EngineConfig()
    flags = ["--decode-attention", "triton", "--enforce-eager", "--max-num-seqs", "8"]
    flags += ["--max-num-batched-tokens", "512", "--max-model-len", "1024", "--kv-cache-gb", "2"]
    flags += ["--gpu-memory-utilization", "0.7", "--no-enable-prefix-caching"]
    flags += ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    assert engine_settings(_parse([command, "m", *required, *flags])) == {
        "decode_attention": "triton",
        "cuda_graphs": False,
        "max_num_seqs": 8,
        "max_num_batched_tokens": 512,
        "max_model_len": 1024,
        "kv_cache_bytes": 2 * 2**30,
        "gpu_memory_fraction": 0.7,
        "enable_prefix_caching": False,
        "speculative": SpeculativeConfig(num_speculative_tokens=3),
    }
    with pytest.raises(SystemExit):
        _parse([command, "m", *required, "--decode-attention", "flash"])


def test_generate_with_speculative_decoding(ckpt: Checkpoint, capsys, spies) -> None:
    """--speculative-config reaches the engine, greedy output unchanged; a bad one is named
    by its flag before the model loads."""
    argv = ["generate", ckpt.directory, *CPU, "--prompt", "Hi Hi Hi Hi", "--raw"]
    argv += ["--max-tokens", "12", "--temperature", "0", "--ignore-eos"]
    rc, plain, err = run(capsys, *argv)
    assert rc == 0, err
    config = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    rc, out, err = run(capsys, *argv, "--speculative-config", config)
    assert rc == 0, err
    assert out == plain and out.strip()
    (llm, _, _), _ = spies["generate"].calls[-1]
    assert llm.engine.config.speculative.num_speculative_tokens == 3
    spies["load"].calls.clear()
    eagle = '{"method": "eagle", "num_speculative_tokens": 3}'
    rc, out, err = run(capsys, *argv, "--speculative-config", eagle)
    assert rc == 1 and one_line_error(err, "generate").startswith(
        "--speculative-config: speculative_config.method must be 'ngram'"
    )
    assert spies["load"].calls == []


def test_generate_request_larger_than_the_kv_cache(ckpt, tmp_path: Path, capsys, spies) -> None:
    """Named by its input line (LLM.generate's own message counts the prompts left to run,
    which after a resume are not the input's), before anything is generated."""
    source = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Hello there"}])
    per_token = ckpt.config.kv_cache_bytes_per_token(torch.float32)
    gb = str(3 * 16 * per_token / 2**30)  # three blocks of 16 tokens
    argv = ["generate", ckpt.directory, *CPU, "--input", source, "--kv-cache-gb", gb]
    rc, out, err = run(capsys, *argv, "--max-tokens", "40")
    assert rc == 1 and out == ""
    assert one_line_error(err, "generate").startswith(
        f"{source}:1: the request needs 5"  # 11 prompt tokens + 40 - 1
    )
    assert spies["generate"].calls == []
    rc, out, err = run(capsys, *argv, "--max-tokens", "20", "--n", "8", "--temperature", "1")
    assert rc == 0, err  # eight samples share the prompt's blocks and take turns (preemption)
    assert [len(r["output"]) for r in read_jsonl(out)] == [8, 8]


def test_generate_max_model_len(ckpt: Checkpoint, tmp_path: Path, capsys, spies) -> None:
    """--max-model-len caps prompt + output as the context window does: generation stops
    there, a longer prompt is refused, and a cap beyond the model's window is named."""
    prompt_ids = ckpt.loaded.tokenizer.encode(
        generation_prompt([{"role": "user", "content": "Hi"}], EOT)
    )
    cap = len(prompt_ids) + 3
    argv = [
        "generate",
        ckpt.directory,
        *CPU,
        "--input",
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}]),
    ]
    rc, out, err = run(capsys, *argv, "--max-model-len", cap, "--max-tokens", "50", "--ignore-eos")
    assert rc == 0, err
    [result] = read_jsonl(out)
    assert (result["completion_tokens"], result["finish_reason"]) == (3, "length")
    rc, out, err = run(capsys, *argv, "--max-model-len", len(prompt_ids))
    assert rc == 1
    assert one_line_error(err, "generate") == (
        f"{tmp_path / 'p.jsonl'}:1: the prompt has {len(prompt_ids)} tokens but --max-model-len "
        f"is {len(prompt_ids)} tokens (prompt and output together)"
    )
    window = ckpt.config.max_position_embeddings
    rc, out, err = run(capsys, *argv, "--max-model-len", window + 1)
    assert rc == 1 and out == ""
    assert one_line_error(err, "generate") == (
        f"--max-model-len is {window + 1}, beyond the model's context window of {window} "
        "tokens (max_position_embeddings)"
    )
    spies["load"].calls.clear()
    rc, out, err = run(capsys, *argv, "--max-num-seqs", "0")
    assert rc == 1 and one_line_error(err, "generate") == "--max-num-seqs must be >= 1, got 0"
    assert spies["load"].calls == []  # refused before the model loads
