"""Tests for the lock that lets one `tulu generate` run at a time write an --output
(tulu.generate_resume.writing_alone); resuming itself is tested through the CLI in
tests/test_cli.py."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest

from tulu.errors import TuluError
from tulu.generate_resume import lock_path, writing_alone


def locked_elsewhere(path: Path) -> bool:
    """Whether another open file holds `path`'s flock (flock locks are per open file, so this
    process's own holds count as well)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_the_lock_is_held_for_the_block_and_its_file_removed(tmp_path: Path) -> None:
    output = tmp_path / "new" / "out.jsonl"  # a missing directory is created
    with writing_alone(output):
        lock = lock_path(output)
        assert locked_elsewhere(lock)
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert list(output.parent.iterdir()) == []
    with pytest.raises(KeyError), writing_alone(output):
        raise KeyError("a failed run")
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "holder"),
    [
        (b'{"pid": 7, "host": "node9"}', " (pid 7 on node9)"),
        (b"", ""),  # locked, its pid not written yet
        (b"[1]", ""),  # not written by a run
    ],
)
def test_a_second_writer_is_refused_naming_the_holder(
    tmp_path: Path, content: bytes, holder: str
) -> None:
    output = tmp_path / "out.jsonl"
    lock = lock_path(output)
    lock.write_bytes(content)
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(TuluError) as refused, writing_alone(output):
            pytest.fail("ran while another run held the lock")
    finally:
        os.close(fd)
    assert str(refused.value) == (
        f"another `tulu generate`{holder} is writing {output} (it holds {lock}); wait for it "
        "to end, or stop it, before running this again"
    )
    assert lock.read_bytes() == content  # the holder's, untouched


def test_a_lock_file_removed_by_the_run_ending_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that opened OUT.lock just before the holder removed it and let go holds the
    removed file's lock, which guards nothing: a third run creates and locks a new OUT.lock.
    It must lock the file the path names instead."""
    output = tmp_path / "out.jsonl"
    lock = lock_path(output)
    real = fcntl.flock
    ended = []

    def holder_ends_first(fd: int, operation: int) -> None:
        if not ended:  # between our open and our flock, the holder removes the file
            ended.append(True)
            lock.unlink()
            lock.touch()  # and a third run makes a new one
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", holder_ends_first)
    with writing_alone(output):
        monkeypatch.setattr(fcntl, "flock", real)
        assert locked_elsewhere(lock)


def test_a_filesystem_without_flock_runs_unguarded_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    output = tmp_path / "out.jsonl"
    with writing_alone(output):
        pass
    assert capsys.readouterr().err == (
        f"tulu generate: warning: cannot lock {lock_path(output)} ({os.strerror(errno.ENOLCK)}): "
        f"a second run given --output {output} would not be refused\n"
    )
    # Left in place: flock may fail for a while only, and another run may hold this file.
    assert list(tmp_path.iterdir()) == [lock_path(output)]


@pytest.mark.parametrize("name", [".", "..", "dir", "/dev/null"])
def test_an_output_that_names_no_file_takes_no_lock(tmp_path: Path, name: str) -> None:
    """check_output refuses these with its own message; the lock must not fail first."""
    (tmp_path / "dir").mkdir()
    output = Path(name) if name.startswith("/") else tmp_path / name
    with writing_alone(output):
        assert not lock_path(output).exists()  # /dev/null.lock too, outside tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]
