"""Converters from each source's original release to the record format, by name.

A converter is a module with ``convert(path, report, **options) -> Iterator[record]``: it reads
the release file at `path`, yields records that pass `check_record`, sends unusable items to
``report.bad`` and counts rule-based drops with ``report.drop``. Options are keyword arguments
with defaults; `convert_source` checks option names against the converter's signature, so a
misspelt option in a recipe or on the command line is an error that lists the valid ones.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tulu.data.records import BadRecord, ConversionReport, check_record
from tulu.errors import DataError

__all__ = ["SOURCES", "convert_source", "converter_options", "get_converter"]

#: Source name -> (module, one-line description of the release format it reads).
SOURCES: dict[str, tuple[str, str]] = {
    "records": (
        "records_source",
        "already-converted records (JSONL or Parquet), e.g. the public Tulu mixture",
    ),
    "flan_v2": ("flan", "FLAN V2 JSONL with inputs / targets"),
    "cot": ("flan", "FLAN V2 chain-of-thought JSONL with inputs / targets"),
    "dolly": ("dolly", "databricks-dolly-15k.jsonl (instruction, context, response, category)"),
    "oasst1": ("oasst1", "OpenAssistant message trees (2023-04-12_oasst_ready.trees.jsonl)"),
    "gpt4_alpaca": ("alpaca", "alpaca_gpt4_data.json (JSON array of instruction / input / output)"),
    "code_alpaca": ("alpaca", "code_alpaca_20k.json (JSON array of instruction / input / output)"),
    "sharegpt": ("sharegpt", "HTML-cleaned ShareGPT dumps (JSON array of id / conversations)"),
}

Converter = Callable[..., Iterator[dict[str, Any]]]


def get_converter(name: str) -> Converter:
    """The ``convert`` function of source `name` (an error lists the known sources)."""
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r} (known: {', '.join(SOURCES)})")
    module = importlib.import_module(f"tulu.data.sources.{SOURCES[name][0]}")
    convert = module.convert
    if name in ("flan_v2", "cot", "gpt4_alpaca", "code_alpaca"):
        # One module serves two releases of the same layout; it names records by source.
        return lambda path, report, **options: convert(path, report, dataset=name, **options)
    return convert


def converter_options(name: str) -> dict[str, Any]:
    """The options source `name` accepts, with their defaults."""
    module = importlib.import_module(f"tulu.data.sources.{SOURCES[name][0]}")
    params = inspect.signature(module.convert).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "dataset"
    }


def convert_source(
    name: str,
    path: str | Path,
    report: ConversionReport,
    options: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Convert the release file `path` of source `name`, yielding valid records.

    Every record a converter yields is checked against the record format once more, so a
    converter bug or an odd input surfaces as a located `BadRecord`, never as a bad training
    example.
    """
    convert = get_converter(name)
    options = dict(options or {})
    valid = converter_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listing = ", ".join(valid) if valid else "none"
        raise DataError(
            f"source {name!r}: unknown option(s) {', '.join(map(repr, unknown))} (valid: {listing})"
        )
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file (input of source {name!r})")
    for record in convert(path, report, **options):
        try:
            check_record(record, f"{path}: record {record.get('id')!r}")
        except BadRecord as err:
            report.bad(err)
            continue
        report.written += 1
        yield record
