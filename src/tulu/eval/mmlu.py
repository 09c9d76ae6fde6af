"""MMLU 0-shot and 5-shot, as the Tulu paper runs it (open-instruct ``eval/mmlu/run_eval.py``).

The protocol, for each of the 57 subjects and each test question:

1. Header ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``.
2. The first ``k`` dev questions (k = 0 or 5) as exemplars, each
   ``"{question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n"``.
3. The test question in the same format, ending in ``"Answer:"`` with no letter.
4. Chat-wrap ``prompt.strip()`` with the answer prefix ``"The answer is:"`` (`tulu.eval.chat_wrap`).
5. While the chat-wrapped prompt is longer than 2,048 tokens, drop exemplars from the end.
6. The prediction is the argmax of the next-token log-probabilities over four candidate token
   ids, one per letter; accuracy is micro-averaged over all 14,042 test questions.

``protocol="paper"`` reproduces the paper's quirks, ``protocol="clean"`` fixes them:

- Subject spacing. open-instruct builds the subject by prefixing every "_"-separated word with a
  space and concatenating them (``" abstract algebra"``), then formats it after ``"about "``, so
  the header reads ``"about  abstract algebra."`` (two spaces). Clean: ``"about abstract
  algebra."``.
- Candidate tokens. The paper scores the tokens of ``"A"``..``"D"`` encoded without a leading
  space. After ``"The answer is:"`` the natural BPE continuation is ``" A"`` (a different
  token), so the paper compares the probabilities of tokens the model rarely emits there.
  Clean scores ``" A"``..``" D"``.

Both protocols share everything else. Not reproduced: open-instruct reads the CSVs with pandas,
which turns numeric-looking answer choices into numbers (``"1.50"`` -> ``1.5``) and strings
such as ``"None"`` / ``"NA"`` into NaN; here the CSV fields are used verbatim. Also, when even
the 0-shot prompt is too long, open-instruct's loop goes on to k = -1 (which means "all dev
questions"); here the exemplars stop at 0 and the over-long prompt is returned as is.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tulu.errors import DataError
from tulu.eval.chat_wrap import ProtocolName, chat_wrap

__all__ = [
    "ANSWER_PREFIX",
    "LETTERS",
    "MAX_PROMPT_TOKENS",
    "SUBJECTS",
    "MMLUQuestion",
    "MMLUResult",
    "SubjectScore",
    "answer_token_ids",
    "build_prompt",
    "build_prompt_and_shots",
    "format_question",
    "format_subject",
    "load_mmlu",
    "pick_answer",
    "score",
]


LETTERS = ("A", "B", "C", "D")
ANSWER_PREFIX = "The answer is:"
#: open-instruct keeps every MMLU prompt at or under this many tokens (chat-wrapped).
MAX_PROMPT_TOKENS = 2048

#: The 57 MMLU subjects, named as in the data files (``<subject>_{dev,test}.csv``).
SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip

SPLITS = ("dev", "test")


class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class MMLUQuestion:
    """One CSV row: the question, its four choices, the gold letter, and where it came from."""

    question: str
    choices: tuple[str, str, str, str]
    answer: str
    source: str = ""  # "path:line", for error messages and debugging


# ----------------------------------------------------------------------------------- loading


def split_dirs(root: Path) -> Path | None:
    """The directory holding ``dev/`` and ``test/`` under `root`, trying the known layouts."""
    for candidate in (root, root / "data", root / "mmlu", root / "mmlu" / "data"):
        if all((candidate / split).is_dir() for split in SPLITS):
            return candidate
    return None


def _read_csv(path: Path) -> list[MMLUQuestion]:
    rows: list[MMLUQuestion] = []
    try:
        # utf-8-sig: a BOM (Excel's CSV export) would otherwise start the first question
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            start = 1
            for record in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if not record:
                    continue
                if len(record) != 6:
                    raise DataError(
                        f"{where}: expected 6 fields (question, A, B, C, D, answer), "
                        f"got {len(record)}"
                    )
                answer = record[5].strip()
                if answer not in LETTERS:
                    raise DataError(f"{where}: answer must be one of A/B/C/D, got {record[5]!r}")
                choices = (record[1], record[2], record[3], record[4])
                rows.append(MMLUQuestion(record[0], choices, answer, where))
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV near line {start}: {exc}") from exc
    return rows


def load_mmlu(
    data_dir: str | Path, subjects: Sequence[str] = SUBJECTS
) -> dict[str, dict[str, list[MMLUQuestion]]]:
    """Read ``{subject: {"dev": [...], "test": [...]}}`` for every subject.

    `data_dir` may be the directory holding ``dev/`` and ``test/``, or a parent of it in
    open-instruct's layout (``DIR/mmlu/{dev,test}``) or the Hendrycks tarball's
    (``DIR/mmlu/data/{dev,test}``, ``DIR/data/{dev,test}``). Every missing file is reported in
    one DataError, so a partial download is diagnosed in one run rather than one file at a time.
    """
    root = Path(data_dir)
    base = split_dirs(root)
    if base is None:
        looked = ", ".join(
            str(c) for c in (root, root / "data", root / "mmlu", root / "mmlu" / "data")
        )
        raise DataError(
            f"MMLU data not found: no directory with both dev/ and test/ among {looked}"
        )
    missing = [
        f"{split}/{subject}_{split}.csv"
        for subject in subjects
        for split in SPLITS
        if not (base / split / f"{subject}_{split}.csv").is_file()
    ]
    if missing:
        raise DataError(
            f"MMLU data in {base} is incomplete: {len(missing)} file(s) missing: "
            + ", ".join(missing)
        )
    data: dict[str, dict[str, list[MMLUQuestion]]] = {}
    for subject in subjects:
        data[subject] = {
            split: _read_csv(base / split / f"{subject}_{split}.csv") for split in SPLITS
        }
        if not data[subject]["test"]:
            raise DataError(f"{base / 'test' / f'{subject}_test.csv'}: no questions")
    return data


# ----------------------------------------------------------------------------------- prompts


def format_subject(subject: str, protocol: ProtocolName) -> str:
    """The subject as it appears after "about " in the header (see the module docstring)."""
    words = subject.split("_")
    if protocol == "paper":
        return "".join(" " + word for word in words)
    if protocol == "clean":
        return " ".join(words)
    raise ValueError(f"unknown protocol {protocol!r} (expected 'paper' or 'clean')")


def format_question(row: MMLUQuestion, include_answer: bool) -> str:
    """One question block; exemplars carry their letter, the test question ends at "Answer:"."""
    text = row.question
    for letter, choice in zip(LETTERS, row.choices, strict=True):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {row.answer}\n\n"
    return text


def _header(subject: str, protocol: ProtocolName) -> str:
    return (
        "The following are multiple choice questions (with answers) about "
        f"{format_subject(subject, protocol)}.\n\n"
    )


def _wrapped(
    subject: str,
    dev_rows: Sequence[MMLUQuestion],
    test_row: MMLUQuestion,
    k: int,
    protocol: ProtocolName,
) -> str:
    prompt = _header(subject, protocol)
    prompt += "".join(format_question(row, include_answer=True) for row in dev_rows[:k])
    prompt += format_question(test_row, include_answer=False)
    return chat_wrap(prompt.strip(), ANSWER_PREFIX)


def build_prompt_and_shots(
    subject: str,
    dev_rows: Sequence[MMLUQuestion],
    test_row: MMLUQuestion,
    k: int,
    tokenizer: _Encoder | None,
    protocol: ProtocolName,
    max_length: int = MAX_PROMPT_TOKENS,
) -> tuple[str, int]:
    """The chat-wrapped prompt and the number of exemplars it kept.

    Exemplars are dropped from the end while the chat-wrapped prompt is longer than
    `max_length` tokens, because the paper's models have a 2,048-token context and the answer
    token must fit. With `tokenizer` None no length check is made (only sensible for k = 0).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > len(dev_rows):
        raise DataError(
            f"MMLU {subject}: asked for {k} exemplars but the dev set "
            f"(dev/{subject}_dev.csv) has {len(dev_rows)}"
        )
    prompt = _wrapped(subject, dev_rows, test_row, k, protocol)
    if tokenizer is None:
        return prompt, k
    while k > 0 and len(tokenizer.encode(prompt)) > max_length:
        k -= 1
        prompt = _wrapped(subject, dev_rows, test_row, k, protocol)
    return prompt, k


