"""Attention over the paged KV cache for one engine step (the model's AttentionBackend).

A step runs the new tokens of many sequences as one flat row: `[1, heads, N, head_size]`
queries, where sequence i owns columns `[q_start_i, q_end_i)`. Each layer first writes the new
keys and values into their cache slots, then attends every sequence's queries to its whole
context (cached prefix + new tokens, causal within the new ones).

This portable implementation gathers each sequence's blocks and calls SDPA. Decode-only
steps (one new token per sequence) use a single padded SDPA call over all sequences instead of
one call per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tulu.engine.kv_cache import PagedKVCache


@dataclass
class SeqSlice:
    """One sequence's part of the step: its queries and its full context."""

    q_start: int
    q_end: int
    context_len: int  # tokens in the cache after this step's tokens are written
    block_table: Tensor  # [blocks needed for context_len] int64, on the cache's device


@dataclass
class StepLayout:
    """Where this step's tokens go and what each sequence attends to."""

    slots: Tensor  # [N] flat cache slot of every new token
    seqs: list[SeqSlice]
    decode_gather: Tensor | None = None  # [S, max_ctx] flat slots, for decode-only steps
    decode_mask: Tensor | None = None  # [S, 1, 1, max_ctx] True where a key is real

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        slots: list[int],
        seqs: list[tuple[int, int, int, list[int]]],
    ) -> StepLayout:
        device = cache.keys.device
        bs = cache.block_size
        slices = [
            SeqSlice(
                qs, qe, ctx, torch.tensor(table[: -(-ctx // bs)], dtype=torch.int64, device=device)
            )
            for qs, qe, ctx, table in seqs
        ]
        layout = cls(torch.tensor(slots, dtype=torch.int64, device=device), slices)
        if seqs and all(qe - qs == 1 for qs, qe, _, _ in seqs) and len(seqs) > 1:
            layout._plan_batched_decode(cache)
        return layout

    def _plan_batched_decode(self, cache: PagedKVCache) -> None:
        bs = cache.block_size
        max_ctx = max(s.context_len for s in self.seqs)
        total = sum(s.context_len for s in self.seqs)
        if max_ctx * len(self.seqs) > 2 * total:
            return  # too much padding: the per-sequence path reads less
        device = cache.keys.device
        positions = torch.arange(max_ctx, device=device)
        rows = []
        for s in self.seqs:
            table = s.block_table
            blocks = table[torch.clamp(positions // bs, max=table.numel() - 1)]
            rows.append(blocks * bs + positions % bs)
        self.decode_gather = torch.stack(rows)
        lengths = torch.tensor([s.context_len for s in self.seqs], device=device)
        self.decode_mask = (positions[None, :] < lengths[:, None])[:, None, None, :]


class PagedAttention:
    """AttentionBackend over a PagedKVCache for one step's StepLayout."""

    def __init__(self, cache: PagedKVCache, layout: StepLayout):
        self.cache = cache
        self.layout = layout

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache, layout = self.cache, self.layout
        heads, head_size = q.shape[1], q.shape[3]
        flat_k = cache.keys[layer_idx].view(-1, heads, head_size)
        flat_v = cache.values[layer_idx].view(-1, heads, head_size)
        flat_k[layout.slots] = k[0].transpose(0, 1)
        flat_v[layout.slots] = v[0].transpose(0, 1)

        if layout.decode_gather is not None:
            # [S, max_ctx, H, D] -> [S, H, max_ctx, D]; queries [S, H, 1, D]
            keys = flat_k[layout.decode_gather].transpose(1, 2)
            values = flat_v[layout.decode_gather].transpose(1, 2)
            queries = q[0].transpose(0, 1).unsqueeze(2)
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=layout.decode_mask
            )
            return out.squeeze(2).transpose(0, 1).unsqueeze(0)

        outputs = []
        for s in layout.seqs:
            n = s.q_end - s.q_start
            queries = q[:, :, s.q_start : s.q_end]
            if n == s.context_len:
                # A fresh prefill: the whole context is this step's tokens, no need to read back.
                out = F.scaled_dot_product_attention(
                    queries,
                    k[:, :, s.q_start : s.q_end],
                    v[:, :, s.q_start : s.q_end],
                    is_causal=True,
                )
                outputs.append(out)
                continue
            keys = cache.keys[layer_idx][s.block_table].view(-1, heads, head_size)[: s.context_len]
            values = cache.values[layer_idx][s.block_table].view(-1, heads, head_size)[
                : s.context_len
            ]
            keys, values = keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)
            if n == 1:
                out = F.scaled_dot_product_attention(queries, keys, values)
            else:
                past = s.context_len - n
                mask = torch.ones(n, s.context_len, dtype=torch.bool, device=q.device).tril(past)
                out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
