"""The `tulu` command: parses arguments and calls the packages that do the work.

Errors caused by the user's input (`TuluError`) are printed as one line, without a traceback,
and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tulu import __version__
from tulu.dependency_noise import quiet_dependency_noise
from tulu.engine.options import add_engine_arguments, named_by_flags
from tulu.errors import GenerationError, TuluError

# ---------------------------------------------------------------------------------- arguments


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="checkpoint directory, hub id (org/name), or LoRA adapter directory (merged at load)",
    )
    p.add_argument(
        "--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) for hub ids")


def _add_sampling_args(
    p: argparse.ArgumentParser, temperature: float, max_tokens: int
) -> argparse._ArgumentGroup:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=max_tokens
    )
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument(
        "--typical-p",
        type=float,
        default=1.0,
        metavar="P",
        help="locally typical sampling, 0 < P <= 1 (1 = off): keep the tokens whose "
        "information is closest to the entropy, up to probability mass P",
    )
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument(
        "--presence-penalty", type=float, default=0.0, help="OpenAI's, over generated tokens"
    )
    g.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="OpenAI's, over generated tokens"
    )
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument(
        "--bad-words",
        action="append",
        default=[],
        metavar="WORD",
        help="a word never to generate, as vLLM's bad_words (repeatable)",
    )
    g.add_argument(
        "--stop-token-ids",
        type=int,
        nargs="+",
        default=[],
        metavar="ID",
        help="token ids that end a reply, besides EOS",
    )
    g.add_argument(
        "--min-tokens", type=int, default=0, help="tokens generated before a stop may end a reply"
    )
    g.add_argument("--ignore-eos", action="store_true")
    return g


def _sampling_params(args: argparse.Namespace, **only_generate: Any):
    """The SamplingParams of the shared sampling flags (plus `tulu generate`'s own: n,
    logprobs, include_stop_str_in_output), a bad value named by its flag."""
    from tulu.engine.sampling import SamplingParams

    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            typical_p=args.typical_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=list(args.stop),
            stop_token_ids=list(args.stop_token_ids),
            bad_words=list(args.bad_words),
            min_tokens=args.min_tokens,
            ignore_eos=args.ignore_eos,
            **only_generate,
        )
    except GenerationError as err:
        raise named_by_flags(err) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tulu",
        description="Train, evaluate and serve instruction-tuned GPT-NeoX models in the Tulu chat format.",
    )
    parser.add_argument("--version", action="version", version=f"tulu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate from a prompt or a JSONL file of prompts")
    _add_model_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (a user message unless --raw)")
    src.add_argument(
        "--input",
        type=Path,
        help='JSONL: {"prompt": ...} or {"messages": [...]} per line (- reads standard input)',
    )
    gen.add_argument(
        "--output",
        type=Path,
        help="JSONL results (default: stdout); each result is kept in OUTPUT.progress as it "
        "finishes, so the same command run again after an interruption resumes",
    )
    gen.add_argument(
        "--raw", action="store_true", help="use prompts as plain text, not the chat format"
    )
    gen.add_argument(
        "--system",
        help="system prompt for chat-format prompts ('messages' that hold one keep their own)",
    )
    _add_lora_modules_arg(gen, "a record picks one with its 'lora' field, or --lora for all")
    gen.add_argument("--lora", metavar="NAME", help="the adapter of every prompt (default: base)")
    add_engine_arguments(gen)
    sampling = _add_sampling_args(gen, temperature=0.0, max_tokens=256)
    sampling.add_argument(
        "--n",
        type=int,
        default=1,
        help="samples per prompt; above 1, output, finish_reason, completion_tokens (and "
        "logprobs) are lists with one item per sample",
    )
    sampling.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="K",
        help="add each generated token's log-probability and its K most likely alternatives "
        "(0..20), from the raw logits, as the field 'logprobs'",
    )
    sampling.add_argument(
        "--include-stop-str-in-output",
        action="store_true",
        help="keep the stop string that ended a reply at its end",
    )
    structure = gen.add_argument_group(
        "structured output (needs xgrammar: pip install 'tulu[structured]')"
    ).add_mutually_exclusive_group()
    structure.add_argument(
        "--json-schema", type=Path, metavar="FILE", help="replies follow this JSON schema"
    )
    structure.add_argument("--json-object", action="store_true", help="replies are JSON objects")
    structure.add_argument("--regex", help="replies match this regular expression")
    structure.add_argument(
        "--choice", action="append", metavar="TEXT", help="replies are one of these (repeatable)"
    )
    structure.add_argument(
        "--grammar", type=Path, metavar="FILE", help="replies follow this EBNF grammar (GBNF)"
    )

    chat = sub.add_parser("chat", help="interactive chat in the Tulu format (streams replies)")
    _add_model_args(chat)
    chat.add_argument("--system", help="initial system prompt")
    _add_sampling_args(chat, temperature=0.7, max_tokens=512)

    info = sub.add_parser(
        "info", help="parameters, memory for weights and KV cache of a checkpoint"
    )
    info.add_argument(
        "model",
        metavar="MODEL",
        help="checkpoint directory, hub id, LoRA adapter directory, or preset (pythia-6.9b)",
    )
    info.add_argument("--dtype", help="dtype to size memory for (default: the checkpoint's)")
    info.add_argument("--revision", help="hub revision (branch, tag or commit) for hub ids")
    info.add_argument("--json", action="store_true", help="print JSON")

    serve = sub.add_parser(
        "serve", help="serve OpenAI- and TGI-compatible HTTP APIs and a web chat page"
    )
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key", default=None, help="required bearer token (default: $TULU_API_KEY)"
    )
    serve.add_argument(
        "--served-model-name", default=None, help="model id in the APIs (default: MODEL)"
    )
    _add_lora_modules_arg(
        serve, "a request picks one with model=NAME (OpenAI) or parameters.adapter_id=NAME (TGI)"
    )
    serve.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): adapters "
        "added and removed while serving; anyone with the API key can make the server read "
        "an adapter directory",
    )
    serve.add_argument(
        "--max-queue", type=int, default=1024, help="requests waiting beyond that before 429"
    )
    serve.add_argument(
        "--max-best-of",
        type=int,
        default=2,
        help="the largest `best_of` a TGI request may ask for, 1 to 128 (TGI's default: 2; "
        "1 refuses best_of > 1)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds before a request is aborted (default: 600; inf: no timeout)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get on SIGTERM",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    add_engine_arguments(serve)

    from tulu.bench.cli import add_bench_parser
    from tulu.data.cli import add_data_parser
    from tulu.eval.cli import add_eval_parser
    from tulu.train.cli import add_export_parser, add_train_parser

    add_data_parser(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="data, training, evaluation and serving of a tiny model, end to end on CPU",
        description="Convert and mix the bundled samples, train a tiny GPT-NeoX with "
        "configs/tiny-demo.yaml, evaluate it on fixture-sized benchmarks, serve it and stream a "
        "chat answer; every artefact goes under --output.",
    )
    demo.add_argument("--output", type=Path, default=Path("runs/demo"))
    demo.add_argument(
        "--config", type=Path, default=Path("configs/tiny-demo.yaml"), help="training config"
    )
    demo.add_argument(
        "--max-examples", type=int, default=None, help="cap examples per benchmark task"
    )
    demo.add_argument(
        "--codex-samples", type=int, default=10, help="samples per HumanEval problem (>= 10)"
    )
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    return parser


def _add_lora_modules_arg(parser: argparse.ArgumentParser, picking: str) -> None:
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=DIR",
        help="LoRA adapters run unmerged beside the base model, as in vLLM (NAME=DIR, or vLLM's "
        f'JSON form {{"name": NAME, "path": DIR}}): {picking}',
    )


# ---------------------------------------------------------------------------------- commands


def _prompts_of(
    args: argparse.Namespace, results: tuple[str, ...]
) -> list[tuple[str, dict[str, Any], Any]]:
    """(where, record, prompt) for every input, all validated before the model is loaded.

    Chat prompts are rendered once here so that a bad role or field fails before any work. A
    record may not hold a field of `results` (what generate adds to it).
    """
    from tulu.chat import generation_prompt
    from tulu.data.readers import BLANK, iter_jsonl, parse_jsonl_line
    from tulu.data.records import BadInput, check_object
    from tulu.tokenizer import check_text

    if args.prompt is not None:
        records = [("--prompt", {"prompt": args.prompt})]
    elif str(args.input) == "-":  # JSON Lines piped in, read whole before the model loads
        lines = enumerate(sys.stdin.buffer, start=1)
        values = (
            (f"<stdin>:{n}", parse_jsonl_line(raw, f"<stdin>:{n}", first=n == 1))
            for n, raw in lines
        )
        records = [(w, check_object(v, w)) for w, v in values if v is not BLANK]
    else:
        records = [(w, check_object(v, w)) for w, v in iter_jsonl(args.input, BadInput())]
    if args.raw and args.system:
        raise TuluError(
            "--system cannot be used with --raw (raw prompts are not in the chat format)"
        )
    # Text the tokenizer cannot encode (undecodable bytes arrive as surrogates) is named by
    # its flag or field here: found when the prompt is encoded, it would be blamed on the
    # prompt, at a position that counts the role headers and the system prompt.
    check_text(args.system, "--system")
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompts = []
    for where, record in records:
        written = sorted(set(results) & set(record))
        if written:
            # The result would replace them: a gold 'output' would be lost.
            raise TuluError(
                f"{where}: field {written[0]!r} is one that generate writes "
                f"({', '.join(sorted(results))}); rename it so that it is kept"
            )
        if "messages" in record and "prompt" in record:
            raise TuluError(f"{where}: has both 'prompt' and 'messages'; keep one of them")
        if "messages" in record:
            if args.raw:
                raise TuluError(f"{where}: 'messages' records cannot be used with --raw")
            messages = record["messages"]
            if not isinstance(messages, list) or not messages:
                raise TuluError(f"{where}: field 'messages' must be a non-empty list")
            has_system = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
            prompt: Any = messages if has_system else system + messages
        elif isinstance(record.get("prompt"), str):
            text = record["prompt"]
            prompt = text if args.raw else system + [{"role": "user", "content": text}]
        else:
            raise TuluError(f"{where}: needs a string field 'prompt' or a list field 'messages'")
        if not args.raw:
            try:
                generation_prompt(prompt, "<eos>")
            except TuluError as err:
                raise TuluError(f"{where}: {err}") from None
        if "messages" in record:
            for index, message in enumerate(record["messages"]):
                check_text(message["content"], f"{where}: message {index}, field 'content'")
        else:
            check_text(
                record["prompt"], where if args.prompt is not None else f"{where}: field 'prompt'"
            )
        prompts.append((where, record, prompt))
    return prompts


def _adapters_of(
    args: argparse.Namespace, prompts: list[tuple[str, dict[str, Any], Any]]
) -> tuple[dict[str, str], list[str | None]]:
    """(--lora-modules as {name: dir}, the adapter of each prompt): a record's 'lora' field,
    else --lora, else None (the base); every name checked before the model loads."""
    from tulu.engine.lora import parse_lora_modules

    modules = parse_lora_modules(args.lora_modules)
    known = ", ".join(map(repr, modules)) or "none (give them with --lora-modules NAME=DIR)"
    if args.lora is not None and args.lora not in modules:
        raise TuluError(f"--lora: no adapter named {args.lora!r}; loaded: {known}")
    names = []
    for where, record, _ in prompts:
        name = record.get("lora", args.lora)
        if name is not None and (not isinstance(name, str) or name not in modules):
            raise TuluError(f"{where}: field 'lora': no adapter named {name!r}; loaded: {known}")
        names.append(name)
    return modules, names


def _structured_output(args: argparse.Namespace) -> tuple[Any, str | None]:
    """`tulu generate`'s structured-output flag as a StructuredOutput, and the flag as typed
    (for errors); (None, None) without one. Files are read here, errors naming them."""
    from tulu.engine.structured import StructuredOutput

    if args.json_schema is not None:
        flag = f"--json-schema {args.json_schema}"
        text = _read_text_file(args.json_schema, flag)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as err:
            raise TuluError(
                f"{flag}: not JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from None
        if not isinstance(schema, dict):
            raise TuluError(f"{flag}: a JSON schema is an object, not {type(schema).__name__}")
        return StructuredOutput(json=schema), flag
    if args.grammar is not None:
        flag = f"--grammar {args.grammar}"
        return StructuredOutput(grammar=_read_text_file(args.grammar, flag)), flag
    if args.json_object:
        return StructuredOutput(json_object=True), "--json-object"
    for flag, field, value in (
        ("--regex", "regex", args.regex),
        ("--choice", "choice", args.choice),
    ):
        if value is None:
            continue
        try:
            return StructuredOutput(**{field: value}), flag
        except GenerationError:  # an empty --regex or --choice
            raise TuluError(f"{flag}: expected a non-empty {field}, got {value!r}") from None
    return None, None


def _read_text_file(path: Path, flag: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TuluError(
            f"{flag}: cannot read it ({getattr(err, 'strerror', None) or err})"
        ) from None
    if not text.strip():
        raise TuluError(f"{flag}: the file is empty")
    return text


def _check_structure_compiles(structured: Any, flag: str | None, llm: Any) -> None:
    """Compile the constraint once before any prompt runs: a bad schema, regex or grammar is
    named by its flag rather than failing the first request."""
    from tulu.engine.structured import name_structured_field

    if llm.engine.tokenizer is None:
        raise TuluError(f"{flag}: needs the model's tokenizer, and it has none")
    try:
        llm.engine.compile_structured_output(structured)
    except GenerationError as err:
        raise TuluError(name_structured_field(str(err), flag)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate for every prompt; with --output, one run at a time: a second one given the
    same --output is refused before it reads or writes anything (see `tulu.generate_resume`)."""
    from tulu.generate_resume import writing_alone

    with writing_alone(args.output):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    """`tulu generate`; with --output, each result is kept as it finishes, so an interrupted
    run resumes (see `tulu.generate_resume`)."""
    from dataclasses import replace

    from tulu.engine.engine import LLM, EngineConfig
    from tulu.engine.options import engine_settings
    from tulu.engine.reference import check_prompt_length
    from tulu.engine.sampling import check_token_ids_in_vocab
    from tulu.generate_resume import Progress, progress_path, result_fields
    from tulu.jsonl import check_output, write_jsonl
    from tulu.pretrained import load_pretrained
    from tulu.token_strings import TokenStrings

    engine_options = engine_settings(args)
    structured, structure_flag = _structured_output(args)
    try:
        params = _sampling_params(
            args,
            n=args.n,
            logprobs=args.logprobs,
            include_stop_str_in_output=args.include_stop_str_in_output,
            structured_output=structured,
        )
    except TuluError as err:  # "--min-tokens cannot be combined with structured_output"
        if structure_flag is None:
            raise
        from tulu.engine.structured import name_structured_field

        raise TuluError(name_structured_field(str(err), structure_flag)) from None
    prompts = _prompts_of(args, result_fields(params))
    lora_modules, lora_names = _adapters_of(args, prompts)
    check_output(args.output, inputs=[args.input] if args.input not in (None, Path("-")) else [])
    progress = None
    if args.output is not None:
        settings = _resume_settings(args, params, prompts, lora_modules)
        progress = Progress.load(
            progress_path(args.output), settings, len(prompts), result_fields(params), params.n
        )
    loaded = load_pretrained(
        args.model, dtype=args.dtype, device=args.device, revision=args.revision
    )
    try:
        check_token_ids_in_vocab(params, loaded.model.config.vocab_size)
        config = EngineConfig(**engine_options)
        llm = LLM(loaded.model, loaded.tokenizer, config, lora_modules=lora_modules)
    except GenerationError as err:
        raise named_by_flags(err) from None
    if structured is not None:
        _check_structure_compiles(structured, structure_flag, llm)
    window = llm.engine.max_model_len
    jobs = []  # (record, prompt ids, params) for every input, checked before generating
    for where, record, prompt in prompts:
        try:
            ids = llm.engine.encode_prompt(prompt)
            check_prompt_length(
                len(ids),
                window,
                "--max-model-len" if args.max_model_len else "the model's context window",
            )
        except TuluError as err:
            raise TuluError(f"{where}: {err}") from None
        # Like the reference generator, stop at the context window rather than refuse.
        max_tokens = min(params.max_tokens, window - len(ids))
        fitted = replace(
            params, max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens)
        )
        try:  # a KV cache too small for it (--kv-cache-gb), named by the record's place
            llm.engine.check_fits(len(ids), fitted)
        except TuluError as err:
            raise TuluError(f"{where}: {err}") from None
        jobs.append((record, ids, fitted))

    # One prompt to the terminal streams its reply; several samples or log-probabilities are
    # printed whole, as JSON.
    stream = (
        args.prompt is not None
        and args.output is None
        and params.n == 1
        and params.logprobs is None
    )
    strings = TokenStrings(loaded.tokenizer) if params.logprobs is not None else None
    todo = list(range(len(jobs)))
    if progress is not None:
        progress.start({**settings, "model": _model_identity(loaded, jobs, lora_names)})
        todo = [i for i in todo if i not in progress.done]
        if progress.done:
            print(
                f"resuming: {len(progress.done)} of {len(jobs)} results kept in {progress.path}",
                file=sys.stderr,
            )

    def on_output(output) -> None:
        if stream:
            sys.stdout.write(output.outputs[0].delta_text)
            sys.stdout.flush()
        if progress is not None and output.finished:
            progress.add(int(output.request_id), _result_fields(output, strings))

    try:
        outputs = llm.generate(
            [jobs[i][1] for i in todo],
            [jobs[i][2] for i in todo],
            on_output=on_output,
            progress=len(todo) > 16 and sys.stderr.isatty(),
            lora=[lora_names[i] for i in todo],
            request_ids=[str(i) for i in todo],  # on_output's index of each result
        )
    except BaseException:
        if progress is not None and progress.done:
            progress.close()
            print(
                f"{len(progress.done)} of {len(jobs)} results kept in {progress.path}: run the "
                "same command again to generate only the others",
                file=sys.stderr,
            )
        elif progress is not None:
            progress.remove()  # a header alone: nothing to resume
        raise
    if progress is not None:
        fields = progress.done  # the results kept before, and those just generated
    else:
        fields = {
            i: _result_fields(output, strings) for i, output in zip(todo, outputs, strict=True)
        }
    results = [{**record, **fields[i]} for i, (record, _, _) in enumerate(jobs)]
    if stream:
        sys.stdout.write("\n")
        tokens, finish = results[0]["completion_tokens"], results[0]["finish_reason"]
        print(f"[{tokens} tokens, finish: {finish}]", file=sys.stderr)
        return 0
    if args.output is None:
        write_jsonl(results, sys.stdout)
        return 0
    # Written to a temporary name first, so a crash never leaves a truncated file behind.
    partial = args.output.with_name(args.output.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        count = write_jsonl(results, out)
    partial.replace(args.output)
    progress.remove()
    print(f"wrote {count} results to {args.output}", file=sys.stderr)
    return 0


def _result_fields(output, strings) -> dict[str, Any]:
    """What `tulu generate` adds to an input record, from its finished RequestOutput: a
    value per sample (a list of them when n > 1), and 'logprobs' when asked for (`strings`
    gives the tokens' text)."""
    from tulu.generate_resume import RESULT_FIELDS
    from tulu.token_strings import token_logprobs

    per_sample: dict[str, list[Any]] = {
        "output": [c.text for c in output.outputs],
        "finish_reason": [c.finish_reason for c in output.outputs],
        "completion_tokens": [len(c.token_ids) for c in output.outputs],
    }
    if strings is not None:
        per_sample["logprobs"] = [token_logprobs(strings, c.logprobs) for c in output.outputs]
    fields = {name: values if len(values) > 1 else values[0] for name, values in per_sample.items()}
    fields["prompt_tokens"] = len(output.prompt_token_ids)
    return {name: fields[name] for name in RESULT_FIELDS if name in fields}  # in their order


def _resume_settings(
    args: argparse.Namespace,
    params,
    prompts: list[tuple[str, dict[str, Any], Any]],
    lora_modules: dict[str, str],
) -> dict[str, Any]:
    """The progress header's fields known before the model loads (see `tulu.generate_resume`):
    a rerun that differs in any of them is refused at once."""
    from dataclasses import asdict

    from tulu.generate_resume import digest, files_identity

    adapters = {
        name: files_identity(
            [Path(d) / "adapter_config.json", *sorted(Path(d).glob("adapter_model.*"))]
        )
        for name, d in lora_modules.items()
    }
    return {
        "input": {"records": len(prompts), "sha256": digest(r for _, r, _ in prompts)},
        "sampling": asdict(params),
        "--system": args.system,
        "--raw": args.raw,
        "--lora": args.lora,
        "--lora-modules": adapters,
        # It caps each prompt's max_tokens (the other engine flags change no result).
        "--max-model-len": args.max_model_len,
    }


def _model_identity(
    loaded, jobs: list[tuple[Any, list[int], Any]], lora_names: list[str | None]
) -> dict[str, Any]:
    """The progress header's fields known once the model loads: its files and dtype (as the
    eval cache keys them), and the prompts as token ids (another tokenizer or chat format
    changes them)."""
    from tulu.generate_resume import digest

    return {
        **loaded.identity(),
        "prompts": digest([ids, name] for (_, ids, _), name in zip(jobs, lora_names, strict=True)),
    }


def cmd_chat(args: argparse.Namespace) -> int:
    from tulu.interactive import ChatSession, run_chat
    from tulu.pretrained import load_pretrained

    params = _sampling_params(args)
    loaded = load_pretrained(
        args.model, dtype=args.dtype, device=args.device, revision=args.revision
    )
    try:
        session = ChatSession(loaded.model, loaded.tokenizer, params, system=args.system)
    except GenerationError as err:  # e.g. --stop-token-ids beyond the vocabulary
        raise named_by_flags(err) from None
    # Under a strict UTF-8 locale one undecodable byte typed or piped in would end the chat
    # with a UnicodeDecodeError; as surrogates it becomes a bad message the session reports.
    for stream in (sys.stdin, sys.stdout):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass

    def read(prompt: str) -> str:
        if interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        line = line.rstrip("\n")
        sys.stdout.write(prompt + line + "\n")
        return line

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_chat(session, read, write)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tulu.pretrained import describe

    info = describe(args.model, args.dtype, revision=args.revision)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    gib = 2**30
    stored_note = {
        "weights": ", read from the weights: config.json names none",
        "assumed": ", assumed (torch's default): config.json names none",
    }.get(info["checkpoint_dtype_from"], "")
    rows = [
        ("source", info["source"]),
        (
            "architecture",
            f"{info['architecture']}, {info['layers']} layers, hidden {info['hidden_size']}, "
            f"{info['attention_heads']} heads x {info['head_size']} (rotary {info['rotary_dims']}), "
            f"{'parallel' if info['parallel_residual'] else 'sequential'} residual",
        ),
        (
            "parameters",
            f"{info['parameters']:,} ({info['non_embedding_parameters']:,} non-embedding)",
        ),
        (
            "vocabulary",
            f"{info['vocab_size']:,} embedding rows"
            + (f", tokenizer {info['tokenizer_size']:,} ids" if "tokenizer_size" in info else ""),
        ),
        ("context window", f"{info['context_window']:,} tokens"),
        ("dtype", f"{info['dtype']} (checkpoint: {info['checkpoint_dtype']}{stored_note})"),
        ("weights memory", f"{info['weights_bytes'] / gib:.2f} GiB"),
        (
            "KV cache",
            f"{info['kv_cache_bytes_per_token']:,} bytes/token, "
            f"{info['kv_cache_bytes_full_context'] / gib:.3f} GiB per full-context sequence",
        ),
    ]
    if "special_tokens" in info:
        rows.append(
            ("special tokens", ", ".join(f"{k}={v!r}" for k, v in info["special_tokens"].items()))
        )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tulu.server.launch import serve

    serve(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tulu.demo.pipeline import run_demo

    run_demo(
        args.output,
        args.config,
        train_overrides=args.overrides,
        max_examples=args.max_examples,
        codex_samples=args.codex_samples,
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tulu.data.cli import cmd_data as run

    return run(args)


def cmd_train(args: argparse.Namespace) -> int:
    from tulu.train.cli import cmd_train as run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from tulu.eval.cli import cmd_eval as run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from tulu.bench.cli import cmd_bench as run

    return run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from tulu.train.cli import cmd_export as run

    return run(args)


COMMANDS = {
    "data": cmd_data,
    "train": cmd_train,
    "export": cmd_export,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "info": cmd_info,
    "serve": cmd_serve,
    "demo": cmd_demo,
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; ``tulu train CONFIG --dry-run KEY=VALUE`` works too.

    argparse fills a ``nargs="*"`` positional only before the first option, and subparsers
    rule out `parse_intermixed_args`, so `train`'s KEY=VALUE overrides after an option are
    collected here.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    quiet_dependency_noise()
    try:
        return COMMANDS[args.command](args)
    except TuluError as err:
        command = args.command
        if command == "data":
            command += f" {args.data_command}"
        print(f"tulu {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`tulu generate ... | head`): stop quietly, as a
        # command killed by SIGPIPE would. stdout is pointed at /dev/null so that Python's
        # final flush of what is still buffered does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
