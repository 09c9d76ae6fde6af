"""N-gram speculative decoding (vLLM's "ngram" method, transformers' prompt lookup).

Why: a decode step is bound by reading the weights, so a step that checks several proposed
tokens costs about what a step that makes one costs. When a reply repeats its own context
(quoting a passage, extracting an answer, code that reuses names, a few-shot format), the
tokens that followed the latest occurrence of the sequence's last n-gram are a good guess of
what comes next, and each step can land several tokens.

How: before a step, a decoding sequence's last ``n`` tokens (``prompt_lookup_max`` down to
``prompt_lookup_min``) are looked for earlier in its prompt and output; the most recent match
proposes the up-to-``num_speculative_tokens`` tokens that followed it. The step computes the
sequence's last token and the proposals together. A greedy request keeps the proposals while
each equals the model's argmax at its position; the first one that differs is replaced by
the argmax, and when all are kept the model's next token comes free: the output is the one
without speculation. A sampled request keeps each proposal with the probability its row
gives it and, at the first refusal, draws from that row without the refused token
(speculative sampling, `tulu.engine.sampling.sample_with_drafts`): each token has exactly its
distribution without speculation. Requests with penalties, structured output or bad words,
and seeded sampled ones (see `speculates`), decode one token per step beside them.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tulu.errors import GenerationError

if TYPE_CHECKING:  # kept free of torch: the command line parses the config before loading
    from tulu.engine.sampling import SamplingParams

__all__ = ["SpeculativeConfig", "parse_speculative_config", "propose_ngram", "speculates"]

_ITEM = array("i").itemsize  # bytes per token id in the search buffer


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config`` for ``{"method": "ngram"}``.

    ``prompt_lookup_max`` / ``prompt_lookup_min``: the longest and shortest n-gram matched.
    Given neither, 4 and 2 (a one-token match proposes too often to pay for the verification
    on a full batch); given one, both take its value.
    """

    num_speculative_tokens: int
    prompt_lookup_max: int | None = None  # resolved in __post_init__ (see above)
    prompt_lookup_min: int | None = None
    method: str = "ngram"
    disable_by_batch_size: int | None = None
    """No proposals while at least this many sequences are running (None: always propose).
    A step with any proposal runs whole on the general path, so on a GPU a large batch would
    trade every sequence's CUDA-graph decode step for some sequences' proposals."""

    def __post_init__(self) -> None:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None and high is None:
            low, high = 2, 4
        object.__setattr__(self, "prompt_lookup_min", high if low is None else low)
        object.__setattr__(self, "prompt_lookup_max", low if high is None else high)
        if self.method != "ngram":
            raise GenerationError(
                f"speculative_config.method must be 'ngram' (the only method without a draft "
                f"model), got {self.method!r}"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GenerationError(
                    f"speculative_config.{name} must be a positive integer, got {value!r}"
                )
        limit = self.disable_by_batch_size
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise GenerationError(
                f"speculative_config.disable_by_batch_size must be a positive integer or null, "
                f"got {limit!r}"
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise GenerationError(
                f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must not be "
                f"above prompt_lookup_max ({self.prompt_lookup_max})"
            )


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """The config of vLLM's ``--speculative-config '{"method": "ngram", ...}'`` JSON."""
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as err:
        raise GenerationError(f"speculative_config is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise GenerationError(f"speculative_config must be a JSON object, got {type(raw).__name__}")
    known = {
        "method",
        "num_speculative_tokens",
        "prompt_lookup_max",
        "prompt_lookup_min",
        "disable_by_batch_size",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise GenerationError(
            f"speculative_config has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(sorted(known))}"
        )
    if "method" not in raw or "num_speculative_tokens" not in raw:
        raise GenerationError(
            'speculative_config needs "method": "ngram" and "num_speculative_tokens"'
        )
    return SpeculativeConfig(
        method=raw["method"],
        num_speculative_tokens=raw["num_speculative_tokens"],
        disable_by_batch_size=raw.get("disable_by_batch_size"),
        prompt_lookup_max=raw.get("prompt_lookup_max"),
        prompt_lookup_min=raw.get("prompt_lookup_min"),
    )


def speculates(params: SamplingParams) -> bool:
    """Whether a request's proposals can be verified row by row: no penalties (they change
    with each proposed token), no structured output (its matcher moves per token), no bad
    words (what they ban depends on the tokens before); and greedy, or sampled without a
    seed. A seeded request keeps its promise that its samples depend on its seed alone: with
    proposals they would also depend on how many the step's budget and free blocks let it
    check, which the rest of the batch decides."""
    return (
        not params.uses_penalties
        and params.structured_output is None
        and not params.bad_words
        and (params.is_greedy or params.seed is None)
    )


def propose_ngram(
    token_ids: list[int],
    config: SpeculativeConfig,
    limit: int,
    cache: bytearray | None = None,
) -> list[int]:
    """Up to `limit` tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram of `token_ids` (``prompt_lookup_max`` down to ``prompt_lookup_min``); []
    when none occurs.

    The ids are searched as bytes (`bytes.rfind`, in C): a Python loop over a context of
    2,048 tokens for every sequence of every step would cost more than the step saves.
    `cache` holds the bytes of the ids seen so far (a sequence's ids only grow): only the new
    ones are converted, which is most of the cost (measured once on this project's 2-core
    CPU, 256 contexts of 2,048 tokens with no match, the worst case: about 3 ms a step with
    the cache, several times that converting every step)."""
    count = len(token_ids)
    limit = min(limit, config.num_speculative_tokens)
    if limit <= 0 or count < config.prompt_lookup_min + 1:
        return []
    data = cache if cache is not None else bytearray()
    seen = len(data) // _ITEM
    if seen < count:
        data += array("i", token_ids[seen:]).tobytes()
    for n in range(min(config.prompt_lookup_max, count - 1), config.prompt_lookup_min - 1, -1):
        pattern = data[-n * _ITEM :]
        # A match must end before the last token: it is then not the suffix itself, and at
        # least one token follows it.
        end = (count - 1) * _ITEM
        while True:
            at = data.rfind(pattern, 0, end)
            if at < 0:
                break
            if at % _ITEM == 0:
                start = at // _ITEM + n
                return token_ids[start : start + limit]
            end = at + len(pattern) - 1  # a match across id boundaries: look further left
    return []
