"""One process and N processes (torchrun + FSDP2 over gloo on the CPU) train identically.

The multi-process tests launch this very file under torchrun (see `_worker_main` at the
bottom): 2 processes train a tiny random GPT-NeoX with FSDP2 for a few optimizer steps and
rank 0 writes what it saw (losses, gradient norms, the final full state dict) for the test
process to compare with a single-process run over the same global batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from train.conftest import torchrun
from tulu.errors import CheckpointError, ConfigError, TuluError
from tulu.model.config import NeoXConfig
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.train.config import DistributedConfig, TrainConfig
from tulu.train.distributed import (
    World,
    accumulation_steps,
    all_reduce_sum,
    barrier,
    broadcast_object,
    clip_grad_norm,
    full_model_state_dict,
    get_train_state,
    init_distributed,
    load_sharded,
    micro_batches_for_rank,
    prepare_model,
    save_sharded,
    set_train_state,
    shutdown,
)

VOCAB = 128
MICRO_BATCHES = 4  # per optimizer step: 2 per rank with 2 processes
ROWS, SEQ = 2, 16
MAX_GRAD_NORM = 0.5
STEPS = 3
SAVE_AFTER = 2  # the DCP checkpoints are written after this many steps
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ shared recipe


def make_model(tied: bool = False) -> GPTNeoXForCausalLM:
    config = NeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        torch_dtype="float32",
    )
    model = GPTNeoXForCausalLM(config)
    model.init_weights(seed=0)
    return model


def make_config(checkpointing: bool = False, **distributed: Any) -> TrainConfig:
    config = TrainConfig()
    config.model.dtype = "float32"
    config.model.gradient_checkpointing = checkpointing
    config.optim.micro_batch_size = ROWS
    config.optim.global_batch_size = ROWS * MICRO_BATCHES
    config.optim.max_grad_norm = MAX_GRAD_NORM
    config.distributed = dataclasses.replace(config.distributed, **distributed)
    return config


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def step_micro_batches(step: int) -> list[dict[str, torch.Tensor]]:
    """The global batch of optimizer step `step`: padded rows with varying trained tokens, so
    that micro-batches (and ranks) hold different numbers of tokens."""
    gen = torch.Generator().manual_seed(1000 + step)
    batches = []
    for _ in range(MICRO_BATCHES):
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
        lengths = torch.randint(SEQ // 3, SEQ + 1, (ROWS,), generator=gen)
        mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        prompt = torch.rand(ROWS, SEQ, generator=gen) < 0.3
        labels = labels.masked_fill(prompt, -100)
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


def backward_step(model: torch.nn.Module, world: World, step: int) -> float:
    """Forward/backward this rank's micro-batches of `step`; returns the step's mean loss.

    Each micro-batch's summed loss is divided by the trained tokens of the whole global batch
    (all ranks), so the gradients summed over micro-batches and ranks are those of the mean.
    """
    mine = micro_batches_for_rank(step_micro_batches(step), world)
    count = torch.tensor(float(sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in mine)))
    all_reduce_sum(count, world)
    total = torch.zeros(())
    for mb in mine:
        loss_sum, _ = model.loss(mb["input_ids"], mb["labels"], attention_mask=mb["attention_mask"])
        (loss_sum / count).backward()
        total += loss_sum.detach()
    all_reduce_sum(total, world)
    return float(total / count)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World,
    steps: range,
) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    for step in steps:
        losses.append(backward_step(model, world, step))
        norms.append(float(clip_grad_norm(model, MAX_GRAD_NORM, world)))
        optimizer.step()
        optimizer.zero_grad()
    return losses, norms


def local_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        g = p.grad
        out.append((g.to_local() if hasattr(g, "to_local") else g).detach().clone())
    return out


def checkpointing_gradient_diff(model: GPTNeoXForCausalLM, world: World) -> float:
    """Largest difference between step-0 gradients with and without activation checkpointing."""
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        backward_step(model, world, 0)
        grads.append(local_grads(model))
        model.zero_grad()
    return max(float((a - b).abs().max()) for a, b in zip(*grads, strict=True))


def assert_state_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------ worker


def _worker_main(out_dir: Path, ref_checkpoint: Path) -> None:
    """Run under torchrun by the tests below; rank 0 writes out_dir/results.pt."""
    torch.manual_seed(0)
    world = init_distributed(DistributedConfig(), device="cpu")
    assert world.world_size == 2 and world.has_process_group
    results: dict[str, Any] = {"world_size": world.world_size}
    results["broadcast"] = broadcast_object({"rank": world.rank}, world)
    for tied in (False, True):
        model = make_model(tied)
        prepare_model(model, world, make_config(checkpointing=True))
        optimizer = make_optimizer(model)
        if not tied:
            results["checkpointing_diff"] = checkpointing_gradient_diff(model, world)
            model.gradient_checkpointing = True
        losses, norms = train(model, optimizer, world, range(SAVE_AFTER))
        if not tied:
            state = get_train_state(model, optimizer)
            state["step"] = SAVE_AFTER
            save_sharded(state, out_dir / "checkpoint")
        more_losses, more_norms = train(model, optimizer, world, range(SAVE_AFTER, STEPS))
        results[f"tied={tied}"] = {
            "losses": losses + more_losses,
            "norms": norms + more_norms,
            "state": full_model_state_dict(model, world),
        }
    # A checkpoint written by one process, resumed by two.
    model = make_model()
    prepare_model(model, world, make_config(checkpointing=True))
    optimizer = make_optimizer(model)
    state = get_train_state(model, optimizer)
    state["step"] = -1
    load_sharded(state, ref_checkpoint)
    set_train_state(model, optimizer, state)
    losses, _ = train(model, optimizer, world, range(state["step"], STEPS))
    results["resumed"] = {
        "step": state["step"],
        "losses": losses,
        "state": full_model_state_dict(model, world),
    }
    barrier(world)
    if world.is_main:
        torch.save(results, out_dir / "results.pt")
    shutdown(world)


# ------------------------------------------------------------------------------ fixtures


def _reference(tied: bool, checkpoint: Path | None = None) -> dict[str, Any]:
    """The single-process run (no process group, no FSDP, no activation checkpointing)."""
    model = make_model(tied)
    prepare_model(model, World(), make_config(checkpointing=False))
    optimizer = make_optimizer(model)
    losses, norms = train(model, optimizer, World(), range(SAVE_AFTER))
    if checkpoint is not None:
        state = get_train_state(model, optimizer)
        state["step"] = SAVE_AFTER
        save_sharded(state, checkpoint)
    more_losses, more_norms = train(model, optimizer, World(), range(SAVE_AFTER, STEPS))
    return {
        "losses": losses + more_losses,
        "norms": norms + more_norms,
        "state": full_model_state_dict(model, World()),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One torchrun launch of 2 processes, and the single-process reference runs."""
    tmp = tmp_path_factory.mktemp("distributed")
    reference = {
        "tied=False": _reference(False, tmp / "reference-checkpoint"),
        "tied=True": _reference(True),
    }
    proc = torchrun(__file__, str(tmp), str(tmp / "reference-checkpoint"), tmp=tmp, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    workers = torch.load(tmp / "results.pt", weights_only=False)
    return {"reference": reference, "workers": workers, "dir": tmp}


# ------------------------------------------------------------------------------ N vs 1 process


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_two_processes_train_like_one(runs: dict[str, Any], tied: bool) -> None:
    got, want = runs["workers"][f"tied={tied}"], runs["reference"][f"tied={tied}"]
    assert runs["workers"]["world_size"] == 2
    torch.testing.assert_close(got["losses"], want["losses"], **TOL)
    torch.testing.assert_close(got["norms"], want["norms"], **TOL)
    assert max(want["norms"]) > MAX_GRAD_NORM  # clipping did scale the gradients
    assert not torch.equal(want["state"]["embed_out.weight"], make_model(tied).embed_out.weight)
    assert_state_close(got["state"], want["state"])
    if tied:
        assert torch.equal(
            got["state"]["embed_out.weight"], got["state"]["gpt_neox.embed_in.weight"]
        )


@pytest.mark.slow
def test_activation_checkpointing_keeps_gradients_under_fsdp(runs: dict[str, Any]) -> None:
    assert runs["workers"]["checkpointing_diff"] <= 1e-6


@pytest.mark.slow
def test_broadcast_object_comes_from_rank_0(runs: dict[str, Any]) -> None:
    assert runs["workers"]["broadcast"] == {"rank": 0}


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_in_one(runs: dict[str, Any]) -> None:
    model = make_model()
    prepare_model(model, World(), make_config())
    optimizer = make_optimizer(model)
    state = get_train_state(model, optimizer)
    state["step"] = -1
    load_sharded(state, runs["dir"] / "checkpoint")
    set_train_state(model, optimizer, state)
    assert state["step"] == SAVE_AFTER
    losses, _ = train(model, optimizer, World(), range(state["step"], STEPS))
    want = runs["reference"]["tied=False"]
    torch.testing.assert_close(losses, want["losses"][SAVE_AFTER:], **TOL)
    assert_state_close(full_model_state_dict(model, World()), want["state"])


@pytest.mark.slow
def test_checkpoint_from_one_process_resumes_in_two(runs: dict[str, Any]) -> None:
    got, want = runs["workers"]["resumed"], runs["reference"]["tied=False"]
    assert got["step"] == SAVE_AFTER
    torch.testing.assert_close(got["losses"], want["losses"][SAVE_AFTER:], **TOL)
    assert_state_close(got["state"], want["state"])


# ------------------------------------------------------------------------------ one process


def test_single_process_needs_no_process_group(no_torchrun_env: None) -> None:
    world = init_distributed(DistributedConfig(), device="cpu")
    assert world == World(0, 1, 0, torch.device("cpu"))
    assert world.is_main and not world.has_process_group
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, world) is t and t.tolist() == [1.0, 2.0]
    assert broadcast_object("x", world) == "x"
    barrier(world)
    shutdown(world)


