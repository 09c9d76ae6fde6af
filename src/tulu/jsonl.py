"""Command output: JSON Lines writing, and checking an output file's path before the work
(reading lives in `tulu.data.readers`)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from tulu.errors import TuluError


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` whole or not at all: written to ``.NAME.tmp`` beside it, then
    renamed, so an interruption or a full disk leaves the previous file as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` whole or not at all: results rewritten as a run
    goes must stay readable if it is killed mid-write."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through symbolic or hard links too); a symbolic link
    loop names no file (`os.path.realpath`, unlike `Path.resolve`, does not raise on one)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def is_special_file(path: Path) -> bool:
    """Whether `path` (through symbolic links) is a device, a pipe or a socket.

    Outputs are written beside their name and renamed over it, which would replace such a
    file by a regular one (``--output /dev/null`` run as root would delete the device).
    """
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):  # missing, a link loop, ...: not there to be replaced
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_output(path: Path | None, flag: str = "--output", inputs: Iterable[Path] = ()) -> None:
    """Refuse an output file that cannot be written before the work, not after it (a run
    that took minutes must not lose its results to a typo in the name): a directory, a
    device or pipe, one of the command's `inputs` (replaced, it would be lost), or a place
    where the file cannot be created. Missing parent directories are created."""
    if path is None:
        return
    if path.is_dir():
        raise TuluError(f"{flag} {path}: is a directory, expected a file name")
    if is_special_file(path):
        raise TuluError(
            f"{flag} {path}: not a regular file (a device or a pipe); the output replaces "
            "its file, so name a regular file"
        )
    for source in inputs:
        if same_file(path, source):
            raise TuluError(
                f"{flag} {path}: would overwrite the input {source} (choose another path)"
            )
    probe = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise TuluError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write one compact JSON object per line (UTF-8, not ASCII-escaped); return the count."""
    count = 0
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        count += 1
    return count
