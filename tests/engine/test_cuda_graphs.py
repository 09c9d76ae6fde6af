"""The decode fast path (`DecodeGraphRunner` + graph-safe decode attention) inside the engine.

On CPU the runner runs its static-buffer forward eagerly (`use_graphs=False`): bucketing,
padding rows, the scratch block and the buffers' refill between steps are all exercised. The
capture and replay branches run with torch.cuda faked (`FakeCuda`); real CUDA graphs need a
GPU (the `gpu` tests at the end). Greedy outputs must be token-identical to the default engine
and to the reference generator, with preemption, aborts, prefix-cache hits and batch sizes
between buckets; every engine is checked to be idle (empty KV pool) at the end by the
`make_llm` / `make_engine` fixtures.

The Triton decode kernel runs end to end in Triton's interpreter in a child process (see
test_decode_attention.py for why a child process).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tulu.engine import decode_attention as da
from tulu.engine.cuda_graphs import DecodeGraphRunner, batch_size_buckets
from tulu.engine.engine import EngineConfig, resolve_fast_path
from tulu.engine.reference import generate_ids
from tulu.engine.sampling import SamplingParams
from tulu.errors import GenerationError

pytestmark = pytest.mark.usefixtures("single_thread")

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512
BYTES_PER_TOKEN = 2 * 2 * 64 * 4  # the tiny model's K and V per token (float32)
LENGTHS = [1, 2, 5, 15, 16, 17, 31, 33, 64, 97, 128, 150, 3]
# Different max_tokens per prompt, so the decode batch shrinks one by one through every size
# between the buckets (13 rows -> bucket 16, 7 -> 8, 3 -> 4, ...).
MAX_TOKENS = [4 + i for i in range(len(LENGTHS))]


def random_prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


PROMPTS = random_prompts(LENGTHS)
PARAMS = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
TINY_POOL = (150 + 16 + 16) * BYTES_PER_TOKEN  # room for the longest request, barely


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def expected(tiny_model):
    return [generate_ids(tiny_model, p, s).token_ids for p, s in zip(PROMPTS, PARAMS, strict=True)]


class RunLog:
    """Records (rows, bucket) of every decode batch the runner serves."""

    def __init__(self, engine):
        runner = engine.decode_runner
        assert runner is not None
        self.calls: list[tuple[int, int]] = []
        original = runner.run

        def run(token_ids, positions, block_tables):
            self.calls.append((len(token_ids), runner.bucket_for(len(token_ids))))
            return original(token_ids, positions, block_tables)

        runner.run = run


# ---------------------------------------------------------------------------- settings
def test_buckets():
    assert batch_size_buckets(1) == [1]
    assert batch_size_buckets(5) == [1, 2, 4, 5]
    assert batch_size_buckets(8) == [1, 2, 4, 8]
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_size_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_size_buckets(256)[-3:] == [240, 248, 256] and len(batch_size_buckets(256)) == 35


def test_cpu_defaults_are_unchanged(tiny_model, make_engine):
    engine = make_engine(tiny_model)
    assert (engine.decode_attention, engine.cuda_graphs) == ("loop", False)
    assert engine.decode_runner is None and engine.decode_warmup_seconds is None
    assert engine.cache.num_blocks == engine.pool.num_blocks  # no scratch block


def test_fast_path_settings_are_checked(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_fast_path(EngineConfig(), cpu) == ("loop", False)
    assert resolve_fast_path(EngineConfig(decode_attention="auto"), cpu) == ("loop", False)
    assert resolve_fast_path(EngineConfig(decode_attention="sdpa"), cpu) == ("sdpa", False)
    with pytest.raises(GenerationError, match="decode_attention must be one of"):
        EngineConfig(decode_attention="flash")
    with pytest.raises(GenerationError, match="max_graph_batch_size"):
        EngineConfig(max_graph_batch_size=0)
    with pytest.raises(GenerationError, match="cuda_graphs=True needs a CUDA device"):
        resolve_fast_path(EngineConfig(decode_attention="sdpa", cuda_graphs=True), cpu)
    cuda = torch.device("cuda")
    with pytest.raises(GenerationError, match="graph-safe"):
        resolve_fast_path(EngineConfig(decode_attention="loop", cuda_graphs=True), cuda)
    assert resolve_fast_path(EngineConfig(decode_attention="sdpa"), cuda) == ("sdpa", True)
    assert resolve_fast_path(EngineConfig(decode_attention="sdpa", cuda_graphs=False), cuda) == (
        "sdpa",
        False,
    )
    assert resolve_fast_path(EngineConfig(), cuda) == ("loop", False)  # opt-in until measured
    monkeypatch.setattr("tulu.engine.engine.triton_available", lambda: False)
    assert resolve_fast_path(EngineConfig(decode_attention="auto"), cuda) == ("loop", False)
    with pytest.raises(GenerationError, match="needs the triton package"):
        resolve_fast_path(EngineConfig(decode_attention="triton"), cuda)
    monkeypatch.setattr("tulu.engine.engine.triton_available", lambda: True)
    assert resolve_fast_path(EngineConfig(decode_attention="auto"), cuda) == ("triton", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(GenerationError, match="TRITON_INTERPRET=1"):
        resolve_fast_path(EngineConfig(decode_attention="triton"), cpu)


def test_runner_refuses_batches_beyond_its_largest_bucket(tiny_model, make_engine):
    engine = make_engine(tiny_model, decode_attention="sdpa", max_graph_batch_size=4)
    runner = engine.decode_runner
    assert (
        runner.buckets == [1, 2, 4] and runner.bucket_for(3) == 4 and runner.bucket_for(5) is None
    )
    with pytest.raises(ValueError, match="5 rows"):
        runner.run([1] * 5, [0] * 5, [[0]] * 5)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphRunner(
            tiny_model,
            engine.cache,
            max_batch_size=2,
            max_model_len=256,
            scratch_block=0,
            use_graphs=True,
        )


# ---------------------------------------------------------------------------- greedy parity
def test_sdpa_fast_path_matches_default_engine_and_reference(tiny_model, make_llm, expected):
    llm = make_llm(tiny_model, decode_attention="sdpa")
    engine = llm.engine
    assert (engine.decode_attention, engine.cuda_graphs) == ("sdpa", False)
    assert engine.decode_warmup_seconds is not None
    assert engine.cache.num_blocks == engine.pool.num_blocks + 1  # the scratch block
    log = RunLog(engine)
    outputs = llm.generate(PROMPTS, PARAMS)
    assert token_ids(outputs) == expected
    assert token_ids(make_llm(tiny_model).generate(PROMPTS, PARAMS)) == expected
    rows = {n for n, _ in log.calls}
    assert rows == set(range(1, len(PROMPTS) + 1))  # every batch size, incl. between buckets
    assert {(n, b) for n, b in log.calls if n in (3, 5, 13)} == {(3, 4), (5, 8), (13, 16)}


FAST_CONFIGS = {
    "tiny-pool-preemption": dict(kv_cache_bytes=TINY_POOL),
    "small-buckets": dict(max_graph_batch_size=5),  # larger batches take the loop path
    "block-size-5-chunked": dict(block_size=5, max_num_batched_tokens=40),
    "block-size-1-tiny-pool": dict(block_size=1, kv_cache_bytes=TINY_POOL),
    "max-num-seqs-3": dict(max_num_seqs=3),
}


@pytest.mark.parametrize("config", FAST_CONFIGS.values(), ids=FAST_CONFIGS.keys())
def test_sdpa_fast_path_under_engine_configurations(tiny_model, make_llm, expected, config):
    llm = make_llm(tiny_model, decode_attention="sdpa", **config)
    log = RunLog(llm.engine)
    assert token_ids(llm.generate(PROMPTS, PARAMS)) == expected
    assert log.calls
    if config.get("kv_cache_bytes") and "block_size" not in config:
        assert llm.engine.stats()["preemptions"] > 0
    limit = config.get("max_graph_batch_size") or config.get("max_num_seqs")
    if limit:
        assert max(n for n, _ in log.calls) == limit


def test_sdpa_fast_path_with_aborts(tiny_model, make_engine, drain, expected):
    engine = make_engine(tiny_model, decode_attention="sdpa", kv_cache_bytes=TINY_POOL)
    ids = [
        engine.add_request(p, s, request_id=f"r{i}")
        for i, (p, s) in enumerate(zip(PROMPTS, PARAMS, strict=True))
    ]
    log = RunLog(engine)
    seen = {}
    for _ in range(6):
        for output in engine.step():
            seen[output.request_id] = output
    doomed = ["r0", "r3", "r8", "r12"]
    for rid in doomed:
        engine.abort(rid)
    rest = drain(engine)
    for i, rid in enumerate(ids):
        if rid not in doomed:
            final = rest[rid][-1] if rid in rest else seen[rid]
            assert final.outputs[0].token_ids == expected[i]
    assert log.calls


def test_sdpa_fast_path_with_prefix_cache_hits(tiny_model, make_llm):
    common = random_prompts([40], seed=7)[0]
    wave1 = [common + s for s in random_prompts([1, 3, 8, 20], seed=8)]
    wave2 = [common + s for s in random_prompts([2, 13, 5], seed=9)] + wave1[:2]
    want = [generate_ids(tiny_model, p, GREEDY).token_ids for p in wave1 + wave2]
    llm = make_llm(tiny_model, decode_attention="sdpa", block_size=8)
    log = RunLog(llm.engine)
    outputs = llm.generate(wave1, GREEDY) + llm.generate(wave2, GREEDY)
    assert token_ids(outputs) == want
    assert all(o.num_cached_tokens >= 40 for o in outputs[4:])
    assert log.calls


def test_sdpa_fast_path_seeded_sampling_matches_default(tiny_model, make_llm):
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=i, ignore_eos=True, n=2)
        for i in range(5)
    ]
    prompts = PROMPTS[:5]
    fast = make_llm(tiny_model, decode_attention="sdpa").generate(prompts, params)
    plain = make_llm(tiny_model).generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in fast] == [
        [c.token_ids for c in o.outputs] for o in plain
    ]


def test_prompt_logprobs_steps_take_the_loop_path(tiny_model, make_llm):
    """A decode whose request still scores its prompt needs hidden states: not the runner."""
    params = SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=1, ignore_eos=True)
    fast = make_llm(tiny_model, decode_attention="sdpa", max_num_batched_tokens=7)
    plain = make_llm(tiny_model, max_num_batched_tokens=7)
    a, b = fast.generate(PROMPTS[:3], params), plain.generate(PROMPTS[:3], params)
    assert token_ids(a) == token_ids(b)
    assert [o.prompt_logprobs for o in a] == [o.prompt_logprobs for o in b]


# ---------------------------------------------------------------------------- Triton (interpreted)
interpreted = pytest.mark.skipif(
    not da.triton_interpreting(),
    reason="needs TRITON_INTERPRET=1 before triton is imported: run in a child process by "
    "test_triton_fast_path_in_a_child_process",
)


@interpreted
def test_interpreted_triton_fast_path_matches_reference(tiny_model, make_llm):
    prompts = [PROMPTS[i] for i in (0, 5, 6, 9, 11)]  # 1, 17, 31, 97, 150 tokens
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 6, 4, 5, 2)
    ]
    want = [generate_ids(tiny_model, p, s).token_ids for p, s in zip(prompts, params, strict=True)]
    llm = make_llm(tiny_model, decode_attention="triton", kv_cache_bytes=TINY_POOL)
    log = RunLog(llm.engine)
    assert token_ids(llm.generate(prompts, params)) == want
    assert any(bucket > n for n, bucket in log.calls)  # some batch was padded


def test_triton_fast_path_in_a_child_process():
    from engine.test_decode_attention import run_interpreted_child

    assert "1 passed" in run_interpreted_child("tests/engine/test_cuda_graphs.py")


# ---------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def cuda_model(tiny_model):
    import copy

    return copy.deepcopy(tiny_model).to("cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_cuda_graphs_match_the_eager_engine(cuda_model, make_llm, attention):
    if attention == "triton" and not da.triton_available():
        pytest.skip("triton is not installed")
    llm = make_llm(
        cuda_model, decode_attention=attention, cuda_graphs=True, kv_cache_bytes=64 << 20
    )
    engine = llm.engine
    runner = engine.decode_runner
    assert engine.cuda_graphs and sorted(runner._graphs) == runner.buckets
    assert engine.decode_warmup_seconds > 0
    print(
        f"{attention}: captured {len(runner.buckets)} graphs in {engine.decode_warmup_seconds:.2f} s"
    )
    log = RunLog(engine)
    graphs = token_ids(llm.generate(PROMPTS, PARAMS))
    eager = token_ids(
        make_llm(cuda_model, decode_attention="loop", kv_cache_bytes=64 << 20).generate(
            PROMPTS, PARAMS
        )
    )
    assert graphs == eager
    assert {n for n, _ in log.calls} == set(range(1, len(PROMPTS) + 1))


@pytest.mark.gpu
@gpu
def test_cuda_auto_uses_triton_and_graphs(cuda_model, make_engine):
    if not da.triton_available():
        pytest.skip("triton is not installed")
    engine = make_engine(
        cuda_model, kv_cache_bytes=64 << 20, max_num_seqs=16, decode_attention="auto"
    )
    assert (engine.decode_attention, engine.cuda_graphs) == ("triton", True)
    assert engine.decode_runner.buckets == [1, 2, 4, 8, 16]


# ---------------------------------------------------------------------------- graphs, faked on CPU
class _Recorder(TorchDispatchMode):
    """Records every aten op run under it, with the very tensors it read and wrote."""

    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            # On a GPU a host sync (.item(), .tolist()) while capturing fails; its value would
            # be baked into the graph.
            raise RuntimeError("a host sync inside CUDA graph capture")
        out = func(*args, **kwargs)
        schema = func._schema
        if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            replay = "run"  # in place: writes where it wrote
        else:
            # Composite ops (reshape, to, ...) may return a view or a copy: what they did here
            # is what a graph would hold.
            inputs = {
                t.untyped_storage().data_ptr()
                for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            results = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            views = all(t.untyped_storage().data_ptr() in inputs for t in results)
            replay = "skip" if views else "copy"  # a view stays a view of its captured base
        self.ops.append((func, args, kwargs, out, replay))
        return out


class FakeCuda:
    """The torch.cuda calls of `DecodeGraphRunner`, run on the CPU, logged in call order.

    A graph is faithful to the one thing that makes CUDA graphs work or not: capture records
    the aten ops the block runs, on the tensors they ran on; replay re-runs those ops in order
    and writes each result into the very tensor captured (in-place ops write where they wrote;
    views stay views of their captured base). Python is not re-run, so a runner that rebinds a
    static buffer instead of copying into it, or reads outputs from anywhere but the captured
    tensors, gets stale results, as it would on a GPU.
    """

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.graphs: list[FakeCuda.Graph] = []
        self.events: list[FakeCuda.Event] = []
        self.pool = object()
        self.current = self.Stream(self, "current")
        self.stream_now = self.current
        self.capturing: FakeCuda.Graph | None = None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        class Graph(FakeCuda.Graph):
            def __init__(self) -> None:
                super().__init__(fake)

        class Event(FakeCuda.Event):
            def __init__(self) -> None:
                super().__init__(fake)

        @contextlib.contextmanager
        def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            fake.log.append(("capture", cuda_graph.index, pool))
            fake.capturing = cuda_graph
            try:
                with _Recorder(cuda_graph.ops):
                    yield
            finally:
                fake.capturing = None

        @contextlib.contextmanager
        def stream(s):
            before, fake.stream_now = fake.stream_now, s
            try:
                yield
            finally:
                fake.stream_now = before

        def synchronize(device=None):
            fake.log.append(("synchronize", torch.device(device)))

        def pool_handle():
            fake.log.append(("pool",))
            return fake.pool

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeCuda.Stream(fake, "side"))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.current)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", pool_handle)
        forward = DecodeGraphRunner._forward

        def logged_forward(runner, size):
            where = fake.capturing.index if fake.capturing is not None else None
            fake.log.append(("forward", size, fake.stream_now.name, where))
            return forward(runner, size)

        monkeypatch.setattr(DecodeGraphRunner, "_forward", logged_forward)

    class Stream:
        def __init__(self, fake: FakeCuda, name: str) -> None:
            self.fake, self.name = fake, name

        def wait_stream(self, other: FakeCuda.Stream) -> None:
            self.fake.log.append(("wait", self.name, other.name))

    class Graph:
        def __init__(self, fake: FakeCuda) -> None:
            self.fake, self.index, self.ops = fake, len(fake.graphs), []
            fake.graphs.append(self)

        def replay(self) -> None:
            self.fake.log.append(("replay", self.index))
            assert self.ops, "replay of a graph that captured nothing"
            for func, args, kwargs, captured, replay in self.ops:
                if replay == "skip":
                    continue
                result = func(*args, **kwargs)
                if replay == "copy":
                    for into, value in zip(
                        pytree.tree_leaves(captured), pytree.tree_leaves(result), strict=True
                    ):
                        if isinstance(into, torch.Tensor):
                            into.copy_(value)

    class Event:
        def __init__(self, fake: FakeCuda) -> None:
            self.fake, self.index = fake, len(fake.events)
            fake.events.append(self)

        def record(self, stream=None) -> None:
            self.fake.log.append(("record", self.index))

        def synchronize(self) -> None:
            self.fake.log.append(("event-sync", self.index))


CUDA = torch.device("cuda")


class FakeCudaRunner(DecodeGraphRunner):
    """The runner with graphs on, its buffers on the CPU: the constructor refuses
    `use_graphs=True` off CUDA, so it is built without and then told it is on CUDA (the
    device decides only the torch.cuda calls and non-blocking copies, all faked or harmless)."""

    def __init__(self, *args, use_graphs: bool, **kwargs) -> None:
        assert use_graphs, "the engine was meant to ask for graphs"
        super().__init__(*args, use_graphs=False, **kwargs)
        self.use_graphs, self.device = True, CUDA


def test_faked_cuda_graphs_capture_per_bucket_and_replay_matching_the_loop_path(
    tiny_model, make_llm, expected, monkeypatch
):
    """The capture and replay branches, with torch.cuda faked (see FakeCuda): side-stream
    warm-up of every bucket, then one capture per bucket, largest first, all in one pool; each
    decode step replays its bucket's graph (no eager forward) after the staging buffers' event
    of the step before is waited on; greedy tokens equal the loop path's."""
    loop = token_ids(make_llm(tiny_model, decode_attention="loop").generate(PROMPTS, PARAMS))
    assert loop == expected
    fake = FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setattr(
        "tulu.engine.engine.resolve_fast_path", lambda config, device: ("sdpa", True)
    )
    monkeypatch.setattr("tulu.engine.engine.DecodeGraphRunner", FakeCudaRunner)
    llm = make_llm(tiny_model, decode_attention="sdpa", max_graph_batch_size=16)
    engine = llm.engine
    runner = engine.decode_runner
    assert engine.cuda_graphs and isinstance(runner, FakeCudaRunner)
    buckets = [1, 2, 4, 8, 16]
    assert runner.buckets == buckets and runner.capture_seconds == engine.decode_warmup_seconds

    largest_first = buckets[::-1]
    assert fake.log == [
        ("wait", "side", "current"),
        *[("forward", size, "side", None) for size in largest_first],
        ("wait", "current", "side"),
        ("synchronize", CUDA),
        ("pool",),
        *[
            entry
            for i, size in enumerate(largest_first)
            for entry in (("capture", i, fake.pool), ("forward", size, "current", i))
        ],
        ("synchronize", CUDA),
    ]
    assert {size: g.index for size, g in runner._graphs.items()} == {
        size: i for i, size in enumerate(largest_first)
    }
    for size, graph in runner._graphs.items():
        assert graph.ops and runner._outputs[size].shape == (size, VOCAB)
        assert any(runner._outputs[size] is out for *_, out, _ in graph.ops)  # a captured tensor

    log = RunLog(engine)
    fake.log.clear()
    assert token_ids(llm.generate(PROMPTS, PARAMS)) == loop
    assert {n for n, _ in log.calls} == set(range(1, len(PROMPTS) + 1))  # 3 -> 4, 13 -> 16, ...
    index = {size: g.index for size, g in runner._graphs.items()}
    step_log = []
    for step, (_, bucket) in enumerate(log.calls):
        step_log += [("event-sync", step - 1)] if step else []
        step_log += [("record", step), ("replay", index[bucket])]
    assert fake.log == step_log  # replays only, no eager forward
