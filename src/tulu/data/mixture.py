"""Build a mixture from a recipe: convert, de-duplicate, sample, shuffle, split, report.

The mixture is built in two streaming passes so that half a million conversations never sit in
memory as Python objects:

1. Each source is converted record by record into a spool file (JSON Lines) next to the
   output. Only two things per record stay in memory: a 16-byte digest of its id and of its
   messages (for de-duplication across all sources, first occurrence wins, in recipe order)
   and the byte offset of its line in the spool.

   Content duplicates are dropped wherever they come from. An id repeated within one file is a
   duplicate and dropped too; but converters number records by position (``cot_0``, ...), so
   the same id coming from a *different* file (e.g. CoT's zero-shot and few-shot files) is a
   different record: it is kept and renamed ``{id}@{file stem}`` so ids stay unique.
2. Each source's records are sampled without replacement with the recipe's seed, the union is
   shuffled, the first ``validation`` records are held out, and both splits are written by
   seeking to the chosen lines. Statistics (turns, tokens, truncation) are taken on the way.

The outputs are written atomically; the spool directory is removed at the end, also on error.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tulu.data.recipe import Recipe, SourceSpec
from tulu.data.records import (
    BadInput,
    ConversionReport,
    OptionError,
    check_output_path,
    renamed_ids,
    write_records,
)
from tulu.data.sources import convert_source
from tulu.data.stats import LengthCounter, SourceStats
from tulu.errors import DataError
from tulu.tokenizer import Tokenizer

__all__ = ["MixtureResult", "build_mixture", "validation_path_for"]


@dataclass
class _Spool:
    """The unique converted records of one source: a JSONL file and each line's offset."""

    spec: SourceSpec
    path: Path
    offsets: array = field(default_factory=lambda: array("q"))
    report: ConversionReport = field(default_factory=ConversionReport)
    duplicate_ids: int = 0
    duplicate_contents: int = 0
    renamed_ids: int = 0


@dataclass
class MixtureResult:
    """What `build_mixture` wrote and the per-source statistics for the report."""

    train_path: Path
    validation_path: Path | None
    train_count: int
    validation_count: int
    sources: list[SourceStats]
    lengths: LengthCounter | None
    notes: list[str]


def validation_path_for(output: Path) -> Path:
    """``mix.jsonl`` -> ``mix.validation.jsonl``."""
    return output.with_name(f"{output.stem}.validation{output.suffix or '.jsonl'}")


