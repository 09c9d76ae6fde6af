"""The one record format every source is converted to, and how bad input is reported.

A record is one JSON object per line::

    {"dataset": "dolly", "id": "dolly_0", "messages": [{"role": "user", "content": "..."},
                                                        {"role": "assistant", "content": "..."}]}

It is the format of open-instruct's converted Tulu mixture, so the public mixture loads as is.
Roles are ``system``, ``user`` and ``assistant``; every record needs at least one assistant turn
with non-blank content (the only tokens training takes a loss on). Extra top-level fields are
kept, so users may carry their own metadata through.

Bad input never stops silently and never vanishes silently: a `BadInput` either raises the
first problem as a `BadRecord` (``file:line: reason``) or, with ``skip_bad``, counts every
skipped record by reason; rule-based drops that are part of a recipe (e.g. ShareGPT's
conversations with a system turn) are counted too, by `ConversionReport.drop`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tulu.errors import DataError
from tulu.jsonl import is_special_file

__all__ = [
    "ROLES",
    "BadHandler",
    "BadInput",
    "BadRecord",
    "ConversionReport",
    "check_object",
    "check_output_path",
    "check_record",
    "creation_mode",
    "make_record",
    "renamed_ids",
    "string_field",
    "type_name",
    "write_records",
]

ROLES = ("system", "user", "assistant")

#: How many bad locations a skipping `BadInput` remembers per reason for its report.
_EXAMPLES_PER_REASON = 3


class BadRecord(DataError):
    """One unusable input record. `kind` is a short reason used to count skipped records."""

    def __init__(self, where: str, kind: str, detail: str | None = None) -> None:
        self.where = where
        self.kind = kind
        self.detail = detail or kind
        super().__init__(f"{where}: {self.detail}")


class OptionError(DataError):
    """A converter option with a bad value. Raised by converters, which do not know where the
    option was given: a recipe adds its file and source entry (`tulu.data.mixture`)."""


#: What readers call with each unusable item: a `BadInput`, or any function taking the error.
BadHandler = Callable[[BadRecord], None]


@dataclass
class BadInput:
    """What to do with a bad record: raise it (default), or skip it and count it by reason.

    ``collect=True`` keeps every error (``tulu data validate`` reports them all).
    """

    skip_bad: bool = False
    collect: bool = False
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    errors: list[BadRecord] = field(default_factory=list)

    def __call__(self, error: BadRecord) -> None:
        if not (self.skip_bad or self.collect):
            raise error
        self.counts[error.kind] += 1
        seen = self.examples.setdefault(error.kind, [])
        if len(seen) < _EXAMPLES_PER_REASON:
            seen.append(error.where)
        if self.collect:
            self.errors.append(error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary_lines(self) -> list[str]:
        """``N skipped: reason (e.g. file:3, file:9)`` per reason, most frequent first."""
        return [
            f"{n} skipped: {kind} (e.g. {', '.join(self.examples.get(kind, []))})"
            for kind, n in self.counts.most_common()
        ]


@dataclass
class ConversionReport:
    """Counts of one conversion: records written, records skipped as bad, records dropped by rule.

    Converters call `drop` for records a recipe removes on purpose (they are not errors), so the
    user sees every record that went in and did not come out.
    """

    bad: BadInput = field(default_factory=BadInput)
    read: int = 0
    written: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count

    def summary_lines(self) -> list[str]:
        lines = [f"{self.written} records written from {self.read} read"]
        lines += [f"{n} dropped: {reason}" for reason, n in self.dropped.most_common()]
        lines += self.bad.summary_lines()
        return lines


def type_name(value: Any) -> str:
    """A JSON-ish name for a value's type, for error messages (``null`` for None)."""
    return "null" if value is None else type(value).__name__


def check_object(value: Any, where: str) -> Mapping[str, Any]:
    """`value` if it is a JSON object, else a `BadRecord` of kind "not a JSON object"."""
    if not isinstance(value, Mapping):
        raise BadRecord(
            where, "not a JSON object", f"expected a JSON object, got {type_name(value)}"
        )
    return value


def string_field(item: Mapping[str, Any], name: str, where: str, *, optional: bool = False) -> str:
    """``item[name]`` as a string, or a `BadRecord` naming the field.

    With `optional`, a missing or null field reads as ``""`` (Alpaca's ``input``).
    """
    if name not in item or (optional and item[name] is None):
        if optional:
            return ""
        raise BadRecord(where, "missing field", f"missing field {name!r}")
    value = item[name]
    if not isinstance(value, str):
        raise BadRecord(
            where, "wrong type", f"field {name!r}: expected a string, got {type_name(value)}"
        )
    return value


