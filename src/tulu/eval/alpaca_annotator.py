"""AlpacaFarm auto-annotators: the judge configuration the paper's AlpacaFarm figure used.

The model card's "AlpacaFarm vs Davinci-003" number was judged by AlpacaFarm's
``greedy_gpt4`` annotator, described by a ``configs.yaml`` next to two prompt files::

    greedy_gpt4:
      prompt_templates:
        with_inputs: "annotators/greedy_gpt4/chatml_b5_with_inputs.txt"
        without_inputs: "annotators/greedy_gpt4/chatml_b5_without_inputs.txt"
      decoder_kwargs: {model_name: "gpt-4-0314", max_tokens: 250, temperature: 0}
      outputs_to_match: {1: '(?:^|\\n) ?Output \\(a\\)', 2: '(?:^|\\n) ?Output \\(b\\)'}
      batch_size: 5

`Annotator.load` reads such a file (or the directory holding it) and reproduces how AlpacaFarm
turns comparisons into requests and answers into preferences:

- Examples with an input use the ``with_inputs`` template (``{instruction}`` and ``{input}``
  apart), the others ``without_inputs``. The comparisons are shuffled (seeded here; AlpacaFarm
  left the seed unset), those without an input come first, and each group is cut into batches
  of ``batch_size``, the last one padded with AlpacaFarm's dummy example (``1+1=`` answered
  ``2`` and ``3``), whose verdict is discarded.
- The k-th occurrence of each placeholder is filled with the k-th example of the batch, so a
  template must hold every placeholder exactly ``batch_size`` times.
- The prompt is ChatML text (``<|im_start|>role ... <|im_end|>``) and is sent as chat
  messages, as AlpacaFarm's decoder did for chat models (`chatml_messages`).
- The answer is scanned for the ``outputs_to_match`` patterns in order of position; a batch
  whose answer does not give exactly ``batch_size`` verdicts gets none (AlpacaFarm set all of
  them to NaN), and those examples are left out of the win rate.

The output order of each comparison (which output is ``(a)``) is decided by the caller's
seeded coin (`tulu.eval.alpaca_farm.model_positions`); AlpacaFarm seeded it with Python's
``hash()`` of the instruction, which changes from one process to the next.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tulu.errors import DataError

__all__ = [
    "PLACEHOLDERS",
    "Annotator",
    "Comparison",
    "JudgeRequest",
    "chatml_messages",
    "fill_batch",
    "parse_batched",
]

#: The fields an annotator template may use: AlpacaFarm's example columns.
PLACEHOLDERS = ("instruction", "input", "output_1", "output_2")
_REQUIRED = ("instruction", "output_1", "output_2")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_ANY_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: AlpacaFarm's padding example for the last, short batch.
PADDING = {"instruction": "1+1=", "input": "", "output_1": "2", "output_2": "3"}

_START, _END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class Comparison:
    """One example as the judge sees it: the outputs already in the order they are shown."""

    instruction: str
    input: str
    output_1: str
    output_2: str

    def field(self, name: str) -> str:
        return getattr(self, name)


@dataclass(frozen=True)
class JudgeRequest:
    """One request to the judge and the comparisons it decides, in prompt order."""

    messages: list[dict[str, str]]
    indices: tuple[int, ...]  # positions in the caller's list of comparisons; padding excluded


def chatml_messages(text: str, where: str = "prompt") -> list[dict[str, str]]:
    """Chat messages from ChatML text: one per ``<|im_start|>ROLE\\n...<|im_end|>`` block.

    Role and content are stripped, as AlpacaFarm's decoder did. A role line such as
    ``system name=example_user`` becomes role ``system`` with ``name`` set (OpenAI's way of
    marking few-shot turns). Text outside the blocks is ignored.
    """
    blocks = text.split(_START)[1:]
    if not blocks:
        raise DataError(f"{where}: no ChatML message (expected {_START}ROLE ... {_END})")
    messages = []
    for number, block in enumerate(blocks, start=1):
        head, _, rest = block.partition("\n")
        words = head.split()
        if not words:
            raise DataError(f"{where}: ChatML message {number} has no role")
        role, params = words[0], words[1:]
        message = {"role": role, "content": rest.split(_END, 1)[0].strip()}
        for param in params:
            key, sep, value = param.partition("=")
            if not sep or not key:
                raise DataError(f"{where}: ChatML message {number}: bad role parameter {param!r}")
            message[key] = value
        messages.append(message)
    return messages


def fill_batch(template: str, batch: Sequence[Comparison]) -> str:
    """The template with its k-th ``{field}`` filled from ``batch[k]``, in one pass.

    One regex pass (not chained ``str.replace``) so that text inside an instruction or output
    that happens to read ``{output_2}`` is never substituted itself.
    """
    seen: Counter[str] = Counter()

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        k = seen[name]
        seen[name] += 1
        return batch[k].field(name)

    return _PLACEHOLDER.sub(value, template)


def parse_batched(answer: str, patterns: dict[int, re.Pattern[str]]) -> list[int]:
    """The verdicts in `answer`, in the order they appear: the key of the earliest-matching
    pattern, then the search goes on after that match (AlpacaFarm's batched parser)."""
    verdicts = []
    rest = answer
    while True:
        found = [(m.start(), m.end(), key) for key, p in patterns.items() if (m := p.search(rest))]
        if not found:
            return verdicts
        _, end, key = min(found)
        verdicts.append(key)
        rest = rest[end:]


@dataclass(frozen=True)
class Annotator:
    """An AlpacaFarm auto-annotator: batched ChatML prompts, regex-parsed verdicts."""

    name: str
    source: str  # the configs.yaml it was read from, for messages
    templates: dict[str, str]  # "with_inputs" and "without_inputs"
    batch_size: int
    patterns: dict[int, re.Pattern[str]]  # verdict (1 or 2) -> pattern
    default_model: str
    max_tokens: int
    temperature: float

    # A batch with the wrong number of verdicts decides none of its examples; AlpacaFarm left
    # them out of the win rate rather than counting them as ties.
    unparsable = "drop"

    @classmethod
    def load(cls, path: str | Path) -> Annotator:
        """Read an annotator's ``configs.yaml`` (or the directory holding one).

        Template paths in the file are relative to AlpacaFarm's package; a path is tried as
        given, relative to the config's directory, and then as its bare file name there, so the
        released directory works wherever it is copied.
        """
        config_path = Path(path)
        if config_path.is_dir():
            config_path = config_path / "configs.yaml"
        if not config_path.is_file():
            raise DataError(f"{config_path}: annotator config not found")
        try:
            data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataError(f"{config_path}: cannot read annotator config: {exc}") from None
        if not isinstance(data, dict) or not data:
            raise DataError(f"{config_path}: expected a mapping of annotator name -> settings")
        if len(data) != 1:
            raise DataError(
                f"{config_path}: holds {len(data)} annotators ({', '.join(map(str, data))}); "
                "tulu judges with one: keep one of them in a copy of the file"
            )
        ((name, settings),) = data.items()
        where = f"{config_path}: {name}"
        if not isinstance(settings, dict):
            raise DataError(f"{where}: expected a mapping of settings")
        return cls._from_settings(str(name), settings, config_path, where)

    @classmethod
    def _from_settings(
        cls, name: str, settings: dict[str, Any], config_path: Path, where: str
    ) -> Annotator:
        batch_size = settings.get("batch_size", 1)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise DataError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")
        decoder = settings.get("decoder_kwargs") or {}
        if not isinstance(decoder, dict):
            raise DataError(f"{where}: decoder_kwargs must be a mapping")
        templates = settings.get("prompt_templates")
        if not isinstance(templates, dict) or set(templates) != {"with_inputs", "without_inputs"}:
            raise DataError(
                f"{where}: prompt_templates must name exactly with_inputs and without_inputs"
            )
        texts = {
            key: _read_template(config_path, str(value), batch_size, f"{where}: {key}")
            for key, value in templates.items()
        }
        return cls(
            name=name,
            source=str(config_path),
            templates=texts,
            batch_size=batch_size,
            patterns=_patterns(settings.get("outputs_to_match"), where),
            default_model=str(decoder.get("model_name") or "gpt-4"),
            max_tokens=_number(decoder, "max_tokens", 250, int, where),
            temperature=_number(decoder, "temperature", 0.0, float, where),
        )

    def requests(self, comparisons: Sequence[Comparison], seed: int) -> list[JudgeRequest]:
        """Batched requests covering every comparison once (see the module doc for the order)."""
        order = list(range(len(comparisons)))
        random.Random(seed).shuffle(order)
        groups = (
            ("without_inputs", [i for i in order if not comparisons[i].input]),
            ("with_inputs", [i for i in order if comparisons[i].input]),
        )
        padding = Comparison(**PADDING)
        out = []
        for key, indices in groups:
            for start in range(0, len(indices), self.batch_size):
                chunk = tuple(indices[start : start + self.batch_size])
                batch = [comparisons[i] for i in chunk]
                batch += [padding] * (self.batch_size - len(batch))
                text = fill_batch(self.templates[key], batch)
                out.append(JudgeRequest(chatml_messages(text, f"{self.source}: {key}"), chunk))
        return out

    def parse(self, answer: str, count: int) -> list[int | None]:
        """The verdicts (1 or 2) for the first `count` examples of a batch, or all None when the
        answer does not hold exactly ``batch_size`` of them."""
        verdicts = parse_batched(answer, self.patterns)
        if len(verdicts) != self.batch_size:
            return [None] * count
        return list(verdicts[:count])


def _read_template(config_path: Path, given: str, batch_size: int, where: str) -> str:
    base = config_path.parent
    candidates = [Path(given), base / given, base / Path(given).name]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"{where}: template {given!r} not found (looked in {base})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read template: {exc}") from None
    counts = Counter(_ANY_PLACEHOLDER.findall(text))
    unknown = sorted(set(counts) - set(PLACEHOLDERS))
    if unknown:
        raise DataError(
            f"{path}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} "
            f"(allowed: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
        )
    missing = [p for p in _REQUIRED if p not in counts]
    if missing:
        raise DataError(f"{path}: lacks placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    wrong = {p: n for p, n in counts.items() if n != batch_size}
    if wrong:
        raise DataError(
            f"{path}: every placeholder must appear batch_size={batch_size} times, but "
            + ", ".join(f"{{{p}}} appears {n}" for p, n in sorted(wrong.items()))
        )
    if _START not in text:
        raise DataError(f"{path}: not a ChatML prompt (no {_START})")
    return text


def _patterns(value: Any, where: str) -> dict[int, re.Pattern[str]]:
    if not isinstance(value, dict) or {str(k) for k in value} != {"1", "2"}:
        raise DataError(f"{where}: outputs_to_match must map 1 and 2 to regular expressions")
    patterns = {}
    for key, pattern in value.items():
        try:
            patterns[int(key)] = re.compile(str(pattern))
        except re.error as exc:
            raise DataError(f"{where}: outputs_to_match[{key}]: bad pattern: {exc}") from None
    return patterns


def _number(settings: dict[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: decoder_kwargs.{key} must be a number, got {value!r}")
    return kind(value)
