"""Tests for tulu.data.batching: every example exactly once, rows within capacity, the padded
fraction on known cases, seeded determinism, and the proof that packing is invisible to the
model (a packed row gives each example the logits and loss it gets alone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tulu.chat import IGNORE_INDEX
from tulu.data.batching import (
    Batches,
    collate_packed,
    collate_padded,
    pack_rows,
    padded_fraction,
    padding_batches,
    padding_report,
)
from tulu.data.tokenize import tokenize_records
from tulu.demo import corpus_text, train_tokenizer
from tulu.errors import DataError
from tulu.model import GPTNeoXForCausalLM, preset


class ListSource:
    """Examples held in memory: ``source[i]`` -> (input_ids, labels)."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.examples = examples

    def __getitem__(self, index: int):
        return self.examples[index]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids, _ in self.examples])


def random_source(n: int, seed: int, vocab: int = 100, max_len: int = 20) -> ListSource:
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        ids = rng.integers(2, vocab, size=length)
        labels = np.where(rng.random(length) < 0.5, ids, IGNORE_INDEX)
        examples.append((ids, labels))
    return ListSource(examples)


def flat(batches) -> list[int]:
    return sorted(int(i) for batch in batches for i in batch)


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("order", ["random", "sorted"])
def test_padding_batches_cover_every_example_once(order) -> None:
    lengths = np.random.default_rng(0).integers(1, 100, size=103)
    batches = padding_batches(lengths, 8, order=order, seed=1)
    assert flat(batches) == list(range(103))
    assert sorted(len(b) for b in batches) == [7] + [8] * 12
    assert [b.tolist() for b in padding_batches(lengths, 8, order=order, seed=1)] == [
        b.tolist() for b in batches
    ]
    other = padding_batches(lengths, 8, order=order, seed=2)
    assert [b.tolist() for b in other] != [b.tolist() for b in batches]
    dropped = padding_batches(lengths, 8, order=order, seed=1, drop_last=True)
    assert len(dropped) == 12 and all(len(b) == 8 for b in dropped)


def test_sorted_batches_group_similar_lengths_in_shuffled_order() -> None:
    lengths = np.random.default_rng(0).integers(1, 1000, size=400)
    batches = padding_batches(lengths, 8, order="sorted", seed=3)
    # each batch is a run of the sorted lengths: ordering the batches by their shortest
    # example gives the sorted lengths back
    runs = sorted(batches, key=lambda b: (lengths[b].min(), lengths[b].max()))
    concatenated = np.concatenate([np.sort(lengths[b]) for b in runs])
    assert concatenated.tolist() == sorted(lengths.tolist())
    # ... but training does not see them in length order
    minima = [int(lengths[b].min()) for b in batches]
    assert minima != sorted(minima) and minima != sorted(minima, reverse=True)
    assert padded_fraction(lengths, batches) < padded_fraction(
        lengths, padding_batches(lengths, 8, order="random", seed=3)
    )


