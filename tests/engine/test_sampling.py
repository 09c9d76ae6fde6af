"""Tests for tulu.engine.sampling: validation, processors, per-row determinism, statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tulu.engine.sampling import (
    SamplingParams,
    apply_allowed_tokens,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_k_top_p,
    apply_top_p,
    apply_typical_p,
    build_token_histories,
    candidate_logprobs,
    check_min_tokens_reachable,
    check_token_ids_in_vocab,
    compute_logprobs,
    make_generator,
    mask_tokens,
    prepare_sampling_tensors,
    process_logits,
    sample,
)
from tulu.errors import GenerationError, TuluError

# ----------------------------------------------------------------------------------------------
# SamplingParams validation
# ----------------------------------------------------------------------------------------------

NAN = float("nan")
INF = float("inf")

BAD_VALUES = [
    ("max_tokens", 0),
    ("max_tokens", 1.5),
    ("max_tokens", True),
    ("max_tokens", "10"),
    ("temperature", -1),
    ("temperature", "hot"),
    ("temperature", NAN),
    ("temperature", INF),
    ("temperature", True),
    ("top_p", 0),
    ("top_p", 1.1),
    ("top_p", NAN),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_k", True),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("min_p", None),
    ("typical_p", 0),
    ("typical_p", -0.5),
    ("typical_p", 1.5),
    ("typical_p", NAN),
    ("typical_p", True),
    ("typical_p", "0.9"),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", INF),
    # Beyond float32 (the sampler's arithmetic): inf * a logit of 0 is NaN, which argmax picks.
    ("repetition_penalty", 1e39),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.1),
    ("frequency_penalty", 3),
    ("frequency_penalty", "1"),
    ("seed", 1.5),
    ("seed", True),
    ("seed", "42"),
    ("seed", 2**64),
    ("n", 0),
    ("n", True),
    ("stop", [""]),
    ("stop", [1]),
    ("stop", 5),
    ("stop", b"x"),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]),
    ("stop_token_ids", 3),
    ("bad_words", "word"),
    ("bad_words", [""]),
    ("bad_words", ["  "]),
    ("bad_words", [3]),
    ("include_stop_str_in_output", 1),
    ("ignore_eos", "yes"),
    ("skip_special_tokens", None),
    ("logprobs", 21),
    ("logprobs", -1),
    ("logprobs", True),
    ("prompt_logprobs", 21),
    ("prompt_logprobs", 2.0),
    ("candidate_token_ids", []),
    ("candidate_token_ids", [1, -3]),
    ("candidate_token_ids", "AB"),
    ("min_tokens", -1),
    ("min_tokens", 300),  # more than the default max_tokens (256)
    ("logit_bias", [1, 2]),
    ("logit_bias", "5:1"),
    ("allowed_token_ids", []),
    ("allowed_token_ids", [2, -1]),
    ("allowed_token_ids", "AB"),
]


def test_an_empty_stop_string_is_named_as_a_string():
    """`stop: ""` is a string; the message said it must be a list."""
    with pytest.raises(GenerationError, match="stop must be a non-empty string, got ''"):
        SamplingParams(stop="")
    with pytest.raises(GenerationError, match=r"a list of non-empty strings, got \['a', ''\]"):
        SamplingParams(stop=["a", ""])


def test_a_stop_string_with_an_unpaired_surrogate_is_refused():
    """JSON's "\\ud800" (or an undecodable byte on a command line) gives a string that decoded
    text never contains: the stop was silently never matched."""
    with pytest.raises(GenerationError, match=r"stop must be valid Unicode \(no unpaired"):
        SamplingParams(stop=["ok", "\ud800"])


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_sampling_params_rejects_bad_values(name, value):
    with pytest.raises(GenerationError) as info:
        SamplingParams(**{name: value})
    message = str(info.value)
    assert f"SamplingParams.{name} " in message
    assert repr(value) in message
    assert isinstance(info.value, TuluError)


def test_sampling_params_message_format():
    with pytest.raises(
        GenerationError, match=r"^SamplingParams\.temperature must be >= 0, got -1$"
    ):
        SamplingParams(temperature=-1)


def test_sampling_params_normalises_values():
    p = SamplingParams(stop="###", temperature=1, top_k=-1, stop_token_ids=None)
    assert p.stop == ["###"]
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert p.top_k == -1
    assert p.stop_token_ids == []
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(seed=np.int64(3)).seed == 3
    typical = SamplingParams(typical_p=1).typical_p
    assert isinstance(typical, float) and typical == 1.0
    # Defaults are valid and independent between instances.
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({"3": 1.0}, "logit_bias must be keyed by token ids (integers >= 0), got '3'"),
        ({-1: 1.0}, "logit_bias must be keyed by token ids (integers >= 0), got -1"),
        ({True: 1.0}, "logit_bias must be keyed by token ids (integers >= 0), got True"),
        ({3: NAN}, "logit_bias[3] must be a finite number, got nan"),
        ({3: -INF}, "logit_bias[3] must be a finite number, got -inf"),
        ({3: "1"}, "logit_bias[3] must be a number, got '1'"),
        ({3: 100.5}, "logit_bias[3] must be in [-100, 100], got 100.5"),
        # 1e39 is finite in float64 and inf in float32, where -inf + inf is NaN
        ({3: -1e39}, "logit_bias[3] must be in [-100, 100], got -1e+39"),
    ],
)
def test_a_bad_logit_bias_names_the_entry(bias, message):
    with pytest.raises(GenerationError) as info:
        SamplingParams(logit_bias=bias)
    assert str(info.value) == f"SamplingParams.{message}"


def test_logit_bias_and_allowed_tokens_are_normalised():
    p = SamplingParams(logit_bias={np.int64(7): 2, 3: -1.5}, allowed_token_ids=(4, np.int32(9)))
    assert p.logit_bias == {7: 2.0, 3: -1.5}
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert p.allowed_token_ids == [4, 9]
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams().allowed_token_ids is None


def test_min_tokens_with_only_stop_tokens_allowed_is_refused():
    """Stop tokens are masked until min_tokens: allowing nothing else would leave every logit
    -inf, and the argmax would pick token 0, a token the request did not allow."""
    with pytest.raises(GenerationError, match=r"allowed_token_ids \[2\] are all stop tokens"):
        SamplingParams(min_tokens=1, allowed_token_ids=[2], stop_token_ids=[2, 5])
    eos_only = SamplingParams(min_tokens=1, allowed_token_ids=[0])
    with pytest.raises(GenerationError, match="min_tokens"):
        check_min_tokens_reachable(eos_only, eos_token_id=0)
    check_min_tokens_reachable(eos_only, eos_token_id=1)
    ignoring = SamplingParams(min_tokens=1, allowed_token_ids=[0], ignore_eos=True)
    check_min_tokens_reachable(ignoring, eos_token_id=0)
    check_min_tokens_reachable(SamplingParams(allowed_token_ids=[0]), eos_token_id=0)


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy
    assert not SamplingParams().is_greedy


# ----------------------------------------------------------------------------------------------
# Processors
# ----------------------------------------------------------------------------------------------


def _tensors(params, **kwargs):
    return prepare_sampling_tensors(params, "cpu", **kwargs)


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0, top_k=3, seed=i) for i in range(6)]
    gens = [make_generator(i) for i in range(6)]
    chosen = sample(logits, _tensors(params), gens)
    assert chosen.dtype == torch.int64
    assert torch.equal(chosen, logits.argmax(dim=-1))


def test_greedy_rows_in_a_mixed_batch():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=2.0),
    ]
    gens = [None, make_generator(1), None, None]
    chosen = sample(logits, _tensors(params), gens)
    assert chosen[0] == logits[0].argmax() and chosen[2] == logits[2].argmax()


def test_low_precision_logits_are_processed_in_float32():
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.8, top_k=4, seed=0), SamplingParams(temperature=0)]
    tensors = _tensors(params)
    chosen = sample(logits, tensors, [make_generator(0), None])
    assert chosen[1] == logits[1].float().argmax()
    assert chosen[0] in logits[0].float().topk(4).indices
    assert apply_top_k(logits, tensors.top_k).dtype == torch.float32


def test_greedy_ties_take_the_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    assert sample(logits, _tensors([SamplingParams(temperature=0)]), [None]).item() == 1


def test_penalties_match_hand_computation():
    row = [2.0, -1.0, 0.5, -0.5, 3.0, 1.0]
    logits = torch.tensor([row, row, row])
    prompt = [[0, 1], [0, 1], [0, 1]]
    outputs = [[2, 2, 3], [2, 2, 3], [2, 2, 3]]
    prompt_mask, counts = build_token_histories(prompt, outputs, vocab_size=6)
    assert prompt_mask.dtype == torch.bool and prompt_mask[0].tolist() == [1, 1, 0, 0, 0, 0]
    assert counts[0].tolist() == [0, 0, 2, 1, 0, 0]
    out = apply_penalties(
        logits,
        prompt_mask,
        counts,
        repetition_penalty=torch.tensor([2.0, 1.0, 1.0]),
        presence_penalty=torch.tensor([0.5, 0.0, 0.5]),
        frequency_penalty=torch.tensor([0.25, 0.0, 0.0]),
    )
    # Row 0, by hand: repetition 2 on tokens 0-3 (prompt or output), then
    # presence 0.5 + frequency 0.25 * count on tokens 2 (count 2) and 3 (count 1).
    #   t0: 2.0 / 2 = 1.0          t1: -1.0 * 2 = -2.0
    #   t2: 0.5 / 2 - 0.5 - 0.5 = -0.75
    #   t3: -0.5 * 2 - 0.5 - 0.25 = -1.75
    #   t4, t5: never seen, unchanged
    assert out[0].tolist() == [1.0, -2.0, -0.75, -1.75, 3.0, 1.0]
    # Row 1 is neutral: bit-for-bit unchanged.
    assert torch.equal(out[1], logits[1])
    # Row 2: presence applies to generated tokens only (not the prompt's tokens 0 and 1).
    assert out[2].tolist() == [2.0, -1.0, 0.0, -1.0, 3.0, 1.0]


def test_neutral_penalties_are_bit_exact_on_odd_values():
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)) * 1e3
    logits[0, 5] = float("-inf")
    logits[1, 7] = -0.0
    mask = torch.ones(2, 64, dtype=torch.bool)
    counts = torch.full((2, 64), 3, dtype=torch.int32)
    neutral = torch.tensor([1.0, 1.0])
    zero = torch.tensor([0.0, 0.0])
    out = apply_penalties(logits, mask, counts, neutral, zero, zero)
    assert torch.equal(out.view(torch.int32), logits.view(torch.int32))


def test_sample_applies_penalties_before_greedy_argmax():
    logits = torch.tensor([[5.0, 4.0, 0.0], [5.0, 4.0, 0.0]])
    params = [SamplingParams(temperature=0, frequency_penalty=2.0), SamplingParams(temperature=0)]
    tensors = _tensors(params, vocab_size=3, prompt_token_ids=[[], []], output_token_ids=[[0], [0]])
    assert sample(logits, tensors, [None, None]).tolist() == [1, 0]


def test_penalties_need_histories():
    with pytest.raises(GenerationError, match="prompt_token_ids"):
        _tensors([SamplingParams(repetition_penalty=1.2)])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        build_token_histories([[0, 9]], [[]], vocab_size=5)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        build_token_histories([[0]], [[5]], vocab_size=5)
    with pytest.raises(GenerationError, match="empty"):
        _tensors([])


def test_top_k_keeps_exactly_k_with_deterministic_ties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    out = apply_top_k(logits, torch.tensor([2, 0, 10]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.equal(out[1], logits[1])  # k = 0: off
    assert torch.equal(out[2], logits[2])  # k > V: everything kept


def test_top_p_always_keeps_the_top_token_and_rows_with_p_1_are_unchanged():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0], [-30.0, 0.0, 30.0, 1.0]])
    out = apply_top_p(logits, torch.tensor([1e-6, 1.0]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False]
    assert torch.equal(out[1], logits[1])


def test_min_p_is_relative_to_the_max_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]]))
    out = apply_min_p(logits, torch.tensor([0.5, 0.0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.equal(out[1], logits[1])


def _hf_warpers():
    """transformers' logits warpers: the independent reference (a dev dependency)."""
    return pytest.importorskip("transformers.generation.logits_process")


