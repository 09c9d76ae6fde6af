"""Tests for tulu.engine.reference: generate_ids / generate_text, the single-sequence generator.

Two kinds of model are used:
- a tiny random GPT-NeoX (our own model, CPU float32) for greedy/KV-cache/sampling/logprob
  checks against plain full-forward recomputation;
- `ScriptedModel`, a GPT-NeoX subclass whose forward returns scripted logits, so that a test
  can make it emit exactly the tokens it needs (an EOS, a stop token, a stop string split over
  several tokens, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest
import torch

from engine.conftest import random_model, scripted_config, tiny_config
from helpers import train_tiny_bpe
from tulu.chat import generation_prompt
from tulu.engine.reference import GenerationResult, generate_ids, generate_text
from tulu.engine.sampling import SamplingParams
from tulu.errors import GenerationError, TuluError
from tulu.model import ContiguousKVCache, GPTNeoXForCausalLM, preset
from tulu.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

EOT = "<|endoftext|>"
GREEDY = {"temperature": 0.0}

TRAIN_TEXT = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "User: how are you? Assistant: fine, thanks. ###END### done",
    "<|user|>\nWhat is 2+2?\n<|assistant|>\nIt is 4.",
] * 3


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


def small_model(seed: int = 0, **config) -> GPTNeoXForCausalLM:
    """conftest's tiny random model at this module's sizes (vocab 384, context window 128) with
    Pythia's own initializer range and unperturbed norms: the weights these tests were written
    against. `config` overrides NeoXConfig fields."""
    fields = {"vocab_size": 384, "max_positions": 128, "initializer_range": 0.02, **config}
    return random_model(tiny_config(**fields), seed, perturb=False)


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    """Tiny random GPT-NeoX, vocab 384, window 128."""
    return small_model()


@pytest.fixture(scope="module")
def small_window_model() -> GPTNeoXForCausalLM:
    """Tiny random GPT-NeoX with a 16-token context window."""
    return small_model(seed=1, max_positions=16)


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    """A byte-level BPE trained here (vocab 300, <|endoftext|> = 0): always available."""
    return Tokenizer(train_tiny_bpe(TRAIN_TEXT), source="<tiny test BPE>")


Script = Callable[[int], Mapping[int, float]]


class ScriptedModel(GPTNeoXForCausalLM):
    """A GPT-NeoX whose logits are scripted: the logits that predict generated token number
    `step` (0-based) are 0 everywhere except the entries `script(step)` gives.

    The step is derived from the positions the generator passes, so the KV cache (`backend`)
    is never needed; the tiny trunk only provides `config` and `parameters()`.
    """

    def __init__(
        self,
        script: Script,
        prompt_len: int,
        *,
        vocab_size: int = 64,
        max_positions: int = 256,
        eos_token_id: int = 0,
    ):
        super().__init__(scripted_config(vocab_size, max_positions, eos_token_id))
        self.script = script
        self.prompt_len = prompt_len
        self.calls: list[tuple[int, int]] = []  # (first position, number of tokens) per call

    def forward(self, input_ids, position_ids=None, *, backend=None, logits_to_keep=0, **kwargs):
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t).expand(b, t)
        self.calls.append((int(position_ids[0, 0]), t))
        logits = torch.zeros(b, t, self.config.vocab_size)
        for j in range(t):
            step = int(position_ids[0, j]) + 1 - self.prompt_len
            if step >= 0:
                for token, value in self.script(step).items():
                    logits[:, j, token] = value
        return logits[:, -logits_to_keep:] if logits_to_keep > 0 else logits


def emit(tokens: Sequence[int], then: int) -> Script:
    """A script that emits `tokens` in order, then `then` forever."""

    def script(step: int) -> dict[int, float]:
        return {tokens[step] if step < len(tokens) else then: 20.0}

    return script


def full_logits(model: GPTNeoXForCausalLM, ids: Sequence[int]) -> torch.Tensor:
    """Cache-free full forward: logits [T, V] for the whole sequence."""
    with torch.no_grad():
        return model(torch.tensor([list(ids)]))[0].float()


def greedy_loop(model: GPTNeoXForCausalLM, prompt: Sequence[int], n: int) -> list[int]:
    """The obvious greedy decoder: recompute the whole sequence every step, take the argmax."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    return ids[len(prompt) :]


