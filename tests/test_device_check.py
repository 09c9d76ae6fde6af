"""benchmarks/device_check.py: the prepared GPU run, checked here at CPU sizes (`--smoke`), so
that a session's few minutes of device time are not lost to a broken script."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
needs_shared = pytest.mark.skipif(
    not (SHARED / "data" / "eval").is_dir(), reason="../shared/data/eval is absent"
)


def _load():
    spec = importlib.util.spec_from_file_location(
        "device_check", REPO / "benchmarks" / "device_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


device_check = _load()


@pytest.fixture(scope="module")
def carry(tmp_path_factory) -> Path:
    if not (SHARED / "data" / "eval").is_dir():
        pytest.skip("../shared/data/eval is absent")
    return device_check.prepare(SHARED, tmp_path_factory.mktemp("dc") / "carry", wheels=False)


@needs_shared
def test_prepare_copies_what_the_gpu_machine_lacks(carry) -> None:
    data = carry / "data"
    for name in device_check.EVAL_DIRS:
        assert any((data / "eval" / name).iterdir()), name
    assert not (data / "eval" / "tydiqa").exists()  # 3 of 9 languages: it cannot run
    assert (data / "tokenizer.json").is_file() and (data / "gsm_8shot_exemplars.json").is_file()
    assert (carry / "wheels").is_dir()
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    assert size < 32 * 2**20  # the device tool carries 64 MiB at most, wheels included


def test_the_carry_folder_is_excluded_from_git_once(tmp_path, monkeypatch) -> None:
    (tmp_path / ".git" / "info").mkdir(parents=True)
    (tmp_path / ".git" / "info" / "exclude").write_text("# git's own comment\n")
    monkeypatch.setattr(device_check, "REPO", tmp_path)
    device_check._exclude_from_git(tmp_path / ".device-carry")
    device_check._exclude_from_git(tmp_path / ".device-carry")
    device_check._exclude_from_git(tmp_path.parent / "elsewhere")  # outside: not listed
    lines = (tmp_path / ".git" / "info" / "exclude").read_text().splitlines()
    assert lines == ["# git's own comment", "/.device-carry/"]


@needs_shared
def test_smoke_run_has_every_part_and_figure(carry, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytest-gpu.xml").write_text("stale")  # an earlier run's file is not reused
    rc = device_check.main(["run", "--smoke", "--carry", str(carry), "--out", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads((out / "device-check.json").read_text())
    statuses = {name: part["status"] for name, part in summary["parts"].items()}
    assert statuses == dict.fromkeys(device_check.PARTS, "ok"), (
        out / "device-check.log"
    ).read_text()[-3000:]
    assert rc == 0
    assert summary["machine"]["torch"] and summary["machine"]["matmul_tflops"] > 0
    figures = {(row["issue"], row["figure"]) for row in summary["figures"]}
    for issue, start in [
        (4, "pytest -m gpu"),
        (4, "single-stream decode tokens/s"),
        (4, "4 x (128/256) output tokens/s"),
        (4, "prefill tokens/s"),
        (7, "train MFU, adamw"),
        (7, "train peak GiB, adamw"),
        (8, "paper suite s"),
    ]:
        assert any(i == issue and f.startswith(start) for i, f in figures), start
    tests = next(r for r in summary["figures"] if r["figure"].startswith("pytest"))
    assert tests["measured"].startswith("0 / 0 / ")  # on a CPU every GPU test skips
    log = (out / "device-check.log").read_text()
    for part in device_check.PARTS:
        assert f"===== {part}: " in log
    assert "eval_suite.py" in log and "--time-budget" in log
    eval_result = json.loads((out / "eval.json").read_text())
    assert eval_result["device"]  # platform.processor() is "" on many Linux machines
    assert set(eval_result["seconds"]) == {"mmlu_0shot", "gsm_direct"}
    assert eval_result["gsm_cot"]["prompts"] == 1
    written = sorted(p.name for p in out.iterdir())
    assert set(written) <= set(device_check.OUTPUT_FILES) and len(written) <= 8
    assert "issue figure" in printed


class _Parsed(Exception):
    """Raised where a benchmark, its arguments accepted, would start the real work."""


def _entry(path: str) -> tuple[object, str]:
    """("pkg.module.attr" or "pkg.module.Class.attr") -> (owner, attribute name)."""
    owner_path, _, name = path.rpartition(".")
    try:
        return importlib.import_module(owner_path), name
    except ModuleNotFoundError:
        module, _, cls = owner_path.rpartition(".")
        return getattr(importlib.import_module(module), cls), name


@pytest.mark.parametrize(
    ("part", "entry"),
    [
        ("engine", "tulu.bench.workloads.random_model"),
        ("train", "tulu.train.distributed.init_distributed"),
        ("eval", "tulu.eval.gsm.load_gsm"),  # the peer's prompts, built before the suite
    ],
)
def test_the_gpu_commands_parse(part, entry, tmp_path, monkeypatch) -> None:
    """The GPU-size command lines (not run by --smoke) are accepted by their scripts up to
    the point where the work starts: a typo there would only show on the GPU machine, after
    its start-up minutes."""
    import argparse
    import runpy

    def reached(*_args, **_kwargs):
        raise _Parsed

    args = argparse.Namespace(parts=(part,), smoke=False, decode_attention=None, eval_tasks=None)
    data = device_check.DataPaths(tmp_path, tmp_path / "tokenizer.json", tmp_path / "ex.json")
    (step,) = device_check.plan(args, tmp_path, data)
    # The script's imports first: a module first imported while `entry` is replaced would keep
    # the replacement (a from-import binds it) for every later test (tulu.train.trainer's
    # init_distributed, say, which test_demo's training then calls).
    monkeypatch.setattr(sys, "argv", [step.argv[1], "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(step.argv[1], run_name="__main__")
    owner, name = _entry(entry)
    monkeypatch.setattr(owner, name, reached)
    for argv in [step.argv] + ([step.fallback.argv] if step.fallback else []):
        monkeypatch.setattr(sys, "argv", argv[1:])
        with pytest.raises(_Parsed):
            runpy.run_path(argv[1], run_name="__main__")


def test_a_failing_fast_path_falls_back_to_the_loop(tmp_path) -> None:
    """The engine part's fast path fails (here: an option generation.py refuses at once):
    the part still measures the engine, on the eager per-sequence path, and says so."""
    out = tmp_path / "out"
    argv = ["run", "--smoke", "--parts", "engine", "--decode-attention", "bogus"]
    rc = device_check.main([*argv, "--out", str(out)])
    summary = json.loads((out / "device-check.json").read_text())
    engine = summary["parts"]["engine"]
    assert rc == 0 and engine["status"] == "ok"
    assert engine["note"].startswith("fallback (loop, eager) after the fast path failed")
    assert "--decode-attention loop --enforce-eager" in engine["command"]
    assert (out / "engine-loop.json").is_file() and not (out / "engine.json").exists()
    rows = {row["figure"]: row for row in summary["figures"]}
    assert rows["decode path"]["measured"] == engine["note"]
    assert rows["single-stream decode tokens/s"]["measured"] > 0


def test_figures_written_before_the_limit_are_kept_without_the_fallback(
    tmp_path, monkeypatch
) -> None:
    """generation.py writes each workload's figures as it goes: when the fast path is stopped
    at its limit after some, those are reported and the slower fallback is not run."""
    out = tmp_path / "out"
    partial = {"partial": True, "workloads": {"single_stream": {"tulu": {"tokens_per_s": 5.0}}}}
    script = (
        "import json, sys, time\n"
        f"open(sys.argv[1], 'w').write({json.dumps(json.dumps(partial))})\n"
        "time.sleep(120)\n"
    )
    marker = tmp_path / "fallback-ran"
    fallback = device_check.Step(
        "engine", [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], 30, min_s=0
    )
    engine = out / "engine.json"
    step = device_check.Step(
        "engine", [sys.executable, "-c", script, str(engine)], 3, engine, fallback=fallback
    )
    monkeypatch.setattr(device_check, "plan", lambda *_args: [step])
    rc = device_check.main(["run", "--smoke", "--parts", "engine", "--out", str(out)])
    summary = json.loads((out / "device-check.json").read_text())
    assert rc == 1 and summary["parts"]["engine"]["status"] == "timeout"
    assert summary["parts"]["engine"]["note"] == "timeout after measuring single_stream"
    rows = {row["figure"]: row for row in summary["figures"]}
    assert rows["single-stream decode tokens/s"]["measured"] == 5.0
    assert not marker.exists()


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path) -> None:
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    step = device_check.Step("slow", [sys.executable, "-c", script], 3)
    started = time.perf_counter()
    outcome = device_check.execute(step, 3, dict(os.environ), tmp_path / "log")
    # 30 s only tells the 3 s limit from the script's natural end at 120 s (not a speed check).
    assert outcome.status == "timeout" and time.perf_counter() - started < 30
    child = int(pid_file.read_text())
    for _ in range(100):  # the group was killed; the child is gone once reaped by init
        if not Path(f"/proc/{child}").exists() or "Z" in _state(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} of the killed part is still running")
    assert "===== slow: timeout" in (tmp_path / "log").read_text()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_parts_that_do_not_fit_the_budget_are_skipped(tmp_path) -> None:
    out = tmp_path / "out"
    argv = ["run", "--smoke", "--parts", "env,eval", "--budget-s", "5", "--out", str(out)]
    assert device_check.main(argv) == 1
    summary = json.loads((out / "device-check.json").read_text())
    assert {n: p["status"] for n, p in summary["parts"].items()} == {
        "env": "skipped",
        "eval": "skipped",
    }
    assert summary["figures"] == []


def test_unknown_parts_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        device_check.main(["run", "--out", "x", "--parts", "env,gpu"])
    assert info.value.code == 2
    assert "expected some of env, tests, engine, train, eval" in capsys.readouterr().err


def test_a_truncated_junit_file_gives_no_counts(tmp_path) -> None:
    """pytest killed at its limit while writing its XML: the summary is still written."""
    xml = tmp_path / "pytest-gpu.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3"')
    assert device_check.junit_counts(xml) == {}
    assert device_check.figures({}, tmp_path) == []


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        device_check.main(["--help"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "SUPPRESS" not in printed
    assert "probe" in printed


@pytest.mark.parametrize("budget", ["nan", "0", "-5", "soon"])
def test_a_budget_that_bounds_nothing_is_refused(budget, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        argv = ["run", "--smoke", "--parts", "env", "--out", str(tmp_path / "out")]
        device_check.main([*argv, "--budget-s", budget])
    assert info.value.code == 2
    assert "--budget-s: expected a positive number of seconds" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_carry_folder_without_data_is_refused_before_any_part(tmp_path) -> None:
    """The device tool drops a carry path the checkout lacks: the run stops at once rather
    than spend the device time on parts that cannot find their data or wheels."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        argv = ["run", "--smoke", "--parts", "env", "--out", str(out)]
        device_check.main([*argv, "--carry", str(tmp_path / "absent")])
    assert "holds no data/" in str(info.value.code) and "prepare" in str(info.value.code)
    assert not out.exists()