def check_record(value: Any, where: str) -> dict[str, Any]:
    """Return `value` if it is a valid record, else raise `BadRecord` naming the field.

    Checks: an object with string ``dataset`` and ``id`` and a non-empty ``messages`` list of
    ``{"role", "content"}`` objects with a known role and string content, at least one
    assistant turn, no assistant turn whose content is blank, and no extra field (kept as it
    is) that cannot be written back as UTF-8 JSON.
    """
    check_object(value, where)
    for name in ("dataset", "id", "messages"):
        if name not in value:
            raise BadRecord(where, "missing field", f"missing field {name!r}")
    for name in ("dataset", "id"):
        if not isinstance(value[name], str):
            raise BadRecord(
                where,
                "wrong type",
                f"field {name!r}: expected a string, got {type_name(value[name])}",
            )
        _check_utf8(value[name], where, f"field {name!r}")
    messages = value["messages"]
    if not isinstance(messages, list):
        raise BadRecord(
            where, "wrong type", f"field 'messages': expected a list, got {type_name(messages)}"
        )
    if not messages:
        raise BadRecord(where, "no messages", "field 'messages' is empty")
    has_assistant = False
    for index, message in enumerate(messages):
        at = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise BadRecord(
                where, "wrong type", f"{at}: expected an object, got {type_name(message)}"
            )
        for name in ("role", "content"):
            if name not in message:
                raise BadRecord(where, "missing field", f"{at}: missing field {name!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadRecord(
                where,
                "unknown role",
                f"{at}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})",
            )
        if not isinstance(content, str):
            raise BadRecord(
                where,
                "wrong type",
                f"{at}.content: expected a string, got {type_name(content)}",
            )
        _check_utf8(content, where, f"{at}.content")
        if role == "assistant":
            if not content.strip():
                raise BadRecord(where, "empty assistant turn", f"{at}: empty assistant turn")
            has_assistant = True
        _check_extra_fields(message, ("role", "content"), where, f"{at}.")
    if not has_assistant:
        raise BadRecord(where, "no assistant turn", "no assistant turn (nothing to train on)")
    _check_extra_fields(value, ("dataset", "id", "messages"), where, "")
    return dict(value)


def _check_extra_fields(
    item: Mapping[str, Any], known: tuple[str, ...], where: str, at: str
) -> None:
    """A `BadRecord` for an extra field that cannot be written back as UTF-8 JSON.

    Extra fields are carried through to the output unchanged, so one that cannot be written
    (a Parquet timestamp or binary column, an unpaired surrogate escaped in the JSON) would
    otherwise end a conversion with a traceback after the record passed validation. Only the
    extra fields are encoded here, so the usual record, which has none, costs nothing more.
    `at` prefixes a field inside a message (``messages[0].``).
    """
    for name, extra in item.items():
        if name in known:
            continue
        label = f"{at}{name}" if at else f"field {name!r}"
        try:
            json.dumps(extra, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRecord(
                where, "not UTF-8", f"{label}: contains an unpaired surrogate (not UTF-8)"
            ) from None
        except (TypeError, ValueError, RecursionError) as err:
            raise BadRecord(
                where, "wrong type", f"{label}: cannot be written as JSON ({err})"
            ) from None


def _check_utf8(text: str, where: str, at: str) -> None:
    """A `BadRecord` for a string that UTF-8 cannot encode (an unpaired surrogate, e.g. a cut
    emoji escaped in the JSON): written out, it would end the run with a UnicodeEncodeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord(
            where, "not UTF-8", f"{at}: contains an unpaired surrogate (not UTF-8)"
        ) from None


def make_record(dataset: str, record_id: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """A record in the canonical key order (dataset, id, messages)."""
    return {"dataset": dataset, "id": record_id, "messages": messages}


def renamed_ids(record_id: str, stem: str) -> Iterator[str]:
    """The ids to try, in order, for a record whose id an earlier input file already used.

    ``{id}@{stem}`` first; files in different folders can share a stem (``a/cot.jsonl``,
    ``b/cot.jsonl``), so when that is taken by another file too, ``{id}@{stem}.2``, ``.3``, ...
    Without the numbered fallback the third file's record would get the second's id: written
    twice by `convert`, or dropped as a duplicate by `mix` although its content differs.
    """
    yield f"{record_id}@{stem}"
    for number in itertools.count(2):
        yield f"{record_id}@{stem}.{number}"


def check_output_path(path: str | Path) -> Path:
    """`path` as a `Path` if records can be written there, else a `DataError`.

    Records are written as JSON Lines only; a ``.parquet`` name would get JSON text that every
    reader, ours included, then rejects as a corrupt Parquet file.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an output file name")
    if is_special_file(path):
        raise DataError(
            f"{path}: not a regular file (a device or a pipe); records replace their output "
            "file, so name a regular file"
        )
    if path.suffix.lower() == ".parquet":
        raise DataError(f"{path}: records are written as JSON Lines; name the file .jsonl")
    return path


def creation_mode(mode: int) -> int:
    """`mode` less the process umask: what ``open`` or ``mkdir`` would have given.

    Atomic writes go through `tempfile`, which creates files 0600 and directories 0700
    whatever the umask; renamed into place, a mixture or a tokenized dataset would then be
    unreadable to the group (e.g. a training job running as another user).
    """
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_records(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write records as JSON Lines to `path` atomically; return how many were written.

    The file appears under its name only once every record is written (a temporary file in
    the same directory is renamed over it), so a failed or interrupted conversion never leaves
    a half-written file or clobbers a previous good one.
    """
    path = check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise DataError(f"{path}: cannot write ({err.strerror})") from None
    with contextlib.suppress(OSError):  # a filesystem without modes keeps tempfile's 0600
        os.fchmod(fd, creation_mode(0o666))
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
