"""N-gram speculative decoding: the proposer, its config, and the engine's verification.

The oracle is the engine itself without speculation (every token, log-probability, finish
and stop reason must be the same), plus transformers' `generate` with prompt lookup and the
reference generator. Prompts repeat a short random motif, so that the random models' greedy
continuations repeat their context and the proposals are often, but not always, right: both
the accepting and the rejecting paths run, which most tests check through the engine's
counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import hf_greedy
from tulu.engine.engine import LLMEngine, RequestOutput
from tulu.engine.reference import generate_ids
from tulu.engine.sampling import SamplingParams
from tulu.engine.speculative import (
    SpeculativeConfig,
    parse_speculative_config,
    propose_ngram,
    speculates,
)
from tulu.errors import GenerationError

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 512
BYTES_PER_TOKEN = 2 * 2 * 64 * 4  # the tiny model's K and V per token (float32)
SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)


def motif_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random motif of 3-8 tokens two to five times, then part of it."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        motif = rng.integers(0, VOCAB, int(rng.integers(3, 9))).tolist()
        cut = int(rng.integers(0, len(motif)))
        prompts.append(motif * int(rng.integers(2, 6)) + motif[:cut])
    return prompts


PROMPTS = motif_prompts(12)


def run(engine: LLMEngine, prompts, params, drain) -> list[RequestOutput]:
    """Add every prompt (params: one for all or one each) and step until idle."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    ids = [
        engine.add_request(p, q, request_id=f"r{i}")
        for i, (p, q) in enumerate(zip(prompts, each, strict=True))
    ]
    finished = {o.request_id: o for stream in drain(engine).values() for o in stream if o.finished}
    return [finished[i] for i in ids]


def assert_same(got: list[RequestOutput], want: list[RequestOutput]) -> None:
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids, a.request_id
            assert x.text == y.text, a.request_id
            assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason)
            assert (x.logprobs is None) == (y.logprobs is None)
            assert (x.candidate_logprobs is None) == (y.candidate_logprobs is None)
            if x.logprobs is not None:
                assert [e.token_id for e in x.logprobs] == [e.token_id for e in y.logprobs]
                assert [e.logprob for e in x.logprobs] == pytest.approx(
                    [e.logprob for e in y.logprobs], abs=1e-4
                )
                assert [[t for t, _ in e.top] for e in x.logprobs] == [
                    [t for t, _ in e.top] for e in y.logprobs
                ]
            if x.candidate_logprobs is not None:
                for p, q in zip(x.candidate_logprobs, y.candidate_logprobs, strict=True):
                    assert p == pytest.approx(q, abs=1e-4)


def check_both_paths(engine: LLMEngine) -> None:
    """Proposals were made, some kept and some refused: both paths of verification ran."""
    stats = engine.stats()
    drafts, accepted = stats["spec_decode_draft_tokens"], stats["spec_decode_accepted_tokens"]
    assert 0 < accepted < drafts, (drafts, accepted)


def greedy_sequence(number: int, prompt: list[int]):
    """A scheduler's Sequence of a greedy request for `prompt` (for the scheduler's tests)."""
    from tulu.engine.scheduler import Sequence

    return Sequence(
        seq_id=number,
        request_id=f"r{number}",
        index=0,
        token_ids=list(prompt),
        num_prompt_tokens=len(prompt),
        params=SamplingParams(temperature=0, max_tokens=20),
        arrival=float(number),
    )


# ----------------------------------------------------------------------------------------------
# The proposer and its config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "limit", "expected"),
    [
        # the latest earlier occurrence of the longest suffix n-gram (3: "7 8 9")
        ([7, 8, 9, 1, 2, 7, 8, 9, 5, 6, 7, 8, 9], 4, [5, 6, 7, 8]),
        ([7, 8, 9, 1, 2, 7, 8, 9, 5, 6, 7, 8, 9], 2, [5, 6]),
        # no 3- or 2-gram repeats: the 1-gram "4" does
        ([4, 1, 2, 3, 4], 4, [1, 2, 3, 4]),
        # the continuation may run into the suffix itself
        ([5, 5, 5], 4, [5]),
        ([5, 5, 5, 5], 4, [5]),  # the 3-gram at 0 (the most recent that ends before the last)
        # nothing repeats; too short; no room
        ([1, 2, 3, 4], 4, []),
        ([1], 4, []),
        ([3, 1, 3], 0, []),
    ],
)
def test_propose_ngram(ids, limit, expected):
    assert propose_ngram(ids, SPEC, limit) == expected


