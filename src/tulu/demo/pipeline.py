"""`tulu demo`: the whole life of a Tulu model, tiny and on a CPU, in a few minutes.

Each step runs the real command a user would type (printed with a ``$``), in this process,
so the demo proves the commands of the README work together:

1. tokenizer: a byte-level BPE trained on the text of the bundled raw samples;
2. data: ``tulu data convert`` for each of the seven bundled sources, ``tulu data mix``;
3. train: ``tulu train configs/tiny-demo.yaml`` (a 4-layer GPT-NeoX from scratch), loss plot;
4. eval: ``tulu eval`` on fixture-sized versions of the benchmarks (`tulu.demo.eval_data`);
5. serve: ``tulu serve`` on 127.0.0.1 in a child process, one streamed OpenAI-style chat
   request in the Tulu format, then a clean shutdown.

Everything goes under one output directory; a rerun replaces an earlier demo's files there but
refuses a directory that holds anything else.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tulu.errors import TuluError

__all__ = ["DEFAULT_CONFIG", "DemoError", "run_demo"]

DEFAULT_CONFIG = Path("configs/tiny-demo.yaml")
#: What a demo writes under its output directory (a rerun removes exactly these).
OUTPUTS = (
    "tokenizer",
    "data",
    "train",
    "eval-data",
    "eval",
    "server.log",
    "chat.json",
    "demo.json",
)
STEPS = 5
#: The hand-written raw files of the seven sources, and their recipe (package data).
SAMPLES = Path(str(resources.files("tulu.data"))) / "samples"
TOKENIZER_VOCAB = 2048


class DemoError(TuluError):
    """A demo step failed; the message names the step and the command."""


def _say(message: str = "") -> None:
    print(message, flush=True)


def _run(argv: list[str], step: str) -> None:
    """Run one `tulu` command in this process, as the user would type it."""
    from tulu.cli import main

    _say("  $ tulu " + shlex.join(argv))
    sys.stdout.flush()
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        raise DemoError(f"step {step!r} failed: `tulu {shlex.join(argv)}` exited with {code}")


def prepare_output(output: Path) -> None:
    """Create `output`, or clear an earlier demo's files from it; never touch anything else."""
    if os.path.lexists(output) and not output.is_dir():  # a dangling link too
        raise DemoError(f"--output {output} exists and is not a directory")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DemoError(f"--output {output}: cannot create it ({err.strerror or err})") from None
    foreign = sorted(p.name for p in output.iterdir() if p.name not in OUTPUTS)
    if foreign:
        raise DemoError(
            f"--output {output} holds files the demo did not write ({', '.join(foreign[:5])}); "
            "give an empty or new directory"
        )
    for name in OUTPUTS:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ------------------------------------------------------------------------------ 1. tokenizer
def sample_texts() -> list[str]:
    """Every string in the bundled raw sample files (what the demo tokenizer learns from)."""
    texts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for entry in sorted(SAMPLES.iterdir()):
        if entry.name.endswith(".jsonl"):
            for line in entry.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    walk(json.loads(line))
        elif entry.name.endswith(".json"):
            walk(json.loads(entry.read_text(encoding="utf-8")))
    return texts


def build_tokenizer(output: Path) -> Path:
    from tulu.demo import EOS, corpus_text, train_tokenizer

    text = EOS.join([corpus_text(), *sample_texts()])
    tokenizer = train_tokenizer(text, vocab_size=TOKENIZER_VOCAB)
    path = output / "tokenizer"
    tokenizer.save(path)
    _say(f"  {len(tokenizer):,} tokens, trained on the bundled samples' text -> {path}")
    return path


