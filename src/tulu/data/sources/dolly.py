"""databricks-dolly-15k: JSON Lines of ``instruction``, ``context``, ``response``, ``category``.

Each line becomes one user/assistant pair through a prompt template (`tulu.data.templates`),
with the ``context`` as the template's input, as in Tulu v1. Records are named ``dolly_{index}``
with `index` the 0-based position among the file's non-blank lines, bad lines included, so an
id names the same example whether or not other lines were skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tulu.data.readers import iter_jsonl, numbered_items
from tulu.data.records import ConversionReport
from tulu.data.templates import instruction_records

__all__ = ["convert"]

DATASET = "dolly"


def convert(
    path: Path,
    report: ConversionReport,
    *,
    templates: str | None = None,
    seed: int = 42,
) -> Iterator[dict[str, Any]]:
    """Yield one record per usable line of `path`.

    `templates` is the path of a JSON template set (None: the project's default set); `seed`
    seeds the one generator that picks a template per example, in file order. Every line with
    well-typed fields draws a template, even one then skipped for an empty response, so the
    picks match open-instruct's for the same file and seed.
    """
    items = numbered_items(iter_jsonl, path, report)
    yield from instruction_records(
        items,
        report,
        dataset=DATASET,
        fields=("instruction", "context", "response"),
        templates=templates,
        seed=seed,
        input_optional=False,
    )