def test_proposals_are_capped_by_num_speculative_tokens():
    config = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_max=2, prompt_lookup_min=2)
    assert propose_ngram([1, 2, 3, 4, 5, 1, 2], config, 10) == [3, 4]
    assert propose_ngram([1, 3, 4, 5, 1, 2], config, 10) == []  # "1 2" never occurred before


def test_a_byte_match_across_token_ids_is_not_a_match():
    """The ids are searched as 4-byte integers: bytes of the suffix that occur straddling two
    ids (here the high bytes of 256 and the low byte of 1: 00 01 00 00 | 01) are no match."""
    config = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=1, prompt_lookup_min=1)
    assert propose_ngram([256, 1, 9, 65536], config, 3) == []
    assert propose_ngram([65536, 1, 9, 65536], config, 3) == [1, 9, 65536]


def test_parse_speculative_config():
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 5}') == (
        SpeculativeConfig(5, 4, 2)
    )
    one = parse_speculative_config(
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 6}'
    )
    assert (one.prompt_lookup_max, one.prompt_lookup_min) == (6, 6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"method": "ngram"}', "needs"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be 'ngram'"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": true}', "num_speculative_tokens"),
        (
            '{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}',
            "unknown key(s) 'model'",
        ),
        (
            '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, '
            '"prompt_lookup_max": 2}',
            "prompt_lookup_min (3)",
        ),
    ],
)
def test_bad_speculative_configs_are_refused(text, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_speculative_config(text)


def test_which_requests_speculate():
    assert speculates(SamplingParams(temperature=0))
    assert speculates(SamplingParams(temperature=0, logit_bias={3: 5.0}, min_tokens=2))
    assert speculates(SamplingParams(temperature=0.7, top_k=5))  # unseeded sampling
    assert speculates(SamplingParams(temperature=0, seed=3))  # greedy: the seed plays no part
    assert not speculates(SamplingParams(temperature=0.7, seed=3))  # batch-independent seeds
    assert not speculates(SamplingParams(temperature=0, repetition_penalty=1.2))
    assert not speculates(SamplingParams(temperature=0, presence_penalty=0.5))
    assert not speculates(SamplingParams(temperature=0, bad_words=["x"]))


# ----------------------------------------------------------------------------------------------
# The engine: the same outputs as without speculation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(block_size=4),
        dict(kv_cache_bytes=24 * 4 * BYTES_PER_TOKEN, block_size=4, max_num_batched_tokens=20),
        dict(max_num_batched_tokens=14, max_num_seqs=12, enable_prefix_caching=False),
        dict(decode_attention="sdpa"),
    ],
    ids=["plain", "block-4", "preempting", "tight-budget", "decode-fast-path"],
)
def test_greedy_outputs_equal_the_engine_without_speculation(
    tiny_model, make_engine, drain, config
):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    spec = make_engine(tiny_model, speculative=SPEC, **config)
    got = run(spec, PROMPTS, params, drain)
    want = run(make_engine(tiny_model, **config), PROMPTS, params, drain)
    assert_same(got, want)
    check_both_paths(spec)
    if "kv_cache_bytes" in config:
        assert spec.stats()["preemptions"] > 0


def test_greedy_outputs_equal_transformers_with_prompt_lookup(tiny_model, hf_twin, make_llm):
    """transformers' own prompt-lookup decoding (an independent implementation of the same
    idea) and its plain greedy decoding give the tokens the speculating engine gives."""
    hf = hf_twin(tiny_model)
    prompts = PROMPTS[:4]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = make_llm(tiny_model, speculative=SPEC)
    outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = output.outputs[0].token_ids
        assert ids == hf_greedy(hf, prompt, 24)
        assert ids == hf_greedy(hf, prompt, 24, prompt_lookup_num_tokens=4)
    check_both_paths(llm.engine)


