"""Sampling parameters and the batched logits processors.

One layer serves both the simple reference generator (a batch of one) and the continuous-batching
engine (a batch of rows, each row a different request with its own parameters). Every function
takes logits of shape ``[B, V]`` plus per-row parameter tensors of shape ``[B]``; nothing loops
over the vocabulary, and the only loop over rows is drawing each row's noise from that row's own
``torch.Generator`` (so a row's sample never depends on the other rows in the batch).

The pipeline that :func:`sample` runs on each row, in this order (vLLM's: the token
restrictions first, then the order of transformers' logits warpers, as its
``GenerationMixin._get_logits_processor`` appends them: temperature, top-k, top-p, min-p,
typical-p):

0. ``allowed_token_ids`` (every other token masked), then ``logit_bias`` added
   (:func:`apply_allowed_tokens`, :func:`apply_logit_bias`);
1. penalties (:func:`apply_penalties`): repetition (prompt + generated tokens), presence and
   frequency (generated tokens only);
2. greedy rows (temperature 0) take the argmax here and skip the rest;
3. temperature (:func:`apply_temperature`);
4. top-k, then top-p on the top-k-renormalised distribution (:func:`apply_top_k_top_p`, one sort
   for the whole batch);
5. min-p (:func:`apply_min_p`), relative to the most likely remaining token;
6. typical-p (:func:`apply_typical_p`), locally typical sampling over what is left, sorting only
   the rows that use it;
7. one draw from the resulting distribution with the row's generator.

Masked tokens get logit ``-inf``; all arithmetic is float32 whatever the model's dtype.

Log-probabilities (:func:`compute_logprobs`, :func:`candidate_logprobs`) are taken from the *raw*
model logits, before penalties, temperature and truncation: they describe the model, not the
sampler, so they are comparable across requests with different sampling settings (this is also
what vLLM and the OpenAI API return by default).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from tulu.engine.structured import StructuredOutput
from tulu.errors import GenerationError

if TYPE_CHECKING:
    from tulu.tokenizer import Tokenizer

__all__ = [
    "MAX_LOGPROBS",
    "SamplingParams",
    "SamplingTensors",
    "apply_allowed_tokens",
    "apply_logit_bias",
    "apply_min_p",
    "apply_penalties",
    "apply_temperature",
    "apply_top_k",
    "apply_top_k_top_p",
    "apply_top_p",
    "apply_typical_p",
    "bad_word_bans",
    "bad_word_token_ids",
    "check_bad_words_leave_a_token",
    "build_token_histories",
    "candidate_logprobs",
    "check_min_tokens_reachable",
    "check_token_ids_in_vocab",
    "compute_logprobs",
    "make_generator",
    "mask_tokens",
    "prepare_sampling_tensors",
    "process_logits",
    "sample",
    "sample_with_drafts",
]

MAX_LOGPROBS = 20
"""The most top log-probabilities a request may ask for per token (``logprobs``,
``prompt_logprobs``)."""
MAX_TOP_K = 2**31 - 1  # any k >= the vocabulary keeps every token; beyond int32 is nonsense

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are treated as 0, i.e. greedy decoding (dividing logits by a tiny
temperature would overflow float32 anyway)."""

_UINT64_MASK = (1 << 64) - 1
_FLOAT32_MAX = torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------------------------
# SamplingParams
# ----------------------------------------------------------------------------------------------


def _fail(name: str, requirement: str, value: object) -> GenerationError:
    return GenerationError(f"SamplingParams.{name} must be {requirement}, got {value!r}")


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(name, "an integer", value)
    return int(value)


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(name, "a number", value)
    result = float(value)
    if not math.isfinite(result):
        raise _fail(name, "a finite number", value)
    return result


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "a bool", value)
    return value


def _check_int_list(name: str, value: object, *, allow_none: bool) -> list[int] | None:
    if value is None:
        return None if allow_none else []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _fail(name, "a list of token ids", value)
    result = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item < 0:
            raise _fail(name, "a list of token ids (integers >= 0)", value)
        result.append(int(item))
    return result


LOGIT_BIAS_LIMIT = 100.0
"""The largest bias either way (OpenAI's range): +100 already forces a token, and a float32
overflow (1e39 is inf) would turn a masked -inf into NaN, which argmax picks."""


def _check_unicode(name: str, text: str, value: object) -> None:
    """A text field must encode as UTF-8: decoded text never holds an unpaired surrogate, so
    such a stop string never matches, and the tokenizer cannot encode such a bad word."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = f"{text[err.start]!r} at character {err.start} of {text!r}"
        raise _fail(name, f"valid Unicode (no unpaired surrogate: {bad})", value) from None


def _check_logit_bias(value: object) -> dict[int, float] | None:
    """A mapping of token ids (integers >= 0) to biases in [-100, 100]; None or empty means
    none."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail("logit_bias", "a mapping of token ids to biases", value)
    result: dict[int, float] = {}
    for token, bias in value.items():
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise _fail("logit_bias", "keyed by token ids (integers >= 0)", token)
        number = _check_float(f"logit_bias[{token}]", bias)
        if not -LOGIT_BIAS_LIMIT <= number <= LOGIT_BIAS_LIMIT:
            raise _fail(f"logit_bias[{token}]", "in [-100, 100]", bias)
        result[int(token)] = number
    return result or None


