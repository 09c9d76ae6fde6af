"""HumanEval loading, program assembly, stop sequences, pass@k, and the real 164 problems."""

from __future__ import annotations

import gzip
import itertools
import json
from math import comb
from pathlib import Path

import pytest

from tulu.errors import DataError
from tulu.eval.humaneval import (
    STOP_SEQUENCES,
    Problem,
    load_problems,
    mean_pass_at_k,
    pass_at_k,
    program_for,
    truncate_at_stop,
)
from tulu.eval.sandbox import run_many

HUMANEVAL = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data/eval/codex_humaneval/HumanEval.jsonl.gz"
)


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    if not HUMANEVAL.is_file():
        pytest.skip(f"HumanEval data absent ({HUMANEVAL})")
    return load_problems(HUMANEVAL)


def _record(i: int) -> dict[str, str]:
    return {
        "task_id": f"T/{i}",
        "prompt": f"def f{i}(x):\n",
        "canonical_solution": "    return x\n",
        "test": f"def check(candidate):\n    assert candidate({i}) == {i}\n",
        "entry_point": f"f{i}",
    }


# --- loading --------------------------------------------------------------------------------


def test_load_plain_and_gzipped(tmp_path: Path) -> None:
    lines = "".join(json.dumps(_record(i)) + "\n" for i in range(3))
    (tmp_path / "p.jsonl").write_text(lines + "\n")
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write(lines)
    for name in ("p.jsonl", "p.jsonl.gz"):
        loaded = load_problems(tmp_path / name)
        assert [p.task_id for p in loaded] == ["T/0", "T/1", "T/2"]


def test_a_utf8_bom_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\ufeff" + json.dumps(_record(0)) + "\n")
    assert [p.task_id for p in load_problems(path)] == ["T/0"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**_record(9), "test": None}), "'test' missing"),
        (json.dumps(_record(0)), "duplicate task_id"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        load_problems(path)
    assert f"{path}:2" in str(info.value)


def test_a_corrupt_gzip_file_is_a_data_error(tmp_path: Path) -> None:
    """A damaged download fails inside zlib (zlib.error, not an OSError): still a DataError
    naming the file, not a traceback."""
    lines = "".join(json.dumps(_record(i)) + "\n" for i in range(200))
    data = bytearray(gzip.compress(lines.encode()))
    for offset in range(40, len(data) - 40, 97):
        data[offset] ^= 0xFF
    path = tmp_path / "HumanEval.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"HumanEval\.jsonl\.gz: cannot read HumanEval file"):
        load_problems(path)


def test_a_line_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    bad = json.dumps(_record(1)).replace("f1", "f\udcff").encode("utf-8", "surrogateescape")
    path.write_bytes(json.dumps(_record(0)).encode() + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: not UTF-8 text"):
        load_problems(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no problems"):
        load_problems(tmp_path / "empty.jsonl")


# --- programs and stop sequences ------------------------------------------------------------


def test_program_for_is_prompt_completion_test_check() -> None:
    problem = Problem(**_record(1))
    program = program_for(problem, "    return x\n")
    assert program == (
        "def f1(x):\n    return x\n\n"
        "def check(candidate):\n    assert candidate(1) == 1\n\ncheck(f1)\n"
    )


def test_truncate_at_stop() -> None:
    assert STOP_SEQUENCES == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    body = "    return x\n"
    assert truncate_at_stop(body) == body
    assert truncate_at_stop(body + "\ndef g():\n    pass\n") == body
    assert truncate_at_stop(body + "\nprint(f(1))\n#x\n") == body
    assert truncate_at_stop(body + "\n# comment\nif __name__:\n") == body
    # Indented matches are not stop sequences.
    assert truncate_at_stop("    if x:\n        return 1\n") == "    if x:\n        return 1\n"
    assert truncate_at_stop("\nclass A: pass") == ""


# --- pass@k ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c", "k", "expected"),
    [
        (0, 1, 0.0),
        (1, 1, 0.05),
        (5, 1, 0.25),
        (20, 1, 1.0),
        (0, 10, 0.0),
        (1, 10, 0.5),  # 1 - C(19,10)/C(20,10) = 1 - 10/20
        (5, 10, 1 - 3003 / 184756),  # C(15,10) = 3003, C(20,10) = 184756
        (20, 10, 1.0),
    ],
)
def test_pass_at_k_hand_computed(c: int, k: int, expected: float) -> None:
    assert pass_at_k(20, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_brute_force() -> None:
    """Count, over every k-subset of the samples, the fraction containing at least one pass."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
                assert len(subsets) == comb(n, k)


def test_pass_at_k_large_n_is_stable() -> None:
    value = pass_at_k(10_000, 3, 100)
    assert 0.0 < value < 1.0
    assert value == pytest.approx(1 - comb(9_997, 100) / comb(10_000, 100), rel=1e-9)


def test_pass_at_k_rejects_bad_arguments() -> None:
    for n, c, k in ((0, 0, 1), (5, 6, 1), (5, 1, 0), (5, 1, 6)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_mean_pass_at_k() -> None:
    results = [[True, False, False, False], [False] * 4, [True] * 4]
    assert mean_pass_at_k(results, 1) == pytest.approx((0.25 + 0.0 + 1.0) / 3)
    assert mean_pass_at_k(results, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


# --- the real problems ----------------------------------------------------------------------


def test_real_file_has_164_problems(problems: list[Problem]) -> None:
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0"
    assert all(p.entry_point in p.prompt for p in problems)


@pytest.mark.slow
def test_canonical_solutions_all_pass(problems: list[Problem]) -> None:
    results = run_many([program_for(p, p.canonical_solution) for p in problems], workers=2)
    failed = [
        (p.task_id, r.status, r.detail[-300:])
        for p, r in zip(problems, results, strict=True)
        if not r.passed
    ]
    assert failed == []
    assert sum(r.passed for r in results) == 164


@pytest.mark.slow
def test_empty_completions_all_fail(problems: list[Problem]) -> None:
    results = run_many([program_for(p, "") for p in problems], workers=2)
    assert sum(r.passed for r in results) == 0
    assert all(r.status in ("failed", "error") for r in results)
    assert mean_pass_at_k([[r.passed] for r in results], 1) == 0.0
