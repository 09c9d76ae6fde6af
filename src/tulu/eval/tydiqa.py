"""TyDi QA gold passage (GP) and closed book (CB), as the Tulu paper runs it
(open-instruct ``eval/tydiqa/run_eval.py``).

The protocol, over the 9 GoldP languages:

1. Questions come from ``tydiqa-goldp-v1.1-dev.json`` (SQuAD layout); the language is the id
   up to its first ``"-"``. 100 per language are drawn (seed 42, languages in sorted order).
2. One exemplar per language is drawn from that language's train data (`sample_tydiqa`).
3. Passages (test and exemplar) longer than 512 tokens are cut to their first 512 tokens and
   decoded back to text (`truncate_passage`). Closed book drops the passage.
4. With the language's labels P, Q, A and instruction I (``with_context`` for GP,
   ``without_context`` for CB; `load_templates`), the user turn is::

       I + "\\n\\n"
       + P + " " + exemplar passage + "\\n" + Q + " " + exemplar question + "\\n"
         + A + " " + exemplar's first answer + "\\n\\n"
       + P + " " + passage + "\\n" + Q + " " + question + "\\n"

   (closed book: the same without the ``P + " " + passage + "\\n"`` parts), chat-wrapped with
   the answer prefix A (``"Answer:"`` in English) (`build_prompt`).
5. Greedy decoding, at most 50 new tokens, stop at ``"\\n"`` (`GENERATION`).
6. SQuAD v1.1 F1 and exact match per question (max over the gold answers), averaged per
   language, then over languages (macro) (`score`). Scores are fractions in [0, 1].

``protocol="paper"`` reproduces the paper's quirks, ``protocol="clean"`` fixes them:

- Sampling. open-instruct seeds the global generator once, samples 100 questions per language
  in sorted order, then goes on with the same generator to draw the exemplars, language after
  language. So a language's exemplar depends on the sizes of every earlier language's pools;
  paper reproduces this and therefore needs train data for every dev language. Clean uses a
  fresh ``random.Random(42)`` per language for the questions and another for the exemplar,
  so any subset of languages gives the same draws.
- Trailing newline. The paper's user turn ends in ``"\\n"``, so a blank line precedes
  ``<|assistant|>``; clean strips it. Clean also strips the passage and the question (some
  passages start with a space, which gives ``"Passage:  text"``).
- Truncation. Decoding the first 512 tokens can split a multi-byte character and leave U+FFFD
  at the end; clean removes it.

Both protocols score alike. SQuAD normalisation (lowercase, drop ASCII punctuation, drop the
English articles a/an/the, split on whitespace) is applied to all languages, as in the paper;
punctuation outside ASCII (e.g. the Bengali danda, Arabic comma) is kept.
"""

from __future__ import annotations

import collections
import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

from tulu.errors import DataError
from tulu.eval.backends import Decoding
from tulu.eval.chat_wrap import ProtocolName, chat_wrap, check_protocol
from tulu.eval.files import read_json
from tulu.eval.grouped import check_grouped_outputs

__all__ = [
    "DEFAULT_MAX_EXAMPLES",
    "DEFAULT_SEED",
    "GENERATION",
    "LANGUAGES",
    "MAX_PASSAGE_TOKENS",
    "LanguageScore",
    "Template",
    "TyDiExample",
    "TyDiResult",
    "build_prompt",
    "exact_match",
    "f1",
    "load_dev",
    "load_templates",
    "load_train",
    "normalize_answer",
    "postprocess",
    "sample_tydiqa",
    "score",
    "truncate_passage",
]

Mode = Literal["gp", "cb"]

DEFAULT_MAX_EXAMPLES = 100
DEFAULT_SEED = 42
MAX_PASSAGE_TOKENS = 512
DEV_FILE = "tydiqa-goldp-v1.1-dev.json"
TRAIN_FILE = "tydiqa-goldp-v1.1-train.json"

#: The 9 TyDi QA GoldP languages, sorted.
LANGUAGES: tuple[str, ...] = (
    "arabic", "bengali", "english", "finnish", "indonesian", "korean", "russian", "swahili",
    "telugu",
)  # fmt: skip


#: Decoding fixed by the protocol (greedy), not tunable per model.
GENERATION = Decoding(max_tokens=50, stop=("\n",))


