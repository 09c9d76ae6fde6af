"""The OpenAI routes through the real `openai` client against a real uvicorn server.

Greedy outputs must equal the reference generator's (chat rendered in the Tulu format), log-
probabilities must equal the model's, usage must count tokens exactly, and after every test
the engine must be idle with its whole KV pool free.
"""

from __future__ import annotations

import json
import math
import re
import time

import httpx
import openai
import pytest
import torch

from engine.conftest import CHOICES, GRAMMAR, REGEX, SCHEMA, ScriptedModel, script_table
from engine.conftest import satisfies as engine_satisfies
from helpers import mean_model_logprob
from tulu.chat import generation_prompt
from tulu.engine.reference import generate_ids, generate_text
from tulu.engine.sampling import SamplingParams
from tulu.token_strings import TokenStrings, byte_level_alphabet

API_KEY = "test-key"
MODEL = "tiny"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(launch_server):
    running = launch_server(api_key=API_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.openai() as c:
        yield c


@pytest.fixture(autouse=True)
def _idle_after_each_test(server):
    yield
    server.wait_idle()
    assert server.pool.num_used == 0


@pytest.fixture(scope="module")
def tok(server):
    return server.tokenizer


@pytest.fixture(scope="module")
def model(server):
    return server.model


def greedy(**overrides) -> SamplingParams:
    return SamplingParams(temperature=0, **overrides)


def prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain full forward over `ids`: [T, V]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def chat_prompt_ids(tok, messages) -> list[int]:
    return tok.encode(generation_prompt(messages, tok.eos_token))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


# ----------------------------------------------------------------------------------------------
# Greedy parity and usage
# ----------------------------------------------------------------------------------------------


def test_chat_greedy_matches_reference_with_exact_usage(client, model, tok):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24
    )
    ref = generate_text(model, tok, MESSAGES, greedy(max_tokens=24))
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    assert isinstance(reply.created, int)
    (choice,) = reply.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert choice.logprobs is None
    prompt_tokens = len(chat_prompt_ids(tok, MESSAGES))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == len(ref.token_ids)
    assert reply.usage.total_tokens == prompt_tokens + len(ref.token_ids)


def test_chat_content_parts_roles_and_max_completion_tokens(client, model, tok):
    parts = [
        {"type": "text", "text": "What is the capital"},
        {"type": "text", "text": "of France?"},
    ]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "Be brief."},  # OpenAI's new name for system
            {"role": "user", "content": parts, "name": "alice"},
        ],
        temperature=0,
        max_tokens=3,  # max_completion_tokens wins
        max_completion_tokens=9,
        extra_body={"ignore_eos": True},
    )
    ref = generate_text(
        model,
        tok,
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital\nof France?"},
        ],
        greedy(max_tokens=9, ignore_eos=True),
    )
    assert reply.choices[0].message.content == ref.text
    assert reply.usage.completion_tokens == 9
    assert reply.choices[0].finish_reason == "length"


def test_completion_greedy_matches_reference(client, model, tok):
    reply = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=20)
    ref = generate_text(model, tok, PROMPT, greedy(max_tokens=20), chat=False)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    (choice,) = reply.choices
    assert choice.text == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert reply.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert reply.usage.completion_tokens == len(ref.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(ref.token_ids)


def test_logit_bias_and_allowed_token_ids_match_the_reference(client, model, tok):
    """OpenAI's logit_bias (string keys, as the client sends them) and vLLM's
    allowed_token_ids reach the sampler: greedy outputs equal the reference generator's."""
    bias = {tok.encode(" the")[0]: 12.0, tok.encode(" fox")[0]: -100.0}
    allowed = sorted(set(tok.encode(" a b c the dog cat")))
    chat = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=8,
        logit_bias={str(k): v for k, v in bias.items()},
        extra_body={"ignore_eos": True},
    )
    ref = generate_text(
        model, tok, MESSAGES, greedy(max_tokens=8, ignore_eos=True, logit_bias=bias)
    )
    plain = generate_text(model, tok, MESSAGES, greedy(max_tokens=8, ignore_eos=True))
    assert chat.choices[0].message.content == ref.text != plain.text
    completion = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        temperature=0,
        max_tokens=8,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True},
    )
    ref = generate_text(
        model,
        tok,
        PROMPT,
        greedy(max_tokens=8, ignore_eos=True, allowed_token_ids=allowed),
        chat=False,
    )
    plain = generate_text(model, tok, PROMPT, greedy(max_tokens=8, ignore_eos=True), chat=False)
    assert completion.choices[0].text == ref.text != plain.text
    assert set(ref.token_ids) <= set(allowed)


def test_completion_default_max_tokens_is_16(client):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 16
    assert reply.choices[0].finish_reason == "length"


def test_completion_token_id_prompts_and_several_prompts(client, model, tok):
    ids_a, ids_b = tok.encode("Once upon a time"), tok.encode("Hello there")
    reply = client.completions.create(
        model=MODEL, prompt=[ids_a, ids_b], n=2, temperature=0, max_tokens=6
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    generated = 0
    for i, ids in enumerate((ids_a, ids_b)):
        ref = generate_ids(model, ids, greedy(max_tokens=6), tokenizer=tok)
        assert reply.choices[2 * i].text == ref.text
        assert reply.choices[2 * i + 1].text == ref.text
        generated += 2 * len(ref.token_ids)
    assert reply.usage.prompt_tokens == len(ids_a) + len(ids_b)  # once per prompt, not per n
    assert reply.usage.completion_tokens == generated  # every choice counts
    assert reply.usage.total_tokens == len(ids_a) + len(ids_b) + generated
    single = client.completions.create(model=MODEL, prompt=ids_b, temperature=0, max_tokens=6)
    assert single.choices[0].text == reply.choices[2].text
    several_strings = client.completions.create(
        model=MODEL, prompt=["Once upon a time", "Hello there"], temperature=0, max_tokens=6
    )
    assert [c.text for c in several_strings.choices] == [
        reply.choices[0].text,
        reply.choices[2].text,
    ]


# ----------------------------------------------------------------------------------------------
# Sampling: n, seeds
# ----------------------------------------------------------------------------------------------


def test_n_choices_are_indexed_and_seeded_reproducibly(client):
    def ask():
        return client.chat.completions.create(
            model=MODEL, messages=MESSAGES, n=3, temperature=1.0, seed=1234, max_tokens=12
        )

    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1, "the n samples should differ"
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, n=2, temperature=1.0, seed=7, max_tokens=10
    )
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, n=2, temperature=1.0, seed=7, max_tokens=10
    )
    assert [c.text for c in completion.choices] == [c.text for c in again.choices]


