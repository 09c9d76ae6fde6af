"""The decode step as CUDA graphs captured at start-up, over static input buffers.

A decode step (one new token for each of B sequences) launches hundreds of small kernels per
layer; at small batch the GPU waits on Python and the launch queue. `DecodeGraphRunner` owns
static buffers sized for the largest batch (input ids, positions, cache slots, block tables,
context lengths), captures one `torch.cuda.CUDAGraph` per batch-size bucket at start-up (all
sharing one memory pool, largest first), and for each step pads the batch up to the next
bucket, copies the inputs into the buffers and replays that bucket's graph. Attention is the
graph-safe `DecodeAttention` (`tulu.engine.decode_attention`): Triton on CUDA, else SDPA.

Buckets follow vLLM: 1, 2, 4, 8, then multiples of 8 up to the largest captured size (which is
always a bucket). Padding rows write their keys/values to a scratch slot in a block that no
sequence owns (the engine allocates the cache one block larger than its pool) and attend to
that block only; their logits are dropped.

With `use_graphs=False` the same static-buffer forward runs eagerly, bucket padding included:
that is how the CPU tests exercise everything here except the capture and replay themselves.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from tulu.engine.decode_attention import DecodeAttention, DecodeMetadata
from tulu.engine.kv_cache import PagedKVCache
from tulu.model.gpt_neox import GPTNeoXForCausalLM

logger = logging.getLogger(__name__)


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to `max_batch_size` (always included)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += list(range(8, max_batch_size, 8))
    sizes.append(max_batch_size)
    return sizes


class DecodeGraphRunner:
    """Runs decode batches of up to `max_batch_size` rows through static buffers.

    `scratch_block` is a cache block outside the engine's block pool; padding rows write to its
    first slot and read only it.
    """

    def __init__(
        self,
        model: GPTNeoXForCausalLM,
        cache: PagedKVCache,
        *,
        max_batch_size: int,
        max_model_len: int,
        scratch_block: int,
        attention: str = "sdpa",
        use_graphs: bool = False,
    ):
        param = next(model.parameters())
        device = param.device
        if use_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        if not 0 <= scratch_block < cache.num_blocks:
            raise ValueError(f"scratch block {scratch_block} is outside the cache")
        self.model = model
        self.cache = cache
        self.device = device
        self.attention = attention
        self.use_graphs = use_graphs
        self.buckets = batch_size_buckets(max_batch_size)
        self.max_batch_size = self.buckets[-1]
        self.block_size = cache.block_size
        self.max_blocks = -(-max_model_len // cache.block_size)
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * cache.block_size

        n = self.max_batch_size
        self.input_ids = torch.zeros(n, 1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, 1, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full(
            (n, self.max_blocks), scratch_block, dtype=torch.int32, device=device
        )
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        # Host staging for one step: ids, positions, slots, context lengths; block tables.
        self._host_ints = torch.zeros(4, n, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, pin_memory=pin)

        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, Tensor] = {}
        self.capture_seconds: float | None = None
        self._copied: torch.cuda.Event | None = None

    # ---------------------------------------------------------------- forward
    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest bucket holding `batch_size` rows (None if too many)."""
        for size in self.buckets:
            if size >= batch_size:
                return size
        return None

    def _forward(self, size: int) -> Tensor:
        """Logits [size, vocab] for the first `size` rows of the static buffers."""
        meta = DecodeMetadata(self.slots[:size], self.block_tables[:size], self.context_lens[:size])
        hidden = self.model.hidden_states(
            self.input_ids[:size],
            self.positions[:size],
            backend=DecodeAttention(self.cache, meta, self.attention),
        )
        return self.model.embed_out(hidden[:, 0])

    @torch.inference_mode()
    def capture(self) -> float:
        """Warm up and, with graphs on, capture one graph per bucket. Returns the seconds taken.

        The buffers hold padding rows only (scratch slot, context 0), so warm-up touches no
        sequence's cache. Without graphs this is a single eager warm-up at the smallest size.
        """
        started = time.perf_counter()
        self._reset_rows(0, self.max_batch_size)
        if not self.use_graphs:
            self._forward(self.buckets[0])
            self.capture_seconds = time.perf_counter() - started
            return self.capture_seconds
        # Warm up every size eagerly on a side stream, as torch advises: Triton compiles (and
        # loads) its kernel, cuBLAS picks its algorithms and workspaces, before any capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.buckets):
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        # Largest first: later, smaller graphs reuse the pool's blocks.
        for size in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[size] = self._forward(size)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s, %s attention) in %.1f s",
            len(self._graphs),
            self.buckets,
            self.attention,
            self.capture_seconds,
        )
        return self.capture_seconds

    def _reset_rows(self, start: int, end: int) -> None:
        """Make rows [start, end) padding: scratch slot and block, context 0."""
        if end <= start:
            return
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slots[start:end] = self.scratch_slot
        self.block_tables[start:end] = self.scratch_block
        self.context_lens[start:end] = 0

    @torch.inference_mode()
    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        block_tables: list[list[int]],
    ) -> Tensor:
        """Logits [n, vocab] for n sequences each decoding one token.

        Row i is token `token_ids[i]` at position `positions[i]` of a sequence whose blocks are
        `block_tables[i]` (enough blocks to hold position `positions[i]`); its context after
        this step is `positions[i] + 1` tokens. The returned tensor is a view of the runner's
        output: read it before the next call.
        """
        n = len(token_ids)
        size = self.bucket_for(n)
        if size is None or n == 0:
            raise ValueError(f"a decode batch of {n} rows (1..{self.max_batch_size} allowed)")
        bs = self.block_size
        if self._copied is not None:
            # The previous step's copies read the pinned staging buffers we are about to fill.
            self._copied.synchronize()
        ints = self._host_ints
        ints[:, n:size] = 0  # padding rows: token 0 at position 0, context 0 ...
        ints[2, n:size] = self.scratch_slot  # ... writing to the scratch slot
        ints[0, :n] = torch.tensor(token_ids, dtype=torch.int64)
        pos = torch.tensor(positions, dtype=torch.int64)
        ints[1, :n] = pos
        ints[3, :n] = pos + 1
        used = [p // bs + 1 for p in positions]
        ints[2, :n] = torch.tensor(
            [
                table[p // bs] * bs + p % bs
                for p, table in zip(positions, block_tables, strict=True)
            ],
            dtype=torch.int64,
        )
        width = max(used)
        pad = self.scratch_block
        tables = self._host_tables
        tables[:size].fill_(pad)
        tables[:n, :width] = torch.tensor(
            [table[:u] + [pad] * (width - u) for u, table in zip(used, block_tables, strict=True)],
            dtype=torch.int32,
        )

        non_blocking = self.device.type == "cuda"
        self.input_ids[:size, 0].copy_(ints[0, :size], non_blocking=non_blocking)
        self.positions[:size, 0].copy_(ints[1, :size], non_blocking=non_blocking)
        self.slots[:size].copy_(ints[2, :size], non_blocking=non_blocking)
        self.context_lens[:size].copy_(ints[3, :size], non_blocking=non_blocking)
        self.block_tables[:size].copy_(tables[:size], non_blocking=non_blocking)
        if non_blocking:
            self._copied = torch.cuda.Event()
            self._copied.record()

        graph = self._graphs.get(size)
        if graph is None:
            logits = self._forward(size)
        else:
            graph.replay()
            logits = self._outputs[size]
        return logits[:n]
