"""The shared progress bar: one layout on stderr for generation, training, tokenization and
the Codex sandbox."""

from __future__ import annotations

import re

from tulu.progress import progress_bar


def _final_line(capsys, **kwargs) -> str:
    """The bar's last state, as printed on stderr when it stops (not a terminal)."""
    bar = progress_bar("train", **kwargs)
    with bar:
        task = bar.add_task("t", total=4, stats="loss 1.5")
        bar.update(task, completed=2)
    out, err = capsys.readouterr()
    assert out == ""  # stdout belongs to results
    return " ".join(err.split())


def test_bar_layout_counts_detail_elapsed_and_eta(capsys) -> None:
    line = _final_line(capsys, detail="{task.fields[stats]}")
    assert re.fullmatch(r"train ━+ 2/4 loss 1\.5 \d:\d\d:\d\d ETA (-:--:--|\d:\d\d:\d\d)", line)


def test_percent_count_for_totals_not_worth_reading(capsys) -> None:
    line = _final_line(capsys, count="percent")
    assert re.fullmatch(r"train ━+ 50% \d:\d\d:\d\d ETA (-:--:--|\d:\d\d:\d\d)", line), line
