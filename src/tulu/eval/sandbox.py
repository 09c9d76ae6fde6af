"""Run model-written Python programs in a separate, restricted, throw-away process.

Codex-Eval (HumanEval) scores a completion by *running* it against unit tests, so untrusted,
model-written code executes on the evaluation machine. This module keeps the usual accidents
of such code (infinite loops, fork loops, giant allocations, `rm -rf`, stray network calls,
reading the user's files) from touching the host:

* a separate interpreter (`sys.executable -I`: no user site, no `PYTHON*` variables) with a
  minimal environment (HOME and TMPDIR point at the sandbox, proxies disabled);
* a fresh temporary working directory, deleted afterwards;
* its own session / process group, killed as a whole (SIGKILL) after a wall-clock timeout;
* kernel `resource` limits: address space, CPU seconds, file size, open files, processes,
  no core dumps;
* an in-process "guard" prelude that runs before the program and replaces process creation,
  networking, signalling, exit-with-success, resource changes and destructive filesystem calls
  outside the working directory with functions that raise, and denies reading the user's home
  (and a few system secrets).

This is defence in depth against *accidents* of model-written code, NOT a security boundary.
The guard is ordinary Python monkey-patching: a program that wants to escape can undo it (for
example through `importlib.reload` of built-in modules, closures of the wrappers, `io.FileIO`,
or file-descriptor tricks), races between a path check and its use are not prevented, and as
root the process-count limit is not enforced by the kernel. The real boundary for hostile code
is a container or VM with no network and no secrets mounted; run evaluations inside one.

Pass/fail is the exit status: 0 means the program ran to its end without an exception. A
program that calls `sys.exit(0)` / `os._exit(0)` before its end does not pass (otherwise a
completion could "pass" by exiting before the tests run).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

GiB = 1024**3
MiB = 1024**2

Status = Literal["passed", "failed", "timeout", "error"]

# Exit status the runner uses when the program does not compile (reported as "error").
_COMPILE_ERROR_EXIT = 97
# How much of stdout / stderr is kept in `detail`.
_MAX_OUTPUT_CHARS = 4000

# Files that are not the user's home but still must not be readable by the program.
_SYSTEM_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh", "/root")


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sandboxed run.

    `status` is "passed" (exit 0), "failed" (non-zero exit: an exception, an assertion, a
    resource error, an early exit), "timeout" (wall-clock or CPU limit hit; the whole process
    group was killed), or "error" (the program did not compile, or the sandbox itself could
    not run it). `detail` is a short, truncated excerpt of stderr/stdout saying why.
    `pid` is the child's pid, which is also its process-group id (for checks that nothing is
    left running).
    """

    passed: bool
    status: Status
    detail: str
    duration_s: float = 0.0
    pid: int | None = None


