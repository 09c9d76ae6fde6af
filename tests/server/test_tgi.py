"""The TGI routes against the real `text_generation` client (sync and async) and raw HTTP.

Every server here is a real uvicorn on 127.0.0.1 (conftest's `launch_server` / `make_server`)
serving a tiny random GPT-NeoX, or a scripted one whose output is known in advance; after each
test every server must be idle with its KV pool empty.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from text_generation import AsyncClient, Client
from text_generation.errors import OverloadedError, ValidationError
from text_generation.types import Grammar, GrammarType
from torch import nn

from engine.conftest import REGEX, SCHEMA, satisfies
from helpers import mean_model_logprob
from tulu.engine.reference import generate_ids, generate_text
from tulu.engine.sampling import SamplingParams
from tulu.model import GPTNeoXForCausalLM, preset

KEY = "tgi-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
SCRIPT_PROMPT = "Once upon a time"
SCRIPT_TEXT = " the cat sat on the mat"
CONTEXT = 256
VOCAB = 640  # the demo tokenizer's 600 tokens, padded


# ---------------------------------------------------------------------------------- models
def random_model(model_class: type[GPTNeoXForCausalLM] = GPTNeoXForCausalLM):
    """A random 2-layer GPT-NeoX whose greedy continuations depend on the context (the
    default initializer range of 0.02 would repeat one token forever)."""
    config = preset(
        "pythia-14m",
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        torch_dtype="float32",
        max_position_embeddings=CONTEXT,
        initializer_range=0.1,
    )
    model = model_class(config)
    model.init_weights(0)
    return model.eval()


class SlowModel(GPTNeoXForCausalLM):
    """Every forward pass takes 20 ms more, so that a request is still running when a test
    looks at it (200 tokens take more than 4 s); `passes` counts them, so a test can tell an
    aborted request from one that ran to the end."""

    passes = 0

    def hidden_states(self, *args, **kwargs):
        self.passes += 1
        time.sleep(0.02)
        return super().hidden_states(*args, **kwargs)


class ScriptedModel(GPTNeoXForCausalLM):
    """Logits depend on the position only: position p predicts `script[p]` (logit 20, the rest
    0), so a prompt of n tokens continues with `script[n - 1:]`, up to the first EOS."""

    def __init__(self, script: list[int]):
        config = preset(
            "pythia-14m",
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            intermediate_size=16,
            torch_dtype="float32",
            max_position_embeddings=len(script),
        )
        super().__init__(config)
        self.init_weights(0)
        table = torch.zeros(len(script), VOCAB)
        table[torch.arange(len(script)), torch.tensor(script)] = 20.0
        self.embed_out = nn.Linear(len(script), VOCAB, bias=False)
        with torch.no_grad():
            self.embed_out.weight.copy_(table.T)
        self.eval()

    def hidden_states(self, input_ids, position_ids=None, **kwargs):
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t).expand(b, t)
        return nn.functional.one_hot(position_ids, self.config.max_position_embeddings).float()


# ---------------------------------------------------------------------------------- fixtures
_module_servers: list = []


@pytest.fixture(autouse=True)
def _servers_idle_after_each_test() -> Iterator[None]:
    yield
    for server in _module_servers:
        server.wait_idle()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return tiny_checkpoint.tokenizer  # the demo's byte-level BPE, <|endoftext|> = 0


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def server(launch_server, model, tokenizer):
    """The random model, with an API key."""
    running = launch_server(model=model, tokenizer=tokenizer, api_key=KEY)
    _module_servers.append(running)
    yield running
    _module_servers.remove(running)
    try:
        running.wait_idle()
    finally:
        running.stop()


@pytest.fixture(scope="module")
def scripted(launch_server, tokenizer):
    """Continues SCRIPT_PROMPT with SCRIPT_TEXT and then EOS (no API key)."""
    prompt = tokenizer.encode(SCRIPT_PROMPT)
    text = tokenizer.encode(SCRIPT_TEXT)
    filler = tokenizer.encode(" x")[0]
    script = [filler] * (len(prompt) - 1) + text + [tokenizer.eos_token_id]
    script += [filler] * (64 - len(script))
    running = launch_server(model=ScriptedModel(script), tokenizer=tokenizer)
    _module_servers.append(running)
    yield running
    _module_servers.remove(running)
    try:
        running.wait_idle()
    finally:
        running.stop()


def client(server, **kwargs) -> Client:
    return Client(server.url, headers=server.headers or None, timeout=30, **kwargs)


def reference(model, tokenizer, ids: list[int], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return generate_ids(model, ids, params, tokenizer=tokenizer)


def joined(tokens) -> str:
    return "".join(t.text for t in tokens if not t.special)


def sse_events(body: str) -> list[dict]:
    assert body.endswith("\n\n"), body[-200:]
    events = []
    for chunk in body[:-2].split("\n\n"):
        assert chunk.startswith("data: "), chunk
        assert "\n" not in chunk
        events.append(json.loads(chunk[len("data: ") :]))
    return events


def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **AUTH}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30, **kwargs)


# ---------------------------------------------------------------------------------- /generate
def test_greedy_generate_equals_the_reference_generator(server, model, tokenizer):
    response = client(server).generate(PROMPT, max_new_tokens=24)
    ids = tokenizer.encode(PROMPT)  # the raw inputs, no chat template
    expected = reference(model, tokenizer, ids, 24)
    details = response.details
    assert [t.id for t in details.tokens] == expected.token_ids
    assert response.generated_text == expected.text
    assert details.finish_reason == "length"
    assert details.generated_tokens == 24
    assert details.seed is None
    assert details.prefill == []
    assert details.top_tokens is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in details.tokens)
    assert joined(details.tokens) == response.generated_text

    # do_sample false with neutral sampling parameters is greedy...
    again = client(server).generate(PROMPT, max_new_tokens=24, temperature=1.0)
    assert again.generated_text == expected.text
    assert again.details.seed is None
    # ...but, as in TGI, a temperature, top_k or top_p that changes the distribution samples.
    for warper in ({"temperature": 1.7}, {"top_k": 5}, {"top_p": 0.5}):
        sampled = client(server).generate(PROMPT, max_new_tokens=24, seed=3, **warper)
        assert sampled.details.seed == 3, warper
        explicit = client(server).generate(
            PROMPT, max_new_tokens=24, seed=3, do_sample=True, **warper
        )
        assert sampled.generated_text == explicit.generated_text, warper
    hot = client(server).generate(PROMPT, max_new_tokens=24, temperature=50.0, seed=3)
    assert hot.generated_text != expected.text  # sampled, not greedy


def test_decoder_input_details_scores_the_raw_prompt(server, model, tokenizer):
    response = client(server).generate(PROMPT, max_new_tokens=2, decoder_input_details=True)
    ids = tokenizer.encode(PROMPT)
    prefill = response.details.prefill
    assert [t.id for t in prefill] == ids
    assert [t.text for t in prefill] == [tokenizer.decode([i]) for i in ids]
    assert prefill[0].logprob is None
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    expected = [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert [t.logprob for t in prefill[1:]] == pytest.approx(expected, abs=1e-4)


def test_top_n_tokens(server):
    response = client(server).generate(PROMPT, max_new_tokens=8, top_n_tokens=3)
    details = response.details
    assert len(details.top_tokens) == details.generated_tokens == 8
    for token, top in zip(details.tokens, details.top_tokens, strict=True):
        assert len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].id == token.id  # greedy picks the most likely token
        assert top[0].logprob == pytest.approx(token.logprob, abs=1e-5)


def test_seeded_sampling_is_reproducible(server):
    c = client(server)

    def sample(seed=None, **kwargs):
        return c.generate(PROMPT, max_new_tokens=16, do_sample=True, seed=seed, **kwargs)

    first, second = sample(7, temperature=1.3), sample(7, temperature=1.3)
    assert first.generated_text == second.generated_text
    assert [t.id for t in first.details.tokens] == [t.id for t in second.details.tokens]
    assert first.details.seed == 7
    others = {sample(seed, temperature=1.3).generated_text for seed in (8, 9, 10)}
    assert others != {first.generated_text}

    # no seed: a random one is reported, and replaying it gives the same text
    unseeded = sample()
    assert isinstance(unseeded.details.seed, int)
    assert sample(unseeded.details.seed).generated_text == unseeded.generated_text
    # do_sample without a temperature samples at temperature 1
    assert sample(11).generated_text == sample(11, temperature=1.0).generated_text


def test_eos_token_finish(scripted, tokenizer):
    response = client(scripted).generate(SCRIPT_PROMPT, max_new_tokens=40)
    details = response.details
    assert response.generated_text == SCRIPT_TEXT
    assert details.finish_reason == "eos_token"
    expected = tokenizer.encode(SCRIPT_TEXT) + [tokenizer.eos_token_id]
    assert [t.id for t in details.tokens] == expected
    assert details.generated_tokens == len(expected)
    last = details.tokens[-1]
    assert last.special and last.text == tokenizer.eos_token
    assert not any(t.special for t in details.tokens[:-1])
    assert joined(details.tokens) == SCRIPT_TEXT


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["sat on"], " the cat sat on"),
        (["zzz", "t s"], " the cat s"),  # ends inside a token
        (["mat"], SCRIPT_TEXT),
    ],
)
def test_stop_sequences(scripted, stop, expected):
    c = client(scripted)
    response = c.generate(SCRIPT_PROMPT, max_new_tokens=40, stop_sequences=stop)
    assert response.generated_text == expected  # TGI keeps the stop sequence
    assert response.details.finish_reason == "stop_sequence"
    assert joined(response.details.tokens).startswith(expected)

    events = list(c.generate_stream(SCRIPT_PROMPT, max_new_tokens=40, stop_sequences=stop))
    assert events[-1].generated_text == expected
    assert events[-1].details.finish_reason == "stop_sequence"
    assert [e.token.id for e in events] == [t.id for t in response.details.tokens]


def test_return_full_text(server):
    c = client(server)
    plain = c.generate(PROMPT, max_new_tokens=6).generated_text
    full = c.generate(PROMPT, max_new_tokens=6, return_full_text=True).generated_text
    assert full == PROMPT + plain
    events = list(c.generate_stream(PROMPT, max_new_tokens=6, return_full_text=True))
    assert events[-1].generated_text == PROMPT + plain


def test_truncate_keeps_the_last_input_tokens(server, model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    response = client(server).generate(
        PROMPT, max_new_tokens=10, truncate=4, decoder_input_details=True
    )
    assert [t.id for t in response.details.prefill] == ids[-4:]
    expected = reference(model, tokenizer, ids[-4:], 10)
    assert [t.id for t in response.details.tokens] == expected.token_ids
    # a truncate longer than the input changes nothing
    longer = client(server).generate(PROMPT, max_new_tokens=10, truncate=200)
    assert longer.generated_text == reference(model, tokenizer, ids, 10).text


def test_max_new_tokens_default_and_null(server, model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": {"details": True}}).json()
    assert body["details"]["generated_tokens"] == 20  # TGI's default
    assert body["details"]["prefill"] == []
    assert "top_tokens" not in body["details"] and "best_of_sequences" not in body["details"]

    # null: up to the end of the context window
    params = {"details": True, "max_new_tokens": None}
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    expected = reference(model, tokenizer, ids, CONTEXT - len(ids))
    assert [t["id"] for t in body["details"]["tokens"]] == expected.token_ids
    assert body["details"]["finish_reason"] == (
        "length" if expected.finish_reason == "length" else "eos_token"
    )

    # without details: only the text
    response = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert response.status_code == 200
    assert list(response.json()) == ["generated_text"]
    assert response.headers["x-generated-tokens"] == "3"
    assert response.headers["x-prompt-tokens"] == str(len(ids))


# ---------------------------------------------------------------------------------- streaming
def test_generate_stream_matches_generate(server):
    c = client(server)
    full = c.generate(PROMPT, max_new_tokens=12, top_n_tokens=2)
    events = list(c.generate_stream(PROMPT, max_new_tokens=12, top_n_tokens=2))
    assert len(events) == 12
    assert [e.token.id for e in events] == [t.id for t in full.details.tokens]
    assert [e.token.text for e in events] == [t.text for t in full.details.tokens]
    assert [e.token.logprob for e in events] == pytest.approx(
        [t.logprob for t in full.details.tokens]
    )
    assert [[t.id for t in e.top_tokens] for e in events] == [
        [t.id for t in top] for top in full.details.top_tokens
    ]
    for event in events[:-1]:
        assert event.generated_text is None and event.details is None
    last = events[-1]
    assert last.generated_text == full.generated_text == joined(e.token for e in events)
    assert last.details.finish_reason == "length"
    assert last.details.generated_tokens == 12
    assert last.details.seed is None


def test_sse_framing(server, tokenizer):
    n = len(tokenizer.encode(PROMPT))
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True}}
    for path, payload in (("/generate_stream", body), ("/", {**body, "stream": True})):
        response = post(server, path, payload)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.text)
        assert len(events) == 5
        for i, event in enumerate(events):
            assert set(event) == {"index", "token", "generated_text", "details"}
            assert event["index"] == i + 1
            assert set(event["token"]) == {"id", "text", "logprob", "special"}
        assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
        assert events[-1]["details"] == {
            "finish_reason": "length",
            "generated_tokens": 5,
            "seed": None,
            "input_length": n,
        }
        assert events[-1]["generated_text"] == tokenizer.decode(
            [e["token"]["id"] for e in events], skip_special_tokens=True
        )
    # Without "details": true the last event has none either (as TGI's router).
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    events = sse_events(post(server, "/generate_stream", body).text)
    assert len(events) == 3 and all(e["details"] is None for e in events)
    assert events[-1]["generated_text"] is not None


def test_compat_route_and_api_key(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}}
    response = post(server, "/", {**body, "stream": False})
    assert response.status_code == 200
    answer = response.json()
    assert isinstance(answer, list) and len(answer) == 1
    assert answer[0]["details"]["generated_tokens"] == 4

    for path in ("/", "/generate", "/generate_stream"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            denied = httpx.post(server.url + path, json=body, headers=headers, timeout=10)
            assert denied.status_code == 401, path
            assert denied.json()["error_type"] == "authentication_error"
    ok = httpx.post(server.url + "/generate", json=body, headers={"X-Api-Key": KEY}, timeout=10)
    assert ok.status_code == 200


def test_async_client(server):
    async def main():
        c = AsyncClient(server.url, headers=AUTH, timeout=30)
        response = await c.generate(PROMPT, max_new_tokens=8)
        events = [e async for e in c.generate_stream(PROMPT, max_new_tokens=8)]
        responses = await asyncio.gather(*(c.generate(PROMPT, max_new_tokens=8) for _ in range(4)))
        with pytest.raises(ValidationError, match="watermark"):
            await c.generate(PROMPT, watermark=True)
        return response, events, responses

    response, events, responses = asyncio.run(main())
    assert events[-1].generated_text == response.generated_text
    assert [e.token.id for e in events] == [t.id for t in response.details.tokens]
    assert {r.generated_text for r in responses} == {response.generated_text}


# ---------------------------------------------------------------------------------- grammar
GRAMMAR_TOKENS = 64  # the bounded schema and regex finish well within it


@pytest.mark.parametrize(
    ("grammar", "spec"),
    [
        (Grammar(type=GrammarType.Json, value=SCHEMA), {"json": SCHEMA}),
        (Grammar(type=GrammarType.Json, value=json.dumps(SCHEMA)), {"json": json.dumps(SCHEMA)}),
        (Grammar(type=GrammarType.Regex, value=REGEX), {"regex": REGEX}),
    ],
    ids=["json", "json-text", "regex"],
)
def test_grammar_output_matches_the_reference(server, model, tokenizer, grammar, spec):
    response = client(server).generate(PROMPT, max_new_tokens=GRAMMAR_TOKENS, grammar=grammar)
    params = SamplingParams(max_tokens=GRAMMAR_TOKENS, temperature=0.0, structured_output=spec)
    expected = generate_ids(model, tokenizer.encode(PROMPT), params, tokenizer=tokenizer)
    assert response.details.finish_reason == "eos_token"
    assert [t.id for t in response.details.tokens] == expected.token_ids
    assert response.generated_text == expected.text
    if "json" in spec:
        assert satisfies("json", SCHEMA, response.generated_text), response.generated_text
    else:
        assert satisfies("regex", REGEX, response.generated_text), response.generated_text


def test_unconstrained_the_model_meets_neither_grammar(server):
    """Guard for the test above."""
    text = client(server).generate(PROMPT, max_new_tokens=GRAMMAR_TOKENS).generated_text
    assert not satisfies("regex", REGEX, text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_grammar_streams_and_samples(server):
    grammar = Grammar(type=GrammarType.Regex, value=REGEX)
    whole = client(server).generate(PROMPT, max_new_tokens=GRAMMAR_TOKENS, grammar=grammar)
    events = list(
        client(server).generate_stream(PROMPT, max_new_tokens=GRAMMAR_TOKENS, grammar=grammar)
    )
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].details.finish_reason == "eos_token"
    for seed in (1, 2, 3):
        sampled = client(server).generate(
            PROMPT,
            max_new_tokens=GRAMMAR_TOKENS,
            grammar=grammar,
            do_sample=True,
            temperature=1.5,
            seed=seed,
        )
        assert satisfies("regex", REGEX, sampled.generated_text), sampled.generated_text


def test_json_schema_grammar_type_as_tgi(server):
    """TGI's `json_schema` type: `{"name": ..., "schema": {...}}` (huggingface_hub sends it)."""
    grammar = {"type": "json_schema", "value": {"name": "thing", "schema": SCHEMA}}
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": GRAMMAR_TOKENS, "grammar": grammar}}
    response = post(server, "/generate", body)
    assert response.status_code == 200, response.text
    assert satisfies("json", SCHEMA, response.json()["generated_text"])
    # `json_object` is TGI's other name for `json`
    body["parameters"]["grammar"] = {"type": "json_object", "value": SCHEMA}
    again = post(server, "/generate", body)
    assert again.json() == response.json()