def test_bad_environment_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(TuluError, match="RANK=2"):
        init_distributed(DistributedConfig(), device="cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(TuluError, match="RANK"):
        init_distributed(DistributedConfig(), device="cpu")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("meta", "cannot use device 'meta' (Cannot copy out of meta tensor"),  # computes nothing
        ("hpu", "cannot use device 'hpu' ("),  # a backend this torch was built without
        ("cpux", "device 'cpux' is not a valid torch device"),
    ],
)
def test_a_device_that_cannot_compute_is_refused_up_front(
    no_torchrun_env: None, device: str, message: str
) -> None:
    """Only CUDA devices were checked: "meta" or "hpu" came back as the world's device and
    failed deep inside the first training step, after tokenizing and building the model."""
    with pytest.raises(TuluError, match=re.escape(message)):
        init_distributed(DistributedConfig(), device=device)


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_cuda_backend_pairs_gloo_with_nccl_for_cpu_offload(
    monkeypatch: pytest.MonkeyPatch, cpu_offload: bool
) -> None:
    """Two GPUs with FSDP2's CPU offload: the gradients live on the CPU and their norm is
    all-reduced there every step, which NCCL alone cannot do (no CUDA needed to check the
    process group that init_distributed asks for)."""
    import torch.distributed as dist

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    asked: dict[str, Any] = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: asked.update(kwargs))
    world = init_distributed(DistributedConfig(cpu_offload=cpu_offload), device="cuda")
    assert world.device == torch.device("cuda", 0)
    assert asked["backend"] == ("cuda:nccl,cpu:gloo" if cpu_offload else "nccl")
    assert asked["device_id"] == torch.device("cuda", 0)


