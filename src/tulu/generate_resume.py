"""Resuming an interrupted `tulu generate --output OUT`.

Each result is appended to ``OUT.progress`` as its request finishes (one JSON line with the
input's index), so a run that is killed (Ctrl-C, SIGKILL, out of memory, a preempted node)
keeps what it finished, and the same command run again generates only the rest. The final
OUT is written whole at the end, in input order, and the progress file removed.

The first line of the progress file is a header: everything the results depend on (the
model's resolved directory, its weight files' sizes and modification times as the eval cache
keys them, and its dtype; the sampling settings, --system, --raw, the LoRA settings,
--max-model-len, and digests of the input records and of the prompts' token ids). A rerun
whose header differs is refused with the differences named: results of two settings are never
mixed in one file, and a model copied elsewhere counts as another one. What the header leaves
out, on purpose: the model as typed (a relative path, a hub id and --revision are what they
resolve to; a hub snapshot's directory names its commit), the device and the engine's sizes
(which change no result), so that a job preempted on one node resumes on another. Seeded
sampling resumes exactly: every request has its own random generator seeded with --seed, so
its sample does not depend on the other requests in the batch.

A cut last line (the process killed mid-write) is dropped and its prompt generated again; a
bad line anywhere else is an error naming the file and line, since it means the file was
changed by something else.

One run at a time writes OUT: for its whole length a run holds an flock on ``OUT.lock`` (see
`writing_alone`), and a second run given the same --output (a job launched twice, or restarted
while the first still runs) is refused at once rather than appending to the same progress file
and overwriting the same OUT.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tulu.data.readers import BLANK, parse_jsonl_line
from tulu.data.records import BadRecord
from tulu.errors import TuluError

if TYPE_CHECKING:
    from tulu.engine.sampling import SamplingParams

FORMAT = "tulu generate progress 1"
# What `tulu generate` adds to each input record, in the order it writes them ('logprobs'
# only with --logprobs).
RESULT_FIELDS = ("output", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs")
_TYPES = {
    "output": str,
    "finish_reason": str,
    "prompt_tokens": int,
    "completion_tokens": int,
    "logprobs": list,
}
_NOUNS = {str: "string", int: "whole number", list: "list"}


def result_fields(params: SamplingParams) -> tuple[str, ...]:
    """The fields a run with these sampling settings adds to each input record."""
    return RESULT_FIELDS if params.logprobs is not None else RESULT_FIELDS[:-1]


def progress_path(output: Path) -> Path:
    """Where the finished results of a run writing `output` are kept until it completes."""
    return output.with_name(output.name + ".progress")


def lock_path(output: Path) -> Path:
    """The file a run writing `output` holds locked until it ends (see `writing_alone`)."""
    return output.with_name(output.name + ".lock")


# flock's answers when another open file holds the lock (EACCES on some network filesystems).
_HELD = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}
# Tries to lock the file the path names, each after a run that held the previous one removed it.
_ATTEMPTS = 5


@contextmanager
def writing_alone(output: Path | None) -> Iterator[None]:
    """Hold `output`'s lock for the block, or refuse at once naming the run that holds it.

    An flock on ``OUT.lock``, which the kernel drops however the holder ends (SIGKILL
    included), so a file a killed run left behind blocks nothing. The file holds the
    holder's pid and host, for the refusal to name, and is removed at the end while still
    locked: a run that opened it just before then finds, once it holds the lock, that the
    path names another file, and tries again. On a filesystem without flock the block runs
    unguarded, with a warning, as it did before the lock existed (the file is left: flock may
    fail for a while only, such as an NFS lock daemon down, and another run may hold it).
    None (stdout), and an output that is no file name (``.``, a directory, a device), take no
    lock: `tulu.jsonl.check_output` refuses those with its own message.
    """
    if output is None or not _names_a_file(output):
        yield
        return
    path = lock_path(output)
    fd = _lock(output, path)
    try:
        yield
    finally:
        if fd is not None:
            _unlock(path, fd)


def _names_a_file(output: Path) -> bool:
    """Whether `output` can name a results file (and so a lock file beside it)."""
    if output.name in ("", ".", ".."):
        return False
    return not output.exists() or output.is_file()


def _lock(output: Path, path: Path) -> int | None:
    """An open descriptor of `path` holding its lock; None where flock is not supported."""
    for _ in range(_ATTEMPTS):
        fd = _open(output, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd) if err.errno in _HELD else None
            os.close(fd)
            if err.errno in _HELD:
                raise _busy(output, path, holder) from None
            print(
                f"tulu generate: warning: cannot lock {path} ({err.strerror or err}): a second "
                f"run given --output {output} would not be refused",
                file=sys.stderr,
            )
            return None
        if _names(path, fd):
            me = {"pid": os.getpid(), "host": socket.gethostname()}
            with suppress(OSError):  # a full disk: a refusal names no pid
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            return fd
        os.close(fd)  # removed by the run that held it, since we opened it
    raise _busy(output, path, None)


def _open(output: Path, path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise TuluError(f"--output {output}: cannot write there ({err.strerror or err})") from None


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(now, os.fstat(fd))


def _holder(fd: int) -> str | None:
    """'pid N' (and its host where that is another) of the run holding the lock, if it said."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        pid, host = holder["pid"], holder["host"]
    except (OSError, ValueError, TypeError, KeyError):  # not written yet, or not by a run
        return None
    return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"