def test_max_new_tokens_cuts_a_grammar(server):
    response = client(server).generate(
        PROMPT, max_new_tokens=3, grammar=Grammar(type=GrammarType.Json, value=SCHEMA)
    )
    assert response.details.finish_reason == "length"
    assert response.generated_text.startswith("{")


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        ({"type": "regex", "value": "[a-"}, "`grammar` cannot be compiled: Regex parsing error"),
        ({"type": "regex", "value": ""}, "`grammar` must be a non-empty string for regex"),
        ({"type": "json", "value": "{not json"}, "`grammar` cannot be compiled: "),
        ({"type": "json", "value": {"type": "foo"}}, 'Unsupported type "foo"'),
        (
            {"type": "json_schema", "value": {"schema": {"type": "object", "properties": 5}}},
            "`grammar` cannot be compiled: properties must be an object",
        ),
        ({"type": "json_schema", "value": {"name": "x"}}, "schema"),
        ({"type": "ebnf", "value": "root ::= 'a'"}, "parameters.grammar"),
        ({"type": "regex", "value": 5}, "parameters.grammar.regex.value"),
        ({"type": "json", "value": [1]}, "parameters.grammar.json.value"),
        ({"value": "a"}, "parameters.grammar"),
        (
            {"type": "regex", "value": "a" * (64 * 1024 + 1)},
            "`grammar` is 65,537 bytes long; this server compiles structured outputs of at most "
            "65,536 bytes",
        ),
        (
            {"type": "json", "value": {"description": "x" * 65536}},
            "`grammar` is 65,555 bytes long",
        ),
    ],
)
def test_bad_grammars_are_422_with_the_reason(server, grammar, message):
    body = {"inputs": PROMPT, "parameters": {"grammar": grammar}}
    for path in ("/generate", "/generate_stream"):
        response = post(server, path, body)
        assert response.status_code == 422, (path, response.text)
        payload = response.json()
        assert payload["error_type"] == "validation"
        assert message in payload["error"], payload["error"]
        assert ".cc:" not in payload["error"]


