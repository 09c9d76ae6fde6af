"""Attention over the paged KV cache for one engine step (the model's AttentionBackend).

A step runs the new tokens of many sequences as one flat row: `[1, heads, N, head_size]`
queries, where sequence i owns columns `[q_start_i, q_end_i)`. Each layer first writes the new
keys and values into their cache slots, then attends every sequence's queries to its whole
context (cached prefix + new tokens, causal within the new ones).

This portable implementation gathers each sequence's blocks and calls SDPA once per sequence
(a fresh prefill attends to its own new keys without reading them back). A single padded SDPA
over all decoding sequences was measured slower on CPU: the padded gather allocates and copies
more than the per-sequence calls cost.
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

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        slots: list[int],
        seqs: list[tuple[int, int, int, list[int]]],
    ) -> StepLayout:
        # Slots and every sequence's block table go to the device as one tensor, split into
        # views: one host-to-device copy per step rather than one per sequence.
        bs = cache.block_size
        lengths = [-(-ctx // bs) for _, _, ctx, _ in seqs]
        flat = list(slots)
        for (_, _, _, table), length in zip(seqs, lengths, strict=True):
            flat.extend(table[:length])
        parts = torch.tensor(flat, dtype=torch.int64, device=cache.keys.device).split(
            [len(slots), *lengths]
        )
        slices = [
            SeqSlice(qs, qe, ctx, table)
            for (qs, qe, ctx, _), table in zip(seqs, parts[1:], strict=True)
        ]
        return cls(parts[0], slices)


class PagedAttention:
    """AttentionBackend over a PagedKVCache for one step's StepLayout."""

    def __init__(self, cache: PagedKVCache, layout: StepLayout):
        self.cache = cache
        self.layout = layout

    @staticmethod
    def _context(layer_cache: Tensor, s: SeqSlice, heads: int, head_size: int) -> Tensor:
        """A sequence's cached keys (or values) as [1, heads, context, head_size].

        Made contiguous: SDPA on CPU is measurably faster on contiguous heads than on the
        strided view of the gathered blocks.
        """
        gathered = layer_cache[s.block_table].view(-1, heads, head_size)[: s.context_len]
        return gathered.transpose(0, 1).contiguous().unsqueeze(0)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache, layout = self.cache, self.layout
        heads, head_size = q.shape[1], q.shape[3]
        flat_k = cache.keys[layer_idx].view(-1, heads, head_size)
        flat_v = cache.values[layer_idx].view(-1, heads, head_size)
        flat_k[layout.slots] = k[0].transpose(0, 1)
        flat_v[layout.slots] = v[0].transpose(0, 1)

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
            keys = self._context(cache.keys[layer_idx], s, heads, head_size)
            values = self._context(cache.values[layer_idx], s, heads, head_size)
            if n == 1:
                out = F.scaled_dot_product_attention(queries, keys, values)
            else:
                past = s.context_len - n
                mask = torch.ones(n, s.context_len, dtype=torch.bool, device=q.device).tril(past)
                out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
