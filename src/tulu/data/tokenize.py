"""Tokenize a records file for training: parallel, streaming, cached.

`tokenize_records` turns a JSONL (or Parquet) records file into a tokenized dataset directory
(`tulu.data.tokenized`) with `tulu.data.encode`'s batched version of the chat encode. The file
is read in chunks of lines in the main process; worker processes parse, validate and tokenize
chunks, at most a few chunks are in flight (bounded memory) and the results are appended to
the output files in input order.

Workers are started with the "spawn" method (a forked child would inherit the parent's Rust
thread pool, possibly in a used state) and receive the tokenizer as its JSON string plus the
special tokens. Each worker tokenizes single-threaded, so N workers use N cores instead of
N x cores threads fighting over the same cores. Workers import only numpy, tokenizers and the
light `tulu.chat` / `tulu.data` modules, never torch. A script that calls `tokenize_records`
therefore needs the usual ``if __name__ == "__main__":`` guard.

Cache. The key is a sha256 over the format version, the settings, the tokenizer (its JSON and
special tokens) and the data file's bytes. A hit opens the stored directory without
tokenizing. A dataset is written into a temporary directory that is renamed into place only
when complete, so a killed run never leaves an entry that a later run would read as valid,
and only if the bytes tokenized hash to the key, so a file rewritten while it was being
tokenized never leaves tokens of one version under the key of another. A miss reads a JSONL
file twice (it is hashed as it is read for tokenizing, see `_check_unchanged`) and a Parquet
file three times; a hit reads the file once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tulu.chat import (
    _check_max_seq_length,
    _eos_of,
)
from tulu.data.encode import encode_conversations
from tulu.data.readers import BLANK, compression, parse_jsonl_line
from tulu.data.records import BadRecord, check_record, creation_mode
from tulu.data.tokenized import (
    FORMAT_VERSION,
    META_FILE,
    TokenizedDataset,
)
from tulu.errors import DataError
from tulu.tokenizer import Tokenizer

__all__ = ["DROPPED_NO_LABEL", "cache_key", "default_cache_dir", "tokenize_records"]

#: Reason recorded in meta.json for examples that keep no trained token (open-instruct drops
#: them too: truncation cut every assistant token).
DROPPED_NO_LABEL = "no trained token after truncation"

#: Lines per chunk: large enough that one encode_batch call and one IPC round trip per chunk
#: are cheap per example, small enough that a few chunks in flight stay a few MB.
DEFAULT_CHUNK_LINES = 256

#: Chunks in flight per worker: one being tokenized, one queued so a worker never idles.
_IN_FLIGHT_PER_WORKER = 2

#: Locations remembered per reason (the rest are counted only).
_EXAMPLES_PER_REASON = 3

_FILES = ("input_ids.bin", "trained.bin", "offsets.bin")
_META = META_FILE
_TMP_PREFIX = ".tulu-tmp-"


# ============================================================================ chunk workers


@dataclass
class _ChunkResult:
    """What a worker sends back for one chunk (pickled; arrays travel as bytes)."""

    input_ids: np.ndarray
    trained: np.ndarray
    lengths: np.ndarray
    records: int  # valid records seen
    truncated: int  # examples (kept or not) longer than max_seq_length
    dropped: list[str]  # where, for examples with no trained token
    bad: list[tuple[str, str, str]]  # (where, kind, detail) of bad records, in order
    size: int  # bytes of input (for the progress bar)


class _Encoder:
    """Per-process state: the tokenizer and the settings, plus the chunk function."""

    def __init__(self, tokenizer: Tokenizer, max_seq_length: int, dtype: str, skip_bad: bool):
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.dtype = np.dtype(dtype)
        self.skip_bad = skip_bad

    def jsonl_chunk(self, path: str, first_line: int, lines: list[bytes]) -> _ChunkResult:
        """Parse, validate and tokenize lines ``first_line...`` of a JSONL file.

        Lines are read by `tulu.data.readers.parse_jsonl_line`, as `iter_jsonl` reads them.
        """
        items: list[tuple[str, Any]] = []
        bad: list[tuple[str, str, str]] = []
        for number, raw in enumerate(lines, start=first_line):
            where = f"{path}:{number}"
            try:
                value = parse_jsonl_line(raw, where, first=number == 1)
            except BadRecord as err:
                bad.append((err.where, err.kind, err.detail))
                if not self.skip_bad:
                    break
                continue
            if value is not BLANK:
                items.append((where, value))
        return self._encode(items, bad, sum(len(raw) for raw in lines))

    def items_chunk(self, items: list[tuple[str, Any]], size: int) -> _ChunkResult:
        """Validate and tokenize already-parsed ``(where, value)`` items (Parquet rows)."""
        return self._encode(items, [], size)

    def _encode(
        self, items: list[tuple[str, Any]], bad: list[tuple[str, str, str]], size: int
    ) -> _ChunkResult:
        wheres: list[str] = []
        conversations: list[list[Any]] = []
        for where, value in items:
            try:
                record = check_record(value, where)
            except BadRecord as err:
                bad.append((err.where, err.kind, err.detail))
                if not self.skip_bad:
                    break
                continue
            wheres.append(where)
            conversations.append(record["messages"])
        if bad and not self.skip_bad:
            # The caller raises the first bad record in file order; nothing else matters.
            first = min(bad, key=lambda b: _line_key(b[0]))
            empty = np.zeros(0, dtype=self.dtype)
            return _ChunkResult(
                empty, np.zeros(0, np.uint8), np.zeros(0, np.int64), 0, 0, [], [first], size
            )
        chunk = encode_conversations(
            conversations, self.tokenizer, self.max_seq_length, dtype=self.dtype, validate=False
        )
        dropped = [w for w, k in zip(wheres, chunk.kept.tolist(), strict=True) if not k]
        return _ChunkResult(
            input_ids=chunk.input_ids,
            trained=chunk.trained,
            lengths=chunk.lengths,
            records=len(conversations),
            truncated=int(chunk.truncated.sum()),
            dropped=dropped,
            bad=bad,
            size=size,
        )


def _line_key(where: str) -> int:
    """The line (or row) number at the end of a ``file:line`` / ``file:row N`` location."""
    tail = where.rsplit(":", 1)[-1].split()[-1]
    return int(tail) if tail.isdigit() else 0


_WORKER: _Encoder | None = None


def _worker_init(
    tokenizer_json: str,
    special_tokens: dict[str, str | None],
    source: str,
    max_seq_length: int,
    dtype: str,
    skip_bad: bool,
) -> None:
    """Build the worker's tokenizer; one Rust thread per worker, so N workers = N cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer as Backend

    global _WORKER
    tokenizer = Tokenizer(Backend.from_str(tokenizer_json), source=source, **special_tokens)
    _WORKER = _Encoder(tokenizer, max_seq_length, dtype, skip_bad)