def test_stops_inside_the_kept_proposals(tok_model, demo_tokenizer, make_engine, drain):
    """Stop strings, stop tokens, EOS, max_tokens and min_tokens can end a completion in
    the middle of a step's kept proposals: what follows is dropped, as if decoded one by one;
    candidate log-probabilities are scored at every kept token."""
    text = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"
    prompt = demo_tokenizer.encode(text)
    warm = make_engine(tok_model, demo_tokenizer)
    (free,) = run(
        warm, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), drain
    )
    generated = free.outputs[0].token_ids
    stop_text = demo_tokenizer.decode(generated[6:9])
    cases = [
        dict(max_tokens=30, ignore_eos=True),
        dict(max_tokens=7, ignore_eos=True),
        dict(max_tokens=30, stop=[stop_text]),
        dict(max_tokens=30, stop=[stop_text], include_stop_str_in_output=True),
        dict(max_tokens=30, stop_token_ids=[generated[10]], ignore_eos=True),
        dict(max_tokens=30, min_tokens=12, stop_token_ids=[generated[10]], ignore_eos=True),
        dict(max_tokens=30, candidate_token_ids=[1, 2, 3], ignore_eos=True),
        dict(max_tokens=30, logit_bias={int(generated[4]): -100.0}, ignore_eos=True),
        dict(max_tokens=30, n=2),
    ]
    params = [SamplingParams(temperature=0, **case) for case in cases]
    spec = make_engine(tok_model, demo_tokenizer, speculative=SPEC)
    got = run(spec, [prompt] * len(params), params, drain)
    want = run(make_engine(tok_model, demo_tokenizer), [prompt] * len(params), params, drain)
    assert_same(got, want)
    check_both_paths(spec)
    assert got[2].outputs[0].finish_reason == "stop"
    assert got[2].outputs[0].stop_reason == stop_text


def test_seeded_sampled_requests_do_not_speculate_and_keep_their_samples(
    tiny_model, make_engine, drain
):
    """A seeded sampled request beside speculating greedy ones gets the same sample as on an
    engine without speculation, and alone it proposes nothing."""
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    params = [sampled, greedy, sampled, greedy]
    spec = make_engine(tiny_model, speculative=SPEC)
    assert_same(
        run(spec, PROMPTS[:4], params, drain),
        run(make_engine(tiny_model), PROMPTS[:4], params, drain),
    )
    alone = make_engine(tiny_model, speculative=SPEC)
    run(alone, PROMPTS[:2], sampled, drain)
    assert alone.stats()["spec_decode_draft_tokens"] == 0