def test_padded_fraction_known_case() -> None:
    lengths = [1, 2, 3, 4]
    # [1, 2] pads to 2 (1 slot padded), [3, 4] pads to 4 (1 slot padded): 2 of 12 slots
    assert padded_fraction(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(2 / 12)
    # [1, 4] pads to 4 (3), [2, 3] pads to 3 (1): 4 of 14
    assert padded_fraction(lengths, [np.array([0, 3]), np.array([1, 2])]) == pytest.approx(4 / 14)


def test_padding_report_known_case() -> None:
    lengths = [6, 5, 4, 3, 2, 1]
    random_stats, sorted_stats, packing = padding_report(lengths, 2, 7, seed=0)
    assert sorted_stats.mode == "padding-sorted" and sorted_stats.batches == 3
    # sorted pairs (1, 2), (3, 4), (5, 6): 2 + 4 + 6 = 12 slots padded to 2*(2+4+6) = 24
    assert sorted_stats.token_slots == 24 and sorted_stats.real_tokens == 21
    assert sorted_stats.padded_fraction == pytest.approx(3 / 24)
    assert random_stats.real_tokens == 21 and random_stats.padded_fraction >= 3 / 24
    # packing into rows of 7: (6, 1), (5, 2), (4, 3) -> no padding at all
    assert packing.mode == "packing" and packing.rows == 3 and packing.token_slots == 21
    assert packing.padded_fraction == 0.0
    assert packing.as_dict()["padded_fraction"] == 0.0


def test_collate_padded() -> None:
    source = ListSource(
        [
            (np.array([5, 6, 7]), np.array([IGNORE_INDEX, 6, 7])),
            (np.array([8]), np.array([8])),
        ]
    )
    batch = collate_padded(source, [1, 0], pad_token_id=1)
    assert batch["input_ids"].tolist() == [[8, 1, 1], [5, 6, 7]]
    assert batch["labels"].tolist() == [[8, -100, -100], [-100, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["input_ids"].dtype == torch.int64


# --------------------------------------------------------------------------- packing


def test_pack_rows_known_case() -> None:
    rows = pack_rows([6, 5, 4, 3, 2, 1], 7, seed=0)
    assert sorted(sorted(r.tolist()) for r in rows) == [[0, 5], [1, 4], [2, 3]]


def test_pack_rows_best_fit() -> None:
    # Longest first: 6 opens a row (4 free), 5 opens a row (5 free), the second 5 fills the
    # row with exactly 5 free, and 4 fills the first row: two full rows.
    rows = pack_rows([4, 5, 5, 6], 10, seed=0)
    assert sorted(sorted(r.tolist()) for r in rows) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("seed", [0, 1])
def test_pack_rows_every_example_once_within_capacity(seed) -> None:
    lengths = np.random.default_rng(seed).integers(1, 2049, size=20_000)
    rows = pack_rows(lengths, 2048, seed=seed)
    assert flat(rows) == list(range(len(lengths)))
    assert max(int(lengths[r].sum()) for r in rows) <= 2048
    lower_bound = -(-int(lengths.sum()) // 2048)
    assert lower_bound <= len(rows) <= 1.05 * lower_bound  # best-fit decreasing packs tightly
    again = pack_rows(lengths, 2048, seed=seed)
    assert [r.tolist() for r in again] == [r.tolist() for r in rows]
    shuffled = pack_rows(lengths, 2048, seed=seed + 10)
    assert [r.tolist() for r in shuffled] != [r.tolist() for r in rows]
    assert sorted(r.tolist() for r in shuffled) == sorted(r.tolist() for r in rows)


def test_pack_rows_refuses_too_long_examples() -> None:
    with pytest.raises(DataError, match="example 1: 9 tokens, longer than max_seq_length 8"):
        pack_rows([3, 9, 2], 8)
    with pytest.raises(DataError, match="example 0: length 0"):
        pack_rows([0, 1], 8)


def test_collate_packed() -> None:
    source = ListSource(
        [
            (np.array([5, 6, 7]), np.array([5, 6, 7])),
            (np.array([8, 9]), np.array([IGNORE_INDEX, 9])),
            (np.array([3]), np.array([3])),
        ]
    )
    batch = collate_packed(source, [np.array([0, 1]), np.array([2])], 6, pad_token_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1], [3, 1, 1, 1, 1, 1]]
    # the first label of every example is masked; padding is masked
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, 9, -100],
        [-100, -100, -100, -100, -100, -100],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    with pytest.raises(DataError, match="packed row 0"):
        collate_packed(source, [np.array([0, 1, 2])], 5, pad_token_id=1)


# --------------------------------------------------------------------------- iteration


@pytest.mark.parametrize("mode", ["padding", "packing"])
def test_batches_yield_every_example_once(mode) -> None:
    source = random_source(50, seed=4)
    batches = Batches(
        source, source.lengths, mode=mode, batch_size=4, pad_token_id=0, max_seq_length=32, seed=7
    )
    seen = []
    for batch in batches:
        segments = batch.get("segment_ids", batch["attention_mask"])
        for row in range(batch["input_ids"].shape[0]):
            for segment in range(1, int(segments[row].max()) + 1):
                ids = batch["input_ids"][row][segments[row] == segment].tolist()
                seen.append(ids)
    assert len(seen) == 50 and len(batches) == len(batches.plan())
    assert sorted(seen) == sorted(ids.tolist() for ids, _ in source.examples)
    first_epoch = [b.tolist() for b in _flatten_plan(batches.plan())]
    batches.set_epoch(1)
    assert [b.tolist() for b in _flatten_plan(batches.plan())] != first_epoch


def _flatten_plan(plan) -> list[np.ndarray]:
    return [np.concatenate(b) if isinstance(b, list) else b for b in plan]


def test_batches_need_max_seq_length_for_packing() -> None:
    with pytest.raises(DataError, match="packing needs max_seq_length"):
        Batches(random_source(3, 0), [1, 2, 3], mode="packing", batch_size=2, pad_token_id=0)


def test_batches_from_a_tokenized_dataset(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(corpus_text(), vocab_size=400)
    lines = [
        {
            "dataset": "t",
            "id": str(i),
            "messages": [
                {"role": "user", "content": "question " * (i % 7 + 1)},
                {"role": "assistant", "content": "answer " * (i % 5 + 1)},
            ],
        }
        for i in range(40)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    ds = tokenize_records(path, tokenizer, 64, cache_dir=tmp_path, num_workers=1, progress=False)
    batches = Batches(
        ds, ds.lengths, mode="packing", batch_size=2, pad_token_id=1, max_seq_length=64
    )
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    assert total == ds.num_tokens
    trained = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    # each example's first token is masked in a packed row; it never was trained anyway
    assert trained == ds.num_trained_tokens
    padded = Batches(ds, ds.lengths, mode="padding", batch_size=8, pad_token_id=1, order="sorted")
    assert sum(int(b["attention_mask"].sum()) for b in padded) == ds.num_tokens


# --------------------------------------------------------------------------- through the model


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    config = preset(
        "pythia-14m",
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        torch_dtype="float32",
        initializer_range=0.1,
    )
    model = GPTNeoXForCausalLM(config)
    model.init_weights(0)
    return model.eval()


@torch.no_grad()
def test_packed_rows_give_each_example_its_own_logits_and_loss(model) -> None:
    source = random_source(12, seed=11, vocab=128, max_len=14)
    rows = pack_rows(source.lengths, 32, seed=0)
    assert any(len(r) >= 3 for r in rows)  # rows really hold several examples
    batch = collate_packed(source, rows, 32, pad_token_id=0)
    logits = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        segment_ids=batch["segment_ids"],
        attention_mask=batch["attention_mask"],
    )
    packed_loss, packed_count = model.loss(
        batch["input_ids"],
        batch["labels"],
        position_ids=batch["position_ids"],
        segment_ids=batch["segment_ids"],
        attention_mask=batch["attention_mask"],
    )
    alone_loss = torch.zeros(())
    alone_count = 0
    for r, row in enumerate(rows):
        cursor = 0
        for index in row:
            ids, labels = source[int(index)]
            alone = model(torch.as_tensor(ids)[None])[0]
            torch.testing.assert_close(logits[r, cursor : cursor + len(ids)], alone)
            loss, count = model.loss(torch.as_tensor(ids)[None], torch.as_tensor(labels)[None])
            alone_loss += loss
            alone_count += int(count)
            cursor += len(ids)
    assert int(packed_count) == alone_count
    torch.testing.assert_close(packed_loss, alone_loss)


@torch.no_grad()
def test_padded_batch_gives_each_example_its_own_loss(model) -> None:
    source = random_source(6, seed=12, vocab=128, max_len=14)
    batch = collate_padded(source, range(6), pad_token_id=0)
    loss, count = model.loss(
        batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"]
    )
    alone = [
        model.loss(torch.as_tensor(ids)[None], torch.as_tensor(labels)[None])
        for ids, labels in source.examples
    ]
    assert int(count) == sum(int(c) for _, c in alone)
    torch.testing.assert_close(loss, sum(value for value, _ in alone))
