"""Graph-safe attention for decode steps: one new token per sequence, fixed-shape inputs.

A decode step runs a batch of B sequences with exactly one new token each, as model input
`[B, 1]`. Everything the attention needs is a fixed-shape tensor, so that it can live in the
static buffers of a captured CUDA graph (`tulu.engine.cuda_graphs`) and be refilled between
replays:

- `slots [B] int64`: flat cache slot (`block * block_size + row`) of each new token;
- `block_tables [B, max_blocks] int32`: each sequence's blocks, padded with any valid block id;
- `context_lens [B] int32`: tokens in the cache after this step's token is written.

Padding rows (a batch padded up to a captured size) have context length 0 and their slot is a
reserved scratch slot that no sequence owns, so their writes land nowhere that matters and their
(finite, meaningless) outputs are discarded by the caller.

`DecodeAttention.attend` first writes the new keys and values with `index_copy_` (no `.item()`,
no Python branching on tensor values), then attends with one of two implementations:

- `"sdpa"`: gathers every row's blocks into `[B, heads, max_blocks * block_size, head_size]`,
  masks positions at or beyond the context length, and calls SDPA once. Portable (CPU tests, and
  the GPU fallback without Triton) but it reads and copies `max_blocks * block_size` positions
  per row whatever the real context length.
- `"triton"`: a paged-attention decode kernel that reads keys and values straight from the cache
  through the block table. One program per (sequence, head) walks that sequence's blocks with an
  online softmax in float32 (flash-decoding without the split). A split over the context
  (flash-decoding / vLLM's paged attention v2) pays off only when batch x heads is below the
  number of SMs *and* contexts are long; Pythia's 8-40 heads fill an H100's 132 SMs from a
  handful of sequences up, and at small batch the step is dominated by reading the weights, so
  the single-pass kernel is the simpler first version. The loop bound comes from
  `context_lens` in device memory, so one captured launch serves every context length.

The Triton kernel is defined on first use (importing Triton costs time and memory that CPU runs
do not need). With `TRITON_INTERPRET=1` in the environment *before Triton is first imported*
(Triton's own library functions are defined at import) it runs on CPU tensors in Triton's
interpreter; that is how the CPU tests check it, in a child process.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tulu.engine.kv_cache import PagedKVCache

IMPLEMENTATIONS = ("sdpa", "triton")


@dataclass
class DecodeMetadata:
    """Where a decode batch's new tokens go and what each row attends to (fixed shapes)."""

    slots: Tensor  # [B] int64
    block_tables: Tensor  # [B, max_blocks] int32
    context_lens: Tensor  # [B] int32; 0 for padding rows


def write_kv(cache: PagedKVCache, layer_idx: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """Store the new keys/values ([B, heads, head_size]) at `slots` of layer `layer_idx`."""
    heads, head_size = k.shape[-2], k.shape[-1]
    cache.keys[layer_idx].view(-1, heads, head_size).index_copy_(0, slots, k)
    cache.values[layer_idx].view(-1, heads, head_size).index_copy_(0, slots, v)


def sdpa_paged_decode(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor, context_lens: Tensor
) -> Tensor:
    """Decode attention by gather + one masked SDPA.

    q: [B, heads, head_size]; key_cache/value_cache: [num_blocks, block_size, heads, head_size]
    (one layer). Returns [B, heads, head_size]. A padding row (context length 0) attends to the
    first slot of its block table, so its output is finite.
    """
    b, heads, head_size = q.shape
    length = block_tables.shape[1] * key_cache.shape[1]
    keys = key_cache[block_tables].view(b, length, heads, head_size).transpose(1, 2)
    values = value_cache[block_tables].view(b, length, heads, head_size).transpose(1, 2)
    positions = torch.arange(length, device=q.device)
    mask = positions[None, :] < context_lens.clamp(min=1)[:, None]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :]
    )
    return out.squeeze(2)


