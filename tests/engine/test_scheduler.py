"""Tests for tulu.engine.scheduler on a bare BlockPool (no model): the engine's step is
simulated by `Sim`, which advances `num_computed`, "samples" a token once a sequence's
tokens are all computed and retires sequences after `max_tokens` outputs."""

from __future__ import annotations

import random

import pytest

from tulu.engine.kv_cache import BlockPool, prefix_hashes
from tulu.engine.sampling import SamplingParams
from tulu.engine.scheduler import Scheduler, SchedulerOutput, SeqStatus, Sequence

NEW_TOKEN = 3


class Sim:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 64,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        watermark: float = 0.0,
    ):
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.sched = Scheduler(
            self.pool,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            watermark=watermark,
        )
        self.seqs: list[Sequence] = []
        self.finished: list[Sequence] = []
        self.history: list[SchedulerOutput] = []
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, row) -> prefix

    def add(
        self, prompt_len: int, max_tokens: int = 4, first_token: int | None = None, **params
    ) -> Sequence:
        """Queue a sequence whose prompt is `first_token, first_token + 1, ...`; by default
        every sequence gets its own tokens, so nothing is shared through the prefix cache."""
        i = len(self.seqs)
        if first_token is None:
            first_token = 1000 * (i + 1)
        seq = Sequence(
            seq_id=i,
            request_id=f"r{i}",
            index=0,
            token_ids=list(range(first_token, first_token + prompt_len)),
            num_prompt_tokens=prompt_len,
            params=SamplingParams(max_tokens=max_tokens, **params),
            arrival=float(i),
        )
        self.seqs.append(seq)
        self.sched.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.history.append(out)
        self.check(out)
        self.forward(out)
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed += item.num_new_tokens
            self.sched.register_computed_blocks(seq)
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(NEW_TOKEN)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    self.sched.remove(seq)
                    self.finished.append(seq)
        return out

    def forward(self, out: SchedulerOutput) -> None:
        """What the model's forward pass does with the cache, checked: every layer first
        writes the keys and values of all the step's tokens, then each sequence attends to its
        whole context, which must hold exactly its own tokens (a block shared with a sequence
        that computes it in this same step has been written by then). A slot holds the token
        prefix it was computed from."""
        bs = self.pool.block_size
        for item in out.scheduled:
            seq = item.seq
            for p in range(seq.num_computed, seq.num_computed + item.num_new_tokens):
                self.slots[seq.block_table[p // bs], p % bs] = tuple(seq.token_ids[: p + 1])
        for item in out.scheduled:
            seq = item.seq
            for p in range(seq.num_computed + item.num_new_tokens):
                held = self.slots.get((seq.block_table[p // bs], p % bs))
                assert held == tuple(seq.token_ids[: p + 1]), (seq.seq_id, p)

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("the scheduler made no progress")

    def check(self, out: SchedulerOutput) -> None:
        """Invariants of every schedule."""
        sched, pool = self.sched, self.pool
        # Unchunked, a sequence alone in its step may exceed the budget (or it would never run).
        alone_unchunked = not sched.enable_chunked_prefill and len(out.scheduled) == 1
        assert out.num_tokens <= sched.max_num_batched_tokens or alone_unchunked
        assert len(sched.running) <= sched.max_num_seqs
        scheduled = [s.seq for s in out.scheduled]
        assert len(set(map(id, scheduled))) == len(scheduled)
        for item in out.scheduled:
            seq = item.seq
            assert item.num_new_tokens >= 1
            assert seq.status is SeqStatus.RUNNING
            assert seq.num_computed + item.num_new_tokens <= seq.num_tokens
            assert len(seq.block_table) * pool.block_size >= seq.num_computed + item.num_new_tokens
        for seq in out.preempted:
            assert seq.status is SeqStatus.WAITING and seq.block_table == []
            assert seq.num_computed == 0
        # Reference counts are exactly the ownership of block tables.
        owners = [0] * pool.num_blocks
        for seq in sched.running:
            for block in seq.block_table:
                owners[block] += 1
        for seq in sched.waiting:
            assert seq.block_table == []
        assert owners == pool.ref_count


# ----------------------------------------------------------------------------------------------
# Budgets and ordering
# ----------------------------------------------------------------------------------------------


def test_all_short_prompts_are_admitted_in_one_step():
    sim = Sim(64, 4, max_num_batched_tokens=64)
    seqs = [sim.add(n) for n in (5, 1, 9)]
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == list(
        zip(seqs, (5, 1, 9), strict=True)
    )
    assert all(s.status is SeqStatus.RUNNING for s in seqs)
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(s, 1) for s in seqs]
    sim.run()
    assert sim.pool.num_used == 0


def test_token_budget_is_respected_every_step():
    sim = Sim(256, 4, max_num_batched_tokens=10, max_num_seqs=8)
    for n in (3, 17, 1, 30, 8, 12, 5, 2, 26, 9):
        sim.add(n, max_tokens=6)
    sim.run()
    assert len(sim.finished) == 10
    assert max(out.num_tokens for out in sim.history) == 10  # the budget is used...
    assert all(out.num_tokens <= 10 for out in sim.history)  # ...and never exceeded
    assert all(s.num_output_tokens == 6 for s in sim.finished)
    assert sim.pool.num_used == 0


def test_decodes_come_first_and_keep_one_token_per_step_during_chunked_prefill():
    sim = Sim(64, 4, max_num_batched_tokens=8)
    a = sim.add(4, max_tokens=20)
    b = sim.add(5, max_tokens=20)
    sim.step()  # both prompts fit: 9 > 8, so b's prompt is split already
    long = sim.add(40, max_tokens=2)
    chunks = []
    while long.num_computed < long.num_prompt_tokens:
        out = sim.step()
        per_seq = {id(s.seq): s.num_new_tokens for s in out.scheduled}
        if b.num_computed > b.num_prompt_tokens:  # b is decoding
            assert out.scheduled[0].seq is a and out.scheduled[1].seq is b
            assert per_seq[id(a)] == 1 and per_seq[id(b)] == 1
        if id(long) in per_seq:
            assert out.scheduled[-1].seq is long
            chunks.append(per_seq[id(long)])
        assert out.num_tokens <= 8
    assert sum(chunks) == 40
    assert len(chunks) >= 40 // 8 + 1  # the long prompt really was split across steps
    assert all(c <= 6 for c in chunks)  # what the two decodes leave of the budget
    sim.run()
    assert sim.pool.num_used == 0


def test_first_prompt_chunk_uses_the_whole_budget():
    sim = Sim(64, 4, max_num_batched_tokens=16)
    seq = sim.add(50, max_tokens=1)
    counts = []
    while not seq.is_finished:
        out = sim.step()
        counts.append(out.num_tokens)
    assert counts == [16, 16, 16, 2]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    sim = Sim(64, 4, max_num_batched_tokens=10, enable_chunked_prefill=False)
    a = sim.add(6, max_tokens=3)
    b = sim.add(6, max_tokens=3)
    out = sim.step()
    assert [s.seq for s in out.scheduled] == [a]  # b (6 tokens) does not fit in the 4 left
    assert b.status is SeqStatus.WAITING and b.block_table == []
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 6)]
    sim.run()


def test_without_chunked_prefill_a_prompt_longer_than_the_budget_is_not_starved():
    """Unchunked, a sequence alone in its step may exceed the budget (else it never runs)."""
    sim = Sim(64, 4, max_num_batched_tokens=8, enable_chunked_prefill=False)
    seq = sim.add(12, max_tokens=2)
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(seq, 12)]
    sim.run(max_steps=50)


def test_without_chunked_prefill_a_preempted_sequence_longer_than_the_budget_is_not_starved():
    sim = Sim(64, 4, max_num_batched_tokens=8, enable_chunked_prefill=False)
    seq = sim.add(6, max_tokens=6)
    sim.sched.waiting.clear()
    # The state preemption leaves behind: 6 prompt + 4 generated tokens, nothing computed.
    seq.token_ids += [NEW_TOKEN] * 4
    seq.num_preemptions = 1
    sim.sched.waiting.appendleft(seq)
    sim.run(max_steps=50)


def test_max_num_seqs_is_respected():
    sim = Sim(256, 4, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [sim.add(3, max_tokens=3) for _ in range(5)]
    out = sim.step()
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert list(sim.sched.waiting) == seqs[2:]
    sim.run()
    assert max(len([s for s in out.scheduled]) for out in sim.history) == 2
    # First come, first served: they finish in arrival order.
    assert sim.finished == seqs


# ----------------------------------------------------------------------------------------------
# Preemption and the watermark
# ----------------------------------------------------------------------------------------------


def test_preemption_picks_the_newest_running_sequence_and_requeues_it_first():
    sim = Sim(6, 4)
    a, b, c = (sim.add(8, max_tokens=4) for _ in range(3))
    out = sim.step()  # 3 prompts x 2 blocks: the pool is full
    assert [s.seq for s in out.scheduled] == [a, b, c]
    assert sim.pool.num_free == 0
    d = sim.add(2)
    out = sim.step()  # a and b each need a third block: c goes
    assert out.preempted == [c]
    assert [s.seq for s in out.scheduled] == [a, b]
    assert c.status is SeqStatus.WAITING and c.block_table == [] and c.num_computed == 0
    assert c.num_preemptions == 1 and sim.sched.num_preemptions == 1
    assert list(sim.sched.waiting) == [c, d]  # in front of the sequence that was waiting
    assert c.output_ids == [NEW_TOKEN]  # generated tokens are kept for the recompute
    sim.run()
    assert {s.seq_id for s in sim.finished} == {0, 1, 2, 3}
    assert all(s.num_output_tokens == s.params.max_tokens for s in sim.finished)
    assert sim.pool.num_used == 0


def test_the_newest_sequence_preempts_itself_when_it_needs_a_block():
    sim = Sim(4, 2)
    a = sim.add(3, max_tokens=3)  # 2 blocks, room for one more token
    b = sim.add(4, max_tokens=3)  # 2 blocks, full
    sim.step()
    assert sim.pool.num_free == 0
    out = sim.step()
    # a fits in its blocks; b needs a third one and is itself the newest: it steps back.
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1)]
    assert out.preempted == [b] and list(sim.sched.waiting) == [b]
    assert sim.pool.num_free == 2
    sim.run()
    assert a.is_finished and b.is_finished and b.num_preemptions >= 1
    assert sim.pool.num_used == 0


