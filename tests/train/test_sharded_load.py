"""Under FSDP a checkpoint (``model.path``) loads shard by shard: each process builds the
model on the meta device, shards it, and reads the checkpoint itself, keeping only its shards
(`tulu.train.trainer.model_for_training` -> `tulu.train.distributed.load_checkpoint_shards`).

2 gloo processes on the CPU, launched with torchrun as in test_distributed.py (this file is
the worker, see `_worker_main`), check that

- every rank's shards equal its slices of the checkpoint's tensors exactly: an odd
  vocabulary and intermediate size (uneven shards), a model whose rank 1 gets empty shards,
  tied embeddings, a float16 checkpoint read into float32 master shards, a .bin checkpoint,
  and LoRA (frozen base in bfloat16, adapters equal to a one-process `apply_lora`);
- a rank's peak RSS grows by about its half of the model while loading, not by the model;
- a failure on one rank stops both;

and, through ``torchrun -m tulu.train``, that a run from a checkpoint trains like one
process (losses and exported weights, full fine-tuning and LoRA) and resumes from its DCP
checkpoint, and that a checkpoint missing a tensor stops both ranks with the message naming
it, without hanging.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from train.conftest import torchrun
from train.test_trainer import (
    config_data,
    make_config,
    train_losses,
    write_assets,
    write_config,
)
from tulu.errors import TuluError
from tulu.model.checkpoint import load_model, save_model
from tulu.model.config import NeoXConfig
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.tokenizer import Tokenizer
from tulu.train.checkpointing import seed_everything
from tulu.train.config import TrainConfig
from tulu.train.distributed import init_distributed, on_every_rank, shutdown
from tulu.train.trainer import model_for_training, train

SEED = 11
IDS = torch.randint(0, 600, (2, 9), generator=torch.Generator().manual_seed(2))
# Uneven shards over 2 ranks: an odd vocabulary (>= the demo tokenizer's 600) and MLP width.
ODD = dict(
    vocab_size=601,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=63,
    max_position_embeddings=64,
)
# Rank 1 gets empty shards of dense_h_to_4h (1 row); tied embeddings.
EMPTY = {**ODD, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}
EMPTY |= {"intermediate_size": 1, "tie_word_embeddings": True}
# About 150 MiB of float32 weights for the memory test; the largest tensor is 4 MiB.
LARGE = {**ODD, "vocab_size": 1024, "hidden_size": 512, "num_hidden_layers": 12}
LARGE |= {"num_attention_heads": 8, "intermediate_size": 2048}

pytestmark = pytest.mark.usefixtures("one_thread")  # bitwise-reproducible one-process runs
CASES = {  # case -> (checkpoint, LoRA, compute dtype)
    "odd": ("odd", False, "float32"),
    "odd-bfloat16": ("odd", False, "bfloat16"),  # float32 master shards all the same
    "odd-lora": ("odd", True, "bfloat16"),  # a bfloat16 frozen base, float32 adapters
    "empty-tied-bin": ("empty-bin", False, "float32"),
}


# ------------------------------------------------------------------------------ checkpoints
def random_model(fields: dict[str, Any], seed: int) -> GPTNeoXForCausalLM:
    """Random weights everywhere, norms and biases included (init_weights leaves them 1/0)."""
    model = GPTNeoXForCausalLM(NeoXConfig(**fields, torch_dtype="float32"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def write_checkpoints(root: Path) -> None:
    save_model(random_model(ODD, 0), root / "odd", dtype=torch.float16)
    missing = save_model(random_model(ODD, 0), root / "missing")
    from safetensors.torch import load_file, save_file

    state = load_file(missing / "model.safetensors")
    del state["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    binary = save_model(random_model(EMPTY, 1), root / "empty-bin")
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    with torch.device("meta"):
        large = GPTNeoXForCausalLM(NeoXConfig(**LARGE, torch_dtype="float32"))
    large.to_empty(device="cpu")
    for p in large.parameters():
        p.data.fill_(0.01)
    save_model(large, root / "large")


def without_weights(checkpoint: Path, copy: Path) -> Path:
    """A copy of `checkpoint` whose weight files are garbage: loading them is an error."""
    shutil.copytree(checkpoint, copy)
    for weights in [*copy.glob("*.safetensors"), *copy.glob("*.bin")]:
        weights.write_bytes(b"not weights")
    return copy


def worker_config(checkpoint: Path, lora: bool = False, dtype: str = "float32") -> TrainConfig:
    config = TrainConfig(seed=SEED)
    config.model.path = str(checkpoint)
    config.model.dtype = dtype
    config.model.gradient_checkpointing = False
    config.lora.enabled = lora
    config.lora.r = 4
    return config


def expected_shard(full: torch.Tensor, rank: int, world_size: int = 2) -> torch.Tensor:
    """Rank `rank`'s rows of `full` under FSDP2: torch.chunk, then empty chunks."""
    chunks = list(full.chunk(world_size))
    chunks += [full[:0]] * (world_size - len(chunks))
    return chunks[rank]