def test_aborts_while_speculating_free_every_block(tiny_model, make_engine, drain):
    """Requests aborted mid-generation (between steps that kept proposals) leave the others'
    outputs unchanged; the idle check of make_engine sees every block back in the pool."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = make_engine(tiny_model, speculative=SPEC, block_size=4)
    for i, prompt in enumerate(PROMPTS):
        spec.add_request(prompt, params, request_id=f"r{i}")
    for _ in range(20):  # step until some proposals have been kept, then abort
        spec.step()
        if spec.stats()["spec_decode_accepted_tokens"] > 0:
            break
    assert spec.stats()["spec_decode_accepted_tokens"] > 0
    unfinished = {s.request_id for s in [*spec.scheduler.running, *spec.scheduler.waiting]}
    assert {"r1", "r5", "r8"} <= unfinished, "the requests to abort have not finished yet"
    for doomed in ("r1", "r5", "r8"):
        spec.abort(doomed)
    finished = {o.request_id: o for s in drain(spec).values() for o in s if o.finished}
    keep = [i for i in range(len(PROMPTS)) if f"r{i}" not in ("r1", "r5", "r8")]
    want = run(make_engine(tiny_model, block_size=4), [PROMPTS[i] for i in keep], params, drain)
    check_both_paths(spec)
    assert [finished[f"r{i}"].outputs[0].token_ids for i in keep] == [
        w.outputs[0].token_ids for w in want
    ]


@pytest.mark.parametrize("seed", range(8))
def test_random_timelines_equal_the_engine_without_speculation(
    tiny_model, make_engine, drain, seed
):
    """Requests arriving over time (greedy and sampled, n up to 3, logprobs, stop tokens)
    on random small pools, budgets and block sizes: every request gets the same output."""
    rng = np.random.default_rng(seed)
    bs = int(rng.choice([1, 4, 16]))
    config = dict(
        block_size=bs,
        kv_cache_bytes=int(rng.choice([20, 40, 400])) * bs * BYTES_PER_TOKEN,
        max_num_batched_tokens=int(rng.choice([12, 40, 200])),
        max_num_seqs=int(rng.choice([3, 12])),
    )
    prompts = motif_prompts(10, seed=seed + 1)
    params = []
    for _ in prompts:
        fields = dict(max_tokens=int(rng.integers(1, 30)), ignore_eos=True)
        fields["n"] = int(rng.choice([1, 1, 3]))
        if rng.random() < 0.3:
            fields.update(temperature=1.0, seed=int(rng.integers(1000)))
        else:
            fields.update(temperature=0.0)
        if rng.random() < 0.3:
            fields.update(logprobs=1)
        if rng.random() < 0.3:
            fields.update(stop_token_ids=[int(rng.integers(VOCAB))], ignore_eos=False)
        params.append(SamplingParams(**fields))
    spec = make_engine(tiny_model, speculative=SPEC, **config)
    got = run(spec, prompts, params, drain)
    assert_same(got, run(make_engine(tiny_model, **config), prompts, params, drain))
    assert spec.stats()["spec_decode_draft_tokens"] > 0


def test_reference_generator_agrees(tiny_model, make_llm):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = make_llm(tiny_model, speculative=SPEC)
    outputs = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outputs] == [
        generate_ids(tiny_model, p, params).token_ids for p in PROMPTS
    ]


def test_engine_config_refuses_a_non_config():
    from tulu.engine.engine import EngineConfig

    with pytest.raises(GenerationError, match="EngineConfig.speculative"):
        EngineConfig(speculative={"method": "ngram"})


def test_steps_with_proposals_take_several_tokens_per_sequence(tiny_model, make_engine):
    """Fewer steps than tokens: the point of speculating (and proof that proposals ran
    through the model, not only through the proposer)."""
    engine = make_engine(tiny_model, speculative=SPEC)
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert steps < 40


@pytest.mark.parametrize("eos_at", [5, 6, 7])
@pytest.mark.parametrize("min_tokens", [0, 4, 6, 7, 8])
def test_min_tokens_is_counted_per_proposal(scripted_model, make_engine, drain, min_tokens, eos_at):
    """A scripted model that repeats 1 2 3 (so every proposal is right) but puts EOS first at
    output `eos_at` (the first, second or third row of the second speculating step): EOS is
    blocked exactly where the output is still shorter than min_tokens, row by row within a
    step's proposals, as when decoding one token per step."""
    table = torch.zeros(64, 8)
    for p in range(64):
        table[p, (p + 1) % 3 + 1] = 10.0  # the prompt's pattern continues
    prompt = [1, 2, 3] * 3
    table[len(prompt) - 1 + eos_at, 0] = 20.0  # EOS (0) is the first choice there
    model = scripted_model(table, eos_token_id=0)
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=min_tokens)
    spec = make_engine(model, speculative=SPEC)
    (got,) = run(spec, [prompt], params, drain)
    (want,) = run(make_engine(model), [prompt], params, drain)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert spec.stats()["spec_decode_accepted_tokens"] > 0
    ends_at_eos = min_tokens <= eos_at
    assert (got.outputs[0].token_ids[-1] == 0) == ends_at_eos


def test_kept_proposals_are_not_computed_again(tiny_model, make_engine):
    """After a step, the cache holds every kept proposal: the next step computes one token
    plus its new proposals, so over a request the engine computes the prompt, every output
    token but the last, and the refused proposals, nothing more."""
    engine = make_engine(tiny_model, speculative=SPEC)
    computed = 0
    original = engine.scheduler.schedule

    def counting_schedule():
        nonlocal computed
        plan = original()
        computed += plan.num_tokens
        return plan

    engine.scheduler.schedule = counting_schedule
    prompt = PROMPTS[0]
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.stats()
    refused = stats["spec_decode_draft_tokens"] - stats["spec_decode_accepted_tokens"]
    assert stats["spec_decode_accepted_tokens"] > 0
    assert computed == len(prompt) + 40 - 1 + refused


