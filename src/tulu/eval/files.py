"""Reading the benchmarks' JSON files with errors that name the file (and the line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tulu.errors import DataError

__all__ = ["read_json"]


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
