"""Readers for the files instruction data comes in, each item tagged with where it came from.

Every reader yields ``(where, value)`` with ``where`` = ``"file:line"`` (``"file:row N"`` for
Parquet), so any later complaint about a value points at the line a user can open. Unreadable
items (bytes that are not UTF-8, a line that is not JSON) go to the `BadInput` handler, which
raises by default or counts and moves on with ``--skip-bad``.

- JSON Lines is streamed line by line, so files of any size are read in constant memory.
- JSON arrays (the Alpaca and ShareGPT releases) are parsed element by element with
  `json.JSONDecoder.raw_decode`, which keeps the position of each element for its line number.
- Parquet (the public converted mixture) is read in row batches through ``pyarrow``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tulu.data.records import BadHandler, BadRecord, ConversionReport, check_record
from tulu.errors import DataError

__all__ = [
    "BLANK",
    "compression",
    "iter_json_array",
    "iter_jsonl",
    "iter_parquet",
    "iter_records",
    "numbered_items",
    "open_binary",
    "parse_jsonl_line",
]

#: Nesting beyond what `json.loads` can recurse through (about 1000 levels) is reported as bad
#: input instead of ending the whole run with a RecursionError.
_TOO_DEEP = "nested too deeply"

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape turns undecodable bytes into


def _syntax_kind(err: json.JSONDecodeError, end: int) -> str:
    """ "truncated JSON" when the text stops mid-value (the usual cut-off file), else invalid."""
    if err.pos >= end or err.msg.startswith("Unterminated string"):
        return "truncated JSON"
    return "invalid JSON"


def _too_long() -> str:
    """The detail for an integer `json` refuses to convert: Python caps int() at 4300 digits by
    default, and `json` raises that as a plain ValueError, not a JSONDecodeError."""
    return f"invalid JSON (a number longer than {sys.get_int_max_str_digits()} digits)"


def _message(err: json.JSONDecodeError) -> str:
    # "Unterminated string starting at" already ends in "at"; we append "at column N".
    return err.msg.removesuffix(" at")


#: Leading bytes of compressed files -> format name. No JSON text or Parquet file starts
#: with any of them, so a match is never a false alarm.
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
#: The formats read through the standard library (releases such as OASST1's ship as .gz).
_DECOMPRESSORS: dict[str, Callable[[Any], Any]] = {
    "gzip": lambda handle: gzip.GzipFile(fileobj=handle),
    "bzip2": bz2.BZ2File,
    "xz": lzma.LZMAFile,
}
#: What a corrupt or truncated stream of those raises, part way through the file.
_CORRUPT = (EOFError, OSError, zlib.error, lzma.LZMAError)


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of an open file; a corrupt or truncated stream, found wherever
    it happens, is a `DataError` naming the file (zlib's and lzma's errors name nothing)."""

    def __init__(self, handle: io.BufferedReader, path: Path, name: str) -> None:
        self._handle, self._path, self._name = handle, path, name
        self._stream = _DECOMPRESSORS[name](handle)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        try:
            data = self._stream.read(len(buffer))
        except _CORRUPT as err:
            raise DataError(
                f"{self._path}: corrupt or truncated {self._name} data ({err})"
            ) from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._handle.close()
        super().close()


def _format_of(head: bytes) -> str | None:
    """The compression format whose magic bytes `head` starts with, or None."""
    return next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)


def compression(path: Path) -> str | None:
    """The compression format of `path` by its first bytes ("gzip", ...), or None."""
    try:
        with open(path, "rb") as handle:
            return _format_of(handle.read(6))
    except OSError:
        return None  # open_binary reports it


