"""FLAN V2 and its chain-of-thought subset: JSON Lines of ``inputs`` / ``targets``.

Both are already phrased as prompts, so no template is applied: the user turn is ``inputs``
and the assistant turn is ``targets``. One converter serves the sources ``flan_v2`` and
``cot``; the registry passes the source name as `dataset`, which names the records
(``{dataset}_{index}``, `index` = the 0-based position among the non-blank lines, bad ones
included). Extra fields of the release (``task``, ``_template_type``, ...) are ignored.

The user turn gets open-instruct's trailing newline: ``"\\n"`` is appended unless ``inputs``
already ends in a newline or, ignoring trailing whitespace, in ``":"``. The chat renderer
strips message contents anyway, so this only shows in the converted records; it is kept so
they match open-instruct's byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tulu.data.readers import iter_jsonl, numbered_items
from tulu.data.records import BadRecord, ConversionReport, check_object, make_record, string_field

__all__ = ["convert", "user_content"]


def user_content(inputs: str) -> str:
    """``inputs`` with open-instruct's newline rule applied (see the module docstring)."""
    if inputs.endswith("\n") or inputs.rstrip().endswith(":"):
        return inputs
    return inputs + "\n"


def convert(path: Path, report: ConversionReport, *, dataset: str) -> Iterator[dict[str, Any]]:
    """Yield one record per usable line of `path`; blank ``targets`` are skipped as bad."""
    for index, where, value in numbered_items(iter_jsonl, path, report):
        try:
            item = check_object(value, where)
            inputs = string_field(item, "inputs", where)
            targets = string_field(item, "targets", where)
        except BadRecord as err:
            report.bad(err)
            continue
        if not targets.strip():
            report.bad(BadRecord(where, "empty output", "field 'targets' is empty"))
            continue
        if not inputs.strip():
            report.bad(BadRecord(where, "empty instruction", "field 'inputs' is empty"))
            continue
        messages = [
            {"role": "user", "content": user_content(inputs)},
            {"role": "assistant", "content": targets},
        ]
        yield make_record(dataset, f"{dataset}_{index}", messages)