def test_seeded_sample_matches_reference(client, model, tok):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0.8, top_p=0.9, seed=99, max_tokens=12
    )
    ref = generate_text(
        model,
        tok,
        PROMPT,
        SamplingParams(temperature=0.8, top_p=0.9, seed=99, max_tokens=12),
        chat=False,
    )
    assert reply.choices[0].text == ref.text


def test_best_of_returns_the_n_samples_most_likely_per_token(client, model, tok):
    """best_of=5, n=2: the two of the five seeded samples (each reproduced alone by the
    reference generator from its sample seed) with the highest mean log-probability, best
    first, without log-probabilities (none were asked for); usage counts all five."""
    from tulu.engine.engine import sample_seed

    sampling = dict(temperature=1.3, seed=21, max_tokens=10)
    reply = client.completions.create(model=MODEL, prompt=PROMPT, n=2, best_of=5, **sampling)
    prompt_ids = tok.encode(PROMPT)
    samples = [
        generate_ids(
            model,
            prompt_ids,
            SamplingParams(temperature=1.3, seed=sample_seed(21, i), max_tokens=10),
            tokenizer=tok,
        ).token_ids
        for i in range(5)
    ]
    scores = [mean_model_logprob(model, prompt_ids, ids) for ids in samples]
    assert len(set(scores)) == 5, "the test needs five different samples"
    best = sorted(range(5), key=scores.__getitem__, reverse=True)[:2]
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [tok.decode(samples[i]) for i in best]
    assert all(c.logprobs is None for c in reply.choices)
    assert reply.usage.completion_tokens == sum(len(ids) for ids in samples)

    shown = client.completions.create(model=MODEL, prompt=PROMPT, best_of=5, logprobs=1, **sampling)
    assert shown.choices[0].text == tok.decode(samples[best[0]])
    token_logprobs = shown.choices[0].logprobs.token_logprobs
    assert sum(token_logprobs) / len(token_logprobs) == pytest.approx(scores[best[0]], abs=1e-4)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, server, tok):
    """vLLM's truncate_prompt_tokens: the reply is the one to the last N tokens alone, the
    usage counts N, echo returns what the model saw; -1 fits a prompt too long for the
    window; chat truncates the rendered conversation."""
    ids = tok.encode(PROMPT)
    keep = len(ids) - 2
    greedy_kwargs = dict(model=MODEL, max_tokens=6, temperature=0)
    cut = client.completions.create(
        prompt=PROMPT, echo=True, extra_body={"truncate_prompt_tokens": keep}, **greedy_kwargs
    )
    alone = client.completions.create(prompt=ids[-keep:], echo=True, **greedy_kwargs)
    assert cut.choices[0].text == alone.choices[0].text
    assert cut.choices[0].text.startswith(tok.decode(ids[-keep:]))
    assert cut.usage.prompt_tokens == keep

    window = server.service.max_model_len
    long_ids = (ids * window)[: window + 5]
    fitted = client.completions.create(
        prompt=long_ids,
        max_tokens=4,
        temperature=0,
        model=MODEL,
        extra_body={"truncate_prompt_tokens": -1},
    )
    assert fitted.usage.prompt_tokens == window - 4  # room left for the 4 new tokens

    chat_ids = chat_prompt_ids(tok, MESSAGES)
    chat = client.chat.completions.create(
        messages=MESSAGES, extra_body={"truncate_prompt_tokens": 7}, **greedy_kwargs
    )
    plain = client.completions.create(prompt=chat_ids[-7:], **greedy_kwargs)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == 7


@pytest.mark.parametrize("value", [0, -2, 10**6, True])
def test_bad_truncate_prompt_tokens_is_refused(client, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=MODEL, prompt=PROMPT, extra_body={"truncate_prompt_tokens": value}
        )
    assert "truncate_prompt_tokens" in err.value.message


def test_bad_words_reach_the_engine(client, model, tok):
    """vLLM's bad_words: the reply is the reference generator's with the word banned, and
    differs from the reply without it (the word was in it)."""
    greedy_kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    free = client.completions.create(**greedy_kwargs)
    word = next(w for w in free.choices[0].text.split() if w.isalpha())
    banned = client.completions.create(**greedy_kwargs, extra_body={"bad_words": [word]})
    params = SamplingParams(temperature=0, max_tokens=12, bad_words=[word])
    ref = generate_text(model, tok, PROMPT, params, chat=False)
    assert banned.choices[0].text == ref.text != free.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**greedy_kwargs, extra_body={"bad_words": [""]})
    assert "bad_words" in err.value.message


def test_best_of_equal_to_n_streams_every_sample(client):
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        n=2,
        best_of=2,
        temperature=1.0,
        seed=4,
        max_tokens=6,
        stream=True,
    )
    assert {chunk.choices[0].index for chunk in stream if chunk.choices} == {0, 1}


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------


def test_chat_stream_chunks_and_usage(client, model, tok):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ref = generate_text(model, tok, MESSAGES, greedy(max_tokens=20))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert first.usage is None
    *body, finish, usage = chunks
    assert finish.choices[0].finish_reason == ref.finish_reason
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    assert all(c.choices[0].finish_reason is None for c in body)
    assert "".join(c.choices[0].delta.content for c in body) == ref.text
    assert usage.choices == []
    prompt_tokens = len(chat_prompt_ids(tok, MESSAGES))
    assert usage.usage.prompt_tokens == prompt_tokens
    assert usage.usage.completion_tokens == len(ref.token_ids)
    assert usage.usage.total_tokens == prompt_tokens + len(ref.token_ids)


def test_chat_stream_n_choices(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, n=2, temperature=1.0, seed=5, max_tokens=10)
    whole = client.chat.completions.create(**kwargs)
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        assert chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}


