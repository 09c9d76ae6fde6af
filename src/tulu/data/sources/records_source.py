"""Already-converted records: our own JSONL output, or the public Tulu mixture (JSONL/Parquet).

The records pass through unchanged (extra fields included) after validation, so loading the
public mixture is the same code path as loading a file this project wrote.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tulu.data.readers import iter_records
from tulu.data.records import BadInput, ConversionReport

__all__ = ["convert"]


def convert(path: Path, report: ConversionReport) -> Iterator[dict[str, Any]]:
    """Yield every valid record of `path`; invalid ones go to ``report.bad``."""
    counting = _Counting(report)
    for _, record in iter_records(path, counting):
        report.read += 1
        yield record


class _Counting(BadInput):
    """Forwards bad items to the report's handler, counting them as read."""

    def __init__(self, report: ConversionReport) -> None:
        super().__init__()
        self._report = report

    def __call__(self, error) -> None:  # type: ignore[override]
        self._report.read += 1
        self._report.bad(error)