# The runner executes inside the child. It reads the program, compiles it, installs the guard,
# runs the program and exits with its status through the real os._exit (so atexit handlers and
# lingering threads cannot change the result). Kept as source text so the child needs nothing
# from this package (and so `tulu` need not be importable there).
_RUNNER_SOURCE = r"""
import builtins, io, json, os, sys, traceback

_COMPILE_ERROR_EXIT = @COMPILE_EXIT@


def _install_guard(workdir, deny_read, allow_read):
    import posix, resource, shutil, socket, subprocess, _posixsubprocess, _socket

    real_readlink = os.readlink
    realpath = os.path.realpath

    def _abs(path, dir_fd=None):
        if isinstance(path, int):
            return realpath(real_readlink("/proc/self/fd/%d" % path))
        p = os.fsdecode(os.fspath(path))
        if not os.path.isabs(p):
            if dir_fd is not None:
                base = real_readlink("/proc/self/fd/%d" % dir_fd)
            else:
                base = os.getcwd()
            p = os.path.join(base, p)
        return realpath(p)

    def _under(p, roots):
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    own_proc = "/proc/%d" % os.getpid()

    def check_write(path, dir_fd=None):
        p = _abs(path, dir_fd)
        if p == "/dev/null" or _under(p, [workdir]):
            return
        raise PermissionError("sandbox: writing or deleting outside the working directory "
                              "is not allowed: %r" % (p,))

    def check_read(path, dir_fd=None):
        if isinstance(path, int):
            return
        p = _abs(path, dir_fd)
        if _under(p, [workdir]) or _under(p, allow_read):
            return
        if _under(p, deny_read) or (_under(p, ["/proc"]) and not _under(p, [own_proc])
                                    and p != "/proc"):
            raise PermissionError("sandbox: reading %r is not allowed" % (p,))

    def deny(what):
        def blocked(*args, **kwargs):
            raise PermissionError("sandbox: %s is disabled" % what)
        blocked.__name__ = what
        return blocked

    # --- processes, signals, exits, limits -------------------------------------------------
    for name in ("fork", "forkpty", "vfork", "system", "popen", "execv", "execve", "execl",
                 "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "posix_spawn", "posix_spawnp", "kill", "killpg", "_exit", "abort",
                 "setsid", "setpgid", "setpgrp", "pidfd_open",
                 "chroot"):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, deny("os." + name))
    _posixsubprocess.fork_exec = deny("process creation")

    class _NoPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: subprocess is disabled")

    subprocess.Popen = _NoPopen
    for name in ("setrlimit", "prlimit"):
        if hasattr(resource, name):
            setattr(resource, name, deny("resource." + name))

    # --- network ---------------------------------------------------------------------------
    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network is disabled")

    socket.socket = _NoSocket
    _socket.socket = _NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd",
                 "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        for mod in (socket, _socket):
            if hasattr(mod, name):
                setattr(mod, name, deny("socket." + name))
    # Modules that would hand out raw system access if imported later.
    for name in ("ctypes", "_ctypes", "cffi", "_cffi_backend", "pty"):
        if name not in sys.modules:
            sys.modules[name] = None

    # --- filesystem ------------------------------------------------------------------------
    def one_path(name):
        orig = getattr(os, name)

        def wrapped(path, *args, dir_fd=None, **kwargs):
            check_write(path, dir_fd)
            if dir_fd is not None:
                kwargs["dir_fd"] = dir_fd
            return orig(path, *args, **kwargs)

        wrapped.__name__ = name
        return wrapped

    def two_paths(name):
        orig = getattr(os, name)

        def wrapped(src, dst, *args, src_dir_fd=None, dst_dir_fd=None, **kwargs):
            check_write(src, src_dir_fd)
            check_write(dst, dst_dir_fd)
            if src_dir_fd is not None:
                kwargs["src_dir_fd"] = src_dir_fd
            if dst_dir_fd is not None:
                kwargs["dst_dir_fd"] = dst_dir_fd
            return orig(src, dst, *args, **kwargs)

        wrapped.__name__ = name
        return wrapped

    patched = {}
    # fchmod / fchown change a file through a descriptor that may have been opened to read
    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "lchmod",
                 "fchmod", "fchown", "truncate", "utime", "mkfifo", "mknod", "chflags",
                 "lchflags", "setxattr", "removexattr"):
        if hasattr(os, name):
            patched[name] = one_path(name)
    for name in ("rename", "replace", "link"):
        patched[name] = two_paths(name)

    real_symlink = os.symlink

    def symlink(src, dst, target_is_directory=False, *, dir_fd=None):
        check_write(dst, dir_fd)
        return real_symlink(src, dst, target_is_directory, dir_fd=dir_fd)

    patched["symlink"] = symlink

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check_write(path, dir_fd)
        else:
            check_read(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    patched["open"] = os_open
    for name in ("listdir", "scandir"):
        orig_list = getattr(os, name)

        def lister(path=".", _orig=orig_list):
            check_read(path)
            return _orig(path)

        lister.__name__ = name
        patched[name] = lister
    for name, fn in patched.items():
        setattr(os, name, fn)
        if hasattr(posix, name):
            setattr(posix, name, fn)

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int):
            if any(c in mode for c in "wax+"):
                check_write(file)
            else:
                check_read(file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = guarded_open
    io.open = guarded_open

    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        check_write(path, kwargs.get("dir_fd"))
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree


def _main():
    cfg = json.loads(sys.argv[1])
    real_exit = os._exit
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    try:
        code = compile(source, "<program>", "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc(limit=0)
        sys.stderr.flush()
        real_exit(_COMPILE_ERROR_EXIT)
    _install_guard(cfg["workdir"], cfg["deny_read"], cfg["allow_read"])
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            print("sandbox: the program exited before its end", file=sys.stderr)
            status = 1
        elif isinstance(exc.code, int):
            status = exc.code
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException as exc:
        # Skip this runner's own frame: the traceback starts in the program.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            status = status or 1
    real_exit(status & 0xFF if status & 0xFF else (1 if status else 0))


_main()
""".replace("@COMPILE_EXIT@", str(_COMPILE_ERROR_EXIT))