def _typical_p_batch() -> tuple[torch.Tensor, list[float]]:
    """Random rows of several scales, with per-row typical_p (1.0 rows among them), rows with
    ties (rounded logits) and rows with masked (-inf) tokens, as earlier stages leave them."""
    gen = torch.Generator().manual_seed(21)
    rows, masses = [], []
    for i, mass in enumerate([0.05, 0.2, 0.5, 0.9, 0.95, 0.99, 0.999999, 1.0] * 4):
        row = torch.randn(300, generator=gen) * (0.3 + 2 * (i % 5))
        if i % 4 == 1:
            row = row.round()  # many ties, also in the distance to the entropy
        if i % 4 == 2:
            row[torch.rand(300, generator=gen) < 0.6] = -INF
        if i % 8 == 3:
            row[torch.rand(300, generator=gen) < 0.995] = -INF  # one or two tokens left
            row[7] = 0.0
        rows.append(row)
        masses.append(mass)
    return torch.stack(rows), masses


def test_typical_p_equals_transformers_typical_logits_warper():
    warpers = _hf_warpers()
    logits, masses = _typical_p_batch()
    out = apply_typical_p(logits, torch.tensor(masses))
    assert not out.isnan().any()
    dropped = 0
    for row, mass, got in zip(logits, masses, out, strict=True):
        if mass == 1.0:
            assert torch.equal(got, row)  # off: bit for bit untouched
            continue
        expected = warpers.TypicalLogitsWarper(mass=mass)(None, row.unsqueeze(0))[0]
        assert torch.equal(got, expected), mass
        assert torch.isinf(got[torch.isinf(row)]).all()  # masked tokens stay masked
        assert torch.isfinite(got).any()
        dropped += int(torch.isinf(got).sum() - torch.isinf(row).sum())
    assert dropped > 1000  # the fixture really truncates