def _digest(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _located(
    records: Iterator[dict[str, Any]], recipe: Recipe, index: int, spec: SourceSpec
) -> Iterator[dict[str, Any]]:
    """`records`, with a bad converter option's error saying where in the recipe it is."""
    try:
        yield from records
    except OptionError as err:
        raise DataError(f"{recipe.origin}: sources[{index}] ({spec.name}).options: {err}") from None


def _spool_source(
    spec: SourceSpec,
    directory: Path,
    index: int,
    recipe: Recipe,
    seen_ids: dict[bytes, tuple[int, int]],
    seen_contents: set[bytes],
    skip_bad: bool,
    tokenizer_path: Path | str | None,
) -> _Spool:
    spool = _Spool(spec, directory / f"{index:02d}-{spec.name}.jsonl")
    spool.report = ConversionReport(bad=BadInput(skip_bad=skip_bad))
    options = dict(spec.options)
    if spec.source == "sharegpt" and "tokenizer" not in options and tokenizer_path is not None:
        options["tokenizer"] = str(tokenizer_path)
    by_id, by_content = "id" in recipe.dedup, "content" in recipe.dedup
    with open(spool.path, "wb") as out:
        for number, path in enumerate(spec.paths):
            file_key = (index, number)
            for record in _located(
                convert_source(spec.source, path, spool.report, options), recipe, index, spec
            ):
                if by_id:
                    key = _digest(record["id"])
                    owner = seen_ids.get(key)
                    if owner is not None and owner != file_key:
                        for candidate in renamed_ids(record["id"], path.stem):
                            key = _digest(candidate)
                            owner = seen_ids.get(key)
                            if owner is None or owner == file_key:
                                break
                        record["id"] = candidate
                        spool.renamed_ids += owner is None
                    if owner is not None:
                        spool.duplicate_ids += 1
                        continue
                    seen_ids[key] = file_key
                if by_content:
                    key = _digest(record["messages"])
                    if key in seen_contents:
                        spool.duplicate_contents += 1
                        continue
                    seen_contents.add(key)
                spool.offsets.append(out.tell())
                out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    return spool


def _read_line(handle, offset: int) -> dict[str, Any]:
    handle.seek(offset)
    return json.loads(handle.readline())


def _selected(spools: list[_Spool], rng: random.Random) -> tuple[list[tuple[int, int]], list[str]]:
    """(spool index, offset) of every chosen record, shuffled; and notes on short sources."""
    chosen: list[tuple[int, int]] = []
    notes: list[str] = []
    for index, spool in enumerate(spools):
        available = len(spool.offsets)
        want = spool.spec.wanted(available)
        if spool.spec.count is not None and spool.spec.count > available:
            notes.append(
                f"{spool.spec.name}: the recipe asks for {spool.spec.count:,} records but only "
                f"{available:,} unique ones were converted; all of them are used"
            )
        picks = sorted(rng.sample(range(available), want))
        chosen.extend((index, spool.offsets[i]) for i in picks)
    rng.shuffle(chosen)
    return chosen, notes


def build_mixture(
    recipe: Recipe,
    output: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    skip_bad: bool = False,
    validation_output: str | Path | None = None,
) -> MixtureResult:
    """Build the mixture of `recipe` into `output` (and its validation split); see the module.

    `tokenizer` (or the recipe's) enables token statistics; ShareGPT chunking uses the
    recipe's tokenizer path unless the source's options name one.
    """
    output = Path(output)
    # Found only when writing, a bad train path would leave the validation split on its own.
    check_output_path(validation_output or validation_path_for(output))
    check_output_path(output)
    tokenizer_path = recipe.tokenizer
    if tokenizer is None and recipe.tokenizer is not None:
        tokenizer = Tokenizer.load(recipe.tokenizer)
        tokenizer_path = None  # the loaded files below: a hub id is not looked up again
    if tokenizer is not None and tokenizer_path is None:
        source = Path(tokenizer.source)
        tokenizer_path = source if source.exists() else None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as err:
        raise DataError(f"{output}: cannot write ({err.strerror})") from None
    try:
        seen_ids: dict[bytes, tuple[int, int]] = {}
        seen_contents: set[bytes] = set()
        spools = [
            _spool_source(
                spec, workdir, i, recipe, seen_ids, seen_contents, skip_bad, tokenizer_path
            )
            for i, spec in enumerate(recipe.sources)
        ]
        del seen_ids, seen_contents
        chosen, notes = _selected(spools, random.Random(recipe.seed))
        notes += [
            f"{s.spec.name}: {s.renamed_ids:,} ids also used by an earlier file were made "
            "unique as id@file"
            for s in spools
            if s.renamed_ids
        ]
        n_validation = recipe.validation_size(len(chosen))
        stats = [
            SourceStats.start(
                s.spec.name,
                s.spec.source,
                s.report,
                s.duplicate_ids,
                s.duplicate_contents,
                len(s.offsets),
            )
            for s in spools
        ]
        lengths = LengthCounter([s.spec.name for s in spools]) if tokenizer is not None else None
        handles = [open(s.path, "rb") for s in spools]
        try:

            def records(part: list[tuple[int, int]], split: str) -> Iterator[dict[str, Any]]:
                batch: list[tuple[int, dict[str, Any]]] = []
                for index, offset in part:
                    batch.append((index, _read_line(handles[index], offset)))
                    if len(batch) == 512:
                        yield from _account(batch, split, stats, lengths, tokenizer, recipe)
                        batch = []
                yield from _account(batch, split, stats, lengths, tokenizer, recipe)

            validation_path = None
            if n_validation:
                validation_path = Path(validation_output or validation_path_for(output))
                write_records(records(chosen[:n_validation], "validation"), validation_path)
            train_count = write_records(records(chosen[n_validation:], "train"), output)
        finally:
            for handle in handles:
                handle.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return MixtureResult(
        train_path=output,
        validation_path=validation_path,
        train_count=train_count,
        validation_count=n_validation,
        sources=stats,
        lengths=lengths,
        notes=notes,
    )


def _account(
    batch: list[tuple[int, dict[str, Any]]],
    split: str,
    stats: list[SourceStats],
    lengths: LengthCounter | None,
    tokenizer: Tokenizer | None,
    recipe: Recipe,
) -> Iterator[dict[str, Any]]:
    """Add a batch of written records to the statistics (tokens in one encode_batch call)."""
    token_counts: list[int | None] = [None] * len(batch)
    if tokenizer is not None and batch:
        from tulu.chat import render

        eos = tokenizer.eos_token
        if not eos:
            raise DataError(f"{tokenizer.source}: the tokenizer has no eos_token to render with")
        texts = [render(record["messages"], eos) for _, record in batch]
        token_counts = [len(ids) for ids in tokenizer.encode_batch(texts)]
    for (index, record), tokens in zip(batch, token_counts, strict=True):
        stats[index].add(record, split, tokens, recipe.max_seq_length)
        if lengths is not None and tokens is not None:
            lengths.add(index, tokens)
        yield record