def collect(fn: Callable[..., GenerationResult], *args, **kwargs) -> tuple[GenerationResult, list]:
    deltas: list[str] = []
    result = fn(*args, on_text=deltas.append, **kwargs)
    return result, deltas


# ----------------------------------------------------------------------------------------------
# Greedy decoding and the KV cache
# ----------------------------------------------------------------------------------------------

PROMPTS = [[7], [3, 14, 15, 92, 65], list(range(40, 57))]


def test_greedy_is_deterministic(model: GPTNeoXForCausalLM) -> None:
    params = SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY)
    first = generate_ids(model, PROMPTS[1], params)
    second = generate_ids(model, PROMPTS[1], params)
    assert first.token_ids == second.token_ids
    assert len(first.token_ids) == 16


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"len{len(p)}")
def test_greedy_matches_uncached_argmax_loop(model: GPTNeoXForCausalLM, prompt: list[int]) -> None:
    result = generate_ids(model, prompt, SamplingParams(max_tokens=32, ignore_eos=True, **GREEDY))
    assert result.prompt_token_ids == prompt
    assert result.token_ids == greedy_loop(model, prompt, 32)
    assert result.finish_reason == "length"
    assert result.stop_reason is None
    assert result.text is None  # no tokenizer, no text
    assert result.logprobs is None


def test_greedy_stops_at_config_eos_without_tokenizer(model: GPTNeoXForCausalLM) -> None:
    """Without a tokenizer, the config's eos_token_id ends generation: pick it to be the token
    greedy decoding produces third."""
    prompt = PROMPTS[1]
    expected = greedy_loop(model, prompt, 3)
    eos = expected[2]
    assert eos not in expected[:2]
    eos_model = small_model(eos_token_id=eos)
    result = generate_ids(eos_model, prompt, SamplingParams(max_tokens=20, **GREEDY))
    assert result.token_ids == expected
    assert result.finish_reason == "stop"
    assert result.stop_reason == eos


def _cached_logits(model, ids: list[int], chunks: Sequence[int], batch: int = 1) -> torch.Tensor:
    """Feed `ids` through a ContiguousKVCache in chunks of the given sizes, then one token at a
    time; return the logits of every position, [batch, T, V]."""
    config = model.config
    cache = ContiguousKVCache(config, batch, len(ids), torch.float32, "cpu")
    sizes = list(chunks) + [1] * (len(ids) - sum(chunks))
    out, pos = [], 0
    with torch.no_grad():
        for size in sizes:
            x = torch.tensor([ids[pos : pos + size]] * batch)
            positions = torch.arange(pos, pos + size).expand(batch, size)
            out.append(model(x, positions, backend=cache))
            cache.advance(size)
            pos += size
    assert cache.seq_len == len(ids)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "chunks",
    [[10], [1], [4, 6], [3, 3, 4]],
    ids=["prefill10", "token-by-token", "chunked-4-6", "chunked-3-3-4"],
)
def test_kv_cache_logits_match_full_forward(model: GPTNeoXForCausalLM, chunks: list[int]) -> None:
    ids = [int(t) for t in torch.randint(0, 384, (16,), generator=torch.Generator().manual_seed(3))]
    reference = full_logits(model, ids)
    cached = _cached_logits(model, ids, chunks)[0]
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)


def test_kv_cache_batch_rows_match_full_forward(model: GPTNeoXForCausalLM) -> None:
    ids = list(range(100, 112))
    cached = _cached_logits(model, ids, [5], batch=2)
    reference = full_logits(model, ids)
    torch.testing.assert_close(cached[0], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached[1], reference, atol=1e-5, rtol=0)


def test_kv_cache_overflow_is_an_error(model: GPTNeoXForCausalLM) -> None:
    cache = ContiguousKVCache(model.config, 1, 4, torch.float32, "cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match="overflow"):
        model(torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5)[None], backend=cache)


