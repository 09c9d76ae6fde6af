"""BIG-Bench Hard Direct and CoT, as the Tulu paper runs it (open-instruct ``eval/bbh/run_eval.py``).

The protocol, for each of the 27 tasks:

1. 40 examples per task drawn with ``random.sample`` from a generator seeded with 42
   (`sample_examples`; see "Sampling order" below).
2. The 3-shot prompt is ``cot-prompts/{task}.txt`` without its first two lines (the canary and
   the ``-----`` separator). For Direct, every ``"Q: ..."`` block keeps its question and its
   answer becomes the text after the last ``"So the answer is"``: ``"Q: ...\\nA: False."``
   (`task_prompt`).
3. The user turn is ``task_prompt.strip() + "\\n\\nQ: " + input``, chat-wrapped with the answer
   prefix ``"A:"`` (`build_prompt`).
4. Greedy decoding, at most 512 new tokens, stop at ``"\\n\\n"`` (`GENERATION`).
5. The output is cut at the first ``"\\n\\n"`` (`postprocess`); the answer is the first match of
   ``So the answer is (.*?)\\.`` or else the whole cut output, stripped (`extract_answer`).
6. Exact match per example; the headline is the mean of the per-task accuracies (macro).

``protocol="paper"`` reproduces the paper's quirks, ``protocol="clean"`` fixes them:

- Sampling order. open-instruct seeds the global generator once and samples task after task in
  ``glob`` order, which is file-system order and so not reproducible across machines. Paper
  here: one ``random.Random(42)`` consumed across the tasks in sorted-name order (the closest
  reproducible reading). Clean: a fresh ``random.Random(42)`` per task, so a task's sample does
  not depend on which other tasks are loaded.
- Direct exemplars. open-instruct keeps the final period of "So the answer is X." in the
  exemplar (``"A: False."``), teaching the model to end a bare answer with a period that the
  answer regex then cannot use (no "So the answer is"). Clean drops that one period
  (``"A: False"``).
- Extraction. The paper's lazy regex stops at the first period, so ``"So the answer is 3.5."``
  yields ``"3"``, and an answer with no final period (``"So the answer is (B)"``) is not matched
  at all and the whole output becomes the answer. Clean takes the rest of the line after the
  first "So the answer is" and removes one trailing period; a bare output also loses one
  trailing period.
- Comparison. open-instruct scores with HF ``exact_match(ignore_case=True,
  ignore_punctuation=True)``: lowercase and delete every ASCII punctuation mark on both sides.
  That makes dyck_languages targets (all brackets) compare as their spaces only, so any closing
  sequence of the right length is right. Clean compares case-insensitively with whitespace runs
  collapsed, keeping punctuation.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tulu.errors import DataError
from tulu.eval.backends import Decoding
from tulu.eval.chat_wrap import ProtocolName, chat_wrap, check_protocol
from tulu.eval.files import read_json
from tulu.eval.grouped import check_grouped_outputs

__all__ = [
    "ANSWER_PREFIX",
    "DEFAULT_MAX_EXAMPLES",
    "DEFAULT_SEED",
    "GENERATION",
    "TASKS",
    "BBHExample",
    "BBHResult",
    "BBHTask",
    "TaskScore",
    "answers_match",
    "build_prompt",
    "extract_answer",
    "load_bbh",
    "postprocess",
    "sample_examples",
    "score",
    "task_prompt",
]

Mode = Literal["cot", "direct"]

ANSWER_PREFIX = "A:"
DEFAULT_MAX_EXAMPLES = 40
DEFAULT_SEED = 42
ANSWER_MARKER = "So the answer is"

#: The 27 BBH tasks, named as in the data files (``bbh/<task>.json``, ``cot-prompts/<task>.txt``).
TASKS: tuple[str, ...] = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
    "web_of_lies", "word_sorting",
)  # fmt: skip


#: Decoding fixed by the protocol (greedy), not tunable per model.
GENERATION = Decoding(max_tokens=512, stop=("\n\n",))


@dataclass(frozen=True)
class BBHExample:
    """One task example: the question text and the gold target."""

    input: str
    target: str
    source: str = ""  # "path#index"


@dataclass(frozen=True)
class BBHTask:
    """One task's examples (in file order) and the raw text of its CoT prompt file."""

    name: str
    examples: list[BBHExample]
    cot_prompt_file: str