def test_typical_p_can_drop_the_most_likely_token():
    """Typical decoding keeps the tokens nearest the entropy, not the most likely ones. Here
    H = 1.60 nats; -log p is 1.41 for token 5 (p = 0.24), 1.91 for token 3 (p = 0.15) and 0.91
    for token 1 (p = 0.40): tokens 5 and 3 are the nearest and already hold 0.39 >= 0.3."""
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0, -2.0, 1.5, 0.5, -0.5]])
    out = apply_typical_p(logits, torch.tensor([0.3]))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [3, 5]


def test_typical_p_is_built_only_for_the_sampled_rows_that_use_it():
    params = [
        SamplingParams(typical_p=0.5),
        SamplingParams(),
        SamplingParams(temperature=0, typical_p=0.2),  # greedy: never sampled, never sorted
        SamplingParams(typical_p=0.9, top_k=4),
    ]
    rows, masses = _tensors(params).typical
    assert rows.tolist() == [0, 3] and masses.tolist() == pytest.approx([0.5, 0.9])
    assert (
        _tensors([SamplingParams(), SamplingParams(temperature=0, typical_p=0.2)]).typical is None
    )


@pytest.mark.parametrize("near_one", [0.99999999, 1 - 2**-25, 1 - 2**-26])
def test_a_typical_p_that_is_one_in_float32_is_off(near_one):
    """typical_p runs in float32, where these values are exactly 1.0 (off): such a row is not
    built (nor sorted) and samples from the unchanged distribution, as typical_p=1 does; the
    largest float32 below 1 still truncates."""
    assert torch.tensor(near_one, dtype=torch.float32).item() == 1.0  # the premise
    params = [SamplingParams(typical_p=near_one), SamplingParams(typical_p=0.5)]
    rows, masses = _tensors(params).typical
    assert rows.tolist() == [1] and masses.tolist() == [0.5]
    assert _tensors([SamplingParams(typical_p=near_one)]).typical is None
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(3)) * 5
    tensors = _tensors([SamplingParams(typical_p=near_one)])
    assert torch.equal(process_logits(logits, tensors), logits)
    below = float(torch.tensor(1 - 2**-24, dtype=torch.float32))  # < 1 in float32
    rows, masses = _tensors([SamplingParams(typical_p=below)]).typical
    assert rows.tolist() == [0] and masses.tolist() == [below]


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_pipeline_equals_transformers_warpers_in_their_order(scale):
    """Per row: temperature, top-k, top-p, min-p, typical-p, chained as transformers'
    ``_get_logits_processor`` does, equals our batched pipeline on a mixed batch."""
    warpers = _hf_warpers()
    settings = [
        dict(temperature=0.7, typical_p=0.9),
        dict(temperature=1.3, top_k=40, typical_p=0.5),
        dict(top_p=0.9, typical_p=0.95),
        dict(temperature=1.1, min_p=0.02, typical_p=0.8),
        dict(temperature=0.8, top_k=100, top_p=0.95, min_p=0.01, typical_p=0.7),
        dict(temperature=1.5, top_k=50, top_p=0.8),
        dict(typical_p=0.2),
        dict(),
    ]
    params = [SamplingParams(**s) for s in settings]
    logits = torch.randn(len(params), 500, generator=torch.Generator().manual_seed(8)) * scale
    got = process_logits(logits, _tensors(params))
    for row, p, out in zip(logits, params, got, strict=True):
        chain = [warpers.TemperatureLogitsWarper(p.temperature)]
        if p.top_k > 0:
            chain.append(warpers.TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            chain.append(warpers.TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            chain.append(warpers.MinPLogitsWarper(p.min_p))
        if p.typical_p < 1:
            chain.append(warpers.TypicalLogitsWarper(p.typical_p))
        expected = row.unsqueeze(0)
        for warper in chain:
            expected = warper(None, expected)
        expected = expected[0]
        assert torch.equal(torch.isinf(out), torch.isinf(expected)), p
        kept = torch.isfinite(out)
        assert torch.allclose(out[kept], expected[kept], rtol=1e-6, atol=0), p


def test_allowed_tokens_mask_the_rest_of_restricted_rows_only():
    logits = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    params = [SamplingParams(allowed_token_ids=[1, 4]), SamplingParams()]
    restricted, rows, tokens = _tensors(params).allowed_tokens
    out = apply_allowed_tokens(logits, restricted, rows, tokens)
    assert out[0].tolist() == [-INF, 1.0, -INF, -INF, 4.0, -INF]
    assert torch.equal(out[1], logits[1])
    assert _tensors([SamplingParams()]).allowed_tokens is None


def test_logit_bias_adds_to_its_rows_tokens_and_keeps_masked_tokens_masked():
    logits = torch.zeros(3, 5)
    logits[2, 1] = -INF
    params = [
        SamplingParams(logit_bias={0: 2.5, 4: -1}),
        SamplingParams(),
        SamplingParams(logit_bias={1: 100}),
    ]
    out = apply_logit_bias(logits, *_tensors(params).logit_bias)
    assert out.tolist() == [[2.5, 0, 0, 0, -1], [0] * 5, [0, -INF, 0, 0, 0]]
    assert logits[0, 0] == 0  # out of place
    assert _tensors([SamplingParams()]).logit_bias is None


def test_generable_ids_must_be_in_the_vocabulary_and_the_tokenizer():
    """allowed_token_ids and logit_bias make ids generable: beyond the model's vocabulary they
    would fail a step, and past the tokenizer's size (the model's padding rows) they would
    generate ids with no text."""
    for params in (SamplingParams(logit_bias={8: 1}), SamplingParams(allowed_token_ids=[1, 8])):
        name = "logit_bias" if params.logit_bias else "allowed_token_ids"
        with pytest.raises(GenerationError, match=rf"{name} contains 8, outside the vocabulary"):
            check_token_ids_in_vocab(params, 8)
        with pytest.raises(GenerationError) as info:
            check_token_ids_in_vocab(params, 16, num_tokens=8)
        assert str(info.value) == (
            f"SamplingParams.{name} contains 8, which is not a token: the tokenizer's ids are "
            "0 to 7"
        )
        check_token_ids_in_vocab(params, 16, num_tokens=9)
    # stop tokens are not generated because of the request: a padding id is only pointless
    check_token_ids_in_vocab(SamplingParams(stop_token_ids=[12]), 16, num_tokens=8)


def test_greedy_rows_pick_among_allowed_tokens_after_the_bias():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    params = [
        SamplingParams(temperature=0, allowed_token_ids=[0, 2]),
        SamplingParams(temperature=0, logit_bias={3: 1.5}),
        SamplingParams(temperature=0, allowed_token_ids=[0, 2], logit_bias={0: 1.5}),
    ]
    assert sample(logits, _tensors(params), [None] * 3).tolist() == [2, 3, 0]


def test_bias_comes_before_the_repetition_penalty():
    """vLLM's order. Token 0 (in the prompt) has logit -1 and bias +3.5: biased first it is
    2.5 / 4 = 0.625 and beats token 1's 0.5; penalised first it would be -4 + 3.5 = -0.5."""
    logits = torch.tensor([[-1.0, 0.5]])
    params = [SamplingParams(temperature=0, logit_bias={0: 3.5}, repetition_penalty=4.0)]
    tensors = _tensors(params, vocab_size=2, prompt_token_ids=[[0]], output_token_ids=[[]])
    assert sample(logits, tensors, [None]).tolist() == [0]


def test_mask_tokens():
    logits = torch.zeros(2, 4)
    out = mask_tokens(logits, [[1, 3], None])
    assert torch.isinf(out[0]).tolist() == [False, True, False, True]
    assert torch.equal(out[1], logits[1])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        mask_tokens(logits, [[4], None])


# ----------------------------------------------------------------------------------------------
# Per-row determinism
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.9, top_p=0.95, top_k=20),
        dict(temperature=0.9, typical_p=0.9),
        dict(temperature=1.2, top_k=30, min_p=0.02, typical_p=0.8),
    ],
    ids=["top-k-top-p", "typical-p", "top-k-min-p-typical-p"],
)
def test_a_rows_samples_depend_only_on_its_own_generator_and_logits(settings):
    """Typical decoding sorts only the rows that use it: the target's draws must not depend on
    which other rows do (in batch a only the target, in batch b another row too)."""
    vocab, steps, seed = 40, 50, 1234
    target = SamplingParams(seed=seed, **settings)
    params_a = [
        target,
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, seed=7),
        SamplingParams(temperature=1.0),
    ]
    params_b = [
        SamplingParams(temperature=0.5, min_p=0.1, typical_p=0.5),
        SamplingParams(temperature=1.0, seed=seed),  # same seed, other parameters
        SamplingParams(temperature=2.0, repetition_penalty=1.3, presence_penalty=0.5),
        target,
        SamplingParams(temperature=0),
    ]
    gens_a = [make_generator(p.seed) for p in params_a]
    gens_b = [make_generator(p.seed) for p in params_b]
    histories = dict(
        vocab_size=vocab,
        prompt_token_ids=[[1, 2, 3]] * 5,
        output_token_ids=[[4, 4]] * 5,
    )
    tensors_a = _tensors(params_a)
    tensors_b = _tensors(params_b, **histories)
    assert tensors_b.do_penalties and not tensors_a.do_penalties

    logits_gen = torch.Generator().manual_seed(99)
    other_gen = torch.Generator().manual_seed(5)
    got_a, got_b = [], []
    for _ in range(steps):
        row = torch.randn(vocab, generator=logits_gen) * 2
        logits_a = torch.randn(4, vocab, generator=other_gen)
        logits_b = torch.randn(5, vocab, generator=other_gen) * 3
        logits_a[0] = row
        logits_b[3] = row
        got_a.append(sample(logits_a, tensors_a, gens_a)[0].item())
        got_b.append(sample(logits_b, tensors_b, gens_b)[3].item())
    assert got_a == got_b
    assert len(set(got_a)) > 5  # really sampling, not a constant