def test_generation_prefills_once_then_decodes_one_token_at_a_time() -> None:
    scripted = ScriptedModel(emit([5, 6, 7, 8], then=9), prompt_len=3)
    result = generate_ids(scripted, [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))
    assert result.token_ids == [5, 6, 7, 8]
    # The last token is never fed back: 1 prefill call + 3 decode calls.
    assert scripted.calls == [(0, 3), (3, 1), (4, 1), (5, 1)]


# ----------------------------------------------------------------------------------------------
# Stopping: EOS, stop tokens, stop strings, min_tokens, max_tokens
# ----------------------------------------------------------------------------------------------


def test_eos_stops_without_tokenizer() -> None:
    scripted = ScriptedModel(emit([5, 6, 0, 7], then=8), prompt_len=2, eos_token_id=0)
    result = generate_ids(scripted, [1, 2], SamplingParams(max_tokens=10, **GREEDY))
    assert result.token_ids == [5, 6, 0]
    assert result.finish_reason == "stop"
    assert result.stop_reason == 0


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_eos_stops_and_is_not_in_the_text(tok: Tokenizer, skip_special_tokens: bool) -> None:
    body = tok.encode("Hello world")
    eos = tok.eos_token_id
    prompt = tok.encode("User:")
    scripted = ScriptedModel(
        emit(body + [eos], then=body[0]), len(prompt), vocab_size=tok.vocab_size
    )
    params = SamplingParams(max_tokens=50, skip_special_tokens=skip_special_tokens, **GREEDY)
    result, deltas = collect(generate_ids, scripted, prompt, params, tokenizer=tok)
    assert result.token_ids == body + [eos]
    assert result.finish_reason == "stop"
    assert result.stop_reason == eos
    assert result.text == "Hello world"
    assert "".join(deltas) == result.text


def test_tokenizer_eos_takes_precedence_over_config_eos(tiny_tok: Tokenizer) -> None:
    """With a tokenizer, its EOS id ends generation (the config's is not consulted)."""
    body = tiny_tok.encode("Hello")
    scripted = ScriptedModel(
        emit(body + [5, tiny_tok.eos_token_id], then=1),
        1,
        vocab_size=tiny_tok.vocab_size,
        eos_token_id=5,
    )
    result = generate_ids(
        scripted, [1], SamplingParams(max_tokens=20, **GREEDY), tokenizer=tiny_tok
    )
    assert result.token_ids == body + [5, tiny_tok.eos_token_id]
    assert result.stop_reason == tiny_tok.eos_token_id


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_ignore_eos_runs_to_max_tokens(tiny_tok: Tokenizer, skip_special_tokens: bool) -> None:
    eos = tiny_tok.eos_token_id
    hi = tiny_tok.encode("Hi")
    scripted = ScriptedModel(emit(hi + [eos], then=eos), 1, vocab_size=tiny_tok.vocab_size)
    params = SamplingParams(
        max_tokens=6, ignore_eos=True, skip_special_tokens=skip_special_tokens, **GREEDY
    )
    result = generate_ids(scripted, [1], params, tokenizer=tiny_tok)
    assert len(result.token_ids) == 6
    assert result.token_ids == hi + [eos] * (6 - len(hi))
    assert result.finish_reason == "length"
    assert result.stop_reason is None
    assert result.text == ("Hi" if skip_special_tokens else "Hi" + EOT * (6 - len(hi)))


def test_ignore_eos_without_tokenizer() -> None:
    scripted = ScriptedModel(emit([], then=0), prompt_len=1, eos_token_id=0)
    result = generate_ids(scripted, [1], SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY))
    assert result.token_ids == [0] * 5
    assert result.finish_reason == "length"


def test_stop_token_ids() -> None:
    scripted = ScriptedModel(emit([5, 6, 7, 8], then=9), prompt_len=1)
    params = SamplingParams(max_tokens=10, stop_token_ids=[7, 30], **GREEDY)
    result = generate_ids(scripted, [1], params)
    assert result.token_ids == [5, 6, 7]
    assert result.finish_reason == "stop"
    assert result.stop_reason == 7