def test_the_scheduler_fits_proposals_to_the_budget_and_the_free_blocks():
    """Proposals are cut to the step's token budget, and dropped when they would need a
    block the pool no longer has (they never preempt anyone)."""
    from tulu.engine.kv_cache import BlockPool
    from tulu.engine.scheduler import Scheduler

    pool = BlockPool(2, 4, enable_prefix_caching=False)
    scheduler = Scheduler(
        pool, max_num_seqs=4, max_num_batched_tokens=16, propose=lambda seq: [7, 7, 7, 7]
    )
    seq = greedy_sequence(0, list(range(5)))
    scheduler.add(seq)
    (prefill,) = scheduler.schedule().scheduled
    assert (prefill.num_new_tokens, prefill.draft_token_ids) == (5, [])
    seq.num_computed, seq.token_ids = 5, [*seq.token_ids, 7]

    scheduler.max_num_batched_tokens = 3
    (capped,) = scheduler.schedule().scheduled
    assert (capped.num_new_tokens, capped.draft_token_ids) == (3, [7, 7])
    seq.num_computed, seq.token_ids = 7, [*seq.token_ids, 7, 7]  # both kept

    scheduler.max_num_batched_tokens = 16
    plan = scheduler.schedule()
    (no_room,) = plan.scheduled  # 8 tokens fill both blocks: a proposal needs a third
    assert (no_room.num_new_tokens, no_room.draft_token_ids) == (1, [])
    assert plan.preempted == [] and pool.num_free == 0
    scheduler.remove(seq)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["loop", "auto"])
def test_on_cuda_equal_to_the_engine_without_speculation(tiny_model, make_engine, drain, attention):
    """On the GPU (float32), beside the CUDA-graph decode path that steps without proposals
    take: the same greedy tokens and log-probabilities as without speculation."""
    import copy

    model = copy.deepcopy(tiny_model).to("cuda")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    config = dict(kv_cache_bytes=64 << 20, decode_attention=attention)
    spec = make_engine(model, speculative=SPEC, **config)
    assert_same(
        run(spec, PROMPTS, params, drain), run(make_engine(model, **config), PROMPTS, params, drain)
    )
    check_both_paths(spec)


def test_the_byte_cache_grows_with_the_sequence():
    """A cache filled on earlier calls gives what a fresh search gives, step after step."""
    cache = bytearray()
    ids = [4, 1, 2, 3]
    for token in [4, 1, 2, 9, 4, 1]:
        ids.append(token)
        assert propose_ngram(ids, SPEC, 4, cache) == propose_ngram(ids, SPEC, 4)
        assert len(cache) == 4 * len(ids)


def _decoding_pair(budget: int, num_blocks: int = 4):
    """A scheduler proposing four 7s, and two sequences past their prompts (6 and 4 tokens,
    one token generated each), with every block but one in use after the next schedule's own
    tokens: what is left for proposals is one free block and the budget."""
    from tulu.engine.kv_cache import BlockPool
    from tulu.engine.scheduler import Scheduler

    pool = BlockPool(num_blocks, 4, enable_prefix_caching=False)
    scheduler = Scheduler(
        pool, max_num_seqs=4, max_num_batched_tokens=64, propose=lambda s: [7] * 4
    )
    seqs = []
    for i, length in enumerate((6, 4)):
        seq = greedy_sequence(i, list(range(length)))
        scheduler.add(seq)
        seqs.append(seq)
    scheduler.schedule()  # both prompts, whole
    for seq in seqs:
        seq.num_computed, seq.token_ids = seq.num_tokens, [*seq.token_ids, 9]
    scheduler.max_num_batched_tokens = budget
    return scheduler, seqs


def test_proposals_never_preempt_nor_crowd_out_a_decode():
    """Every running sequence gets its own token first; proposals share what is left (one
    free block: 1 slot left in A's blocks, 3 in B's new one)."""
    scheduler, (a, b) = _decoding_pair(budget=64)
    plan = scheduler.schedule()
    assert plan.preempted == []
    assert [(s.seq.request_id, s.num_new_tokens, s.draft_token_ids) for s in plan.scheduled] == [
        ("r0", 2, [7]),
        ("r1", 4, [7, 7, 7]),
    ]
    scheduler.remove(a)
    scheduler.remove(b)

    scheduler, (a, b) = _decoding_pair(budget=3, num_blocks=8)
    plan = scheduler.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("r0", 2), ("r1", 1)]
    scheduler.remove(a)
    scheduler.remove(b)