def test_completion_stream_several_prompts_with_usage(client):
    kwargs = dict(model=MODEL, prompt=["Once upon a time", PROMPT], n=2, max_tokens=8, seed=3)
    whole = client.completions.create(**kwargs)
    texts, finishes, usage = {}, {}, None
    for chunk in client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage


# ----------------------------------------------------------------------------------------------
# Prefix-cache usage (usage.prompt_tokens_details.cached_tokens)
# ----------------------------------------------------------------------------------------------

# Long enough for several full KV blocks, and unlike every other test's prompt from the first
# token on, so that nothing cached them before these tests.
CACHED_PROMPTS = [
    "Caching check one: the quick brown fox jumps over the lazy dog while the cat sleeps by the "
    "warm fire all afternoon.",
    "A different second prompt about rivers, mountains and the long road home through the "
    "valley at dusk.",
]
CACHED_MESSAGES = [
    {
        "role": "user",
        "content": "Caching check two: tell me about rivers, mountains and the long road home "
        "through the valley at dusk.",
    }
]


def full_blocks(server, num_tokens: int) -> int:
    """The prompt tokens the prefix cache can serve a prompt cached before: its full blocks,
    less the last token, which is always computed."""
    block = server.engine.pool.block_size
    return (num_tokens - 1) // block * block