def _worker_jsonl(path: str, first_line: int, lines: list[bytes]) -> _ChunkResult:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.jsonl_chunk(path, first_line, lines)


def _worker_items(items: list[tuple[str, Any]], size: int) -> _ChunkResult:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.items_chunk(items, size)


# ============================================================================ reading chunks


def _jsonl_chunks(
    path: Path, chunk_lines: int, update: Callable[[bytes], object]
) -> Iterator[tuple[str, tuple]]:
    """``("jsonl", args)`` per chunk of raw lines: only bytes are read here, the workers
    decode and parse.

    Every line also goes to `update` (a sha256's): the lines are all of the file's
    decompressed bytes, the very bytes `_data_digest` hashes for the key, so the file can be
    checked unchanged without reading it a third time.
    """
    from tulu.data.readers import open_binary

    with open_binary(path) as handle:
        first = 1
        while True:
            lines = list(itertools.islice(handle, chunk_lines))
            if not lines:
                return
            for line in lines:
                update(line)
            yield "jsonl", (str(path), first, lines)
            first += len(lines)


def _parquet_chunks(path: Path, chunk_lines: int) -> Iterator[tuple[str, tuple]]:
    """``("items", args)`` per chunk of Parquet rows (pyarrow decodes them here)."""
    from tulu.data.readers import iter_parquet

    items = iter_parquet(path)
    while True:
        batch = list(itertools.islice(items, chunk_lines))
        if not batch:
            return
        yield "items", (batch, 0)


