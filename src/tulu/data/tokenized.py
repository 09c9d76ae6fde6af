"""A tokenized dataset on disk: flat memory-mapped arrays and their meta.json.

Layout of one directory (written by `tulu.data.tokenize.tokenize_records`)::

    input_ids.bin   every kept example's token ids, back to back (uint16, or int32 when the
                    vocabulary does not fit in 16 bits)
    trained.bin     one uint8 per token: 1 where a loss is taken (labels = input_ids there,
                    -100 elsewhere; labels are not stored twice)
    offsets.bin     int64, n + 1 entries: example i is tokens offsets[i]:offsets[i + 1]
    meta.json       counts, settings, source, cache key and format version (written last)

`TokenizedDataset` opens it with numpy memmaps, so a 490,000-example mixture costs no Python
objects and no RAM beyond the page cache.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tulu.chat import (
    IGNORE_INDEX,
)
from tulu.errors import DataError

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "TokenizedDataset",
    "TokenizedExample",
    "expected_sizes",
    "read_meta",
]

#: Bumped whenever the files or their meaning change; part of the cache key.
FORMAT_VERSION = 1

META_FILE = "meta.json"


# ============================================================================ the dataset


@dataclass(frozen=True)
class TokenizedExample:
    """One training example: ids and labels (`IGNORE_INDEX` where no loss is taken), int64."""

    input_ids: np.ndarray
    labels: np.ndarray

    def __iter__(self):  # unpacks as (input_ids, labels)
        return iter((self.input_ids, self.labels))


def _memmap(path: Path, dtype: np.dtype | str, count: int) -> np.ndarray:
    """A read-only memmap of `count` items (numpy cannot map an empty file)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenizedDataset:
    """A tokenized dataset directory, opened with memmaps (nothing is loaded up front).

    ``dataset[i]`` is a `TokenizedExample`; `lengths` are the token counts; `meta` is the
    parsed meta.json; `cache_hit` says whether `tokenize_records` found it already built.
    """

    def __init__(self, directory: Path, meta: dict[str, Any], cache_hit: bool = False) -> None:
        self.directory = directory
        self.meta = meta
        self.cache_hit = cache_hit
        n, tokens = meta["num_examples"], meta["num_tokens"]
        self.input_ids = _memmap(directory / "input_ids.bin", meta["dtype"], tokens)
        self.trained = _memmap(directory / "trained.bin", np.uint8, tokens)
        # An empty dataset has an empty offsets file (numpy cannot map zero bytes).
        self.offsets = _memmap(directory / "offsets.bin", np.int64, n + 1 if n else 0)
        if n == 0:
            self.offsets = np.zeros(1, dtype=np.int64)

    @classmethod
    def open(cls, directory: str | Path, *, cache_hit: bool = False) -> TokenizedDataset:
        """Open a directory written by `tokenize_records`, checking that it is complete."""
        directory = Path(directory)
        meta = read_meta(directory)
        expected = expected_sizes(meta)
        for name, size in expected.items():
            path = directory / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                raise DataError(
                    f"{path}: expected {size} bytes from {META_FILE}, found "
                    f"{'no file' if actual is None else f'{actual} bytes'} (incomplete or "
                    "modified tokenized dataset; tokenize again)"
                )
        return cls(directory, meta, cache_hit)

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def __getitem__(self, index: int) -> TokenizedExample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"example {index} out of range (dataset has {n})")
        index %= n
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = np.asarray(self.input_ids[lo:hi], dtype=np.int64)
        labels = np.where(self.trained[lo:hi] > 0, ids, IGNORE_INDEX)
        return TokenizedExample(ids, labels)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every example (int64)."""
        return np.diff(np.asarray(self.offsets))

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_trained_tokens(self) -> int:
        return int(self.meta["num_trained_tokens"])

    @property
    def max_seq_length(self) -> int:
        return int(self.meta["settings"]["max_seq_length"])

    @property
    def pad_token_id(self) -> int | None:
        return self.meta["tokenizer"]["pad_token_id"]

    def __repr__(self) -> str:
        return (
            f"TokenizedDataset({str(self.directory)!r}, examples={len(self)}, "
            f"tokens={self.num_tokens}, trained={self.num_trained_tokens})"
        )


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{directory}: not a tokenized dataset (no {META_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise DataError(
            f"{path}: format version {found!r}, this tulu reads {FORMAT_VERSION} (tokenize again)"
        )
    return meta


def expected_sizes(meta: Mapping[str, Any]) -> dict[str, int]:
    tokens, n = meta["num_tokens"], meta["num_examples"]
    return {
        "input_ids.bin": tokens * np.dtype(meta["dtype"]).itemsize,
        "trained.bin": tokens,
        "offsets.bin": (n + 1) * 8 if n else 0,
    }