def test_same_seed_reproduces_and_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    tensors = _tensors([SamplingParams(seed=1)])

    def run(seed):
        gen = make_generator(seed)
        return [sample(logits, tensors, [gen]).item() for _ in range(10)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert make_generator(None) is None
    assert run(-5) == run(-5)


# ----------------------------------------------------------------------------------------------
# Statistics: chi-square goodness of fit
# ----------------------------------------------------------------------------------------------

LOGITS = np.array([0.0, 2.0, -1.0, 1.0, -2.0, 1.5, 0.5, -0.5])
NUM_SAMPLES = 20_000

# 0.999 quantiles of the chi-square distribution, by degrees of freedom (from tables; checked
# against torch's regularized incomplete gamma function below).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0):
    """The distribution the documented pipeline should sample, computed independently."""
    probs = _softmax(LOGITS / temperature)
    keep = np.ones(len(LOGITS), dtype=bool)
    order = np.argsort(-probs, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    if top_p < 1.0:
        total = 0.0
        for rank, token in enumerate(order):
            if not keep[token]:
                continue
            if total >= top_p and rank > 0:
                keep[token] = False
            total += probs[token]
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    if min_p > 0.0:
        keep &= probs >= min_p * probs.max()
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    if typical_p < 1.0:
        probs = _typical(probs, typical_p)
    return probs


def _typical(probs, mass):
    """Locally typical sampling in float64 (Meister et al. 2022, as transformers cuts): take
    tokens by increasing |-log p - H| until their mass reaches `mass`; keep every token no
    farther from H than the last one taken."""
    support = probs > 0
    information = -np.log(np.where(support, probs, 1.0))
    entropy = (probs * information).sum()
    distance = np.where(support, np.abs(information - entropy), np.inf)
    order = np.argsort(distance, kind="stable")
    last = min(int((np.cumsum(probs[order]) < mass).sum()), len(probs) - 1)
    kept = np.where(distance <= distance[order[last]], probs, 0.0)
    return kept / kept.sum()


def _draw(params: SamplingParams, num=NUM_SAMPLES, seed=0, per_row_generators=False):
    """Draw `num` tokens for LOGITS: one batch of `num` identical rows."""
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(num, -1).contiguous()
    tensors = _tensors([params] * num)
    if per_row_generators:
        gens = [make_generator(seed * 1_000_003 + i) for i in range(num)]
        chosen = sample(logits, tensors, gens)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            chosen = sample(logits, tensors, [None] * num)
    return np.bincount(chosen.numpy(), minlength=len(LOGITS))


def _chi_square(counts, expected_probs):
    """(statistic, degrees of freedom) over the tokens with non-zero expected probability."""
    support = expected_probs > 0
    expected = expected_probs[support] * counts.sum()
    assert expected.min() >= 5, "too few samples for a chi-square test"
    statistic = float(((counts[support] - expected) ** 2 / expected).sum())
    return statistic, int(support.sum()) - 1


def _p_value(statistic, df):
    return torch.special.gammaincc(
        torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
    ).item()


def test_chi_square_table_matches_the_incomplete_gamma_function():
    for df, quantile in CHI2_999.items():
        assert _p_value(quantile, df) == pytest.approx(0.001, rel=1e-3)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.7),
        dict(temperature=1.5),
        dict(top_k=3),
        dict(top_p=0.8),
        dict(min_p=0.2),
        dict(temperature=1.5, min_p=0.2),
        dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.05),
        dict(typical_p=0.3),
        dict(typical_p=0.9),
        dict(temperature=1.3, typical_p=0.5),
        dict(temperature=1.3, top_k=7, top_p=0.95, min_p=0.05, typical_p=0.6),
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_samples_follow_the_claimed_distribution(settings):
    expected = _reference(**settings)
    counts = _draw(SamplingParams(**settings), seed=0)
    assert counts[expected == 0].sum() == 0, "a masked token was sampled"
    statistic, df = _chi_square(counts, expected)
    assert statistic < CHI2_999[df], (statistic, df, counts.tolist(), expected.tolist())
    assert _p_value(statistic, df) > 0.001