def build_prompt(
    subject: str,
    dev_rows: Sequence[MMLUQuestion],
    test_row: MMLUQuestion,
    k: int,
    tokenizer: _Encoder | None,
    protocol: ProtocolName,
    max_length: int = MAX_PROMPT_TOKENS,
) -> str:
    """The chat-wrapped prompt for one test question (see `build_prompt_and_shots`)."""
    return build_prompt_and_shots(subject, dev_rows, test_row, k, tokenizer, protocol, max_length)[
        0
    ]


# ----------------------------------------------------------------------------------- scoring


def answer_token_ids(tokenizer: _Encoder, protocol: ProtocolName) -> list[int]:
    """The candidate token ids for A, B, C, D, in that order.

    paper: the first token of ``"A"``..``"D"`` (no leading space); clean: of ``" A"``..``" D"``.
    """
    if protocol == "paper":
        texts = list(LETTERS)
    elif protocol == "clean":
        texts = [" " + letter for letter in LETTERS]
    else:
        raise ValueError(f"unknown protocol {protocol!r} (expected 'paper' or 'clean')")
    ids = []
    for text in texts:
        encoded = tokenizer.encode(text)
        if not encoded:
            raise DataError(f"tokenizer encodes the answer {text!r} to no tokens")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise DataError(f"answer candidates {texts} do not map to distinct tokens: {ids}")
    return ids


