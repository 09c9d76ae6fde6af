"""Structured output: tulu's engine with a JSON schema vs transformers + xgrammar, one run.

Every request is constrained to one bounded JSON schema (`SCHEMA`: an object of enums,
booleans, bounded integers and a nested object, in a fixed order, with no free whitespace), so
even a random-weight model finishes: its longest text is `MAX_TOKENS` - 1 bytes, a byte or
more per token, and the EOS ends it. All decoding is greedy. N prompts of `--prompt-len` random
(non-special) tokens; three systems on the same weights and prompts:
- tulu, constrained: `SamplingParams(structured_output=StructuredOutput(json=SCHEMA))`, the
  grammar's mask applied to every row in the engine's batched step;
- tulu, unconstrained: the same requests without the schema, each with `max_tokens` set to
  the length its constrained completion had (EOS ignored): both runs generate the same number
  of tokens, so their difference is the constraint's cost (masks, matchers, the grammar);
- transformers' `generate` with xgrammar's own `xgrammar.contrib.hf.LogitsProcessor` (one
  matcher per row, the same compiled grammar), on batches of `--hf-batch-size` prompts, each
  row generating until its EOS; its output tokens are counted up to that EOS.
The grammar is compiled before any timed run (in tulu by the warm-up run; its compiler caches
it). Each run uses a new prompt set (a repeat must not hit tulu's prefix cache); each figure
is the median of `--repeats` runs after one warm-up run. It prints output tokens/s and the
ratios, checks that every constrained output (tulu's and transformers') parses as JSON and
satisfies the schema, and counts the prompts whose greedy tokens equal transformers'; it exits
1 when an output breaks the schema or, in float32, when the greedy tokens differ (in 16-bit
types the two implementations' rounding may pick different tokens). Writes
`results/structured-output-PRESET-DEVICE.json`.

The tokenizer (xgrammar needs each token's bytes) is `--tokenizer`, by default Pythia's
GPT-NeoX-20B tokenizer at ../shared/data/tokenizer/gpt-neox-20b/tokenizer.json when it exists,
else the demo tokenizer (`tulu.demo.train_tokenizer`); the model's vocabulary must cover it.

    python benchmarks/structured_output.py                     # CPU: pythia-70m, float32
    python benchmarks/structured_output.py --preset pythia-6.9b   # on a GPU: 256 prompts
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from tulu.bench.workloads import (
    add_random_model_arguments,
    free_device_memory,
    median_run,
    output_rate,
    random_model,
    require_positive,
    resolve_random_model_arguments,
    sync,
    transformers_twin,
)
from tulu.engine.engine import LLM, EngineConfig
from tulu.engine.sampling import SamplingParams
from tulu.engine.structured import StructuredOutput, grammar_compiler
from tulu.errors import TuluError
from tulu.jsonl import check_output, write_json
from tulu.model.config import NeoXConfig
from tulu.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared/data/tokenizer/gpt-neox-20b/tokenizer.json"


def _integer(minimum: int, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    """Every property required and no other: the grammar writes them all, in this order."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


SCHEMA = _object(
    {
        "category": {"enum": ["book", "music", "film", "game", "toy"]},
        "color": {"enum": ["red", "green", "blue", "black", "white"]},
        "size": {"enum": ["S", "M", "L", "XL"]},
        "in_stock": {"type": "boolean"},
        "quantity": _integer(0, 999),
        "rating": _integer(1, 5),
        "shipping": _object({"express": {"type": "boolean"}, "days": _integer(1, 30)}),
    }
)


def longest_instance(schema: dict[str, Any]) -> Any:
    """The instance of `schema` (of the kinds `SCHEMA` uses) with the longest JSON text."""
    if "enum" in schema:
        return max(schema["enum"], key=lambda value: len(json.dumps(value)))
    kind = schema["type"]
    if kind == "boolean":
        return False
    if kind == "integer":
        return max(schema["minimum"], schema["maximum"], key=lambda value: len(str(value)))
    return {name: longest_instance(sub) for name, sub in schema["properties"].items()}


# xgrammar writes the compact one-line form with json.dumps' default separators (", ", ": ");
# a token is at least one byte, so this many tokens always reach the grammar's end and its EOS.
MAX_TOKENS = len(json.dumps(longest_instance(SCHEMA))) + 1


