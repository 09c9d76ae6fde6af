"""The data plan (tulu.train.data_loader): every example once per epoch, in a seeded order,
cut into steps that do not depend on the number of processes, resumable at any step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tulu.chat import IGNORE_INDEX
from tulu.errors import DataError
from tulu.train.config import TrainConfig
from tulu.train.data_loader import DataPlan, DataPosition, count_trained, validation_micro_batches
from tulu.train.distributed import World


class FakeDataset:
    """Example i is `lengths[i]` tokens, all equal to i + 2 (so ids name their example), the
    first two untrained."""

    def __init__(self, lengths: list[int]) -> None:
        self._lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full(int(self._lengths[i]), i + 2, dtype=np.int64)
        labels = ids.copy()
        labels[:2] = IGNORE_INDEX
        return ids, labels


def make_config(micro: int = 2, global_batch: int = 8, **changes) -> TrainConfig:
    config = TrainConfig()
    config.optim.micro_batch_size = micro
    config.optim.global_batch_size = global_batch
    config.optim.epochs = 2
    config.data.max_seq_length = 32
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


LENGTHS = [3 + (7 * i) % 20 for i in range(27)]  # 27 examples: the last step is short


def examples_of(step_batches: list[dict[str, torch.Tensor]]) -> list[int]:
    """Example indices of the real rows of micro-batches (ids are index + 2; 1 is padding)."""
    out = []
    for mb in step_batches:
        if count_trained(mb) == 0:
            continue
        for row in mb["input_ids"]:
            out.extend(sorted(set(row.tolist()) - {1}))
    return [i - 2 for i in out]


def test_every_example_once_per_epoch_and_short_last_step() -> None:
    plan = DataPlan(FakeDataset(LENGTHS), make_config(), World(), pad_token_id=1)
    # 27 examples / 2 per micro-batch = 14 micro-batches, 4 per step -> 4 steps (4,4,4,2).
    assert plan.micro_batches_per_epoch == 14 and plan.steps_per_epoch == 4
    assert plan.total_steps == 8
    steps = list(plan.steps())
    assert [s.number for s in steps] == list(range(1, 9))
    assert [s.num_micro_batches for s in steps] == [4, 4, 4, 2] * 2
    for epoch in (0, 1):
        seen = [i for s in steps if s.epoch == epoch for i in examples_of(s.micro_batches)]
        assert sorted(seen) == list(range(27))
    first = [i for s in steps[:4] for i in examples_of(s.micro_batches)]
    second = [i for s in steps[4:] for i in examples_of(s.micro_batches)]
    assert first != second  # a new order every epoch
    again = DataPlan(FakeDataset(LENGTHS), make_config(), World(), pad_token_id=1)
    assert [examples_of(s.micro_batches) for s in again.steps()] == [
        examples_of(s.micro_batches) for s in steps
    ]


def test_max_steps_caps_the_run() -> None:
    plan = DataPlan(FakeDataset(LENGTHS), make_config(optim__max_steps=5), World(), pad_token_id=1)
    assert plan.total_steps == 5
    assert [(s.epoch, s.step_in_epoch) for s in plan.steps()][-1] == (1, 0)


def test_resuming_at_a_position_gives_the_rest_of_the_run() -> None:
    plan = DataPlan(FakeDataset(LENGTHS), make_config(), World(), pad_token_id=1)
    everything = [(s.number, examples_of(s.micro_batches)) for s in plan.steps()]
    for done in range(9):
        fresh = DataPlan(FakeDataset(LENGTHS), make_config(), World(), pad_token_id=1)
        start = fresh.position_after(done)
        assert start.global_step(fresh.steps_per_epoch) == done
        rest = [(s.number, examples_of(s.micro_batches)) for s in fresh.steps(start)]
        assert rest == everything[done:]


def test_positions() -> None:
    assert DataPosition.after(9, 4) == DataPosition(2, 1)
    assert DataPosition(2, 1).global_step(4) == 9
    assert DataPosition(0, 3).as_dict() == {"epoch": 0, "step_in_epoch": 3}


@pytest.mark.parametrize("batching", ["padding", "packing"])
def test_two_ranks_split_the_steps_of_one(batching: str) -> None:
    config = make_config(data__batching=batching)
    one = DataPlan(FakeDataset(LENGTHS), config, World(), pad_token_id=1)
    ranks = [
        DataPlan(FakeDataset(LENGTHS), config, World(rank=r, world_size=2), pad_token_id=1)
        for r in (0, 1)
    ]
    assert {p.total_steps for p in ranks} == {one.total_steps}
    for s, r0, r1 in zip(one.steps(), ranks[0].steps(), ranks[1].steps(), strict=True):
        assert len(r0.micro_batches) == len(r1.micro_batches)  # same passes on every rank
        assert r0.num_micro_batches == r1.num_micro_batches == s.num_micro_batches
        dealt = [mb for pair in zip(r0.micro_batches, r1.micro_batches, strict=True) for mb in pair]
        real = [mb for mb in dealt if count_trained(mb)]
        assert len(real) == len(s.micro_batches)
        for a, b in zip(real, s.micro_batches, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"])
            assert torch.equal(a["labels"], b["labels"])


def test_an_odd_short_step_gets_a_filler_on_the_second_rank() -> None:
    # 25 examples / 2 = 13 micro-batches: the last step has 1, rank 1 gets a filler.
    lengths = LENGTHS[:25]
    config = make_config()
    r1 = DataPlan(FakeDataset(lengths), config, World(rank=1, world_size=2), pad_token_id=1)
    last = list(r1.steps())[r1.steps_per_epoch - 1]
    assert last.num_micro_batches == 1 and last.real == [False]
    assert count_trained(last.micro_batches[0]) == 0
    assert (last.micro_batches[0]["labels"] == IGNORE_INDEX).all()


def test_packing_rows_hold_several_examples() -> None:
    config = make_config(data__batching="packing", micro=1, global_batch=2)
    plan = DataPlan(FakeDataset(LENGTHS), config, World(), pad_token_id=1)
    assert plan.rows_per_epoch < len(LENGTHS)
    seen = [
        i for s in list(plan.steps())[: plan.steps_per_epoch] for i in examples_of(s.micro_batches)
    ]
    assert sorted(seen) == list(range(27))
    mb = next(plan.steps()).micro_batches[0]
    assert mb["input_ids"].shape[1] == 32 and "segment_ids" in mb and "position_ids" in mb


def test_sorted_padding_keeps_every_example() -> None:
    config = make_config(data__padding_order="sorted")
    plan = DataPlan(FakeDataset(LENGTHS), config, World(), pad_token_id=1)
    seen = [i for s in list(plan.steps())[:4] for i in examples_of(s.micro_batches)]
    assert sorted(seen) == list(range(27))


def test_empty_dataset_is_an_error() -> None:
    config = make_config(data__train="t.jsonl")
    with pytest.raises(DataError, match=r"no training examples \(t\.jsonl has no records\)"):
        DataPlan(FakeDataset([]), config, World(), pad_token_id=1)


def test_empty_dataset_error_says_why_examples_were_dropped() -> None:
    """Every example longer than max_seq_length in its prompt: the error says so, rather than
    "no examples" of a file that has thousands."""
    data = FakeDataset([])
    data.meta = {
        "source": "t.jsonl",
        "num_records": 40,
        "dropped": {"no trained token after truncation": 38},
        "skipped_bad": {"invalid JSON": 2},
    }
    message = (
        r"t\.jsonl: 38 dropped \(no trained token after truncation\), 2 skipped as bad "
        r"\(invalid JSON\); raise data\.max_seq_length \(32\)"
    )
    with pytest.raises(DataError, match=message):
        DataPlan(data, make_config(), World(), pad_token_id=1)


def test_validation_batches_cover_the_set_once_over_ranks() -> None:
    data = FakeDataset(LENGTHS[:7])
    one = validation_micro_batches(data, 2, World(), pad_token_id=1)
    assert [real for _, real in one] == [True] * 4
    ranks = [
        validation_micro_batches(data, 2, World(rank=r, world_size=3), pad_token_id=1)
        for r in range(3)
    ]
    assert [len(r) for r in ranks] == [2, 2, 2]
    trained = sum(count_trained(mb) for r in ranks for mb, _ in r)
    assert trained == sum(count_trained(mb) for mb, _ in one)


def test_config_is_not_mutated() -> None:
    config = make_config()
    before = dataclasses.asdict(config)
    DataPlan(FakeDataset(LENGTHS), config, World(), pad_token_id=1)
    assert dataclasses.asdict(config) == before