def open_binary(path: Path):
    """Open `path` for reading bytes, turning OS errors into a `DataError` naming the file.

    A gzip, bzip2 or xz file (``2023-04-12_oasst_ready.trees.jsonl.gz``) is decompressed as it
    is read, whatever its name, for every reader and for the tokenize cache (which hashes the
    decompressed bytes). zstd and zip are refused, naming the format: read as lines their
    bytes would only give one "not valid UTF-8" per random chunk, and with ``--skip-bad`` the
    file would convert to zero records.
    """
    try:
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected a file")
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot open ({err.strerror})") from None
    try:
        head = handle.peek(6)[:6]  # peek, not read + seek: a pipe cannot seek back
    except OSError as err:
        handle.close()
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    name = _format_of(head)
    if name in _DECOMPRESSORS:
        return io.BufferedReader(_Decompressed(handle, path, name))
    if name is not None:
        handle.close()
        raise DataError(
            f"{path}: is a {name}-compressed file; decompress it first (the data commands read "
            "JSON Lines, JSON arrays and Parquet, plain or gzip, bzip2 or xz compressed)"
        )
    return handle


#: What `parse_jsonl_line` returns for a blank line (a line reading ``null`` is a value).
BLANK = object()


def parse_jsonl_line(raw: bytes, where: str, *, first: bool = False) -> Any:
    """The JSON value of one JSON Lines line, `BLANK` for a blank line, or a `BadRecord`.

    The one definition of how a line is read, shared by `iter_jsonl` and the tokenization
    workers, so both report the same reasons for the same bytes. On the `first` line a UTF-8
    byte order mark (written by Windows editors and Excel exports) is skipped, as
    `iter_json_array` skips it.
    """
    if first:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(
            where, "not UTF-8", f"not valid UTF-8 (byte {err.start} of the line)"
        ) from None
    if not line.strip():
        return BLANK
    try:
        return json.loads(line)
    except RecursionError:
        raise BadRecord(where, _TOO_DEEP, "JSON nested too deeply to parse") from None
    except json.JSONDecodeError as err:
        kind = _syntax_kind(err, len(line.rstrip()))
        raise BadRecord(where, kind, f"{kind} ({_message(err)} at column {err.colno})") from None
    except ValueError:
        raise BadRecord(where, "invalid JSON", _too_long()) from None


def iter_jsonl(path: str | Path, bad: BadHandler) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", value)`` for each non-blank line of a JSON Lines file."""
    path = Path(path)
    with open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                value = parse_jsonl_line(raw, where, first=number == 1)
            except BadRecord as err:
                bad(err)
                continue
            if value is not BLANK:
                yield where, value


