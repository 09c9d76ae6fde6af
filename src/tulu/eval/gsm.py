"""GSM8K Direct and CoT, as the Tulu paper runs it (open-instruct ``eval/gsm/run_eval.py``).

The protocol:

1. 200 test questions: ``random.seed(42); random.sample(test, 200)``. `sample_questions` uses
   ``random.Random(42).sample`` which draws the identical sample (same generator, same seed)
   without touching the global random state. ``max_examples=None`` (or >= 1,319) keeps all
   questions in file order, as open-instruct does when ``len(test) <= max_num_examples``.
2. 8 exemplars (question, cot_answer, short_answer), each ``"Question: {q}\\nAnswer: {cot}"``
   for CoT or ``"Quesion: {q}\\nAnswer: {short}"`` for Direct, joined by ``"\\n\\n"``.
3. Prefix ``"Answer the following questions.\\n\\n" + exemplars + "\\n\\n"``; the user turn is
   ``prefix + "Question: " + question.strip()`` (the whole is not stripped), chat-wrapped with
   the answer prefix ``"Answer:"``.
4. Greedy decoding, at most 512 new tokens, stop at the first ``"\\n"`` (`GENERATION`).
5. The prediction is the last number in the output; gold is the number after ``"####"``;
   accuracy is exact match.

``protocol="paper"`` reproduces the paper's quirks, ``protocol="clean"`` fixes them:

- Direct exemplars say ``"Quesion:"`` (sic); clean spells ``"Question:"``. CoT is unaffected.
- Number extraction. Paper: commas between digits removed with ``(\\d),(\\d)`` (which misses
  every other comma in ``"1,2,3"``), then the last match of ``[-+]?\\d*\\.\\d+|\\d+``, which keeps
  a sign only on decimals, so ``"-5"`` extracts ``"5"``. Clean: all digit-grouping commas
  removed, then the last match of ``-?(\\d+(\\.\\d+)?|\\.\\d+)``, so ``"-5"`` extracts ``"-5"``;
  a ``"-"`` right after a digit is not a sign, so ``"10-15"`` extracts ``"15"``, not ``"-15"``.
- Comparison. Paper compares strings, after lowercasing and deleting all punctuation from both
  sides (open-instruct calls HF ``exact_match`` with ``ignore_case=True,
  ignore_punctuation=True``): so ``"3.0"`` does not match ``"3"`` (it becomes ``"30"``), while
  ``"3.5"`` matches a gold ``"35"`` and ``"-5"`` matches ``"5"``. When no number is found the
  paper compares the whole output. Clean compares numerically (``Decimal``): ``"3.0"`` equals
  ``"3"``, ``"-5"`` does not equal ``"5"``, and no number is always wrong.

Exemplars come from a JSON file (`load_exemplars`); without one, 8 are drawn (seeded) from a
GSM8K train file and their chains of thought rebuilt from the train answers
(`exemplars_from_train`), and `resolve_exemplars` says which were used.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from tulu.errors import DataError
from tulu.eval.backends import Decoding
from tulu.eval.chat_wrap import ProtocolName, chat_wrap, check_protocol
from tulu.eval.files import read_json, text_lines

__all__ = [
    "ANSWER_PREFIX",
    "DEFAULT_MAX_EXAMPLES",
    "DEFAULT_SEED",
    "GENERATION",
    "N_EXEMPLARS",
    "Exemplar",
    "ExemplarSource",
    "GSMQuestion",
    "GSMResult",
    "answers_match",
    "build_prompt",
    "exemplars_from_train",
    "extract_answer",
    "gold_answer",
    "load_exemplars",
    "load_gsm",
    "resolve_exemplars",
    "sample_questions",
    "score",
]

Mode = Literal["cot", "direct"]

ANSWER_PREFIX = "Answer:"
DEFAULT_MAX_EXAMPLES = 200
DEFAULT_SEED = 42
N_EXEMPLARS = 8
INSTRUCTION = "Answer the following questions.\n\n"


#: Decoding fixed by the protocol (greedy), not tunable per model.
GENERATION = Decoding(max_tokens=512, stop=("\n",))


@dataclass(frozen=True)
class GSMQuestion:
    """One test (or train) question, its full reference answer, and the gold number."""

    question: str
    answer: str
    gold: str
    source: str = ""  # "path:line"


@dataclass(frozen=True)
class Exemplar:
    """One few-shot demonstration: the question, a chain of thought, and the bare answer."""

    question: str
    cot_answer: str
    short_answer: str


@dataclass(frozen=True)
class ExemplarSource:
    """The exemplars in use and a human-readable line saying where they came from."""

    exemplars: list[Exemplar]
    description: str


# ----------------------------------------------------------------------------------- answers

_PAPER_COMMA = re.compile(r"(\d),(\d)")
_CLEAN_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PAPER_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")
# A "-" right after a digit is a subtraction or a range ("10-15"), not the sign of what follows.
_CLEAN_NUMBER = re.compile(r"(?:(?<!\d)-)?(?:\d+(?:\.\d+)?|\.\d+)")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def gold_answer(answer: str, where: str = "answer") -> str:
    """The number after ``"####"`` in a GSM8K reference answer, commas removed."""
    if "####" not in answer:
        raise DataError(f"{where}: no '####' final answer in {answer[-60:]!r}")
    gold = _CLEAN_COMMA.sub("", answer.split("####")[1].strip())
    try:
        finite = Decimal(gold).is_finite()  # "NaN" or "Infinity" could never be matched
    except InvalidOperation:
        finite = False
    if not finite:
        raise DataError(f"{where}: final answer {gold!r} after '####' is not a number")
    return gold


def extract_answer(output: str, protocol: ProtocolName = "clean") -> str | None:
    """The last number in a model output, commas removed; None when there is none."""
    check_protocol(protocol)
    if protocol == "paper":
        numbers = _PAPER_NUMBER.findall(_PAPER_COMMA.sub(r"\1\2", output))
    else:
        numbers = _CLEAN_NUMBER.findall(_CLEAN_COMMA.sub("", output))
    return numbers[-1] if numbers else None


def answers_match(prediction: str | None, gold: str, protocol: ProtocolName = "clean") -> bool:
    """Whether an extracted prediction equals the gold answer (see the module docstring)."""
    check_protocol(protocol)
    if prediction is None:
        return False
    if protocol == "paper":
        return prediction.lower().translate(_PUNCTUATION) == gold.lower().translate(_PUNCTUATION)
    try:
        return Decimal(prediction) == Decimal(gold)
    except InvalidOperation:
        return False


# ----------------------------------------------------------------------------------- loading


def _not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a file: a directory is not "not found"."""
    return "is a directory" if path.is_dir() else "not found"