@dataclass(frozen=True)
class TyDiExample:
    """One question with its passage and gold answers (every annotator's, in file order)."""

    id: str
    language: str
    context: str
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Template:
    """One language's instruction and labels; `passage` is None in the closed-book section."""

    instruction: str
    question: str
    answer: str
    passage: str | None = None


class _Codec(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _check_mode(mode: str) -> None:
    if mode not in ("gp", "cb"):
        raise ValueError(f"unknown mode {mode!r} (expected 'gp' or 'cb')")


# ----------------------------------------------------------------------------------- loading


def _read_squad(path: Path) -> list[TyDiExample]:
    """Every question of a SQuAD-layout file, in file order.

    Every field is type-checked here, with its place in the file (``data[0].paragraphs[3]
    .qas[1]``) in the error: a bad value would otherwise fail later, in tokenization or
    scoring, with no hint of where it came from."""
    data = read_json(path)
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"{path}: expected an object with a 'data' list (SQuAD layout)")
    examples = []
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: data[{a}]: expected an object with a 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not (
                isinstance(paragraph, dict)
                and isinstance(paragraph.get("context"), str)
                and isinstance(paragraph.get("qas"), list)
            ):
                raise DataError(f"{where}: expected a string 'context' and a 'qas' list")
            for q, qa in enumerate(paragraph["qas"]):
                if not (
                    isinstance(qa, dict)
                    and isinstance(qa.get("id"), str)
                    and isinstance(qa.get("question"), str)
                    and isinstance(qa.get("answers"), list)
                ):
                    raise DataError(
                        f"{where}.qas[{q}]: expected string 'id' and 'question' and an "
                        "'answers' list"
                    )
                qid = qa["id"]
                texts = [x.get("text") if isinstance(x, dict) else None for x in qa["answers"]]
                if not all(isinstance(text, str) for text in texts):
                    raise DataError(f"{where}.qas[{q}] ({qid}): every answer needs a string 'text'")
                if not texts:
                    raise DataError(f"{path}: question {qid} has no answers")
                language = qid.split("-")[0]
                examples.append(
                    TyDiExample(qid, language, paragraph["context"], qa["question"], tuple(texts))
                )
    return examples


def _by_language(examples: Sequence[TyDiExample]) -> dict[str, list[TyDiExample]]:
    grouped: dict[str, list[TyDiExample]] = collections.defaultdict(list)
    for example in examples:
        grouped[example.language].append(example)
    return {language: grouped[language] for language in sorted(grouped)}


def _base_dir(root: Path) -> Path:
    """`root` or its ``tydiqa/`` child, whichever holds the dev file (root when neither)."""
    for candidate in (root, root / "tydiqa"):
        if (candidate / DEV_FILE).is_file():
            return candidate
    return root


def load_dev(data_dir: str | Path) -> dict[str, list[TyDiExample]]:
    """The dev questions grouped by language (sorted), in file order within a language.

    `data_dir` holds ``tydiqa-goldp-v1.1-dev.json`` or is the parent of a ``tydiqa/`` that does.
    """
    root = Path(data_dir)
    base = _base_dir(root)
    path = base / DEV_FILE
    if not path.is_file():
        raise DataError(f"TyDi QA dev file not found: {root / DEV_FILE} (or {root}/tydiqa/)")
    grouped = _by_language(_read_squad(path))
    if not grouped:
        raise DataError(f"{path}: no questions")
    return grouped


def load_train(
    data_dir: str | Path, languages: Sequence[str] = LANGUAGES
) -> dict[str, list[TyDiExample]]:
    """Train questions for `languages`, for the 1-shot exemplars.

    Reads open-instruct's combined ``tydiqa-goldp-v1.1-train.json`` when present, else the
    per-language ``train/<language>_tydiqa_train.json`` files (a split of the combined file
    that keeps the order within each language). Every missing file or language is reported in
    one DataError.
    """
    base = _base_dir(Path(data_dir))
    combined = base / TRAIN_FILE
    if combined.is_file():
        grouped = _by_language(_read_squad(combined))
        missing = [lang for lang in languages if not grouped.get(lang)]
        if missing:
            raise DataError(f"{combined}: no train questions for {', '.join(missing)}")
        return {lang: grouped[lang] for lang in languages}
    paths = {lang: base / "train" / f"{lang}_tydiqa_train.json" for lang in languages}
    missing_files = [str(p) for p in paths.values() if not p.is_file()]
    if missing_files:
        raise DataError(
            f"TyDi QA train data incomplete: no {combined}, and {len(missing_files)} "
            "per-language file(s) missing: " + ", ".join(missing_files)
        )
    train = {}
    for lang, path in paths.items():
        rows = [e for e in _read_squad(path) if e.language == lang]
        if not rows:
            raise DataError(f"{path}: no {lang} questions")
        train[lang] = rows
    return train


