"""Prompt templates that turn an (instruction, input, output) triple into a user/assistant pair.

Dolly, GPT-4 Alpaca and Code-Alpaca are released as bare triples. Tulu v1 (open-instruct's
``encode_instruction_example``) gives each example one of several phrasings, picked at random
with fixed weights, so the model does not learn a single rigid prompt layout. This module
reproduces that selection exactly:

1. instruction, input and output are stripped first;
2. the ``with_input`` list is used when the stripped input is non-empty, else ``without_input``;
3. one template is drawn per example with ``rng.choices(templates, weights=[...])[0]`` from one
   ``random.Random(seed)`` created per conversion and drawn once per example in file order;
4. user content = ``prompt.format(instruction=..., input=...)``, assistant content =
   ``completion.format(output=...)``. Only the template is formatted, so braces inside the
   data are never interpreted.

A template set is a JSON file with two lists of ``{"prompt", "completion", "weight"}``. The
project ships its own set (``templates/default.json``); a user may pass another one, e.g. the
paper's, and `load_templates` checks it up front so a typo fails before any data is read.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tulu.data.records import (
    BadRecord,
    ConversionReport,
    OptionError,
    check_object,
    make_record,
    string_field,
    type_name,
)
from tulu.errors import DataError

__all__ = [
    "Template",
    "TemplateSet",
    "default_templates",
    "encode_instruction",
    "instruction_records",
    "load_templates",
    "make_rng",
    "parse_templates",
    "resolve_templates",
]

#: The placeholders each part of a template may use (``without_input`` prompts have no input).
_PROMPT_FIELDS = {
    "with_input": ("instruction", "input"),
    "without_input": ("instruction",),
}
_COMPLETION_FIELDS = ("output",)


@dataclass(frozen=True)
class Template:
    """One phrasing: a prompt (user turn) and a completion (assistant turn) with a weight."""

    prompt: str
    completion: str
    weight: float


@dataclass(frozen=True)
class TemplateSet:
    """The templates for examples with an input and for examples without one."""

    with_input: tuple[Template, ...]
    without_input: tuple[Template, ...]
    source: str = ""

    def choose(self, rng: random.Random, has_input: bool) -> Template:
        """Draw one template the way open-instruct does (one ``choices`` call per example)."""
        templates = self.with_input if has_input else self.without_input
        return rng.choices(templates, weights=[t.weight for t in templates])[0]


def make_rng(seed: int) -> random.Random:
    """The generator for one conversion; an integer seed is required so runs are reproducible.

    Options may come from a YAML recipe or the command line, where ``"42"`` would silently seed
    a different stream than ``42``, so anything but an int is rejected.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"option 'seed': expected an integer, got {type_name(seed)}")
    return random.Random(seed)


def encode_instruction(
    templates: TemplateSet,
    rng: random.Random,
    instruction: str,
    input_text: str,
    output: str,
) -> list[dict[str, str]]:
    """One user and one assistant message for a triple, with a template drawn from `rng`.

    The draw happens for every call, whatever the contents, so the template given to each
    example depends only on the seed and the example's position, as in open-instruct.
    """
    instruction, input_text, output = instruction.strip(), input_text.strip(), output.strip()
    template = templates.choose(rng, bool(input_text))
    if input_text:
        prompt = template.prompt.format(instruction=instruction, input=input_text)
    else:
        prompt = template.prompt.format(instruction=instruction)
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": template.completion.format(output=output)},
    ]


def instruction_records(
    items: Iterator[tuple[int, str, Any]],
    report: ConversionReport,
    *,
    dataset: str,
    fields: tuple[str, str, str],
    templates: str | Path | None,
    seed: int,
    input_optional: bool,
) -> Iterator[dict[str, Any]]:
    """Records ``{dataset}_{index}`` from raw triples, one template drawn per usable item.

    `items` are ``(index, where, value)`` from `numbered_items`; `fields` names the item's
    instruction, input and output keys; with `input_optional` a missing or null input means no
    input (Alpaca), otherwise it must be a string like the others (Dolly). Every
    item with well-typed fields draws a template, even one then skipped for an empty output,
    so the picks match open-instruct's for the same file and seed.
    """
    template_set = resolve_templates(templates)
    rng = make_rng(seed)
    instruction_key, input_key, output_key = fields
    for index, where, value in items:
        try:
            item = check_object(value, where)
            instruction = string_field(item, instruction_key, where)
            input_text = string_field(item, input_key, where, optional=input_optional)
            output = string_field(item, output_key, where)
        except BadRecord as err:
            report.bad(err)
            continue
        messages = encode_instruction(template_set, rng, instruction, input_text, output)
        if not output.strip():
            report.bad(BadRecord(where, "empty output", f"field {output_key!r} is empty"))
            continue
        if not instruction.strip():
            report.bad(BadRecord(where, "empty instruction", f"field {instruction_key!r} is empty"))
            continue
        yield make_record(dataset, f"{dataset}_{index}", messages)


# --- loading and checking template files ---------------------------------------------------