def test_micro_batches_are_dealt_round_robin() -> None:
    batches = list(range(8))
    assert micro_batches_for_rank(batches, World()) == batches
    shares = [micro_batches_for_rank(batches, World(rank=r, world_size=2)) for r in range(2)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(TuluError, match="not a multiple"):
        micro_batches_for_rank(list(range(5)), World(rank=0, world_size=2))


def test_accumulation_steps() -> None:
    config = make_config()  # 8 rows per step in micro-batches of 2
    assert accumulation_steps(config, World()) == 4
    assert accumulation_steps(config, World(rank=1, world_size=2)) == 2
    with pytest.raises(ConfigError, match="optim.global_batch_size"):
        accumulation_steps(config, World(rank=0, world_size=3))


def test_fsdp_never_with_several_processes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="distributed.fsdp"):
        prepare_model(make_model(), World(rank=0, world_size=2), make_config(fsdp="never"))


def test_clip_grad_norm_matches_torch() -> None:
    models = [make_model(), make_model()]
    for model in models:
        backward_step(model, World(), 0)
    want = torch.nn.utils.clip_grad_norm_(models[0].parameters(), 0.1)
    got = clip_grad_norm(models[1], 0.1, World())
    torch.testing.assert_close(got, want)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    measured = clip_grad_norm(models[1], None, World())  # measures only
    torch.testing.assert_close(measured, torch.tensor(0.1), rtol=1e-4, atol=0)