def load_templates(path: str | Path | None = None) -> dict[str, dict[str, Template]]:
    """``{"gp": {language: Template}, "cb": {...}}`` from a templates JSON file.

    The layout is open-instruct's: ``with_context`` / ``without_context`` sections mapping each
    language to ``instruction``, ``question``, ``answer`` (and ``passage`` with context). None
    loads the project's own templates (``tulu/eval/templates/tydiqa.json``).
    """
    if path is None:
        resource = resources.files("tulu.eval").joinpath("templates/tydiqa.json")
        where = str(resource)
        try:
            data = json.loads(resource.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{where}: cannot load the packaged templates: {exc}") from exc
    else:
        where = str(path)
        data = read_json(Path(path))
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object")
    result: dict[str, dict[str, Template]] = {}
    for mode, section in (("gp", "with_context"), ("cb", "without_context")):
        entries = data.get(section)
        if not isinstance(entries, dict) or not entries:
            raise DataError(f"{where}: missing or empty {section!r} section")
        keys = (
            ("instruction", "passage", "question", "answer")
            if mode == "gp"
            else ("instruction", "question", "answer")
        )
        templates = {}
        for lang, entry in entries.items():
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in keys):
                raise DataError(f"{where}: {section}.{lang} needs string fields {', '.join(keys)}")
            templates[lang] = Template(
                entry["instruction"], entry["question"], entry["answer"], entry.get("passage")
            )
        result[mode] = templates
    return result


def sample_tydiqa(
    dev: Mapping[str, Sequence[TyDiExample]],
    train: Mapping[str, Sequence[TyDiExample]] | None = None,
    max_examples: int | None = DEFAULT_MAX_EXAMPLES,
    n_shot: int = 1,
    seed: int = DEFAULT_SEED,
    protocol: ProtocolName = "paper",
) -> tuple[dict[str, list[TyDiExample]], dict[str, list[TyDiExample]]]:
    """The evaluated questions and the exemplars, both keyed by language (sorted).

    A language with at most `max_examples` questions keeps them all in file order. With
    `train` None (or `n_shot` 0) there are no exemplars. Paper draws reproduce open-instruct
    only when `dev` and `train` hold all 9 languages (see the module docstring).
    """
    check_protocol(protocol)
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    if n_shot < 0:
        raise ValueError(f"n_shot must be >= 0, got {n_shot}")
    languages = sorted(dev)
    shared = random.Random(seed)
    questions = {}
    for lang in languages:
        rows = list(dev[lang])
        if max_examples is not None and len(rows) > max_examples:
            rng = shared if protocol == "paper" else random.Random(seed)
            rows = rng.sample(rows, max_examples)
        questions[lang] = rows
    exemplars: dict[str, list[TyDiExample]] = {lang: [] for lang in languages}
    if train is None or n_shot == 0:
        return questions, exemplars
    missing = [lang for lang in languages if not train.get(lang)]
    if missing:
        raise DataError(
            f"TyDi QA: the dev questions include {', '.join(missing)}, for which the train "
            f"data has no questions to draw exemplars from (it has: "
            f"{', '.join(sorted(lang for lang in train if train[lang])) or 'none'})"
        )
    for lang in languages:
        pool = list(train[lang])
        if len(pool) < n_shot:
            raise DataError(f"TyDi QA {lang}: {len(pool)} train questions, need {n_shot}")
        rng = shared if protocol == "paper" else random.Random(seed)
        exemplars[lang] = rng.sample(pool, n_shot)
    return questions, exemplars


# ----------------------------------------------------------------------------------- prompts