def reference_parameters(checkpoint: Path, lora: bool) -> dict[str, torch.Tensor]:
    """The whole model as one process has it: the checkpoint loaded in float32 (the master
    dtype), LoRA applied after seeding, frozen parameters in bfloat16 (the compute dtype)."""
    seed_everything(SEED)
    model = load_model(checkpoint, dtype=torch.float32)
    if lora:
        from tulu.train.lora import apply_lora

        model = apply_lora(model, worker_config(checkpoint, lora).lora)
    return {
        name: p.detach() if p.requires_grad else p.detach().to(torch.bfloat16)
        for name, p in model.named_parameters()
    }


# ------------------------------------------------------------------------------ worker
def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _worker_main(root: Path, tokenizer_dir: Path) -> None:
    """Run under torchrun by the `worker` fixture; each rank writes root/rank-N.pt."""
    torch.set_num_threads(1)
    world = init_distributed(TrainConfig().distributed, device="cpu")
    tokenizer = Tokenizer.load(tokenizer_dir)
    results: dict[str, Any] = {}
    for case, (checkpoint, lora, dtype) in CASES.items():
        seed_everything(SEED)
        config = worker_config(root / checkpoint, lora, dtype)
        model, _ = model_for_training(config, tokenizer, world)
        base = model.get_base_model() if lora else model
        results[case] = {
            "local": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
            "tied": base.embed_out.weight is base.gpt_neox.embed_in.weight,
        }
        if case == "odd":
            model.eval()
            with torch.no_grad():
                results[case]["logits"] = model(IDS)
        del model, base
    # The imports and first calls are done: now the peak RSS of a load is the load's own.
    config = worker_config(root / "large")
    rss = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        results["memory"] = None  # the test skips
    model, _ = model_for_training(config, tokenizer, world)
    results.setdefault(
        "memory",
        {
            "grown": (_status_kib("VmHWM") - rss) * 1024,
            "local": sum(p.to_local().nbytes for p in model.parameters()),
        },
    )
    del model

    def fail_on_rank_1() -> None:
        if world.rank == 1:
            raise TuluError("rank 1 could not read its file")

    try:
        on_every_rank(fail_on_rank_1, world)
    except TuluError as err:
        results["failure"] = str(err)
    torch.save(results, root / f"rank-{world.rank}.pt")
    shutdown(world)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def worker(checkpoints: Path, assets: Path) -> list[dict[str, Any]]:
    """One torchrun launch of `_worker_main`: what each rank saw."""
    proc = torchrun(
        __file__, str(checkpoints), str(assets / "tokenizer"), tmp=checkpoints, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(checkpoints / f"rank-{r}.pt", weights_only=False) for r in range(2)]


