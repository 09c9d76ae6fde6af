"""Outputs of a benchmark that is scored group by group (BBH by task, TyDi QA by language).

Scoring zips each group's outputs with its examples, so a missing group or a list of the wrong
length would silently score fewer examples than the benchmark has; `check_grouped_outputs`
refuses both (and outputs for a group the benchmark lacks) before anything is scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tulu.errors import DataError

__all__ = ["check_grouped_outputs"]


def check_grouped_outputs(
    outputs: Mapping[str, Sequence[str]],
    groups: Mapping[str, Sequence[object]],
    *,
    benchmark: str,
    group: str,
    items: str,
) -> None:
    """DataError unless `outputs` holds one output per item of every group of `groups`, and
    nothing else. The message names the `benchmark` ("BBH"), the kind of `group` ("task") and
    of its `items` ("examples"), and the group at fault."""
    unknown = sorted(set(outputs) - set(groups))
    if unknown:
        raise DataError(f"outputs for unknown {benchmark} {group}(s): {', '.join(unknown)}")
    for name, rows in groups.items():
        got = outputs.get(name)
        if got is None or len(got) != len(rows):
            count = "none" if got is None else len(got)
            raise DataError(f"{benchmark} {name}: {count} outputs for {len(rows)} {items}")