def iter_json_array(path: str | Path, bad: BadHandler) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", element)`` for each element of a file holding one JSON array.

    The line is where the element starts. An element that starts on the line where the one
    before it ends (a minified file is one line) is located as ``"file:line:column (array
    index N)"``: the line alone would name the same place for thousands of records. The column
    counts characters from 1; the index counts elements from 0, as ``jq '.[N]'`` and the
    converters' record ids do. Elements containing bytes that are not UTF-8 or a
    raw control character in a string are reported as bad and skipped; any other syntax error
    (e.g. a truncated file) is reported at its line and column, and with ``skip_bad`` the rest
    of the file, which cannot be parsed, is counted as one bad item.
    """
    path = Path(path)
    with open_binary(path) as handle:
        text = handle.read().decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    line, line_start, scanned = 1, 0, 0

    def line_of(pos: int) -> int:
        """The line of `pos`; positions only move forward, so the file is scanned once."""
        nonlocal line, line_start, scanned
        line += text.count("\n", scanned, pos)
        newline = text.rfind("\n", scanned, pos)
        if newline >= 0:
            line_start = newline + 1
        scanned = pos
        return line

    def column_of(pos: int) -> int:
        line_of(pos)
        return pos - line_start + 1

    index, previous_end = 0, -1  # the element at `pos`, and where the one before it ended

    def element_at(pos: int) -> str:
        if previous_end < 0 or "\n" in text[previous_end:pos]:
            return f"{path}:{line_of(pos)}"
        return f"{path}:{line_of(pos)}:{column_of(pos)} (array index {index})"

    def syntax_error(pos: int, message: str, kind: str = "invalid JSON") -> BadRecord:
        number, column = line_of(pos), column_of(pos)
        return BadRecord(f"{path}:{number}", kind, f"{kind} ({message} at column {column})")

    pos = _WHITESPACE.match(text, 0).end()
    if pos < len(text) and text[pos] == "\ufeff":  # a UTF-8 byte order mark
        pos = _WHITESPACE.match(text, pos + 1).end()
    if pos >= len(text) or text[pos] != "[":
        raise DataError(
            f"{path}:{line_of(pos)}: expected a JSON array of records (a file starting with '[')"
        )
    pos = _WHITESPACE.match(text, pos + 1).end()
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except RecursionError:
            bad(BadRecord(element_at(pos), _TOO_DEEP, "JSON nested too deeply to parse"))
            return
        except json.JSONDecodeError as err:
            bad(syntax_error(err.pos, _message(err), _syntax_kind(err, len(text.rstrip()))))
            end = _end_despite_control_characters(err, text, pos)
            if end is None:
                return
        except ValueError:  # where the element ends is unknown: the rest is one bad item
            bad(BadRecord(element_at(pos), "invalid JSON", _too_long()))
            return
        else:
            where = element_at(pos)
            if _NOT_UTF8.search(text, pos, end):
                bad(BadRecord(where, "not UTF-8", "contains bytes that are not valid UTF-8"))
            else:
                yield where, value
        index, previous_end = index + 1, end
        pos = _WHITESPACE.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
            continue
        if pos < len(text) and text[pos] == "]":
            rest = _WHITESPACE.match(text, pos + 1).end()
            if rest != len(text):
                bad(syntax_error(rest, "extra data after the array"))
            return
        kind = "truncated JSON" if pos >= len(text) else "invalid JSON"
        bad(syntax_error(pos, "expected ',' or ']' after an element", kind))
        return


def _end_despite_control_characters(err: json.JSONDecodeError, text: str, pos: int) -> int | None:
    """Where the element at `pos` ends when its only fault is a raw control character (a
    literal tab or NUL inside a string), else None.

    Such an element is bad, as the same line of a JSON Lines file is, but its end is still
    known; without this, one literal tab would cost every later element of the array while
    being counted as a single bad item.
    """
    if not err.msg.startswith("Invalid control character"):
        return None
    try:
        return _LENIENT.raw_decode(text, pos)[1]
    except (ValueError, RecursionError):
        return None


#: Accepts control characters in strings; used only to find the end of a bad element.
_LENIENT = json.JSONDecoder(strict=False)


def iter_parquet(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:row N", row dict)`` for each row of a Parquet file (rows count from 1)."""
    path = Path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow (pip install 'tulu[data]')"
        ) from None
    open_binary(path).close()
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    batches = parquet.iter_batches(batch_size=4096)
    row = 0
    while True:
        try:  # a corrupt page surfaces only here, as pyarrow's OSError or ArrowInvalid
            batch = next(batches, None)
            values = [] if batch is None else batch.to_pylist()
        except Exception as err:
            raise DataError(f"{path}: not a readable Parquet file past row {row} ({err})") from None
        if batch is None:
            return
        for value in values:
            row += 1
            yield f"{path}:row {row}", value


def iter_records(path: str | Path, bad: BadHandler) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` for each valid record of a JSONL or Parquet file.

    This is how already-converted data (ours, or the public Tulu mixture) is read. Invalid
    records go to `bad`.
    """
    path = Path(path)
    items = iter_parquet(path) if path.suffix.lower() == ".parquet" else iter_jsonl(path, bad)
    for where, value in items:
        try:
            yield where, check_record(value, where)
        except BadRecord as err:
            bad(err)


def numbered_items(
    reader: Callable[[Path, BadHandler], Iterator[tuple[str, Any]]],
    path: Path,
    report: ConversionReport,
) -> Iterator[tuple[int, str, Any]]:
    """Yield ``(index, where, value)`` for every readable item, counting each one as read.

    `index` is the 0-based position among all of the file's items, unreadable ones (not UTF-8,
    not JSON) included: those are counted as read and passed to ``report.bad`` here, so record
    ids numbered by position stay the same whether or not a few lines are damaged.
    """
    index = 0

    def on_bad(error: BadRecord) -> None:
        nonlocal index
        index += 1
        report.read += 1
        report.bad(error)

    for where, value in reader(path, on_bad):
        report.read += 1
        yield index, where, value
        index += 1