def test_stop_token_ids_still_apply_with_ignore_eos() -> None:
    scripted = ScriptedModel(emit([0, 0, 7, 8], then=9), prompt_len=1, eos_token_id=0)
    params = SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[7], **GREEDY)
    result = generate_ids(scripted, [1], params)
    assert result.token_ids == [0, 0, 7]
    assert result.stop_reason == 7


def test_stop_token_is_not_in_the_text(tiny_tok: Tokenizer) -> None:
    body = tiny_tok.encode("Hello world")
    stop_id = tiny_tok.encode(".")[0]
    scripted = ScriptedModel(emit(body + [stop_id], then=1), 1, vocab_size=tiny_tok.vocab_size)
    params = SamplingParams(max_tokens=30, stop_token_ids=[stop_id], **GREEDY)
    result = generate_ids(scripted, [1], params, tokenizer=tiny_tok)
    assert result.stop_reason == stop_id
    assert result.text == "Hello world"


STOP_TEXT = "Hello world\n\nUser: how are you"
STOP = "\n\nUser:"


def _stop_string_run(tok: Tokenizer, *, include: bool, max_tokens: int = 50):
    body = tok.encode(STOP_TEXT)
    prompt = tok.encode("Say hi.")
    scripted = ScriptedModel(emit(body, then=body[-1]), len(prompt), vocab_size=tok.vocab_size)
    params = SamplingParams(
        max_tokens=max_tokens, stop=[STOP, "###"], include_stop_str_in_output=include, **GREEDY
    )
    result, deltas = collect(generate_ids, scripted, prompt, params, tokenizer=tok)
    return body, result, deltas


def _completing_token(tok: Tokenizer, ids: list[int], text: str) -> int:
    """Number of tokens of `ids` needed for the decoded text to contain `text`."""
    for k in range(1, len(ids) + 1):
        if text in tok.decode(ids[:k]):
            return k
    raise AssertionError(f"{text!r} never appears")


def test_stop_string_across_tokens(tok: Tokenizer) -> None:
    body, result, deltas = _stop_string_run(tok, include=False)
    needed = _completing_token(tok, body, STOP)
    first = _completing_token(tok, body, STOP[0])
    assert needed - first >= 2, "the stop string must span several tokens"
    assert result.finish_reason == "stop"
    assert result.stop_reason == STOP
    assert result.text == "Hello world"
    # Generation ends on the token that completes the stop string.
    assert result.token_ids == body[:needed]
    # Streaming: the deltas rebuild the text, and no delta ever held part of the stop string.
    assert "".join(deltas) == result.text
    assert all(not set(d) & set("\n:U") for d in deltas)


def test_stop_string_included_in_output(tok: Tokenizer) -> None:
    body, result, deltas = _stop_string_run(tok, include=True)
    assert result.finish_reason == "stop"
    assert result.stop_reason == STOP
    assert result.text == "Hello world" + STOP
    assert "".join(deltas) == result.text
    assert result.token_ids == body[: _completing_token(tok, body, STOP)]


def test_stop_string_needs_a_tokenizer() -> None:
    scripted = ScriptedModel(emit([5], then=6), prompt_len=1)
    with pytest.raises(GenerationError, match="tokenizer"):
        generate_ids(scripted, [1], SamplingParams(stop=["x"], **GREEDY))


def test_stop_string_not_reached_before_max_tokens(tok: Tokenizer) -> None:
    body, result, deltas = _stop_string_run(tok, include=False, max_tokens=3)
    assert result.finish_reason == "length"
    assert result.stop_reason is None
    assert result.token_ids == body[:3]
    assert result.text == tok.decode(body[:3])
    assert "".join(deltas) == result.text