def _reader(path: Path) -> str:
    """How a file is read, chosen by its suffix: ``parquet`` or ``jsonl``."""
    return "parquet" if path.suffix.lower() == ".parquet" else "jsonl"


def _chunks(
    path: Path, chunk_lines: int, update: Callable[[bytes], object]
) -> Iterator[tuple[str, tuple]]:
    """The chunks of `path`; a JSONL file's bytes also go to `update` as they are read."""
    if _reader(path) == "parquet":
        return _parquet_chunks(path, chunk_lines)
    return _jsonl_chunks(path, chunk_lines, update)


def _run_in_process(
    encoder: _Encoder, chunks: Iterable[tuple[str, tuple]]
) -> Generator[_ChunkResult, None, None]:
    for kind, args in chunks:
        yield encoder.jsonl_chunk(*args) if kind == "jsonl" else encoder.items_chunk(*args)


def _run_in_pool(
    chunks: Iterator[tuple[str, tuple]], workers: int, initargs: tuple
) -> Generator[_ChunkResult, None, None]:
    """Results in input order, with at most ``workers * 2`` chunks submitted at a time.

    `Pool.imap` would read the whole input ahead; here a chunk is read only when a slot
    frees up, so memory stays bounded whatever the file size.
    """
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_worker_init, initargs=initargs
    )
    window: deque[Future] = deque()
    functions = {"jsonl": _worker_jsonl, "items": _worker_items}
    try:
        for kind, args in chunks:
            window.append(pool.submit(functions[kind], *args))
            if len(window) >= workers * _IN_FLIGHT_PER_WORKER:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ============================================================================ cache


