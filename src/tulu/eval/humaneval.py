"""Codex-Eval (HumanEval): problems, programs, stop sequences and the pass@k estimator.

A completion is scored the way the original benchmark does it: the prompt (signature and
docstring) plus the model's completion plus the problem's `check` function, run as one program
in the sandbox (`tulu.eval.sandbox`); it passes when the program exits cleanly. pass@k is the
unbiased estimator of Chen et al. (2021), averaged over problems.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tulu.errors import DataError
from tulu.eval.files import text_lines

# Where a function-level completion ends: the next top-level statement. Cutting here keeps the
# model's extra test code or next function out of the program (as the Codex paper did).
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]

_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem, with the fields of the released HumanEval.jsonl."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def load_problems(path: str | Path) -> list[Problem]:
    """Read `HumanEval.jsonl.gz` (or a plain `.jsonl`), one problem a line, in file order.

    Raises DataError naming file:line for unreadable JSON, a missing or non-string field, or a
    duplicated task_id, so a corrupt download is caught before any model time is spent.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: HumanEval file not found")
    opener = gzip.open if path.name.endswith(".gz") else open
    problems: list[Problem] = []
    seen: set[str] = set()
    try:
        with opener(path, "rb") as f:
            for lineno, line in text_lines(f, path):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object")
                for field in _FIELDS:
                    if not isinstance(record.get(field), str):
                        raise DataError(f"{where}: field {field!r} missing or not a string")
                if record["task_id"] in seen:
                    raise DataError(f"{where}: duplicate task_id {record['task_id']!r}")
                seen.add(record["task_id"])
                problems.append(Problem(**{k: record[k] for k in _FIELDS}))
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a corrupt .gz
        raise DataError(f"{path}: cannot read HumanEval file ({exc})") from None
    if not problems:
        raise DataError(f"{path}: no problems in file")
    return problems


def program_for(problem: Problem, completion: str) -> str:
    """The program that scores `completion`: prompt + completion + tests + `check(entry)`."""
    return (
        problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})\n"
    )


def truncate_at_stop(completion: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut `completion` at the earliest stop sequence (the stop sequence itself is dropped)."""
    cut = len(completion)
    for stop in stop_sequences:
        index = completion.find(stop)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` passed: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which avoids the huge binomials; when
    fewer than k samples failed, every k-subset contains a pass and the answer is exactly 1.
    """
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1, k >= 1 and 0 <= c <= n, got {n=}, {c=}, {k=}")
    if k > n:
        raise ValueError(f"pass_at_k needs k <= n, got {n=}, {k=}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(results_per_problem: Iterable[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; each item is the pass/fail list of one problem's samples.

    Problems may have different sample counts; each needs at least `k` samples.
    """
    scores = [pass_at_k(len(r), sum(bool(x) for x in r), k) for r in results_per_problem]
    if not scores:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(scores) / len(scores)