def test_min_tokens_blocks_eos_until_reached(tiny_tok: Tokenizer) -> None:
    eos = tiny_tok.eos_token_id
    other = tiny_tok.encode("a")[0]
    # EOS is always the most likely token, `other` the runner-up.
    scripted = ScriptedModel(
        lambda step: {eos: 20.0, other: 10.0}, 1, vocab_size=tiny_tok.vocab_size
    )
    for min_tokens in (0, 1, 3):
        params = SamplingParams(max_tokens=10, min_tokens=min_tokens, **GREEDY)
        result = generate_ids(scripted, [1], params, tokenizer=tiny_tok)
        assert result.token_ids == [other] * min_tokens + [eos], min_tokens
        assert result.finish_reason == "stop"
        assert result.stop_reason == eos
        assert result.text == "a" * min_tokens


def test_min_tokens_blocks_stop_token_ids() -> None:
    scripted = ScriptedModel(lambda step: {7: 20.0, 0: 15.0, 5: 10.0}, 1, eos_token_id=0)
    params = SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[7], **GREEDY)
    result = generate_ids(scripted, [1], params)
    assert result.token_ids == [5, 5, 7]
    assert result.stop_reason == 7


def test_min_tokens_with_sampling_never_ends_early() -> None:
    scripted = ScriptedModel(lambda step: {0: 5.0, 3: 4.0, 4: 4.0}, 1, eos_token_id=0)
    for seed in range(5):
        params = SamplingParams(max_tokens=8, min_tokens=4, temperature=1.0, seed=seed)
        result = generate_ids(scripted, [1], params)
        assert 0 not in result.token_ids[:4]
        assert len(result.token_ids) >= 4


def test_out_of_vocab_stop_token_id_is_handled_the_same_with_min_tokens(
    model: GPTNeoXForCausalLM,
) -> None:
    outcomes = []
    for min_tokens in (0, 1):
        params = SamplingParams(
            max_tokens=3, min_tokens=min_tokens, stop_token_ids=[1000], ignore_eos=True, **GREEDY
        )
        try:
            generate_ids(model, [1, 2], params)
            outcomes.append("ok")
        except GenerationError as exc:
            outcomes.append("stop_token_ids" in str(exc))
    # Always rejected, with a message naming the field.
    assert outcomes == [True, True], outcomes


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_max_tokens_is_exact(model: GPTNeoXForCausalLM, max_tokens: int) -> None:
    result = generate_ids(
        model, [5, 6], SamplingParams(max_tokens=max_tokens, ignore_eos=True, **GREEDY)
    )
    assert len(result.token_ids) == max_tokens
    assert result.finish_reason == "length"


def test_penalties_see_the_generated_tokens() -> None:
    """frequency_penalty must count each generated token as it is produced."""
    scripted = ScriptedModel(lambda step: {5: 1.0, 6: 0.9, 7: 0.8}, 1)
    params = SamplingParams(max_tokens=4, frequency_penalty=0.15, ignore_eos=True, **GREEDY)
    result = generate_ids(scripted, [1], params)
    # 5 (1.0) -> 6 (0.9 > 0.85) -> 5 (0.85 > 0.8 > 0.75) -> 7 (0.8 > 0.75 > 0.7)
    assert result.token_ids == [5, 6, 5, 7]


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------


def test_streaming_deltas_rebuild_the_text(tiny_tok: Tokenizer) -> None:
    m = small_model(seed=4, vocab_size=tiny_tok.vocab_size)
    prompt = tiny_tok.encode("Hello world.")
    params = SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    result, deltas = collect(generate_ids, m, prompt, params, tokenizer=tiny_tok)
    assert "".join(deltas) == result.text == tiny_tok.decode(result.token_ids, True)
    assert len(deltas) > 1, "text must be streamed, not delivered at the end"
    assert all(deltas)