def test_client_sees_a_bad_regex_as_a_validation_error(server):
    with pytest.raises(ValidationError, match="`grammar` cannot be compiled"):
        client(server).generate(PROMPT, grammar=Grammar(type=GrammarType.Regex, value="(a"))


def test_typical_p_samples_as_the_reference_generator(server, model, tokenizer):
    """`typical_p` alone turns sampling on (a TGI warper) and samples as the engine's
    typical decoding does (the reference generator, temperature 1, same seed)."""
    reply = client(server).generate(PROMPT, typical_p=0.4, seed=17, max_new_tokens=10)
    params = SamplingParams(temperature=1.0, typical_p=0.4, seed=17, max_tokens=10)
    ref = generate_ids(model, tokenizer.encode(PROMPT), params, tokenizer=tokenizer)
    assert [t.id for t in reply.details.tokens] == ref.token_ids
    assert reply.details.seed == 17
    plain = SamplingParams(temperature=1.0, seed=17, max_tokens=10)  # typical_p 1: off
    untruncated = generate_ids(model, tokenizer.encode(PROMPT), plain, tokenizer=tokenizer)
    assert ref.token_ids != untruncated.token_ids, "the test needs typical_p to change the output"


# ---------------------------------------------------------------------------------- best_of
def test_best_of_answers_the_sample_most_likely_per_token(server, model, tokenizer):
    """best_of=2: the answer and `details.best_of_sequences` are the two samples, each
    reproduced alone by its reported seed, the answer the more likely per token (by the
    model's own log-probabilities, computed here with a plain forward)."""
    c = client(server)
    reply = c.generate(PROMPT, best_of=2, do_sample=True, temperature=1.5, max_new_tokens=8)
    (other,) = reply.details.best_of_sequences
    prompt_ids = tokenizer.encode(PROMPT)
    scores = []
    for text, details in ((reply.generated_text, reply.details), (other.generated_text, other)):
        alone = c.generate(
            PROMPT, do_sample=True, temperature=1.5, max_new_tokens=8, seed=details.seed
        )
        assert alone.generated_text == text
        assert details.generated_tokens == len(details.tokens)
        scores.append(mean_model_logprob(model, prompt_ids, [t.id for t in details.tokens]))
    assert reply.details.seed != other.seed
    assert reply.generated_text != other.generated_text, "the test needs two different samples"
    assert scores[0] >= scores[1]

    hub = pytest.importorskip("huggingface_hub")
    hub_client = hub.InferenceClient(base_url=server.url, api_key=KEY, timeout=30)
    out = hub_client.text_generation(
        PROMPT, best_of=2, do_sample=True, details=True, max_new_tokens=4
    )
    assert len(out.details.best_of_sequences) == 1
    other_sample = out.details.best_of_sequences[0]
    assert other_sample.generated_tokens == len(other_sample.tokens) <= 4  # EOS may end it

    plain = post(server, "/generate", {"inputs": PROMPT, "parameters": {"best_of": 2, "top_k": 5}})
    assert plain.status_code == 200 and set(plain.json()) == {"generated_text"}
    assert plain.headers["x-generated-tokens"] != "0"