def truncate_passage(
    text: str,
    tokenizer: _Codec,
    max_tokens: int = MAX_PASSAGE_TOKENS,
    protocol: ProtocolName = "paper",
) -> str:
    """`text` cut to its first `max_tokens` tokens and decoded back; unchanged when it fits.

    The models' context is 2,048 tokens, and a GP prompt holds two passages.
    """
    check_protocol(protocol)
    ids = tokenizer.encode(text)
    if len(ids) <= max_tokens:
        return text
    cut = tokenizer.decode(ids[:max_tokens])
    return cut.rstrip("\ufffd") if protocol == "clean" else cut


def _block(example: TyDiExample, template: Template, mode: Mode, protocol: ProtocolName) -> str:
    """Passage (GP only) and question lines, each ending in "\\n"."""
    context, question = example.context, example.question
    if protocol == "clean":
        context, question = context.strip(), question.strip()
    text = ""
    if mode == "gp":
        text += f"{template.passage} {context}\n"
    return text + f"{template.question} {question}\n"


def build_prompt(
    example: TyDiExample,
    exemplars: Sequence[TyDiExample],
    templates: Mapping[str, Mapping[str, Template]],
    mode: Mode,
    protocol: ProtocolName = "paper",
) -> str:
    """The chat-wrapped prompt for one question, ending in the language's answer label.

    Passages must already be truncated (`truncate_passage`). The exemplar answer is its first
    gold answer, as in open-instruct.
    """
    check_protocol(protocol)
    _check_mode(mode)
    template = templates[mode].get(example.language)
    if template is None:
        raise DataError(f"TyDi QA templates have no {mode} entry for {example.language!r}")
    prompt = template.instruction + "\n\n"
    if exemplars:
        demos = [
            _block(e, template, mode, protocol) + f"{template.answer} {e.answers[0]}"
            for e in exemplars
        ]
        prompt += "\n\n".join(demos) + "\n\n"
    prompt += _block(example, template, mode, protocol)
    if protocol == "clean":
        prompt = prompt.rstrip("\n")
    return chat_wrap(prompt, template.answer)


# ----------------------------------------------------------------------------------- scoring

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation, articles, extra whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1_one(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching gold answer."""
    return max((_f1_one(prediction, g) for g in golds), default=0.0)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in golds))


def postprocess(output: str) -> str:
    """The output up to its first newline (the stop sequence), stripped."""
    return output.split("\n", 1)[0].strip()


@dataclass(frozen=True)
class LanguageScore:
    """Mean F1 and exact match for one language, and each question's F1 and exact match
    (kept so results.json can show every question's score)."""

    f1: float
    exact_match: float
    total: int
    per_question_f1: list[float] = field(default_factory=list)
    per_question_exact_match: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TyDiResult:
    """F1 and exact match averaged over languages (every language weighs the same)."""

    f1: float
    exact_match: float
    per_language: dict[str, LanguageScore] = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, float | int]]:
        """Plain-dict form of `per_language`, for JSON output."""
        return {
            lang: {"f1": s.f1, "exact_match": s.exact_match, "total": s.total}
            for lang, s in self.per_language.items()
        }


def score(
    outputs: Mapping[str, Sequence[str]], questions: Mapping[str, Sequence[TyDiExample]]
) -> TyDiResult:
    """Score raw outputs, per language in the order of `questions[language]`."""
    check_grouped_outputs(
        outputs, questions, benchmark="TyDi QA", group="language", items="questions"
    )
    per_language = {}
    for lang, rows in questions.items():
        answers = [postprocess(o) for o in outputs[lang]]
        f1s = [f1(a, row.answers) for a, row in zip(answers, rows, strict=True)]
        ems = [exact_match(a, row.answers) for a, row in zip(answers, rows, strict=True)]
        n = len(rows)
        per_language[lang] = LanguageScore(
            sum(f1s) / n if n else 0.0, sum(ems) / n if n else 0.0, n, f1s, ems
        )
    count = len(per_language)
    return TyDiResult(
        f1=sum(s.f1 for s in per_language.values()) / count if count else 0.0,
        exact_match=sum(s.exact_match for s in per_language.values()) / count if count else 0.0,
        per_language=per_language,
    )