# ----------------------------------------------------------------------------------- loading


def data_dir_base(root: Path) -> Path | None:
    """The directory holding ``bbh/`` and ``cot-prompts/`` under `root` (open-instruct's layout)."""
    for candidate in (root, root / "bbh"):
        if (candidate / "bbh").is_dir() and (candidate / "cot-prompts").is_dir():
            return candidate
    return None


def _read_examples(path: Path) -> list[BBHExample]:
    data = read_json(path)
    items = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected an object with a non-empty 'examples' list")
    examples = []
    for index, item in enumerate(items):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("input"), str)
            and isinstance(item.get("target"), str)
        ):
            raise DataError(f"{path}: example {index} needs string fields 'input' and 'target'")
        examples.append(BBHExample(item["input"], item["target"], f"{path}#{index}"))
    return examples


def _check_cot_prompt(path: Path, text: str) -> None:
    """Refuse a CoT prompt file without exemplars, or with one lacking ``"\\nA:"`` or "So the
    answer is": Direct prompts are cut at that marker and CoT outputs are read after it, so such
    a file would silently teach a model answers the scorer cannot find. Checked on loading, in
    both modes, so that the error names the file and line."""
    lineno, exemplars = 3, 0  # the first two lines (canary, separator) are not part of it
    for block in "".join(text.splitlines(keepends=True)[2:]).split("\n\n"):
        if block.startswith("Q:"):
            exemplars += 1
            if ANSWER_MARKER not in block or "\nA:" not in block:
                raise DataError(
                    f"{path}:{lineno}: exemplar lacks '\\nA:' or {ANSWER_MARKER!r}: {block[:80]!r}"
                )
        lineno += block.count("\n") + 2
    if not exemplars:
        raise DataError(f"{path}: no exemplars (blocks starting 'Q:' after the first two lines)")


def load_bbh(data_dir: str | Path, tasks: Sequence[str] = TASKS) -> dict[str, BBHTask]:
    """Read every task's examples and CoT prompt file.

    `data_dir` holds ``bbh/`` and ``cot-prompts/`` (open-instruct's ``data/eval/bbh``), or is
    its parent. Every missing file is reported in one DataError, so a partial download is
    diagnosed in one run.
    """
    root = Path(data_dir)
    base = data_dir_base(root)
    if base is None:
        raise DataError(
            f"BBH data not found: no directory with both bbh/ and cot-prompts/ among "
            f"{root}, {root / 'bbh'}"
        )
    missing = [
        rel
        for task in tasks
        for rel in (f"bbh/{task}.json", f"cot-prompts/{task}.txt")
        if not (base / rel).is_file()
    ]
    if missing:
        raise DataError(
            f"BBH data in {base} is incomplete: {len(missing)} file(s) missing: "
            + ", ".join(missing)
        )
    loaded = {}
    for task in tasks:
        prompt_path = base / "cot-prompts" / f"{task}.txt"
        try:
            prompt_text = prompt_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{prompt_path}: cannot read file: {exc}") from exc
        examples = _read_examples(base / "bbh" / f"{task}.json")
        _check_cot_prompt(prompt_path, prompt_text)
        loaded[task] = BBHTask(task, examples, prompt_text)
    return loaded


def sample_examples(
    tasks: Mapping[str, BBHTask],
    max_examples: int | None = DEFAULT_MAX_EXAMPLES,
    seed: int = DEFAULT_SEED,
    protocol: ProtocolName = "paper",
) -> dict[str, list[BBHExample]]:
    """The evaluated examples per task (see "Sampling order" in the module docstring).

    A task with at most `max_examples` examples (or `max_examples` None) keeps all of them in
    file order and, as in ``random.sample``'s caller in open-instruct, draws nothing.
    """
    check_protocol(protocol)
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    shared = random.Random(seed)
    sampled = {}
    for name in sorted(tasks):
        examples = list(tasks[name].examples)
        if max_examples is None or len(examples) <= max_examples:
            sampled[name] = examples
            continue
        rng = shared if protocol == "paper" else random.Random(seed)
        sampled[name] = rng.sample(examples, max_examples)
    return sampled