def _read_jsonl(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: {_not_a_file(path)} (expected the {what} JSONL file)")
    records = []
    try:
        with path.open("rb") as handle:
            for lineno, line in text_lines(handle, path):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object")
                records.append((lineno, record))
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc
    return records


def load_gsm(path: str | Path) -> list[GSMQuestion]:
    """Read a GSM8K JSONL file (``{"question", "answer"}`` per line, answer ending ``#### N``)."""
    path = Path(path)
    questions = []
    for lineno, record in _read_jsonl(path, "GSM8K"):
        where = f"{path}:{lineno}"
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            raise DataError(f"{where}: expected string fields 'question' and 'answer'")
        questions.append(GSMQuestion(question, answer, gold_answer(answer, where), where))
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def sample_questions(
    questions: Sequence[GSMQuestion],
    max_examples: int | None = DEFAULT_MAX_EXAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[GSMQuestion]:
    """The evaluated subset: identical to ``random.seed(seed); random.sample(questions, n)``.

    None, or a number at least the size of the set, keeps every question in file order.
    """
    if max_examples is None or max_examples >= len(questions):
        return list(questions)
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    return random.Random(seed).sample(list(questions), max_examples)


def load_exemplars(path: str | Path) -> list[Exemplar]:
    """Read exemplars from JSON: ``{"exemplars": [...]}`` or a plain list of
    ``{"question", "cot_answer", "short_answer"}`` objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {_not_a_file(path)} (expected the exemplars JSON file)")
    data = read_json(path)
    items = data.get("exemplars") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty list, or an object with 'exemplars'")
    exemplars = []
    for index, item in enumerate(items):
        fields = ("question", "cot_answer", "short_answer")
        if not isinstance(item, dict) or not all(isinstance(item.get(f), str) for f in fields):
            raise DataError(
                f"{path}: exemplar {index} needs string fields question, cot_answer, short_answer"
            )
        exemplars.append(Exemplar(item["question"], item["cot_answer"], item["short_answer"]))
    return exemplars


_CALCULATOR = re.compile(r"<<[^>]*>>")


def _cot_from_train(answer: str) -> str:
    """A one-line chain of thought from a train answer, ending like the paper's exemplars."""
    reasoning = _CALCULATOR.sub("", answer.split("####")[0])
    steps = " ".join(line.strip() for line in reasoning.splitlines() if line.strip())
    return f"{steps} So the answer is {gold_answer(answer)}."


def exemplars_from_train(
    train_path: str | Path, n: int = N_EXEMPLARS, seed: int = DEFAULT_SEED
) -> tuple[list[Exemplar], list[str]]:
    """Draw `n` exemplars (``random.Random(seed).sample``) from a GSM8K train file.

    The chain of thought is the train answer without calculator annotations (``<<...>>``), on
    one line, followed by ``" So the answer is N."``; the short answer is N. Returns the
    exemplars and the ``path:line`` of each, so a run can report which it used.
    """
    train = load_gsm(train_path)
    if len(train) < n:
        raise DataError(f"{train_path}: {len(train)} questions, fewer than the {n} exemplars")
    chosen = random.Random(seed).sample(train, n)
    exemplars = [Exemplar(q.question, _cot_from_train(q.answer), q.gold) for q in chosen]
    return exemplars, [q.source for q in chosen]


def resolve_exemplars(
    exemplars_path: str | Path | None = None,
    train_path: str | Path | None = None,
    n: int = N_EXEMPLARS,
    seed: int = DEFAULT_SEED,
) -> ExemplarSource:
    """The exemplars file if given (first `n`), else `n` seeded draws from the train file."""
    if exemplars_path is not None:
        exemplars = load_exemplars(exemplars_path)
        if len(exemplars) < n:
            raise DataError(f"{exemplars_path}: {len(exemplars)} exemplars, need {n}")
        return ExemplarSource(exemplars[:n], f"{n} exemplars from {exemplars_path}")
    if train_path is not None:
        exemplars, sources = exemplars_from_train(train_path, n, seed)
        return ExemplarSource(
            exemplars, f"{n} exemplars sampled with seed {seed} from " + ", ".join(sources)
        )
    raise DataError(
        "GSM8K needs few-shot exemplars: pass an exemplars JSON file (the paper's 8 "
        "chain-of-thought exemplars, fields question/cot_answer/short_answer) or a GSM8K "
        "train JSONL file to sample them from"
    )


# ----------------------------------------------------------------------------------- prompts


def _demonstration(exemplar: Exemplar, mode: Mode, protocol: ProtocolName) -> str:
    if mode == "cot":
        return f"Question: {exemplar.question}\nAnswer: {exemplar.cot_answer}"
    if mode == "direct":
        label = "Quesion" if protocol == "paper" else "Question"
        return f"{label}: {exemplar.question}\nAnswer: {exemplar.short_answer}"
    raise ValueError(f"unknown mode {mode!r} (expected 'cot' or 'direct')")


def build_prompt(
    question: str, exemplars: Sequence[Exemplar], mode: Mode, protocol: ProtocolName
) -> str:
    """The chat-wrapped prompt for one question, ending in ``"<|assistant|>\\nAnswer:"``."""
    check_protocol(protocol)
    demos = "\n\n".join(_demonstration(e, mode, protocol) for e in exemplars)
    prefix = INSTRUCTION + demos + "\n\n"
    return chat_wrap(prefix + "Question: " + question.strip(), ANSWER_PREFIX)


# ----------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class GSMResult:
    """Exact-match accuracy and, per question, the extracted prediction and whether it matched."""

    accuracy: float
    correct: int
    total: int
    predictions: list[str | None] = field(default_factory=list)
    matches: list[bool] = field(default_factory=list)


def score(
    outputs: Sequence[str], questions: Sequence[GSMQuestion], protocol: ProtocolName = "clean"
) -> GSMResult:
    """Score model outputs, one per question, in the same order."""
    check_protocol(protocol)
    if len(outputs) != len(questions):
        raise DataError(f"{len(outputs)} outputs for {len(questions)} GSM8K questions")
    predictions: list[str | None] = []
    matches: list[bool] = []
    for output, question in zip(outputs, questions, strict=True):
        prediction = extract_answer(output, protocol)
        predictions.append(prediction)
        if protocol == "paper" and prediction is None:
            prediction = output  # open-instruct compares the whole output when it has no number
        matches.append(answers_match(prediction, question.gold, protocol))
    correct = sum(matches)
    return GSMResult(
        accuracy=correct / len(questions) if questions else 0.0,
        correct=correct,
        total=len(questions),
        predictions=predictions,
        matches=matches,
    )