def cached_tokens(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def streamed_usage(stream):
    """The usage of a stream asked for with include_usage (its last chunk's)."""
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    return usage


def test_completion_usage_counts_the_prompt_tokens_the_prefix_cache_served(client, server, tok):
    first, second = CACHED_PROMPTS
    cold = client.completions.create(model=MODEL, prompt=first, max_tokens=2, temperature=0)
    assert cached_tokens(cold.usage) == 0
    warm_first = full_blocks(server, len(tok.encode(first)))
    warm_second = full_blocks(server, len(tok.encode(second)))
    assert 0 < warm_first < cold.usage.prompt_tokens
    # Several prompts: the sum over them, each once however many choices it has (`second` is new).
    both = client.completions.create(model=MODEL, prompt=[first, second], n=2, max_tokens=2, seed=1)
    assert cached_tokens(both.usage) == warm_first
    stream = client.completions.create(
        model=MODEL,
        prompt=[first, second],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert cached_tokens(streamed_usage(stream)) == warm_first + warm_second
    scored = client.completions.create(model=MODEL, prompt=second, echo=True, max_tokens=0)
    assert scored.usage.completion_tokens == 0
    assert cached_tokens(scored.usage) == warm_second
    # Scoring with logprobs needs every prompt position computed: it skips the cache.
    scored = client.completions.create(
        model=MODEL, prompt=second, echo=True, max_tokens=0, logprobs=0
    )
    assert cached_tokens(scored.usage) == 0


def test_chat_usage_counts_the_prompt_tokens_the_prefix_cache_served(client, server, tok):
    kwargs = dict(model=MODEL, messages=CACHED_MESSAGES, max_tokens=2, temperature=0)
    cold = client.chat.completions.create(**kwargs)
    assert cached_tokens(cold.usage) == 0
    warm = full_blocks(server, len(chat_prompt_ids(tok, CACHED_MESSAGES)))
    assert 0 < warm < cold.usage.prompt_tokens
    assert cached_tokens(client.chat.completions.create(**kwargs, n=2).usage) == warm
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    assert cached_tokens(streamed_usage(stream)) == warm


def test_raw_sse_framing(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream(
        "POST", f"{server.base_url}/completions", json=body, headers=server.headers, timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        payload = json.loads(event[len("data: ") :])
        assert payload["object"] == "text_completion"
        assert "usage" not in payload


def test_stream_validation_errors_are_http_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1, stream=True)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x" * 2000, stream=True)


def metric(server, name: str, **labels: str) -> float:
    """A sample's value from the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class StepCounter:
    """Counts the model's forward passes (engine steps) while in use: the service's token
    metric stops at the disconnect, so only the engine's own work shows whether the request
    was aborted or ran on to the end of the context."""

    def __init__(self, server):
        self.steps = 0
        self.embed = server.model.gpt_neox.embed_in

    def __enter__(self) -> StepCounter:
        self.handle = self.embed.register_forward_hook(lambda *_: self._count())
        return self

    def _count(self) -> None:
        self.steps += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_client_disconnect_mid_stream_aborts(server):
    before = metric(server, "tulu_generation_tokens_total")
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": None,
        "ignore_eos": True,
        "stream": True,
    }
    with StepCounter(server) as counter:
        with httpx.stream(
            "POST",
            f"{server.base_url}/chat/completions",
            json=body,
            headers=server.headers,
            timeout=30,
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        server.wait_idle()  # the abort freed every block
    generated = metric(server, "tulu_generation_tokens_total") - before
    assert generated < 400, f"the request ran on after the client left ({generated} tokens)"
    assert counter.steps < 400, f"the request ran on after the client left ({counter.steps} steps)"


def test_client_disconnect_without_streaming_aborts(server):
    before = metric(server, "tulu_generation_tokens_total")
    body = {"model": MODEL, "prompt": PROMPT, "n": 16, "max_tokens": None, "ignore_eos": True}
    with StepCounter(server) as counter:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.base_url}/completions", json=body, headers=server.headers, timeout=0.2
            )
        server.wait_idle()
    generated = metric(server, "tulu_generation_tokens_total") - before
    room = server.service.max_model_len - len(server.tokenizer.encode(PROMPT))
    assert generated < 16 * room
    assert counter.steps < room / 2, f"{counter.steps} steps for {room} tokens: not aborted"
    assert metric(server, "tulu_requests_total", route="/v1/completions", status="499") >= 1


def test_error_after_the_stream_started_is_an_event(make_server):
    slow = make_server(api_key=API_KEY, request_timeout=0.3)
    body = {"model": MODEL, "prompt": PROMPT, "n": 16, "max_tokens": None, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{slow.base_url}/completions", json={**body, "stream": True}, headers=slow.headers
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["code"] == 504 and "timeout" in error["message"]
    kwargs = {k: v for k, v in body.items() if k != "ignore_eos"}
    with slow.openai() as client, pytest.raises(openai.APIError, match="timeout"):
        for _ in client.completions.create(**kwargs, stream=True, extra_body={"ignore_eos": True}):
            pass


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------


def test_completion_logprobs_equal_the_engine(client, model, tok):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=3
    )
    ref = generate_text(model, tok, PROMPT, greedy(max_tokens=8, logprobs=3), chat=False)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(ref.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    for got, want, top in zip(lp.token_logprobs, ref.logprobs, lp.top_logprobs, strict=True):
        assert got == pytest.approx(want.logprob, abs=1e-4)
        assert len(top) == 3
        assert sorted(top.values(), reverse=True) == pytest.approx(
            [v for _, v in want.top], abs=1e-4
        )
        assert max(top.values()) == pytest.approx(got, abs=1e-4)  # greedy: chosen is the top
    assert lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    assert all(offset <= len(reply.choices[0].text) for offset in lp.text_offset)


def test_completion_top_logprobs_hold_the_chosen_token_as_openai(client):
    """OpenAI's legacy format (and vLLM) always lists the sampled token among top_logprobs,
    so there are up to logprobs + 1; with logprobs 0 each entry was {} instead of the token."""
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=0, temperature=1.5, seed=3
    )
    lp = reply.choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top == {token: logprob}


def test_echo_scores_the_prompt(client, model, tok):
    ids = tok.encode(PROMPT)
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, max_tokens=0, logprobs=2, temperature=0
    )
    (choice,) = reply.choices
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = prompt_logprobs(model, ids)
    for position in range(1, len(ids)):
        want = float(expected[position - 1, ids[position]])
        assert lp.token_logprobs[position] == pytest.approx(want, abs=1e-4)
        top = sorted(lp.top_logprobs[position].values(), reverse=True)
        alternatives = expected[position - 1].topk(2).values.tolist()
        if ids[position] not in expected[position - 1].topk(2).indices:
            alternatives = sorted([*alternatives, want], reverse=True)  # the token is always in
        assert top == pytest.approx(alternatives, abs=1e-4)
    assert any(len(t) == 3 for t in lp.top_logprobs[1:])  # the prompt has unlikely tokens
    assert "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    assert reply.usage.completion_tokens == 0
    assert reply.usage.prompt_tokens == len(ids)


def test_echo_scoring_with_a_valid_best_of_scores_the_prompt_once(client, server, monkeypatch):
    """Scoring draws nothing to rank: a valid best_of (n … 128) draws only n (the engine is
    asked for one sample), even greedy (where best_of > n is refused when generating); an
    invalid one is a 400, as when generating (test_invalid_completion_values)."""
    asked = []
    generate = server.service.generate

    def spy(prompt_ids, params, *args, **kwargs):
        asked.append(params.n)
        return generate(prompt_ids, params, *args, **kwargs)

    monkeypatch.setattr(server.service, "generate", spy)
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, max_tokens=0, logprobs=0, temperature=0, best_of=3
    )
    (choice,) = reply.choices
    assert choice.text == PROMPT and reply.usage.completion_tokens == 0
    assert asked == [1]


def test_echo_scoring_counts_no_generated_tokens_in_the_metrics(client, server, tok):
    """Scoring a prompt (echo, max_tokens=0) makes the engine sample one token that nobody
    sees: /metrics must count, like the usage block, prompt tokens and no generated token."""
    ids = tok.encode(PROMPT)
    names = (
        "tulu_prompt_tokens_total",
        "tulu_generation_tokens_total",
        "tulu_time_to_first_token_seconds_count",
    )
    before = {name: metric(server, name) for name in names}
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1, n=2, temperature=0
    )
    assert reply.usage.completion_tokens == 0
    usage = streamed_usage(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            echo=True,
            max_tokens=0,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert usage.completion_tokens == 0
    server.wait_idle()
    # The prompt counter is bumped last when a request ends: once it is complete, so is the rest.
    deadline = time.monotonic() + 5
    while metric(server, names[0]) < before[names[0]] + 2 * len(ids):
        assert time.monotonic() < deadline, "the prompt tokens never reached /metrics"
        time.sleep(0.01)
    after = {name: metric(server, name) for name in names}
    assert after[names[0]] - before[names[0]] == 2 * len(ids)
    assert after[names[1]] == before[names[1]]
    assert after[names[2]] == before[names[2]]


def test_echo_with_generation(client, model, tok):
    ids = tok.encode(PROMPT)
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, max_tokens=5, logprobs=1, temperature=0
    )
    ref = generate_text(model, tok, PROMPT, greedy(max_tokens=5, logprobs=1), chat=False)
    (choice,) = reply.choices
    assert choice.text == PROMPT + ref.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + len(ref.token_ids)
    assert lp.token_logprobs[0] is None
    for got, want in zip(lp.token_logprobs[len(ids) :], ref.logprobs, strict=True):
        assert got == pytest.approx(want.logprob, abs=1e-4)
    assert lp.text_offset[len(ids)] == len(PROMPT)
    # streaming gives the same text, offsets and values
    text, offsets, values = "", [], []
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, echo=True, max_tokens=5, logprobs=1, temperature=0, stream=True
    ):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                offsets += c.logprobs.text_offset
                values += c.logprobs.token_logprobs
    assert text == choice.text
    assert offsets == lp.text_offset
    assert values == lp.token_logprobs


def expected_offsets(tok, ids: list[int]) -> list[int]:
    """Where each token's first byte lies in decode(ids), in characters, from the tokenizer
    alone: after decode(ids[:i]), less the U+FFFD that stands for a character (or invalid
    sequence) that token i continues."""
    whole = tok.decode(ids)
    offsets = []
    for i in range(len(ids)):
        before, after = tok.decode(ids[:i]), tok.decode(ids[i:])
        offsets.append(len(before) - (before + after != whole))
    return offsets


def test_text_offsets_of_a_byte_fallback_tokenizer():
    """A tokenizer that is not byte-level shows byte pieces decoded alone (U+FFFD), which are
    not their bytes: the pieces of one character then share its offset."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    from tulu.server.openai_routes import _LegacyLogprobs
    from tulu.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "x": 1, "a": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    backend = Backend(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer(backend, eos_token="<unk>")
    ids = tok.encode("x中a")
    assert len(ids) == 5 and tok.decode(ids) == "x中a"
    logprobs = _LegacyLogprobs(TokenStrings(tok), None, 0, False)
    assert logprobs.add(ids, [None] * 5).text_offset == [0, 1, 1, 1, 2]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("echo", [False, True])
def test_text_offsets_around_split_characters_and_invalid_bytes(
    make_server, neox_tokenizer_path, echo, stream
):
    """Emoji and CJK characters cut across tokens, a lone continuation byte and a cut-off
    lead byte (each one U+FFFD in the text): every offset is its token's first byte's
    character, so each whole token's text is found at its offset, in the prompt and output."""
    from tulu.tokenizer import Tokenizer

    tok = Tokenizer.from_file(neox_tokenizer_path)
    prompt = "Emoji 😀, 中文 and é:"
    prompt_ids = tok.encode(prompt)
    byte = {b: tok.token_to_id(ch) for ch, b in byte_level_alphabet().items()}
    output = [byte[0x80], *tok.encode("a"), byte[0xE4], *tok.encode("b 😀🎉 中文字 ok"), byte[0xF0]]
    cut = [TokenStrings(tok).text(t).startswith("bytes:") for t in prompt_ids + output]
    assert sum(cut) >= 8  # the characters really are cut across tokens
    script = [output[0]] * (len(prompt_ids) - 1) + output + [tok.eos_token_id] * 2
    vocab = -(-len(tok) // 64) * 64
    table = script_table(dict(enumerate(script)), vocab_size=vocab, positions=len(script))
    server = make_server(model=ScriptedModel(table), tokenizer=tok)  # position p says script[p]
    body = dict(model=MODEL, prompt=prompt, echo=echo, max_tokens=len(output), logprobs=0)
    body |= dict(temperature=0, stream=stream)
    with server.openai() as client:
        reply = client.completions.create(**body)
        chunks = list(reply) if stream else [reply]
    text, tokens, offsets = "", [], []
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.text
            tokens += choice.logprobs.tokens if choice.logprobs else []
            offsets += choice.logprobs.text_offset if choice.logprobs else []
    generated = tok.decode(output)
    assert "\ufffd" in generated and "😀🎉 中文字" in generated
    want = expected_offsets(tok, output)
    if echo:
        assert text == prompt + generated
        want = expected_offsets(tok, prompt_ids) + [len(prompt) + o for o in want]
    else:
        assert text == generated
    assert offsets == want
    for token, offset in zip(tokens, offsets, strict=True):
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token


def test_chat_logprobs_equal_the_engine(client, model, tok):
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10, logprobs=True, top_logprobs=2
    )
    ref = generate_text(model, tok, MESSAGES, greedy(max_tokens=10, logprobs=2))
    content = reply.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    for entry, want in zip(content, ref.logprobs, strict=True):
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            [v for _, v in want.top], abs=1e-4
        )
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy: the chosen token is the top
    generated = b"".join(
        bytes(e.bytes) for e, t in zip(content, ref.token_ids, strict=True) if t != tok.eos_token_id
    )
    assert generated.decode("utf-8", errors="replace") == reply.choices[0].message.content
    # without top_logprobs: only the chosen tokens
    plain = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10, logprobs=True
    )
    assert [e.logprob for e in plain.choices[0].logprobs.content] == pytest.approx(
        [e.logprob for e in content], abs=1e-6
    )
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


def test_chat_stream_logprobs(client):
    kwargs = dict(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=10, logprobs=True, top_logprobs=1
    )
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert [(e.token, e.logprob, e.bytes) for e in streamed] == [
        (e.token, e.logprob, e.bytes) for e in whole
    ]


# ----------------------------------------------------------------------------------------------
# Structured output
# ----------------------------------------------------------------------------------------------

#: Bounded constraints: the random model completes each well within STRUCTURED_MAX_TOKENS.
STRUCTURED_MAX_TOKENS = 64

#: request fields -> the engine's StructuredOutput fields they mean.
STRUCTURED_REQUESTS = {
    "response_format json_schema": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "t", "schema": SCHEMA},
            }
        },
        {"json": SCHEMA},
    ),
    "structured_outputs json text": (
        {"extra_body": {"structured_outputs": {"json": json.dumps(SCHEMA)}}},
        {"json": json.dumps(SCHEMA)},
    ),
    "structured_outputs regex": (
        {"extra_body": {"structured_outputs": {"regex": REGEX}}},
        {"regex": REGEX},
    ),
    "structured_outputs choice": (
        {"extra_body": {"structured_outputs": {"choice": CHOICES}}},
        {"choice": CHOICES},
    ),
    "structured_outputs grammar": (
        {"extra_body": {"structured_outputs": {"grammar": GRAMMAR}}},
        {"grammar": GRAMMAR},
    ),
    "guided_json": ({"extra_body": {"guided_json": SCHEMA}}, {"json": SCHEMA}),
    "guided_regex": ({"extra_body": {"guided_regex": REGEX}}, {"regex": REGEX}),
    "guided_choice": ({"extra_body": {"guided_choice": CHOICES}}, {"choice": CHOICES}),
    "guided_grammar": ({"extra_body": {"guided_grammar": GRAMMAR}}, {"grammar": GRAMMAR}),
}


