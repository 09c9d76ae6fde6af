"""Training checkpoints (tulu.train.checkpointing): atomic directories, pruning, what resume
picks, and an exact round trip of model, optimizer and RNG states."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tulu.errors import CheckpointError
from tulu.model.config import NeoXConfig
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.train.checkpointing import (
    Restored,
    checkpoint_name,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temps,
    resolve_resume,
    restore_scheduler,
    save_checkpoint,
)
from tulu.train.config import CheckpointConfig, TrainConfig
from tulu.train.distributed import World


def tiny_model(seed: int = 0) -> GPTNeoXForCausalLM:
    config = NeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        torch_dtype="float32",
    )
    model = GPTNeoXForCausalLM(config)
    model.init_weights(seed)
    return model


def one_step(model: GPTNeoXForCausalLM, optimizer: torch.optim.Optimizer, seed: int) -> None:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    loss, count = model.loss(ids, ids)
    (loss / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_config(tmp_path: Path, keep_last: int = 2) -> TrainConfig:
    config = TrainConfig()
    config.checkpoint.output_dir = str(tmp_path / "run")
    config.checkpoint.keep_last = keep_last
    return config


def save(config: TrainConfig, step: int, model, optimizer) -> Path:
    return save_checkpoint(
        config,
        step=step,
        model=model,
        optimizer=optimizer,
        trainer_state={"epoch": 0, "step_in_epoch": step, "scheduler": {}},
        metrics=[{"step": s, "loss": 1.0 / s} for s in range(1, step + 1)],
        world=World(),
    )


def test_round_trip_restores_everything(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save(config, 1, model, optimizer)
    assert path == tmp_path / "run" / "step-000001"
    draws = (random.random(), np.random.rand(), torch.rand(1))
    one_step(model, optimizer, 1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    other = tiny_model(seed=3)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2)
    restored = load_checkpoint(path, model=other, optimizer=other_optimizer, world=World(), seed=0)
    assert restored.step == 1 and restored.trainer_state["step_in_epoch"] == 1
    assert [e["step"] for e in restored.metrics] == [1]
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(1), draws[2])
    one_step(other, other_optimizer, 1)
    for name, tensor in other.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_keep_last_prunes_the_oldest(tmp_path: Path) -> None:
    config = make_config(tmp_path, keep_last=2)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)
    for step in (2, 4, 6):
        save(config, step, model, optimizer)
    assert [s for s, _ in list_checkpoints(config.checkpoint.output_dir)] == [4, 6]
    assert sorted(p.name for p in Path(config.checkpoint.output_dir).iterdir()) == [
        "step-000004",
        "step-000006",
    ]


def test_a_kill_while_pruning_leaves_nothing_the_next_start_keeps(
    tmp_path: Path, monkeypatch
) -> None:
    """Deleting an old checkpoint (tens of GB for 6.9B) takes a while. A run killed during it
    left a half-deleted step-* directory that no start ever removed (it is no checkpoint any
    more, and only .tmp-* leftovers were cleaned); now the directory is renamed to .tmp-*
    before it is deleted."""
    import tulu.train.checkpointing as checkpointing

    config = make_config(tmp_path, keep_last=1)
    root = Path(config.checkpoint.output_dir)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)
    save(config, 2, model, optimizer)
    # Killed before any deletion completes: every rmtree of the save does nothing.
    monkeypatch.setattr(checkpointing.shutil, "rmtree", lambda *args, **kwargs: None)
    save(config, 4, model, optimizer)
    monkeypatch.undo()
    remove_stale_temps(root)  # what the next start does
    assert sorted(p.name for p in root.iterdir()) == ["step-000004"]


def test_resave_of_the_same_step_replaces_it(tmp_path: Path) -> None:
    """The new checkpoint takes the name; the old one (a run saves each step once, so it is
    an abandoned run's) is moved aside like the abandoned run's later ones."""
    config = make_config(tmp_path)
    root = Path(config.checkpoint.output_dir)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)
    save(config, 3, model, optimizer)
    (root / ".tmp-step-000003").mkdir()  # a leftover of a killed save is simply replaced
    save(config, 3, model, optimizer)
    assert sorted(p.name for p in root.iterdir()) == ["abandoned", "step-000003"]
    assert [p.name for p in (root / "abandoned").iterdir()] == ["step-000003"]


def test_resuming_from_an_earlier_checkpoint_keeps_every_abandoned_one(tmp_path: Path) -> None:
    """A run to step 12 resumed from step 4 (say with a lower lr after a loss spike): its
    save of step 8 deleted the abandoned run's step 8 (swapped out), while the abandoned
    run's step 12 was moved aside; both are moved aside now."""
    config = make_config(tmp_path, keep_last=3)
    root = Path(config.checkpoint.output_dir)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)

    def save_marked(step: int, run: str) -> Path:
        return save_checkpoint(
            config,
            step=step,
            model=model,
            optimizer=optimizer,
            trainer_state={"run": run, "scheduler": {}},
            metrics=[],
            world=World(),
        )

    def run_of(path: Path) -> str:
        return json.loads((path / "trainer.json").read_text())["run"]

    for step in (4, 8, 12):
        save_marked(step, "first")
    save_marked(8, "resumed")
    assert [(s, run_of(p)) for s, p in list_checkpoints(root)] == [(4, "first"), (8, "resumed")]
    aside = root / "abandoned"
    assert {p.name: run_of(p) for p in aside.iterdir()} == {
        "step-000008": "first",
        "step-000012": "first",
    }