def _busy(output: Path, path: Path, holder: str | None) -> TuluError:
    who = f" ({holder})" if holder else ""
    return TuluError(
        f"another `tulu generate`{who} is writing {output} (it holds {path}); wait for it to "
        "end, or stop it, before running this again"
    )


def _unlock(path: Path, fd: int) -> None:
    """Remove the lock file, then let go of it (the order `_lock` relies on)."""
    try:
        if _names(path, fd):  # not one a later run made after someone deleted ours
            path.unlink()
    except OSError:
        pass  # left behind, it blocks nothing
    finally:
        os.close(fd)


def digest(values: Iterable[Any]) -> str:
    """SHA-256 of JSON values in order: a header field that changes when any of them does."""
    sha = hashlib.sha256()
    for value in values:
        sha.update(json.dumps(value).encode("ascii") + b"\n")  # ASCII: lone surrogates too
    return sha.hexdigest()


def files_identity(paths: Iterable[Path]) -> list[list[Any]]:
    """[path, size, mtime] of each file: retrained or replaced weights change it."""
    out = []
    for path in paths:
        stat = path.stat()
        out.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


class Progress:
    """The finished results of a run (`done`: input index -> result fields), and the file
    they are appended to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: dict[str, Any] | None = None  # None: no file, or one cut within line 1
        self.done: dict[int, dict[str, Any]] = {}
        self._keep = 0  # bytes of whole lines; a cut last line after them is dropped
        self._out: TextIO | None = None

    @classmethod
    def load(
        cls,
        path: Path,
        settings: dict[str, Any],
        count: int,
        fields: tuple[str, ...] = RESULT_FIELDS[:-1],
        samples: int = 1,
    ) -> Progress:
        """The progress file of a previous run with these `settings`, or an empty one; each
        result holds `fields`, with a list of `samples` values where there are several.

        `settings` are the header fields known before the model loads, so that a rerun with
        other settings is refused at once; `check` compares the model's fields after it loads.
        """
        progress = cls(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return progress
        except OSError as err:
            raise TuluError(f"{path}: cannot read the results kept there ({err})") from None
        cut = data.rfind(b"\n") + 1
        progress._keep = cut
        lines = data[:cut].splitlines()
        if not lines:
            return progress
        header = progress._parse(lines[0], 1)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise TuluError(
                f"{path}:1: not a `tulu generate` progress file; move it away or delete it"
            )
        entries = [
            (number, progress._parse(raw, number)) for number, raw in enumerate(lines[1:], 2)
        ]
        entries = [(number, entry) for number, entry in entries if entry is not BLANK]
        if not entries:
            return progress  # a header alone keeps nothing: start() writes a new one
        progress.header = header
        progress.check(settings)
        line_of: dict[int, int] = {}  # index -> the line of its result
        for number, entry in entries:
            problem = _result_problem(entry, count, fields, samples)
            if problem is None and entry["index"] in line_of:
                problem = (
                    f"a second result for index {entry['index']} (line {line_of[entry['index']]})"
                )
            if problem:
                raise TuluError(f"{path}:{number}: {problem}; {progress._remedy(one_line=True)}")
            line_of[entry["index"]] = number
            progress.done[entry["index"]] = {k: entry[k] for k in fields}
        return progress

    def _parse(self, raw: bytes, number: int) -> Any:
        try:
            return parse_jsonl_line(raw, f"{self.path}:{number}")
        except BadRecord as err:
            raise TuluError(f"{err}; {self._remedy(one_line=number > 1)}") from None

    def _remedy(self, *, one_line: bool) -> str:
        again = "remove that line to generate its result again, or " if one_line else ""
        return f"{again}delete {self.path} to start over"

    def check(self, expected: dict[str, Any]) -> None:
        """Refuse to resume results made with other settings, naming each difference."""
        if self.header is None:
            return
        now = json.loads(json.dumps(expected))  # as the header holds them: tuples as lists
        changes = _differences({k: self.header.get(k) for k in now}, now)
        if changes:
            raise TuluError(
                f"{self.path} holds the results of a run with other settings "
                f"({'; '.join(changes)}); rerun with the settings of that run to resume it, "
                f"or delete {self.path} to start over"
            )

    def start(self, header: dict[str, Any]) -> None:
        """Open the file for appending results, checked against or starting with `header`."""
        self.check(header)
        try:
            if self.header is None:
                self._out = open(self.path, "w", encoding="utf-8")
                self._write({"format": FORMAT, **header})
                self.header = json.loads(json.dumps(header))
            else:
                os.truncate(self.path, self._keep)  # else the next line would join a cut one
                self._out = open(self.path, "a", encoding="utf-8")
        except OSError as err:
            raise TuluError(f"{self.path}: cannot write the results there ({err})") from None

    def add(self, index: int, result: dict[str, Any]) -> None:
        """Keep one finished result, flushed before the next one is waited for: a killed
        process cannot lose it. Not fsynced line by line: what a machine crash loses of the
        last lines is generated again (a cut last line is dropped)."""
        assert self._out is not None, "start() first"
        self._write({"index": index, **result})
        self.done[index] = result

    def _write(self, entry: dict[str, Any]) -> None:
        try:
            self._out.write(json.dumps(entry) + "\n")  # type: ignore[union-attr]
            self._out.flush()  # type: ignore[union-attr]
        except OSError as err:
            raise TuluError(f"{self.path}: cannot write the results there ({err})") from None

    def close(self) -> None:
        """Close the file; a line that could not be written (a full disk) is left cut, and a
        resumed run generates its result again."""
        if self._out is not None:
            out, self._out = self._out, None
            try:
                out.close()
            except OSError:
                pass

    def remove(self) -> None:
        """Delete the file: the run's output is written, or nothing was kept."""
        self.close()
        self.path.unlink(missing_ok=True)


