"""Per-source statistics of a mixture: a table, a JSON summary and a token-length histogram.

The table answers what a user checks before spending GPU hours on a mixture: how many records
each source gave (and how many were lost to bad input, recipe rules or duplicates), how many
turns and tokens it contributes, and how many of its examples training will truncate.
"""

from __future__ import annotations

from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tulu.data.records import ConversionReport
from tulu.errors import DataError

__all__ = ["LengthCounter", "SourceStats", "render_table", "save_histogram", "stats_json"]


#: The per-source counts shown in the table and summed in the total row, in column order.
_COUNTS = (
    "read",
    "bad",
    "dropped",
    "duplicates",
    "selected",
    "train",
    "validation",
    "turns",
    "tokens",
    "truncated",
)


@dataclass
class SourceStats:
    name: str
    source: str
    read: int
    bad: int
    dropped: int
    duplicates: int
    available: int
    train: int = 0
    validation: int = 0
    turns: int = 0
    tokens: int | None = None
    truncated: int | None = None
    max_tokens: int | None = None
    bad_reasons: dict[str, int] = field(default_factory=dict)
    drop_reasons: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        name: str,
        source: str,
        report: ConversionReport,
        duplicate_ids: int,
        duplicate_contents: int,
        available: int,
    ) -> SourceStats:
        return cls(
            name=name,
            source=source,
            read=report.read,
            bad=report.bad.total,
            dropped=sum(report.dropped.values()),
            duplicates=duplicate_ids + duplicate_contents,
            available=available,
            bad_reasons=dict(report.bad.counts),
            drop_reasons=dict(report.dropped),
        )

    @property
    def selected(self) -> int:
        return self.train + self.validation

    def add(self, record: dict[str, Any], split: str, tokens: int | None, limit: int) -> None:
        """Count one written record (`tokens` is its rendered length, None without tokenizer)."""
        if split == "validation":
            self.validation += 1
        else:
            self.train += 1
        self.turns += len(record["messages"])
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens
            self.truncated = (self.truncated or 0) + (tokens > limit)
            self.max_tokens = max(self.max_tokens or 0, tokens)


class LengthCounter:
    """Token lengths of every selected record, per source (4 bytes each, for the histogram)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.lengths = [array("i") for _ in names]

    def add(self, index: int, tokens: int) -> None:
        self.lengths[index].append(tokens)


def stats_json(sources: list[SourceStats]) -> dict[str, Any]:
    rows = [asdict(s) | {"selected": s.selected} for s in sources]
    total = {key: sum(row[key] or 0 for row in rows) for key in ("available", *_COUNTS)}
    return {"sources": rows, "total": total}


def _fmt(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def render_table(sources: list[SourceStats], max_seq_length: int):
    """A `rich` table: one row per source and a total row."""
    from rich.table import Table

    table = Table(
        title="mixture",
        caption=f"dropped: by the source's rules; truncated: longer than {max_seq_length} tokens",
        show_footer=True,
    )
    columns = [
        ("source", "total"),
        ("read", None),
        ("bad", None),
        ("dropped", None),
        ("dupes", None),
        ("selected", None),
        ("train", None),
        ("valid", None),
        ("turns", None),
        ("tokens", None),
        ("truncated", None),
    ]
    keys = _COUNTS
    total = stats_json(sources)["total"]
    has_tokens = any(s.tokens is not None for s in sources)
    table.add_column(columns[0][0], footer="total")
    for (title, _), key in zip(columns[1:], keys, strict=True):
        footer = _fmt(total[key]) if (has_tokens or key not in ("tokens", "truncated")) else "-"
        table.add_column(title, justify="right", footer=footer)
    for s in sources:
        values = [getattr(s, k) if k != "selected" else s.selected for k in keys]
        table.add_row(s.name, *(_fmt(v) for v in values))
    return table


def save_histogram(lengths: LengthCounter, path: str | Path, max_seq_length: int) -> Path:
    """A PNG of token-length histograms, one step curve per source, the limit marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError(
            "the length histogram needs matplotlib (pip install 'tulu[data]')"
        ) from None
    import numpy as np

    path = Path(path)
    longest = max((max(a) for a in lengths.lengths if len(a)), default=1)
    bins = np.linspace(0, max(longest, max_seq_length) + 1, 60)
    figure, axes = plt.subplots(figsize=(9, 5))
    for name, values in zip(lengths.names, lengths.lengths, strict=True):
        if len(values):
            axes.hist(
                np.frombuffer(values, dtype=np.int32),
                bins=bins,
                histtype="step",
                label=f"{name} ({len(values):,})",
                linewidth=1.5,
            )
    axes.axvline(max_seq_length, color="black", linestyle="--", linewidth=1)
    axes.text(
        max_seq_length,
        axes.get_ylim()[1] * 0.95,
        f" max_seq_length {max_seq_length}",
        va="top",
        fontsize=8,
    )
    axes.set_yscale("log")
    axes.set_xlabel("tokens per example (rendered in the Tulu chat format)")
    axes.set_ylabel("examples")
    axes.set_title("token lengths by source")
    axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    except OSError as err:
        raise DataError(f"{path}: cannot write the histogram ({err.strerror})") from None
    finally:
        plt.close(figure)
    return path
