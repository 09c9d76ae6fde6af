"""The reference generator: one sequence at a time, a contiguous KV cache, no scheduling.

It is deliberately simple so that it can serve as the yardstick for the batched engine
(greedy outputs must match it token for token) and as the generator behind `tulu generate` and
`tulu chat` until the engine takes over. Sampling, penalties, stops and logprobs use the same
code as the engine (`tulu.engine.sampling`, `tulu.engine.output`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tulu.chat import Message, generation_prompt
from tulu.engine.output import IncrementalOutput
from tulu.engine.sampling import (
    SamplingParams,
    bad_word_bans,
    bad_word_token_ids,
    check_bad_words_leave_a_token,
    check_min_tokens_reachable,
    check_token_ids_in_vocab,
    compute_logprobs,
    make_generator,
    mask_tokens,
    prepare_sampling_tensors,
    sample,
)
from tulu.engine.structured import apply_grammar_masks, matchers_for
from tulu.errors import GenerationError
from tulu.model.gpt_neox import ContiguousKVCache, GPTNeoXForCausalLM
from tulu.tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None


def check_prompt_length(
    num_prompt_tokens: int, context_window: int, window_name: str = "the model's context window"
) -> None:
    """A prompt must leave room for at least one new token inside the context window (or
    a smaller cap of it, named by `window_name`)."""
    if num_prompt_tokens == 0:
        raise GenerationError("the prompt is empty (0 tokens)")
    if num_prompt_tokens >= context_window:
        raise GenerationError(
            f"the prompt has {num_prompt_tokens} tokens but {window_name} is "
            f"{context_window} tokens (prompt and output together)"
        )


@torch.inference_mode()
def generate_ids(
    model: GPTNeoXForCausalLM,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    tokenizer: Tokenizer | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate a continuation of `prompt_ids`.

    Stops at the end-of-sequence token (unless `ignore_eos`), at `stop_token_ids`, at `stop`
    strings (needs `tokenizer`; matched on text, so across token boundaries), after
    `max_tokens`, or at the end of the context window. `on_text` receives text deltas as they
    become final (never part of a stop string), for streaming.
    """
    config = model.config
    prompt = [int(t) for t in prompt_ids]
    window = config.max_position_embeddings
    check_prompt_length(len(prompt), window)
    if params.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer to match text")
    check_token_ids_in_vocab(params, config.vocab_size)
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise GenerationError(
            f"prompt token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})"
        )

    param = next(model.parameters())
    device = param.device
    eos_id = tokenizer.eos_token_id if tokenizer is not None else config.eos_token_id
    check_min_tokens_reachable(params, eos_id)
    bad_words = bad_word_token_ids(params.bad_words, tokenizer, config.vocab_size)
    check_bad_words_leave_a_token(params, bad_words, eos_id)
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos and eos_id is not None:
        stop_ids.add(eos_id)
    budget = min(params.max_tokens, window - len(prompt))

    output = (
        IncrementalOutput(
            tokenizer,
            prompt,
            params.stop,
            include_stop=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
            min_tokens=params.min_tokens,
        )
        if tokenizer is not None
        else None
    )
    tensors = prepare_sampling_tensors(
        [params],
        device,
        vocab_size=config.vocab_size,
        prompt_token_ids=[prompt],
        output_token_ids=[[]],
    )
    generator = make_generator(params.seed, device)
    matcher = None
    if params.structured_output is not None:
        (matcher,) = matchers_for(params.structured_output, 1, tokenizer, config.vocab_size, eos_id)
    cache = ContiguousKVCache(config, 1, len(prompt) + budget, param.dtype, device)

    tokens: list[int] = []
    logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
    finish, stop_reason = "length", None
    input_ids = torch.tensor([prompt], device=device)
    position = 0
    while len(tokens) < budget:
        positions = torch.arange(position, position + input_ids.shape[1], device=device)[None]
        logits = model(input_ids, positions, backend=cache, logits_to_keep=1)[:, -1].float()
        cache.advance(input_ids.shape[1])
        position += input_ids.shape[1]
        raw = logits
        if matcher is not None:
            logits = apply_grammar_masks(logits, [matcher])
        banned = sorted(stop_ids) if len(tokens) < params.min_tokens else []
        banned += bad_word_bans(tokens, bad_words)
        if banned:
            logits = mask_tokens(logits, [banned])
        token = int(sample(logits, tensors, [generator])[0])
        if matcher is not None and not matcher.accept_token(token):
            finish = "stop"  # the grammar allowed no token (a dead end): end without it
            break
        tokens.append(token)
        if tensors.output_counts is not None:
            tensors.output_counts[0, token] += 1
        if logprobs is not None:
            chosen, top_ids, top_lp = compute_logprobs(
                raw, torch.tensor([token], device=device), params.logprobs
            )
            logprobs.append(
                TokenLogprob(
                    token,
                    float(chosen[0]),
                    list(zip(top_ids[0].tolist(), top_lp[0].tolist(), strict=True)),
                )
            )
        # A complete grammar has just taken the EOS: a stop, even with ignore_eos.
        if token in stop_ids or (matcher is not None and matcher.is_terminated()):
            finish, stop_reason = "stop", token
            if output is not None and params.include_stop_str_in_output:
                delta = output.push(token)  # as vLLM: the stop token's text is asked for
                if delta and on_text:
                    on_text(delta)
            break
        if output is not None:
            delta = output.push(token)
            if delta and on_text:
                on_text(delta)
            if output.stopped_by is not None:
                finish, stop_reason = "stop", output.stopped_by
                break
        input_ids = torch.tensor([[token]], device=device)

    text = None
    if output is not None:
        rest = output.finish()
        if rest and on_text:
            on_text(rest)
        if output.stopped_by is not None and finish != "stop":
            finish, stop_reason = "stop", output.stopped_by
        text = output.text
    return GenerationResult(prompt, tokens, text, finish, stop_reason, logprobs)


def generate_text(
    model: GPTNeoXForCausalLM,
    tokenizer: Tokenizer,
    prompt: str | Sequence[Message],
    params: SamplingParams,
    *,
    chat: bool = True,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate from text or chat messages.

    With `chat=True` a string is treated as one user message; messages are rendered in the
    Tulu format followed by "<|assistant|>\\n". With `chat=False` the string is used as is.
    """
    if isinstance(prompt, str):
        text = (
            generation_prompt([{"role": "user", "content": prompt}], tokenizer.eos_token)
            if chat
            else prompt
        )
    else:
        text = generation_prompt(list(prompt), tokenizer.eos_token)
    return generate_ids(model, tokenizer.encode(text), params, tokenizer=tokenizer, on_text=on_text)