def test_blocks_taken_for_refused_proposals_are_given_back(tiny_model, make_engine):
    """After every step a running sequence holds no block past its tokens."""
    engine = make_engine(tiny_model, speculative=SPEC, block_size=2)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(
            prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), f"r{i}"
        )
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            assert len(seq.block_table) <= -(-seq.num_tokens // 2), seq.request_id
    check_both_paths(engine)


def test_a_kept_proposal_that_stops_the_completion_is_counted(scripted_model, make_engine, drain):
    """1 2 3 repeating, stop token 3: after the prompt's step gives 1, the next step proposes
    2 3 1 (what followed the last "3 1") and the model agrees with 2 and with 3, which ends
    the completion: two kept."""
    table = torch.zeros(64, 8)
    for p in range(64):
        table[p, (p + 1) % 3 + 1] = 10.0
    engine = make_engine(scripted_model(table, eos_token_id=0), speculative=SPEC)
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[3])
    (out,) = run(engine, [[1, 2, 3] * 3], params, drain)
    assert out.outputs[0].token_ids == [1, 2, 3]
    stats = engine.stats()
    assert (stats["spec_decode_draft_tokens"], stats["spec_decode_accepted_tokens"]) == (3, 2)


def test_disable_by_batch_size_stops_proposals_for_large_batches(tiny_model, make_engine, drain):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    config = SpeculativeConfig(4, 3, 1, disable_by_batch_size=len(PROMPTS) + 1)
    proposing = make_engine(tiny_model, speculative=config)
    run(proposing, PROMPTS, params, drain)
    assert proposing.stats()["spec_decode_draft_tokens"] > 0
    busy = make_engine(tiny_model, speculative=SpeculativeConfig(4, 3, 1, disable_by_batch_size=1))
    run(busy, PROMPTS, params, drain)
    assert busy.stats()["spec_decode_draft_tokens"] == 0


# ----------------------------------------------------------------------------------------------
# Sampled requests: speculative sampling keeps each token's distribution
# ----------------------------------------------------------------------------------------------


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """The p-value of `counts` under `probs` (Pearson's chi-square over the tokens with
    non-zero probability; none may be drawn outside them)."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token of probability 0 was drawn"
    expected = probs[support] * counts.sum()
    assert expected.min() >= 5, "too few samples for a chi-square test"
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    return torch.special.gammaincc(
        torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
    ).item()


ROWS = torch.tensor(
    [
        [2.0, 1.0, 0.5, 0.0, -0.5, 1.5],
        [0.0, 2.5, 1.0, 1.0, -1.0, 0.5],
        [1.0, 0.0, 0.0, 2.0, 0.5, -0.5],
    ]
)


def _draw_with_drafts(settings: dict, drafts: list[int], draws: int = 20_000) -> tuple:
    """`draws` groups through `sample_with_drafts` on ROWS with `drafts` (each group one row
    longer than its drafts), 500 groups a call: the processed distribution of each row, and
    the tokens drawn (a list per group)."""
    from tulu.engine.sampling import prepare_sampling_tensors, process_logits, sample_with_drafts

    rows = ROWS[: len(drafts) + 1]
    tensors = prepare_sampling_tensors([SamplingParams(**settings)] * len(rows))
    probs = torch.softmax(process_logits(rows.clone(), tensors), dim=-1).double().numpy()
    batch = prepare_sampling_tensors([SamplingParams(**settings)] * (len(rows) * 500))
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(max(draws // 500, 1)):
            out += sample_with_drafts(rows.repeat(500, 1), batch, [drafts] * 500)
    return probs, out


@pytest.mark.parametrize(
    "settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(top_p=0.8)]
)
def test_sample_with_drafts_keeps_each_tokens_distribution(settings):
    """20,000 groups with drafts 0 then 1: the first token follows row 0's distribution;
    after a kept first draft the second follows row 1's; after both, the token after them
    follows row 2's (the speculative sampling theorem), with temperature and truncation
    applied as `sample` applies them."""
    probs, out = _draw_with_drafts(settings, [0, 1])
    first = np.bincount([t[0] for t in out], minlength=6)
    second = np.bincount([t[1] for t in out if len(t) > 1], minlength=6)
    third = np.bincount([t[2] for t in out if len(t) > 2], minlength=6)
    assert all(len(t) == 1 or t[0] == 0 for t in out)  # a second token only after a kept 0
    assert all(len(t) < 3 or t[1] == 1 for t in out)
    assert chi_square_p(first, probs[0]) > 0.001, first
    assert chi_square_p(second, probs[1]) > 0.001, second
    assert chi_square_p(third, probs[2]) > 0.001, third


def test_a_draft_the_distribution_masks_is_never_kept():
    """Token 4 is outside row 0's top 2: refused every time, and never drawn in its place."""
    probs, out = _draw_with_drafts(dict(top_k=2), [4], draws=5_000)
    assert probs[0][4] == 0
    first = np.bincount([t[0] for t in out], minlength=6)
    assert first[4] == 0 and all(len(t) == 1 for t in out)
    assert chi_square_p(first, probs[0]) > 0.001


