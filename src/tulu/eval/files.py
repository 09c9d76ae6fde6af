"""Reading the benchmarks' JSON files with errors that name the file (and the line)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tulu.errors import DataError

__all__ = ["read_json", "text_lines"]


def read_json(path: Path) -> Any:
    """The parsed JSON document at `path`; DataError with ``path:line`` when it is invalid,
    and with the reason when it cannot be read (missing, not UTF-8). A leading UTF-8 BOM (as
    Windows editors write) is skipped, not an error."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc


def text_lines(raw_lines: Iterable[bytes], path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each line of a binary file, decoded one line at a time so
    that a line that is not UTF-8 is reported as ``path:line`` (a text-mode reader can only
    give a byte offset into its buffer). A leading UTF-8 BOM is skipped."""
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not UTF-8 text: {exc.reason}") from exc
        yield lineno, text
