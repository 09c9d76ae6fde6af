"""GSM8K protocol: golden prompts, sampling, exemplars, answer extraction and scoring."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path

import pytest

from tulu.errors import DataError
from tulu.eval import gsm

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TEST_FILE = SHARED / "data" / "eval" / "gsm" / "test.jsonl"
EXEMPLARS_FILE = SHARED / "recipes" / "gsm_8shot_exemplars.json"


@pytest.fixture(scope="module")
def questions() -> list[gsm.GSMQuestion]:
    if not TEST_FILE.is_file():
        pytest.skip(f"GSM8K test data absent ({TEST_FILE})")
    return gsm.load_gsm(TEST_FILE)


@pytest.fixture(scope="module")
def exemplars() -> list[gsm.Exemplar]:
    if not EXEMPLARS_FILE.is_file():
        pytest.skip(f"GSM8K exemplars absent ({EXEMPLARS_FILE})")
    return gsm.load_exemplars(EXEMPLARS_FILE)


TWO = [
    gsm.Exemplar("How many legs do 2 cats have?", "Each cat has 4 legs. 2 * 4 = 8.", "8"),
    gsm.Exemplar("What is 1 + 1?", "1 + 1 = 2. So the answer is 2.", "2"),
]


def test_load_real_data(questions: list[gsm.GSMQuestion]) -> None:
    assert len(questions) == 1319
    assert questions[0].gold == "18"
    assert questions[0].source.endswith("test.jsonl:1")


def test_sample_is_seed_42_random_sample(questions: list[gsm.GSMQuestion]) -> None:
    sample = gsm.sample_questions(questions)
    assert len(sample) == 200
    assert sample == gsm.sample_questions(questions, 200, 42)
    state = random.getstate()
    try:
        random.seed(42)
        expected = random.sample(questions, 200)
    finally:
        random.setstate(state)
    assert sample == expected
    assert gsm.sample_questions(questions, None) == questions
    assert gsm.sample_questions(questions, 5000) == questions
    assert len(gsm.sample_questions(questions, 10)) == 10


def test_golden_prompts_both_modes(questions: list[gsm.GSMQuestion]) -> None:
    q = questions[1]
    question = (
        "A robe takes 2 bolts of blue fiber and half that much white fiber.  "
        "How many bolts in total does it take?"
    )
    assert q.question.strip() == question
    cot = gsm.build_prompt(q.question, TWO, "cot", "paper")
    assert cot == (
        "<|user|>\nAnswer the following questions.\n\n"
        "Question: How many legs do 2 cats have?\nAnswer: Each cat has 4 legs. 2 * 4 = 8.\n\n"
        "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2. So the answer is 2.\n\n"
        f"Question: {question}\n<|assistant|>\nAnswer:"
    )
    assert gsm.build_prompt(q.question, TWO, "cot", "clean") == cot
    direct_paper = gsm.build_prompt(q.question, TWO, "direct", "paper")
    assert direct_paper == (
        "<|user|>\nAnswer the following questions.\n\n"
        "Quesion: How many legs do 2 cats have?\nAnswer: 8\n\n"
        "Quesion: What is 1 + 1?\nAnswer: 2\n\n"
        f"Question: {question}\n<|assistant|>\nAnswer:"
    )
    assert gsm.build_prompt(q.question, TWO, "direct", "clean") == direct_paper.replace(
        "Quesion:", "Question:"
    )


def test_only_the_question_is_stripped() -> None:
    prompt = gsm.build_prompt("  What is 2 + 2?\n", TWO[:1], "cot", "clean")
    assert prompt.endswith("\n\nQuestion: What is 2 + 2?\n<|assistant|>\nAnswer:")


def test_real_exemplars(exemplars: list[gsm.Exemplar], questions: list[gsm.GSMQuestion]) -> None:
    assert len(exemplars) == 8
    assert exemplars[0].short_answer == "6"
    assert exemplars[0].cot_answer.endswith("So the answer is 6.")
    cot = gsm.build_prompt(questions[0].question, exemplars, "cot", "paper")
    assert cot.startswith(
        "<|user|>\nAnswer the following questions.\n\nQuestion: There are 15 trees in the grove."
    )
    assert cot.count("Question: ") == 9
    assert cot.count("\n\n") == 9
    direct = gsm.build_prompt(questions[0].question, exemplars, "direct", "paper")
    assert direct.count("Quesion: ") == 8
    assert "Answer: 6\n\nQuesion: If there are 3 cars" in direct
    assert direct.endswith(
        "Question: " + questions[0].question.strip() + "\n<|assistant|>\nAnswer:"
    )


def test_load_exemplars_layouts(tmp_path: Path) -> None:
    items = [{"question": "q", "cot_answer": "c", "short_answer": "1"}]
    (tmp_path / "list.json").write_text(json.dumps(items))
    (tmp_path / "obj.json").write_text(json.dumps({"source": "x", "exemplars": items}))
    expected = [gsm.Exemplar("q", "c", "1")]
    assert gsm.load_exemplars(tmp_path / "list.json") == expected
    assert gsm.load_exemplars(tmp_path / "obj.json") == expected
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(DataError, match="exemplar 0 needs"):
        gsm.load_exemplars(tmp_path / "bad.json")


def test_exemplars_from_train_and_errors(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    lines = [
        {"question": f"Q{i}?", "answer": f"Step <<{i}+1={i + 1}>>{i + 1}.\nDone.\n#### {i + 1}"}
        for i in range(20)
    ]
    train.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = gsm.resolve_exemplars(train_path=train)
    assert len(source.exemplars) == 8
    assert source == gsm.resolve_exemplars(train_path=train)  # seeded
    assert "seed 42" in source.description and f"{train}:" in source.description
    first = source.exemplars[0]
    n = int(first.short_answer)
    assert first.cot_answer == f"Step {n}. Done. So the answer is {n}."
    with pytest.raises(DataError, match="pass an exemplars JSON file"):
        gsm.resolve_exemplars()
    with pytest.raises(DataError, match="not found"):
        gsm.load_gsm(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="not found"):
        gsm.load_exemplars(tmp_path / "missing.json")
    # a directory given for a file is named as such, not as missing
    with pytest.raises(DataError, match="is a directory \\(expected the exemplars JSON file\\)"):
        gsm.load_exemplars(tmp_path)
    with pytest.raises(DataError, match="is a directory \\(expected the GSM8K"):
        gsm.load_gsm(tmp_path)
    (tmp_path / "bad.jsonl").write_text(
        '{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n'
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2:"):
        gsm.load_gsm(tmp_path / "bad.jsonl")


def test_extract_answer() -> None:
    assert gsm.extract_answer("She makes 9 * 2 = $18 every day. So the answer is 18.") == "18"
    assert gsm.extract_answer("The total is 1,234,567 dollars") == "1234567"
    assert gsm.extract_answer("It costs $1,000.50") == "1000.50"
    assert gsm.extract_answer("It dropped to -5 degrees") == "-5"
    assert gsm.extract_answer("no numbers here") is None
    assert gsm.extract_answer("It dropped to -5 degrees", "paper") == "5"
    assert gsm.extract_answer("It is -2.5", "paper") == "-2.5"
    assert gsm.extract_answer("1,2,3", "paper") == "3"  # the regex skips every other comma
    assert gsm.extract_answer("1,2,3") == "123"


def test_a_hyphen_after_a_digit_is_not_a_minus_sign() -> None:
    """'10-15' is a range (or a subtraction), so clean must not read it as the number -15;
    a minus that does not follow a digit is still a sign."""
    assert gsm.extract_answer("Between 10-15 apples") == "15"
    assert gsm.extract_answer("In 2022-2023 it grew by 7") == "7"
    assert gsm.extract_answer("He paid 20-8 = 12, then 3.5-2") == "2"
    assert gsm.extract_answer("x = -5") == "-5"
    assert gsm.extract_answer("12 + (-3)") == "-3"


def test_answers_match() -> None:
    assert gsm.answers_match("3.0", "3", "clean")
    assert not gsm.answers_match("3.0", "3", "paper")
    assert gsm.answers_match("3", "3", "paper")
    assert not gsm.answers_match("-5", "5", "clean")
    assert gsm.answers_match("-5", "5", "paper")  # punctuation is ignored
    assert not gsm.answers_match(None, "5", "clean")


def test_score_gold_and_wrong_on_full_data(questions: list[gsm.GSMQuestion]) -> None:
    gold_outputs = [q.answer for q in questions]  # reference solutions end in "#### N"
    wrong_outputs = [f"So the answer is {Decimal(q.gold) + 1}." for q in questions]
    for protocol in ("paper", "clean"):
        result = gsm.score(gold_outputs, questions, protocol)
        assert (result.accuracy, result.correct, result.total) == (1.0, 1319, 1319)
        assert gsm.score(wrong_outputs, questions, protocol).accuracy == 0.0
    with pytest.raises(DataError, match="outputs for"):
        gsm.score(gold_outputs[:3], questions)


def test_generation_settings() -> None:
    assert gsm.GENERATION.temperature == 0.0
    assert gsm.GENERATION.max_tokens == 512
    assert gsm.GENERATION.stop == ("\n",)


@pytest.mark.parametrize("gold", ["NaN", "-Infinity", "inf", "sNaN"])
def test_a_gold_answer_that_is_not_a_finite_number_is_refused(tmp_path: Path, gold: str) -> None:
    """Decimal parses these, but no model output can ever match them: a damaged file."""
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": f"x #### {gold}"}) + "\n")
    with pytest.raises(DataError, match=rf"test\.jsonl:1: final answer '{gold}' .* not a number"):
        gsm.load_gsm(path)


def test_a_utf8_bom_is_skipped(tmp_path: Path) -> None:
    """Files saved by Windows editors start with a BOM; the first line is still a record."""
    path = tmp_path / "test.jsonl"
    path.write_text("\ufeff" + json.dumps({"question": "q", "answer": "x #### 5"}) + "\n")
    assert [(q.question, q.gold) for q in gsm.load_gsm(path)] == [("q", "5")]
    exemplars = tmp_path / "exemplars.json"
    item = {"question": "q", "cot_answer": "c", "short_answer": "1"}
    exemplars.write_text("\ufeff" + json.dumps([item]))
    assert gsm.load_exemplars(exemplars) == [gsm.Exemplar("q", "c", "1")]


def test_a_line_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    """The error names the line, not a byte offset into a read buffer."""
    good = json.dumps({"question": "q" * 300, "answer": "x #### 5"}).encode() + b"\n"
    path = tmp_path / "test.jsonl"
    path.write_bytes(good * 40 + b'{"question": "\xff", "answer": "x #### 5"}\n' + good)
    with pytest.raises(DataError, match=r"test\.jsonl:41: not UTF-8 text"):
        gsm.load_gsm(path)
