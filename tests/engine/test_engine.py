"""End-to-end tests of LLMEngine / LLM: continuous batching must not change a single token.

Oracles:
- `tulu.engine.reference.generate_ids` (one sequence, contiguous cache) and transformers'
  `generate` (unbatched, per prompt) for greedy outputs;
- a cache-free full forward of our model for logprobs and prompt logprobs;
- a `ScriptedModel` (conftest) whose logits are a fixed table by position, for stop conditions
  and for a chi-square test of the sampling distribution through the whole engine.

Every engine is made by the `make_engine` / `make_llm` fixtures, which check at the end of the
test that the engine is idle: no waiting or running sequence, every KV block back in the pool.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import hf_greedy
from tulu.chat import generation_prompt
from tulu.engine import engine as engine_module
from tulu.engine.engine import EngineConfig, LLMEngine, RequestOutput
from tulu.engine.reference import generate_ids
from tulu.engine.sampling import SamplingParams
from tulu.errors import GenerationError, TuluError

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPT_LENGTHS = [1, 2, 5, 15, 16, 17, 31, 33, 64, 97, 128, 150]
VOCAB = 512
BYTES_PER_TOKEN = 2 * 2 * 64 * 4  # the tiny model's K and V per token (float32)


def random_prompts(lengths, seed=0, vocab=VOCAB):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


PROMPTS = random_prompts(PROMPT_LENGTHS)


def token_ids(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def full_logprobs(model, ids) -> torch.Tensor:
    """log_softmax of a cache-free full forward: [T, V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([list(ids)]))[0].float(), dim=-1)


class ScheduleLog:
    """Records, for every step, (seq_id, first position, num_new_tokens, num_prompt_tokens)."""

    def __init__(self, engine):
        self.steps: list[list[tuple[int, int, int, int]]] = []
        original = engine.scheduler.schedule

        def schedule():
            out = original()
            self.steps.append(
                [
                    (s.seq.seq_id, s.seq.num_computed, s.num_new_tokens, s.seq.num_prompt_tokens)
                    for s in out.scheduled
                ]
            )
            return out

        engine.scheduler.schedule = schedule

    def chunked_prompts(self) -> set[int]:
        """Sequences whose prompt was computed over more than one step."""
        counts: dict[int, int] = {}
        for step in self.steps:
            for seq_id, start, _, num_prompt in step:
                if start < num_prompt:
                    counts[seq_id] = counts.get(seq_id, 0) + 1
        return {s for s, c in counts.items() if c > 1}


@pytest.fixture(scope="module")
def expected(tiny_model) -> list[list[int]]:
    """Greedy continuations of PROMPTS by the reference generator."""
    return [generate_ids(tiny_model, p, GREEDY).token_ids for p in PROMPTS]


# ----------------------------------------------------------------------------------------------
# Greedy parity
# ----------------------------------------------------------------------------------------------


def test_reference_matches_transformers(tiny_model, hf_twin, expected):
    hf = hf_twin(tiny_model)
    for prompt, tokens in zip(PROMPTS, expected, strict=True):
        assert hf_greedy(hf, prompt, MAX_TOKENS) == tokens
    # The continuations are not degenerate (a broken cache tends to repeat one token).
    assert len({tuple(t) for t in expected}) == len(expected)
    assert all(len(set(t)) > 2 for t in expected)


def test_greedy_batched_matches_reference_and_transformers(tiny_model, hf_twin, make_llm, expected):
    llm = make_llm(tiny_model)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.request_id for o in outputs] == [f"req-{i}" for i in range(len(PROMPTS))]
    assert token_ids(outputs) == expected
    for output, prompt in zip(outputs, PROMPTS, strict=True):
        assert output.finished and output.prompt_token_ids == prompt
        completion = output.outputs[0]
        assert completion.finish_reason == "length" and completion.stop_reason is None
        assert completion.text == ""  # no tokenizer
        assert output.finished_time >= output.first_token_time >= output.arrival_time
    hf = hf_twin(tiny_model)
    for prompt, output in zip(PROMPTS[::3], outputs[::3], strict=True):
        assert hf_greedy(hf, prompt, MAX_TOKENS) == output.outputs[0].token_ids


TINY_POOL = (150 + MAX_TOKENS + 16) * BYTES_PER_TOKEN  # room for the longest request, barely

CONFIGS = {
    "tiny-pool-preemption": dict(kv_cache_bytes=TINY_POOL),
    "chunked-prefill": dict(max_num_batched_tokens=24),
    "tiny-budget-and-pool": dict(kv_cache_bytes=TINY_POOL, max_num_batched_tokens=7, block_size=4),
    "block-size-1": dict(block_size=1),
    "block-size-1-tiny-pool": dict(block_size=1, kv_cache_bytes=TINY_POOL),
    "block-size-32": dict(block_size=32),
    "block-size-5": dict(block_size=5, max_num_batched_tokens=50),
    "no-prefix-caching": dict(enable_prefix_caching=False, kv_cache_bytes=TINY_POOL),
    "no-chunked-prefill": dict(enable_chunked_prefill=False, max_num_batched_tokens=160),
    "max-num-seqs-3": dict(max_num_seqs=3),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_greedy_is_unchanged_by_engine_configuration(tiny_model, make_llm, expected, config):
    llm = make_llm(tiny_model, **config)
    log = ScheduleLog(llm.engine)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert token_ids(outputs) == expected
    stats = llm.engine.stats()
    budget = llm.engine.scheduler.max_num_batched_tokens
    assert all(sum(n for _, _, n, _ in step) <= budget for step in log.steps)
    assert all(len(step) <= llm.engine.config.max_num_seqs for step in log.steps)
    if config.get("kv_cache_bytes"):
        assert stats["preemptions"] > 0
    else:
        assert stats["preemptions"] == 0
    if config.get("max_num_batched_tokens", 2048) < 150 and config.get(
        "enable_chunked_prefill", True
    ):
        assert log.chunked_prompts()  # some prompt really was split across steps
    if not config.get("enable_chunked_prefill", True):
        assert not log.chunked_prompts()
    if config.get("max_num_seqs"):
        assert max(len(step) for step in log.steps) == config["max_num_seqs"]


def test_requests_arriving_while_others_decode(tiny_model, make_engine, expected):
    engine = make_engine(tiny_model, max_num_batched_tokens=40)
    results: dict[str, list[int]] = {}
    pending = list(enumerate(PROMPTS))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # a new request every third step
            i, prompt = pending.pop(0)
            engine.add_request(prompt, GREEDY, request_id=f"p{i}")
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
        step += 1
    assert [results[f"p{i}"] for i in range(len(PROMPTS))] == expected


def test_repetition_penalty_matches_reference(tiny_model, make_llm):
    params = SamplingParams(
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.5,
    )
    prompts = PROMPTS[:6]
    outputs = make_llm(tiny_model, kv_cache_bytes=TINY_POOL // 2).generate(prompts, params)
    want = [generate_ids(tiny_model, p, params).token_ids for p in prompts]
    assert token_ids(outputs) == want
    assert want != [generate_ids(tiny_model, p, GREEDY).token_ids for p in prompts]


# ----------------------------------------------------------------------------------------------
# logit_bias and allowed_token_ids, against transformers' sequence_bias and
# prefix_allowed_tokens_fn
# ----------------------------------------------------------------------------------------------

#: Strong enough to change greedy choices of the random tiny model, not so strong that every
#: step picks the same token.
BIAS = {5: 4.0, 77: 3.5, 301: -50.0, 402: 2.5}
ALLOWED = [3, 5, 11, 77, 90, 200, 301, 450]
RESTRICTED = [
    SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **restrictions)
    for restrictions in (
        dict(logit_bias=BIAS),
        {},
        dict(allowed_token_ids=ALLOWED),
        dict(allowed_token_ids=ALLOWED, logit_bias=BIAS),
    )
]


def hf_restrictions(params: SamplingParams) -> dict:
    """transformers' generate arguments for the params' logit_bias and allowed_token_ids."""
    kwargs = {}
    if params.logit_bias:
        kwargs["sequence_bias"] = [[[token], bias] for token, bias in params.logit_bias.items()]
    if params.allowed_token_ids is not None:
        allowed = list(params.allowed_token_ids)
        kwargs["prefix_allowed_tokens_fn"] = lambda batch_id, input_ids: allowed
    return kwargs


@pytest.mark.parametrize(
    "config",
    [{}, dict(kv_cache_bytes=48 * BYTES_PER_TOKEN, block_size=4)],
    ids=["default", "preemption"],
)
def test_restricted_rows_batched_with_others_match_transformers(
    tiny_model, hf_twin, make_llm, config
):
    prompts = PROMPTS[2:6]
    llm = make_llm(tiny_model, **config)
    got = token_ids(llm.generate(prompts, RESTRICTED))
    want = [
        generate_ids(tiny_model, p, params).token_ids
        for p, params in zip(prompts, RESTRICTED, strict=True)
    ]
    assert got == want
    if config:
        assert llm.engine.stats()["preemptions"] > 0
        return
    hf = hf_twin(tiny_model)
    assert got == [
        hf_greedy(hf, p, MAX_TOKENS, **hf_restrictions(params))
        for p, params in zip(prompts, RESTRICTED, strict=True)
    ]
    # The restrictions did something.
    assert got[0] != generate_ids(tiny_model, prompts[0], GREEDY).token_ids
    assert set(got[2]) <= set(ALLOWED) and set(got[3]) <= set(ALLOWED)
    assert 301 not in got[0] and 5 in got[0]


def test_allowed_tokens_that_are_all_stop_tokens_with_min_tokens_are_refused(
    tiny_model, make_engine
):
    """Before min_tokens the stop tokens (the EOS here) are masked: nothing would be left."""
    engine = make_engine(tiny_model)
    eos = engine.eos_token_id
    params = SamplingParams(min_tokens=2, max_tokens=4, allowed_token_ids=[eos])
    with pytest.raises(GenerationError, match="are all stop tokens"):
        engine.add_request([1, 2, 3], params)
    with pytest.raises(GenerationError, match="are all stop tokens"):
        generate_ids(tiny_model, [1, 2, 3], params)
    accepted = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, allowed_token_ids=[eos]))
    engine.abort(accepted)


