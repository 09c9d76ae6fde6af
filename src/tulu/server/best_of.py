"""`best_of`: draw several samples of a prompt, answer with the most likely ones.

OpenAI's completions route (`best_of` >= `n`: return the `n` best) and TGI (`best_of`: return
the best, the others in `details.best_of_sequences`) both define "best" as the highest mean
log-probability per generated token, so a long sample is not penalised for its length. Here
the log-probabilities are the model's own (the raw logits, as every log-probability this
server reports), not those of the sampler's processed distribution.

The samples are the ``n`` samples of one engine request: they share the prompt's KV blocks,
and sample ``i`` of a seeded request is reproduced alone with ``seed=sample_seed(seed, i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tulu.engine.engine import CompletionOutput


def mean_logprob(completion: CompletionOutput) -> float:
    """The mean log-probability of a sample's generated tokens; -inf for a sample with none
    (a completion cut before its first token has nothing to recommend it)."""
    entries = completion.logprobs
    if not entries:
        return -math.inf
    return math.fsum(entry.logprob for entry in entries) / len(entries)


def rank_samples(completions: Sequence[CompletionOutput]) -> list[CompletionOutput]:
    """The samples from most to least likely per token; ties keep the samples' order.

    The samples must have been generated with log-probabilities (``SamplingParams.logprobs``
    set, 0 is enough)."""
    missing = [c.index for c in completions if c.logprobs is None and c.token_ids]
    if missing:
        raise ValueError(f"samples {missing} have no log-probabilities to rank them by")
    return sorted(completions, key=mean_logprob, reverse=True)