def load_templates(path: str | Path) -> TemplateSet:
    """Read and check a template set; a `DataError` names the file and the bad field.

    Checked: both lists present and non-empty; every entry an object with string ``prompt`` and
    ``completion`` and a positive finite number ``weight``; prompts use only ``{instruction}``
    (and ``{input}`` in ``with_input``, where it is required), completions only ``{output}``.
    Other top-level keys (e.g. ``source``) and extra entry keys are ignored.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read template file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: template file is not valid UTF-8 (byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: template file is not valid JSON ({err.msg}, column {err.colno})"
        ) from None
    except ValueError:  # json lets int()'s 4300-digit limit through as a plain ValueError
        raise DataError(f"{path}: template file is not valid JSON (a number too long)") from None
    except RecursionError:
        raise DataError(f"{path}: template file is not valid JSON (nested too deeply)") from None
    return parse_templates(data, str(path))


def parse_templates(data: Any, source: str) -> TemplateSet:
    """Check an already-parsed template set (see `load_templates`); `source` names it in errors."""
    if not isinstance(data, Mapping):
        raise DataError(
            f"{source}: expected a JSON object with lists 'with_input' and 'without_input', "
            f"got {type_name(data)}"
        )
    lists: dict[str, tuple[Template, ...]] = {}
    for name in ("with_input", "without_input"):
        if name not in data:
            raise DataError(f"{source}: missing list {name!r}")
        entries = data[name]
        if not isinstance(entries, list):
            raise DataError(f"{source}: field {name!r}: expected a list, got {type_name(entries)}")
        if not entries:
            raise DataError(f"{source}: field {name!r} is empty (needs at least one template)")
        lists[name] = tuple(
            _parse_entry(entry, f"{source}: {name}[{index}]", name)
            for index, entry in enumerate(entries)
        )
    return TemplateSet(lists["with_input"], lists["without_input"], source)


def _parse_entry(entry: Any, where: str, list_name: str) -> Template:
    if not isinstance(entry, Mapping):
        raise DataError(f"{where}: expected an object, got {type_name(entry)}")
    for name in ("prompt", "completion", "weight"):
        if name not in entry:
            raise DataError(f"{where}: missing field {name!r}")
    for name in ("prompt", "completion"):
        if not isinstance(entry[name], str):
            raise DataError(f"{where}.{name}: expected a string, got {type_name(entry[name])}")
    weight = entry["weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise DataError(f"{where}.weight: expected a number, got {type_name(weight)}")
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(f"{where}.weight: must be a positive number, got {weight!r}")
    prompt_fields = _PROMPT_FIELDS[list_name]
    _check_placeholders(entry["prompt"], prompt_fields, prompt_fields, f"{where}.prompt")
    _check_placeholders(
        entry["completion"], _COMPLETION_FIELDS, _COMPLETION_FIELDS, f"{where}.completion"
    )
    return Template(entry["prompt"], entry["completion"], float(weight))


def _check_placeholders(
    template: str, allowed: tuple[str, ...], required: tuple[str, ...], where: str
) -> None:
    """Reject placeholders `str.format` would fail on or that would drop part of the example.

    The parsed field names must be allowed ones, which rules out unknown names, positional
    ``{}`` fields and attribute or index access such as ``{input.upper}``; then the template
    is formatted with dummy values, which catches what parsing alone does not (a nested
    ``{input:{width}}``, a format spec a string cannot take).
    """
    listing = ", ".join("{" + name + "}" for name in allowed)
    try:
        names = [
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as err:
        raise DataError(f"{where}: malformed template ({err})") from None
    for name in names:
        if name not in allowed:
            raise DataError(f"{where}: unknown placeholder {{{name}}} (allowed: {listing})")
    try:
        template.format(**{name: "x" for name in allowed})
    except KeyError as err:
        raise DataError(
            f"{where}: unknown placeholder {{{err.args[0]}}} (allowed: {listing})"
        ) from None
    except (ValueError, IndexError, AttributeError, TypeError) as err:
        raise DataError(f"{where}: malformed template ({err})") from None
    for name in required:
        if name not in names:
            raise DataError(f"{where}: lacks the placeholder {{{name}}}")


_DEFAULT: TemplateSet | None = None


def default_templates() -> TemplateSet:
    """The project's own template set (``tulu/data/templates/default.json``), loaded once."""
    global _DEFAULT
    if _DEFAULT is None:
        resource = resources.files("tulu.data").joinpath("templates/default.json")
        with resources.as_file(resource) as path:
            _DEFAULT = load_templates(path)
    return _DEFAULT


def resolve_templates(templates: str | Path | None) -> TemplateSet:
    """The ``templates`` converter option: None = the default set, else a file path."""
    if templates is None:
        return default_templates()
    if not isinstance(templates, str | Path):
        raise OptionError(f"option 'templates': expected a file path, got {type_name(templates)}")
    return load_templates(templates)


# --- reading helpers shared by the instruction-style converters ----------------------------