def test_activation_checkpointing_keeps_gradients() -> None:
    model = make_model()
    prepare_model(model, World(), make_config(checkpointing=True))
    assert model.gradient_checkpointing
    assert checkpointing_gradient_diff(model, World()) <= 1e-6


def test_single_process_dtypes_and_wrappers() -> None:
    """Without FSDP: frozen parameters take the compute dtype, trainable ones keep theirs
    (LoRA adapters stay float32); the checkpointing flag reaches a wrapped model."""
    inner = make_model()
    inner.gpt_neox.embed_in.weight.requires_grad_(False)
    wrapper = torch.nn.ModuleDict({"model": inner})
    config = make_config(checkpointing=True)
    config.model.dtype = "bfloat16"
    assert prepare_model(wrapper, World(), config) is wrapper
    assert inner.gradient_checkpointing
    assert inner.gpt_neox.embed_in.weight.dtype == torch.bfloat16
    assert inner.embed_out.weight.dtype == torch.float32


def test_sharded_checkpoint_round_trip_without_process_group(tmp_path: Path) -> None:
    model = make_model(tied=True)
    prepare_model(model, World(), make_config())
    optimizer = make_optimizer(model)
    train(model, optimizer, World(), range(1))
    state = get_train_state(model, optimizer)
    state["step"] = 1
    save_sharded(state, tmp_path / "ckpt")

    fresh = make_model(tied=True)
    fresh_optimizer = make_optimizer(fresh)
    loaded = get_train_state(fresh, fresh_optimizer)
    loaded["step"] = 0
    load_sharded(loaded, tmp_path / "ckpt")
    set_train_state(fresh, fresh_optimizer, loaded)
    assert loaded["step"] == 1
    assert fresh.embed_out.weight is fresh.gpt_neox.embed_in.weight  # still tied
    assert_state_close(fresh.state_dict(), model.state_dict())
    # Same optimizer state: the next step is the same.
    a, _ = train(model, optimizer, World(), range(1, 2))
    b, _ = train(fresh, fresh_optimizer, World(), range(1, 2))
    assert a == b
    assert_state_close(fresh.state_dict(), model.state_dict())

    with pytest.raises(CheckpointError, match="no .metadata"):
        load_sharded(loaded, tmp_path / "missing")
    for shard in (tmp_path / "ckpt").glob("*.distcp"):  # a torn write
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"ckpt: cannot load .*\(rank 0: \w+") as info:
        load_sharded(loaded, tmp_path / "ckpt")
    assert "Traceback" not in str(info.value)  # the reason, not every rank's stack


@pytest.fixture
def cpu_offload_optimizer(monkeypatch: pytest.MonkeyPatch):
    """Factory: torchao's real CPUOffloadOptimizer (AdamW) over a CPU model.

    It needs CUDA only for its copy stream and pinned buffers: a stream that does nothing and
    unpinned buffers let its whole logic (the gradient hooks, the CPU optimizers, the copies
    back) run on the CPU.
    """
    offload = pytest.importorskip("torchao.optim.cpu_offload")

    class Stream:
        def wait_stream(self, other: Any) -> None:
            pass

        def record_event(self) -> Stream:
            return self

        def synchronize(self) -> None:
            pass

    empty_like = torch.empty_like
    monkeypatch.setattr(offload, "get_available_devices", lambda: ["cpu", "cuda"])
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(
        torch, "empty_like", lambda t, *, pin_memory=False, **kw: empty_like(t, **kw)
    )

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        return offload.CPUOffloadOptimizer(model.parameters(), lr=3e-3, weight_decay=0.01)

    return make


