"""``tulu data``: validate, convert, mix and tokenize instruction data.

Argument parsing and printing only; the work is done by `tulu.data`'s modules. Reports go to
stderr (progress, tables, counts) so that stdout stays clean for piping.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tulu.errors import DataError
from tulu.jsonl import same_file

__all__ = ["add_data_parser", "cmd_data"]


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="validate, convert, mix and tokenize instruction data")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    commands.add_parser("sources", help="list the source formats `convert` reads and their options")

    validate = commands.add_parser(
        "validate", help="check record files (JSONL or Parquet); report every bad line"
    )
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")

    convert = commands.add_parser("convert", help="convert a source release to records (JSONL)")
    convert.add_argument("--source", required=True, help="source format (see `tulu data sources`)")
    convert.add_argument(
        "--input", required=True, type=Path, action="append", help="release file (repeatable)"
    )
    convert.add_argument("--output", required=True, type=Path, help="records JSONL to write")
    convert.add_argument("--skip-bad", action="store_true", help="skip bad items and count them")
    opts = convert.add_argument_group("source options (only for the sources that take them)")
    opts.add_argument("--templates", help="instruction templates JSON (instruction sources)")
    opts.add_argument("--seed", type=int, help="template choice seed (default 42)")
    opts.add_argument(
        "--tokenizer", help="tokenizer dir, tokenizer.json or hub id org/name (sharegpt chunking)"
    )
    opts.add_argument("--max-tokens", type=int, help="sharegpt chunk size in tokens (default 2048)")
    opts.add_argument("--paths", choices=["all", "leaves"], help="oasst1: which tree paths")
    opts.add_argument("--top-k", type=int, help="oasst1: keep replies with rank < K")
    opts.add_argument(
        "--keep-deleted", action="store_true", help="oasst1: keep messages marked deleted"
    )
    opts.add_argument("--lang", action="append", help="oasst1: keep trees in this language")

    mix = commands.add_parser("mix", help="build a mixture from a recipe (YAML)")
    mix.add_argument("recipe", type=Path, metavar="RECIPE")
    mix.add_argument("--output", required=True, type=Path, help="train split JSONL")
    mix.add_argument("--validation-output", type=Path, help="default: OUTPUT.validation.jsonl")
    mix.add_argument("--data-dir", type=Path, help="base of the recipe's relative paths")
    mix.add_argument(
        "--tokenizer",
        help="tokenizer dir, tokenizer.json or hub id org/name (token statistics, sharegpt)",
    )
    mix.add_argument("--seed", type=int, help="override the recipe's seed")
    mix.add_argument("--skip-bad", action="store_true", help="skip bad items and count them")
    mix.add_argument("--no-plot", action="store_true", help="do not write the length histogram")

    tokenize = commands.add_parser(
        "tokenize", help="tokenize records for training (cached, parallel) and report batching"
    )
    tokenize.add_argument("file", type=Path, metavar="FILE", help="records JSONL or Parquet")
    tokenize.add_argument(
        "--tokenizer", required=True, help="tokenizer dir, tokenizer.json or hub id org/name"
    )
    tokenize.add_argument("--max-seq-length", type=int, default=2048)
    tokenize.add_argument("--output", type=Path, help="directory (default: the cache)")
    tokenize.add_argument(
        "--cache-dir", type=Path, help="default: $TULU_CACHE/tokenized or ~/.cache/tulu/tokenized"
    )
    tokenize.add_argument("--workers", type=int, help="processes (default: all cores)")
    tokenize.add_argument("--skip-bad", action="store_true", help="skip bad records and count")
    tokenize.add_argument("--batch-size", type=int, default=8, help="for the padding report")
    tokenize.add_argument("--seed", type=int, default=42, help="batch order seed for the report")


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def cmd_sources(args: argparse.Namespace) -> int:
    from tulu.data.sources import SOURCES, converter_options

    for name, (_, description) in SOURCES.items():
        options = converter_options(name)
        listing = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no options"
        print(f"{name:<12} {description}\n{'':<12} options: {listing}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tulu.data.readers import iter_records
    from tulu.data.records import BadInput

    failed = False
    for path in args.files:
        bad = BadInput(collect=True)
        good, unreadable = 0, None
        try:
            for _ in iter_records(path, bad):
                good += 1
        except DataError as err:  # missing, a directory, damaged Parquet: report, go on
            unreadable = err
        for error in bad.errors:
            print(str(error))
        if unreadable is not None:
            print(str(unreadable))
        status = "ok" if not bad.errors else f"{len(bad.errors):,} bad"
        if unreadable is not None:
            status = f"{status}, unreadable" if bad.errors else "unreadable"
        _err(f"{path}: {good:,} valid records, {status}")
        failed |= bool(bad.errors) or unreadable is not None
    return 1 if failed else 0


def _convert_options(args: argparse.Namespace) -> dict[str, Any]:
    from tulu.data.sources import converter_options

    given = {
        "templates": args.templates,
        "seed": args.seed,
        "tokenizer": args.tokenizer,
        "max_tokens": args.max_tokens,
        "paths": args.paths,
        "top_k": args.top_k,
        "skip_deleted": False if args.keep_deleted else None,
        "lang": args.lang,
    }
    flags = {"skip_deleted": "--keep-deleted"}
    valid = converter_options(args.source)
    options = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in valid:
            flag = flags.get(key, "--" + key.replace("_", "-"))
            raise DataError(f"{flag} does not apply to source {args.source!r}")
        options[key] = value
    return options


def cmd_convert(args: argparse.Namespace) -> int:
    from tulu.data.records import BadInput, ConversionReport, renamed_ids, write_records
    from tulu.data.sources import convert_source, get_converter

    get_converter(args.source)  # an unknown source fails before anything is read
    options = _convert_options(args)
    _check_outputs_are_not_inputs({"--output": args.output}, args.input)
    report = ConversionReport(bad=BadInput(skip_bad=args.skip_bad))
    renamed = 0

    def records():
        # Converters number records by position, so every input file starts again at
        # `{source}_0`; as in a mixture, an id an earlier file already used becomes
        # `{id}@{file stem}`, or a later mix would drop those records as duplicates.
        nonlocal renamed
        owners: dict[str, int] = {}
        for number, path in enumerate(args.input):
            for record in convert_source(args.source, path, report, options):
                if len(args.input) > 1 and owners.setdefault(record["id"], number) != number:
                    for candidate in renamed_ids(record["id"], path.stem):
                        if owners.setdefault(candidate, number) == number:
                            break
                    record["id"] = candidate
                    renamed += 1
                yield record

    write_records(records(), args.output)
    for line in report.summary_lines():
        _err(line)
    if renamed:
        _err(f"{renamed} ids also used by an earlier input file were made unique as id@file")
    _err(f"wrote {args.output}")
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rich.console import Console

    from tulu.data.mixture import build_mixture, validation_path_for
    from tulu.data.recipe import load_recipe
    from tulu.data.stats import render_table, save_histogram, stats_json

    stem = args.output.with_suffix("")
    stats_path = Path(f"{stem}.stats.json")
    plot_path = None if args.no_plot else Path(f"{stem}.lengths.png")
    outputs = {
        "--output": args.output,
        "--validation-output": args.validation_output or validation_path_for(args.output),
        "the statistics": stats_path,
        "the histogram": plot_path,
    }
    _check_distinct_outputs(outputs)
    recipe = load_recipe(args.recipe, data_dir=args.data_dir)
    _check_outputs_are_not_inputs(
        outputs, [args.recipe, *(path for spec in recipe.sources for path in spec.paths)]
    )
    if args.seed is not None:
        recipe = replace(recipe, seed=args.seed)
    if args.tokenizer is not None:
        recipe = replace(recipe, tokenizer=args.tokenizer)
    result = build_mixture(
        recipe, args.output, skip_bad=args.skip_bad, validation_output=args.validation_output
    )
    # Off a terminal (logs, CI) rich would wrap the 11 columns at 80 characters.
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    console.print(render_table(result.sources, recipe.max_seq_length))
    for source in result.sources:
        reasons = {**source.drop_reasons, **source.bad_reasons}
        if reasons:
            listing = ", ".join(f"{n:,} {reason}" for reason, n in reasons.items())
            console.print(f"{source.name}: {listing}", markup=False, highlight=False)
    notes = result.notes + _stale_outputs(
        validation_path_for(args.output) if result.validation_path is None else None,
        Path(f"{stem}.lengths.png") if args.no_plot or result.lengths is None else None,
    )
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)

    summary = stats_json(result.sources) | {
        "recipe": str(args.recipe),
        "seed": recipe.seed,
        "train": str(result.train_path),
        "validation": None if result.validation_path is None else str(result.validation_path),
        "notes": notes,
    }
    stats_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written = [str(result.train_path), str(stats_path)]
    if result.validation_path is not None:
        written.insert(1, str(result.validation_path))
    if result.lengths is not None and not args.no_plot:
        written.append(str(save_histogram(result.lengths, plot_path, recipe.max_seq_length)))
    elif result.lengths is None:
        console.print("no tokenizer given: token columns and the histogram are skipped")
    console.print(
        f"{result.train_count:,} train + {result.validation_count:,} validation records; "
        f"wrote {', '.join(written)}",
        markup=False,
        highlight=False,
    )
    return 0


def _stale_outputs(*paths: Path | None) -> list[str]:
    """Notes on files an earlier mix wrote at this output that this one did not replace.

    They are left alone (they may be the user's), but named: an old validation split beside
    a new train split may hold records the new mixture trains on.
    """
    return [
        f"{path} is left from an earlier run and is not part of this mixture; delete it "
        "(a training config that names it would use stale records)"
        for path in paths
        if path is not None and path.exists()
    ]


def _check_distinct_outputs(outputs: dict[str, Path | None]) -> None:
    """Refuse two outputs of one run at the same path: the later write would silently replace
    the earlier file (e.g. the validation split with the train split)."""
    seen: dict[Path, str] = {}
    for name, path in outputs.items():
        if path is None:
            continue
        key = path.resolve()
        if key in seen:
            raise DataError(f"{path}: {name} would overwrite {seen[key]} (choose another path)")
        seen[key] = name


def _check_outputs_are_not_inputs(outputs: dict[str, Path | None], inputs: list[Path]) -> None:
    """Refuse an output at the path of an input: outputs replace their file once the inputs
    are read, so the input (a raw release, a recipe) would be lost for good."""
    for name, path in outputs.items():
        for source in inputs:
            if path is not None and same_file(path, source):
                raise DataError(
                    f"{path}: {name} would overwrite the input {source} (choose another path)"
                )


def cmd_tokenize(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tulu.data.batching import padding_report
    from tulu.data.tokenize import tokenize_records
    from tulu.tokenizer import Tokenizer

    if args.seed < 0:  # numpy's generators take none, and the report comes after the work
        raise DataError(f"--seed: expected a non-negative integer, got {args.seed}")
    tokenizer = Tokenizer.load(args.tokenizer)
    dataset = tokenize_records(
        args.file,
        tokenizer,
        args.max_seq_length,
        cache_dir=args.cache_dir,
        output_dir=args.output,
        num_workers=args.workers,
        skip_bad=args.skip_bad,
        progress=sys.stderr.isatty(),  # a log file gets no bar
    )
    meta = dataset.meta
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    where = "cache hit" if dataset.cache_hit else "tokenized"
    console.print(
        f"{where}: {dataset.directory}\n{len(dataset):,} examples, {dataset.num_tokens:,} tokens "
        f"({dataset.num_trained_tokens:,} trained), {meta['num_truncated']:,} truncated at "
        f"{args.max_seq_length}",
        markup=False,
        highlight=False,
    )
    for reason, count in meta["dropped"].items():
        console.print(f"{count:,} dropped: {reason}", markup=False, highlight=False)
    for reason, count in meta["skipped_bad"].items():
        console.print(f"{count:,} skipped: {reason}", markup=False, highlight=False)
    table = Table(title=f"batching (padding: {args.batch_size} examples per batch)")
    for column in ("mode", "batches", "rows", "token slots", "padded"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    report = padding_report(dataset.lengths, args.batch_size, args.max_seq_length, seed=args.seed)
    for stats in report:
        table.add_row(
            stats.mode,
            f"{stats.batches:,}",
            f"{stats.rows:,}",
            f"{stats.token_slots:,}",
            f"{stats.padded_fraction:.1%}",
        )
    console.print(table)
    print(dataset.directory)
    return 0


_DATA_COMMANDS = {
    "sources": cmd_sources,
    "validate": cmd_validate,
    "convert": cmd_convert,
    "mix": cmd_mix,
    "tokenize": cmd_tokenize,
}


def cmd_data(args: argparse.Namespace) -> int:
    return _DATA_COMMANDS[args.data_command](args)