def test_restrictions_past_the_tokenizer_are_refused_when_added(
    tok_model, demo_tokenizer, make_engine
):
    """tok_model pads its vocabulary past the tokenizer's: those rows are no tokens."""
    engine = make_engine(tok_model, demo_tokenizer)
    past = len(demo_tokenizer)
    assert past < tok_model.config.vocab_size  # the premise
    for params in (
        SamplingParams(logit_bias={past: 5.0}),
        SamplingParams(allowed_token_ids=[past]),
    ):
        with pytest.raises(GenerationError, match=f"contains {past}, which is not a token"):
            engine.add_request("Hi", params)


def test_out_of_vocabulary_restrictions_are_refused_when_added(tiny_model, make_engine):
    engine = make_engine(tiny_model)
    for params in (
        SamplingParams(logit_bias={VOCAB: 1.0}),
        SamplingParams(allowed_token_ids=[1, VOCAB]),
    ):
        with pytest.raises(GenerationError, match=f"contains {VOCAB}, outside the vocabulary"):
            engine.add_request([1, 2], params)


# ----------------------------------------------------------------------------------------------
# Prefix caching
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 1, 5])
def test_prefix_cache_hits_do_not_change_outputs(tiny_model, make_llm, block_size):
    common = random_prompts([100], seed=7)[0]
    suffixes = random_prompts([1, 3, 8, 20, 2, 13, 5, 9], seed=8)
    wave1 = [common + s for s in suffixes[:4]]
    wave2 = [common + s for s in suffixes[4:]] + wave1[:2]
    want = [generate_ids(tiny_model, p, GREEDY).token_ids for p in wave1 + wave2]

    llm = make_llm(tiny_model, block_size=block_size)
    first = llm.generate(wave1, GREEDY)
    assert llm.engine.pool.num_cached > 0  # finished requests leave findable blocks
    hits_before = llm.engine.scheduler.prefix_hits
    second = llm.generate(wave2, GREEDY)
    assert token_ids(first + second) == want
    cached = 100 // block_size * block_size
    assert llm.engine.scheduler.prefix_hits > hits_before
    assert llm.engine.stats()["prefix_cache_hit_rate"] > 0
    assert all(o.num_cached_tokens >= cached for o in second)
    # A repeated prompt reuses everything but its last token.
    for output, prompt in zip(second[4:], wave1[:2], strict=True):
        assert output.num_cached_tokens == (len(prompt) - 1) // block_size * block_size

    plain = make_llm(tiny_model, block_size=block_size, enable_prefix_caching=False)
    reference = plain.generate(wave1, GREEDY) + plain.generate(wave2, GREEDY)
    assert token_ids(reference) == want
    assert all(o.num_cached_tokens == 0 for o in reference)
    assert plain.engine.scheduler.prefix_hits == 0 and plain.engine.pool.num_cached == 0


@pytest.mark.parametrize(
    ("block_size", "budget"), [(16, 2048), (5, 2048), (16, 40), (1, 64)], ids=str
)
def test_prompts_queued_together_share_the_prefix_their_first_step_computes(
    tiny_model, make_llm, block_size, budget
):
    """Few-shot prompts queued at once: the first computes the shared prefix and the others,
    in the same step, attend to its blocks as that step writes them (or, with a prefix longer
    than the step's budget, wait for it). Outputs are the reference's; the prefix is computed
    once (n - 1 prompts take all its full blocks)."""
    common = random_prompts([100], seed=17)[0]
    prompts = [common + s for s in random_prompts([1, 3, 8, 20, 2, 13], seed=18)]
    want = [generate_ids(tiny_model, p, GREEDY).token_ids for p in prompts]
    llm = make_llm(tiny_model, block_size=block_size, max_num_batched_tokens=budget)
    log = ScheduleLog(llm.engine)
    outputs = llm.generate(prompts, GREEDY)
    assert token_ids(outputs) == want
    shared = 100 // block_size * block_size
    assert [o.num_cached_tokens for o in outputs] == [0] + [shared] * 5
    computed_prompt_tokens = sum(
        min(start + n, num_prompt) - start
        for step in log.steps
        for _, start, n, num_prompt in step
        if start < num_prompt
    )
    assert computed_prompt_tokens == sum(map(len, prompts)) - 5 * shared
    if budget == 2048:
        assert len(log.steps[0]) == len(prompts)  # all of them in the first step


def test_prefix_cache_reuses_blocks_holding_generated_tokens(tiny_model, make_llm):
    prompt = random_prompts([40], seed=9)[0]
    llm = make_llm(tiny_model, block_size=8)
    first = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    follow_up = prompt + first[:10]  # 50 tokens: 6 full blocks, the 6th ends in the output
    second = llm.generate([follow_up], GREEDY)[0]
    assert second.num_cached_tokens == 48
    assert second.outputs[0].token_ids == generate_ids(tiny_model, follow_up, GREEDY).token_ids


def test_no_prefix_hit_when_only_a_later_block_matches(tiny_model, make_llm):
    prompt = random_prompts([40], seed=10)[0]
    other = [(prompt[0] + 1) % VOCAB] + prompt[1:]  # differs in the first block only
    llm = make_llm(tiny_model, block_size=8)
    llm.generate([prompt], GREEDY)
    out = llm.generate([other], GREEDY)[0]
    assert out.num_cached_tokens == 0
    assert llm.engine.scheduler.prefix_hits == 0
    assert out.outputs[0].token_ids == generate_ids(tiny_model, other, GREEDY).token_ids


