"""JSON Lines reading with errors that point at the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tulu.errors import TuluError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad lines raise naming file:line."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise TuluError(f"{path}: cannot open ({err.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TuluError(
                    f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise TuluError(
                    f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(value, dict):
                raise TuluError(
                    f"{path}:{number}: expected a JSON object, got {type(value).__name__}"
                )
            yield number, value


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write one compact JSON object per line (UTF-8, not ASCII-escaped); return the count."""
    count = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        count += 1
    return count