def test_per_row_generators_follow_the_claimed_distribution():
    settings = dict(temperature=0.7, top_p=0.9)
    expected = _reference(**settings)
    counts = _draw(SamplingParams(**settings), num=5_000, seed=3, per_row_generators=True)
    assert counts[expected == 0].sum() == 0
    statistic, df = _chi_square(counts, expected)
    assert statistic < CHI2_999[df]


@pytest.mark.parametrize(
    ("sampled", "claimed"),
    [
        (dict(temperature=1.0), dict(temperature=0.7)),
        (dict(temperature=1.0), dict(temperature=1.15)),
        (dict(top_k=4), dict(top_k=3)),
        (dict(top_p=0.95), dict(top_p=0.8)),
        (dict(typical_p=0.9), dict(typical_p=0.5)),
    ],
    ids=["T1-vs-T0.7", "T1-vs-T1.15", "top_k-4-vs-3", "top_p-0.95-vs-0.8", "typical-0.9-vs-0.5"],
)
def test_the_statistical_check_rejects_the_wrong_distribution(sampled, claimed):
    """The checks above have power: samples from another distribution fail them, either by
    hitting a token the claimed distribution masks or by a chi-square above the threshold."""
    counts = _draw(SamplingParams(**sampled), seed=11)
    expected = _reference(**claimed)
    if counts[expected == 0].sum() > 0:
        return  # the masked-token assertion catches it
    statistic, df = _chi_square(counts, expected)
    assert statistic > CHI2_999[df]
    assert _p_value(statistic, df) < 0.001