def test_step_slots_are_each_tokens_block_and_row(tiny_model, make_engine):
    """`_step_slots` builds slots a block at a time; they must equal the per-token formula
    `table[p // bs] * bs + p % bs` for chunks that start and end inside blocks."""
    bs = 4
    engine = make_engine(tiny_model, max_num_batched_tokens=7, block_size=bs)
    build = engine._step_slots
    steps = []

    def checked(scheduled):
        slots, layout = build(scheduled)
        expected, q_start = [], 0
        for item, (qs, qe, context, table) in zip(scheduled, layout, strict=True):
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_new_tokens
            expected += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            assert (qs, qe, context, table) == (
                q_start,
                q_start + item.num_new_tokens,
                end,
                seq.block_table,
            )
            q_start = qe
        assert slots == expected
        steps.append(len(slots))
        return slots, layout

    engine._step_slots = checked
    for prompt in random_prompts([5, 13, 3]):
        engine.add_request(prompt, GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert 7 in steps and 3 in steps  # full chunks and decode steps were both checked


def test_prefix_cache_with_preemption_and_chunking(tiny_model, make_llm):
    common = random_prompts([64], seed=11)[0]
    prompts = [common + s for s in random_prompts([3, 30, 1, 17, 9, 40, 2, 22], seed=12)]
    pool = 160 * BYTES_PER_TOKEN
    llm = make_llm(tiny_model, block_size=4, kv_cache_bytes=pool, max_num_batched_tokens=20)
    outputs = llm.generate(prompts[:4], GREEDY) + llm.generate(prompts[4:], GREEDY)
    assert token_ids(outputs) == [generate_ids(tiny_model, p, GREEDY).token_ids for p in prompts]
    stats = llm.engine.stats()
    assert stats["preemptions"] > 0 and llm.engine.scheduler.prefix_hits > 0


def test_a_prompt_preempted_mid_prefill_samples_from_its_own_last_token(tiny_model, make_llm):
    """`short` (2 whole blocks, the start of `longer`) is preempted halfway through its
    prompt; `longer` then completes both blocks. Readmitted, `short` must compute its last
    token itself: taking every block from the cache left it nothing to compute, and its first
    token was sampled from the logits of the row before it (another sequence's)."""
    longer = random_prompts([12], seed=5)[0]
    short = longer[:8]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    pool = 16 * BYTES_PER_TOKEN  # 4 blocks of 4: `longer` preempts `short` to grow
    llm = make_llm(tiny_model, block_size=4, kv_cache_bytes=pool, max_num_batched_tokens=7)
    outputs = llm.generate([longer, short], params)
    assert token_ids(outputs) == [
        generate_ids(tiny_model, p, params).token_ids for p in (longer, short)
    ]
    assert llm.engine.stats()["preemptions"] == 1
    assert [o.num_cached_tokens for o in outputs] == [0, 4]


def shared_prefix_workload(seed: int) -> tuple[dict, list[tuple[int, str, object]]]:
    """A random engine config (small pool, budget and blocks) and a timeline of (step,
    "add", (request_id, prompt, SamplingParams)) / (step, "abort", request_id) events. Most
    prompts are prefixes of one document, often whole blocks long, so that they share blocks
    in every way: from the cache, within a step, while another computes them in chunks."""
    rng = np.random.default_rng(seed)
    bs = int(rng.choice([1, 4, 5, 16]))
    config = dict(
        block_size=bs,
        kv_cache_bytes=(-(-48 // bs) + int(rng.integers(0, 16 // bs + 1))) * bs * BYTES_PER_TOKEN,
        max_num_batched_tokens=int(rng.choice([5, 7, 16, 200])),
        max_num_seqs=int(rng.choice([2, 5, 64])),
        enable_chunked_prefill=bool(rng.random() < 0.8),
    )
    document = rng.integers(0, VOCAB, 40).tolist()
    events: list[tuple[int, str, object]] = []
    for r in range(int(rng.integers(4, 12))):
        length = int(rng.choice([bs * rng.integers(1, 40 // bs + 1), rng.integers(1, 41)]))
        own = rng.random() < 0.2
        prompt = rng.integers(0, VOCAB, length).tolist() if own else document[:length]
        fields = dict(
            max_tokens=int(rng.integers(1, 9)), ignore_eos=True, n=int(rng.choice([1, 1, 2, 3]))
        )
        if rng.random() < 0.5:
            fields.update(temperature=1.0, seed=int(rng.integers(1000)))
        else:
            fields.update(temperature=0.0)
        if rng.random() < 0.3:
            fields.update(logprobs=2)
        if rng.random() < 0.15:
            fields.update(prompt_logprobs=1)
        if rng.random() < 0.15:
            fields.update(candidate_token_ids=[1, 2, 3])
        step = int(rng.choice([0, 0, 0, 1, 2, 3, 5]))
        events.append((step, "add", (f"q{r}", prompt, SamplingParams(**fields))))
    for _ in range(int(rng.integers(0, 3))):
        events.append((int(rng.integers(1, 7)), "abort", f"q{rng.integers(len(events))}"))
    config.update(decode_attention=str(rng.choice(["loop", "sdpa"])))  # decode fast path or not
    return config, sorted(events, key=lambda event: event[0])


def run_timeline(engine: LLMEngine, events, drain) -> tuple[dict[str, RequestOutput], set[str]]:
    """Play the events (each before the step of its number), then step until idle; checks
    that every scheduled sequence computed at least one token. Finished outputs, aborted ids."""
    log = ScheduleLog(engine)
    outputs: list[RequestOutput] = []
    aborted: set[str] = set()
    for step, kind, payload in events:
        while len(log.steps) < step:  # every step() schedules once, idle or not
            outputs += engine.step()
        if kind == "add":
            request_id, prompt, params = payload
            engine.add_request(prompt, params, request_id=request_id)
        elif engine.abort(payload) is not None:
            aborted.add(payload)
    outputs += [o for stream in drain(engine).values() for o in stream]
    assert all(n >= 1 for step in log.steps for _, _, n, _ in step)
    return {o.request_id: o for o in outputs if o.finished}, aborted


@pytest.mark.parametrize("seed", range(32))
def test_random_shared_prefix_workloads_match_the_engine_without_prefix_caching(
    tiny_model, make_engine, drain, seed
):
    """Requests arriving and aborted over time, n > 1, seeded sampling, logprobs, prompt
    logprobs and candidate scoring, on small pools that preempt, decode fast path or not:
    with prefix caching (blocks shared from the cache and within a step) every request that
    was not aborted gets the same tokens and log-probabilities as without."""
    config, events = shared_prefix_workload(seed)
    cached, aborted = run_timeline(make_engine(tiny_model, **config), events, drain)
    plain, aborted_plain = run_timeline(
        make_engine(tiny_model, **config, enable_prefix_caching=False), events, drain
    )
    for request_id in cached.keys() - aborted - aborted_plain:
        got, want = cached[request_id], plain[request_id]
        for a, b in zip(got.outputs, want.outputs, strict=True):
            assert a.token_ids == b.token_ids, request_id
            if a.logprobs is not None:
                assert [x.logprob for x in a.logprobs] == pytest.approx(
                    [x.logprob for x in b.logprobs], abs=1e-4
                )
            if a.candidate_logprobs is not None:
                for x, y in zip(a.candidate_logprobs, b.candidate_logprobs, strict=True):
                    assert x == pytest.approx(y, abs=1e-4)
        if got.prompt_logprobs is not None:
            assert [x.logprob for x in got.prompt_logprobs[1:]] == pytest.approx(
                [x.logprob for x in want.prompt_logprobs[1:]], abs=1e-4
            )


def test_reset_prefix_cache_between_waves(tiny_model, make_llm):
    llm = make_llm(tiny_model, block_size=4)
    llm.generate(PROMPTS[:3], GREEDY)
    llm.engine.pool.reset_prefix_cache()
    assert llm.engine.pool.num_cached == 0
    again = llm.generate(PROMPTS[:3], GREEDY)
    assert all(o.num_cached_tokens == 0 for o in again)


# ----------------------------------------------------------------------------------------------
# Aborts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [dict(), dict(max_num_seqs=4), dict(kv_cache_bytes=TINY_POOL, max_num_batched_tokens=16)],
    ids=["plain", "some-waiting", "preempting"],
)
def test_aborts_mid_generation_leave_the_others_unchanged(
    tiny_model, make_engine, drain, expected, config
):
    engine = make_engine(tiny_model, **config)
    ids = [engine.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
    seen: dict[str, list[RequestOutput]] = {}
    for _ in range(4):
        for output in engine.step():
            seen.setdefault(output.request_id, []).append(output)
    doomed = ["r1", "r4", "r7", "r10", "r11"]
    assert any(rid in seen for rid in doomed)  # some are aborted mid-generation
    waiting_before = {s.request_id for s in engine.scheduler.waiting}
    for rid in doomed:
        generated = seen[rid][-1].outputs[0].token_ids if rid in seen else []
        output = engine.abort(rid)
        assert output is not None and output.finished and output.request_id == rid
        completion = output.outputs[0]
        assert completion.finish_reason == "abort" and completion.finished
        assert completion.token_ids == generated  # what had been generated so far
        assert completion.delta_token_ids == [] and completion.delta_text == ""
        assert generated == expected[int(rid[1:])][: len(generated)]
        assert engine.abort(rid) is None  # a second abort is ignored
    assert engine.abort("no-such-request") is None
    assert all(s.request_id not in doomed for s in engine.scheduler.running)
    assert all(s.request_id not in doomed for s in engine.scheduler.waiting)
    if config.get("max_num_seqs"):
        assert waiting_before & set(doomed)  # some were aborted before they ever ran
    rest = drain(engine)
    # The next step reports each abort once more (so a loop waiting on step() sees it end).
    for rid in doomed:
        assert [o.outputs[0].finish_reason for o in rest[rid]] == ["abort"]
    for i, rid in enumerate(ids):
        if rid in doomed:
            continue
        final = rest[rid][-1] if rid in rest else seen[rid][-1]
        assert final.finished and final.outputs[0].token_ids == expected[i]


def test_abort_every_request(tiny_model, make_engine):
    engine = make_engine(tiny_model, kv_cache_bytes=TINY_POOL)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    engine.step()
    engine.step()
    for rid in ids:
        assert engine.abort(rid).outputs[0].finish_reason == "abort"
    notices = engine.step()  # the aborts are reported by the next step, then never again
    assert sorted(o.request_id for o in notices) == sorted(ids)
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in notices)
    assert engine.step() == []


def test_abort_is_idempotent_for_finished_requests(tiny_model, make_engine, drain):
    engine = make_engine(tiny_model)
    rid = engine.add_request(PROMPTS[3], SamplingParams(temperature=0, max_tokens=2))
    drain(engine)
    assert engine.abort(rid) is None
    # A finished request's id may be used again.
    assert engine.add_request(PROMPTS[3], GREEDY, request_id=rid) == rid
    engine.abort(rid)


def test_generate_aborts_its_requests_when_interrupted(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    calls = []

    def on_output(output):
        calls.append(output)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, GREEDY, on_output=on_output)
    assert not llm.engine.has_unfinished_requests()  # everything aborted and freed


def test_abort_with_some_completions_already_finished(tok_model, make_engine):
    """n=6 sampled completions, most token ids stop them: abort after a few steps keeps the
    finished completions' reasons and marks only the others as aborted."""
    engine = make_engine(tok_model)
    params = SamplingParams(
        n=6, seed=5, temperature=2.0, max_tokens=40, stop_token_ids=list(range(0, 640, 9))
    )
    rid = engine.add_request([3, 1, 4, 1, 5], params)
    for _ in range(30):
        engine.step()
        states = [s.is_finished for s in engine._requests[rid].seqs]
        if any(states) and not all(states):
            break
    else:
        pytest.fail("could not reach a partly finished request")
    out = engine.abort(rid)
    reasons = [c.finish_reason for c in out.outputs]
    assert [r == "abort" for r in reasons] == [not done for done in states]
    for completion in out.outputs:
        if completion.finish_reason == "stop":
            assert completion.stop_reason == completion.token_ids[-1]
            assert completion.stop_reason % 9 == 0
        else:
            assert all(t % 9 for t in completion.token_ids)


def test_generate_returns_when_one_of_its_requests_is_aborted(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    engine = llm.engine
    steps = 0
    step = engine.step

    def bounded_step():
        nonlocal steps
        steps += 1
        if steps > 100:
            raise RuntimeError("LLM.generate keeps stepping an idle engine")
        return step()

    engine.step = bounded_step

    def on_output(output):
        if output.request_id == "req-0":
            engine.abort("req-1")

    outputs = llm.generate(PROMPTS[:3], GREEDY, on_output=on_output)
    assert outputs[1].outputs[0].finish_reason == "abort"


def test_generate_request_ids_name_each_prompts_outputs(tiny_model, make_llm):
    """`request_ids` lets `on_output` tell which prompt an output is for (what `tulu generate`
    needs to save each result as it finishes); bad ones withdraw every prompt."""
    llm = make_llm(tiny_model)
    prompts = PROMPTS[:4]
    finished: dict[str, list[int]] = {}

    def on_output(output):
        if output.finished:
            finished[output.request_id] = output.outputs[0].token_ids

    ids = ["p3", "p1", "p0", "p2"]
    outputs = llm.generate(prompts, GREEDY, on_output=on_output, request_ids=ids)
    assert [o.request_id for o in outputs] == ids
    assert finished == {rid: o.outputs[0].token_ids for rid, o in zip(ids, outputs, strict=True)}
    assert token_ids(outputs) == token_ids(llm.generate(prompts, GREEDY))
    with pytest.raises(GenerationError, match="4 prompts but 3 request ids"):
        llm.generate(prompts, GREEDY, request_ids=ids[:3])
    with pytest.raises(GenerationError, match="prompt 2: request id 'a' is already in use"):
        llm.generate(prompts, GREEDY, request_ids=["a", "b", "a", "c"])
    assert not llm.engine.has_unfinished_requests()


def test_a_retried_generate_never_gets_the_aborted_requests_notice(tiny_model, make_llm):
    """A `generate` interrupted (or refused halfway) aborts its requests, whose notices wait
    for the next step(); retried with the same request_ids, it must return the new results,
    not the stale abort notices, and leave no request running behind."""
    llm = make_llm(tiny_model)
    expected = token_ids(llm.generate(PROMPTS[:2], GREEDY))

    def interrupt(output):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[:2], GREEDY, request_ids=["a", "b"], on_output=interrupt)
    with pytest.raises(GenerationError, match="prompt 1"):  # "a" added, then withdrawn
        llm.generate([PROMPTS[0], [VOCAB]], GREEDY, request_ids=["a", "b"])
    outputs = llm.generate(PROMPTS[:2], GREEDY, request_ids=["a", "b"])
    assert [o.outputs[0].finish_reason for o in outputs] == ["length", "length"]
    assert token_ids(outputs) == expected
    assert not llm.engine.has_unfinished_requests()


# ----------------------------------------------------------------------------------------------
# Seeds and n > 1
# ----------------------------------------------------------------------------------------------

SAMPLED = dict(temperature=0.9, top_p=0.95, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_seeded_request_is_independent_of_the_batch(tiny_model, make_llm):
    target_prompt = PROMPTS[6]
    target = SamplingParams(seed=1234, **SAMPLED)
    want = generate_ids(tiny_model, target_prompt, target).token_ids
    assert want != generate_ids(tiny_model, target_prompt, GREEDY).token_ids

    others = [
        (PROMPTS[i], SamplingParams(seed=seed, **SAMPLED) if seed else SamplingParams(**SAMPLED))
        for i, seed in [(0, None), (3, 7), (9, None), (11, 99), (4, 5), (1, None)]
    ]
    compositions = [
        [],
        others[:2],
        others[2:],
        list(reversed(others)),
    ]
    configs = [dict(), dict(kv_cache_bytes=TINY_POOL, max_num_batched_tokens=9, block_size=4)]
    for config in configs:
        llm = make_llm(tiny_model, **config)
        for position, batch in enumerate(compositions):
            requests = list(batch)
            requests.insert(position % (len(requests) + 1), (target_prompt, target))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(position)  # the unseeded requests' draws
                outputs = llm.generate([p for p, _ in requests], [s for _, s in requests])
            got = [o for o, (_, s) in zip(outputs, requests, strict=True) if s is target]
            assert got[0].outputs[0].token_ids == want, (config, position)
    assert llm.engine.stats()["preemptions"] > 0


def test_unseeded_requests_use_the_global_rng(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    params = SamplingParams(**SAMPLED)

    def run(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return token_ids(llm.generate(PROMPTS[:3], params))

    first, again, other = run(3), run(3), run(4)
    assert first == again
    assert first != other


def test_n_completions_are_seeded_reproducibly(tiny_model, make_llm):
    params = SamplingParams(n=3, seed=42, **SAMPLED)
    llm = make_llm(tiny_model)
    alone = llm.generate([PROMPTS[5]], params)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2]
    assert all(
        len(c.token_ids) == MAX_TOKENS and c.finish_reason == "length" for c in alone.outputs
    )
    samples = [tuple(c.token_ids) for c in alone.outputs]
    assert len(set(samples)) == 3  # three different completions
    # Completion 0 uses the request's seed itself, exactly as a request with n=1 would.
    single = SamplingParams(seed=42, **SAMPLED)
    assert list(samples[0]) == generate_ids(tiny_model, PROMPTS[5], single).token_ids
    # The same in a crowd, under preemption and chunked prefill.
    crowded = make_llm(tiny_model, kv_cache_bytes=TINY_POOL, max_num_batched_tokens=11)
    mixed = crowded.generate(
        [PROMPTS[11], PROMPTS[5], PROMPTS[2]],
        [SamplingParams(n=2, **SAMPLED), params, SamplingParams(seed=1, **SAMPLED)],
    )
    assert [tuple(c.token_ids) for c in mixed[1].outputs] == samples
    assert len(mixed[0].outputs) == 2
    assert crowded.engine.stats()["preemptions"] > 0


def test_n_samples_take_their_prompt_from_the_prefix_cache(tiny_model, make_llm):
    """The samples of a request compute its prompt once: the others reuse its full blocks.
    Their seeded tokens are those of an engine without prefix caching."""
    params = SamplingParams(n=4, seed=7, **SAMPLED)
    prompt = PROMPTS[10][:70]  # four full blocks of 16 tokens to share
    shared = make_llm(tiny_model)
    out = shared.generate([prompt], params)[0]
    assert out.num_cached_tokens == 0  # the first sample computed it
    assert shared.engine.scheduler.prefix_hits == 3 * 4
    alone = make_llm(tiny_model, enable_prefix_caching=False).generate([prompt], params)[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in alone.outputs]


def test_greedy_n_gives_identical_completions(tiny_model, make_llm, expected):
    out = make_llm(tiny_model).generate([PROMPTS[4]], dataclasses.replace(GREEDY, n=2))
    assert [c.token_ids for c in out[0].outputs] == [expected[4], expected[4]]


# ----------------------------------------------------------------------------------------------
# Stop conditions, text and streaming (tokenizer + scripted model)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script(demo_tokenizer, scripted_model, make_table):
    """A scripted model that, after PROMPT, writes " The quick brown fox jumps", EOS,
    " over the lazy dog", EOS, then the filler token forever."""
    tok = demo_tokenizer
    prompt = tok.encode("Hello there.")
    words = tok.encode(" The quick brown fox jumps")
    more = tok.encode(" over the lazy dog")
    eos = tok.eos_token_id
    out = words + [eos] + more + [eos]
    filler = tok.encode(" ha")[0]
    assert filler not in out
    table = make_table(
        {len(prompt) - 1 + i: t for i, t in enumerate(out)}, vocab_size=640, filler=filler
    )
    model = scripted_model(table, eos_token_id=5)  # the tokenizer's EOS (0) must win
    return dict(model=model, prompt=prompt, words=words, more=more, filler=filler, out=out)


STOP_CASES = {
    "eos": dict(max_tokens=40),
    "ignore-eos": dict(max_tokens="WORDS+3", ignore_eos=True),
    "max-tokens": dict(max_tokens=3),
    "stop-string": dict(max_tokens=40, stop=["brown"]),
    "earliest-stop-string": dict(max_tokens=40, stop=["fox", "quick"]),
    "include-stop-string": dict(max_tokens=40, stop="brown", include_stop_str_in_output=True),
    "stop-string-after-eos-ignored": dict(max_tokens=40, stop=["lazy"], ignore_eos=True),
    "stop-token-id": dict(max_tokens=40, stop_token_ids=["WORD3"]),
    "stop-token-id-with-ignore-eos": dict(max_tokens=40, ignore_eos=True, stop_token_ids=["MORE0"]),
    "stop-token-id-included": dict(
        max_tokens=40, stop_token_ids=["WORD3"], include_stop_str_in_output=True
    ),
    "eos-kept-and-included": dict(
        max_tokens=40, skip_special_tokens=False, include_stop_str_in_output=True
    ),
    "min-tokens": dict(max_tokens=40, min_tokens="WORDS+1"),
    "min-tokens-reached-at-eos": dict(max_tokens=40, min_tokens="WORDS"),
    "min-tokens-past-both-eos": dict(max_tokens=30, min_tokens=29),
    "min-tokens-ignores-an-earlier-stop-string": dict(
        max_tokens=40, stop=["brown"], min_tokens="WORDS"
    ),
    "min-tokens-then-a-stop-string": dict(
        max_tokens=40, stop=["brown", "lazy"], min_tokens="WORDS+1"
    ),
    "keep-special-tokens": dict(max_tokens="WORDS+3", ignore_eos=True, skip_special_tokens=False),
}


def stop_params(script, case: dict) -> SamplingParams:
    words, more = script["words"], script["more"]
    names = {
        "WORD3": words[3],
        "MORE0": more[0],
        "WORDS": len(words),
        "WORDS+1": len(words) + 1,
        "WORDS+3": len(words) + 3,
    }
    fields = {}
    for key, value in case.items():
        if isinstance(value, list):
            fields[key] = [names.get(x, x) for x in value]
        else:
            fields[key] = names.get(value, value)
    return SamplingParams(temperature=0.0, **fields)


def test_stop_conditions_match_the_reference(script, demo_tokenizer, make_engine, drain):
    """All cases run batched together through the engine; each must match the reference
    generator exactly, and streaming deltas must rebuild the final text and tokens."""
    tok, model, prompt = demo_tokenizer, script["model"], script["prompt"]
    engine = make_engine(model, demo_tokenizer, max_num_batched_tokens=5)
    params = {name: stop_params(script, case) for name, case in STOP_CASES.items()}
    for name, p in params.items():
        engine.add_request(prompt, p, request_id=name)
    streams = drain(engine)
    results = {}
    for name, p in params.items():
        want = generate_ids(model, prompt, p, tokenizer=tok)
        stream = streams[name]
        final = stream[-1].outputs[0]
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert final.token_ids == want.token_ids, name
        assert final.text == want.text, name
        assert final.finish_reason == want.finish_reason, name
        assert final.stop_reason == want.stop_reason, name
        assert "".join(o.outputs[0].delta_text for o in stream) == final.text, name
        assert sum((o.outputs[0].delta_token_ids for o in stream), []) == final.token_ids, name
        results[name] = final

    words, more, filler = script["words"], script["more"], script["filler"]
    eos = tok.eos_token_id
    assert results["eos"].token_ids == words + [eos]
    assert (results["eos"].finish_reason, results["eos"].stop_reason) == ("stop", eos)
    assert results["eos"].text == " The quick brown fox jumps"
    assert results["ignore-eos"].token_ids == words + [eos] + more[:2]
    assert results["ignore-eos"].finish_reason == "length"
    assert "<|endoftext|>" not in results["ignore-eos"].text
    assert results["keep-special-tokens"].text.startswith(" The quick brown fox jumps<|endoftext|>")
    assert results["max-tokens"].token_ids == words[:3]
    assert results["max-tokens"].finish_reason == "length"
    for name, stop in [("stop-string", "brown"), ("earliest-stop-string", "quick")]:
        r = results[name]
        assert (r.finish_reason, r.stop_reason) == ("stop", stop)
        assert r.text == " The quick brown fox jumps".split(stop)[0]
    assert results["include-stop-string"].text == " The quick brown"
    assert results["stop-string-after-eos-ignored"].text == " The quick brown fox jumps over the "
    assert words[3] not in words[:3]
    assert results["stop-token-id"].token_ids == words[:4]
    assert results["stop-token-id"].stop_reason == words[3]
    assert results["stop-token-id-with-ignore-eos"].token_ids == words + [eos, more[0]]
    # As in vLLM, a stop token's text is in the output only when the stop text is asked for.
    assert results["stop-token-id"].text == tok.decode(words[:3])
    assert results["stop-token-id-included"].text == tok.decode(words[:4])
    assert results["eos"].text == " The quick brown fox jumps"
    assert results["eos-kept-and-included"].text == " The quick brown fox jumps<|endoftext|>"
    min_tokens = results["min-tokens"]
    assert min_tokens.token_ids[: len(words) + 1] == words + [filler]  # EOS was blocked...
    assert min_tokens.token_ids[len(words) + 1 :] == more + [eos]  # ...until min_tokens
    assert results["min-tokens-reached-at-eos"].token_ids == words + [eos]
    assert results["min-tokens-past-both-eos"].finish_reason == "length"
    assert eos not in results["min-tokens-past-both-eos"].token_ids[:29]
    # As in vLLM, a stop string ending within the first min_tokens tokens does not count.
    r = results["min-tokens-ignores-an-earlier-stop-string"]
    assert (r.token_ids, r.stop_reason) == (words + [eos], eos)
    assert r.text == " The quick brown fox jumps"
    r = results["min-tokens-then-a-stop-string"]
    assert r.stop_reason == "lazy"
    assert r.text == tok.decode(words + [filler]) + " over the "


def test_cumulative_text_never_shows_part_of_a_stop_string(
    script, demo_tokenizer, make_engine, drain
):
    """At every step the cumulative `text` is what the deltas have delivered so far, and
    only grows; in particular the held-back prefix of a stop string is not in `text`."""
    engine = make_engine(script["model"], demo_tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=["brown fox"])
    engine.add_request(script["prompt"], params, request_id="s")
    stream = drain(engine)["s"]
    final = stream[-1].outputs[0].text
    assert final == " The quick "
    delivered, problems = "", []
    for step, output in enumerate(stream):
        delivered += output.outputs[0].delta_text
        text = output.outputs[0].text
        if text != delivered or not final.startswith(text):
            problems.append((step, text, delivered))
    assert not problems, problems


def _tokenizer_with_a_token_ending_inside_a_character():
    """Byte-level BPE over the 256 byte symbols plus one merge, " " + the first byte of "é"
    (GPT-NeoX has such tokens): a token whose text ends inside a character."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from tulu.tokenizer import Tokenizer

    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    vocab["ĠÃ"] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[("Ġ", "Ã")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return Tokenizer(backend, source="<test BPE>"), vocab["ĠÃ"]


def test_a_stop_string_found_in_the_text_released_at_the_end_is_a_stop(
    scripted_model, make_table, make_engine, drain
):
    """The last token is " " plus half of "é": its text is held back until the end, where
    it completes the stop string " ". The text is cut there, so the completion stopped, as
    the reference generator says (the engine said "length" with no stop reason)."""
    tok, partial = _tokenizer_with_a_token_ending_inside_a_character()
    prompt, out = tok.encode("Hi"), tok.encode("ab") + [partial]
    table = make_table({len(prompt) - 1 + i: t for i, t in enumerate(out)}, vocab_size=320)
    model = scripted_model(table)
    params = SamplingParams(temperature=0.0, max_tokens=3, stop=[" "])
    engine = make_engine(model, tok)
    engine.add_request(prompt, params, request_id="s")
    final = drain(engine)["s"][-1].outputs[0]
    want = generate_ids(model, prompt, params, tokenizer=tok)
    assert (want.token_ids, want.text, want.finish_reason, want.stop_reason) == (
        out,
        "ab",
        "stop",
        " ",
    )
    assert (final.token_ids, final.text) == (out, "ab")
    assert (final.finish_reason, final.stop_reason) == ("stop", " ")


def test_text_and_chat_prompts(tok_model, demo_tokenizer, make_llm):
    tok = demo_tokenizer
    llm = make_llm(tok_model, tok)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    text = "Hello world. The quick brown fox"
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([text, messages, tok.encode(text), tuple(tok.encode(text))], params)
    chat_ids = tok.encode(generation_prompt(messages, tok.eos_token))
    assert outputs[0].prompt_token_ids == tok.encode(text)
    assert outputs[1].prompt_token_ids == chat_ids
    assert chat_ids[-3:] == tok.encode("<|assistant|>\n")[-3:]
    assert outputs[2].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    assert outputs[3].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    for output in outputs[:2]:
        want = generate_ids(tok_model, output.prompt_token_ids, params, tokenizer=tok)
        assert output.outputs[0].token_ids == want.token_ids
        assert output.outputs[0].text == want.text
        assert output.outputs[0].text == tok.decode(want.token_ids, skip_special_tokens=True)


def test_generate_takes_a_single_prompt_as_one_prompt(tok_model, demo_tokenizer, make_llm):
    """As in vLLM, `generate("text")` is one prompt (it was iterated: one prompt per
    character), and so is a bare list of token ids or of chat messages."""
    tok = demo_tokenizer
    llm = make_llm(tok_model, tok)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    messages = [{"role": "user", "content": "Hi"}]
    text = "Hello world"
    for single, listed in [
        (text, [text]),
        (tok.encode(text), [tok.encode(text)]),
        (messages, [messages]),
    ]:
        outputs = llm.generate(single, params)
        assert [o.prompt_token_ids for o in outputs] == [
            o.prompt_token_ids for o in llm.generate(listed, params)
        ]
    assert len(llm.generate([], params)) == 0
    # numpy integers, as list(array) gives them, are token ids like Python ints
    ids = tok.encode(text)
    from_numpy = llm.generate(list(np.array(ids)), params) + llm.generate(
        [list(np.array(ids))], params
    )
    assert [o.prompt_token_ids for o in from_numpy] == [ids, ids]
    assert all(type(t) is int for o in from_numpy for t in o.prompt_token_ids)
    for bad, name in [(None, "NoneType"), (5, "int")]:
        with pytest.raises(GenerationError, match=f"prompts must be .*got {name}"):
            llm.generate(bad, params)
    with pytest.raises(GenerationError, match="params must be SamplingParams .*got int"):
        llm.generate([text], 5)


def test_streaming_deltas_rebuild_sampled_text(tok_model, demo_tokenizer, make_llm):
    tok = demo_tokenizer
    llm = make_llm(tok_model, tok, max_num_batched_tokens=16, kv_cache_bytes=64 * BYTES_PER_TOKEN)
    prompts = ["Hello", "The quick brown fox jumps over", "What is 2+2?", "a b c d e f g"]
    params = [
        SamplingParams(seed=i, temperature=1.0, max_tokens=24, stop=[" the", "e"] if i % 2 else [])
        for i in range(len(prompts))
    ]
    streams: dict[str, list[RequestOutput]] = {}
    outputs = llm.generate(
        prompts, params, on_output=lambda o: streams.setdefault(o.request_id, []).append(o)
    )
    for output in outputs:
        stream = streams[output.request_id]
        assert stream[-1] is output
        completion = output.outputs[0]
        assert "".join(o.outputs[0].delta_text for o in stream) == completion.text
        assert sum((o.outputs[0].delta_token_ids for o in stream), []) == completion.token_ids
        assert all(len(o.outputs[0].token_ids) <= len(completion.token_ids) for o in stream)
        if completion.finish_reason == "stop" and isinstance(completion.stop_reason, str):
            assert completion.stop_reason not in completion.text
    assert any(isinstance(o.outputs[0].stop_reason, str) for o in outputs)  # a stop string hit
    assert llm.engine.stats()["preemptions"] > 0


# ----------------------------------------------------------------------------------------------
# Logprobs
# ----------------------------------------------------------------------------------------------


def check_logprobs(model, prompt, completion, k):
    """Chosen-token logprob and top-k of every generated token against one full forward."""
    ids = prompt + completion.token_ids
    lp = full_logprobs(model, ids[:-1])
    assert len(completion.logprobs) == len(completion.token_ids)
    for i, entry in enumerate(completion.logprobs):
        row = lp[len(prompt) - 1 + i]
        assert entry.token_id == completion.token_ids[i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        top_lp, top_ids = row.topk(k)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_lp.tolist(), abs=1e-4)


def test_logprobs_match_a_full_forward(tiny_model, make_llm):
    prompts = PROMPTS[:10]
    params = [
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3),
        SamplingParams(seed=3, max_tokens=8, ignore_eos=True, logprobs=5),
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        SamplingParams(seed=4, temperature=1.5, top_k=4, max_tokens=8, ignore_eos=True, logprobs=0),
        # min_tokens masks the stop tokens for sampling, but logprobs stay the model's.
        SamplingParams(
            temperature=0.0, max_tokens=8, min_tokens=8, stop_token_ids=list(range(100)), logprobs=4
        ),
    ] * 2
    outputs = make_llm(tiny_model, max_num_batched_tokens=32, block_size=4).generate(
        prompts, params
    )
    for output, prompt, p in zip(outputs, prompts, params, strict=True):
        completion = output.outputs[0]
        if p.logprobs is None:
            assert completion.logprobs is None
            continue
        check_logprobs(tiny_model, prompt, completion, p.logprobs)
        if p.logprobs == 0:
            assert all(entry.top == [] for entry in completion.logprobs)
        if p.min_tokens:
            assert min(completion.token_ids) >= 100
            assert completion.token_ids == generate_ids(tiny_model, prompt, p).token_ids
        # Logprobs describe the model, not the sampler: raw log-softmax, not top-k renormalised.
        assert all(entry.logprob < 0 for entry in completion.logprobs)


def check_prompt_logprobs(model, prompt, prompt_logprobs, k):
    lp = full_logprobs(model, prompt)
    assert len(prompt_logprobs) == len(prompt)
    assert prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        entry = prompt_logprobs[i]
        assert entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-4)
        top_lp, top_ids = lp[i - 1].topk(k)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_lp.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(max_num_batched_tokens=13, block_size=4),
        dict(kv_cache_bytes=TINY_POOL, max_num_batched_tokens=29),
    ],
    ids=["whole-prompt", "chunked", "chunked-preempted"],
)
def test_prompt_logprobs_match_a_full_forward(tiny_model, make_llm, expected, config):
    llm = make_llm(tiny_model, **config)
    llm.generate(PROMPTS[8:10], GREEDY)  # warm the prefix cache: it must not be used
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=2
    )
    indices = [1, 8, 11, 9, 3]
    outputs = llm.generate([PROMPTS[i] for i in indices] + PROMPTS[:4], [params] * 5 + [GREEDY] * 4)
    for output, i in zip(outputs[:5], indices, strict=True):
        check_prompt_logprobs(tiny_model, PROMPTS[i], output.prompt_logprobs, 2)
        assert output.num_cached_tokens == 0
        assert output.outputs[0].token_ids == expected[i]
    assert all(o.prompt_logprobs is None for o in outputs[5:])
    if config.get("kv_cache_bytes"):
        assert llm.engine.stats()["preemptions"] > 0


def test_prompt_logprobs_zero_and_n_greater_than_one(tiny_model, make_llm):
    params = SamplingParams(
        n=2, seed=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0, logprobs=1
    )
    out = make_llm(tiny_model).generate([PROMPTS[7]], params)[0]
    check_prompt_logprobs(tiny_model, PROMPTS[7], out.prompt_logprobs, 0)
    assert len(out.outputs) == 2
    for completion in out.outputs:
        check_logprobs(tiny_model, PROMPTS[7], completion, 1)


def test_candidate_logprobs(tiny_model, make_llm):
    candidates = [5, 17, 300, 511]
    params = SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True, candidate_token_ids=candidates
    )
    outputs = make_llm(tiny_model).generate(PROMPTS[2:5], [params, GREEDY, params])
    assert outputs[1].outputs[0].candidate_logprobs is None
    for output in (outputs[0], outputs[2]):
        completion = output.outputs[0]
        prompt = output.prompt_token_ids
        lp = full_logprobs(tiny_model, prompt + completion.token_ids[:-1])
        assert len(completion.candidate_logprobs) == len(completion.token_ids)
        for i, values in enumerate(completion.candidate_logprobs):
            assert list(values) == candidates
            row = lp[len(prompt) - 1 + i]
            assert list(values.values()) == pytest.approx(row[candidates].tolist(), abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Refusals and validation
# ----------------------------------------------------------------------------------------------


def test_request_longer_than_the_context_window_is_refused(tiny_model, make_engine, drain):
    engine = make_engine(tiny_model)
    prompt = random_prompts([200], seed=13)[0]
    with pytest.raises(GenerationError, match=r"200 tokens.*max_tokens is 57.*256"):
        engine.add_request(prompt, SamplingParams(max_tokens=57))
    # Filling the window exactly is fine.
    params = SamplingParams(max_tokens=56, temperature=0, ignore_eos=True)
    engine.add_request(prompt, params, request_id="full")
    out = drain(engine)["full"][-1].outputs[0]
    assert out.token_ids == generate_ids(tiny_model, prompt, params).token_ids
    assert len(out.token_ids) == 56 and out.finish_reason == "length"


def test_request_larger_than_the_whole_pool_is_refused(tiny_model, make_engine, drain):
    engine = make_engine(tiny_model, kv_cache_bytes=8 * 16 * BYTES_PER_TOKEN)  # 128 tokens
    assert engine.pool.num_blocks == 8
    with pytest.raises(GenerationError, match=r"149 tokens.*128 tokens"):
        engine.add_request([1] * 100, SamplingParams(max_tokens=50))
    engine.add_request([1] * 100, SamplingParams(max_tokens=28, ignore_eos=True), request_id="ok")
    out = drain(engine)["ok"][-1]
    assert len(out.outputs[0].token_ids) == 28


@pytest.mark.parametrize("config", [dict(), dict(decode_attention="sdpa")], ids=["loop", "sdpa"])
def test_a_request_filling_the_whole_pool_exactly_runs(tiny_model, make_engine, drain, config):
    """The last generated token never enters the KV cache, so prompt + max_tokens may exceed
    the pool by one token (it was refused, with a wrong count of the tokens it needed)."""
    engine = make_engine(tiny_model, kv_cache_bytes=8 * 16 * BYTES_PER_TOKEN, **config)
    params = SamplingParams(max_tokens=29, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPTS[10][:100], params, request_id="full")
    out = drain(engine)["full"][-1]
    assert out.outputs[0].token_ids == generate_ids(tiny_model, PROMPTS[10][:100], params).token_ids
    with pytest.raises(GenerationError, match=r"129 tokens.*128 tokens"):
        engine.add_request([1] * 100, SamplingParams(max_tokens=30))


def test_max_model_len_caps_requests_below_the_context_window(tiny_model, make_engine, drain):
    """As vLLM's max_model_len: prompt + max_tokens beyond it is refused (the model's window
    is 256), and a cap beyond the model's window is an error, not positions it never saw."""
    engine = make_engine(tiny_model, max_model_len=64)
    assert engine.max_model_len == 64
    with pytest.raises(GenerationError, match="65 tokens exceed the max_model_len of 64 tokens"):
        engine.add_request([1] * 60, SamplingParams(max_tokens=5))
    engine.add_request([1] * 60, SamplingParams(max_tokens=4, ignore_eos=True), request_id="ok")
    assert len(drain(engine)["ok"][-1].outputs[0].token_ids) == 4
    with pytest.raises(GenerationError, match=r"max_model_len is 257, beyond .* window of 256"):
        LLMEngine(tiny_model, None, EngineConfig(max_model_len=257))
    uncapped = make_engine(tiny_model, max_model_len=256)
    with pytest.raises(GenerationError, match="exceed the model's context window of 256"):
        uncapped.add_request([1] * 250, SamplingParams(max_tokens=7))


def test_kv_budget_smaller_than_one_block_is_refused(tiny_model):
    with pytest.raises(GenerationError, match="smaller than one block"):
        engine_module.LLMEngine(tiny_model, None, EngineConfig(kv_cache_bytes=100))


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "empty"),
        ("", "empty"),
        ([5, 640], "640 is outside the vocabulary"),
        ([-1, 5], "-1 is outside the vocabulary"),
        (42, "must be a string, a list of token ids, or a list of chat messages"),
        (None, "must be a string"),
        ([1, "a"], "must be a string"),
        ([1.0, 2.0], "must be a string"),
        ([True, 3], "must be a string"),
        ([{"role": "user", "content": "hi"}, 3], "must be a string"),
    ],
    ids=[
        "empty-list",
        "empty-text",
        "too-big",
        "negative",
        "int",
        "none",
        "mixed",
        "floats",
        "bools",
        "messages-and-ids",
    ],
)
def test_invalid_prompts_are_refused(tok_model, demo_tokenizer, make_engine, prompt, match):
    engine = make_engine(tok_model, demo_tokenizer)  # vocabulary of 640
    with pytest.raises(GenerationError, match=match):
        engine.add_request(prompt, GREEDY)
    assert engine.num_unfinished_requests == 0


def test_a_tokenizer_larger_than_the_model_is_refused_per_prompt(
    tiny_model, demo_tokenizer, make_engine, drain
):
    """The demo tokenizer has 600 tokens, the model 512 embeddings: a text or chat prompt with
    an id beyond them was an IndexError in the step, which ends every request in it."""
    engine = make_engine(tiny_model, demo_tokenizer)
    text = demo_tokenizer.decode([520, 560])
    assert max(demo_tokenizer.encode(text)) >= 512
    for prompt in (text, [{"role": "user", "content": text}]):
        with pytest.raises(GenerationError, match=r"token id \d+, outside the model's vocabulary"):
            engine.add_request(prompt, GREEDY)
    fits = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.add_request(demo_tokenizer.decode([40, 41]), fits, request_id="fits")
    assert drain(engine)["fits"][-1].finished


def test_text_prompts_need_a_tokenizer(tiny_model, make_engine):
    engine = make_engine(tiny_model)
    with pytest.raises(GenerationError, match="need a tokenizer"):
        engine.add_request("hello", GREEDY)
    with pytest.raises(GenerationError, match="need a tokenizer"):
        engine.add_request([{"role": "user", "content": "hi"}], GREEDY)
    with pytest.raises(GenerationError, match="stop strings need a tokenizer"):
        engine.add_request([1, 2], SamplingParams(stop=["x"]))


def test_other_refusals(tiny_model, make_engine):
    engine = make_engine(tiny_model)
    engine.add_request([1, 2, 3], GREEDY, request_id="dup")
    with pytest.raises(GenerationError, match="'dup' is already in use"):
        engine.add_request([4, 5], GREEDY, request_id="dup")
    with pytest.raises(GenerationError, match="SamplingParams"):
        engine.add_request([1, 2], {"temperature": 0})
    with pytest.raises(GenerationError, match=r"stop_token_ids contains 600"):
        engine.add_request([1, 2], SamplingParams(min_tokens=2, stop_token_ids=[600]))
    with pytest.raises(GenerationError, match=r"candidate_token_ids contains 512"):
        engine.add_request([1, 2], SamplingParams(candidate_token_ids=[1, 512]))
    assert engine.num_unfinished_requests == 1
    engine.abort("dup")


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_more_top_logprobs_than_the_vocabulary_are_refused(
    field, scripted_model, make_table, make_engine, drain
):
    """Refused at add_request, not by a crash in the middle of a step (which would kill the
    async engine for every request)."""
    model = scripted_model(make_table({}, vocab_size=8, positions=32))
    engine = make_engine(model)
    with pytest.raises(GenerationError, match=rf"SamplingParams.{field} .*9.* vocabulary of 8"):
        engine.add_request([1, 2], SamplingParams(max_tokens=2, **{field: 9}))
    with pytest.raises(GenerationError, match=rf"SamplingParams.{field} .*9.* vocabulary of 8"):
        generate_ids(model, [1, 2], SamplingParams(max_tokens=2, **{field: 9}))
    assert engine.num_unfinished_requests == 0
    fits = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, **{field: 8})
    engine.add_request([1, 2], fits, request_id="all")
    out = drain(engine)["all"][-1]
    assert out.finished and len(out.outputs[0].token_ids) == 2


def test_generate_refuses_atomically(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    with pytest.raises(GenerationError, match=r"prompt 2: .*empty"):
        llm.generate([[1, 2], [3], [], [4]], GREEDY)
    assert not llm.engine.has_unfinished_requests()  # the first two were withdrawn
    with pytest.raises(GenerationError, match="2 prompts but 1 SamplingParams"):
        llm.generate([[1], [2]], [GREEDY])
    with pytest.raises(GenerationError, match="2 prompts but 0 SamplingParams"):
        llm.generate([[1], [2]], [])  # an empty list is not "the defaults"


def test_generate_refuses_malformed_chat_messages_atomically(tok_model, demo_tokenizer, make_llm):
    """A chat prompt is refused with ChatFormatError, not GenerationError: the prompts added
    before it must still be withdrawn, and the error must still say which prompt it was."""
    llm = make_llm(tok_model, demo_tokenizer)
    bad = [{"role": "user", "content": 5}]
    with pytest.raises(GenerationError, match=r"prompt 2: message 0, field 'content'"):
        llm.generate(["hello", [{"role": "user", "content": "hi"}], bad], GREEDY)
    assert llm.engine.num_unfinished_requests == 0
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "field",
    [
        dict(block_size=0),
        dict(block_size=True),
        dict(max_num_seqs=0),
        dict(max_num_batched_tokens=0),
        dict(max_num_batched_tokens=2.5),
        dict(max_num_batched_tokens="5"),
        dict(kv_cache_bytes="1000000"),
        dict(gpu_memory_fraction=float("nan")),
        dict(gpu_memory_fraction=1.5),
        dict(max_model_len=0),
        dict(max_model_len=100.0),
        dict(enable_prefix_caching="false"),
        dict(enable_chunked_prefill=0),
        dict(cuda_graphs="no"),
        dict(gpu_memory_fraction=True),
        dict(max_graph_batch_size=True),
    ],
)
def test_engine_config_validation(field):
    with pytest.raises(GenerationError, match=next(iter(field))):
        EngineConfig(**field)


def test_a_kv_cache_larger_than_memory_is_a_clear_error(tiny_model):
    """An explicit budget beyond what can be allocated (here 1 PiB of host memory) names the
    cache's size and the option, instead of the allocator's report."""
    with pytest.raises(
        GenerationError, match=r"KV cache of \d+ blocks .* does not fit.*kv-cache-gb"
    ):
        LLMEngine(tiny_model, None, EngineConfig(kv_cache_bytes=2**50))


def test_a_kv_cache_beyond_any_memory_is_a_clear_error(tiny_model):
    """A budget whose byte count overflows torch's size computation (--kv-cache-gb 1e11) is
    the same clear error, not torch's RuntimeError."""
    with pytest.raises(GenerationError, match=r"does not fit.*kv-cache-gb"):
        LLMEngine(tiny_model, None, EngineConfig(kv_cache_bytes=2**80))


def test_prompt_longer_than_the_step_budget_without_chunked_prefill(
    tiny_model, make_engine, drain, expected
):
    """Unchunked, a prompt over the step budget runs alone in its step (or it would never
    run), and its continuation is the reference generator's."""
    engine = make_engine(tiny_model, enable_chunked_prefill=False, max_num_batched_tokens=32)
    engine.add_request(PROMPTS[8], GREEDY, request_id="long")  # 64 tokens
    try:
        outputs = drain(engine, max_steps=100)
    finally:
        engine.abort("long")
    final = outputs["long"][-1]
    assert final.finished and final.outputs[0].token_ids == expected[8]


# ----------------------------------------------------------------------------------------------
# End to end: the sampled distribution (chi-square on a scripted 8-token vocabulary)
# ----------------------------------------------------------------------------------------------

LOGITS = np.array([0.0, 2.0, -1.0, 1.0, -2.0, 1.5, 0.5, -0.5])
# 0.999 quantiles of chi-square by degrees of freedom (tables; checked below with gammaincc).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def claimed_distribution(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """What SamplingParams documents: temperature, then top-k, then top-p on the renormalised
    top-k distribution (keep the smallest prefix reaching p), then min-p."""
    probs = np.exp(LOGITS / temperature - (LOGITS / temperature).max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.ones(len(LOGITS), dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    probs = np.where(keep, probs, 0.0) / probs[keep].sum()
    if top_p < 1.0:
        cumulative = np.cumsum(probs[order])
        before = cumulative - probs[order]
        keep[order[(before >= top_p) & (np.arange(len(order)) > 0)]] = False
        probs = np.where(keep, probs, 0.0) / probs[keep].sum()
    if min_p:
        keep &= probs >= min_p * probs.max()
        probs = np.where(keep, probs, 0.0) / probs[keep].sum()
    return probs


def test_chi_square_table():
    for df, quantile in CHI2_999.items():
        p = torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(quantile / 2.0))
        assert float(p) == pytest.approx(0.001, rel=1e-3)


@pytest.fixture(scope="module")
def fixed_logits_model(scripted_model):
    table = torch.tensor(LOGITS, dtype=torch.float32).expand(64, -1)
    return scripted_model(table, eos_token_id=0)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7),
        dict(top_k=3),
        dict(top_p=0.8),
        dict(min_p=0.2),
        dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.05),
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_engine_samples_the_claimed_distribution(fixed_logits_model, make_llm, settings):
    expected = claimed_distribution(**settings)
    requests, tokens_each = 100, 50  # 5000 draws
    llm = make_llm(fixed_logits_model, kv_cache_bytes=64 * 64 * requests, block_size=16)
    params = [
        SamplingParams(seed=1000 + i, max_tokens=tokens_each, ignore_eos=True, **settings)
        for i in range(requests)
    ]
    outputs = llm.generate([[1]] * requests, params, progress=False)
    draws = np.array([t for o in outputs for t in o.outputs[0].token_ids])
    assert len(draws) == requests * tokens_each
    counts = np.bincount(draws, minlength=len(LOGITS))
    assert counts[expected == 0].sum() == 0, f"a masked token was sampled: {counts}"
    support = expected > 0
    want = expected[support] * len(draws)
    statistic = float(((counts[support] - want) ** 2 / want).sum())
    df = int(support.sum()) - 1
    assert statistic < CHI2_999[df], (statistic, counts.tolist(), expected.tolist())


def test_engine_chi_square_detects_the_wrong_temperature(fixed_logits_model, make_llm):
    """The check above has power: samples at temperature 1 fail against the claim T=0.7."""
    llm = make_llm(fixed_logits_model, kv_cache_bytes=64 * 64 * 100)
    params = [SamplingParams(seed=i, max_tokens=50, ignore_eos=True) for i in range(100)]
    outputs = llm.generate([[1]] * 100, params, progress=False)
    counts = np.bincount([t for o in outputs for t in o.outputs[0].token_ids], minlength=8)
    want = claimed_distribution(temperature=0.7) * counts.sum()
    assert float(((counts - want) ** 2 / want).sum()) > CHI2_999[7]


def test_llm_loads_a_checkpoint_path_as_vllm_does(
    tok_model, demo_tokenizer, tmp_path, _engines, make_llm
):
    """`LLM("path")` (vLLM's first line) needed the model and tokenizer loaded by hand."""
    from tulu.engine.engine import LLM
    from tulu.model.checkpoint import save_model

    directory = save_model(tok_model, tmp_path / "ckpt", tokenizer=demo_tokenizer)
    params = SamplingParams(max_tokens=6, temperature=0)
    messages = [{"role": "user", "content": "Name three rivers."}]
    llm = LLM(str(directory), dtype="float32", device="cpu")
    _engines.append(llm.engine)
    want = make_llm(tok_model, demo_tokenizer).generate(messages, params)[0].outputs[0]
    assert llm.generate(messages, params)[0].outputs[0].token_ids == want.token_ids
    half = LLM(directory, dtype="bfloat16", device="cpu")
    _engines.append(half.engine)
    assert half.engine.dtype == torch.bfloat16 and half.engine.tokenizer is not None
    with pytest.raises(GenerationError, match="LLM: dtype, device apply to a checkpoint path"):
        LLM(tok_model, demo_tokenizer, dtype="bfloat16", device="cpu")
    with pytest.raises(TuluError, match="no_such_dir"):
        LLM(tmp_path / "no_such_dir")
    with pytest.raises(GenerationError, match="pass the engine settings as config="):
        LLM(str(directory), EngineConfig())


def test_large_batches_show_a_progress_bar_on_stderr(tiny_model, make_llm, capsys):
    """LLM.generate shows a bar (finished requests, output tokens/s) for more than 16 prompts
    unless told otherwise, on stderr: stdout holds results (tulu generate, tulu eval)."""
    llm = make_llm(tiny_model)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    prompts = [[1 + i, 2, 3] for i in range(17)]
    capsys.readouterr()
    llm.generate(prompts[:16], params)
    assert capsys.readouterr() == ("", "")  # 16: no bar
    llm.generate(prompts, params)
    out, err = capsys.readouterr()
    assert out == "" and "generating" in err and "17/17" in err and "tok/s" in err
    llm.generate(prompts, params, progress=False)
    assert capsys.readouterr() == ("", "")
    llm.generate(prompts[:2], params, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_num_cached_tokens_counts_the_first_admission_not_a_readmission(tiny_model, make_llm):
    """`victim` computes its whole prompt, is preempted (4 blocks of 4: `grower` needs its
    blocks) and, readmitted, finds its own blocks in the prefix cache: those were not served
    to the request, it computed them. It reports what its first admission found (nothing)."""
    grower, victim = random_prompts([4, 8], seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    pool = 16 * BYTES_PER_TOKEN
    llm = make_llm(tiny_model, block_size=4, kv_cache_bytes=pool)
    outputs = llm.generate([grower, victim], params)
    assert token_ids(outputs) == [
        generate_ids(tiny_model, p, params).token_ids for p in (grower, victim)
    ]
    assert llm.engine.stats()["preemptions"] > 0
    assert llm.engine.scheduler.prefix_hits > 0  # the readmission found its own blocks
    assert [o.num_cached_tokens for o in outputs] == [0, 0]


def test_n_samples_report_what_the_first_sample_found_in_the_cache(tiny_model, make_llm):
    """n = 2 whose prompt `shared` (12 tokens: 2 blocks of 4 to reuse) an earlier request
    cached. The first sample takes both blocks and uses the step's last budget; it finishes,
    and the next step the decodes of `x1` and `x2` each take a block, evicting one of them
    before the second sample is admitted. The request reports the prompt tokens the cache
    served it (the first sample's 8), not the minimum over its samples (4)."""
    x1, x2, shared = random_prompts([4, 4, 12], seed=22)
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm = make_llm(
        tiny_model, block_size=4, kv_cache_bytes=20 * BYTES_PER_TOKEN, max_num_batched_tokens=12
    )
    llm.generate([shared], greedy)
    decode = dataclasses.replace(greedy, max_tokens=4)
    outputs = llm.generate([x1, x2, shared], [decode, decode, dataclasses.replace(greedy, n=2)])
    assert token_ids(outputs[:2]) == [
        generate_ids(tiny_model, p, decode).token_ids for p in (x1, x2)
    ]
    want = generate_ids(tiny_model, shared, greedy).token_ids
    assert [c.token_ids for c in outputs[2].outputs] == [want, want]
    assert llm.engine.scheduler.prefix_hits == 2 + 1  # the second sample found one block
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 8]


# ----------------------------------------------------------------------------------------------
# bad_words
# ----------------------------------------------------------------------------------------------


def _contains(tokens: list[int], sequence: tuple[int, ...]) -> bool:
    n = len(sequence)
    return any(tuple(tokens[i : i + n]) == sequence for i in range(len(tokens) - n + 1))


def test_bad_words_are_never_generated(tok_model, demo_tokenizer, hf_twin, make_llm):
    """Words the model generates (one written as a single token, one of two tokens), banned:
    the reply never holds their token sequences, and equals the reference generator's and
    transformers' greedy `generate` with the same sequences as `bad_words_ids` (transformers
    also matches a banned prefix across the prompt's end, as no prompt here ends with one);
    seeded samples never hold them either."""
    from tulu.engine.sampling import bad_word_token_ids

    prompt = demo_tokenizer.encode("the cat sat on the mat. the dog sat on the")
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = make_llm(tok_model, demo_tokenizer)
    output = llm.generate([prompt], free)[0].outputs[0].token_ids
    texts = [demo_tokenizer.decode([t]).strip() for t in output]
    word = next(t for t in texts if t.isalpha())
    two = demo_tokenizer.decode(output[1:3])
    hf = hf_twin(tok_model)
    for words in ([word], [two]):
        sequences = bad_word_token_ids(words, demo_tokenizer, tok_model.config.vocab_size)
        assert any(_contains(output, s) for s in sequences), "the word must be generated first"
        assert not any(prompt[-j:] == list(s[:j]) for s in sequences for j in range(1, len(s))), (
            "the prompt must not end with a banned prefix (transformers would see it)"
        )
        banned = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=words)
        got = llm.generate([prompt], banned)[0].outputs[0].token_ids
        assert not any(_contains(got, s) for s in sequences), (words, got)
        assert got == generate_ids(tok_model, prompt, banned, tokenizer=demo_tokenizer).token_ids
        assert got == hf_greedy(hf, prompt, 24, bad_words_ids=[list(s) for s in sequences])
    # Seeded samples: a word some of them hold, banned, is in none of them.
    sampled = SamplingParams(temperature=1.0, seed=1, max_tokens=24, n=4, ignore_eos=True)
    samples = [c.token_ids for c in llm.generate([prompt], sampled)[0].outputs]
    words = [demo_tokenizer.decode([t]).strip() for sample in samples for t in sample]
    word = next(w for w in words if w.isalpha())
    sequences = bad_word_token_ids([word], demo_tokenizer, tok_model.config.vocab_size)
    assert any(_contains(sample, s) for sample in samples for s in sequences)
    banned = dataclasses.replace(sampled, bad_words=[word])
    for completion in llm.generate([prompt], banned)[0].outputs:
        assert not any(_contains(completion.token_ids, s) for s in sequences)


def test_bad_words_need_a_tokenizer_that_fits_the_model(tiny_model, demo_tokenizer, make_engine):
    """A word with a token past the model's 512 rows (the demo tokenizer has 600) is refused
    when added: masking it would fail the step of every request in the batch."""
    engine = make_engine(tiny_model)
    with pytest.raises(GenerationError, match="bad_words need a tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(bad_words=["x"]))
    engine = make_engine(tiny_model, demo_tokenizer)
    word = next(
        text
        for token in range(512, len(demo_tokenizer))
        if (text := demo_tokenizer.decode([token]).strip()).isalpha()
        and any(t >= 512 for t in demo_tokenizer.encode(text))
    )
    with pytest.raises(GenerationError, match="bad_words: .* outside the model's vocabulary"):
        engine.add_request([1, 2, 3], SamplingParams(bad_words=[word]))
    assert not engine.has_unfinished_requests()


def test_bad_words_banning_every_allowed_token_are_refused(tok_model, demo_tokenizer, make_engine):
    """Without the check the rows would be all -inf and the argmax of nothing token 0 (EOS)."""
    from tulu.engine.sampling import bad_word_token_ids

    cat = sorted(
        s[0]
        for s in bad_word_token_ids(["cat"], demo_tokenizer, tok_model.config.vocab_size)
        if len(s) == 1
    )
    engine = make_engine(tok_model, demo_tokenizer)
    params = SamplingParams(temperature=0, allowed_token_ids=cat, bad_words=["cat"])
    with pytest.raises(GenerationError, match="bad_words ban every token allowed_token_ids"):
        engine.add_request("the cat", params)
    with pytest.raises(GenerationError, match="bad_words ban every token allowed_token_ids"):
        generate_ids(tok_model, demo_tokenizer.encode("the cat"), params, tokenizer=demo_tokenizer)
