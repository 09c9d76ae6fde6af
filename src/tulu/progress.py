"""The one look of tulu's progress bars (generation, training, tokenization, the Codex sandbox).

Every bar reads ``LABEL ━━━━ done/total [detail] elapsed ETA remaining`` on stderr: stdout
belongs to results (``tulu generate``'s JSONL, ``tulu eval``'s table), so a bar never mixes
into a pipe. Whether a bar is shown at all is the caller's decision (a command shows one when
stderr is a terminal; a library function when its caller asks or by its own default, as
`LLM.generate` does for more than 16 prompts, like vLLM's); this module only builds it.
"""

from __future__ import annotations

from typing import Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(
    label: str, *, count: Literal["items", "percent"] = "items", detail: str | None = None
) -> Progress:
    """A rich bar on stderr, not started (use it as a context manager, or start/stop it).

    `count` "items" shows ``done/total`` (requests, steps, programs); "percent" suits a total
    that means nothing to read, such as bytes. `detail` is a rich format string of the task's
    fields (``"{task.fields[rate]}"``), for what only this bar knows (tokens/s, the loss).
    The bar stays on screen when done (not transient): it is the run's record of how long
    it took.
    """
    columns: list[ProgressColumn] = [
        TextColumn(label, style="bold"),
        BarColumn(),
        MofNCompleteColumn() if count == "items" else TaskProgressColumn(),
    ]
    if detail is not None:
        columns.append(TextColumn(detail))
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), transient=False)