def satisfies(spec: dict, text: str) -> bool:
    """Whether `text` meets the constraint `spec` (StructuredOutput's fields)."""
    ((kind, value),) = spec.items()
    return engine_satisfies(kind, value, text)


def structured(spec: dict, **overrides) -> SamplingParams:
    overrides.setdefault("max_tokens", STRUCTURED_MAX_TOKENS)
    return greedy(structured_output=spec, **overrides)


@pytest.mark.parametrize("name", list(STRUCTURED_REQUESTS))
def test_chat_structured_output_matches_the_reference(client, model, tok, name):
    fields, spec = STRUCTURED_REQUESTS[name]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=STRUCTURED_MAX_TOKENS,
        **fields,
    )
    ref = generate_text(model, tok, MESSAGES, structured(spec))
    (choice,) = reply.choices
    assert choice.finish_reason == "stop" and ref.finish_reason == "stop"
    assert choice.stop_reason is None  # the grammar ended it with the EOS
    assert choice.message.content == ref.text
    assert satisfies(spec, choice.message.content), choice.message.content
    assert reply.usage.completion_tokens == len(ref.token_ids)


@pytest.mark.parametrize(
    "name", ["response_format json_schema", "structured_outputs regex", "guided_choice"]
)
def test_completion_structured_output_matches_the_reference(client, model, tok, name):
    fields, spec = STRUCTURED_REQUESTS[name]
    # vLLM's extension: OpenAI's completions have no response_format, so the client sends it
    # as an extra field.
    extra = fields.get("extra_body", fields)
    reply = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        temperature=0,
        max_tokens=STRUCTURED_MAX_TOKENS,
        extra_body=extra,
    )
    ref = generate_text(model, tok, PROMPT, structured(spec), chat=False)
    (choice,) = reply.choices
    assert choice.finish_reason == "stop"
    assert choice.text == ref.text
    assert satisfies(spec, choice.text), choice.text