# ----------------------------------------------------------------------------------- prompts


def task_prompt(cot_prompt_file: str, mode: Mode, protocol: ProtocolName = "paper") -> str:
    """The 3-shot prompt of one task: the file minus its first two lines, Direct-converted."""
    check_protocol(protocol)
    text = "".join(cot_prompt_file.splitlines(keepends=True)[2:])
    if mode == "cot":
        return text
    if mode != "direct":
        raise ValueError(f"unknown mode {mode!r} (expected 'cot' or 'direct')")
    fields = []
    for block in text.split("\n\n"):
        if block.startswith("Q:"):
            if ANSWER_MARKER not in block or "\nA:" not in block:
                raise DataError(f"BBH exemplar lacks '\\nA:' or {ANSWER_MARKER!r}: {block[:80]!r}")
            answer = block.split(ANSWER_MARKER)[-1].strip()
            if protocol == "clean" and answer.endswith("."):
                answer = answer[:-1]
            block = block.split("\nA:")[0].strip() + "\nA: " + answer
        fields.append(block)
    return "\n\n".join(fields)


def build_prompt(prompt: str, example_input: str) -> str:
    """The chat-wrapped prompt for one example, ending in ``"<|assistant|>\\nA:"``.

    `prompt` is `task_prompt`'s result for the task and mode.
    """
    return chat_wrap(prompt.strip() + "\n\nQ: " + example_input, ANSWER_PREFIX)


# ----------------------------------------------------------------------------------- answers

_PAPER_ANSWER = re.compile(r"So the answer is (.*?)\.")
_CLEAN_ANSWER = re.compile(r"So the answer is(.*)")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def postprocess(output: str) -> str:
    """The output up to the first blank line (the stop sequence, in case the runner kept it)."""
    return output.split("\n\n", 1)[0]


def extract_answer(output: str, protocol: ProtocolName = "paper") -> str:
    """The answer in a raw model output (see the module docstring for the two protocols)."""
    check_protocol(protocol)
    text = postprocess(output)
    if protocol == "paper":
        match = _PAPER_ANSWER.search(text)
        return match.group(1).strip() if match else text.strip()
    match = _CLEAN_ANSWER.search(text)
    answer = match.group(1).strip() if match else text.strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def answers_match(prediction: str, target: str, protocol: ProtocolName = "paper") -> bool:
    """Whether an extracted answer equals the gold target under the protocol's comparison."""
    check_protocol(protocol)
    if protocol == "paper":
        return prediction.lower().translate(_PUNCTUATION) == target.lower().translate(_PUNCTUATION)
    return " ".join(prediction.lower().split()) == " ".join(target.lower().split())


# ----------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class TaskScore:
    """Correct / total for one task, with each example's extracted answer and whether it
    matched (kept so results.json can show every example's score)."""

    correct: int
    total: int
    predictions: list[str] = field(default_factory=list)
    matches: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class BBHResult:
    """Macro-averaged accuracy (every task weighs the same) plus a per-task table."""

    accuracy: float
    per_task: dict[str, TaskScore] = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, float | int]]:
        """Plain-dict form of `per_task`, for JSON output."""
        return {
            name: {"correct": s.correct, "total": s.total, "accuracy": s.accuracy}
            for name, s in self.per_task.items()
        }


def score(
    outputs: Mapping[str, Sequence[str]],
    examples: Mapping[str, Sequence[BBHExample]],
    protocol: ProtocolName = "paper",
) -> BBHResult:
    """Score raw outputs, per task in the order of `examples[task]`; every task needs outputs."""
    check_protocol(protocol)
    check_grouped_outputs(outputs, examples, benchmark="BBH", group="task", items="examples")
    per_task = {}
    for name, rows in examples.items():
        predictions = [extract_answer(o, protocol) for o in outputs[name]]
        matches = [
            answers_match(p, row.target, protocol) for p, row in zip(predictions, rows, strict=True)
        ]
        per_task[name] = TaskScore(sum(matches), len(rows), predictions, matches)
    accuracy = sum(s.accuracy for s in per_task.values()) / len(per_task) if per_task else 0.0
    return BBHResult(accuracy, per_task)
