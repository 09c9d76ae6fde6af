"""BBH protocol: golden prompts, loading and sampling, answer extraction and scoring."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tulu.errors import DataError
from tulu.eval import bbh

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
BBH_DIR = SHARED / "data" / "eval" / "bbh"


@pytest.fixture(scope="module")
def tasks() -> dict[str, bbh.BBHTask]:
    if not (BBH_DIR / "bbh" / "boolean_expressions.json").is_file():
        pytest.skip(f"BBH data absent ({BBH_DIR})")
    return bbh.load_bbh(BBH_DIR)


DESCRIPTION = (
    "Determine whether an artificially constructed sentence relating to sports is plausible "
    "or not.\n\n"
)
Q1 = (
    'Q: Is the following sentence plausible? "Bam Adebayo scored a reverse layup in the '
    'Western Conference Finals."\n'
)
Q2 = 'Q: Is the following sentence plausible? "Santi Cazorla scored a touchdown."\n'
Q3 = 'Q: Is the following sentence plausible? "DeMar DeRozan was called for the goal tend."\n'
TEST_Q = 'Is the following sentence plausible? "Elias Lindholm beat the buzzer."'


def test_load_real_data(tasks: dict[str, bbh.BBHTask]) -> None:
    assert sorted(tasks) == sorted(bbh.TASKS) and len(tasks) == 27
    assert len(tasks["boolean_expressions"].examples) == 250
    assert len(tasks["penguins_in_a_table"].examples) == 146
    assert tasks["sports_understanding"].examples[0].input == TEST_Q
    assert tasks["sports_understanding"].examples[0].target == "no"


def test_sampling_40_per_task_deterministic(tasks: dict[str, bbh.BBHTask]) -> None:
    paper = bbh.sample_examples(tasks)
    assert sorted(paper) == sorted(bbh.TASKS)
    assert all(len(rows) == 40 for rows in paper.values())
    assert bbh.sample_examples(tasks) == paper
    # paper: one generator seeded once, consumed task after task in sorted order
    state = random.getstate()
    try:
        random.seed(42)
        expected = {name: random.sample(tasks[name].examples, 40) for name in sorted(tasks)}
    finally:
        random.setstate(state)
    assert paper == expected
    # clean: every task drawn with a fresh seed-42 generator, independent of the others
    clean = bbh.sample_examples(tasks, protocol="clean")
    for name in bbh.TASKS:
        assert clean[name] == random.Random(42).sample(tasks[name].examples, 40)
    only = bbh.sample_examples({"snarks": tasks["snarks"]}, protocol="clean")
    assert only["snarks"] == clean["snarks"]
    assert bbh.sample_examples(tasks, None)["snarks"] == tasks["snarks"].examples


def test_golden_prompts_cot_and_direct(tasks: dict[str, bbh.BBHTask]) -> None:
    task = tasks["sports_understanding"]
    cot = bbh.build_prompt(bbh.task_prompt(task.cot_prompt_file, "cot"), TEST_Q)
    assert cot == (
        "<|user|>\n" + DESCRIPTION
        + Q1 + "A: Let's think step by step. Bam Adebayo is an American basketball player. "
        "Scoring a reverse layup in the Western Conference Finals is part of the NBA Finals. "
        "So the answer is yes.\n\n"
        + Q2 + "A: Let's think step by step. Santi Cazorla is a soccer player. Touchdown is "
        "part of American football and rugby. So the answer is no.\n\n"
        + Q3 + "A: Let's think step by step. DeMar DeRozan is an American basketball player. "
        "Goal tending is part of basketball. So the answer is yes.\n\n"
        "Q: " + TEST_Q + "\n<|assistant|>\nA:"
    )  # fmt: skip
    assert bbh.task_prompt(task.cot_prompt_file, "cot", "clean") == bbh.task_prompt(
        task.cot_prompt_file, "cot"
    )
    direct = bbh.build_prompt(bbh.task_prompt(task.cot_prompt_file, "direct"), TEST_Q)
    assert direct == (
        "<|user|>\n" + DESCRIPTION
        + Q1 + "A: yes.\n\n" + Q2 + "A: no.\n\n" + Q3 + "A: yes.\n\n"
        "Q: " + TEST_Q + "\n<|assistant|>\nA:"
    )  # fmt: skip
    clean = bbh.build_prompt(bbh.task_prompt(task.cot_prompt_file, "direct", "clean"), TEST_Q)
    assert clean == direct.replace("A: yes.\n", "A: yes\n").replace("A: no.\n", "A: no\n")


def test_every_task_converts_to_direct(tasks: dict[str, bbh.BBHTask]) -> None:
    for name, task in tasks.items():
        prompt = bbh.task_prompt(task.cot_prompt_file, "direct")
        assert prompt.count("\nA: ") == 3, name
        assert "Let's think step by step" not in prompt, name
        assert not prompt.startswith("BENCHMARK") and not prompt.startswith("-----"), name


@pytest.mark.parametrize("protocol", ["paper", "clean"])
def test_gold_scores_100_and_wrong_scores_0(
    tasks: dict[str, bbh.BBHTask], protocol: bbh.ProtocolName
) -> None:
    sampled = bbh.sample_examples(tasks, protocol=protocol)
    sentence = {n: [f" So the answer is {r.target}." for r in rows] for n, rows in sampled.items()}
    bare = {n: [f" {r.target}\n\nQ: next" for r in rows] for n, rows in sampled.items()}
    for outputs in (sentence, bare):
        result = bbh.score(outputs, sampled, protocol)
        assert result.accuracy == 1.0
        assert all(s.correct == s.total == 40 for s in result.per_task.values())
    wrong = {n: ["So the answer is (Z) nonsense." for _ in rows] for n, rows in sampled.items()}
    result = bbh.score(wrong, sampled, protocol)
    assert result.accuracy == 0.0
    table = result.table()
    assert len(table) == 27 and table["snarks"] == {"correct": 0, "total": 40, "accuracy": 0.0}


def test_macro_average() -> None:
    examples = {
        "a": [bbh.BBHExample("q", "yes")],
        "b": [bbh.BBHExample("q", "no"), bbh.BBHExample("q", "yes"), bbh.BBHExample("q", "no")],
    }
    outputs = {"a": ["So the answer is yes."], "b": ["no", "no", "no"]}
    result = bbh.score(outputs, examples)
    assert result.per_task["b"].accuracy == pytest.approx(2 / 3)
    assert result.accuracy == pytest.approx((1 + 2 / 3) / 2)  # not the micro 3/4


def test_extraction_quirks() -> None:
    assert bbh.postprocess("x\n\ny") == "x"
    text = "Let's think. So the answer is (B). Then more."
    assert bbh.extract_answer(text, "paper") == "(B)"
    assert bbh.extract_answer(text, "clean") == "(B). Then more"
    # lazy regex stops at the first period; clean keeps the decimal
    assert bbh.extract_answer("So the answer is 3.5.", "paper") == "3"
    assert bbh.extract_answer("So the answer is 3.5.", "clean") == "3.5"
    # no final period: paper misses the regex and keeps the whole output
    assert bbh.extract_answer("Hmm. So the answer is (B)", "paper") == "Hmm. So the answer is (B)"
    assert bbh.extract_answer("Hmm. So the answer is (B)", "clean") == "(B)"
    assert bbh.extract_answer(" False.\n\nQ: x", "paper") == "False."
    assert bbh.extract_answer(" False.\n\nQ: x", "clean") == "False"
    # paper comparison ignores case and ASCII punctuation; dyck targets reduce to spaces
    assert bbh.answers_match("False.", "False", "paper")
    assert bbh.answers_match("] )", "> }", "paper")
    assert not bbh.answers_match("] )", "> }", "clean")
    assert bbh.answers_match("TRUE", "True", "clean")
    assert bbh.answers_match("] ]  )", "] ] )", "clean")


def test_generation_settings() -> None:
    assert bbh.GENERATION.temperature == 0.0
    assert bbh.GENERATION.max_tokens == 512
    assert bbh.GENERATION.stop == ("\n\n",)


def test_missing_files_reported_together(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no directory with both"):
        bbh.load_bbh(tmp_path)
    (tmp_path / "bbh").mkdir()
    (tmp_path / "cot-prompts").mkdir()
    (tmp_path / "bbh" / "snarks.json").write_text('{"examples": [{"input": "q", "target": "t"}]}')
    with pytest.raises(DataError) as info:
        bbh.load_bbh(tmp_path)
    message = str(info.value)
    assert "53 file(s) missing" in message
    assert "cot-prompts/snarks.txt" in message and "bbh/word_sorting.json" in message
    assert "bbh/snarks.json" not in message
    (tmp_path / "cot-prompts" / "snarks.txt").write_text("canary\n-----\nD\n\nQ: a\nA: b.")
    with pytest.raises(DataError, match="So the answer is"):
        loaded = bbh.load_bbh(tmp_path, ["snarks"])
        bbh.task_prompt(loaded["snarks"].cot_prompt_file, "direct")
    (tmp_path / "bbh" / "snarks.json").write_text('{"examples": []}')
    with pytest.raises(DataError, match="non-empty 'examples'"):
        bbh.load_bbh(tmp_path, ["snarks"])


def test_prompt_file_without_the_answer_marker_is_refused_naming_file_and_line(
    tmp_path: Path,
) -> None:
    """In CoT mode too (no Direct conversion to trip on), and for a file with no exemplars."""
    (tmp_path / "bbh").mkdir()
    (tmp_path / "cot-prompts").mkdir()
    (tmp_path / "bbh" / "snarks.json").write_text('{"examples": [{"input": "q", "target": "t"}]}')
    prompt = tmp_path / "cot-prompts" / "snarks.txt"
    good = "Q: a\nA: Let's think. So the answer is b."
    prompt.write_text(f"canary\n-----\nD\n\n{good}\n\nQ: c\nA: Let's think.\nd.\n")
    with pytest.raises(DataError, match=rf"^{prompt}:8: exemplar lacks .*Q: c"):
        bbh.load_bbh(tmp_path, ["snarks"])
    prompt.write_text("canary\n-----\nD\n")
    with pytest.raises(DataError, match=rf"^{prompt}: no exemplars"):
        bbh.load_bbh(tmp_path, ["snarks"])
    prompt.write_text(f"canary\n-----\nD\n\n{good}\n")
    loaded = bbh.load_bbh(tmp_path, ["snarks"])
    assert bbh.task_prompt(loaded["snarks"].cot_prompt_file, "direct") == "D\n\nQ: a\nA: b."


def test_score_checks_counts() -> None:
    examples = {"a": [bbh.BBHExample("q", "yes")]}
    with pytest.raises(DataError, match="2 outputs for 1"):
        bbh.score({"a": ["x", "y"]}, examples)
    with pytest.raises(DataError, match="none outputs"):
        bbh.score({}, examples)
    with pytest.raises(DataError, match="unknown BBH task"):
        bbh.score({"a": ["x"], "zz": ["y"]}, examples)