def test_cpu_offload_optimizer_checkpoint_round_trip(tmp_path: Path, cpu_offload_optimizer) -> None:
    """optim.offload_optimizer: DCP's get_state_dict cannot read torchao's CPUOffloadOptimizer
    (it crashed at the first checkpoint). Saved and resumed, the next steps are the same: the
    CPU optimizers' states are restored, their CPU copies of the parameters refreshed from the
    loaded model (else a step starts again from the initial weights), and the LR scheduler
    still reaches the on-device optimizer of the small parameters."""
    from torch.optim.lr_scheduler import LambdaLR

    def schedule(optimizer: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    def run(model, optimizer, scheduler, steps: range) -> list[float]:
        losses = []
        for step in steps:
            losses.append(backward_step(model, World(), step))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        return losses

    model = make_model()
    optimizer = cpu_offload_optimizer(model)
    scheduler = schedule(optimizer)
    assert optimizer.optim_dict and optimizer.d_opt is not None  # offloaded and small params
    run(model, optimizer, scheduler, range(2))
    save_sharded(get_train_state(model, optimizer), tmp_path / "ckpt")

    fresh = make_model()
    fresh_optimizer = cpu_offload_optimizer(fresh)
    fresh_scheduler = schedule(fresh_optimizer)
    loaded = get_train_state(fresh, fresh_optimizer)
    load_sharded(loaded, tmp_path / "ckpt")
    set_train_state(fresh, fresh_optimizer, loaded)
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    assert_state_close(fresh.state_dict(), model.state_dict())
    want = run(model, optimizer, scheduler, range(2, 5))
    assert run(fresh, fresh_optimizer, fresh_scheduler, range(2, 5)) == want
    assert_state_close(fresh.state_dict(), model.state_dict())


def test_fsdp_always_in_one_process(no_torchrun_env: None) -> None:
    """fsdp: always works without a launcher (a 1-process group) and trains like no FSDP."""
    world = init_distributed(DistributedConfig(fsdp="always"), device="cpu")
    try:
        assert world.has_process_group
        model = make_model()
        prepare_model(model, world, make_config(fsdp="always"))
        optimizer = make_optimizer(model)
        losses, norms = train(model, optimizer, world, range(2))
        state = full_model_state_dict(model, world)
    finally:
        shutdown(world)
    plain = make_model()
    prepare_model(plain, World(), make_config())
    plain_optimizer = make_optimizer(plain)
    want_losses, want_norms = train(plain, plain_optimizer, World(), range(2))
    torch.testing.assert_close(losses, want_losses, **TOL)
    torch.testing.assert_close(norms, want_norms, **TOL)
    assert_state_close(state, plain.state_dict())


def test_fsdp_mixed_precision_keeps_float32_master_weights(no_torchrun_env: None) -> None:
    """bfloat16 compute under FSDP: float32 trainable shards, bfloat16 frozen ones and
    activations, float32 gradients."""
    world = init_distributed(DistributedConfig(fsdp="always"), device="cpu")
    try:
        model = make_model()
        model.gpt_neox.embed_in.weight.requires_grad_(False)  # frozen, as with LoRA
        config = make_config(fsdp="always")
        config.model.dtype = "bfloat16"
        prepare_model(model, world, config)
        # The policy fully_shard gave each sharded module (every block, then the root):
        # bfloat16 all-gathered parameters, float32 gradient reductions.
        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert set(sharded) == {*model.gpt_neox.layers, model}
        groups = [m._get_fsdp_state()._fsdp_param_group for m in sharded]
        for group in groups:
            assert group.mp_policy.param_dtype == torch.bfloat16
            assert group.mp_policy.reduce_dtype == torch.float32
        assert model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.float32
        assert model.embed_out.weight.dtype == torch.float32
        assert model.gpt_neox.embed_in.weight.dtype == torch.bfloat16
        batch = step_micro_batches(0)[0]
        logits = model(batch["input_ids"])
        assert logits.dtype == torch.bfloat16
        loss_sum, count = model.loss(batch["input_ids"], batch["labels"])
        (loss_sum / count).backward()
        assert model.embed_out.weight.grad.dtype == torch.float32
        assert model.gpt_neox.embed_in.weight.grad is None
        # As FSDP resolved the policy per parameter at its first forward: every trainable
        # parameter computes in bfloat16 and has its gradients reduced in float32.
        trainable = [p for g in groups for p in g.fsdp_params if p.sharded_param.requires_grad]
        assert len(trainable) == sum(p.requires_grad for p in model.parameters())
        assert {(p.param_dtype, p.reduce_dtype) for p in trainable} == {
            (torch.bfloat16, torch.float32)
        }
        assert float(clip_grad_norm(model, 1.0, world)) > 0
    finally:
        shutdown(world)


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a crash in a collective shows where each rank was
    _worker_main(Path(sys.argv[1]), Path(sys.argv[2]))