def violations(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Where `value` breaks `schema` (of the kinds `SCHEMA` uses), checked by Python itself."""
    if "enum" in schema:
        ok = any(type(value) is type(e) and value == e for e in schema["enum"])
        return [] if ok else [f"{where}: {value!r} is not one of {schema['enum']}"]
    kind = schema["type"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    if kind == "integer":
        low, high = schema["minimum"], schema["maximum"]
        ok = type(value) is int and low <= value <= high
        return [] if ok else [f"{where}: {value!r} is not an integer in [{low}, {high}]"]
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object"]
    properties = schema["properties"]
    if set(value) != set(properties):
        return [f"{where}: keys {sorted(value)}, expected {sorted(properties)}"]
    return [
        problem
        for name, sub in properties.items()
        for problem in violations(value[name], sub, f"{where}.{name}")
    ]


def text_violations(text: str) -> list[str]:
    """Why `text` is not a JSON document satisfying `SCHEMA` (empty when it is one)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return [f"not JSON ({err}): {text!r}"]
    return violations(value, SCHEMA)


def load_tokenizer(path: Path | None) -> tuple[Tokenizer, str]:
    """`--tokenizer`, else the GPT-NeoX tokenizer in ../shared, else the demo tokenizer;
    with the name the results record."""
    if path is None and DEFAULT_TOKENIZER.is_file():
        path = DEFAULT_TOKENIZER
    if path is None:
        from tulu.demo import corpus_text, train_tokenizer

        return train_tokenizer(corpus_text()), "demo"
    try:
        return Tokenizer.load(path), str(path)
    except TuluError as err:
        raise TuluError(f"--tokenizer: {err}") from None


def prompt_sets(
    count: int, num_prompts: int, length: int, tokenizer: Tokenizer
) -> list[list[list[int]]]:
    """`count` sets of random-token prompts (seeded), drawn from the tokenizer's ordinary
    tokens: every prompt is also text the tokenizer could have produced."""
    special = tokenizer.special_ids()
    ids = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(0)
    return [
        [[rng.choice(ids) for _ in range(length)] for _ in range(num_prompts)] for _ in range(count)
    ]


def tulu_run(
    llm: LLM,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    device: torch.device,
) -> dict[str, Any]:
    """All prompts through the engine at once; the figures and each completion's tokens."""
    sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = [out.outputs[0].token_ids for out in outputs]
    return output_rate(sum(map(len, tokens)), seconds) | {"tokens": tokens}


def tulu_runs(
    model: Any,
    tokenizer: Tokenizer,
    sets: list[list[list[int]]],
    params_of: Callable[[int], SamplingParams | list[SamplingParams]],
    device: torch.device,
) -> dict[str, Any]:
    """`median_run` of every prompt set (set k with `params_of(k)`) on a fresh engine, whose
    prefix cache holds no earlier run's prompts. The engine is dropped on return; call
    `free_device_memory` before the next system is built (on a GPU its KV cache takes most of
    the free memory)."""
    llm = LLM(model, tokenizer, EngineConfig())
    return median_run(lambda k: tulu_run(llm, sets[k], params_of(k), device), len(sets))


def first_eos(row: list[int], eos: int) -> list[int]:
    """A transformers row up to and including its first EOS (the rest is padding)."""
    return row[: row.index(eos) + 1] if eos in row else row


def hf_run(
    model: Any,
    prompts: list[list[int]],
    compiled: Any,
    eos: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """transformers' greedy `generate` under xgrammar's processor (a new one per call, as it
    holds its matchers' state), in batches of `batch_size` prompts; the prompts share a
    length, so there is no padding."""
    from xgrammar.contrib.hf import LogitsProcessor

    tokens: list[list[int]] = []
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[i : i + batch_size], device=device)
        processor = LogitsProcessor([compiled] * len(ids))
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                eos_token_id=eos,
                pad_token_id=eos,
                logits_processor=[processor],
            )
        tokens += [first_eos(row, eos) for row in out[:, ids.shape[1] :].tolist()]
    sync(device)
    seconds = time.perf_counter() - start
    return output_rate(sum(map(len, tokens)), seconds) | {"tokens": tokens}


