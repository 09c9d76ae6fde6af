"""`tulu.server.best_of`: the ranking both routes' `best_of` answer with, on real engine outputs.

The HTTP behaviour (which sample is answered, usage, the TGI details) is in test_openai.py and
test_tgi.py; here only the rule: the mean log-probability per generated token, best first.
"""

from __future__ import annotations

import math

import pytest

from tulu.engine.engine import CompletionOutput
from tulu.engine.reference import TokenLogprob
from tulu.server.best_of import mean_logprob, rank_samples


def sample(index: int, logprobs: list[float] | None, n_tokens: int = 0) -> CompletionOutput:
    """A finished sample whose tokens have these log-probabilities (None: not computed, with
    `n_tokens` tokens)."""
    count = len(logprobs) if logprobs is not None else n_tokens
    ids = list(range(10, 10 + count))
    entries = (
        None
        if logprobs is None
        else [TokenLogprob(token_id=t, logprob=lp) for t, lp in zip(ids, logprobs, strict=True)]
    )
    return CompletionOutput(
        index=index, text="x" * count, token_ids=ids, finish_reason="length", logprobs=entries
    )


def test_the_mean_per_token_ranks_not_the_sum():
    """A long sample is not penalised for its length: sample 1 has the lower sum (-3.0 against
    -2.0) but the higher mean (-0.5 against -1.0)."""
    short, long_ = sample(0, [-1.0, -1.0]), sample(1, [-0.5] * 6)
    assert mean_logprob(short) == -1.0 and mean_logprob(long_) == -0.5
    assert [s.index for s in rank_samples([short, long_])] == [1, 0]


def test_samples_are_ranked_best_first():
    samples = [sample(0, [-2.0, -2.0]), sample(1, [-0.1]), sample(2, [-1.0, -0.5, -1.5])]
    assert [s.index for s in rank_samples(samples)] == [1, 2, 0]


def test_a_sample_without_tokens_scores_minus_infinity_and_ranks_last():
    empty = sample(0, [])
    assert mean_logprob(empty) == -math.inf
    assert mean_logprob(sample(1, None, n_tokens=0)) == -math.inf  # nothing to compute
    ranked = rank_samples([empty, sample(1, [-30.0]), sample(2, [-0.2])])
    assert [s.index for s in ranked] == [2, 1, 0]


def test_ties_keep_the_samples_order():
    samples = [sample(i, [-0.5, -1.5]) for i in range(3)] + [sample(3, [-1.0])]
    assert [s.index for s in rank_samples(samples)] == [0, 1, 2, 3]
    assert [s.index for s in rank_samples(samples[::-1])] == [3, 2, 1, 0]


def test_samples_without_logprobs_are_an_error_naming_them():
    samples = [sample(0, [-1.0]), sample(1, None, n_tokens=2), sample(2, None, n_tokens=0)]
    with pytest.raises(ValueError, match=r"samples \[1\] have no log-probabilities"):
        rank_samples(samples)