def default_cache_dir() -> Path:
    """``$TULU_CACHE/tokenized``, else ``~/.cache/tulu/tokenized``."""
    root = os.environ.get("TULU_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "tulu"
    return base / "tokenized"


def _id_dtype(tokenizer: Tokenizer) -> str:
    return "uint16" if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def _settings(max_seq_length: int) -> dict[str, Any]:
    return {"max_seq_length": max_seq_length, "format": "tulu-chat-messages"}


def cache_key(
    path: str | Path,
    tokenizer: Tokenizer,
    max_seq_length: int,
    *,
    data_digest: bytes | None = None,
) -> str:
    """sha256 over the format version, the settings, the tokenizer, the reader and the bytes.

    The tokenizer enters as its full JSON (vocabulary, merges, normalizer, added tokens) plus
    the special tokens, since the EOS string is written into every example. `data_digest` is
    the file's `_data_digest` when the caller already has it (None: the file is hashed here).
    """
    digest = hashlib.sha256()

    def field(name: str, value: bytes) -> None:  # length-prefixed: no ambiguous joins
        digest.update(f"{name}:{len(value)}:".encode())
        digest.update(value)

    field("format", str(FORMAT_VERSION).encode())
    field("settings", json.dumps(_settings(max_seq_length), sort_keys=True).encode())
    field("tokenizer", tokenizer.backend.to_str().encode())
    field("special_tokens", json.dumps(tokenizer.special_tokens, sort_keys=True).encode())
    # The same bytes read as JSONL and as Parquet are different data (one of them an error).
    field("reader", _reader(Path(path)).encode())
    field("data", _data_digest(Path(path)) if data_digest is None else data_digest)
    return digest.hexdigest()


def _data_digest(path: Path) -> bytes:
    """sha256 of the file's (decompressed) bytes, read in blocks, never whole."""
    from tulu.data.readers import open_binary

    with open_binary(path) as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(parent: Path) -> None:
    """Delete temporary directories left by killed runs of this host (their pid is gone)."""
    host = socket.gethostname()
    for entry in parent.glob(f"{_TMP_PREFIX}*"):
        bits = entry.name[len(_TMP_PREFIX) :].split("-")
        # <prefix><key>-<host>-<pid>-<random>; hosts may contain dashes, pids never do
        if len(bits) < 4 or not bits[-2].isdigit():
            continue
        if "-".join(bits[1:-2]) == host and not _pid_alive(int(bits[-2])):
            shutil.rmtree(entry, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> bool:
    """Rename the finished `tmp` to `target` (atomic); False if `target` is a non-empty
    directory (another run got there first, or an old dataset is in the way)."""
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        if target.exists():
            return False
        raise


def _replace_dir(tmp: Path, target: Path) -> None:
    """Put `tmp` in place of an existing dataset directory `target`."""
    # named like a temporary directory, so that a run killed right here is cleaned up later
    trash = target.with_name(
        f"{_TMP_PREFIX}old-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    )
    os.rename(target, trash)
    os.rename(tmp, target)
    shutil.rmtree(trash, ignore_errors=True)


def _existing(directory: Path, key: str) -> TokenizedDataset | None:
    """The dataset at `directory` if it is complete and built for `key`, else None."""
    if not (directory / _META).is_file():
        return None
    try:
        dataset = TokenizedDataset.open(directory, cache_hit=True)
    except DataError:
        return None
    return dataset if dataset.meta.get("cache_key") == key else None


def _check_unchanged(path: Path, data_digest: bytes, read: hashlib._Hash) -> None:
    """Refuse to store tokens of a file that changed after it was hashed for the key.

    The file is read twice, to hash it and to tokenize it; a file rewritten in between (data
    regenerated while a run starts) would store the tokens of one version under the key of
    the other, and every later run would silently reuse them. `read` is the sha256 of a JSONL
    file's bytes as they were read for tokenizing (the whole file, once tokenizing is done).
    pyarrow reads a Parquet file by seeking, footer first, so its bytes cannot be hashed on
    the way: it is hashed again here, one more read of a (compressed, smaller) file.
    """
    seen = _data_digest(path) if _reader(path) == "parquet" else read.digest()
    if seen != data_digest:
        raise DataError(
            f"{path}: changed while it was being tokenized; nothing was stored, tokenize it "
            "again once it is no longer being written"
        )


def _raise_stored_bad(dataset: TokenizedDataset, path: Path) -> None:
    """A cached dataset built with skip_bad holds bad records; without skip_bad, raise the
    first one, as tokenizing would have."""
    first = dataset.meta.get("first_bad")
    if first:
        raise BadRecord(f"{path}:{first['location']}", first["kind"], first["detail"])


# ============================================================================ tokenize


@dataclass
class _Totals:
    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained: int = 0
    truncated: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)
    bad: Counter[str] = field(default_factory=Counter)
    bad_examples: dict[str, list[str]] = field(default_factory=dict)
    first_bad: tuple[str, str, str] | None = None


def _note(counter: Counter[str], examples: dict[str, list[str]], kind: str, where: str) -> None:
    counter[kind] += 1
    seen = examples.setdefault(kind, [])
    if len(seen) < _EXAMPLES_PER_REASON:
        seen.append(where)


def _location(where: str, path: Path) -> str:
    """The part of ``file:line`` after the file, so a cached error can name the current path."""
    prefix = f"{path}:"
    return where[len(prefix) :] if where.startswith(prefix) else where


def _progress(enabled: bool):
    """A rich progress bar on stderr (bytes read, examples, examples/s), or a null context."""
    if not enabled:
        return contextlib.nullcontext(None)
    from tulu.progress import progress_bar

    return progress_bar(
        "tokenizing",
        count="percent",
        detail="{task.fields[examples]:,} examples, {task.fields[rate]:,.0f}/s",
    )


def _results(
    path: Path,
    tokenizer: Tokenizer,
    max_seq_length: int,
    dtype: str,
    workers: int,
    skip_bad: bool,
    chunk_lines: int,
    read: hashlib._Hash,
) -> tuple[Generator[_ChunkResult, None, None], int]:
    """The chunk results in input order, and how many processes produce them.

    A file of one chunk is tokenized here: starting processes would cost more than it saves.
    The bytes read go to `read` (see `_chunks`).
    """
    chunks = _chunks(path, chunk_lines, read.update)
    head = list(itertools.islice(chunks, 2))
    all_chunks = itertools.chain(head, chunks)
    if workers <= 1 or len(head) < 2:
        encoder = _Encoder(tokenizer, max_seq_length, dtype, skip_bad)
        return _run_in_process(encoder, all_chunks), 1
    initargs = (
        tokenizer.backend.to_str(),
        tokenizer.special_tokens,
        tokenizer.source,
        max_seq_length,
        dtype,
        skip_bad,
    )
    return _run_in_pool(all_chunks, workers, initargs), workers


def _count(totals: _Totals, result: _ChunkResult, path: Path) -> None:
    for where, kind, detail in result.bad:
        _note(totals.bad, totals.bad_examples, kind, _location(where, path))
        if totals.first_bad is None:
            totals.first_bad = (_location(where, path), kind, detail)
    for where in result.dropped:
        _note(totals.dropped, totals.dropped_examples, DROPPED_NO_LABEL, _location(where, path))
    totals.records += result.records
    totals.examples += len(result.lengths)
    totals.tokens += len(result.input_ids)
    totals.trained += int(result.trained.sum(dtype=np.int64))
    totals.truncated += result.truncated


def _write_dataset(
    path: Path,
    out: Path,
    tokenizer: Tokenizer,
    max_seq_length: int,
    key: str,
    data_digest: bytes,
    workers: int,
    skip_bad: bool,
    progress: bool,
    chunk_lines: int,
    read: hashlib._Hash,
) -> dict[str, Any]:
    """Tokenize `path` into the (temporary) directory `out`; return the meta it wrote.

    The bytes read for tokenizing go to `read`, for `_check_unchanged`.
    """
    dtype = _id_dtype(tokenizer)
    started = time.perf_counter()
    totals = _Totals()
    lengths: list[np.ndarray] = []
    results, processes = _results(
        path, tokenizer, max_seq_length, dtype, workers, skip_bad, chunk_lines, read
    )
    # The bar counts the bytes of lines read: a compressed file's size is not their total.
    plain = path.suffix.lower() != ".parquet" and compression(path) is None
    total_bytes = path.stat().st_size if plain else None
    with (
        open(out / "input_ids.bin", "wb") as ids_file,
        open(out / "trained.bin", "wb") as trained_file,
        _progress(progress) as bar,
    ):
        task = bar.add_task("tokenize", total=total_bytes, examples=0, rate=0.0) if bar else None
        try:
            for result in results:
                if result.bad and not skip_bad:
                    raise BadRecord(*result.bad[0])
                _count(totals, result, path)
                ids_file.write(memoryview(np.ascontiguousarray(result.input_ids)))
                trained_file.write(memoryview(np.ascontiguousarray(result.trained)))
                lengths.append(result.lengths)
                if bar is not None:
                    rate = totals.examples / max(time.perf_counter() - started, 1e-9)
                    bar.update(task, advance=result.size, examples=totals.examples, rate=rate)
        finally:
            results.close()  # stops the worker processes on an error too

    offsets = np.zeros(totals.examples + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    with open(out / "offsets.bin", "wb") as offsets_file:
        if totals.examples:
            offsets_file.write(memoryview(offsets))
    meta = _meta(path, tokenizer, max_seq_length, key, data_digest, dtype, skip_bad, totals)
    meta["seconds"] = round(time.perf_counter() - started, 3)
    meta["workers"] = processes
    # meta.json last: a directory without it is never taken for a dataset
    (out / _META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return meta


def _meta(
    path: Path,
    tokenizer: Tokenizer,
    max_seq_length: int,
    key: str,
    data_digest: bytes,
    dtype: str,
    skip_bad: bool,
    totals: _Totals,
) -> dict[str, Any]:
    first_bad = None
    if totals.first_bad is not None:
        location, kind, detail = totals.first_bad
        first_bad = {"location": location, "kind": kind, "detail": detail}
    return {
        "format_version": FORMAT_VERSION,
        "cache_key": key,
        "source": str(path),
        "source_bytes": path.stat().st_size,
        # what a training checkpoint records, to refuse resuming on an edited file
        "source_sha256": data_digest.hex(),
        "settings": {**_settings(max_seq_length), "skip_bad": skip_bad},
        "tokenizer": {
            "source": tokenizer.source,
            "vocab_size": tokenizer.vocab_size,
            **tokenizer.special_tokens,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "dtype": dtype,
        "num_records": totals.records,
        "num_examples": totals.examples,
        "num_tokens": totals.tokens,
        "num_trained_tokens": totals.trained,
        "num_truncated": totals.truncated,
        "dropped": dict(totals.dropped),
        "dropped_examples": totals.dropped_examples,
        "skipped_bad": dict(totals.bad),
        "skipped_bad_examples": totals.bad_examples,
        "first_bad": first_bad,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def tokenize_records(
    path: str | Path,
    tokenizer: Tokenizer,
    max_seq_length: int,
    *,
    cache_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    num_workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    chunk_lines: int = DEFAULT_CHUNK_LINES,
) -> TokenizedDataset:
    """Tokenize a records file (JSONL or Parquet) into a memory-mapped `TokenizedDataset`.

    The result lives in ``cache_dir/<key>`` (default `default_cache_dir`) or, with
    `output_dir`, in that directory; either way an existing dataset built from the same
    tokenizer, settings and file bytes is returned without tokenizing (``cache_hit`` True).
    `num_workers` defaults to the usable CPU count; 1 tokenizes in this process. A bad record
    raises `BadRecord` (``file:line: reason``) unless `skip_bad`, which skips and counts it
    by reason in the meta. Examples that keep no trained token after truncation are dropped
    (as open-instruct does) and counted.

    Worker processes are spawned, so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard (each worker imports the main module).
    """
    path = Path(path)
    max_seq_length = _check_max_seq_length(max_seq_length)
    _eos_of(tokenizer)
    workers = _default_workers() if num_workers is None else int(num_workers)
    if workers < 1:
        raise DataError(f"num_workers: must be at least 1, got {num_workers}")
    if chunk_lines < 1:
        raise DataError(f"chunk_lines: must be at least 1, got {chunk_lines}")
    if path.exists() and not path.is_dir() and not path.is_file():
        # A pipe (`<(zcat ...)`) would be used up by hashing: zero examples, cached under the
        # key of the real data, which every later run on that data would then hit.
        raise DataError(
            f"{path}: not a regular file (a pipe or a device); tokenize reads its input twice, "
            "to hash it for the cache and to tokenize it: write the records to a file first"
        )
    data_digest = _data_digest(path)
    key = cache_key(path, tokenizer, max_seq_length, data_digest=data_digest)

    if output_dir is not None:
        target = Path(output_dir)
        if os.path.lexists(target) and not target.is_dir():  # a dangling link too
            raise DataError(f"{target}: exists and is not a directory")
        if target.is_dir() and any(target.iterdir()) and not (target / _META).is_file():
            raise DataError(
                f"{target}: exists and is not a tokenized dataset; choose an empty or new directory"
            )
    else:
        target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        target = target / key

    hit = _existing(target, key)
    if hit is not None:
        if not skip_bad:
            _raise_stored_bad(hit, path)
        hit.meta.setdefault("source_sha256", data_digest.hex())  # an entry older than the field
        return hit

    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(parent)
        tmp = Path(
            tempfile.mkdtemp(
                dir=parent,
                prefix=f"{_TMP_PREFIX}{key[:16]}-{socket.gethostname()}-{os.getpid()}-",
            )
        )
    except OSError as err:
        raise DataError(f"{parent}: cannot write the tokenized dataset ({err})") from None
    with contextlib.suppress(OSError):  # a filesystem without modes keeps tempfile's 0700
        tmp.chmod(creation_mode(0o777))
    read = hashlib.sha256()
    try:
        _write_dataset(
            path,
            tmp,
            tokenizer,
            max_seq_length,
            key,
            data_digest,
            workers,
            skip_bad,
            progress,
            chunk_lines,
            read,
        )
        _check_unchanged(path, data_digest, read)
        if not _publish(tmp, target):
            existing = _existing(target, key)
            if existing is not None and output_dir is None:
                # Another run finished the same key first: its files are the same as ours.
                shutil.rmtree(tmp, ignore_errors=True)
                existing.cache_hit = False
                return existing
            _replace_dir(tmp, target)  # an incomplete entry, or an older dataset at --output
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenizedDataset.open(target)