def check_tokens(
    name: str, runs: list[list[list[int]]], tokenizer: Tokenizer, eos: int
) -> tuple[int, int, list[str]]:
    """(valid, total, problems) over every completion of every prompt set: a valid one ends
    with the EOS and its text before it satisfies `SCHEMA`."""
    valid, total, problems = 0, 0, []
    for set_index, completions in enumerate(runs):
        for prompt_index, ids in enumerate(completions):
            total += 1
            where = f"{name}, set {set_index}, prompt {prompt_index}"
            if not ids or ids[-1] != eos:
                problems.append(f"{where}: no EOS within {MAX_TOKENS} tokens")
                continue
            found = text_violations(tokenizer.decode(ids[:-1]))
            problems += [f"{where}: {problem}" for problem in found]
            valid += not found
    return valid, total, problems


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_random_model_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 256 GPU, 16 CPU")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=64, help="prompts per generate")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help=f"default: {DEFAULT_TOKENIZER} or the demo's"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    require_positive(parser, args, ("num_prompts", "prompt_len", "hf_batch_size", "repeats"))
    return args


def require_packages() -> None:
    """Both systems' packages, checked before any weights are built."""
    for package in ("xgrammar", "transformers"):
        if importlib.util.find_spec(package) is None:
            raise TuluError(f"this benchmark needs the {package} package (pip install {package})")


@dataclass
class Setup:
    """What the flags resolve to, all checked before any weights are built."""

    device: torch.device
    dtype: torch.dtype
    config: NeoXConfig
    tokenizer: Tokenizer
    tokenizer_name: str
    eos: int
    num_prompts: int
    output: Path


def resolve(args: argparse.Namespace) -> Setup:
    """The run's settings from `args`; TuluError names the flag that cannot run."""
    require_packages()
    device, dtype, config = resolve_random_model_arguments(args)
    gpu = device.type == "cuda"
    output = args.output or RESULTS / f"structured-output-{args.preset}-{device.type}.json"
    check_output(output)
    if args.prompt_len + MAX_TOKENS > config.max_position_embeddings:
        raise TuluError(
            f"--prompt-len {args.prompt_len} + the schema's {MAX_TOKENS} output tokens exceed "
            f"the model's {config.max_position_embeddings}-token context"
        )
    tokenizer, name = load_tokenizer(args.tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise TuluError(
            f"--tokenizer {name} has {len(tokenizer):,} tokens, more than the "
            f"{config.vocab_size:,} rows of --preset {args.preset}'s vocabulary"
        )
    if tokenizer.eos_token_id is None:
        raise TuluError(f"--tokenizer {name}: no EOS token, which ends every structure")
    num_prompts = args.num_prompts or (256 if gpu else 16)
    return Setup(
        device, dtype, config, tokenizer, name, tokenizer.eos_token_id, num_prompts, output
    )


def run_systems(setup: Setup, sets: list[list[list[int]]], hf_batch_size: int) -> dict[str, dict]:
    """The three systems' `median_run`, one at a time on one random-weight model."""
    device, tokenizer = setup.device, setup.tokenizer
    model = random_model(setup.config, device, seed=0)
    spec = StructuredOutput(json=SCHEMA)
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731

    log(f"tulu, constrained: {setup.num_prompts} prompts, up to {MAX_TOKENS} tokens each")
    schema_params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_output=spec)
    constrained = tulu_runs(model, tokenizer, sets, lambda _k: schema_params, device)
    free_device_memory(device)

    log("tulu, unconstrained, the same number of tokens per request")
    lengths = [[len(ids) for ids in run] for run in constrained["tokens"]]

    def same_lengths(k: int) -> list[SamplingParams]:
        return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths[k]]

    unconstrained = tulu_runs(model, tokenizer, sets, same_lengths, device)
    if [[len(ids) for ids in run] for run in unconstrained["tokens"]] != lengths:
        raise RuntimeError("the unconstrained run did not generate the constrained lengths")
    free_device_memory(device)

    log(f"transformers generate + xgrammar's LogitsProcessor, batches of {hf_batch_size}")
    compiled = grammar_compiler(tokenizer, setup.config.vocab_size, setup.eos).compile(spec)
    twin = transformers_twin(model)
    hf = median_run(
        lambda k: hf_run(twin, sets[k], compiled, setup.eos, hf_batch_size, device), len(sets)
    )
    return {
        "tulu_constrained": constrained,
        "tulu_unconstrained_same_lengths": unconstrained,
        "transformers_xgrammar": hf,
    }