def test_streaming_with_a_stop_string_from_a_real_generation(tiny_tok: Tokenizer) -> None:
    """Generate greedily, pick a piece of the output spanning several tokens as the stop
    string, and generate again: it stops there and the stream never shows the stop."""
    m = small_model(seed=4, vocab_size=tiny_tok.vocab_size)
    prompt = tiny_tok.encode("Hello world.")
    base = generate_ids(
        m, prompt, SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY), tokenizer=tiny_tok
    )
    ids = base.token_ids
    full = base.text
    # A piece of the output made of whole characters and spanning 3 tokens: the stop string.
    clean = [k for k in range(len(ids) + 1) if "\ufffd" not in tiny_tok.decode(ids[:k])[-1:]]
    windows = [
        (a, b)
        for a in clean
        for b in clean
        if b - a == 3 and len(tiny_tok.decode(ids[:b])) - len(tiny_tok.decode(ids[:a])) >= 3
    ]
    assert windows, f"no usable stop window in {full!r}"
    a, b = windows[len(windows) // 2]
    stop = tiny_tok.decode(ids[:b])[len(tiny_tok.decode(ids[:a])) :]
    assert "\ufffd" not in stop
    at = full.find(stop)
    params = SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop], **GREEDY)
    result, deltas = collect(generate_ids, m, prompt, params, tokenizer=tiny_tok)
    assert result.finish_reason == "stop"
    assert result.stop_reason == stop
    assert result.text == full[:at]
    assert "".join(deltas) == result.text
    shown = ""
    for delta in deltas:
        shown += delta
        assert full[:at].startswith(shown)
    assert len(result.token_ids) <= b


def test_streaming_on_text_not_called_with_empty_strings(tok: Tokenizer) -> None:
    body = tok.encode("Party 🎉 time")
    scripted = ScriptedModel(emit(body, then=body[0]), 1, vocab_size=tok.vocab_size)
    params = SamplingParams(max_tokens=len(body), **GREEDY)
    result, deltas = collect(generate_ids, scripted, [1], params, tokenizer=tok)
    assert result.text == "Party 🎉 time" == "".join(deltas)
    assert all(d and "\ufffd" not in d for d in deltas)


def test_streaming_releases_held_text_at_max_tokens(tiny_tok: Tokenizer) -> None:
    body = tiny_tok.encode("Hello world\n\nUs")
    scripted = ScriptedModel(emit(body, then=1), 1, vocab_size=tiny_tok.vocab_size)
    params = SamplingParams(max_tokens=len(body), stop=[STOP], **GREEDY)
    result, deltas = collect(generate_ids, scripted, [1], params, tokenizer=tiny_tok)
    assert result.finish_reason == "length"
    assert result.text == "Hello world\n\nUs" == "".join(deltas)


# ----------------------------------------------------------------------------------------------
# Context window and invalid prompts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [16, 17, 40])
def test_prompt_filling_the_window_is_an_error(
    small_window_model: GPTNeoXForCausalLM, length: int
) -> None:
    with pytest.raises(GenerationError) as info:
        generate_ids(small_window_model, [3] * length, SamplingParams(max_tokens=1))
    message = str(info.value)
    assert str(length) in message
    assert "16" in message
    assert isinstance(info.value, TuluError)


@pytest.mark.parametrize(("length", "expected"), [(15, 1), (14, 2), (10, 6)])
def test_generation_stops_at_the_window(
    small_window_model: GPTNeoXForCausalLM, length: int, expected: int
) -> None:
    params = SamplingParams(max_tokens=50, ignore_eos=True, **GREEDY)
    result = generate_ids(small_window_model, list(range(1, length + 1)), params)
    assert len(result.token_ids) == expected
    assert length + len(result.token_ids) == 16
    assert result.finish_reason == "length"


def test_window_limit_with_sampling_and_logprobs(small_window_model: GPTNeoXForCausalLM) -> None:
    params = SamplingParams(max_tokens=50, ignore_eos=True, seed=3, logprobs=2)
    result = generate_ids(small_window_model, list(range(1, 13)), params)
    assert len(result.token_ids) == 4
    assert len(result.logprobs) == 4


def test_empty_prompt_is_an_error(model: GPTNeoXForCausalLM, tiny_tok: Tokenizer) -> None:
    with pytest.raises(GenerationError, match="empty"):
        generate_ids(model, [], SamplingParams())
    m = small_model(vocab_size=tiny_tok.vocab_size)
    with pytest.raises(GenerationError, match="empty"):
        generate_text(m, tiny_tok, "", SamplingParams(), chat=False)