# ------------------------------------------------------------------------------ shards
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_exactly_its_slices_of_the_checkpoint(
    worker: list[dict[str, Any]], checkpoints: Path, case: str
) -> None:
    checkpoint, lora, _ = CASES[case]
    want = reference_parameters(checkpoints / checkpoint, lora)
    for rank, seen in enumerate(worker):
        local = seen[case]["local"]
        assert sorted(local) == sorted(want)
        for name, full in want.items():
            expected = expected_shard(full, rank)
            got = local[name]
            assert got.dtype == expected.dtype, (rank, name)
            assert torch.equal(got, expected), (rank, name)
    sizes = {name: [len(seen[case]["local"][name]) for seen in worker] for name in want}
    if case == "odd":
        assert sizes["gpt_neox.embed_in.weight"] == [301, 300]
        assert sizes["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] == [32, 31]
    if case == "empty-tied-bin":
        assert sizes["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] == [1, 0]
        assert "embed_out.weight" not in want  # tied: one parameter
        assert all(seen[case]["tied"] for seen in worker)
    if lora:
        adapters = [n for n in want if "lora_" in n]
        assert len(adapters) == 2 * 4 * 2 and any(want[n].abs().sum() > 0 for n in adapters)


@pytest.mark.slow
def test_sharded_model_computes_the_checkpoints_logits(
    worker: list[dict[str, Any]], checkpoints: Path
) -> None:
    expected = load_model(checkpoints / "odd", dtype=torch.float32)(IDS)
    for seen in worker:
        torch.testing.assert_close(seen["odd"]["logits"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_rank_does_not_hold_the_whole_model_while_loading(
    worker: list[dict[str, Any]],
) -> None:
    """Peak RSS growth of each rank over the load (VmHWM after resetting it to VmRSS; it does
    not depend on timing): its half of the weights plus the tensor being sliced, measured at
    82 MiB for 74 MiB of shards of a 148 MiB model. Loading the whole model in every rank
    first (what this replaced) measured 154 MiB: above the bound whatever the overheads."""
    config = NeoXConfig(**LARGE)
    model_bytes = config.num_parameters() * 4
    for rank, seen in enumerate(worker):
        memory = seen["memory"]
        if memory is None:
            pytest.skip("cannot reset the peak RSS (writing 5 to /proc/self/clear_refs failed)")
        assert memory["local"] == pytest.approx(model_bytes / 2, rel=0.01)
        print(
            f"rank {rank}: peak RSS growth {memory['grown'] / 2**20:.1f} MiB while loading "
            f"{model_bytes / 2**20:.1f} MiB of weights ({memory['local'] / 2**20:.1f} MiB "
            "of shards)"
        )
        assert memory["grown"] < 0.75 * model_bytes, memory


@pytest.mark.slow
def test_a_failure_on_one_rank_stops_every_rank(worker: list[dict[str, Any]]) -> None:
    assert worker[0]["failure"] == "rank 1 failed: TuluError: rank 1 could not read its file"
    assert worker[1]["failure"] == "rank 1 could not read its file"


# ------------------------------------------------------------------------------ tulu train
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_from_a_checkpoint_train_and_resume_like_one(
    assets: Path, checkpoints: Path, tmp_path: Path, lora: bool
) -> None:
    """torchrun -m tulu.train from model.path (FSDP, sharded load) vs one process (the whole
    checkpoint loaded, no FSDP): the same losses and exported weights; then a 2-process run
    resumed from the step-2 checkpoint continues the same."""
    overrides = (
        f"model.path={checkpoints / 'odd'}",
        "model.config=null",
        f"lora.enabled={str(lora).lower()}",
        "lora.r=4",
        "optim.micro_batch_size=2",
        "optim.global_batch_size=8",
        "optim.max_steps=4",
        "optim.lr=3e-3",
        "checkpoint.every_steps=2",
        "logging.tensorboard=false",
        "logging.plot=false",
    )

    def two_processes(out: str, *more: str) -> dict[int, float]:
        data = config_data(assets, tmp_path / out, *overrides, *more)
        path = write_config(tmp_path / f"{out}.yaml", data)
        proc = torchrun("-m", "tulu.train", str(path), tmp=tmp_path, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert ("(resumed from" in proc.stderr) == bool(more), proc.stderr[-3000:]
        return train_losses(tmp_path / out / "metrics.jsonl")

    two = two_processes("two")
    # The resumed run never reads model.path's weights (the DCP checkpoint holds them all):
    # here they are garbage, and it still continues exactly.
    resumed = two_processes(
        "resumed",
        f"checkpoint.resume={tmp_path / 'two' / 'step-000002'}",
        f"model.path={without_weights(checkpoints / 'odd', tmp_path / 'no-weights')}",
    )
    one = train(make_config(assets, tmp_path / "one", *overrides))
    assert sorted(two) == sorted(resumed) == sorted(one.losses) == [1, 2, 3, 4]
    for step, loss in one.losses.items():
        assert two[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-5), step
    start = load_model(checkpoints / "odd", dtype=torch.float32).state_dict()
    a = load_model(tmp_path / "one" / "final", dtype=torch.float32).state_dict()
    name = "gpt_neox.layers.0.attention.dense.weight"
    assert not torch.equal(a[name], start[name])  # it trained
    for out in ("two", "resumed"):
        b = load_model(tmp_path / out / "final", dtype=torch.float32).state_dict()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("no_torchrun_env")
@pytest.mark.parametrize("fsdp", ["never", "always"])
def test_a_resumed_run_does_not_read_the_checkpoint_weights(
    assets: Path, checkpoints: Path, tmp_path: Path, fsdp: str
) -> None:
    """One process, whole model or FSDP over a mesh of one: resumed from its step-2
    checkpoint with model.path's weights replaced by garbage, the run still gives the
    uninterrupted run's losses (only model.path's config.json is read)."""
    overrides = (
        "model.config=null",
        f"distributed.fsdp={fsdp}",
        "optim.micro_batch_size=2",
        "optim.global_batch_size=4",
        "optim.max_steps=4",
        "optim.lr=3e-3",
        "checkpoint.every_steps=2",
        "checkpoint.export=false",
        "logging.tensorboard=false",
        "logging.plot=false",
    )
    straight = train(
        make_config(assets, tmp_path / "straight", f"model.path={checkpoints / 'odd'}", *overrides)
    )
    weightless = without_weights(checkpoints / "odd", tmp_path / "no-weights")
    resumed = train(
        make_config(
            assets,
            tmp_path / "resumed",
            f"model.path={weightless}",
            f"checkpoint.resume={tmp_path / 'straight' / 'step-000002'}",
            *overrides,
        )
    )
    assert resumed.resumed_from == tmp_path / "straight" / "step-000002"
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-6), step
    with pytest.raises(TuluError, match="model.safetensors"):
        train(make_config(assets, tmp_path / "fresh", f"model.path={weightless}", *overrides))


@pytest.mark.usefixtures("no_torchrun_env")
def test_one_process_fsdp_loads_the_checkpoint(checkpoints: Path, assets: Path) -> None:
    """fsdp: always without a launcher takes the same path, with a mesh of one."""
    config = worker_config(checkpoints / "odd")
    config.distributed.fsdp = "always"
    world = init_distributed(config.distributed, device="cpu")
    try:
        model, _ = model_for_training(config, Tokenizer.load(assets / "tokenizer"), world)
        got = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    finally:
        shutdown(world)
    want = reference_parameters(checkpoints / "odd", lora=False)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.slow
def test_missing_tensor_stops_both_ranks(assets: Path, checkpoints: Path, tmp_path: Path) -> None:
    missing = checkpoints / "missing"
    data = config_data(assets, tmp_path / "out", f"model.path={missing}", "model.config=null")
    path = write_config(tmp_path / "bad.yaml", data)
    proc = torchrun("-m", "tulu.train", str(path), tmp=tmp_path, timeout=120)
    assert proc.returncode != 0
    message = f"{missing}: checkpoint is missing tensors: gpt_neox.layers.1.mlp.dense_4h_to_h.bias"
    assert f"tulu train: error: {message}" in proc.stderr, proc.stderr[-3000:]
    assert f"tulu train (rank 1): error: {message}" in proc.stderr, proc.stderr[-3000:]


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a crash in a collective shows where each rank was
    _worker_main(Path(sys.argv[1]), Path(sys.argv[2]))