def test_the_check_above_catches_a_residual_that_keeps_the_refused_draft():
    """Power: a sampler that, after refusing a draft, draws from the whole row (the refused
    draft included) gives the draft p + (1 - p) p instead of p; the chi-square refuses it."""
    probs, _ = _draw_with_drafts(dict(temperature=1.0), [0], draws=500)
    rng = np.random.default_rng(0)
    kept = rng.random(20_000) < probs[0][0]
    redrawn = rng.choice(6, size=20_000, p=probs[0] / probs[0].sum())  # float32 softmax
    counts = np.bincount(np.where(kept, 0, redrawn), minlength=6)
    assert chi_square_p(counts, probs[0]) < 1e-6


def test_unseeded_sampling_through_the_engine_keeps_the_models_distribution(
    scripted_model, make_llm
):
    """A scripted model (each position's distribution fixed: the 1 2 3 pattern most likely,
    the rest possible) sampled without seeds, 800 requests of 4 tokens, with speculation:
    each output position follows its row's distribution, and proposals were both kept and
    refused."""
    table = torch.zeros(32, 8)
    table[:, 4:] = 1.0
    for p in range(32):
        table[p, (p + 1) % 3 + 1] = 2.5
    prompt = [1, 2, 3] * 3
    model = scripted_model(table, eos_token_id=0)
    llm = make_llm(model, speculative=SPEC)
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        outputs = llm.generate([prompt] * 800, params)
    check_both_paths(llm.engine)
    probs = torch.softmax(table.double(), dim=-1).numpy()
    for index in range(4):
        counts = np.bincount([o.outputs[0].token_ids[index] for o in outputs], minlength=8)
        assert chi_square_p(counts, probs[len(prompt) - 1 + index]) > 0.001, (index, counts)


def _one_decoding(pool, prompt_len: int, **scheduler_options):
    """A scheduler proposing four 7s over `pool`, and one sequence past its prompt of
    `prompt_len` tokens (one token generated)."""
    from tulu.engine.scheduler import Scheduler

    scheduler = Scheduler(
        pool,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        propose=lambda s: [7] * 4,
        **scheduler_options,
    )
    seq = greedy_sequence(0, list(range(100, 100 + prompt_len)))
    scheduler.add(seq)
    scheduler.schedule()
    seq.num_computed, seq.token_ids = seq.num_tokens, [*seq.token_ids, 9]
    return scheduler, seq


def test_proposals_leave_cached_prefixes_alone():
    """The only free block holds a cached prefix: no proposal evicts it (a refused guess
    would have cost a prefix another request could reuse)."""
    from tulu.engine.kv_cache import BlockPool, hash_block

    pool = BlockPool(4, 4, enable_prefix_caching=True)
    cached = pool.allocate()
    pool.register(cached, hash_block(None, [1, 2, 3, 4]))
    pool.release(cached)
    scheduler, seq = _one_decoding(pool, prompt_len=11)  # 12 tokens fill three blocks
    (item,) = scheduler.schedule().scheduled
    assert item.draft_token_ids == [] and pool.num_cached == 1
    scheduler.remove(seq)


def test_proposals_leave_the_watermark_to_waiting_requests():
    """With a request waiting, the watermark's block (1 of 4) is not given to proposals:
    three fit in the sequence's own last block; without one waiting, all four."""
    from tulu.engine.kv_cache import BlockPool

    for waiting in (False, True):
        pool = BlockPool(4, 4, enable_prefix_caching=False)
        scheduler, seq = _one_decoding(pool, prompt_len=8, watermark=0.25)
        if waiting:
            other = greedy_sequence(1, list(range(40)))
            scheduler.add(other)
        plan = scheduler.schedule()
        assert len(plan.scheduled[0].draft_token_ids) == (3 if waiting else 4)
        for s in [seq, *([other] if waiting else [])]:
            scheduler.remove(s)
