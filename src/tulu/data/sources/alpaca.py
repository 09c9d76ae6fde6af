"""GPT-4 Alpaca and Code-Alpaca: a JSON array of ``{instruction, input, output}`` objects.

Both releases share the layout, so one converter serves the sources ``gpt4_alpaca`` and
``code_alpaca``; the registry passes the source name as `dataset`, which names the records
(``{dataset}_{index}``, `index` = the 0-based position in the array, unreadable elements
included). Each element becomes one user/assistant pair through a prompt template
(`tulu.data.templates`); a missing, null or blank ``input`` selects the templates without
input, as in Tulu v1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tulu.data.readers import iter_json_array, numbered_items
from tulu.data.records import ConversionReport
from tulu.data.templates import instruction_records

__all__ = ["convert"]


def convert(
    path: Path,
    report: ConversionReport,
    *,
    dataset: str,
    templates: str | None = None,
    seed: int = 42,
) -> Iterator[dict[str, Any]]:
    """Yield one record per usable element of the array in `path`.

    `templates` is the path of a JSON template set (None: the project's default set); `seed`
    seeds the one generator that picks a template per example, in file order. Every element
    with well-typed fields draws a template, even one then skipped for an empty output, so the
    picks match open-instruct's for the same file and seed.
    """
    items = numbered_items(iter_json_array, path, report)
    yield from instruction_records(
        items,
        report,
        dataset=dataset,
        fields=("instruction", "input", "output"),
        templates=templates,
        seed=seed,
        input_optional=True,
    )
