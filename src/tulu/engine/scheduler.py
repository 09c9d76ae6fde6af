"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (`max_num_batched_tokens`). Running sequences come first, in
arrival order: a decoding sequence needs one token, a sequence still in prefill gets the next
chunk of its prompt (chunked prefill, so a long prompt never stalls the decodes beside it).
With speculative decoding, the budget and blank blocks left after that go to decoding
sequences' proposed tokens (never preempting, never evicting a cached prefix, leaving the
watermark to waiting requests). Whatever budget is left admits waiting sequences, reusing
cached prefix blocks first.

Prefix blocks are shared within a step too. Each layer of the step's forward pass writes the
keys and values of all the step's tokens before any sequence attends, so a sequence admitted
in the same step as the one computing its prefix can read that prefix's blocks: a batch of
few-shot prompts (or the n samples of one request) computes the shared exemplars once, not
once per prompt. (A running prefill that does not finish in a step has taken the rest of the
step's budget, so nothing is admitted beside it: no sequence computes a block that another
completes in a later step.)

When the block pool runs dry, the most recently admitted running sequence is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed later (its
generated tokens are kept, so its output does not change).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tulu.engine.kv_cache import BlockHash, BlockPool, hash_block
from tulu.engine.output import IncrementalOutput
from tulu.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sampled continuation of a request (a request with n > 1 has n sequences)."""

    seq_id: int
    request_id: str
    index: int
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    arrival: float
    generator: torch.Generator | None = None
    output: IncrementalOutput | None = None
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    # Leading blocks of block_table already offered to the prefix cache (register_computed_blocks
    # visits only the blocks completed since, not the whole table every step).
    num_registered_blocks: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens the prefix cache served at first admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # The LoRA adapter the sequence runs with (`tulu.engine.lora`; 0 = the base model) and
    # the seed of its block hashes: keys and values depend on the adapter, so cached blocks
    # are shared only between sequences of the same adapter.
    lora_slot: int = 0
    lora_salt: bytes | None = None
    # The xgrammar matcher of a structured output (`tulu.engine.structured`): the sequence's
    # own, since it holds how far the grammar has got.
    grammar: Any = field(default=None, repr=False)
    # The request's bad_words as token sequences (`sampling.bad_word_token_ids`).
    bad_words: tuple[tuple[int, ...], ...] = ()
    # Speculative decoding's copy of token_ids as bytes (`tulu.engine.speculative`), grown as
    # tokens are added, so a step converts only the new ones.
    token_bytes: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # Speculative decoding: tokens proposed after the sequence's last one, computed in this
    # step with it (they are in num_new_tokens) and kept only where the model agrees.
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        watermark: float = 0.01,
        propose: Callable[[Sequence], list[int]] | None = None,
    ):
        self.pool = pool
        # Speculative decoding's proposer (`tulu.engine.speculative`): a decoding sequence's
        # draft tokens, [] for none.
        self.propose = propose
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # Admission keeps this many blocks spare so running decodes are not preempted at once.
        self.watermark_blocks = int(watermark * pool.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Prefix-cache effectiveness, counted in full blocks at admission.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---------------------------------------------------------------- queue
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._free_blocks(seq)
        seq.status = SeqStatus.FINISHED

    # ---------------------------------------------------------------- blocks
    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _allocate(self, seq: Sequence, num_blocks: int) -> None:
        for _ in range(num_blocks):
            seq.block_table.append(self.pool.allocate())

    def _free_blocks(self, seq: Sequence) -> None:
        self.pool.release_all(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def _match_prefix(self, seq: Sequence, in_flight: dict[BlockHash, int] | None) -> None:
        """Reuse cached blocks for the leading full blocks of a newly admitted sequence, and
        blocks this step completes (`in_flight`, by hash): the step writes them before any
        attention reads them.

        At least one token is left to compute: the step needs logits at the last position.
        """
        if seq.block_table:
            return
        shareable = self._shareable_blocks(seq)
        self._extend_hashes(seq, shareable * self.block_size)
        for block_hash in seq.block_hashes[:shareable]:
            block = self.pool.lookup(block_hash)
            if block is None and in_flight is not None:
                block = in_flight.get(block_hash)
                if block is not None:
                    self.pool.share(block)
            if block is None:
                break
            seq.block_table.append(block)
        seq.num_computed = len(seq.block_table) * self.block_size

    def _shareable_blocks(self, seq: Sequence) -> int:
        """How many leading blocks of `seq` admission may take from the cache or the step.

        Never the block of its last token, which the step must compute for logits, even if
        the sequence holds that block's hash: taking it would schedule the sequence with
        nothing to compute, and the step would sample it from another sequence's row. Zero
        when it skips the prefix cache: every prompt position must be computed to score it
        (prompt log-probabilities).
        """
        if not self.pool.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        return (seq.num_tokens - 1) // self.block_size

    def _extend_hashes(self, seq: Sequence, upto_tokens: int) -> None:
        bs = self.block_size
        while (len(seq.block_hashes) + 1) * bs <= upto_tokens:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.lora_salt
            seq.block_hashes.append(hash_block(parent, seq.token_ids[j * bs : (j + 1) * bs]))

    def register_computed_blocks(self, seq: Sequence) -> None:
        """After a step: make the sequence's newly completed blocks findable for reuse.

        Only blocks completed since the last call are offered: the earlier ones were offered
        already (and blocks reused from the cache at admission are registered), so visiting the
        whole table every step would cost O(blocks) per sequence per step for nothing.
        """
        if not self.pool.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, seq.num_computed)
        for j in range(seq.num_registered_blocks, full):
            self.pool.register(seq.block_table[j], seq.block_hashes[j])
        seq.num_registered_blocks = full

    # ---------------------------------------------------------------- scheduling
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(seq.num_tokens - seq.num_computed, budget)
            target = seq.num_computed + count
            # Preempting others does not change what this sequence needs: compute it once.
            needed = self._blocks_needed(seq, target)
            while needed > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # it preempted itself: every later sequence is gone too
            self._allocate(seq, needed)
            scheduled.append(ScheduledSeq(seq, count))
            budget -= count
            index += 1
        if self.propose is not None and not preempted:
            budget -= self._add_drafts(scheduled, budget)

        in_flight: dict[BlockHash, int] | None = None  # built once admission can happen
        while (
            self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs
        ):
            if in_flight is None and self.pool.enable_prefix_caching:
                in_flight = self._in_flight(scheduled)
            seq = self.waiting[0]
            self._match_prefix(seq, in_flight)
            remaining = seq.num_tokens - seq.num_computed
            if self.enable_chunked_prefill:
                count = min(remaining, budget)
            elif remaining <= budget or not scheduled:
                # Without chunking a sequence runs whole; alone in a step it may exceed the
                # budget, or a prompt longer than the budget would never run.
                count = remaining
            else:
                self._undo_prefix(seq)
                break
            needed = self._blocks_needed(seq, seq.num_computed + count)
            if needed > self.pool.num_free - self.watermark_blocks:
                if self.running or scheduled:
                    self._undo_prefix(seq)
                    break
                # Nothing else is running: the watermark protects nobody, use the whole pool.
                if needed > self.pool.num_free:
                    self._undo_prefix(seq)
                    break
            self.waiting.popleft()
            self.prefix_queries += len(seq.block_hashes) if self.pool.enable_prefix_caching else 0
            self.prefix_hits += seq.num_computed // self.block_size
            if seq.num_preemptions == 0:
                # What the cache served the request, as vLLM counts it: a readmission after a
                # preemption mostly finds the blocks this sequence computed itself.
                seq.num_cached_prompt_tokens = seq.num_computed
            self._allocate(seq, needed)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, count))
            budget -= min(count, budget)
            if in_flight is not None:
                self._note_in_flight(seq, seq.num_computed + count, in_flight)
        return SchedulerOutput(scheduled, preempted)

    def _add_drafts(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        """Give the step's decoding sequences their proposed tokens, from the budget and the
        free blocks left once every running sequence has what it needs: proposals never
        preempt anyone nor take a decode's place. Only blank blocks: a block holding a cached
        prefix is worth more than a guess; and while requests wait, not the watermark's
        blocks, which admission keeps for them. Returns the budget they took."""
        used = 0
        reserve = self.watermark_blocks if self.waiting else 0
        for item in scheduled:
            seq = item.seq
            if used >= budget:
                break
            if item.num_new_tokens != 1 or seq.num_tokens - seq.num_computed != 1:
                continue  # a prefill chunk, or a recompute after preemption
            # Cut to the budget and to the slots its blocks and the blank blocks hold.
            blank = max(self.pool.num_free - self.pool.num_cached - reserve, 0)
            room = (len(seq.block_table) + blank) * self.block_size
            drafts = self.propose(seq)[: min(budget - used, room - seq.num_tokens)]
            if not drafts:
                continue
            self._allocate(seq, self._blocks_needed(seq, seq.num_tokens + len(drafts)))
            item.num_new_tokens += len(drafts)
            item.draft_token_ids = drafts
            used += len(drafts)
        return used

    def release_unused_blocks(self, seq: Sequence) -> None:
        """Give back the blocks past a sequence's tokens: taken for proposed tokens the model
        refused, they hold nothing (and were never offered to the prefix cache)."""
        keep = -(-seq.num_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.pool.release_all(seq.block_table[keep:])
            del seq.block_table[keep:]

    def _in_flight(self, scheduled: list[ScheduledSeq]) -> dict[BlockHash, int]:
        """The full blocks the step's running sequences complete, by hash."""
        in_flight: dict[BlockHash, int] = {}
        for item in scheduled:
            self._note_in_flight(item.seq, item.seq.num_computed + item.num_new_tokens, in_flight)
        return in_flight

    def _note_in_flight(
        self, seq: Sequence, computed_after_step: int, in_flight: dict[BlockHash, int]
    ) -> None:
        """Record the full blocks `seq` completes in this step, unless an identical block is
        cached already. Decoding sequences are skipped: a block completed by a generated token
        is rarely another prompt's prefix, and there are many of them, every step."""
        if seq.num_tokens - seq.num_computed <= 1:
            return
        bs = self.block_size
        self._extend_hashes(seq, computed_after_step)
        for j in range(seq.num_computed // bs, computed_after_step // bs):
            if not self.pool.peek(seq.block_hashes[j]):
                in_flight.setdefault(seq.block_hashes[j], seq.block_table[j])

    def _undo_prefix(self, seq: Sequence) -> None:
        self._free_blocks(seq)
        seq.num_computed = 0