def test_best_of_reports_the_answers_generated_tokens_only(server):
    """`x-generated-tokens` is the answer's count, as TGI's, not all the samples' together."""
    parameters = {"best_of": 2, "top_k": 5, "max_new_tokens": 6, "details": True}
    response = post(server, "/generate", {"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    (other,) = details["best_of_sequences"]
    assert details["generated_tokens"] + other["generated_tokens"] > 6  # the premise
    assert response.headers["x-generated-tokens"] == str(details["generated_tokens"])


def test_best_of_asks_the_engine_for_alternatives_only_when_they_are_shown(server, monkeypatch):
    """best_of ranks by log-probabilities, so they are always computed; the `top_n_tokens`
    alternatives only when the client sees them (with `details`)."""
    asked = []
    run_to_end = server.service.run_to_end

    async def spy(prompt_ids, params, *args, **kwargs):
        asked.append(params.logprobs)
        return await run_to_end(prompt_ids, params, *args, **kwargs)

    monkeypatch.setattr(server.service, "run_to_end", spy)
    parameters = {"best_of": 2, "do_sample": True, "top_n_tokens": 3, "max_new_tokens": 3}
    for details in (False, True):
        body = {"inputs": PROMPT, "parameters": {**parameters, "details": details}}
        assert post(server, "/generate", body).status_code == 200
    assert asked == [0, 3]


def test_best_of_answers_the_better_sample_even_when_drawn_second(server, tokenizer, monkeypatch):
    """A fixed request seed (the server draws one per request; patched here) whose second
    sample is the more likely: it must be the answer, the first in best_of_sequences."""
    from tulu.engine.engine import sample_seed

    seed = 9
    monkeypatch.setattr("tulu.server.tgi_routes._random_seed", lambda: seed)
    c = client(server)
    reply = c.generate(PROMPT, best_of=2, top_k=20, max_new_tokens=8)
    first, second = (
        c.generate(PROMPT, top_k=20, max_new_tokens=8, seed=sample_seed(seed, i)) for i in range(2)
    )

    def mean(details) -> float:
        return sum(t.logprob for t in details.tokens) / len(details.tokens)

    assert mean(second.details) > mean(first.details), "pick a seed whose 2nd sample wins"
    assert reply.generated_text == second.generated_text
    assert reply.details.seed == sample_seed(seed, 1)
    assert reply.details.best_of_sequences[0].generated_text == first.generated_text
    assert reply.details.best_of_sequences[0].seed == seed


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 3}, "`seed` must not be set when `best_of` > 1"),
    ],
)
def test_best_of_needs_sampling_and_no_seed(server, parameters, message):
    response = post(server, "/generate", {"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 422 and message in response.json()["error"]


def error_of(server, path: str, parameters: dict) -> str:
    """The 422 validation error `path` answers these parameters with."""
    response = post(server, path, {"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"
    return response.json()["error"]


@pytest.mark.parametrize("best_of", [2, 3, 0])
def test_best_of_is_not_streamed(server, best_of):
    """As TGI, streaming is checked first: a best_of above --max-best-of (3) or 0 gets the
    streaming message too."""
    message = error_of(server, "/generate_stream", {"best_of": best_of, "do_sample": True})
    assert message == "`best_of` != 1 is not supported when streaming tokens"


def test_best_of_with_temperature_one_alone_draws_identical_samples(server):
    """As TGI: `temperature` given passes best_of's sampling check, but 1.0 warps nothing, so
    the request is greedy and every sample the same (documented in server.md)."""
    parameters = {"best_of": 2, "temperature": 1.0, "max_new_tokens": 5, "details": True}
    response = post(server, "/generate", {"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 200, response.text
    body = response.json()
    (other,) = body["details"]["best_of_sequences"]
    assert other["generated_text"] == body["generated_text"]
    assert body["details"]["seed"] is None and other["seed"] is None


def test_best_of_limits_in_tgis_words(server):
    """TGI's wording, the value given: above --max-best-of (2), and 0."""
    for best_of in (3, 0):
        message = error_of(server, "/generate", {"best_of": best_of, "do_sample": True})
        assert message == f"`best_of` must be > 0 and <= 2. Given: {best_of}"


def test_max_best_of_one_refuses_best_of(make_server):
    """With --max-best-of 1, TGI's own message for any other best_of (streaming's first)."""
    strict = make_server(max_best_of=1)
    assert httpx.get(strict.url + "/info", timeout=10).json()["max_best_of"] == 1
    for best_of in (2, 0):
        parameters = {"best_of": best_of, "do_sample": True}
        message = error_of(strict, "/generate", parameters)
        assert message == "`best_of` != 1 is not allowed for this endpoint"
        message = error_of(strict, "/generate_stream", parameters)
        assert message == "`best_of` != 1 is not supported when streaming tokens"
    response = post(strict, "/generate", {"inputs": PROMPT, "parameters": {"best_of": 1}})
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"watermark": True}, "`watermark`"),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"grammar": Grammar(type=GrammarType.Regex, value="[a-")}, "`grammar` cannot be"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"top_n_tokens": 21}, "`top_n_tokens` must be >= 0 and <= 20"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty`"),
    ],
)
def test_client_sees_validation_errors(server, kwargs, message):
    with pytest.raises(ValidationError, match=message):
        client(server).generate(PROMPT, **kwargs)
    if "best_of" not in kwargs:
        with pytest.raises(ValidationError, match=message):
            next(client(server).generate_stream(PROMPT, **kwargs))


def test_too_long_prompt_names_both_lengths(server, tokenizer):
    long_prompt = " ".join(["fox"] * 300)
    n = len(tokenizer.encode(long_prompt))
    assert n >= CONTEXT
    with pytest.raises(ValidationError) as err:
        client(server).generate(long_prompt)
    assert f"{n} tokens" in str(err.value) and f"{CONTEXT} tokens" in str(err.value)

    n = len(tokenizer.encode(PROMPT))
    with pytest.raises(ValidationError) as err:
        client(server).generate(PROMPT, max_new_tokens=CONTEXT)
    message = str(err.value)
    assert f"{n} tokens" in message and f"{CONTEXT} new tokens" in message
    assert f"{CONTEXT} tokens" in message
    # truncate makes it fit
    assert client(server).generate(long_prompt, truncate=100, max_new_tokens=2).details


def test_negative_temperature(server):
    # the client refuses it before sending; the server refuses it too
    with pytest.raises(ValidationError, match="temperature"):
        client(server).generate(PROMPT, do_sample=True, temperature=-1.0)
    body = {"inputs": PROMPT, "parameters": {"do_sample": True, "temperature": -1.0}}
    response = post(server, "/generate", body)
    assert response.status_code == 422
    assert response.json() == {
        "error": "`temperature` must be strictly positive, got -1.0",
        "error_type": "validation",
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": PROMPT, "parameters": {"temperature": 0}}, "`temperature` must be strictly"),
        ({"inputs": PROMPT, "parameters": {"top_p": 1.0}}, "`top_p` must be > 0.0 and < 1.0"),
        ({"inputs": PROMPT, "parameters": {"top_p": 0}}, "`top_p` must be > 0.0 and < 1.0"),
        ({"inputs": PROMPT, "parameters": {"top_k": 0}}, "`top_k` must be strictly positive"),
        ({"inputs": PROMPT, "parameters": {"repetition_penalty": 0}}, "`repetition_penalty`"),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": -3}}, "`max_new_tokens`"),
        ({"inputs": PROMPT, "parameters": {"truncate": 0}}, "`truncate` must be strictly"),
        ({"inputs": PROMPT, "parameters": {"truncate": CONTEXT}}, f"at most {CONTEXT - 1}"),
        ({"inputs": PROMPT, "parameters": {"stop": ["a"] * 17}}, "up to 16 stop sequences"),
        ({"inputs": PROMPT, "parameters": {"stop": [""]}}, "non-empty"),
        ({"inputs": PROMPT, "parameters": {"seed": -1}}, "`seed` must be >= 0"),
        (
            {"inputs": PROMPT, "parameters": {"typical_p": 1.0}},
            "`typical_p` must be > 0.0 and < 1.0",
        ),
        ({"inputs": PROMPT, "parameters": {"typical_p": 0}}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"inputs": PROMPT, "parameters": {"adapter_id": "x"}}, "`adapter_id` 'x' is not a loaded"),
        (
            {"inputs": PROMPT, "parameters": {"grammar": {"type": "regex", "value": "(a"}}},
            "`grammar` cannot be compiled",
        ),
        ({"inputs": PROMPT, "parameters": {"foo": 1}}, "unknown field 'parameters.foo'"),
        ({"inputs": PROMPT, "stream": True}, "unknown field 'stream'"),
        ({"inputs": ""}, "`inputs` cannot be empty"),
        ({"parameters": {}}, "inputs"),
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}}, "max_new_tokens"),
        ('{"inputs": "x", "parameters": {"temperature": NaN}}', "temperature"),
        ("{not json", "not valid JSON"),
    ],
)
def test_validation_error_shape(server, body, message):
    for path in ("/generate", "/generate_stream"):
        response = post(server, path, body)
        assert response.status_code == 422, (path, response.text)
        payload = response.json()
        assert set(payload) == {"error", "error_type"}
        assert payload["error_type"] == "validation"
        assert message in payload["error"]


def test_neutral_values_are_accepted(server):
    params = {
        "best_of": 1,
        "watermark": False,
        "grammar": None,
        "adapter_id": None,
        "top_n_tokens": 0,
        "truncate": None,
        "max_new_tokens": 2,
        "details": True,
    }
    for path in ("/generate", "/generate_stream"):
        response = post(server, path, {"inputs": PROMPT, "parameters": params})
        assert response.status_code == 200, response.text
    assert "top_tokens" not in response.text


def test_huggingface_hub_inference_client(server):
    hub = pytest.importorskip("huggingface_hub")
    c = hub.InferenceClient(base_url=server.url, api_key=KEY)
    expected = client(server).generate(PROMPT, max_new_tokens=6)
    assert c.text_generation(PROMPT, max_new_tokens=6) == expected.generated_text
    detailed = c.text_generation(PROMPT, max_new_tokens=6, details=True)
    assert [t.id for t in detailed.details.tokens] == [t.id for t in expected.details.tokens]
    chunks = list(c.text_generation(PROMPT, max_new_tokens=6, stream=True))
    assert "".join(chunks) == expected.generated_text


def test_huggingface_hub_chat_completion_without_a_model_name(server, model, tokenizer):
    """`InferenceClient(base_url=...).chat_completion` names no model (it sends "dummy"; TGI's
    docs say model="tgi"): both mean the served model, as TGI takes any name."""
    from huggingface_hub import InferenceClient

    c = InferenceClient(base_url=server.url, api_key=KEY, timeout=30)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = generate_text(
        model, tokenizer, messages, SamplingParams(max_tokens=8, temperature=0)
    )
    for name in (None, "tgi"):
        reply = c.chat_completion(messages, model=name, max_tokens=8, temperature=0)
        assert reply.model == server.settings.served_model_name
        assert reply.choices[0].message.content == expected.text
        assert reply.choices[0].finish_reason == expected.finish_reason
        assert reply.usage.completion_tokens == len(expected.token_ids)
    chunks = list(c.chat_completion(messages, max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_huggingface_hub_text_generation_details(server, model, tokenizer):
    from huggingface_hub import InferenceClient

    c = InferenceClient(base_url=server.url, api_key=KEY, timeout=30)
    expected = reference(model, tokenizer, tokenizer.encode(PROMPT), 8)
    out = c.text_generation(PROMPT, max_new_tokens=8, details=True, decoder_input_details=True)
    assert out.generated_text == expected.text
    assert [t.id for t in out.details.tokens] == expected.token_ids
    assert [t.id for t in out.details.prefill] == tokenizer.encode(PROMPT)
    assert (out.details.finish_reason, out.details.generated_tokens) == ("length", 8)
    events = list(c.text_generation(PROMPT, max_new_tokens=8, details=True, stream=True))
    assert [e.token.id for e in events] == expected.token_ids
    assert events[-1].generated_text == expected.text
    assert events[-1].details.finish_reason == "length"
    assert events[-1].details.generated_tokens == 8


def test_decoder_input_details_cannot_stream(server):
    body = {"inputs": PROMPT, "parameters": {"details": True, "decoder_input_details": True}}
    response = post(server, "/generate_stream", body)
    assert response.status_code == 422
    assert "streaming" in response.json()["error"]


def test_overloaded_is_429(make_server):
    slow = make_server(model=random_model(SlowModel), max_num_seqs=1, max_queue=0)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 200}}
    with httpx.stream("POST", slow.url + "/generate_stream", json=body, timeout=30) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # (dropping this iterator would close the connection)
        assert next(lines).startswith("data: ")  # the request is running
        c = Client(slow.url, timeout=30)
        with pytest.raises(OverloadedError, match="capacity"):
            c.generate(PROMPT)
        with pytest.raises(OverloadedError):
            next(c.generate_stream(PROMPT))
        response = httpx.post(slow.url + "/generate", json=body, timeout=30)
        assert response.status_code == 429
        assert response.json()["error_type"] == "overloaded"
    slow.wait_idle()  # leaving the stream aborted the request (as the next test checks)
    assert Client(slow.url, timeout=30).generate(PROMPT, max_new_tokens=2).details


def test_client_disconnect_aborts_the_request(make_server):
    """The greedy continuation runs the full 200 tokens (no EOS), so fewer than 100 forward
    passes mean the request was aborted (the idle timeouts only detect a hang)."""
    model = random_model(SlowModel)
    slow = make_server(model=model)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 200}}  # >= 4 s to finish
    before = model.passes
    with httpx.stream("POST", slow.url + "/generate_stream", json=body, timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
    slow.wait_idle(timeout=30)
    assert model.passes - before < 100, f"{model.passes - before} passes: not aborted"

    before = model.passes
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/generate", json=body, timeout=0.3)
    slow.wait_idle(timeout=30)
    assert model.passes - before < 100, f"{model.passes - before} passes: not aborted"


def test_request_timeout_mid_stream_is_an_error_event(make_server):
    slow = make_server(model=random_model(SlowModel), request_timeout=0.3)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 200}}
    response = httpx.post(slow.url + "/generate_stream", json=body, timeout=30)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert len(events) > 1 and all("token" in e for e in events[:-1])
    assert set(events[-1]) == {"error", "error_type"}
    assert events[-1]["error_type"] == "timeout"
    assert "timeout" in events[-1]["error"]

    response = httpx.post(slow.url + "/generate", json=body, timeout=30)
    assert response.status_code == 504
    assert response.json()["error_type"] == "timeout"


def test_info(server):
    info = httpx.get(server.url + "/info", headers=AUTH, timeout=10).json()
    assert info["max_total_tokens"] == CONTEXT
    assert info["max_input_tokens"] == CONTEXT - 1
    assert info["max_best_of"] == 2  # TGI's default --max-best-of
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
