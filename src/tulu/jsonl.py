"""JSON Lines writing for command output (reading lives in `tulu.data.readers`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write one compact JSON object per line (UTF-8, not ASCII-escaped); return the count."""
    count = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        count += 1
    return count