def _clean_env(home: str) -> dict[str, str]:
    """The child's whole environment: nothing inherited (no tokens, no proxies, no paths)."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "NO_PROXY": "*",
        "no_proxy": "*",
    }


def _limits_setter(
    memory_bytes: int, cpu_seconds: int, file_bytes: int, max_procs: int, max_files: int
) -> Callable[[], None]:
    """Build the `preexec_fn` that applies kernel limits in the child before exec.

    Soft and hard limits are set equal so the program cannot raise them again (a non-root
    process cannot raise a hard limit; as root the guard also blocks `resource.setrlimit`).
    Values are clamped to the current hard limit, which an unprivileged parent cannot exceed.
    """
    wanted = [
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_NPROC, max_procs),
        (resource.RLIMIT_NOFILE, max_files),
        (resource.RLIMIT_CORE, 0),
    ]

    def apply() -> None:
        for which, value in wanted:
            _soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))

    return apply


def _default_deny_read() -> list[str]:
    """The user's real home plus a few system secrets, resolved (symlinks followed)."""
    paths = [str(Path.home()), *_SYSTEM_SECRETS]
    return sorted({os.path.realpath(p) for p in paths})


def _interpreter_dirs() -> list[str]:
    """Interpreter and stdlib directories the child may read even when they sit in a denied
    home (pyenv / uv Pythons live under ~): the stdlib is not a secret and some modules read
    their own data files with `open`."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return sorted(os.path.realpath(d) for d in dirs if d)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process in the group; a group that is already gone is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_head(path: Path, limit: int) -> str:
    """The first `limit` characters of a capture file (it can be up to RLIMIT_FSIZE long)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit * 4 + 4)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if len(text) > limit or path.stat().st_size > len(data):
        text = text[:limit] + f"\n... [truncated, {path.stat().st_size} bytes in all]"
    return text