def test_the_wrong_temperature_is_caught_by_chi_square_alone():
    counts = _draw(SamplingParams(temperature=1.0), seed=11)
    statistic, df = _chi_square(counts, _reference(temperature=0.7))
    assert statistic > CHI2_999[df]


BIAS = {0: 1.5, 2: 2.0, 4: -3.0, 7: 0.7}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (dict(logit_bias=BIAS), lambda: _softmax(LOGITS + _bias_vector(BIAS))),
        (
            dict(allowed_token_ids=[0, 2, 3, 6]),
            lambda: _renormalised(_softmax(LOGITS), [0, 2, 3, 6]),
        ),
        (
            dict(allowed_token_ids=[0, 1, 2, 4, 7], logit_bias=BIAS, temperature=1.4, top_k=4),
            lambda: _top_k(
                _renormalised(_softmax((LOGITS + _bias_vector(BIAS)) / 1.4), [0, 1, 2, 4, 7]), 4
            ),
        ),
    ],
    ids=["logit-bias", "allowed-tokens", "allowed+bias+T+top-k"],
)
def test_restricted_and_biased_samples_follow_their_distribution(settings, expected):
    probs = expected()
    counts = _draw(SamplingParams(**settings), seed=5)
    assert counts[probs == 0].sum() == 0, "a masked token was sampled"
    statistic, df = _chi_square(counts, probs)
    assert statistic < CHI2_999[df], (statistic, df, counts.tolist(), probs.tolist())
    # ...and the check has power: the unbiased distribution fails it.
    if "logit_bias" in settings:
        without = dict(settings, logit_bias=None)
        statistic, df = _chi_square(_draw(SamplingParams(**without), seed=5), probs)
        assert statistic > CHI2_999[df]