def test_checkpoints_after_the_saved_step_are_from_an_abandoned_run(tmp_path: Path) -> None:
    """A ``resume: never`` rerun (or a resume from an earlier checkpoint) into a directory
    that holds a longer run's checkpoints: pruning kept the highest steps, so it deleted the
    checkpoint just written and left the old run's step-12 for ``resume: auto`` to pick.
    The old run's checkpoints are moved aside, not deleted (a second time under new names)."""
    config = make_config(tmp_path, keep_last=1)
    root = Path(config.checkpoint.output_dir)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)
    for _ in range(2):
        for step in (8, 12):  # the earlier run
            save(config, step, model, optimizer)
        new = save(config, 4, model, optimizer)  # the rerun's first checkpoint
        assert new.is_dir() and resolve_resume(config.checkpoint) == new
        assert [s for s, _ in list_checkpoints(root)] == [4]
        assert sorted(p.name for p in root.iterdir()) == ["abandoned", "step-000004"]
    aside = sorted(p.name for p in (root / "abandoned").iterdir())
    assert aside == ["step-000012", "step-000012-2"]  # step 8 was pruned by keep_last
    assert all(is_complete(root / "abandoned" / name) for name in aside)


def test_resume_ignores_temporary_and_incomplete_directories(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)
    good = save(config, 5, model, optimizer)
    root = Path(config.checkpoint.output_dir)
    (root / ".tmp-step-000010" / "state").mkdir(parents=True)  # killed while saving
    (root / ".tmp-step-000010" / "trainer.json").write_text('{"step": 10}')
    (root / checkpoint_name(8)).mkdir()  # a half-deleted or foreign directory
    assert latest_checkpoint(root) == good
    assert resolve_resume(config.checkpoint) == good
    remove_stale_temps(root)
    assert not (root / ".tmp-step-000010").exists() and (root / "step-000008").exists()


def test_resume_settings(tmp_path: Path) -> None:
    assert resolve_resume(CheckpointConfig(output_dir=str(tmp_path), resume="auto")) is None
    assert resolve_resume(CheckpointConfig(output_dir=str(tmp_path), resume="never")) is None
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(CheckpointConfig(resume=str(tmp_path / "missing")))
    (tmp_path / "step-000001").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(CheckpointConfig(resume=str(tmp_path / "step-000001")))


def sized_model(**changes: int) -> GPTNeoXForCausalLM:
    fields = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1}
    fields.update(changes)
    config = NeoXConfig(
        **fields, num_attention_heads=2, intermediate_size=64, torch_dtype="float32"
    )
    return GPTNeoXForCausalLM(config)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # DCP loads only what it is asked for: without a check, a deeper model's checkpoint
        # loaded into a shallower model without complaint.
        ({"num_hidden_layers": 1}, r"the checkpoint has tensor gpt_neox\.layers\.1\.\S+, which"),
        ({"num_hidden_layers": 3}, r"tensor gpt_neox\.layers\.2\.\S+ of this model is not in"),
        ({"num_hidden_layers": 2, "hidden_size": 64}, r"embed_in\.weight has shape \[64, 32\] in"),
    ],
)
def test_checkpoint_of_another_model_shape_names_the_tensor(
    tmp_path: Path, changes: dict[str, int], message: str
) -> None:
    config = make_config(tmp_path)
    model = sized_model(num_hidden_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)
    path = save(config, 1, model, optimizer)
    other = sized_model(**changes)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(
            path,
            model=other,
            optimizer=torch.optim.AdamW(other.parameters(), lr=1e-2),
            world=World(),
            seed=0,
        )
    assert "config.yaml" in str(info.value)


def test_corrupt_trainer_state_and_rng_files_are_named(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    one_step(model, optimizer, 0)
    path = save(config, 1, model, optimizer)

    def load() -> Restored:
        return load_checkpoint(path, model=model, optimizer=optimizer, world=World(), seed=0)

    rng_file = path / "rng" / "rank-00000.pt"
    rng_file.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"rank-00000\.pt: unreadable RNG state"):
        load()
    rng_file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"rank-00000\.pt: unreadable RNG state"):
        load()
    rng_file.unlink()  # no RNG file: seeded from (seed, rank, step) instead
    restored = load()

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(CheckpointError, match=r"trainer\.json: unusable scheduler state"):
        restore_scheduler(scheduler, restored)  # the test's trainer state has {} for it
    (path / "trainer.json").write_text('{"step": 1, "scheduler": "linear"}')
    with pytest.raises(CheckpointError, match=r"trainer\.json: no scheduler state"):
        load()
    (path / "trainer.json").write_bytes(b"\x97\xff")  # was a raw UnicodeDecodeError
    with pytest.raises(CheckpointError, match=r"trainer\.json: unreadable trainer state"):
        load()
