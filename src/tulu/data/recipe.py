"""Data recipes: which sources go into a mixture, from which files, and how many of each.

A recipe is a YAML file::

    seed: 42                  # sampling and shuffling
    validation: 0.01          # held-out share: a fraction (< 1) or a number of records (>= 1)
    dedup: [id, content]      # drop repeated ids and repeated conversations (default: both)
    tokenizer: null           # optional: for token statistics and ShareGPT's 2,048-token chunks
                              # (directory, tokenizer.json or hub id: EleutherAI/pythia-6.9b)
    max_seq_length: 2048      # length that counts as "truncated" in the statistics
    sources:
      - name: dolly                       # label in the report (default: the source)
        source: dolly                     # converter (`tulu data sources`); default: records
        path: databricks-dolly-15k.jsonl  # or a list of files; relative to the data dir
        count: 15011                      # or fraction: 0.5 (of the records available)
        options: {seed: 42}               # converter options

Relative paths are resolved against ``--data-dir`` when given, else against the recipe's own
directory, and so are the file options ``templates`` and ``tokenizer``; a tokenizer that is no
such path but reads as a hub id ``org/name`` is one. Every key is checked: an unknown or
misspelt key is an error that names the file, the entry and the valid keys, before any data
is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tulu.data.sources import SOURCES, converter_options
from tulu.errors import DataError
from tulu.hub import looks_like_hub_id

__all__ = ["Recipe", "SourceSpec", "load_recipe", "parse_recipe"]

_RECIPE_KEYS = ("seed", "validation", "dedup", "tokenizer", "max_seq_length", "sources")
_SOURCE_KEYS = ("name", "source", "path", "count", "fraction", "options")
_DEDUP_KINDS = ("id", "content")


@dataclass(frozen=True)
class SourceSpec:
    """One entry of a recipe: converted with `source` from `paths`, then sampled."""

    name: str
    source: str
    paths: tuple[Path, ...]
    count: int | None = None
    fraction: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def wanted(self, available: int) -> int:
        """How many records to take when `available` unique ones were converted."""
        if self.count is not None:
            return min(self.count, available)
        if self.fraction is not None:
            return round(available * self.fraction)
        return available


@dataclass(frozen=True)
class Recipe:
    sources: tuple[SourceSpec, ...]
    seed: int = 42
    validation: float = 0.0
    dedup: tuple[str, ...] = _DEDUP_KINDS
    tokenizer: Path | str | None = None  # a path, or a hub id (str)
    max_seq_length: int = 2048
    origin: str = "<recipe>"

    def validation_size(self, total: int) -> int:
        """Records held out from `total`: a fraction when < 1, else a count (at most total)."""
        if self.validation < 1:
            return round(total * self.validation)
        return min(int(self.validation), total)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_keys(mapping: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = [key for key in mapping if key not in valid]
    if unknown:
        raise DataError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (valid: {', '.join(valid)})"
        )


def _resolve(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: expected a file path, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _resolve_tokenizer(value: Any, base: Path, where: str) -> Path | str:
    """A tokenizer path, relative to `base` like the data files; or, when no such path exists
    and `value` reads as one, a hub id kept as written (``Tokenizer.load`` fetches it)."""
    path = _resolve(value, base, where)
    if not path.exists() and looks_like_hub_id(value):
        return value
    return path


def _parse_source(entry: Any, index: int, base: Path, origin: str) -> SourceSpec:
    where = f"{origin}: sources[{index}]"
    if not isinstance(entry, Mapping):
        raise DataError(f"{where}: expected a mapping with name/source/path/count")
    _check_keys(entry, _SOURCE_KEYS, where)
    source = entry.get("source", "records")
    if source not in SOURCES:
        raise DataError(f"{where}.source: unknown source {source!r} (known: {', '.join(SOURCES)})")
    if "path" not in entry:
        raise DataError(f"{where}: missing key 'path'")
    raw_paths = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
    if not raw_paths:
        raise DataError(f"{where}.path: the list of files is empty")
    paths = tuple(_resolve(p, base, f"{where}.path") for p in raw_paths)
    name = entry.get("name", paths[0].stem)
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}.name: expected a non-empty string, got {name!r}")
    where = f"{origin}: sources[{index}] ({name})"

    count, fraction = entry.get("count"), entry.get("fraction")
    if count is not None and fraction is not None:
        raise DataError(f"{where}: give either count or fraction, not both")
    if count is not None and (not _is_int(count) or count < 0):
        raise DataError(f"{where}.count: expected a non-negative integer, got {count!r}")
    if fraction is not None and (not _is_number(fraction) or not 0 <= fraction <= 1):
        raise DataError(f"{where}.fraction: expected a number from 0 to 1, got {fraction!r}")

    options = entry.get("options") or {}
    if not isinstance(options, Mapping):
        raise DataError(f"{where}.options: expected a mapping, got {options!r}")
    valid = converter_options(source)
    _check_keys(options, tuple(valid) or ("(none)",), f"{where}.options")
    options = dict(options)
    # Options that name a file resolve like the data files, not against the working directory.
    for key, resolve in (("templates", _resolve), ("tokenizer", _resolve_tokenizer)):
        if isinstance(options.get(key), str) and options[key]:
            options[key] = str(resolve(options[key], base, f"{where}.options.{key}"))
    return SourceSpec(
        name=name,
        source=source,
        paths=paths,
        count=count,
        fraction=None if fraction is None else float(fraction),
        options=options,
    )


def parse_recipe(data: Any, origin: str, base: Path) -> Recipe:
    """Check and build a `Recipe` from parsed YAML; `base` resolves relative paths."""
    if not isinstance(data, Mapping):
        raise DataError(f"{origin}: expected a mapping with a 'sources' list")
    _check_keys(data, _RECIPE_KEYS, origin)
    seed = data.get("seed", 42)
    if not _is_int(seed):
        raise DataError(f"{origin}: seed: expected an integer, got {seed!r}")
    validation = data.get("validation", 0)
    if (
        not _is_number(validation)
        or not math.isfinite(validation)  # YAML's .nan passes every comparison below
        or validation < 0
        or (1 <= validation and validation % 1)
    ):
        raise DataError(
            f"{origin}: validation: expected a fraction in [0, 1) or a whole number of "
            f"records, got {validation!r}"
        )
    dedup = data.get("dedup", list(_DEDUP_KINDS))
    if not isinstance(dedup, list) or any(kind not in _DEDUP_KINDS for kind in dedup):
        raise DataError(
            f"{origin}: dedup: expected a list drawn from {', '.join(_DEDUP_KINDS)}, got {dedup!r}"
        )
    max_seq_length = data.get("max_seq_length", 2048)
    if not _is_int(max_seq_length) or max_seq_length <= 0:
        raise DataError(f"{origin}: max_seq_length: expected a positive integer")
    tokenizer = data.get("tokenizer")
    tokenizer_path = (
        None if tokenizer is None else _resolve_tokenizer(tokenizer, base, f"{origin}: tokenizer")
    )

    entries = data.get("sources")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{origin}: sources: expected a non-empty list of sources")
    sources = tuple(_parse_source(e, i, base, origin) for i, e in enumerate(entries))
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(
            f"{origin}: source name(s) {', '.join(map(repr, repeated))} used more than once "
            "(give each entry its own 'name')"
        )
    return Recipe(
        sources=sources,
        seed=seed,
        validation=float(validation),
        dedup=tuple(dedup),
        tokenizer=tokenizer_path,
        max_seq_length=max_seq_length,
        origin=origin,
    )


def load_recipe(path: str | Path, data_dir: str | Path | None = None) -> Recipe:
    """Read and check a recipe file; relative data paths resolve against `data_dir` if given."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read recipe ({err.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: the recipe is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise DataError(f"{path}{line}: invalid YAML ({problem})") from None
    except ValueError as err:  # a value the constructor rejects: 2023-13-45, an int > 4300 digits
        raise DataError(f"{path}: invalid YAML ({err})") from None
    except RecursionError:
        raise DataError(f"{path}: invalid YAML (nested too deeply)") from None
    base = Path(data_dir) if data_dir is not None else path.parent
    return parse_recipe(data, str(path), base)