def test_the_model_alone_meets_none_of_the_constraints(client):
    """Guard for the tests above: unconstrained, the random model writes none of it."""
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=STRUCTURED_MAX_TOKENS
    )
    text = reply.choices[0].message.content
    for _, spec in STRUCTURED_REQUESTS.values():
        try:
            assert not satisfies(spec, text)
        except json.JSONDecodeError:
            pass


def test_structured_output_streams_the_same_text(client):
    fields, spec = STRUCTURED_REQUESTS["response_format json_schema"]
    kwargs = dict(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=STRUCTURED_MAX_TOKENS, **fields
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and satisfies(spec, text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    completion_chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            temperature=0,
            max_tokens=STRUCTURED_MAX_TOKENS,
            stream=True,
            extra_body={"guided_regex": REGEX},
        )
    )
    text = "".join(c.choices[0].text for c in completion_chunks)
    assert re.fullmatch(REGEX, text) and completion_chunks[-1].choices[0].finish_reason == "stop"


def test_sampled_choices_each_meet_the_constraint(client):
    fields, spec = STRUCTURED_REQUESTS["guided_json"]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=1.5,
        seed=3,
        n=2,
        max_tokens=STRUCTURED_MAX_TOKENS,
        **fields,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        assert satisfies(spec, choice.message.content), choice.message.content


def test_json_object_starts_an_object(client):
    """Any JSON object: a random model may not close it within max_tokens, so it must start
    with "{" and, when it finished, parse as an object."""
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=12,
        response_format={"type": "json_object"},
    )
    choice = reply.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


def test_text_response_format_and_a_schemaless_json_schema_constrain_nothing(client, model, tok):
    """``{"type": "text"}`` and, as in OpenAI and vLLM, a json_schema without its schema."""
    ref = generate_text(model, tok, MESSAGES, greedy(max_tokens=8))
    for response_format in (
        {"type": "text"},
        {"type": "json_schema", "json_schema": {"name": "free", "strict": True}},
    ):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            temperature=0,
            max_tokens=8,
            response_format=response_format,
        )
        assert reply.choices[0].message.content == ref.text


def test_max_tokens_cuts_a_structured_output(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=3,
        extra_body={"guided_json": SCHEMA},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_structured_output_is_compiled_off_the_event_loop_first(client, compile_threads):
    """The route compiles on a worker thread before the engine gets the request, so the
    engine thread's own compile (in add_request, between steps) is a cache hit."""
    calls = compile_threads
    client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=4,
        extra_body={"guided_regex": "[a-z]{1,3} worker"},
    )
    assert len(calls) == 2, calls
    assert calls[1] == "tulu-engine"
    assert calls[0].startswith("tulu-compile"), calls  # the service's compile threads


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"guided_json": "{not json"}, "guided_json", "guided_json cannot be compiled: "),
        (
            {"structured_outputs": {"regex": "[a-"}},
            "structured_outputs",
            "structured_outputs.regex cannot be compiled: Regex parsing error",
        ),
        (
            {"guided_grammar": "root ::= foo"},
            "guided_grammar",
            'guided_grammar cannot be compiled: EBNF parser error at line 1, column 10: Rule "foo"',
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "bad", "schema": {"type": "foo"}},
                }
            },
            "response_format",
            'response_format.json_schema.schema cannot be compiled: Unsupported type "foo"',
        ),
        (
            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
            "structured_outputs",
            "structured_outputs must set exactly one of json, json_object, regex, choice, grammar",
        ),
        ({"structured_outputs": {}}, "structured_outputs", "got none"),
        ({"guided_choice": []}, "guided_choice", "guided_choice must be a non-empty list"),
        (
            {"guided_regex": "a", "response_format": {"type": "json_object"}},
            "guided_regex",
            "response_format and guided_regex cannot be combined",
        ),
        (
            {"guided_regex": "a", "min_tokens": 2},
            "min_tokens",
            "min_tokens cannot be combined with guided_regex",
        ),
        ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn", "unknown field"),
        (
            {"response_format": {"type": "json_schema"}},
            "response_format",
            "type 'json_schema' needs the field json_schema",
        ),
        (
            {"response_format": {"type": "text", "json_schema": {"name": "t", "schema": {}}}},
            "response_format",
            "json_schema is only allowed with type 'json_schema', not 'text'",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
            "Field required",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
        (
            {"guided_regex": "a" * (64 * 1024 + 1)},
            "guided_regex",
            "guided_regex is 65,537 bytes long; this server compiles structured outputs of at "
            "most 65,536 bytes",
        ),
        (
            {"structured_outputs": {"choice": ["é" * 1000] * 33}},
            "structured_outputs",
            "structured_outputs.choice is 66,",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "big", "schema": {"description": "x" * 65536}},
                }
            },
            "response_format",
            "response_format.json_schema.schema is 65,555 bytes long",
        ),
        (
            {"structured_outputs": {"json": SCHEMA, "whitespace_pattern": "[ ]?"}},
            "structured_outputs.whitespace_pattern",
            "structured_outputs.whitespace_pattern: JSON is always generated without free "
            "whitespace",
        ),
        (
            {"structured_outputs": {"structural_tag": '{"structures": [], "triggers": []}'}},
            "structured_outputs.structural_tag",
            "structural tags (tool-call formats) are not supported",
        ),
        (
            {"guided_json": SCHEMA, "guided_whitespace_pattern": "[ ]?"},
            "guided_whitespace_pattern",
            "a custom whitespace pattern is not supported",
        ),
    ],
)
@pytest.mark.parametrize("route", ["/chat/completions", "/completions"])
def test_structured_output_errors_name_the_field(server, route, fields, param, message):
    body = {"model": MODEL, "max_tokens": 4, **fields}
    body |= {"messages": MESSAGES} if route == "/chat/completions" else {"prompt": PROMPT}
    response = httpx.post(f"{server.base_url}{route}", json=body, headers=server.headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]
    assert ".cc:" not in error["message"]  # xgrammar's C++ source location is left out