def _check_structured_output(params: SamplingParams) -> StructuredOutput | None:
    value = params.structured_output
    if value is None:
        return None
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(StructuredOutput)})
        if unknown:
            raise _fail("structured_output", f"a StructuredOutput (no field {unknown[0]!r})", value)
        value = StructuredOutput(**value)
    elif not isinstance(value, StructuredOutput):
        raise _fail("structured_output", "a StructuredOutput or a dict of its fields", value)
    for name in ("min_tokens", "allowed_token_ids"):
        if getattr(params, name):
            raise GenerationError(
                f"SamplingParams.{name} cannot be combined with structured_output: the grammar "
                "decides which tokens may come, and where the completion ends"
            )
    return value


@dataclass
class SamplingParams:
    """How to sample one request's completion (vLLM-like semantics).

    Values are validated on construction; a bad value raises :class:`GenerationError` naming the
    field and the value. Integers are accepted for float fields and stored as floats.
    """

    max_tokens: int = 256
    """The most tokens to generate (>= 1); the prompt does not count."""

    temperature: float = 1.0
    """Divides the logits before sampling (>= 0). 0 (anything below 1e-5) means greedy: always
    the most likely token after penalties; top_k, top_p, min_p, typical_p and seed are then
    irrelevant."""

    top_p: float = 1.0
    """Nucleus sampling (0 < top_p <= 1): keep the smallest set of most likely tokens whose total
    probability is >= top_p. 1 disables it."""

    top_k: int = 0
    """Keep only the k most likely tokens (>= 1). 0 or -1 disables it."""

    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's (0..1).
    0 disables it."""

    typical_p: float = 1.0
    """Locally typical sampling (Meister et al. 2022; transformers' ``TypicalLogitsWarper``),
    0 < typical_p <= 1: keep the tokens whose information content (-log p) is closest to the
    distribution's entropy, up to this total probability; the most likely token may go. Applied
    after min_p. 1 disables it."""

    repetition_penalty: float = 1.0
    """CTRL / transformers repetition penalty (> 0) over every token seen in the prompt or the
    output so far: a positive logit is divided by it, a negative one multiplied. 1 disables it;
    > 1 discourages repeats."""

    presence_penalty: float = 0.0
    """OpenAI presence penalty (-2..2) over generated tokens only: subtracted once from the logit
    of every token generated at least once. > 0 encourages new tokens."""

    frequency_penalty: float = 0.0
    """OpenAI frequency penalty (-2..2) over generated tokens only: subtracted from a token's
    logit once per time it has been generated. > 0 discourages repeats."""

    seed: int | None = None
    """Seeds this request's own random generator, so its samples are reproducible whatever else
    is in the batch. None uses the global torch RNG."""

    n: int = 1
    """How many completions to return for the prompt (>= 1)."""

    stop: list[str] = field(default_factory=list)
    """Strings that end the completion when generated; a single string is accepted and wrapped
    in a list. Not included in the output unless include_stop_str_in_output."""

    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the completion (in addition to the tokenizer's EOS)."""

    bad_words: list[str] = field(default_factory=list)
    """Words never generated (vLLM's): each word's tokens, as it is written and after a space,
    with the last token masked wherever the generated tokens so far end with the others.
    Needs a tokenizer; checked against the generated tokens only, not the prompt."""

    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the returned text."""

    ignore_eos: bool = False
    """Keep generating after the EOS token (until max_tokens or a stop); for benchmarks."""

    logprobs: int | None = None
    """Return the log-probability of each chosen token plus this many top alternatives
    (0..20). None returns none."""

    prompt_logprobs: int | None = None
    """Return the log-probability of each prompt token plus this many top alternatives
    (0..20). None returns none."""

    candidate_token_ids: list[int] | None = None
    """Token ids whose log-probabilities (from the raw logits) are returned at every generated
    position, e.g. the answer letters of a multiple-choice scorer (which needs max_tokens=1)."""

    min_tokens: int = 0
    """Generate at least this many tokens before EOS, a stop token or a stop string may end the
    completion (0..max_tokens); as in vLLM, a stop string counts only if it ends after them."""

    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""

    logit_bias: dict[int, float] | None = None
    """Added to the logits of the given token ids before penalties and sampling (OpenAI's
    ``logit_bias``; a bias of -100 in effect bans a token, +100 forces it). Values in
    [-100, 100]; an empty mapping is stored as None."""

    allowed_token_ids: list[int] | None = None
    """Only these tokens may be generated (vLLM's ``allowed_token_ids``): every other token is
    masked before anything else runs, so even greedy rows pick among them. None allows all."""

    structured_output: StructuredOutput | None = None
    """Constrain the completion to a JSON schema, any JSON, a regex, a choice or a grammar
    (:class:`tulu.engine.structured.StructuredOutput`; a dict of its fields is accepted). The
    completion ends when the grammar is complete. Needs the xgrammar package and a tokenizer.
    Cannot be combined with ``min_tokens`` or ``allowed_token_ids``, which could leave no
    token the grammar allows."""

    def __post_init__(self) -> None:
        self.max_tokens = _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise _fail("max_tokens", ">= 1", self.max_tokens)

        temperature = _check_float("temperature", self.temperature)
        if temperature < 0:
            raise _fail("temperature", ">= 0", self.temperature)
        self.temperature = temperature

        top_p = _check_float("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise _fail("top_p", "in (0, 1]", self.top_p)
        self.top_p = top_p

        self.top_k = _check_int("top_k", self.top_k)
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise _fail("top_k", f"in [1, {MAX_TOP_K}], or 0 or -1 to disable it", self.top_k)

        min_p = _check_float("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise _fail("min_p", "in [0, 1]", self.min_p)
        self.min_p = min_p

        typical_p = _check_float("typical_p", self.typical_p)
        if not 0 < typical_p <= 1:
            raise _fail("typical_p", "in (0, 1]", self.typical_p)
        self.typical_p = typical_p

        repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if repetition_penalty <= 0:
            raise _fail("repetition_penalty", "> 0", self.repetition_penalty)
        if repetition_penalty > _FLOAT32_MAX:
            # It becomes inf in the float32 sampler, and inf * a logit of 0 is NaN, which the
            # argmax then picks: the most penalised token would win. (A huge temperature is
            # harmless: every logit becomes 0, the uniform distribution it tends to.)
            raise _fail(
                "repetition_penalty",
                f"at most {_FLOAT32_MAX:.4g} (float32)",
                self.repetition_penalty,
            )
        self.repetition_penalty = repetition_penalty

        for name in ("presence_penalty", "frequency_penalty"):
            original = getattr(self, name)
            value = _check_float(name, original)
            if not -2 <= value <= 2:
                raise _fail(name, "in [-2, 2]", original)
            setattr(self, name, value)

        if self.seed is not None:
            self.seed = _check_int("seed", self.seed)
            if not -(1 << 63) <= self.seed <= _UINT64_MASK:
                raise _fail("seed", "in [-2**63, 2**64)", self.seed)

        self.n = _check_int("n", self.n)
        if self.n < 1:
            raise _fail("n", ">= 1", self.n)

        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if isinstance(stop, bytes) or not isinstance(stop, Sequence):
            raise _fail("stop", "a string or a list of strings", self.stop)
        for item in stop:
            if not isinstance(item, str) or not item:
                wanted = (
                    "a non-empty string"
                    if isinstance(self.stop, str)
                    else "a list of non-empty strings"
                )
                raise _fail("stop", wanted, self.stop)
            _check_unicode("stop", item, self.stop)
        self.stop = list(stop)

        self.stop_token_ids = _check_int_list(
            "stop_token_ids", self.stop_token_ids, allow_none=False
        )

        bad_words = [] if self.bad_words is None else self.bad_words  # None: vLLM's default
        if (
            isinstance(bad_words, (str, bytes))
            or not isinstance(bad_words, Sequence)
            or any(not isinstance(w, str) or not w.strip() for w in bad_words)
        ):
            raise _fail("bad_words", "a list of non-empty words", self.bad_words)
        for word in bad_words:
            _check_unicode("bad_words", word, self.bad_words)
        self.bad_words = list(bad_words)

        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _check_bool(name, getattr(self, name))

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                value = _check_int(name, value)
                if not 0 <= value <= MAX_LOGPROBS:
                    raise _fail(name, f"None or in [0, {MAX_LOGPROBS}]", value)
                setattr(self, name, value)

        self.candidate_token_ids = _check_int_list(
            "candidate_token_ids", self.candidate_token_ids, allow_none=True
        )
        if self.candidate_token_ids is not None and not self.candidate_token_ids:
            raise _fail("candidate_token_ids", "None or a non-empty list of token ids", [])

        self.min_tokens = _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise _fail("min_tokens", ">= 0", self.min_tokens)
        if self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)

        self.logit_bias = _check_logit_bias(self.logit_bias)
        self.allowed_token_ids = _check_int_list(
            "allowed_token_ids", self.allowed_token_ids, allow_none=True
        )
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise _fail("allowed_token_ids", "None or a non-empty list of token ids", [])
        check_min_tokens_reachable(self, eos_token_id=None)
        self.structured_output = _check_structured_output(self)

    @property
    def is_greedy(self) -> bool:
        """True when decoding is deterministic argmax (temperature below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        """True when any of the three penalties is not neutral (needs token histories)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


# ----------------------------------------------------------------------------------------------
# Per-step tensors
# ----------------------------------------------------------------------------------------------


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of one batch, as tensors on the logits' device.

    Build with :func:`prepare_sampling_tensors` once per engine step. All per-row tensors have
    shape ``[B]``. The ``do_*`` flags let :func:`sample` skip a processor no row uses.
    """

    temperature: torch.Tensor
    """float32; greedy rows hold 1.0 so that dividing by it is harmless."""
    top_k: torch.Tensor
    """int64; 0 means disabled (SamplingParams' -1 is stored as 0)."""
    top_p: torch.Tensor
    """float32; 1.0 means disabled."""
    min_p: torch.Tensor
    """float32; 0.0 means disabled."""
    repetition_penalty: torch.Tensor
    """float32; 1.0 means disabled."""
    presence_penalty: torch.Tensor
    """float32; 0.0 means disabled."""
    frequency_penalty: torch.Tensor
    """float32; 0.0 means disabled."""
    greedy: torch.Tensor
    """bool; rows decoded by argmax."""
    prompt_mask: torch.Tensor | None = None
    """bool ``[B, V]``: token appeared in the row's prompt. Only built when penalties are used."""
    output_counts: torch.Tensor | None = None
    """int32 ``[B, V]``: times the token was generated so far. Only built with penalties."""
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """The rows' ``logit_bias`` as flat (row int64, token int64, bias float32) entries; None
    when no row has one."""
    allowed_tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """(restricted bool ``[B]``, row int64, token int64): the rows with ``allowed_token_ids``
    and their tokens as flat entries; None when no row restricts its tokens."""
    typical: tuple[torch.Tensor, torch.Tensor] | None = None
    """(row int64 ``[R]``, typical_p float32 ``[R]``): the sampled rows with typical_p < 1 and
    their values, the only rows typical decoding sorts; None (nothing built, nothing run) when
    no row uses it."""
    greedy_rows: tuple[bool, ...] = ()
    """The ``greedy`` flags as Python bools (saves a device sync per step); empty means read
    them from ``greedy``."""
    all_greedy: bool = False
    any_greedy: bool = False
    do_top_k: bool = False
    do_top_p: bool = False
    do_min_p: bool = False
    do_penalties: bool = False

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]


def build_token_histories(
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn per-row token lists into ``(prompt_mask bool [B, V], output_counts int32 [B, V])``.

    Raises GenerationError if a token id is outside ``[0, vocab_size)``.
    """
    if len(prompt_token_ids) != len(output_token_ids):
        raise GenerationError(
            f"build_token_histories: {len(prompt_token_ids)} prompt rows but "
            f"{len(output_token_ids)} output rows"
        )
    batch = len(prompt_token_ids)

    def padded(rows: Sequence[Sequence[int]], what: str) -> torch.Tensor:
        width = max((len(r) for r in rows), default=0)
        # Pad with vocab_size: a spare column that is sliced off afterwards.
        index = torch.full((batch, max(width, 1)), vocab_size, dtype=torch.int64)
        for i, row in enumerate(rows):
            if len(row):
                values = torch.as_tensor(list(row), dtype=torch.int64)
                bad = values[(values < 0) | (values >= vocab_size)]
                if bad.numel():
                    raise GenerationError(
                        f"{what} token id {bad[0].item()} in row {i} is outside the "
                        f"vocabulary [0, {vocab_size})"
                    )
                index[i, : len(row)] = values
        return index.to(device)

    prompt_index = padded(prompt_token_ids, "prompt")
    output_index = padded(output_token_ids, "output")
    prompt_mask = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=device)
    prompt_mask.scatter_(1, prompt_index, True)
    output_counts = torch.zeros(batch, vocab_size + 1, dtype=torch.int32, device=device)
    output_counts.scatter_add_(1, output_index, torch.ones_like(output_index, dtype=torch.int32))
    return prompt_mask[:, :vocab_size], output_counts[:, :vocab_size]


def prepare_sampling_tensors(
    params_list: Sequence[SamplingParams],
    device: torch.device | str | None = None,
    *,
    vocab_size: int | None = None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
) -> SamplingTensors:
    """Stack the rows' parameters into :class:`SamplingTensors` on ``device``.

    When any row uses a penalty, ``vocab_size``, ``prompt_token_ids`` and ``output_token_ids``
    (one list per row) are required to build the token histories; otherwise they are ignored.
    The token ids the rows name were checked when their requests were added
    (:func:`check_token_ids_in_vocab`), not again every step.
    """
    if not params_list:
        raise GenerationError("prepare_sampling_tensors: params_list is empty")
    for i, p in enumerate(params_list):
        if not isinstance(p, SamplingParams):
            raise GenerationError(
                f"prepare_sampling_tensors: row {i} is {type(p).__name__}, not SamplingParams"
            )
    greedy = [p.is_greedy for p in params_list]
    temperature = [1.0 if g else p.temperature for p, g in zip(params_list, greedy, strict=True)]
    top_k = [max(p.top_k, 0) for p in params_list]
    top_p = [p.top_p for p in params_list]
    min_p = [p.min_p for p in params_list]
    sampled = [not g for g in greedy]

    def f32(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    tensors = SamplingTensors(
        temperature=f32(temperature),
        top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
        top_p=f32(top_p),
        min_p=f32(min_p),
        repetition_penalty=f32([p.repetition_penalty for p in params_list]),
        presence_penalty=f32([p.presence_penalty for p in params_list]),
        frequency_penalty=f32([p.frequency_penalty for p in params_list]),
        greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        greedy_rows=tuple(greedy),
        all_greedy=all(greedy),
        any_greedy=any(greedy),
        do_top_k=any(k > 0 and s for k, s in zip(top_k, sampled, strict=True)),
        do_top_p=any(p < 1.0 and s for p, s in zip(top_p, sampled, strict=True)),
        do_min_p=any(p > 0.0 and s for p, s in zip(min_p, sampled, strict=True)),
        do_penalties=any(p.uses_penalties for p in params_list),
    )
    tensors.logit_bias = _flat_logit_bias(params_list, device)
    tensors.allowed_tokens = _flat_allowed_tokens(params_list, device)
    tensors.typical = _typical_rows(params_list, greedy, device)
    if tensors.do_penalties:
        if vocab_size is None or prompt_token_ids is None or output_token_ids is None:
            raise GenerationError(
                "prepare_sampling_tensors: a row uses a penalty, so vocab_size, "
                "prompt_token_ids and output_token_ids are required"
            )
        if len(prompt_token_ids) != len(params_list):
            raise GenerationError(
                f"prepare_sampling_tensors: {len(params_list)} rows but "
                f"{len(prompt_token_ids)} prompt_token_ids rows"
            )
        tensors.prompt_mask, tensors.output_counts = build_token_histories(
            prompt_token_ids, output_token_ids, vocab_size, device
        )
    return tensors


def _flat_logit_bias(
    params_list: Sequence[SamplingParams], device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    rows: list[int] = []
    tokens: list[int] = []
    biases: list[float] = []
    for i, p in enumerate(params_list):
        if p.logit_bias:
            rows.extend([i] * len(p.logit_bias))
            tokens.extend(p.logit_bias.keys())
            biases.extend(p.logit_bias.values())
    if not rows:
        return None
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(tokens, dtype=torch.int64, device=device),
        torch.tensor(biases, dtype=torch.float32, device=device),
    )


def _typical_rows(
    params_list: Sequence[SamplingParams], greedy: Sequence[bool], device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sampled rows that use typical decoding and their typical_p (greedy rows never
    sample: sorting them would be wasted work); None when there are none.

    A row uses it when its typical_p is below 1 *in float32*, the precision
    :func:`apply_typical_p` computes in: a value within 2**-25 of 1 (0.99999999) rounds to
    1.0 there, which is off, so it is off here too rather than sorted for nothing."""
    candidates = [
        i
        for i, (p, g) in enumerate(zip(params_list, greedy, strict=True))
        if p.typical_p < 1 and not g
    ]
    if not candidates:
        return None
    masses = torch.tensor([params_list[i].typical_p for i in candidates], dtype=torch.float32)
    used = masses < 1
    if not used.any():
        return None
    rows = torch.tensor(candidates, dtype=torch.int64)[used]
    return rows.to(device), masses[used].to(device)


def _flat_allowed_tokens(
    params_list: Sequence[SamplingParams], device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    restricted = [p.allowed_token_ids is not None for p in params_list]
    if not any(restricted):
        return None
    rows: list[int] = []
    tokens: list[int] = []
    for i, p in enumerate(params_list):
        if p.allowed_token_ids is not None:
            rows.extend([i] * len(p.allowed_token_ids))
            tokens.extend(p.allowed_token_ids)
    return (
        torch.tensor(restricted, dtype=torch.bool, device=device),
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(tokens, dtype=torch.int64, device=device),
    )


# ----------------------------------------------------------------------------------------------
# Logits processors (pure, out of place, float32)
# ----------------------------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise GenerationError(f"logits must have shape [B, V], got {tuple(logits.shape)}")
    return logits.float()


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    output_counts: torch.Tensor | None,
    repetition_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """Apply repetition, presence and frequency penalties per row; returns new float32 logits.

    ``prompt_mask`` (bool ``[B, V]``) marks tokens in each row's prompt and ``output_counts``
    (int ``[B, V]``) counts generated tokens; None means no such tokens. Repetition penalty ``r``
    touches every token seen in prompt or output (``l / r`` if ``l > 0`` else ``l * r``); then
    ``l -= presence * (count > 0) + frequency * count`` over generated tokens. Entries that are
    not modified (including every entry of a row with neutral penalties) are returned
    bit-for-bit unchanged.
    """
    logits = _check_logits(logits)
    if output_counts is None:
        output_counts = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    generated = output_counts > 0
    seen = generated if prompt_mask is None else generated | prompt_mask.bool()

    rep = repetition_penalty.to(logits.device, torch.float32).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen & (rep != 1.0), penalised, logits)

    presence = presence_penalty.to(logits.device, torch.float32).unsqueeze(1)
    frequency = frequency_penalty.to(logits.device, torch.float32).unsqueeze(1)
    subtract = presence * generated.float() + frequency * output_counts.float()
    active = generated & ((presence != 0.0) | (frequency != 0.0))
    return torch.where(active, logits - subtract, logits)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (``[B]``, all > 0; greedy rows should hold 1.0)."""
    logits = _check_logits(logits)
    return logits / temperature.to(logits.device, torch.float32).unsqueeze(1)


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
) -> torch.Tensor:
    """Top-k then top-p per row with a single sort of the batch; masked entries become -inf.

    ``top_k`` (int ``[B]``, 0 = off, values above V mean V) keeps exactly k tokens; ``top_p``
    (float ``[B]``, 1 = off) then keeps the smallest prefix of the top-k-renormalised
    distribution whose cumulative probability is >= p, always at least the most likely token.
    Ties are broken deterministically by a stable sort: among equal logits the lower token id
    ranks first, so it is the one kept at a boundary. Either argument may be None.
    """
    logits = _check_logits(logits)
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    if top_k is not None:
        k = top_k.to(logits.device, torch.int64)
        k = torch.where(k <= 0, vocab, k.clamp(max=vocab)).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    if top_p is not None:
        p = top_p.to(logits.device, torch.float32).unsqueeze(1)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly better tokens
        drop = (before >= p) & (p < 1.0) & (rank > 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` most likely tokens (int ``[B]``, 0 = off); see
    :func:`apply_top_k_top_p`."""
    return apply_top_k_top_p(logits, top_k, None)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus-filter each row with its ``top_p`` (float ``[B]``, 1 = off); see
    :func:`apply_top_k_top_p`."""
    return apply_top_k_top_p(logits, None, top_p)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` (float ``[B]``, 0 = off) times the
    row's largest probability. Computed in log space: ``l - max(l) < log(min_p)``."""
    logits = _check_logits(logits)
    threshold = torch.log(min_p.to(logits.device, torch.float32)).unsqueeze(1)  # log 0 = -inf
    top = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits - top < threshold, float("-inf"))


def apply_typical_p(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling per row (float ``[B]``, 1 = off): transformers'
    ``TypicalLogitsWarper`` with ``min_tokens_to_keep=1``, batched, with one sort.

    Tokens are ranked by the distance of their information content ``-log p`` from the row's
    entropy ``H``; the closest ones are taken until their probability reaches ``typical_p``, and
    every token farther from ``H`` than the last one taken is masked (the cut is a distance, not
    a rank: tokens tied with the last one stay, however the sort ordered them; the most typical
    token always stays). Masked (-inf) tokens have p = 0: they add nothing to ``H``
    (``0 * -inf`` would be NaN) and are the farthest, so they stay masked.
    """
    logits = _check_logits(logits)
    mass = typical_p.to(logits.device, torch.float32).unsqueeze(1)
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    entropy = -torch.where(probs > 0, probs * logprobs, 0.0).sum(dim=-1, keepdim=True)
    distance = (-logprobs - entropy).abs()
    sorted_distance, order = torch.sort(distance, dim=-1)
    # transformers' arithmetic (a softmax of the sorted logits, not the sorted probs): near
    # typical_p = 1 the cumulative sum's last bits decide the cut.
    cumulative = torch.softmax(logits.gather(1, order), dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[1] - 1)
    drop = (distance > sorted_distance.gather(1, last)) & (mass < 1.0)
    return logits.masked_fill(drop, float("-inf"))


def apply_allowed_tokens(
    logits: torch.Tensor, restricted: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """Mask every token of each ``restricted`` row (bool ``[B]``) but its allowed ones, given as
    flat (row, token) entries; unrestricted rows are unchanged. The token ids were checked
    against the vocabulary when the request was added (no device sync here, every step)."""
    logits = _check_logits(logits)
    blocked = restricted.to(logits.device).unsqueeze(1).expand_as(logits).clone()
    blocked[rows.to(logits.device), tokens.to(logits.device)] = False
    return logits.masked_fill(blocked, float("-inf"))


def apply_logit_bias(
    logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, biases: torch.Tensor
) -> torch.Tensor:
    """Add each flat (row, token, bias) entry to that row's logit of that token (ids checked
    when the request was added, as for :func:`apply_allowed_tokens`). A masked (-inf) logit
    stays masked."""
    logits = _check_logits(logits)
    device = logits.device
    return logits.index_put(
        (rows.to(device), tokens.to(device)), biases.to(device, torch.float32), accumulate=True
    )


def mask_tokens(logits: torch.Tensor, token_ids: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """Set the given token ids of each row to -inf (e.g. EOS and stop tokens before
    ``min_tokens`` is reached). ``token_ids`` has one entry per row; None or empty leaves the row
    alone. Returns new float32 logits."""
    logits = _check_logits(logits)
    if len(token_ids) != logits.shape[0]:
        raise GenerationError(
            f"mask_tokens: {len(token_ids)} rows of ids for {logits.shape[0]} rows"
        )
    rows: list[int] = []
    cols: list[int] = []
    for i, ids in enumerate(token_ids):
        for t in ids or ():
            rows.append(i)
            cols.append(int(t))
    if not rows:
        return logits
    vocab = logits.shape[1]
    bad = [t for t in cols if not 0 <= t < vocab]
    if bad:
        raise GenerationError(
            f"mask_tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})"
        )
    out = logits.clone()
    out[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float(
        "-inf"
    )
    return out


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def make_generator(
    seed: int | None, device: torch.device | str | None = None
) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with the request's seed; None if seed is None
    (the row then uses the global RNG). Negative seeds are taken modulo 2**64."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    generator.manual_seed(int(seed) & _UINT64_MASK)
    return generator


def _exponential_noise(
    shape: tuple[int, int],
    rows: list[int],
    generators: Sequence[torch.Generator | None],
    device: torch.device,
) -> torch.Tensor:
    """Exp(1) noise for the given rows, each from its own generator (the global RNG for None
    rows, drawn in one call); other rows hold 1."""
    noise = torch.ones(shape, dtype=torch.float32, device=device)
    global_rows = [i for i in rows if generators[i] is None]
    if global_rows:
        index = torch.tensor(global_rows, device=device)
        noise[index] = torch.empty(len(global_rows), shape[1], device=device).exponential_()
    for i in rows:
        generator = generators[i]
        if generator is not None:
            noise[i].exponential_(generator=generator)
    # exponential_ may return exactly 0 on some builds; keep log() finite.
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def process_logits(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """Run temperature, top-k/top-p, min-p and typical-p on already penalised float32 logits.
    The result's softmax is the distribution :func:`sample` draws non-greedy rows from."""
    logits = apply_temperature(logits, tensors.temperature)
    if tensors.do_top_k or tensors.do_top_p:
        logits = apply_top_k_top_p(
            logits,
            tensors.top_k if tensors.do_top_k else None,
            tensors.top_p if tensors.do_top_p else None,
        )
    if tensors.do_min_p:
        logits = apply_min_p(logits, tensors.min_p)
    if tensors.typical is not None:
        rows, typical_p = tensors.typical
        typical = apply_typical_p(logits.index_select(0, rows), typical_p)
        logits = logits.index_copy(0, rows, typical)
    return logits


def _restrict(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """The rows' static restrictions, before anything else: ``allowed_token_ids`` masks the
    other tokens, then ``logit_bias`` is added."""
    if tensors.allowed_tokens is not None:
        logits = apply_allowed_tokens(logits, *tensors.allowed_tokens)
    if tensors.logit_bias is not None:
        logits = apply_logit_bias(logits, *tensors.logit_bias)
    return logits


def sample(
    logits: torch.Tensor,
    tensors: SamplingTensors,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Choose one token per row; returns int64 ids ``[B]``.

    Rows' ``allowed_token_ids`` and ``logit_bias`` are applied first, then penalties (when any
    row uses them). Greedy rows take the argmax of the penalised logits (the lowest id on
    ties). The other rows are processed by
    :func:`process_logits` and draw with the exponential race ``argmax(probs / E)``, ``E ~
    Exp(1)`` per token, computed in log space as ``argmax(logits - log E)`` (the Gumbel-max
    trick), which samples exactly from ``softmax(logits)`` and never picks a masked token. Each
    such row's noise comes from ``generators[i]`` alone, so its result depends only on its own
    generator and logits; rows whose generator is None share the global RNG.
    """
    logits = _check_logits(logits)
    batch = logits.shape[0]
    if tensors.batch_size != batch or len(generators) != batch:
        raise GenerationError(
            f"sample: logits have {batch} rows but tensors have {tensors.batch_size} and "
            f"generators {len(generators)}"
        )
    logits = _restrict(logits, tensors)
    if tensors.do_penalties:
        logits = apply_penalties(
            logits,
            tensors.prompt_mask,
            tensors.output_counts,
            tensors.repetition_penalty,
            tensors.presence_penalty,
            tensors.frequency_penalty,
        )
    if tensors.all_greedy:
        return logits.argmax(dim=-1)

    processed = process_logits(logits, tensors)
    flags = tensors.greedy_rows or tuple(tensors.greedy.tolist())
    sampled_rows = [i for i, g in enumerate(flags) if not g]
    noise = _exponential_noise(processed.shape, sampled_rows, generators, processed.device)
    chosen = (processed - noise.log()).argmax(dim=-1)
    if tensors.any_greedy:
        chosen = torch.where(tensors.greedy, logits.argmax(dim=-1), chosen)
    return chosen


def sample_with_drafts(
    logits: torch.Tensor, tensors: SamplingTensors, drafts: Sequence[Sequence[int]]
) -> list[list[int]]:
    """Speculative sampling for groups of rows: group g is ``len(drafts[g]) + 1`` consecutive
    rows of ``logits`` (row i predicts draft i, the last row the token after them); returns
    each group's kept drafts and one more token.

    Each draft is kept with the probability its row's processed distribution gives it (the
    acceptance rule of speculative sampling for a proposal that is certain, as an n-gram's
    is); at a group's first refusal its token comes from that row's distribution without the
    refused draft, renormalised; when all are kept, from its last row. Every token so produced
    has exactly the distribution it has without speculation (Leviathan et al. 2023, Chen et
    al. 2023). Static restrictions only (allowed tokens, logit bias, temperature and
    truncation: penalties change with every token). Draws come from the global RNG (only
    unseeded requests speculate), all groups at once: two host syncs per call, whatever the
    number of groups.
    """
    logits = _check_logits(logits)
    if tensors.do_penalties:
        raise GenerationError("sample_with_drafts: penalties cannot be verified row by row")
    logits = _restrict(logits, tensors)
    probs = torch.softmax(process_logits(logits, tensors), dim=-1)
    device = probs.device
    draft_rows, draft_ids, firsts = [], [], []
    row = 0
    for group in drafts:
        firsts.append(row)
        draft_rows.extend(range(row, row + len(group)))
        draft_ids.extend(group)
        row += len(group) + 1
    kept: list[bool] = []
    if draft_rows:
        index = torch.tensor(draft_rows, device=device)
        ids = torch.tensor(draft_ids, device=device)
        uniforms = torch.rand(len(draft_rows), device=device)
        kept = (uniforms < probs[index, ids]).tolist()
    # Each group's row to draw from (its first refusal, else its last row) and the draft
    # that row refused (-1: none).
    draw_rows: list[int] = []
    refused: list[int] = []
    position = 0
    for first, group in zip(firsts, drafts, strict=True):
        flags = kept[position : position + len(group)]
        position += len(group)
        stop = flags.index(False) if False in flags else len(group)
        draw_rows.append(first + stop)
        refused.append(group[stop] if stop < len(group) else -1)
    rows = probs.index_select(0, torch.tensor(draw_rows, device=device))
    groups = [g for g, token in enumerate(refused) if token >= 0]
    if groups:  # max(p - q, 0) for a certain proposal q
        tokens_refused = [refused[g] for g in groups]
        rows[torch.tensor(groups, device=device), torch.tensor(tokens_refused, device=device)] = 0.0
    noise = torch.empty_like(rows).exponential_().clamp_(min=torch.finfo(torch.float32).tiny)
    tokens = (rows / noise).argmax(dim=-1).tolist()
    return [
        [*group[: draw - first], token]
        for group, first, draw, token in zip(drafts, firsts, draw_rows, tokens, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------


def compute_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities from the RAW model logits (before penalties, temperature, truncation).

    Returns ``(chosen_logprob [B], top_ids [B, top_n], top_logprobs [B, top_n])``: the
    log-softmax at each row's chosen token, and the row's ``top_n`` most likely tokens sorted
    by descending log-probability. Also serves prompt logprobs (rows = prompt positions,
    ``chosen`` = the next prompt tokens).
    """
    logprobs = torch.log_softmax(_check_logits(logits), dim=-1)
    batch, vocab = logprobs.shape
    if not 0 <= top_n <= vocab:
        raise GenerationError(f"compute_logprobs: top_n must be in [0, {vocab}], got {top_n}")
    chosen = chosen.to(logprobs.device, torch.int64).reshape(batch, 1)
    chosen_logprob = logprobs.gather(1, chosen).squeeze(1)
    top_logprobs, top_ids = torch.topk(logprobs, top_n, dim=-1, sorted=True)
    return chosen_logprob, top_ids, top_logprobs


def candidate_logprobs(logits_row: torch.Tensor, candidate_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities (log-softmax of the raw logits ``[V]``) of the given token ids, in the
    given order; float32 ``[len(candidate_ids)]``."""
    if logits_row.dim() != 1:
        raise GenerationError(f"logits_row must have shape [V], got {tuple(logits_row.shape)}")
    vocab = logits_row.shape[0]
    for t in candidate_ids:
        if not 0 <= t < vocab:
            raise GenerationError(
                f"candidate_token_ids: token id {t} is outside the vocabulary [0, {vocab})"
            )
    logprobs = torch.log_softmax(logits_row.float(), dim=-1)
    index = torch.tensor(list(candidate_ids), dtype=torch.int64, device=logits_row.device)
    return logprobs[index]


def bad_word_token_ids(
    words: Sequence[str], tokenizer: Tokenizer | None, vocab_size: int
) -> tuple[tuple[int, ...], ...]:
    """`bad_words` as token sequences: each word as written (leading spaces dropped) and after
    a space, which byte-level BPE encodes with another first token; each distinct sequence
    once. (vLLM adds the after-a-space form only when it has as many tokens as the word
    alone; here it always is, so " autumn" as one token is banned with "autumn" as three.)
    A token past the model's `vocab_size` is refused: masking it would fail the whole step."""
    if not words:
        return ()
    if tokenizer is None:
        raise GenerationError("bad_words need a tokenizer")
    sequences: list[tuple[int, ...]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text))
            outside = [t for t in ids if t >= vocab_size]
            if outside:
                raise GenerationError(
                    f"SamplingParams.bad_words: {word!r} has token id {outside[0]}, outside the "
                    f"model's vocabulary [0, {vocab_size}): the tokenizer does not belong to "
                    f"this model"
                )
            if ids and ids not in sequences:
                sequences.append(ids)
    return tuple(sequences)


def check_bad_words_leave_a_token(
    params: SamplingParams, sequences: Sequence[Sequence[int]], eos_token_id: int | None
) -> None:
    """Refuse `allowed_token_ids` that the one-token bad words (always banned) leave empty,
    or, while ``min_tokens`` holds the stop tokens back, leave nothing but stop tokens: every
    row would be all -inf, and the argmax of nothing is token 0."""
    if params.allowed_token_ids is None or not sequences:
        return  # without bad words, check_min_tokens_reachable covers it
    banned = {s[0] for s in sequences if len(s) == 1}
    left = set(params.allowed_token_ids) - banned
    if params.min_tokens:
        left -= set(params.stop_token_ids)
        if not params.ignore_eos and eos_token_id is not None:
            left.discard(eos_token_id)
    if not left:
        raise GenerationError(
            "SamplingParams.bad_words ban every token allowed_token_ids allows"
            + (" (stop tokens aside, which min_tokens holds back)" if params.min_tokens else "")
        )


def bad_word_bans(output_ids: Sequence[int], bad_words: Sequence[Sequence[int]]) -> list[int]:
    """The tokens `bad_words` (token sequences) forbid next: each word's last token wherever
    the generated tokens end with the rest of it (always, for a one-token word). As vLLM,
    only generated tokens count: a prompt ending in a word's first tokens bans nothing."""
    bans = []
    for word in bad_words:
        prefix = len(word) - 1
        if prefix > len(output_ids):
            continue
        if prefix == 0 or list(output_ids[len(output_ids) - prefix :]) == list(word[:-1]):
            bans.append(word[-1])
    return bans


def check_min_tokens_reachable(params: SamplingParams, eos_token_id: int | None) -> None:
    """Refuse ``min_tokens`` with ``allowed_token_ids`` that are all stop tokens (EOS unless
    ``ignore_eos``, and ``stop_token_ids``): before ``min_tokens`` every stop token is masked,
    so no token would be left to generate. Checked without the EOS by SamplingParams itself;
    the engine, which knows the EOS, checks again when the request is added."""
    if not params.min_tokens or params.allowed_token_ids is None:
        return
    stops = set(params.stop_token_ids)
    if eos_token_id is not None and not params.ignore_eos:
        stops.add(eos_token_id)
    if stops.issuperset(params.allowed_token_ids):
        raise GenerationError(
            f"SamplingParams.allowed_token_ids {params.allowed_token_ids} are all stop tokens, "
            f"which are masked until min_tokens ({params.min_tokens}) tokens are generated: no "
            "token could be generated"
        )


def check_token_ids_in_vocab(
    params: SamplingParams, vocab_size: int, num_tokens: int | None = None
) -> None:
    """Token ids a request names must exist in the model's vocabulary, and it cannot ask for
    more top log-probabilities than there are tokens (checked per model, before the request
    runs: a step would otherwise fail halfway, for every request in its batch).

    Given the tokenizer's size `num_tokens`, the ids a request makes generable
    (``allowed_token_ids``, ``logit_bias``) must also be tokens of it: the model's vocabulary
    is padded past the tokenizer's (Pythia: 50432 rows, 50277 tokens), and favouring a padding
    row would generate ids with no text (vLLM checks ``allowed_token_ids`` so too)."""
    for name in ("allowed_token_ids", "logit_bias"):
        for token in getattr(params, name) or ():
            if num_tokens is not None and token >= num_tokens:
                raise GenerationError(
                    f"SamplingParams.{name} contains {token}, which is not a token: the "
                    f"tokenizer's ids are 0 to {num_tokens - 1}"
                )
    for name in ("stop_token_ids", "candidate_token_ids", "allowed_token_ids", "logit_bias"):
        for token in getattr(params, name) or ():
            if token >= vocab_size:
                raise GenerationError(
                    f"SamplingParams.{name} contains {token}, outside the vocabulary [0, {vocab_size})"
                )
    for name in ("logprobs", "prompt_logprobs"):
        count = getattr(params, name)
        if count is not None and count > vocab_size:
            raise GenerationError(
                f"SamplingParams.{name} asks for {count} top log-probabilities, more than the "
                f"model's vocabulary of {vocab_size} tokens"
            )