def test_preempted_sequence_is_recomputed_with_its_generated_tokens():
    sim = Sim(6, 4, max_num_batched_tokens=64)
    a, b, c = (sim.add(8, max_tokens=4) for _ in range(3))
    sim.step()
    sim.step()  # c is preempted holding one generated token
    assert c.status is SeqStatus.WAITING and c.output_ids == [NEW_TOKEN] and c.num_tokens == 9
    while c.status is not SeqStatus.RUNNING:
        out = sim.step()
    item = next(s for s in out.scheduled if s.seq is c)
    # Its blocks were evicted for a and b, so the whole context (prompt + the generated
    # token) is recomputed in one go, ending at the position that samples the next token.
    assert item.num_new_tokens == 9
    assert c.num_tokens == 10 and c.num_computed == 9
    sim.run()
    assert c.output_ids == [NEW_TOKEN] * 4
    assert a.is_finished and b.is_finished


def test_watermark_holds_blocks_back_from_admission_while_others_run():
    sim = Sim(20, 4, watermark=0.25)  # 5 blocks kept spare
    assert sim.sched.watermark_blocks == 5
    a = sim.add(3, max_tokens=30)  # stays within one block for the next step too
    sim.step()
    assert sim.pool.num_free == 19
    big = sim.add(14 * 4 + 1)  # 15 blocks: 19 - 15 < 5
    out = sim.step()
    assert [s.seq for s in out.scheduled] == [a]
    assert big.status is SeqStatus.WAITING and big.block_table == []
    small = Sim(20, 4, watermark=0.25)
    small.add(3, max_tokens=30)
    small.step()
    fits = small.add(13 * 4 + 1)  # 14 blocks: 19 - 14 == 5
    small.step()
    assert fits.status is SeqStatus.RUNNING