@pytest.mark.parametrize("bad", [384, 10_000, -1])
def test_token_id_outside_the_vocabulary_is_an_error(model: GPTNeoXForCausalLM, bad: int) -> None:
    with pytest.raises(GenerationError) as info:
        generate_ids(model, [1, 2, bad, 3], SamplingParams(max_tokens=1))
    assert str(bad) in str(info.value)
    assert "384" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Sampling: seeds and log-probabilities
# ----------------------------------------------------------------------------------------------


def _sampled(model, seed, **kwargs) -> list[int]:
    params = SamplingParams(max_tokens=16, ignore_eos=True, seed=seed, **kwargs)
    return generate_ids(model, [10, 20, 30], params).token_ids


def test_same_seed_same_tokens(model: GPTNeoXForCausalLM) -> None:
    first = _sampled(model, 1234)
    torch.manual_seed(999)  # the request's own generator must not depend on the global RNG
    second = _sampled(model, 1234)
    assert first == second
    assert len(first) == 16


def test_different_seed_different_tokens(model: GPTNeoXForCausalLM) -> None:
    # The random model is close to uniform over 384 tokens: 16 equal draws are impossible
    # in practice.
    assert _sampled(model, 1) != _sampled(model, 2)


def test_sampling_is_not_greedy(model: GPTNeoXForCausalLM) -> None:
    greedy = generate_ids(
        model, [10, 20, 30], SamplingParams(max_tokens=16, ignore_eos=True, **GREEDY)
    ).token_ids
    assert _sampled(model, 5) != greedy


def test_seed_none_uses_the_global_rng(model: GPTNeoXForCausalLM) -> None:
    torch.manual_seed(7)
    first = _sampled(model, None)
    torch.manual_seed(7)
    second = _sampled(model, None)
    assert first == second
    assert len(first) == 16 and all(0 <= t < 384 for t in first)


def test_top_k_one_equals_greedy(model: GPTNeoXForCausalLM) -> None:
    greedy = generate_ids(
        model, [10, 20, 30], SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)
    ).token_ids
    params = SamplingParams(max_tokens=12, ignore_eos=True, top_k=1, seed=0)
    assert generate_ids(model, [10, 20, 30], params).token_ids == greedy


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0},
        {"temperature": 0.7, "seed": 11},
        {"temperature": 1.3, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 12},
    ],
    ids=["greedy", "t0.7", "penalised"],
)
def test_logprobs_match_full_forward(model: GPTNeoXForCausalLM, params: dict) -> None:
    prompt = [10, 20, 30, 40]
    n_top = 5
    result = generate_ids(
        model,
        prompt,
        SamplingParams(max_tokens=12, ignore_eos=True, logprobs=n_top, **params),
    )
    assert result.logprobs is not None
    assert len(result.logprobs) == len(result.token_ids) == 12
    # Log-probabilities describe the raw model: log_softmax of a plain full forward.
    reference = torch.log_softmax(full_logits(model, prompt + result.token_ids), dim=-1)
    for i, entry in enumerate(result.logprobs):
        row = reference[len(prompt) - 1 + i]
        assert entry.token_id == result.token_ids[i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert len(entry.top) == n_top
        values = [lp for _, lp in entry.top]
        assert values == sorted(values, reverse=True)
        expected_values, expected_ids = row.topk(n_top)
        assert values == pytest.approx(expected_values.tolist(), abs=1e-4)
        for token_id, lp in entry.top:
            assert lp == pytest.approx(float(row[token_id]), abs=1e-4)
        assert [t for t, _ in entry.top][0] == int(expected_ids[0])
        assert entry.logprob <= values[0] + 1e-6
        if params["temperature"] == 0.0:
            assert entry.token_id == entry.top[0][0]


def test_logprobs_zero_returns_only_the_chosen_token(model: GPTNeoXForCausalLM) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=0, **GREEDY)
    result = generate_ids(model, [1, 2], params)
    assert len(result.logprobs) == 4
    assert all(entry.top == [] for entry in result.logprobs)
    assert all(entry.logprob < 0 for entry in result.logprobs)