def run_program(
    source: str,
    *,
    timeout: float = 3.0,
    memory_bytes: int = 1 * GiB,
    file_bytes: int = 10 * MiB,
    max_procs: int = 1,
    max_files: int = 64,
    deny_read: Sequence[str | os.PathLike[str]] | None = None,
    max_output_chars: int = _MAX_OUTPUT_CHARS,
) -> ExecutionResult:
    """Run Python `source` in a sandboxed child process and report how it ended.

    `timeout` is wall-clock seconds; the CPU limit is a little above it so a busy loop dies by
    either. `deny_read` replaces the default deny list (the real HOME, /root, /etc/shadow...).
    stdout/stderr go to capture files bounded by `file_bytes` (RLIMIT_FSIZE), so a program that
    prints forever cannot exhaust the host's memory; only `max_output_chars` are kept.
    """
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="tulu-sandbox-"))
    try:
        workdir = root / "work"
        control = root / "control"
        workdir.mkdir()
        control.mkdir()
        program = control / "program.py"
        runner = control / "runner.py"
        try:
            program.write_text(source, encoding="utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a server's JSON
            return ExecutionResult(False, "error", f"program is not valid Unicode text: {exc}", 0.0)
        runner.write_text(_RUNNER_SOURCE, encoding="utf-8")
        denied = _default_deny_read() if deny_read is None else [os.fspath(p) for p in deny_read]
        config = {
            "program": str(program),
            "workdir": os.path.realpath(workdir),
            "deny_read": [os.path.realpath(p) for p in denied],
            "allow_read": _interpreter_dirs(),
        }
        preexec = _limits_setter(
            memory_bytes=memory_bytes,
            cpu_seconds=max(1, math.ceil(timeout)) + 1,
            file_bytes=file_bytes,
            max_procs=max_procs,
            max_files=max_files,
        )
        with open(control / "stdout", "wb") as out, open(control / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", str(runner), json.dumps(config)],
                    cwd=workdir,
                    env=_clean_env(str(workdir)),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    preexec_fn=preexec,
                    close_fds=True,
                )
            except OSError as exc:
                return ExecutionResult(
                    False, "error", f"sandbox could not start: {exc}", time.monotonic() - started
                )
            timed_out = False
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                returncode = proc.wait()
            # Anything the program left behind in its group goes too.
            _kill_group(proc.pid)
        duration = time.monotonic() - started
        stderr = _read_head(control / "stderr", max_output_chars)
        stdout = _read_head(control / "stdout", max_output_chars)
        detail = _detail(stdout, stderr, max_output_chars)
        killed_by = -returncode if returncode < 0 else None
        if timed_out or killed_by == signal.SIGXCPU:
            why = f"timed out after {timeout:g} s" if timed_out else "CPU time limit exceeded"
            return ExecutionResult(False, "timeout", _join(why, detail), duration, proc.pid)
        if returncode == 0:
            return ExecutionResult(True, "passed", detail, duration, proc.pid)
        if returncode == _COMPILE_ERROR_EXIT:
            return ExecutionResult(
                False, "error", _join("program does not compile", detail), duration, proc.pid
            )
        if killed_by is not None:
            name = signal.Signals(killed_by).name if killed_by in signal.valid_signals() else ""
            why = f"killed by signal {killed_by} {name}".rstrip()
            return ExecutionResult(False, "failed", _join(why, detail), duration, proc.pid)
        return ExecutionResult(
            False, "failed", _join(f"exit status {returncode}", detail), duration, proc.pid
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _detail(stdout: str, stderr: str, limit: int) -> str:
    """stderr first (it holds the traceback), then stdout, within about `limit` characters."""
    parts = []
    if stderr.strip():
        parts.append(stderr.strip())
    if stdout.strip():
        parts.append("stdout:\n" + stdout.strip())
    text = "\n".join(parts)
    if len(text) > 2 * limit:
        text = text[: 2 * limit] + "\n... [truncated]"
    return text


def _join(reason: str, detail: str) -> str:
    return f"{reason}\n{detail}" if detail else reason


def run_many(
    programs: Sequence[str],
    *,
    workers: int | None = None,
    timeout: float = 3.0,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: object,
) -> list[ExecutionResult]:
    """Run many programs in parallel; results come back in the order of `programs`.

    Threads only launch and wait on child processes, so `workers` (default: the CPU count) is
    the number of programs running at once. `progress(done, total)` is called from the calling
    thread after each program finishes. Extra keyword arguments go to `run_program`.
    """
    total = len(programs)
    workers = max(1, workers or os.cpu_count() or 1)
    results: list[ExecutionResult | None] = [None] * total
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        futures = {
            pool.submit(run_program, src, timeout=timeout, **kwargs): i  # type: ignore[arg-type]
            for i, src in enumerate(programs)
        }
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(done, total)
        except BaseException:
            # Ctrl-C (or a failing callback): drop the programs not started yet; leaving the
            # pool would otherwise run every one of them (thousands for Codex) first.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [r for r in results if r is not None]