def test_watermark_does_not_block_a_lone_sequence():
    sim = Sim(20, 4, watermark=0.25)
    seq = sim.add(20 * 4 - 4, max_tokens=4)  # 19 blocks: more than 20 - 5
    out = sim.step()
    assert [s.seq for s in out.scheduled] == [seq]
    sim.run()
    assert sim.pool.num_used == 0


def test_default_watermark_is_one_percent_of_the_pool():
    pool = BlockPool(1000, 16)
    assert Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64).watermark_blocks == 10


# ----------------------------------------------------------------------------------------------
# Prefix matching
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "cached"),
    [(16, 12), (17, 16), (18, 16), (3, 0), (4, 0), (5, 4)],
)
def test_admission_reuses_cached_blocks_but_computes_the_last_token(prompt_len, cached):
    sim = Sim(64, 4)
    first = sim.add(prompt_len, max_tokens=1, first_token=0)
    sim.run()
    assert first.is_finished and sim.pool.num_used == 0
    again = sim.add(prompt_len, max_tokens=2, first_token=0)
    out = sim.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(again, prompt_len - cached)]
    assert again.num_cached_prompt_tokens == cached
    for j in range(cached // 4):  # the reused blocks hold exactly this prefix
        assert sim.pool._hash_of[again.block_table[j]] == again.block_hashes[j]
    sim.run()


def test_each_completed_block_is_offered_to_the_prefix_cache_once():
    """register_computed_blocks visits the blocks completed since its last call, not the
    whole block table at every step (O(blocks) per sequence per decode step)."""
    sim = Sim(64, 4)
    offered: list[int] = []
    register = sim.pool.register

    def counting_register(block, block_hash):
        offered.append(block)
        register(block, block_hash)

    sim.pool.register = counting_register
    seq = sim.add(10, max_tokens=12)
    sim.run()
    # 10 prompt + 11 fed-back output tokens are computed: 5 full blocks of 4.
    assert len(offered) == len(set(offered)) == 5
    assert all(sim.pool.peek(h) for h in seq.block_hashes[:5])


def test_blocks_recomputed_after_preemption_are_findable_again():
    sim = Sim(6, 4)
    seqs = [sim.add(8, max_tokens=4) for _ in range(3)]
    sim.add(2)
    preempted = False
    while sim.sched.has_unfinished():
        out = sim.step()
        preempted |= bool(out.preempted)
        for seq in out.preempted:
            assert seq.num_registered_blocks == 0
        for seq in sim.sched.running:  # every full computed block is findable
            full = seq.num_computed // sim.pool.block_size
            assert all(sim.pool.peek(h) for h in seq.block_hashes[:full])
    assert preempted and all(s.is_finished for s in seqs)


def test_prefix_blocks_are_shared_between_running_sequences():
    sim = Sim(64, 4)
    a = sim.add(12, max_tokens=8, first_token=0)
    sim.step()
    b = sim.add(12, max_tokens=8, first_token=0)  # same tokens
    sim.step()
    assert b.block_table[:2] == a.block_table[:2]
    assert all(sim.pool.ref_count[blk] == 2 for blk in a.block_table[:2])
    assert b.num_cached_prompt_tokens == 8
    sim.run()
    assert sim.pool.num_used == 0


def add_samples(sim: Sim, request_id: str, prompt: list[int], n: int) -> list[Sequence]:
    """The n sequences of one request (as LLMEngine.add_request queues them)."""
    seqs = []
    for index in range(n):
        seq = Sequence(
            seq_id=len(sim.seqs),
            request_id=request_id,
            index=index,
            token_ids=list(prompt),
            num_prompt_tokens=len(prompt),
            params=SamplingParams(max_tokens=2, n=n),
            arrival=0.0,
        )
        sim.seqs.append(seq)
        sim.sched.add(seq)
        seqs.append(seq)
    return seqs


def test_the_samples_of_a_request_compute_its_prompt_once():
    """n > 1: one sample computes the prompt and the others, admitted in the same step, take
    its full blocks (the forward pass writes them before any attention) and compute only the
    rest (they were computing the same prompt n times). A request behind them runs too."""
    sim = Sim(64, 4)
    a, b, c = add_samples(sim, "n3", list(range(100, 113)), 3)  # 13 tokens: 3 full blocks
    other = sim.add(5, max_tokens=2)
    out = sim.step()
    assert [(x.seq, x.num_new_tokens) for x in out.scheduled] == [
        (a, 13),
        (b, 1),
        (c, 1),
        (other, 5),
    ]
    assert b.block_table[:3] == c.block_table[:3] == a.block_table[:3]
    assert all(sim.pool.ref_count[block] == 3 for block in a.block_table[:3])
    assert sim.sched.prefix_hits == 6
    assert b.num_cached_prompt_tokens == c.num_cached_prompt_tokens == 12
    sim.run()
    assert sim.pool.num_used == 0


def test_prompts_sharing_a_prefix_compute_it_once_in_their_first_step():
    """Few-shot prompts queued together (different requests, one exemplar prefix): the first
    computes the prefix, the others share its blocks in the same step."""
    sim = Sim(64, 4, max_num_batched_tokens=64)
    prefix = list(range(500, 520))  # 5 full blocks
    seqs = []
    for _ in range(4):
        seq = sim.add(23, max_tokens=2)
        seq.token_ids[:20] = prefix
        seqs.append(seq)
    out = sim.step()
    assert [(x.seq, x.num_new_tokens) for x in out.scheduled] == [
        (seqs[0], 23),
        *((seq, 3) for seq in seqs[1:]),
    ]
    assert all(seq.block_table[:5] == seqs[0].block_table[:5] for seq in seqs)
    assert all(seq.block_table[5] != seqs[0].block_table[5] for seq in seqs[1:])
    assert sim.sched.prefix_hits == 15
    sim.run()
    assert sim.pool.num_used == 0


def test_a_prefix_longer_than_a_step_is_waited_for_not_computed_twice():
    """A long shared prefix computed in chunks: a prefill that does not finish in a step takes
    the rest of its budget, so a prompt sharing it is admitted only in the step that completes
    it, and takes all its blocks (it never computes one that the other completes later)."""
    sim = Sim(64, 4, max_num_batched_tokens=17)
    long = sim.add(40, max_tokens=2, first_token=0)
    follower = sim.add(42, max_tokens=2, first_token=0)
    follower.token_ids[36:] = [7] * 6  # shares 9 full blocks with `long`, then differs
    unrelated = sim.add(3, max_tokens=2)
    computed = {id(long): 0, id(follower): 0, id(unrelated): 0}
    while follower.num_computed < follower.num_prompt_tokens:
        out = sim.step()
        for item in out.scheduled:
            computed[id(item.seq)] += item.num_new_tokens
        if long.num_computed < long.num_prompt_tokens:
            assert follower.status is SeqStatus.WAITING
    assert unrelated.num_computed > 0  # not held up behind the waiting follower
    assert computed[id(follower)] == 42 - 36 and follower.num_cached_prompt_tokens == 36
    assert follower.block_table[:9] == long.block_table[:9]
    sim.run()
    assert sim.pool.num_used == 0


def test_a_sequence_preempted_mid_prompt_still_computes_its_last_token():
    """A prompt of whole blocks, preempted mid-prefill, then readmitted once another prompt
    has computed all its blocks: admission must still leave its last token to compute (the
    step samples from its logits), not take every block from the cache and schedule it with
    nothing to compute (which sampled another sequence's logits when its hashes had been
    extended to its last token)."""
    sim = Sim(4, 4, max_num_batched_tokens=7)
    longer = sim.add(12, max_tokens=4, first_token=0)
    short = sim.add(8, max_tokens=2, first_token=0)  # the first 2 blocks of `longer`
    sim.step()
    out = sim.step()
    assert [(x.seq, x.num_new_tokens) for x in out.scheduled] == [(longer, 5), (short, 2)]
    assert sim.step().preempted == [short]  # `longer` needs a 4th block: the pool is full
    assert short.num_computed == 0
    short.block_hashes = prefix_hashes(short.token_ids, 4)  # every block's, as it once had
    sim.run()  # Sim.check: every scheduled sequence computes at least one token
    assert short.is_finished and short.num_cached_prompt_tokens == 4
    assert sim.pool.num_used == 0


def test_cached_prompt_tokens_are_counted_at_the_first_admission_only():
    """`victim` computes its whole prompt, is preempted when `grower` needs a block, and
    finds its own blocks again when readmitted: they count as hits, not as prompt tokens the
    prefix cache served it (vLLM's num_cached_tokens)."""
    sim = Sim(4, 4)
    grower = sim.add(4, max_tokens=8)
    victim = sim.add(8, max_tokens=8, first_token=0)
    while not victim.num_preemptions:
        sim.step()
    hits = sim.sched.prefix_hits
    while victim.status is not SeqStatus.RUNNING:
        sim.step()
    assert sim.sched.prefix_hits > hits  # the readmission reused its own blocks
    assert victim.num_cached_prompt_tokens == 0
    sim.run()
    assert grower.is_finished and victim.is_finished


def test_prompt_logprobs_requests_do_not_share_blocks_computed_in_their_step():
    sim = Sim(64, 4)
    first = sim.add(24, max_tokens=2, first_token=0)
    scored = sim.add(24, max_tokens=2, first_token=0, prompt_logprobs=0)
    out = sim.step()
    assert [(x.seq, x.num_new_tokens) for x in out.scheduled] == [(first, 24), (scored, 24)]
    assert scored.num_cached_prompt_tokens == 0
    sim.run()
    assert sim.pool.num_used == 0


def test_samples_do_not_wait_without_blocks_to_share():
    """Nothing to share (no prefix caching, or a prompt shorter than a block): all run at once."""
    for sim, prompt in ((Sim(64, 4, enable_prefix_caching=False), 13), (Sim(64, 4), 4)):
        seqs = add_samples(sim, "n2", list(range(prompt)), 2)
        assert [x.seq for x in sim.step().scheduled] == seqs
        sim.run()


def test_different_first_block_means_no_hit():
    sim = Sim(64, 4)
    sim.add(12, max_tokens=1, first_token=0)
    sim.run()
    other = sim.add(12, max_tokens=1, first_token=1)  # every block differs
    mixed = Sim(64, 4)
    mixed.add(12, max_tokens=1, first_token=0)
    mixed.run()
    seq = mixed.add(12, max_tokens=1, first_token=0)
    seq.token_ids[0] = 99  # only the first block differs; blocks 2 and 3 are identical
    out = mixed.step()
    assert out.scheduled[0].num_new_tokens == 12 and seq.num_cached_prompt_tokens == 0
    assert mixed.sched.prefix_hits == 0
    out = sim.step()
    assert out.scheduled[0].seq is other and out.scheduled[0].num_new_tokens == 12
    mixed.run()
    sim.run()


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    sim = Sim(64, 4)
    sim.add(12, max_tokens=1, first_token=0)
    sim.run()
    seq = sim.add(12, max_tokens=1, first_token=0, prompt_logprobs=0)
    out = sim.step()
    assert out.scheduled[0].num_new_tokens == 12 and seq.num_cached_prompt_tokens == 0
    sim.run()


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_with_shared_prefixes_read_only_what_was_written(seed):
    """Random pools, budgets and prompts built from a few shared prefixes (some requests with
    n > 1, some arriving late): `Sim.forward` checks at every step that each context slot a
    sequence reads holds its own token prefix, and every request finishes with the pool empty."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 5])
    sim = Sim(
        -(-48 // block_size) + rng.randint(0, 12),  # the largest request (42 + 6) fits
        block_size,
        max_num_batched_tokens=rng.choice([7, 16, 33, 200]),
        max_num_seqs=rng.choice([2, 5, 64]),
        enable_chunked_prefill=rng.random() < 0.8,
    )
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(0, 30))] for _ in range(3)]

    def add_random() -> None:
        prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 12))]
        n = rng.choice([1, 1, 1, 2, 3])
        if n == 1:
            sim.add(len(prompt), max_tokens=rng.randint(1, 6), first_token=0)
            sim.seqs[-1].token_ids[:] = prompt
        else:
            add_samples(sim, f"n{len(sim.seqs)}", prompt, n)

    for _ in range(rng.randint(2, 8)):
        add_random()
    for _ in range(rng.randint(0, 6)):
        sim.step()
        add_random()
    sim.run()
    assert all(seq.is_finished for seq in sim.seqs)
    assert sim.pool.num_used == 0


def test_failed_admission_gives_back_the_prefix_blocks():
    sim = Sim(6, 4)
    warm = sim.add(8, max_tokens=1, first_token=0)
    sim.run()
    assert sim.pool.num_cached == 2
    hog = sim.add(12, max_tokens=9, first_token=100)  # 3 blocks now, up to 5 later
    sim.step()
    again = sim.add(
        20, max_tokens=1, first_token=0
    )  # shares warm's 2 blocks, needs 3 more: does not fit
    out = sim.step()
    assert again.status is SeqStatus.WAITING and again.block_table == []
    assert [s.seq for s in out.scheduled] == [hog]
    sim.run()
    assert warm.is_finished and again.is_finished and sim.pool.num_used == 0
    assert prefix_hashes(again.token_ids[:8], 4) == again.block_hashes[:2]


def test_remove_frees_a_waiting_or_running_sequence():
    sim = Sim(64, 4, max_num_seqs=1)
    a = sim.add(9)
    b = sim.add(9)
    sim.step()
    assert a.status is SeqStatus.RUNNING and b.status is SeqStatus.WAITING
    sim.sched.remove(b)
    sim.sched.remove(a)
    assert a.is_finished and b.is_finished
    assert not sim.sched.has_unfinished()
    assert sim.pool.num_used == 0