def test_vllm_options_that_describe_what_the_server_does_are_accepted(client, model, tok):
    """vLLM clients send its backend choice and structured output options; those that say
    what this server does anyway (or only pick a backend) are accepted and change nothing."""
    ref = generate_text(model, tok, MESSAGES, structured({"json": SCHEMA}))
    options = {
        "disable_any_whitespace": True,
        "disable_additional_properties": True,
        "disable_fallback": True,
        "whitespace_pattern": None,
        "structural_tag": None,
    }
    for extra in (
        {"structured_outputs": {"json": SCHEMA, **options}},
        {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": False}},
        {"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar:no-fallback"},
        {"guided_json": SCHEMA, "guided_decoding_backend": "outlines"},
    ):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            temperature=0,
            max_tokens=STRUCTURED_MAX_TOKENS,
            extra_body=extra,
        )
        assert reply.choices[0].message.content == ref.text, extra


def test_without_xgrammar_the_error_says_what_to_install(client, monkeypatch):
    import sys

    from tulu.engine import structured

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar raises ImportError
    structured.grammar_compiler.cache_clear()
    try:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, extra_body={"guided_regex": "a"}
            )
    finally:
        structured.grammar_compiler.cache_clear()
    assert err.value.param == "guided_regex"
    assert "pip install 'tulu[structured]'" in err.value.message


def test_the_openai_client_sees_a_bad_schema_as_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "object", "properties": 5}},
            },
        )
    assert err.value.param == "response_format"
    assert "properties must be an object" in err.value.message


# ----------------------------------------------------------------------------------------------
# Stop strings
# ----------------------------------------------------------------------------------------------


def test_stop_strings(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, temperature=1.0, seed=11, max_tokens=30)
    full = client.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    cut = full[: full.find(stop)]
    reply = client.completions.create(
        **kwargs, stop=[stop, "never-seen-stop"], extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].text == cut
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].model_extra["stop_reason"] == stop
    kept = client.completions.create(
        **kwargs, stop=stop, extra_body={"ignore_eos": True, "include_stop_str_in_output": True}
    )
    assert kept.choices[0].text == cut + stop
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            **kwargs, stop=stop, stream=True, extra_body={"ignore_eos": True}
        )
        if c.choices
    )
    assert streamed == cut


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_wrong_api_key_is_an_authentication_error(server):
    with server.openai(api_key="wrong") as bad, pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=MESSAGES)


def test_prompt_longer_than_the_context_window(client, server):
    window = server.service.max_model_len
    ids = [5] * (window + 10)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=ids)
    assert str(window + 10) in err.value.message and str(window) in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=window)
    prompt_tokens = len(server.tokenizer.encode(PROMPT))
    assert str(prompt_tokens) in err.value.message and str(window) in err.value.message
    assert err.value.param == "max_tokens"
    long_chat = [{"role": "user", "content": "word " * window}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=long_chat)
    assert str(window) in err.value.message and err.value.param == "messages"


def test_a_prompt_of_several_that_does_not_fit_is_named(client, server):
    window = server.service.max_model_len

    def refusal(prompt) -> dict:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        return err.value.body

    too_long = refusal([[5, 6], [5] * (window + 3)])
    assert too_long["message"].startswith("prompt 1: "), too_long
    assert str(window + 3) in too_long["message"] and too_long["param"] == "prompt"
    assert refusal([PROMPT, ""])["message"].startswith("prompt 1: ")
    assert not refusal("")["message"].startswith("prompt")  # a single prompt needs no number


def test_wrong_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert err.value.body["param"] == "model"
    assert "gpt-4" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT)


def test_hugging_face_placeholder_names_are_the_base_unless_an_adapter(client):
    """ "tgi" and "dummy" (what Hugging Face's clients send) are the served model; an adapter
    literally so named is that adapter; any other unknown name stays a 404."""
    from types import SimpleNamespace

    from tulu.server.openai_routes import ApiError, _check_model

    reply = client.completions.create(model="dummy", prompt=PROMPT, max_tokens=2)
    assert reply.model == MODEL
    for name in ("TGI", "tgi ", "Dummy"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt=PROMPT, max_tokens=2)
    service = SimpleNamespace(
        settings=SimpleNamespace(served_model_name="base"), lora_adapters={"tgi": "/a"}
    )
    assert _check_model("tgi", service) == ("tgi", "tgi")
    assert _check_model("dummy", service) == ("base", None)
    with pytest.raises(ApiError, match="'gpt-4' does not exist"):
        _check_model("gpt-4", service)


def test_null_n_stream_echo_and_logprobs_mean_their_defaults(client, server):
    """The `openai` client sends null for a parameter passed as None (OpenAI documents these
    as nullable); chat has no `echo`, so null there is still an unknown field."""
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, n=None, stream=None, logprobs=None
    )
    assert len(reply.choices) == 1 and reply.choices[0].logprobs is None
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, n=None, stream=None, echo=None, logprobs=None
    )
    assert len(reply.choices) == 1 and not reply.choices[0].text.startswith(PROMPT)
    body = {"model": MODEL, "messages": MESSAGES, "echo": None}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=server.headers)
    assert response.status_code == 400 and response.json()["error"]["param"] == "echo"