def pick_answer(next_token_logprobs: Sequence[float], candidate_ids: Sequence[int]) -> str:
    """The letter whose candidate token has the highest log-probability (first one on ties).

    `next_token_logprobs` is indexed by token id (a list, array or 1-D tensor all work).
    """
    values = [float(next_token_logprobs[i]) for i in candidate_ids]
    return LETTERS[max(range(len(values)), key=values.__getitem__)]


@dataclass(frozen=True)
class SubjectScore:
    """Correct / total for one subject."""

    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class MMLUResult:
    """Micro-averaged accuracy (every test question weighs the same) plus a per-subject table.

    `missing` counts test questions with no prediction; they are scored as wrong, so a partial
    run cannot report an inflated accuracy.
    """

    accuracy: float
    correct: int
    total: int
    missing: int
    per_subject: dict[str, SubjectScore] = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, float | int]]:
        """Plain-dict form of `per_subject`, for JSON output."""
        return {
            name: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy}
            for name, s in self.per_subject.items()
        }


def score(
    predictions: Mapping[tuple[str, int], str],
    data: Mapping[str, Mapping[str, Sequence[MMLUQuestion]]],
) -> MMLUResult:
    """Score letters keyed by (subject, index into ``data[subject]["test"]``)."""
    for (subject, index), letter in predictions.items():
        if subject not in data:
            raise DataError(f"prediction for unknown MMLU subject {subject!r}")
        if not 0 <= index < len(data[subject]["test"]):
            raise DataError(
                f"prediction for {subject} question {index}: out of range "
                f"(the test set has {len(data[subject]['test'])} questions)"
            )
        if letter not in LETTERS:
            raise DataError(f"prediction for {subject} question {index}: {letter!r} is not A-D")
    per_subject: dict[str, SubjectScore] = {}
    correct = total = missing = 0
    for subject, splits in data.items():
        rows = splits["test"]
        right = 0
        for index, row in enumerate(rows):
            predicted = predictions.get((subject, index))
            if predicted is None:
                missing += 1
            elif predicted == row.answer:
                right += 1
        per_subject[subject] = SubjectScore(right, len(rows))
        correct += right
        total += len(rows)
    return MMLUResult(
        accuracy=correct / total if total else 0.0,
        correct=correct,
        total=total,
        missing=missing,
        per_subject=per_subject,
    )