def _result_problem(entry: Any, count: int, fields: tuple[str, ...], samples: int) -> str | None:
    """What is wrong with a result line for `count` inputs; None if nothing."""
    expected = ("index", *fields)
    if not isinstance(entry, dict) or set(entry) != set(expected):
        return f"expected a JSON object with the fields {', '.join(expected)}"
    index = entry["index"]
    if type(index) is not int or not 0 <= index < count:
        return f"index {index!r} is not that of one of the {count} inputs"
    for field in fields:
        kind = _TYPES[field]
        noun = _NOUNS[kind]
        if samples > 1 and field != "prompt_tokens":  # one value per sample
            values = entry[field]
            if type(values) is not list or len(values) != samples:
                return f"field {field!r} must be a list of {samples} {noun}s, one per sample"
            if any(type(value) is not kind for value in values):
                return f"field {field!r} must be a list of {noun}s"
        elif type(entry[field]) is not kind:
            return f"field {field!r} must be a {noun}"
    return None


def _differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """'FIELD: OLD before, NEW now' for each field that differs (nested fields dotted;
    sampling fields named by their command-line flags)."""
    out = []
    for key, value in now.items():
        old = before.get(key)
        if old == value:
            continue
        name = f"--{key.replace('_', '-')}" if prefix == "sampling." else prefix + key
        if isinstance(old, dict) and isinstance(value, dict):
            out += _differences(old, value, f"{name}.")
        else:
            out.append(f"{name}: {_short(old)} before, {_short(value)} now")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