def measure(args: argparse.Namespace) -> tuple[Setup, dict[str, Any], list[str], bool]:
    """(the settings, the JSON summary, every schema violation, whether every greedy output
    equals transformers')."""
    setup = resolve(args)
    sets = prompt_sets(args.repeats + 1, setup.num_prompts, args.prompt_len, setup.tokenizer)
    systems = run_systems(setup, sets, args.hf_batch_size)
    tokens = {key: figures.pop("tokens") for key, figures in systems.items()}
    ours, theirs = tokens["tulu_constrained"], tokens["transformers_xgrammar"]
    problems: list[str] = []
    validity = {}
    for name, runs in (("tulu", ours), ("transformers", theirs)):
        valid, total, found = check_tokens(name, runs, setup.tokenizer, setup.eos)
        validity[name] = f"{valid}/{total}"
        problems += found
    pairs = [
        (a, b)
        for run_a, run_b in zip(ours, theirs, strict=True)
        for a, b in zip(run_a, run_b, strict=True)
    ]
    agree = sum(a == b for a, b in pairs)
    rate = {key: figures["output_tokens_per_s"] for key, figures in systems.items()}
    gpu = setup.device.type == "cuda"
    summary = {
        "preset": args.preset,
        "layers": setup.config.num_hidden_layers,
        "device": str(setup.device),
        "device_name": torch.cuda.get_device_name(setup.device) if gpu else "cpu",
        "dtype": str(setup.dtype),
        "threads": torch.get_num_threads(),
        "versions": {name: version(name) for name in ("torch", "transformers", "xgrammar")},
        "tokenizer": setup.tokenizer_name,
        "tokenizer_tokens": len(setup.tokenizer),
        "decoding": "greedy",
        "schema": SCHEMA,
        "max_tokens": MAX_TOKENS,
        "num_prompts": setup.num_prompts,
        "prompt_len": args.prompt_len,
        "hf_batch_size": args.hf_batch_size,
        "repeats": args.repeats,
        "mean_output_tokens": systems["tulu_constrained"]["output_tokens"] / setup.num_prompts,
        **systems,
        "ratio_tulu_vs_transformers": rate["tulu_constrained"] / rate["transformers_xgrammar"],
        "ratio_constrained_vs_unconstrained": rate["tulu_constrained"]
        / rate["tulu_unconstrained_same_lengths"],
        "valid_outputs": validity,
        "greedy_agreement_with_transformers": f"{agree}/{len(pairs)}",
    }
    return setup, summary, problems, agree == len(pairs)


def report(summary: dict[str, Any]) -> None:
    """The table of output tokens/s and the ratios."""
    print(
        f"\n{summary['num_prompts']} prompts x {summary['prompt_len']} tokens, a JSON schema "
        f"(mean {summary['mean_output_tokens']:.1f} output tokens), greedy, "
        f"{summary['preset']} {summary['dtype']} on {summary['device']}"
    )
    for label, key in (
        ("tulu, JSON schema", "tulu_constrained"),
        ("tulu, unconstrained, same lengths", "tulu_unconstrained_same_lengths"),
        ("transformers + xgrammar processor", "transformers_xgrammar"),
    ):
        print(f"  {label:<36} {summary[key]['output_tokens_per_s']:>9.1f} output tokens/s")
    ratio = summary["ratio_constrained_vs_unconstrained"]
    print(
        f"  tulu / transformers: {summary['ratio_tulu_vs_transformers']:.2f}x; constrained / "
        f"unconstrained: {ratio:.2f}x (the mask costs {100 * (1 - ratio):.0f}%)\n"
        f"  outputs satisfying the schema: tulu {summary['valid_outputs']['tulu']}, "
        f"transformers {summary['valid_outputs']['transformers']}; greedy tokens equal to "
        f"transformers': {summary['greedy_agreement_with_transformers']}"
    )


def main() -> int:
    args = parse_args()
    try:
        setup, summary, problems, greedy_equal = measure(args)
    except TuluError as err:
        print(f"structured_output.py: error: {err}", file=sys.stderr)
        return 1
    report(summary)
    for problem in problems[:10]:
        print(f"  schema violation: {problem}", file=sys.stderr)
    write_json(setup.output, summary)
    print(f"wrote {setup.output}")
    # In 16-bit types tulu's and transformers' rounding differ, and so may a greedy choice.
    must_agree = setup.dtype == torch.float32
    return 1 if problems or (must_agree and not greedy_equal) else 0


if __name__ == "__main__":
    sys.exit(main())