# ------------------------------------------------------------------------------ 2. data
def _option_flags(options: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags


def build_data(output: Path, tokenizer: Path) -> tuple[Path, Path]:
    """Convert each bundled source to records, then mix them with the samples' recipe."""
    from tulu.data.recipe import load_recipe

    recipe_path = SAMPLES / "mixture.yaml"
    recipe = load_recipe(recipe_path)
    data = output / "data"
    converted = data / "sources"
    converted.mkdir(parents=True)
    sources = []
    for source in recipe.sources:
        target = converted / f"{source.name}.jsonl"
        argv = ["data", "convert", "--source", source.source]
        for path in source.paths:
            argv += ["--input", str(path)]
        argv += ["--output", str(target), *_option_flags(dict(source.options))]
        if source.source == "sharegpt":
            argv += ["--tokenizer", str(tokenizer)]  # chunks of max 2,048 tokens
        _run(argv, "data")
        sources.append({"name": source.name, "source": "records", "path": f"sources/{target.name}"})
    mixture = {
        "seed": recipe.seed,
        "validation": recipe.validation,
        "dedup": list(recipe.dedup),
        "max_seq_length": recipe.max_seq_length,
        "sources": sources,
    }
    mixture_path = data / "mixture.yaml"
    header = (
        f"# The bundled samples ({recipe_path.name}), as converted records: written by tulu demo\n"
    )
    mixture_path.write_text(header + yaml.safe_dump(mixture, sort_keys=False), encoding="utf-8")
    mix = data / "mix.jsonl"
    _run(
        ["data", "mix", str(mixture_path), "--tokenizer", str(tokenizer), "--output", str(mix)],
        "data",
    )
    return mix, data / "mix.validation.jsonl"


# ------------------------------------------------------------------------------ 3. train
def train_model(
    output: Path,
    config: Path,
    tokenizer: Path,
    train: Path,
    validation: Path,
    overrides: Sequence[str],
) -> Path:
    run_dir = output / "train"
    argv = [
        "train",
        str(config),
        f"model.tokenizer={tokenizer}",
        f"data.train={train}",
        f"data.validation={validation}",
        f"checkpoint.output_dir={run_dir}",
        *overrides,
    ]
    _run(argv, "train")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not losses:
        raise DemoError(f"{run_dir / 'metrics.jsonl'}: no training loss was logged")
    picks = sorted({losses[round(i * (len(losses) - 1) / 7)] for i in range(8)})
    _say("  loss: " + "  ".join(f"step {s}: {loss:.2f}" for s, loss in picks))
    held_out = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if held_out:
        (first_step, first), (last_step, last) = held_out[0], held_out[-1]
        _say(
            f"  validation loss: step {first_step}: {first:.2f} ... step {last_step}: {last:.2f}"
            + (
                "  (a rise: ~130 conversations teach a tiny model to recite, not to generalise)"
                if last > first
                else ""
            )
        )
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise DemoError(f"training wrote no exported model at {final}")
    return final


# ------------------------------------------------------------------------------ 4. eval
def evaluate(output: Path, model: Path, max_examples: int | None, codex_samples: int) -> Path:
    from tulu.demo.eval_data import write_eval_data

    files = write_eval_data(output / "eval-data")
    _say(f"  fixture-sized benchmarks (hand-written, bundled) -> {files.data_dir}")
    results = output / "eval"
    argv = ["eval", str(model), "--data-dir", str(files.data_dir)]
    argv += ["--gsm-exemplars", str(files.gsm_exemplars), "--codex-samples", str(codex_samples)]
    argv += ["--output", str(results)]
    if max_examples is not None:
        argv += ["--max-examples", str(max_examples)]
    _run(argv, "eval")
    _say("  AlpacaFarm needs a judge model (tulu eval --judge-url URL), so the demo skips it.")
    return results


# ------------------------------------------------------------------------------ 5. serve
def first_training_question(train: Path) -> str:
    """The first single-turn user message of the training split (a tiny model can only be
    expected to answer what it has seen)."""
    with train.open(encoding="utf-8") as lines:
        for line in lines:
            messages = json.loads(line)["messages"]
            if len(messages) == 2 and messages[0]["role"] == "user":
                return messages[0]["content"]
    raise DemoError(f"{train}: no single-turn conversation to ask about")


def stream_chat(url: str, model: str, question: str, on_text: Callable[[str], None]) -> dict:
    """One streamed ``POST /v1/chat/completions``; returns the answer and the finish reason."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 64,
        "temperature": 0,
        "stream": True,
    }
    pieces, finish = [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        if response.status_code != 200:
            response.read()
            raise DemoError(f"chat request failed: HTTP {response.status_code}: {response.text}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: ") :])["choices"][0]
            text = choice.get("delta", {}).get("content") or ""
            if text:
                pieces.append(text)
                on_text(text)
            finish = choice.get("finish_reason") or finish
    return {"request": body, "answer": "".join(pieces), "finish_reason": finish}


def serve_and_chat(output: Path, model: Path, train: Path) -> dict:
    from tulu.server.child import start_server

    name = "tulu-demo"
    log = output / "server.log"
    extra = ["--served-model-name", name, "--log-level", "info"]
    _say(f"  $ tulu serve {model} --host 127.0.0.1 --port PORT " + shlex.join(extra) + f"  > {log}")
    server = start_server(model, log, extra_args=extra)
    try:
        _say(f"  serving at {server.url}")
        question = first_training_question(train)
        _say(
            f"  $ curl -N {server.url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{name}", "stream": true, "messages": [...]}}\''
        )
        _say("  user:      " + question.replace("\n", "\n             "))
        print("  assistant: ", end="", flush=True)
        chat = stream_chat(server.url, name, question, lambda t: print(t, end="", flush=True))
        _say(f"\n  (finish reason: {chat['finish_reason']})")
        _say(
            "  (a question from its training data: 4 layers trained for a minute on ~130 "
            "conversations can recite what they saw, not answer anything new)"
        )
    finally:
        code = server.stop()
    _say(f"  server stopped (exit code {code}); its log is {log}")
    chat["prompt"] = _tulu_prompt(question)  # what the server rendered (the test checks it)
    chat["server_exit_code"] = code
    return chat


def _tulu_prompt(question: str) -> str:
    from tulu.chat import generation_prompt
    from tulu.demo import EOS  # the demo tokenizer's end of text, as the server's

    return generation_prompt([{"role": "user", "content": question}], EOS)


# ------------------------------------------------------------------------------ the demo
def run_demo(
    output: str | Path = "runs/demo",
    config: str | Path = DEFAULT_CONFIG,
    train_overrides: Sequence[str] = (),
    max_examples: int | None = None,
    codex_samples: int = 10,
) -> dict:
    """Run the five steps (see the module doc); returns the summary written to demo.json."""
    started = time.perf_counter()
    output, config = Path(output), Path(config)
    if not config.is_file():
        raise DemoError(
            f"training config {config} not found: run the demo from the repository root "
            "(make demo) or pass --config path/to/tiny-demo.yaml"
        )
    if max_examples is not None and max_examples < 1:
        raise DemoError(f"--max-examples must be at least 1, got {max_examples}")
    if codex_samples < 10:
        raise DemoError(f"--codex-samples must be at least 10 (for pass@10), got {codex_samples}")
    prepare_output(output)
    starts: dict[str, float] = {}

    def step(number: int, title: str) -> None:
        starts[title.split(":")[0]] = time.perf_counter()
        _say(f"\n[{number}/{STEPS}] {title}")

    _say(f"tulu demo: a tiny Tulu model's whole life on this machine, written to {output}/")
    step(1, "tokenizer: byte-level BPE in the GPT-NeoX style")
    tokenizer = build_tokenizer(output)
    step(2, "data: convert the seven bundled sources, then mix them")
    train, validation = build_data(output, tokenizer)
    step(3, f"train: fine-tune a tiny GPT-NeoX with {config}")
    model = train_model(output, config, tokenizer, train, validation, train_overrides)
    step(4, "eval: the paper's benchmarks, fixture-sized")
    results = evaluate(output, model, max_examples, codex_samples)
    step(5, "serve: tulu serve + a streamed OpenAI-style chat request")
    chat = serve_and_chat(output, model, train)

    ended = time.perf_counter()
    total = round(ended - started, 1)
    ends = [*list(starts.values())[1:], ended]
    seconds = {
        name: round(end - start, 1) for (name, start), end in zip(starts.items(), ends, strict=True)
    }
    artefacts = {
        "tokenizer": output / "tokenizer",
        "mixture": train,
        "mixture stats": output / "data" / "mix.stats.json",
        "length histogram": output / "data" / "mix.lengths.png",
        "checkpoint": model,
        "metrics": output / "train" / "metrics.jsonl",
        "loss plot": output / "train" / "loss.png",
        "eval results": results / "results.json",
        "eval table": results / "results.md",
        "server log": output / "server.log",
        "chat": output / "chat.json",
    }
    missing = [str(p) for p in artefacts.values() if not p.exists() and p.name != "chat.json"]
    if missing:
        raise DemoError("the demo did not write: " + ", ".join(missing))
    (output / "chat.json").write_text(json.dumps(chat, indent=1, ensure_ascii=False) + "\n")
    scores = json.loads((results / "results.json").read_text(encoding="utf-8"))["results"]
    summary = {
        "output": str(output),
        "seconds": total,
        "step_seconds": seconds,
        "artefacts": {k: str(v) for k, v in artefacts.items()},
        "scores": {r["task"]: round(r["value"], 1) for r in scores},
        "answer": chat["answer"],
    }
    (output / "demo.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    _say(f"\nDone in {total:.0f} s. Everything is under {output}/:")
    width = max(len(k) for k in artefacts)
    for label, path in artefacts.items():
        _say(f"  {label:<{width}}  {path}")
    dry_run = _dry_run_command(config, tokenizer, train, validation, train_overrides)
    _say(f"Next: tulu chat {model}   |   tulu serve {model}   |   {dry_run}")
    return summary


def _dry_run_command(
    config: Path, tokenizer: Path, train: Path, validation: Path, overrides: Sequence[str]
) -> str:
    """The `tulu train --dry-run` of the demo's training, as a command that works as printed.

    The config names the default output's files (runs/demo/...); a demo written elsewhere, or
    trained with overrides, needs those on the command line too, or the dry run would look
    for data that is not there.
    """
    from tulu.train.config import load_train_config

    settings = load_train_config(config)
    paths = [
        ("model.tokenizer", settings.model.tokenizer, tokenizer),
        ("data.train", settings.data.train, train),
        ("data.validation", settings.data.validation, validation),
    ]
    extra = [f"{key}={new}" for key, old, new in paths if Path(old or "") != new]
    return shlex.join(["tulu", "train", str(config), *extra, *overrides, "--dry-run"])