def test_logprobs_are_raw_even_when_min_tokens_masks_eos() -> None:
    scripted = ScriptedModel(lambda step: {0: 20.0, 5: 10.0}, 1, vocab_size=32, eos_token_id=0)
    params = SamplingParams(max_tokens=5, min_tokens=2, logprobs=2, **GREEDY)
    result = generate_ids(scripted, [1], params)
    assert result.token_ids == [5, 5, 0]
    assert len(result.logprobs) == 3
    expected = torch.log_softmax(torch.tensor([20.0, 10.0] + [0.0] * 30), dim=0)
    for entry in result.logprobs:
        assert entry.top[0][0] == 0  # EOS still the model's favourite
        assert entry.top[0][1] == pytest.approx(float(expected[0]), abs=1e-5)
        assert entry.top[1][0] == 5
    assert result.logprobs[0].logprob == pytest.approx(float(expected[1]), abs=1e-5)


def test_logprobs_entry_for_the_stop_token() -> None:
    scripted = ScriptedModel(emit([5, 0], then=6), 1, eos_token_id=0)
    result = generate_ids(scripted, [1], SamplingParams(max_tokens=5, logprobs=1, **GREEDY))
    assert result.token_ids == [5, 0]
    assert [e.token_id for e in result.logprobs] == [5, 0]


# ----------------------------------------------------------------------------------------------
# generate_text: chat rendering
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neox_model() -> GPTNeoXForCausalLM:
    """A random model with the GPT-NeoX vocabulary size (hidden 32, one layer: fast)."""
    config = preset(
        "pythia-14m",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        torch_dtype="float32",
        max_position_embeddings=256,
    )
    assert config.vocab_size >= 50278
    return random_model(config, seed=2, perturb=False)


@pytest.fixture
def text_model(tok: Tokenizer, request: pytest.FixtureRequest) -> GPTNeoXForCausalLM:
    if tok.vocab_size > 1000:
        return request.getfixturevalue("neox_model")
    return small_model(seed=2, vocab_size=tok.vocab_size)


CHAT_PARAMS = SamplingParams(max_tokens=3, **GREEDY)


def test_chat_string_is_one_user_message(tok: Tokenizer, text_model: GPTNeoXForCausalLM) -> None:
    result = generate_text(text_model, tok, "What is 2+2?", CHAT_PARAMS)
    assert result.prompt_token_ids == tok.encode("<|user|>\nWhat is 2+2?\n<|assistant|>\n")
    assert 1 <= len(result.token_ids) <= 3
    assert isinstance(result.text, str)


def test_chat_false_uses_the_raw_text(tok: Tokenizer, text_model: GPTNeoXForCausalLM) -> None:
    raw = "What is 2+2?"
    result = generate_text(text_model, tok, raw, CHAT_PARAMS, chat=False)
    assert result.prompt_token_ids == tok.encode(raw)


def test_chat_messages_with_system(tok: Tokenizer, text_model: GPTNeoXForCausalLM) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    result = generate_text(text_model, tok, messages, CHAT_PARAMS)
    rendered = generation_prompt(messages, tok.eos_token)
    assert rendered == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!"
        + EOT
        + "\n<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    )
    assert result.prompt_token_ids == tok.encode(rendered)
    # chat=False does not apply to messages: they are always rendered.
    again = generate_text(text_model, tok, messages, CHAT_PARAMS, chat=False)
    assert again.prompt_token_ids == result.prompt_token_ids


def test_generate_text_equals_generate_ids(tok: Tokenizer, text_model: GPTNeoXForCausalLM) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY)
    via_text, deltas = collect(generate_text, text_model, tok, "Hi", params)
    prompt = tok.encode("<|user|>\nHi\n<|assistant|>\n")
    via_ids = generate_ids(text_model, prompt, params, tokenizer=tok)
    assert via_text.token_ids == via_ids.token_ids
    assert via_text.text == via_ids.text == "".join(deltas)