# ------------------------------------------------------------------------------------ Triton
def triton_available() -> bool:
    """Whether Triton can be imported (it says nothing about a GPU being present)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


_KERNEL: list[Any] = []


def _kernel() -> Any:
    """The jitted kernel, defined on first use."""
    if _KERNEL:
        return _KERNEL[0]
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(
        out_ptr,
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        context_lens_ptr,
        scale,
        stride_ob,
        stride_oh,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_bt,
        HEAD_SIZE: tl.constexpr,
        HEAD_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_PAD: tl.constexpr,
        PAGES: tl.constexpr,
    ):
        # One program per (sequence, head); each iteration covers PAGES cache blocks.
        seq = tl.program_id(0)
        head = tl.program_id(1)
        context_len = tl.load(context_lens_ptr + seq)

        d = tl.arange(0, HEAD_PAD)
        d_ok = d < HEAD_SIZE
        q = tl.load(q_ptr + seq * stride_qb + head * stride_qh + d, mask=d_ok, other=0.0)
        q = q.to(tl.float32) * scale

        # Token j of a tile is row j % BLOCK_PAD of the tile's (j // BLOCK_PAD)-th page.
        j = tl.arange(0, PAGES * BLOCK_PAD)
        page_of = j // BLOCK_PAD
        row = j % BLOCK_PAD
        row_ok = row < BLOCK_SIZE

        m_i = float("-inf")
        l_i = 0.0
        acc = tl.zeros([HEAD_PAD], dtype=tl.float32)
        num_pages = tl.cdiv(context_len, BLOCK_SIZE)
        for first_page in range(0, num_pages, PAGES):
            page = first_page + page_of
            pos = page * BLOCK_SIZE + row
            valid = row_ok & (pos < context_len)
            block = tl.load(block_tables_ptr + seq * stride_bt + page, mask=valid, other=0)
            block = block.to(tl.int64)
            tile_ok = valid[:, None] & d_ok[None, :]
            k = tl.load(
                k_cache_ptr
                + block[:, None] * stride_kb
                + row[:, None] * stride_kt
                + head * stride_kh
                + d[None, :],
                mask=tile_ok,
                other=0.0,
            ).to(tl.float32)
            scores = tl.sum(k * q[None, :], axis=1)
            scores = tl.where(valid, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new)
            p = tl.where(valid, p, 0.0)
            v = tl.load(
                v_cache_ptr
                + block[:, None] * stride_vb
                + row[:, None] * stride_vt
                + head * stride_vh
                + d[None, :],
                mask=tile_ok,
                other=0.0,
            ).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new

        # A padding row (context 0) never enters the loop: write zeros, not 0/0.
        denom = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / denom
        tl.store(
            out_ptr + seq * stride_ob + head * stride_oh + d,
            out.to(out_ptr.dtype.element_ty),
            mask=d_ok,
        )

    _KERNEL.append(paged_decode_kernel)
    return paged_decode_kernel


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def triton_paged_decode(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """Decode attention with the Triton kernel; same contract as `sdpa_paged_decode`.

    Accumulates in float32 whatever the cache dtype (float32, float16, bfloat16); any head
    size and block size (padded to powers of two inside the kernel and masked).
    """
    b, heads, head_size = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_size = key_cache.shape[1]
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head dimension must be contiguous")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    block_pad = _next_power_of_2(block_size)
    # About 64 cached tokens per loop iteration (at least one page).
    pages = max(1, 64 // block_pad)
    _kernel()[(b, heads)](
        out,
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        1.0 / math.sqrt(head_size),
        out.stride(0),
        out.stride(1),
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        HEAD_SIZE=head_size,
        HEAD_PAD=_next_power_of_2(head_size),
        BLOCK_SIZE=block_size,
        BLOCK_PAD=block_pad,
        PAGES=pages,
    )
    return out


# ------------------------------------------------------------------------------------ backend
class DecodeAttention:
    """AttentionBackend for a decode batch: q/k/v are [B, heads, 1, head_size]."""

    def __init__(self, cache: PagedKVCache, meta: DecodeMetadata, impl: str = "sdpa"):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"decode attention must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.cache = cache
        self.meta = meta
        self.impl = impl

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        meta = self.meta
        write_kv(self.cache, layer_idx, meta.slots, k[:, :, 0], v[:, :, 0])
        key_cache, value_cache = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        if self.impl == "triton":
            out = triton_paged_decode(
                q[:, :, 0], key_cache, value_cache, meta.block_tables, meta.context_lens
            )
        else:
            out = sdpa_paged_decode(
                q[:, :, 0], key_cache, value_cache, meta.block_tables, meta.context_lens
            )
        return out.unsqueeze(2)