def test_an_assistant_reply_replayed_from_openai_is_accepted(client, server, model, tok):
    """An OpenAI reply's message, appended to the conversation as it came (refusal: null,
    annotations: [], tool_calls: null, ...), was a 400 'unknown field'; empty, those fields
    say nothing and are dropped. With a value they are still refused."""
    replayed = {
        "role": "assistant",
        "content": "Paris.",
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
        "tool_calls": None,
    }
    messages = [*MESSAGES, replayed, {"role": "user", "content": "And of Italy?"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=8
    )
    plain = [{k: v for k, v in m.items() if k in ("role", "content")} for m in messages]
    assert (
        reply.choices[0].message.content
        == generate_text(model, tok, plain, greedy(max_tokens=8)).text
    )
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = {"model": MODEL, "messages": [*MESSAGES, {**replayed, "tool_calls": calls}]}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=server.headers)
    assert response.status_code == 400 and "tool_calls" in response.json()["error"]["message"]


def test_unknown_field_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"no_such_option": 1}
        )
    assert "no_such_option" in err.value.message


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"stop_token_ids": [100000]}}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"suffix": "!"}, "suffix"),
        ({"best_of": 0}, "best_of"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 129}, "best_of"),
        ({"best_of": 3, "temperature": 0}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        # Scoring a prompt (echo, max_tokens 0) draws nothing to rank, but best_of is checked.
        ({"echo": True, "max_tokens": 0, "best_of": 0}, "best_of"),
        ({"echo": True, "max_tokens": 0, "best_of": -3}, "best_of"),
        ({"echo": True, "max_tokens": 0, "best_of": 10**6}, "best_of"),
        ({"echo": True, "max_tokens": 0, "n": 2, "best_of": 1}, "best_of"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"logit_bias": {"-5": 1.0}}, "logit_bias"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"logit_bias": {"100000": 1.0}}, "logit_bias"),
        ({"extra_body": {"allowed_token_ids": []}}, "allowed_token_ids"),
        ({"extra_body": {"allowed_token_ids": [1, 100000]}}, "allowed_token_ids"),
        # Ids of the model's padded rows (the tokenizer has 600 tokens, the model 640 rows).
        ({"extra_body": {"allowed_token_ids": [1, 600]}}, "allowed_token_ids"),
        ({"logit_bias": {"639": 5.0}}, "logit_bias"),
        ({"prompt": [[1, 2], [100000]]}, "prompt"),
    ],
)
def test_invalid_completion_values(client, kwargs, param):
    kwargs = {"model": MODEL, "prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**kwargs)
    assert err.value.param == param
    assert param in err.value.message


def test_ids_past_the_tokenizer_are_refused_with_its_range(client, server, tok):
    """The model's vocabulary is padded past the tokenizer's; the padding rows are no tokens."""
    assert len(tok) < server.engine.model_config.vocab_size  # the premise
    last = len(tok) - 1
    for kwargs, param in (
        ({"extra_body": {"allowed_token_ids": [last + 1]}}, "allowed_token_ids"),
        ({"logit_bias": {str(last + 1): 100}}, "logit_bias"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)
        assert err.value.param == param
        assert err.value.body["message"] == (
            f"{param} contains {last + 1}, which is not a token: the tokenizer's ids are 0 to "
            f"{last}"
        )
    reply = client.completions.create(  # the last token is one
        model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"allowed_token_ids": [last]}
    )
    assert reply.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
            "tools",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                    }
                ]
            },
            "messages.0.content",
        ),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0"),
        ({"messages": []}, "messages"),
    ],
)
def test_invalid_chat_values(client, kwargs, param):
    kwargs = {"model": MODEL, "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs)
    assert err.value.param.startswith(param)


def test_error_shape(server):
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "temperature": -1},
        headers=server.headers,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "temperature"


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_malformed_json_says_where_and_names_no_param(server, path):
    """FastAPI reports the offset of a JSON syntax error as the error's location; it is a
    position in the body, never an OpenAI `param` (which names a request field)."""
    response = httpx.post(
        f"{server.base_url}{path}",
        content=b'{"model": "tiny", "prompt": oops}',
        headers={**server.headers, "content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] is None, error
    assert error["message"].startswith("the request body is not valid JSON at character 28"), error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completions", {"prompt": 5}, "prompt"),
        ("/completions", {"prompt": [1.5]}, "prompt"),
        ("/completions", {"prompt": "Hi", "stop": 5}, "stop"),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": None}]},
            "messages.0.content",
        ),
    ],
)
def test_a_wrong_type_for_a_union_field_names_the_field(server, path, body, param):
    """pydantic locates an error of a union field in the member that failed
    ("prompt.list[int].0"); `param` was "prompt.str", which names no request field."""
    response = httpx.post(f"{server.base_url}{path}", json=body, headers=server.headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/completions", b'{"model": "tiny", "prompt": "cut \\ud83d", "max_tokens": 1}'),
        (
            "/chat/completions",
            b'{"model": "tiny", "max_tokens": 1, '
            b'"messages": [{"role": "user", "content": "cut \\ud83d"}]}',
        ),
    ],
)
def test_unpaired_surrogate_in_the_text_is_a_bad_request(server, path, body):
    """JSON can escape half an emoji; such text cannot be tokenized: a 400 that says so."""
    response = httpx.post(
        f"{server.base_url}{path}",
        content=body,
        headers={**server.headers, "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert "unpaired surrogate" in response.json()["error"]["message"]


def test_full_server_answers_429(make_server):
    full = make_server(max_num_seqs=0, max_queue=0)
    with full.openai() as client, pytest.raises(openai.RateLimitError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    with full.openai() as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)


def test_more_prompts_than_the_server_admits_is_a_bad_request(make_server):
    """A batch that could never be admitted is a 400 naming `prompt`, not a 429 "retry later"
    (which a client would retry forever); a batch that fits still runs."""
    small = make_server(max_num_seqs=2, max_queue=2)
    with small.openai() as client:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt=["Hi"] * 5, max_tokens=2)
        assert err.value.body["param"] == "prompt"
        assert "5 prompts" in err.value.body["message"] and "(4)" in err.value.body["message"]
        reply = client.completions.create(model=MODEL, prompt=["Hi"] * 4, max_tokens=2)
        assert len(reply.choices) == 4


def test_logprob_values_are_finite_json(server):
    response = httpx.post(
        f"{server.base_url}/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "logprobs": 20, "echo": True},
        headers=server.headers,
    )
    assert response.status_code == 200
    lp = response.json()["choices"][0]["logprobs"]
    assert all(v is None or math.isfinite(v) for v in lp["token_logprobs"])
