"""The deterministic sequence of optimizer steps of a training run, and where a run stands in it.

A run is a fixed plan, computed from the data and the config alone, never from what happened
before; that is what makes resuming exact and cheap (no data is replayed to get back to a step):

1. Per epoch, a seeded order of *rows* (seed = ``config.seed + epoch``, as `Batches` does): with
   padding a row is one example (``padding_order: random`` is a permutation; ``sorted``
   groups examples of similar length into micro-batches, then shuffles the micro-batches);
   with packing a row is a `max_seq_length` row of several examples (best-fit decreasing, rows
   shuffled).
2. The rows are cut into micro-batches of ``optim.micro_batch_size`` rows, and consecutive
   micro-batches form the global batches of ``optim.global_batch_size`` rows, i.e.
   ``global_batch_size / micro_batch_size`` micro-batches per optimizer step.
3. Each step's micro-batches are dealt to the processes round-robin
   (`tulu.train.distributed.micro_batches_for_rank`), so a step is the same set of rows
   whatever the number of processes.

**The last step of an epoch** gets whatever is left: fewer micro-batches (and its last
micro-batch may have fewer rows). Every example is trained on once per epoch; nothing is
dropped or repeated. The number of processes must still divide the step's micro-batches (FSDP
needs every rank to run as many forward and backward passes), so a short step is topped up
with *filler* micro-batches: a copy of the step's last micro-batch with every label set to
-100. A filler contributes no loss and no gradient, is not counted by either loss
normalisation, and exists only so that collectives match; one process never needs one. The
steps' content, and so the training, therefore does not depend on the world size.

Total steps = epochs x steps per epoch, capped by ``optim.max_steps``. Steps per epoch do not
depend on the epoch: padding always makes ceil(examples / micro_batch_size) micro-batches, and
packing's rows come from a best-fit pass over the lengths sorted by length (the seed only
shuffles the finished rows).

A position in the plan is a `DataPosition` (epoch, step in epoch) of the *next* step to run;
`DataPlan.steps(position)` starts there directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tulu.chat import IGNORE_INDEX
from tulu.data.batching import (
    Batches,
    collate_packed,
    collate_padded,
    padded_fraction,
    padded_share,
)
from tulu.errors import ConfigError, DataError
from tulu.train.config import TrainConfig
from tulu.train.distributed import World, micro_batches_for_rank

__all__ = [
    "DataPlan",
    "DataPosition",
    "PlannedStep",
    "count_trained",
    "filler",
    "validation_micro_batches",
]

MicroBatch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DataPosition:
    """The next step to run: `step_in_epoch` (from 0) of `epoch` (from 0)."""

    epoch: int = 0
    step_in_epoch: int = 0

    def global_step(self, steps_per_epoch: int) -> int:
        """Optimizer steps completed before this position."""
        return self.epoch * steps_per_epoch + self.step_in_epoch

    @classmethod
    def after(cls, completed_steps: int, steps_per_epoch: int) -> DataPosition:
        """The position after `completed_steps` steps."""
        epoch, step = divmod(completed_steps, steps_per_epoch)
        return cls(epoch, step)

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


@dataclass
class PlannedStep:
    """One optimizer step: its number, place in the data, and this rank's micro-batches.

    `number` counts from 1 (the step completed when this one is done). `num_micro_batches`
    counts the step's real micro-batches over all ranks (fillers excluded): the divisor of
    the "paper" loss normalisation. `micro_batches` are this rank's, collated on the CPU, in
    the order they run; `real` says which of them are real (False for fillers).
    """

    number: int
    epoch: int
    step_in_epoch: int
    num_micro_batches: int
    micro_batches: list[MicroBatch]
    real: list[bool]

    @property
    def next_position(self) -> DataPosition:
        return DataPosition(self.epoch, self.step_in_epoch + 1)


def count_trained(micro_batch: MicroBatch) -> int:
    """Tokens a micro-batch trains on: labels after the next-token shift that are not -100."""
    return int((micro_batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def filler(micro_batch: MicroBatch) -> MicroBatch:
    """A copy of `micro_batch` that trains on nothing (every label -100)."""
    out = dict(micro_batch)
    out["labels"] = torch.full_like(micro_batch["labels"], IGNORE_INDEX)
    return out


def _why_empty(dataset: Any, config: TrainConfig) -> str:
    """Why tokenization left nothing, from the dataset's meta (a `TokenizedDataset`): an
    empty file, or records all dropped (truncation to max_seq_length cut every assistant
    token) or skipped as bad."""
    meta = getattr(dataset, "meta", None) or {}
    source = meta.get("source", config.data.train)
    dropped, bad = meta.get("dropped") or {}, meta.get("skipped_bad") or {}
    reasons = [f"{count} dropped ({reason})" for reason, count in dropped.items()]
    reasons += [f"{count} skipped as bad ({reason})" for reason, count in bad.items()]
    if not reasons:
        return f"{source} has no records"
    hint = f"; raise data.max_seq_length ({config.data.max_seq_length})" if dropped else ""
    return f"{source}: " + ", ".join(reasons) + hint


class DataPlan:
    """The steps of a run over `dataset` (see the module doc).

    `dataset` is anything with `lengths` and ``dataset[i] -> (input_ids, labels)`` (a
    `TokenizedDataset`). Only this rank's micro-batches of a step are collated.
    """

    def __init__(
        self,
        dataset: Any,
        config: TrainConfig,
        world: World,
        *,
        pad_token_id: int,
    ) -> None:
        o, d = config.optim, config.data
        if len(dataset) == 0:
            raise DataError(f"data.train: no training examples ({_why_empty(dataset, config)})")
        if o.global_batch_size % o.micro_batch_size:
            raise ConfigError(
                f"optim.global_batch_size: {o.global_batch_size} is not a multiple of "
                f"optim.micro_batch_size ({o.micro_batch_size})"
            )
        self.world = world
        self.mode = d.batching
        self.micro_per_step = o.global_batch_size // o.micro_batch_size
        self.batches = Batches(
            dataset,
            dataset.lengths,
            mode=d.batching,
            batch_size=o.micro_batch_size,
            pad_token_id=pad_token_id,
            max_seq_length=d.max_seq_length,
            order=d.padding_order,
            seed=config.seed,
        )
        self.batches.set_epoch(0)
        self.num_examples = len(dataset)
        self.micro_batches_per_epoch = len(self.batches.plan())
        self.rows_per_epoch = sum(len(b) for b in self.batches.plan())
        self.steps_per_epoch = -(-self.micro_batches_per_epoch // self.micro_per_step)
        self.epochs = o.epochs
        full = self.epochs * self.steps_per_epoch
        self.total_steps = min(full, o.max_steps) if o.max_steps is not None else full

    # ------------------------------------------------------------------------ the plan
    def _epoch_plan(self, epoch: int) -> list:
        if self.batches.epoch != epoch:
            self.batches.set_epoch(epoch)
        plan = self.batches.plan()
        if len(plan) != self.micro_batches_per_epoch:  # pragma: no cover - see module doc
            raise DataError(
                f"epoch {epoch}: {len(plan)} micro-batches, epoch 0 had "
                f"{self.micro_batches_per_epoch}; the plan must not depend on the epoch"
            )
        return plan

    def step_rows(self, epoch: int, step_in_epoch: int) -> list:
        """The real micro-batches (row index arrays, as `Batches.plan` gives) of a step."""
        if not 0 <= step_in_epoch < self.steps_per_epoch:
            raise DataError(
                f"step {step_in_epoch} of epoch {epoch}: an epoch has {self.steps_per_epoch}"
            )
        start = step_in_epoch * self.micro_per_step
        return self._epoch_plan(epoch)[start : start + self.micro_per_step]

    def _collate(self, rows: Any) -> MicroBatch:
        b = self.batches
        if self.mode == "padding":
            return collate_padded(b.source, rows, b.pad_token_id)
        assert b.max_seq_length is not None
        return collate_packed(b.source, rows, b.max_seq_length, b.pad_token_id)

    def step(self, position: DataPosition) -> PlannedStep:
        """The planned step at `position`, with this rank's micro-batches collated."""
        rows = self.step_rows(position.epoch, position.step_in_epoch)
        real = len(rows)
        world_size = self.world.world_size
        padded = list(range(real)) + [-1] * (-real % world_size)  # -1: a filler
        mine = micro_batches_for_rank(padded, self.world)
        batches, flags = [], []
        for i in mine:
            if i >= 0:
                batches.append(self._collate(rows[i]))
                flags.append(True)
            else:
                batches.append(filler(self._collate(rows[real - 1])))
                flags.append(False)
        return PlannedStep(
            number=position.global_step(self.steps_per_epoch) + 1,
            epoch=position.epoch,
            step_in_epoch=position.step_in_epoch,
            num_micro_batches=real,
            micro_batches=batches,
            real=flags,
        )

    def steps(self, start: DataPosition | None = None) -> Iterator[PlannedStep]:
        """The steps from `start` (default: the beginning) to the end of the run."""
        position = start or DataPosition()
        while position.global_step(self.steps_per_epoch) < self.total_steps:
            if position.step_in_epoch >= self.steps_per_epoch:
                position = DataPosition(position.epoch + 1, 0)
                continue
            yield self.step(position)
            position = DataPosition(position.epoch, position.step_in_epoch + 1)

    def position_after(self, completed_steps: int) -> DataPosition:
        return DataPosition.after(completed_steps, self.steps_per_epoch)

    def epoch_progress(self, completed_steps: int) -> float:
        """Epochs done after `completed_steps` steps, as a fraction (1.5 = half-way through
        the second epoch), as transformers logs it."""
        return completed_steps / self.steps_per_epoch

    def fingerprint(self) -> str:
        """sha256 of what each step of epoch 0 trains on: its examples in order (with packing,
        its rows of examples). A resumed run picks up at a step number, so it continues the
        checkpoint's run only if its steps hold the same examples: a new seed, padding order,
        global batch size or data change them (often without changing the steps per epoch).
        A micro-batch size that splits the same steps differently leaves it unchanged."""
        digest = hashlib.sha256()
        plan = self._epoch_plan(0)
        for start in range(0, len(plan), self.micro_per_step):
            step = plan[start : start + self.micro_per_step]
            if self.mode == "padding":  # a row is an example: the step's examples in order
                rows = [np.concatenate(step).astype(np.int64)]
            else:
                rows = [
                    np.asarray(row, dtype=np.int64) for micro_batch in step for row in micro_batch
                ]
            digest.update(np.int64(len(rows)).tobytes())  # step boundaries
            for row in rows:
                digest.update(np.int64(len(row)).tobytes() + row.tobytes())
        return digest.hexdigest()

    def padded_fraction(self, epoch: int = 0) -> float:
        """Padding's share of the token slots of `epoch`'s micro-batches, from the lengths
        alone (nothing is collated): what ``metrics.jsonl``'s ``padded_fraction`` reports per
        step, over the epoch. With padding each micro-batch is as wide as its longest example,
        so the share depends on the epoch's order; packed rows are ``max_seq_length`` wide."""
        plan = self._epoch_plan(epoch)
        lengths = self.batches.lengths
        if self.mode == "padding":
            return padded_fraction(lengths, plan)
        assert self.batches.max_seq_length is not None
        rows = [row for micro_batch in plan for row in micro_batch]
        real = sum(int(lengths[row].sum()) for row in rows)
        return padded_share(real, len(rows) * self.batches.max_seq_length)

    def summary(self) -> dict[str, int | str]:
        return {
            "examples": self.num_examples,
            "batching": self.mode,
            "rows_per_epoch": self.rows_per_epoch,
            "micro_batches_per_epoch": self.micro_batches_per_epoch,
            "micro_batches_per_step": self.micro_per_step,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "total_steps": self.total_steps,
        }


def validation_micro_batches(
    dataset: Any, micro_batch_size: int, world: World, *, pad_token_id: int
) -> list[tuple[MicroBatch, bool]]:
    """This rank's validation micro-batches: examples in length order (little padding; the
    order does not change a summed loss), dealt round-robin, topped up with fillers so every
    rank runs the same number of forward passes. Pairs of (micro-batch, is real)."""
    lengths = np.asarray(dataset.lengths)
    order = np.argsort(lengths, kind="stable")
    groups = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    slots = list(range(len(groups))) + [-1] * (-len(groups) % world.world_size)
    out = []
    for i in micro_batches_for_rank(slots, world):
        if i >= 0:
            out.append((collate_padded(dataset, groups[i], pad_token_id), True))
        else:
            out.append((filler(collate_padded(dataset, groups[-1], pad_token_id)), False))
    return out
