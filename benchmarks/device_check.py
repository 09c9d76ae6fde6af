"""Every GPU check and figure the open issues ask for, as one prepared run for a device session.

A session lent a GPU machine gets about 15 minutes of device time in all (the machine's start
included) and at most 10 minutes per command, and nothing on that machine can be fetched. So
the run is prepared here, tested here on the CPU (`--smoke`, in CI), and spent there in one
command. Two steps:

    # here: copy what the GPU machine lacks into a git-ignored folder that `run` carries
    python benchmarks/device_check.py prepare --shared ../shared --carry .device-carry

    # there (the device tool's run, carry [".device-carry"], timeout_s 600):
    python3 benchmarks/device_check.py run --carry .device-carry --out $OUT

`prepare` copies the evaluation data, the GPT-NeoX tokenizer and the GSM exemplars from
`--shared` (about 11 MB; TyDi QA is left out: its train files cover 3 of the 9 languages, so
it cannot run) and downloads the wheels the machine lacks (torchao, for the ``adamw_bf16`` and
``adamw_8bit`` optimizers, and xgrammar with its dependencies, for structured output's CUDA
mask; the machine has torch 2.11 and Python 3.12). The carry folder is
listed in ``.git/info/exclude``: it travels with the working tree but is never committed.

`run` installs those wheels into a scratch directory, then runs the parts in order, each in
its own process group with its own time limit, so a hang or a crash costs only that part:

| part | what | issue |
|---|---|---|
| env | torch, CUDA, GPU, copy bandwidth, bf16 matmul TFLOP/s, optional packages | - |
| tests | ``pytest -m gpu tests/engine tests/model tests/train``: Triton kernel and CUDA-graph parity, structured output's CUDA masks, Pythia-6.9B bf16 against transformers, bf16 training with each optimizer, offload and LoRA, FSDP over NCCL, resume on CUDA | 4, 7 |
| engine | ``generation.py``: Pythia-6.9B bf16, Triton decode attention + CUDA graphs, 1,000 x (128 in / 256 out), mixed lengths, prefill, roofline, vs transformers (on a sample of the requests); with ``loop`` decoding if the fast path fails | 4 |
| train | ``train.py``: Pythia-6.9B, 4 x 2,048 tokens, activation checkpointing, the whole optimizer step with ``adamw_bf16`` then ``adamw_8bit``: tokens/s, MFU, peak memory beside the dry-run estimate, vs transformers | 7 |
| eval | ``eval_suite.py``: the paper suite on Pythia-6.9B random weights, cheapest task first, until the time left runs out; the tasks not reached are listed (time them in a later session with ``--parts eval --eval-tasks ...``) | 8 |

`--budget-s` (default 540) bounds the whole run; a part starts only with enough time left.
Everything lands in `--out`: ``device-check.json`` (each part's status, seconds and command,
and every figure against its issue's target), ``device-check.log`` (all output), and each
part's own JSON. The machine's figures are only comparable among themselves: the peer runs
in the same process as tulu, on the same weights.

    python benchmarks/device_check.py run --smoke --out /tmp/dc   # the same run, CPU-sized
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
PARTS = ("env", "tests", "engine", "train", "eval")
#: Every file a run writes into --out (at most 8 files come back from the GPU machine).
OUTPUT_FILES = (
    "device-check.json",
    "device-check.log",
    "env.json",
    "pytest-gpu.xml",
    "engine.json",
    "engine-loop.json",
    "train.json",
    "eval.json",
)

#: What the GPU machine lacks, as wheels for its Python 3.12 / torch 2.11 (torchao 0.17 is
#: built against torch 2.11; its optimizers are Python, compiled by torch.compile).
WHEELS = (
    "torchao==0.17.0",
    # Structured output's GPU test (xgrammar's CUDA mask kernel): xgrammar and what it needs
    # beyond torch, transformers and triton, at the versions tested here.
    "xgrammar==0.2.9",
    "apache-tvm-ffi==0.1.15.post2",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
)
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
#: Evaluation data the suite reads (open-instruct's layout), under shared/data/eval.
EVAL_DIRS = ("mmlu", "gsm", "bbh", "codex_humaneval", "alpaca_farm")
TOKENIZER = Path("data/tokenizer/gpt-neox-20b/tokenizer.json")
GSM_EXEMPLARS = Path("recipes/gsm_8shot_exemplars.json")

#: The issues' GPU targets (Pythia-6.9B, bfloat16, one H100).
TARGETS = {
    "single_stream_tokens_per_s": 180.0,
    "engine_startup_seconds": 60.0,
    "fixed_output_tokens_per_s": 8000.0,
    "fixed_ratio_vs_transformers": 4.0,
    "prefill_tokens_per_s": 45000.0,
    "train_mfu": 0.50,
    "train_peak_gib": 80.0,
    "eval_suite_seconds": 1800.0,
}


# ------------------------------------------------------------------------------ prepare
def prepare(shared: Path, carry: Path, *, wheels: bool = True) -> Path:
    """Fill `carry` with what `run` needs on a machine that cannot fetch anything."""
    sources = [shared / "data" / "eval" / d for d in EVAL_DIRS]
    sources += [shared / TOKENIZER, shared / GSM_EXEMPLARS]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise SystemExit(f"device_check.py prepare: missing under --shared: {', '.join(missing)}")
    if carry.exists():
        shutil.rmtree(carry)
    data = carry / "data"
    for name in EVAL_DIRS:
        shutil.copytree(shared / "data" / "eval" / name, data / "eval" / name)
    shutil.copy(shared / TOKENIZER, data / "tokenizer.json")
    shutil.copy(shared / GSM_EXEMPLARS, data / "gsm_8shot_exemplars.json")
    (carry / "wheels").mkdir()
    if wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", "3.12", "--implementation", "cp"]
        for tag in WHEEL_PLATFORMS:
            command += ["--platform", tag]
        subprocess.run([*command, "-d", str(carry / "wheels"), *WHEELS], check=True)
    _exclude_from_git(carry)
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    print(f"prepared {carry} ({size / 2**20:.1f} MiB)")
    return carry


def _exclude_from_git(carry: Path) -> None:
    """List `carry` in .git/info/exclude when it lies inside this repository."""
    try:
        relative = carry.resolve().relative_to(REPO)
    except ValueError:
        return
    exclude = REPO / ".git" / "info" / "exclude"
    if not exclude.parent.is_dir():
        return
    line = f"/{relative.as_posix()}/"
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    if line not in lines:
        exclude.write_text("\n".join([*lines, line]) + "\n")


# ------------------------------------------------------------------------------ run: plan
@dataclass
class Step:
    """One command of a part, with the most seconds it may take."""

    part: str
    argv: list[str]
    limit_s: float
    output: Path | None = None  # the JSON it writes
    fallback: Step | None = None  # run instead when this one fails and time is left
    min_s: float = 30.0  # not started with less time left


@dataclass
class Outcome:
    part: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    returncode: int | None = None
    command: str = ""
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataPaths:
    """Where the evaluation inputs are: the carry folder's layout, or ../shared's."""

    eval_dir: Path
    tokenizer: Path
    exemplars: Path

    @classmethod
    def of(cls, carry: Path | None, shared: Path) -> DataPaths:
        if carry is not None:
            data = carry / "data"
            return cls(data / "eval", data / "tokenizer.json", data / "gsm_8shot_exemplars.json")
        return cls(shared / "data" / "eval", shared / TOKENIZER, shared / GSM_EXEMPLARS)


def plan(args: argparse.Namespace, out: Path, data: DataPaths) -> list[Step]:
    """The steps of `args.parts`, at the GPU sizes or, with --smoke, at CPU sizes."""
    py = sys.executable
    smoke = args.smoke
    steps: list[Step] = []
    for part in args.parts:
        if part == "env":
            argv = [py, __file__, "probe", str(out / "env.json")]
            steps.append(Step(part, argv, 45, out / "env.json", min_s=10))
        elif part == "tests":
            argv = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
            argv += ["tests/engine", "tests/model", "tests/train"]
            argv += [f"--junitxml={out / 'pytest-gpu.xml'}"]
            steps.append(Step(part, argv, 180))
        elif part == "engine":
            size = (
                ["--preset", "pythia-14m", "--layers", "1", "--device", "cpu"]
                + ["--num-requests", "4"]
                + ["--mixed-requests", "4", "--hf-num-requests", "2", "--repeats", "1"]
                + ["--single-new-tokens", "8"]
                if smoke
                else ["--preset", "pythia-6.9b", "--num-requests", "1000"]
                + ["--mixed-requests", "256", "--hf-num-requests", "128", "--repeats", "3"]
            )
            base = [py, str(BENCHMARKS / "generation.py"), *size]
            fast = args.decode_attention or ("sdpa" if smoke else "triton")
            fallback = Step(
                part,
                [*base, "--decode-attention", "loop", "--enforce-eager", "--skip", "mixed"]
                + ["--output", str(out / "engine-loop.json")],
                120,
                out / "engine-loop.json",
                min_s=60,
            )
            argv = [*base, "--decode-attention", fast, "--output", str(out / "engine.json")]
            steps.append(Step(part, argv, 200, out / "engine.json", fallback=fallback))
        elif part == "train":
            size = (
                ["--preset", "tiny", "--seq-len", "64", "--optimizer", "adamw"]
                if smoke
                else ["--preset", "pythia-6.9b", "--optimizer", "adamw_bf16,adamw_8bit"]
            )
            argv = [py, str(BENCHMARKS / "train.py"), *size, "--steps", "1" if smoke else "5"]
            argv += ["--warmup", "1" if smoke else "2", "--out", str(out / "train.json")]
            # train.py writes its JSON after each measurement: a limit keeps what is done.
            steps.append(Step(part, argv, 180, out / "train.json"))
        elif part == "eval":
            argv = [py, str(BENCHMARKS / "eval_suite.py"), "--data-dir", str(data.eval_dir)]
            argv += ["--tokenizer", str(data.tokenizer), "--exemplars", str(data.exemplars)]
            if smoke:
                argv += ["--preset", "tiny", "--max-examples", "1", "--codex-samples", "1"]
                argv += ["--peer-examples", "1"]
                if not args.eval_tasks:  # scoring and generation, the cheapest of each
                    argv += ["--tasks", "mmlu_0shot,gsm_direct"]
            else:
                argv += ["--preset", "pythia-6.9b", "--peer-examples", "16"]
            if args.eval_tasks:
                argv += ["--tasks", args.eval_tasks]
            argv += ["--output", str(out / "eval.json")]
            # The limit is whatever is left (`run` adds the suite's --time-budget).
            steps.append(Step(part, argv, float("inf"), out / "eval.json", min_s=60))
    return steps


# ------------------------------------------------------------------------------ run: execute
def child_env(site: Path | None) -> dict[str, str]:
    """The environment of every part: this checkout's `src` (nothing is installed on the GPU
    machine) and the carried wheels first on the path, unbuffered output."""
    paths = [str(site)] if site else []
    paths.append(str(REPO / "src"))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def install_wheels(carry: Path, site: Path, log: Callable[[str], None]) -> Path | None:
    wheels = sorted((carry / "wheels").glob("*.whl")) if carry else []
    if not wheels:
        return None
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    command += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)]
    done = subprocess.run([*command, *map(str, wheels)], capture_output=True, text=True)
    if done.returncode != 0:
        log(f"installing {', '.join(w.name for w in wheels)} failed: {done.stderr.strip()}")
        return None
    log(f"installed {', '.join(w.name for w in wheels)} into {site}")
    return site


def execute(step: Step, limit_s: float, env: dict[str, str], logfile: Path) -> Outcome:
    """Run `step` in its own process group, output appended to `logfile`; kill the whole
    group at `limit_s`."""
    with logfile.open("a") as log:
        log.write(f"\n===== {step.part}: {' '.join(step.argv)} (limit {limit_s:.0f} s)\n")
        log.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(
            step.argv,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=limit_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
            status = "timeout"
        seconds = time.perf_counter() - started
        log.write(f"===== {step.part}: {status} (rc {returncode}) in {seconds:.1f} s\n")
    outcome = Outcome(step.part, status, seconds, returncode, " ".join(step.argv))
    if step.output is not None and step.output.is_file():
        try:
            outcome.result = json.loads(step.output.read_text())
        except ValueError:  # killed while writing it
            outcome.note = f"{step.output.name} is not valid JSON"
    return outcome


def log_tail(logfile: Path, lines: int = 8) -> str:
    text = logfile.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# ------------------------------------------------------------------------------ run: report
def junit_counts(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:  # pytest killed at its limit while writing it: no counts
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _get(data: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def figures(outcomes: dict[str, Outcome], out: Path) -> list[dict[str, Any]]:
    """Each measured figure beside its issue's target (`met` None when not measured)."""
    rows: list[dict[str, Any]] = []

    def add(issue: int, what: str, value: Any, target: float, at_least: bool = True) -> None:
        met = None
        if isinstance(value, int | float):
            met = value >= target if at_least else value <= target
        rows.append(
            {
                "issue": issue,
                "figure": what,
                "measured": value,
                "target": f"{'>=' if at_least else '<='} {target:g}",
                "met": met,
            }
        )

    tests = junit_counts(out / "pytest-gpu.xml")
    if tests:
        rows.append(
            {
                "issue": 4,
                "figure": "pytest -m gpu (passed / failed+errors / skipped)",
                "measured": f"{tests['passed']} / {tests['failures'] + tests['errors']} / "
                f"{tests['skipped']}",
                "target": "no failures",
                "met": tests["failures"] + tests["errors"] == 0 and tests["passed"] > 0,
            }
        )
    engine = outcomes.get("engine")
    e = engine.result if engine else {}
    if e:
        w = e.get("workloads", {})
        fixed = next((v for k, v in w.items() if k.startswith("fixed_")), {})
        prefill = next((v for k, v in w.items() if k.startswith("prefill_")), {})
        add(
            4,
            "single-stream decode tokens/s",
            _get(w, "single_stream", "tulu", "tokens_per_s"),
            TARGETS["single_stream_tokens_per_s"],
        )
        add(
            4,
            "engine start-up s (CUDA-graph capture)",
            e.get("engine_startup_seconds"),
            TARGETS["engine_startup_seconds"],
            at_least=False,
        )
        add(
            4,
            f"{fixed.get('requests', '?')} x (128/256) output tokens/s",
            _get(fixed, "tulu", "output_tokens_per_s"),
            TARGETS["fixed_output_tokens_per_s"],
        )
        ours = _get(fixed, "tulu", "output_tokens_per_s")
        theirs = _get(fixed, "transformers", "output_tokens_per_s")
        add(
            4,
            "  ... vs transformers generate at batch 64",
            ours / theirs if ours and theirs else None,
            TARGETS["fixed_ratio_vs_transformers"],
        )
        add(
            4,
            "prefill tokens/s at 2,048",
            prefill.get("tulu_tokens_per_s"),
            TARGETS["prefill_tokens_per_s"],
        )
        rows.append(
            {
                "issue": 4,
                "figure": "decode path",
                "measured": engine.note or "as asked",
                "target": "fast path",
                "met": None,
            }
        )
    train = outcomes.get("train")
    t = train.result if train else {}
    for key, f in t.get("figures", {}).items():
        if not key.startswith("tulu_"):
            continue
        name = key.removeprefix("tulu_")
        add(7, f"train MFU, {name} (full optimizer step)", f.get("mfu"), TARGETS["train_mfu"])
        add(
            7,
            f"train peak GiB, {name} (dry-run {f.get('estimate_gib') or 0:.1f})",
            f.get("peak_memory_gib"),
            TARGETS["train_peak_gib"],
            at_least=False,
        )
    ev = outcomes.get("eval")
    v = ev.result if ev else {}
    if v:
        complete = not v.get("not_reached") and not v.get("skipped")
        what = "paper suite s" + (
            ""
            if complete
            else f" (partial: not reached {v.get('not_reached')}, skipped {v.get('skipped')})"
        )
        add(
            8,
            what,
            v.get("suite_seconds") if complete else None,
            TARGETS["eval_suite_seconds"],
            at_least=False,
        )
        if not complete:
            rows[-1]["measured"] = v.get("suite_seconds")
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'issue':<6}{'figure':<58}{'measured':>16}  {'target':<14}met"]
    for r in rows:
        value = r["measured"]
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"{r['issue']:<6}{r['figure'][:57]:<58}{shown:>16}  {r['target']:<14}{met}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    if args.carry is not None and not (args.carry / "data").is_dir():
        # The eval part would fail without its data and train without torchao: refuse before
        # the device time is spent (the device tool drops a carry path this checkout lacks).
        raise SystemExit(
            f"device_check.py run: --carry {args.carry} holds no data/: fill it with "
            "`device_check.py prepare` and name it in the device tool's carry"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"device_check.py run: --out {out}: {err.strerror or err}") from None
    for name in OUTPUT_FILES:  # an earlier run's figures must not pass for this run's
        (out / name).unlink(missing_ok=True)
    logfile = out / "device-check.log"
    logfile.write_text("")
    began = time.perf_counter()

    def say(message: str) -> None:
        line = f"[{time.perf_counter() - began:6.1f} s] {message}"
        print(line, flush=True)
        with logfile.open("a") as log:
            log.write(line + "\n")

    carry = args.carry.resolve() if args.carry else None
    data = DataPaths.of(carry, args.shared)
    site = install_wheels(carry, Path(args.site), say) if carry else None
    env = child_env(site)
    outcomes: dict[str, Outcome] = {}
    for step in plan(args, out, data):
        left = args.budget_s - (time.perf_counter() - began)
        if left < step.min_s:
            outcomes[step.part] = Outcome(step.part, "skipped", note=f"{left:.0f} s left")
            say(f"{step.part}: skipped, {left:.0f} s left of --budget-s {args.budget_s:g}")
            continue
        limit = min(step.limit_s, left)
        if step.part == "eval":  # stop starting tasks while there is time to finish one
            budget = max(limit * 0.5, limit - 240)
            step = dataclasses.replace(step, argv=[*step.argv, "--time-budget", f"{budget:.0f}"])
        say(f"{step.part}: running (limit {limit:.0f} s)")
        outcome = execute(step, limit, env, logfile)
        if outcome.status != "ok" and (outcome.result or {}).get("partial"):
            # generation.py writes each workload's figures as it goes: keep those rather than
            # spend the time left on the slower fallback.
            done = [k for k, v in outcome.result.get("workloads", {}).items() if v]
            outcome.note = f"{outcome.status} after measuring {', '.join(done) or 'nothing'}"
        elif outcome.status != "ok" and step.fallback is not None:
            first = f"{outcome.status}: {log_tail(logfile, 3)}"
            left = args.budget_s - (time.perf_counter() - began)
            if left >= step.fallback.min_s:
                say(f"{step.part}: {outcome.status}; running the fallback")
                outcome = execute(step.fallback, min(step.fallback.limit_s, left), env, logfile)
                outcome.note = f"fallback (loop, eager) after the fast path {first}"
        if outcome.status != "ok" and not outcome.note:
            outcome.note = log_tail(logfile, 6)
        outcomes[step.part] = outcome
        say(f"{step.part}: {outcome.status} in {outcome.seconds:.0f} s")

    rows = figures(outcomes, out)
    summary = {
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "seconds": time.perf_counter() - began,
        "parts": {
            name: {k: v for k, v in vars(o).items() if k != "result"}
            for name, o in outcomes.items()
        },
        "machine": outcomes["env"].result if "env" in outcomes else {},
        "figures": rows,
    }
    (out / "device-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(format_rows(rows))
    for name, o in outcomes.items():
        if o.status != "ok":
            print(f"\n{name}: {o.status}; {o.note}")
    print(f"\nwrote {out / 'device-check.json'} and {logfile}")
    return 0 if all(o.status == "ok" for o in outcomes.values()) else 1


# ------------------------------------------------------------------------------ probe
def probe(path: Path) -> None:
    """The machine: versions, device, copy bandwidth and a bf16 (CPU: float32) matmul rate."""
    import torch

    from tulu.bench.workloads import copy_bandwidth

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
    }
    if gpu:
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = props.total_memory / 2**30
        info["multiprocessors"] = props.multi_processor_count
    info["copy_bandwidth_gb_s"] = copy_bandwidth(device) / 1e9
    n, dtype = (8192, torch.bfloat16) if gpu else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    if gpu:
        torch.cuda.synchronize()
    info["matmul_tflops"] = 10 * 2 * n**3 / (time.perf_counter() - started) / 1e12
    info["matmul"] = f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}"
    packages = {}
    for name in ("transformers", "triton", "torchao", "peft", "tokenizers", "safetensors"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    path.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


# ------------------------------------------------------------------------------ main
def parse_budget(text: str) -> float:
    """--budget-s: a positive number of seconds (NaN would start every part, unbounded)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(PARTS)}, got {text!r}")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fill the carry folder (here, where PyPI is reachable)")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--carry", type=Path, default=REPO / ".device-carry")
    p.add_argument("--no-wheels", action="store_true", help="copy the data only")
    r = sub.add_parser("run", help="run the checks (on the GPU machine)")
    r.add_argument("--carry", type=Path, default=None, help="the folder `prepare` filled")
    r.add_argument(
        "--shared", type=Path, default=REPO.parent / "shared", help="data without --carry"
    )
    r.add_argument("--out", type=Path, required=True, help="results folder ($OUT there)")
    r.add_argument("--parts", type=parse_parts, default=PARTS, help=",".join(PARTS))
    r.add_argument(
        "--budget-s", type=parse_budget, default=540.0, help="the whole run (default 540)"
    )
    r.add_argument("--eval-tasks", default=None, help="eval_suite.py --tasks (default: all)")
    r.add_argument("--site", default="/tmp/tulu-device-site", help="where wheels are installed")
    r.add_argument("--smoke", action="store_true", help="CPU sizes: check the run itself")
    r.add_argument(
        "--decode-attention",
        default=None,
        help="the engine part's fast path (default: triton; sdpa with --smoke)",
    )
    q = sub.add_parser("probe", help="(a part of run) write the machine's figures to PATH")
    q.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.shared, args.carry, wheels=not args.no_wheels)
        return 0
    if args.command == "probe":
        probe(args.path)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
