"""The code-execution sandbox: normal programs, and hostile ones that must leave the host alone.

Every hostile program runs in its own test and must come back failed/timeout quickly, with the
host (files, processes, sockets, secrets) untouched.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tulu.eval.sandbox import ExecutionResult, run_many, run_program


def _group_gone(pgid: int) -> bool:
    """True when no process is left in the process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_not_passed(result: ExecutionResult) -> None:
    """Stopped by a guard, not by the wall clock: "failed" is a program that ended on its own
    (a refused call raised), where a hang would have been "timeout" after run_program's 3 s.
    (Checked by status, not by timing the run, which a loaded machine makes flaky.)"""
    assert not result.passed
    assert result.status == "failed", result
    assert result.pid is not None and _group_gone(result.pid)


# --- ordinary programs ----------------------------------------------------------------------


def test_passing_program() -> None:
    result = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n")
    assert result.passed and result.status == "passed"
    assert result.detail == ""


def test_failing_program_reports_the_assertion() -> None:
    result = run_program("assert False, 'nope'\n")
    assert not result.passed and result.status == "failed"
    assert "AssertionError: nope" in result.detail


def test_syntax_error_is_an_error() -> None:
    result = run_program("def f(:\n    pass\n")
    assert not result.passed and result.status == "error"
    assert "SyntaxError" in result.detail


def test_program_with_a_lone_surrogate_is_an_error_not_a_crash() -> None:
    """A completion from a server's JSON can hold "\\ud800", which UTF-8 cannot encode."""
    results = run_many(["assert True\n", "x = '\ud800'\n"])
    assert results[0].passed
    assert not results[1].passed and results[1].status == "error"
    assert "not valid Unicode" in results[1].detail


def test_stdout_is_truncated() -> None:
    result = run_program("print('x' * 1_000_000)\n", max_output_chars=500)
    assert result.passed
    assert len(result.detail) < 1000
    assert "truncated" in result.detail


def test_exit_zero_before_the_end_does_not_pass() -> None:
    """A completion must not 'pass' by exiting before the tests run."""
    for source in ("import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\n"):
        result = run_program(source)
        assert not result.passed and result.status == "failed", source


def test_writing_in_its_own_directory_is_allowed() -> None:
    source = (
        "import os, pathlib, tempfile\n"
        "pathlib.Path('out.txt').write_text('hello')\n"
        "assert open('out.txt').read() == 'hello'\n"
        "os.mkdir('d'); os.rename('out.txt', 'd/moved.txt'); os.remove('d/moved.txt')\n"
        "os.rmdir('d')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('x')\n"
        "assert os.listdir('.') == []\n"
    )
    result = run_program(source)
    assert result.passed, result.detail


def test_working_directory_is_deleted_afterwards() -> None:
    result = run_program("import os\nprint(os.getcwd())\n")
    assert result.passed
    workdir = Path(result.detail.split("stdout:\n", 1)[1].strip())
    assert workdir.name == "work"
    assert not workdir.exists() and not workdir.parent.exists()


def test_environment_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TULU_SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    source = (
        "import os\n"
        "assert 'TULU_SECRET_TOKEN' not in os.environ\n"
        "assert 'HTTPS_PROXY' not in os.environ\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
    )
    result = run_program(source)
    assert result.passed, result.detail


def test_run_many_keeps_order_and_reports_progress() -> None:
    programs = [f"assert {i} % 2 == 0\n" for i in range(6)]
    seen: list[tuple[int, int]] = []
    results = run_many(programs, workers=2, progress=lambda done, total: seen.append((done, total)))
    assert [r.passed for r in results] == [i % 2 == 0 for i in range(6)]
    assert seen == [(i, 6) for i in range(1, 7)]


def test_run_many_stops_starting_programs_when_interrupted(monkeypatch) -> None:
    """Ctrl-C during the Codex programs (here: the progress callback raising) must not wait
    for all the remaining programs to run before the interrupt gets through."""
    from tulu.eval import sandbox

    started: list[str] = []

    def run_program(source, **kwargs):
        started.append(source)
        time.sleep(0.05)
        return ExecutionResult(True, "passed", "")

    def interrupt(done, total):
        raise KeyboardInterrupt

    monkeypatch.setattr(sandbox, "run_program", run_program)
    with pytest.raises(KeyboardInterrupt):
        run_many([f"# {i}\n" for i in range(20)], workers=1, progress=interrupt)
    assert len(started) <= 2  # the one that finished, perhaps the next one already running


# --- hostile programs -----------------------------------------------------------------------


def test_fork_bomb_with_os_fork() -> None:
    result = run_program("import os\nwhile True:\n    os.fork()\n")
    _assert_not_passed(result)
    assert "os.fork is disabled" in result.detail


def test_fork_bomb_with_posix_fork() -> None:
    result = run_program("import posix\nwhile True:\n    posix.fork()\n")
    _assert_not_passed(result)