def _bias_vector(bias):
    vector = np.zeros(len(LOGITS))
    for token, value in bias.items():
        vector[token] = value
    return vector


def _renormalised(probs, allowed):
    kept = np.zeros_like(probs)
    kept[allowed] = probs[allowed]
    return kept / kept.sum()


def _top_k(probs, k):
    kept = np.zeros_like(probs)
    top = np.argsort(-probs, kind="stable")[:k]
    kept[top] = probs[top]
    return kept / kept.sum()


def test_reference_truncations_are_what_the_tests_claim():
    """Guard the fixtures: each truncation really removes tokens (so the tests mean something)."""
    assert (_reference(top_k=3) > 0).sum() == 3
    assert (_reference(top_p=0.8) > 0).sum() == 4
    assert (_reference(min_p=0.2) > 0).sum() == 4
    assert (_reference(temperature=1.5, min_p=0.2) > 0).sum() == 5
    assert 1 < (_reference(temperature=1.3, top_k=6, top_p=0.9, min_p=0.05) > 0).sum() < 6
    # typical-p drops the most likely token (1) at 0.3, and keeps an unlikely one (0) at 0.9
    assert (_reference(typical_p=0.3) > 0).nonzero()[0].tolist() == [3, 5]
    assert (_reference(typical_p=0.9) > 0).nonzero()[0].tolist() == [0, 1, 3, 5, 6]
    assert (_reference(temperature=1.3, typical_p=0.5) > 0).sum() == 4
    combined = _reference(temperature=1.3, top_k=7, top_p=0.95, min_p=0.05)
    assert (combined > 0).sum() > (_typical(combined, 0.6) > 0).sum() > 1


def test_the_typical_p_reference_matches_transformers():
    """Guard the float64 reference above against transformers' warper on LOGITS."""
    warper = _hf_warpers().TypicalLogitsWarper
    for temperature in (0.7, 1.0, 1.3):
        for mass in (0.2, 0.3, 0.5, 0.6, 0.9, 0.95):
            logits = torch.tensor(LOGITS / temperature, dtype=torch.float32).unsqueeze(0)
            expected = torch.isfinite(warper(mass=mass)(None, logits))[0].numpy()
            assert ((_reference(temperature, typical_p=mass) > 0) == expected).all()