def test_fork_bomb_with_subprocess() -> None:
    source = (
        "import subprocess, sys\n"
        "while True:\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    )
    result = run_program(source)
    _assert_not_passed(result)
    assert "subprocess is disabled" in result.detail


def test_fork_bomb_with_multiprocessing() -> None:
    source = (
        "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()\n"
    )
    _assert_not_passed(run_program(source))


def test_os_system_and_ctypes_are_blocked() -> None:
    _assert_not_passed(run_program("import os\nos.system('true')\n"))
    _assert_not_passed(run_program("import ctypes\n"))


def test_deleting_a_file_outside_the_sandbox(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    for call in ("os.remove", "os.unlink"):
        result = run_program(f"import os\n{call}({str(sentinel)!r})\n")
        _assert_not_passed(result)
    result = run_program(f"import os\nos.rename({str(sentinel)!r}, 'stolen.txt')\n")
    _assert_not_passed(result)
    result = run_program(f"open({str(sentinel)!r}, 'w').write('overwritten')\n")
    _assert_not_passed(result)
    assert sentinel.read_text() == "keep me"


def test_changing_mode_or_owner_through_a_read_descriptor(tmp_path: Path) -> None:
    """Opening to read is allowed outside the working directory; fchmod / fchown on that
    descriptor must be refused like chmod / chown on the path."""
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    sentinel.chmod(0o644)
    opened = f"import os\nfd = os.open({str(sentinel)!r}, os.O_RDONLY)\n"
    for call in ("os.fchmod(fd, 0o600)", f"os.fchown(fd, {os.getuid()}, {os.getgid()})"):
        result = run_program(opened + call + "\n")
        _assert_not_passed(result)
        assert "not allowed" in result.detail, call
    assert sentinel.stat().st_mode & 0o777 == 0o644
    # on its own files it still works
    own = "open('mine', 'w').close()\nfd = os.open('mine', os.O_RDONLY)\nos.fchmod(fd, 0o600)\n"
    assert run_program("import os\n" + own).passed


def test_rmtree_outside_the_sandbox(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "file.txt").write_text("keep me")
    result = run_program(f"import shutil\nshutil.rmtree({str(victim)!r})\n")
    _assert_not_passed(result)
    # The fd-relative unlink that shutil.rmtree uses internally is checked too.
    source = f"import os\nfd = os.open({str(victim / 'sub')!r}, os.O_RDONLY)\n"
    source += "os.unlink('file.txt', dir_fd=fd)\n"
    _assert_not_passed(run_program(source))
    assert (victim / "sub" / "file.txt").read_text() == "keep me"


def test_infinite_loop_is_killed_with_its_process_group() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and not result.passed
    # Killed by the 1 s it was given (wall clock, or the CPU limit just above it); the bound on
    # the elapsed time only detects a kill that came far too late, not the sandbox's speed.
    assert result.detail.startswith(("timed out after 1 s", "CPU time limit exceeded"))
    assert elapsed < 30
    assert result.pid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(result.pid, 0)


def test_sleeping_program_times_out() -> None:
    result = run_program("import time\ntime.sleep(30)\n", timeout=1.0)
    assert result.status == "timeout"
    assert result.detail.startswith("timed out after 1 s"), result  # the 1 s it was given
    assert _group_gone(result.pid or 0)


def test_huge_allocation_fails_with_memory_error() -> None:
    result = run_program("x = bytearray(10**11)\n")
    _assert_not_passed(result)
    assert "MemoryError" in result.detail


def test_allocation_above_the_memory_limit_but_within_host_ram_fails() -> None:
    """1.5 GiB is more than the default 1 GiB address-space limit but far less than a host's
    RAM: only the sandbox's limit makes it fail (the 10**11 bytes above fail on any host)."""
    result = run_program("x = bytearray(3 * 1024**3 // 2)\nx[-1] = 1\n")
    _assert_not_passed(result)
    assert "MemoryError" in result.detail


def test_the_child_runs_under_the_configured_limits() -> None:
    """The child sees its CPU-seconds limit (a little above the wall-clock timeout) and its
    address-space limit, soft and hard alike so it cannot raise them."""
    program = (
        "import resource\n"
        "print('cpu', resource.getrlimit(resource.RLIMIT_CPU))\n"
        "print('as', resource.getrlimit(resource.RLIMIT_AS))\n"
    )
    result = run_program(program, timeout=5.5, memory_bytes=768 * 1024**2)
    assert result.passed, result
    assert "cpu (7, 7)" in result.detail  # ceil(5.5) + 1 CPU seconds
    assert f"as ({768 * 1024**2}, {768 * 1024**2})" in result.detail
    default = run_program(program)  # timeout 3 s, 1 GiB
    assert "cpu (4, 4)" in default.detail and f"as ({1024**3}, {1024**3})" in default.detail


def test_opening_a_socket_reaches_no_one() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        for source in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n",
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/')\n",
        ):
            _assert_not_passed(run_program(source))
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_reading_the_users_home_is_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    secret = home / ".netrc"
    secret.write_text("password s3cr3t-value\n")
    monkeypatch.setenv("HOME", str(home))
    for source in (
        f"print(open({str(secret)!r}).read())\n",
        f"import pathlib\nprint(pathlib.Path({str(secret)!r}).read_text())\n",
        f"import os\nfd = os.open({str(secret)!r}, os.O_RDONLY)\nprint(os.read(fd, 100))\n",
        f"import os\nprint(os.listdir({str(home)!r}))\n",
    ):
        result = run_program(source)
        _assert_not_passed(result)
        assert "s3cr3t-value" not in result.detail
        assert "not allowed" in result.detail


def test_reading_the_real_home_is_denied() -> None:
    target = Path.home() / ".bashrc"
    result = run_program(f"print(open({str(target)!r}).read())\n")
    _assert_not_passed(result)
    assert "not allowed" in result.detail


def test_writing_a_huge_file_is_stopped() -> None:
    source = "with open('big.bin', 'wb') as f:\n    f.write(b'0' * (50 * 2**20))\n"
    result = run_program(source)
    _assert_not_passed(result)
    assert "File too large" in result.detail


def test_killing_host_processes_is_blocked() -> None:
    result = run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n")
    _assert_not_passed(result)
    assert signal.getsignal(signal.SIGTERM) is not None  # we are still here


def test_raising_resource_limits_is_blocked() -> None:
    source = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n"
    _assert_not_passed(run_program(source))