def test_top_k_top_p_single_sort_matches_separate_application():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(4))
    k = torch.tensor([0, 1, 5, 50, 100, 0, 7, 3])
    p = torch.tensor([1.0, 0.5, 0.9, 0.3, 1.0, 0.7, 0.99, 1e-3])
    both = apply_top_k_top_p(logits, k, p)
    separate = apply_top_p(apply_top_k(logits, k), p)
    assert torch.equal(both, separate)


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------


def test_compute_logprobs():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(8)) * 4
    chosen = torch.tensor([0, 7, 19])
    chosen_lp, top_ids, top_lp = compute_logprobs(logits, chosen, top_n=5)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert torch.allclose(chosen_lp.double(), reference[torch.arange(3), chosen], atol=1e-5)
    assert top_ids.shape == (3, 5) and top_lp.shape == (3, 5)
    assert (top_lp[:, :-1] >= top_lp[:, 1:]).all()
    assert torch.equal(top_ids[:, 0], logits.argmax(dim=-1))
    assert torch.allclose(top_lp.double(), reference.gather(1, top_ids), atol=1e-5)
    assert torch.allclose(top_lp.double(), reference.sort(dim=-1, descending=True).values[:, :5])
    _, ids0, lp0 = compute_logprobs(logits, chosen, top_n=0)
    assert ids0.shape == (3, 0) and lp0.shape == (3, 0)
    with pytest.raises(GenerationError, match="top_n"):
        compute_logprobs(logits, chosen, top_n=21)


def test_candidate_logprobs():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5])
    got = candidate_logprobs(logits, [2, 0])
    reference = torch.log_softmax(logits.double(), dim=-1)[[2, 0]]
    assert torch.allclose(got.double(), reference, atol=1e-6)
    with pytest.raises(GenerationError, match="candidate_token_ids"):
        candidate_logprobs(logits, [4])


def test_logprobs_ignore_sampling_settings():
    """Logprobs describe the raw model, whatever temperature the row samples with."""
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    lp, _, _ = compute_logprobs(logits, torch.tensor([2]), top_n=1)
    assert lp.item() == pytest.approx(
        math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
    )


# ----------------------------------------------------------------------------------------------
# bad_words
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ([], [7]),  # a one-token word is banned everywhere; a longer one needs its prefix
        ([1, 2], [7, 3]),
        ([5, 1, 2], [7, 3]),
        ([2, 1], [7]),
        ([1], [7]),
    ],
)
def test_bad_word_bans_follow_the_generated_tokens(output, expected):
    from tulu.engine.sampling import bad_word_bans

    assert bad_word_bans(output, [(7,), (1, 2, 3), (9, 9, 9, 9)]) == expected


def test_bad_words_are_tokenized_as_written_and_after_a_space(demo_tokenizer):
    from tulu.engine.sampling import bad_word_token_ids

    sequences = bad_word_token_ids(["the cat", " mat"], demo_tokenizer, 640)
    assert tuple(demo_tokenizer.encode("the cat")) in sequences
    assert tuple(demo_tokenizer.encode(" the cat")) in sequences
    assert tuple(demo_tokenizer.encode("mat")) in sequences  # leading spaces dropped first
    assert len(set(sequences)) == len(sequences)
    with pytest.raises(GenerationError, match="bad_words need a tokenizer"):
        bad_word_token_ids(["x"], None, 640)
    with pytest.raises(GenerationError, match=r"bad_words: 'mat' has token id \d+, outside"):
        bad_word_token_ids(["mat"], demo_tokenizer, 3)


def test_bad_words_none_and_invalid_unicode():
    assert SamplingParams(bad_words=None).bad_words == []
    with pytest.raises(GenerationError, match="bad_words must be valid Unicode"):
        SamplingParams(bad_words=["\ud83d"])


def test_bad_words_that_leave_no_allowed_token_are_refused(demo_tokenizer):
    from tulu.engine.sampling import bad_word_token_ids, check_bad_words_leave_a_token

    sequences = bad_word_token_ids(["cat"], demo_tokenizer, 640)
    cat = sorted(s[0] for s in sequences if len(s) == 1)  # "cat" and " cat": one token each
    assert cat
    refused = SamplingParams(allowed_token_ids=cat, bad_words=["cat"])
    with pytest.raises(GenerationError, match="bad_words ban every token allowed_token_ids"):
        check_bad_words_leave_a_token(refused, sequences, eos_token_id=0)
    held = SamplingParams(allowed_token_ids=[0, *cat], bad_words=["cat"], min_tokens=2)
    with pytest.raises(GenerationError, match="which min_tokens holds back"):
        check_bad_words_leave_a_token(held, sequences, eos_token_id=0)
    check_bad_words_leave_a_token(  # EOS may end it once min_tokens is out of the way
        SamplingParams(allowed_token_ids=[0, *cat], bad_words=["cat"]), sequences, 0
    )
