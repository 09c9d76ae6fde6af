"""The server under abuse: a full queue, clients that vanish, slow requests, bad bodies, API
keys, and the Prometheus metrics that report all of it.

- Over `max_num_seqs + max_queue` requests a new one gets 429 at once (in its API's shape),
  while the admitted ones complete; a full server does not compile a request's grammar, and
  a grammar that fails to compile gives its admission back.
- Structured outputs compile on the service's own threads, `COMPILE_WORKERS` at once, which
  stop with the server.
- A client that disconnects (streaming or not) aborts its request: the KV pool empties and the
  server keeps answering (100 streams dropped mid-stream).
- `request_timeout` turns a long generation into a 504 (or an error event once streaming).
- Malformed JSON, invalid UTF-8, empty bodies, wrong types, unknown fields, huge, negative and
  non-finite numbers on every POST route get a 4xx with a message, never a 500 or a dead server.
- With an API key every route but /health and the page needs it (Bearer or x-api-key).
- /metrics counts requests by route and status, tokens equal to the usage returned, latency
  histograms, queue length, running sequences and KV blocks in use.

Servers are real uvicorn servers on 127.0.0.1 (tests/server/conftest.py). Every request loop
is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable

import pytest

pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the server extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from torch import nn  # noqa: E402

from tulu.engine.engine import EngineConfig  # noqa: E402
from tulu.engine.structured import GrammarCompiler, StructuredOutput  # noqa: E402
from tulu.errors import GenerationError  # noqa: E402
from tulu.model.gpt_neox import GPTNeoXForCausalLM  # noqa: E402
from tulu.server.service import COMPILE_WORKERS  # noqa: E402

OPENAI_ROUTES = ["/v1/completions", "/v1/chat/completions"]
TGI_ROUTES = ["/generate", "/generate_stream"]
POST_ROUTES = OPENAI_ROUTES + TGI_ROUTES
WAIT = 30.0  # the longest any test waits for a server-side condition


# ----------------------------------------------------------------------------------------------
# A slow model that never stops early
# ----------------------------------------------------------------------------------------------


class _NoEos(nn.Module):
    """The LM head with the EOS logit pushed to -1e9, so every request runs to max_tokens (TGI
    has no ignore_eos)."""

    def __init__(self, head: nn.Linear, eos: int):
        super().__init__()
        self.head, self.eos = head, eos

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        logits[..., self.eos] = -1e9
        return logits


class SlowModel(GPTNeoXForCausalLM):
    """The tiny checkpoint's model, `delay` seconds slower per forward pass and without EOS, so
    a request is still running when a test looks at it.

    `hold(after=n)` stops the engine thread in its (n+1)-th forward pass from now until
    `release()`: no request can progress or finish meanwhile, so a test can check what the
    server does in that time without racing the generation's speed. (The engine applies
    aborts between steps, so a held engine cannot abort either.)"""

    delay = 0.02
    passes = 0
    hold_from: int | None = None
    released: threading.Event

    def hold(self, after: int = 0) -> None:
        self.released = threading.Event()
        self.hold_from = self.passes + after

    def release(self) -> None:
        self.hold_from = None
        self.released.set()

    def hidden_states(self, *args, **kwargs):
        self.passes += 1
        if self.hold_from is not None and self.passes > self.hold_from:
            self.released.wait(WAIT)  # bounded: a test that forgets to release cannot hang
            self.hold_from = None
        time.sleep(self.delay)
        return super().hidden_states(*args, **kwargs)


@pytest.fixture(scope="module")
def slow_model(tiny_checkpoint) -> Callable[[float], SlowModel]:
    """Factory: `slow_model(delay)`."""

    def make(delay: float = 0.02) -> SlowModel:
        base = tiny_checkpoint.model
        model = SlowModel(base.config)
        model.load_state_dict(base.state_dict())
        model.embed_out = _NoEos(model.embed_out, tiny_checkpoint.tokenizer.eos_token_id)
        model.delay = delay
        return model.eval()

    return make


def long_body(route: str, tokens: int, stream: bool) -> dict:
    """A request for `tokens` new tokens on `route` (EOS ignored where the API allows it)."""
    if route == "/v1/completions":
        return {
            "prompt": "Once upon a time",
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": stream,
        }
    if route == "/v1/chat/completions":
        return {
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": stream,
        }
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": tokens}}
    if route == "/":
        body["stream"] = stream
    return body


def stream_route(route: str, stream: bool) -> str:
    """The route that serves `route`'s API with or without streaming."""
    if route in TGI_ROUTES:
        return "/generate_stream" if stream else "/generate"
    return route


def assert_error_shape(route: str, response: httpx.Response, status: int | None = None) -> dict:
    """The body of an error answer, checked to be in the API family's shape with a message."""
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    if route.startswith("/v1"):
        assert set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"], body
        assert isinstance(error["type"], str) and error["type"], body
        assert error["code"] == response.status_code, body
    else:
        assert isinstance(body, dict), body
        assert isinstance(body.get("error"), str) and body["error"], body
        assert isinstance(body.get("error_type"), str) and body["error_type"], body
    return body


def sse_events(text: str) -> list:
    """The JSON payloads of an SSE body (and the string "[DONE]")."""
    events = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def async_wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def new_server(make_server) -> Callable[..., object]:
    """conftest's `make_server` (idle-checked, stopped at the end)."""
    return make_server


# ----------------------------------------------------------------------------------------------
# The waiting queue
# ----------------------------------------------------------------------------------------------


async def _read_stream(client: httpx.AsyncClient, route: str, body: dict) -> tuple[int, list]:
    async with client.stream("POST", route, json=body) as response:
        text = (await response.aread()).decode()
    return response.status_code, sse_events(text) if response.status_code == 200 else [text]


def test_over_the_queue_limit_answers_429_at_once(new_server, slow_model):
    """The extra requests are refused while the engine is held (no admitted request can
    finish meanwhile), so a 429 that waited for capacity would time out instead."""
    model = slow_model(0.0)
    server = new_server(
        model=model,
        max_num_seqs=2,
        max_queue=2,
        engine_config=EngineConfig(max_num_seqs=2),
    )
    admitted_tokens = 40
    refusal_timeout = 10.0  # only detects a refusal that waits for capacity (it never comes)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
            model.hold()
            admitted = [
                asyncio.create_task(
                    _read_stream(client, route, long_body(route, admitted_tokens, True))
                )
                for route in ("/v1/completions", "/v1/chat/completions") * 2
            ]
            try:
                await async_wait_for(lambda: server.service.in_flight == 4, "4 requests admitted")
                refused = []
                for route in ("/v1/completions", "/v1/chat/completions", "/generate", "/"):
                    for stream in (False, True):
                        response = await client.post(
                            stream_route(route, stream),
                            json=long_body(route, 5, stream),
                            timeout=refusal_timeout,
                        )
                        refused.append((route, stream, response))
                assert server.service.in_flight == 4, "a refused request was admitted"
                assert not any(task.done() for task in admitted), "an admitted request ended"
            finally:
                model.release()
                results = await asyncio.gather(*admitted, return_exceptions=True)
            return refused, results

    refused, results = asyncio.run(main())
    for route, stream, response in refused:
        where = f"{route} stream={stream}"
        assert response.status_code == 429, f"{where}: {response.status_code} {response.text}"
        body = assert_error_shape(route, response, 429)
        if route.startswith("/v1"):
            assert body["error"]["type"] == "rate_limit_exceeded"
        else:
            assert body["error_type"] == "overloaded"
    for status, events in results:
        assert status == 200, events
        assert events[-1] == "[DONE]"
        finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"]]
        assert finishes[-1] == "length", events[-3:]
        assert not any("error" in e for e in events[:-1])
    server.wait_idle()
    # Capacity is back: a new request is served.
    again = httpx.post(f"{server.url}/v1/completions", json=long_body("/v1/completions", 3, False))
    assert again.status_code == 200, again.text


def test_a_burst_never_admits_more_than_the_limit(new_server, slow_model):
    """Requests arriving together are each counted at admission (no check-then-act gap)."""
    server = new_server(
        model=slow_model(0.02),
        max_num_seqs=2,
        max_queue=2,
        engine_config=EngineConfig(max_num_seqs=2),
    )

    async def main():
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, limits=limits) as client:
            route = "/v1/completions"
            return await asyncio.gather(
                *(client.post(route, json=long_body(route, 30, False)) for _ in range(12))
            )

    responses = asyncio.run(main())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) <= 4, f"{statuses.count(200)} of 12 admitted with a limit of 4"
    assert statuses.count(429) >= 8


ADMITTING_ROUTES = ["/v1/completions", "/v1/chat/completions", "/generate", "/"]


def bad_grammar_body(route: str, stream: bool) -> dict:
    """A request whose regex does not compile (the compiler's error, not the schema's)."""
    body = long_body(route, 3, stream)
    if route.startswith("/v1"):
        body["guided_regex"] = "[a-"
    else:
        body["parameters"]["grammar"] = {"type": "regex", "value": "[a-"}
    return body


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ADMITTING_ROUTES)
def test_a_full_server_answers_429_without_compiling(new_server, compile_threads, route, stream):
    """Admission comes before the compile (which can take seconds): a full server spends
    nothing on the request, so even a grammar that would not compile gets the 429."""
    server = new_server(max_num_seqs=0, max_queue=0)
    compiles = compile_threads
    response = httpx.post(
        server.url + stream_route(route, stream), json=bad_grammar_body(route, stream), timeout=WAIT
    )
    assert_error_shape(route, response, 429)
    assert compiles == [], "the grammar was compiled for a request that was refused"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ADMITTING_ROUTES)
def test_a_grammar_that_fails_to_compile_gives_its_admission_back(new_server, route, stream):
    """The request was admitted, then refused by the compiler: its slot is free again, so the
    one-slot server serves the next request."""
    server = new_server(max_num_seqs=1, max_queue=0)
    url = server.url + stream_route(route, stream)
    refused = httpx.post(url, json=bad_grammar_body(route, stream), timeout=WAIT)
    assert_error_shape(route, refused, 400 if route.startswith("/v1") else 422)
    assert "cannot be compiled" in refused.text
    assert server.service.in_flight == 0
    served = httpx.post(url, json=long_body(route, 3, stream), timeout=WAIT)
    assert served.status_code == 200, served.text


def test_compiles_run_on_their_own_threads_at_most_compile_workers_at_once(new_server, monkeypatch):
    """Huge schemas compile for seconds: however many arrive together, at most
    COMPILE_WORKERS compile at once, on threads of their own (not the default pool, which
    tokenization uses), and those threads end when the server stops."""
    server = new_server()
    lock = threading.Lock()
    running, peak, threads = 0, 0, set()

    def slow_compile(self, spec):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.current_thread())
        time.sleep(0.1)
        with lock:
            running -= 1

    monkeypatch.setattr(GrammarCompiler, "compile", slow_compile)

    async def main():
        specs = [StructuredOutput(regex=f"a{i}") for i in range(3 * COMPILE_WORKERS)]
        await asyncio.gather(*(server.service.compile_structured_output(s) for s in specs))

    asyncio.run(main())
    assert peak == COMPILE_WORKERS, f"{peak} compiles ran at once"
    assert all(t.name.startswith("tulu-compile") for t in threads), threads
    server.stop()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), f"{thread.name} outlived the server"


# ----------------------------------------------------------------------------------------------
# Clients that go away
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/generate_stream"])
def test_dropping_100_streams_mid_stream_frees_every_block(new_server, slow_model, route):
    # 400 tokens at >= 20 ms a step: over 8 s if the requests ran to the end.
    model = slow_model(0.02)
    server = new_server(model=model)
    count, tokens, read = 100, 400, 3

    async def one(client: httpx.AsyncClient) -> int:
        chunks = 0
        async with client.stream("POST", route, json=long_body(route, tokens, True)) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    chunks += 1
                    if chunks == read:
                        break
        return chunks  # leaving the block closes the connection mid-body

    async def main():
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(count)))

    before = model.passes
    assert asyncio.run(main()) == [read] * count
    # Aborted or run to the end, the server goes idle: the engine's forward passes tell them
    # apart (the timeout only detects a hang).
    server.wait_idle(timeout=WAIT)
    steps = model.passes - before
    assert steps < tokens / 2, f"{steps} forward passes for {read} tokens read: not aborted"
    assert server.engine.stats()["kv_blocks_used"] == 0
    generated = scrape(server.url)["tulu_generation_tokens_total"][()]
    assert generated < count * tokens / 2, f"{generated} tokens generated: not aborted"
    # The server still answers.
    assert httpx.get(f"{server.url}/health").status_code == 200
    ok = httpx.post(f"{server.url}{stream_route(route, False)}", json=long_body(route, 3, False))
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_a_non_streaming_client_that_times_out_aborts_its_request(new_server, slow_model, route):
    model = slow_model(0.02)
    server = new_server(model=model)
    before = model.passes
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{route}", json=long_body(route, 400, False), timeout=0.5)
    # The request needs > 8 s; the server notices the closed connection within about 0.25 s.
    # The forward passes tell an abort from a run to the end (the timeout only detects a hang).
    server.wait_idle(timeout=WAIT)
    steps = model.passes - before
    assert steps < 200, f"{steps} forward passes for a request whose client left"
    generated = scrape(server.url)["tulu_generation_tokens_total"][()]
    assert generated < 200, f"{generated} tokens generated after the client left"
    ok = httpx.post(f"{server.url}{route}", json=long_body(route, 3, False), timeout=WAIT)
    assert ok.status_code == 200, ok.text


QUEUED_CASES = [
    pytest.param("/v1/completions", True, id="completions-stream"),
    pytest.param("/v1/completions", False, id="completions"),
    pytest.param("/v1/chat/completions", True, id="chat-stream"),
    pytest.param("/v1/chat/completions", False, id="chat"),
    pytest.param(
        "/generate_stream",
        True,
        id="generate_stream",
    ),
    pytest.param("/generate", False, id="generate"),
]


@pytest.mark.parametrize(("route", "stream"), QUEUED_CASES)
def test_a_client_that_leaves_while_queued_is_aborted(new_server, slow_model, route, stream):
    """One sequence at a time: the second request waits in the engine's queue, its client
    gives up, and the request must leave the queue before the first one finishes."""
    server = new_server(model=slow_model(0.02), engine_config=EngineConfig(max_num_seqs=1))
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        first = long_body("/v1/completions", 450, True)  # over 9 s (20 ms a step at least)
        with client.stream("POST", "/v1/completions", json=first) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            with pytest.raises(httpx.ReadTimeout):
                client.post(route, json=long_body(route, 50, stream), timeout=0.3)
            wait_for(
                lambda: server.service.in_flight == 1 and not server.engine.scheduler.waiting,
                "the queued request of the departed client to be aborted",
                timeout=6.0,  # well before the first one could finish
            )
            assert server.engine.stats()["running"] == 1  # the first one still runs
    server.wait_idle()  # leaving the first stream aborts it too


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    "route",
    [
        "/v1/completions",
        "/v1/chat/completions",
        pytest.param(
            "/generate",
        ),
    ],
)
def test_a_client_disconnect_is_not_logged_as_an_error(new_server, slow_model, route):
    server = new_server(model=slow_model(0.02))
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "tulu", "")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}{route}", json=long_body(route, 400, False), timeout=0.5)
        server.wait_idle(timeout=4.0)
        time.sleep(0.1)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = [r.getMessage() for r in handler.records]
    assert not messages, messages


# ----------------------------------------------------------------------------------------------
# Request timeout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_request_timeout_answers_504(new_server, slow_model, route):
    """The engine is held after a few steps, so the request can only end by the timeout."""
    model = slow_model(0.0)
    server = new_server(model=model, request_timeout=0.5)
    model.hold(after=3)
    try:
        # 10 s: ample for a 0.5 s timeout, and a held request never ends without one.
        response = httpx.post(
            f"{server.url}{route}", json=long_body(route, 400, False), timeout=10.0
        )
    finally:
        model.release()
    body = assert_error_shape(route, response, 504)
    message = body["error"]["message"] if route.startswith("/v1") else body["error"]
    assert "timeout" in message and "0.5" in message, message
    server.wait_idle()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate_stream"])
def test_request_timeout_ends_a_stream_with_an_error_event(new_server, slow_model, route):
    """Held after a few tokens, the stream can only end by the timeout's error event.

    The timeout (2 s) must outlast the prompt's prefill and the first tokens on a busy CI
    machine, where 0.5 s sometimes ended the stream before any token was sent."""
    model = slow_model(0.0)
    server = new_server(model=model, request_timeout=2.0)
    model.hold(after=5)
    try:
        # 10 s: ample for a 2 s timeout, and a held request never ends without one.
        response = httpx.post(
            f"{server.url}{route}", json=long_body(route, 400, True), timeout=10.0
        )
    finally:
        model.release()
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1, events[-3:]
    if route.startswith("/v1"):
        assert errors[0]["error"]["type"] == "timeout"
        assert errors[0]["error"]["code"] == 504
        assert events[-1] == "[DONE]"
    else:
        assert errors[0]["error_type"] == "timeout"
        assert events[-1] is errors[0]
    assert len(events) > 3, "no token was streamed before the timeout"
    server.wait_idle()


# ----------------------------------------------------------------------------------------------
# Bad bodies
# ----------------------------------------------------------------------------------------------


def _valid(route: str) -> dict:
    if route == "/v1/completions":
        return {"prompt": "Hello", "max_tokens": 2}
    if route == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    return {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}


def _with(route: str, **fields) -> bytes:
    """A valid body of `route` with `fields` set (TGI: inside `parameters`)."""
    body = _valid(route)
    target = body["parameters"] if route in TGI_ROUTES else body
    target.update(fields)
    return json.dumps(body).encode()


def _raw(route: str, field: str, raw: str) -> bytes:
    """A valid body with one field's value spelt as raw JSON text (NaN, Infinity, ...)."""
    body = _valid(route)
    if route in TGI_ROUTES:
        params = json.dumps(body.pop("parameters"))[:-1] + f', "{field}": {raw}}}'
        return (json.dumps(body)[:-1] + f', "parameters": {params}}}').encode()
    return (json.dumps(body)[:-1] + f', "{field}": {raw}}}').encode()


def _bad_bodies(route: str) -> dict[str, bytes]:
    openai = route in OPENAI_ROUTES
    chat = route == "/v1/chat/completions"
    limit = "max_tokens" if openai else "max_new_tokens"
    cases = {
        "malformed json": b'{"prompt": "Hello", ',
        "trailing garbage": json.dumps(_valid(route)).encode() + b" }",
        "invalid utf-8": b'{"prompt": "\xff\xfe\xfd", "inputs": "\xc3\x28"}',
        "invalid utf-8 bare": b"\xff\xfe\x00\x01",
        "empty body": b"",
        "whitespace body": b"   \n",
        "json array": b"[]",
        "json string": b'"Hello"',
        "json number": b"42",
        "json null": b"null",
        "deeply nested": b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "unknown field": _with(route, definitely_not_a_field=1),
        "huge max tokens": _with(route, **{limit: 10**30}),
        "negative max tokens": _with(route, **{limit: -1}),
        "zero max tokens": _with(route, **{limit: 0}),
        "string max tokens": _with(route, **{limit: "ten"}),
        "numeric string max tokens": _with(route, **{limit: "2"}),
        "whole float max tokens": _with(route, **{limit: 2.0}),
        "numeric string seed": _with(route, seed="7"),
        "float max tokens": _with(route, **{limit: 2.5}),
        "huge temperature": _with(route, temperature=1e308),
        "negative temperature": _with(route, temperature=-1.0),
        "string temperature": _with(route, temperature="hot"),
        "nan temperature": _raw(route, "temperature", "NaN"),
        "infinite temperature": _raw(route, "temperature", "Infinity"),
        "nan top_p": _raw(route, "top_p", "NaN"),
        "-infinite penalty": _raw(route, "repetition_penalty", "-Infinity"),
        "huge exponent": _raw(route, "temperature", "1e999999"),
        "negative top_p": _with(route, top_p=-0.5),
        "top_p above 1": _with(route, top_p=2),
        "negative top_k": _with(route, top_k=-5),
        "huge seed": _with(route, seed=10**30),
        "stop is a number": _with(route, stop=5),
        "empty stop string": _with(route, stop=[""]),
        "bool as number": _with(route, top_k=True) if openai else None,
    }
    if openai:
        cases |= {
            "huge n": _with(route, n=10**30),
            "negative n": _with(route, n=-1),
            "zero n": _with(route, n=0),
            "string n": _with(route, n="many"),
            "string stream": _with(route, stream="yes"),
            "negative logprobs": (
                _with(route, logprobs=True, top_logprobs=-1) if chat else _with(route, logprobs=-1)
            ),
            "huge logprobs": (
                _with(route, logprobs=True, top_logprobs=10**9)
                if chat
                else _with(route, logprobs=10**9)
            ),
            "out of vocabulary stop token": _with(route, stop_token_ids=[10**30]),
            "negative stop token": _with(route, stop_token_ids=[-1]),
            "min tokens above max": _with(route, min_tokens=10**9),
            "presence penalty 1e308": _with(route, presence_penalty=1e308),
            "logit bias beyond 100": _with(route, logit_bias={"1": 101}),
            "logit bias key not a token id": _with(route, logit_bias={"one": 5}),
            "logit bias key out of vocabulary": _with(route, logit_bias={str(10**30): 5}),
            "nan logit bias": _raw(route, "logit_bias", '{"1": NaN}'),
            "empty allowed token ids": _with(route, allowed_token_ids=[]),
            "negative allowed token id": _with(route, allowed_token_ids=[-1]),
            "wrong model": _with(route, model="gpt-4"),
            "stream options object wrong": _with(route, stream_options={"x": 1}),
            "response format unknown type": _with(route, response_format={"type": "xml"}),
            "response format is a string": _with(route, response_format="json"),
            "response format json_schema without it": _with(
                route, response_format={"type": "json_schema"}
            ),
            "response format schema not an object": _with(
                route,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
            ),
            "response format schema does not compile": _with(
                route,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nothing"}},
                },
            ),
            "bad schema text": _with(route, guided_json="{not json"),
            "bad regex": _with(route, guided_regex="(unclosed"),
            "bad grammar": _with(route, guided_grammar="root ::= undefined_rule"),
            "empty choice": _with(route, guided_choice=[]),
            "unknown structured_outputs key": _with(route, structured_outputs={"yaml": "a: 1"}),
            "structured_outputs with two kinds": _with(
                route, structured_outputs={"regex": "a", "choice": ["a"]}
            ),
            "structured_outputs empty": _with(route, structured_outputs={}),
            "two structured outputs": _with(
                route, response_format={"type": "json_object"}, guided_regex="a"
            ),
            "structured output with min_tokens": _with(route, guided_regex="a", min_tokens=1),
        }
    if route == "/v1/completions":
        cases |= {
            "missing prompt": json.dumps({"max_tokens": 2}).encode(),
            "prompt is a number": json.dumps({"prompt": 5}).encode(),
            "prompt is an object": json.dumps({"prompt": {"a": 1}}).encode(),
            "empty prompt list": json.dumps({"prompt": []}).encode(),
            "empty token list": json.dumps({"prompt": [[]]}).encode(),
            "empty prompt string": json.dumps({"prompt": ""}).encode(),
            "token id out of vocabulary": json.dumps({"prompt": [10**30]}).encode(),
            "negative token id": json.dumps({"prompt": [-1]}).encode(),
            "float token ids": json.dumps({"prompt": [1.5, 2]}).encode(),
            "prompt too long": json.dumps({"prompt": "hello " * 5000}).encode(),
            "suffix": _with(route, suffix="!"),
        }
    if chat:
        cases |= {
            "missing messages": json.dumps({"max_tokens": 2}).encode(),
            "messages is a string": json.dumps({"messages": "Hello"}).encode(),
            "empty messages": json.dumps({"messages": []}).encode(),
            "unknown role": json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
            "null content": json.dumps({"messages": [{"role": "user", "content": None}]}).encode(),
            "image part": json.dumps(
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
            ).encode(),
            "message is a list": json.dumps({"messages": [["user", "Hello"]]}).encode(),
            "unknown message field": json.dumps(
                {"messages": [{"role": "user", "content": "x", "mood": "happy"}]}
            ).encode(),
            "tools": _with(route, tools=[{"type": "function"}]),
            "prompt too long": json.dumps(
                {"messages": [{"role": "user", "content": "hello " * 5000}]}
            ).encode(),
        }
    if not openai:
        cases |= {
            "missing inputs": json.dumps({"parameters": {}}).encode(),
            "empty inputs": json.dumps({"inputs": ""}).encode(),
            "inputs is a list": json.dumps({"inputs": ["Hello"]}).encode(),
            "parameters is a list": json.dumps({"inputs": "Hello", "parameters": []}).encode(),
            "unknown parameter": _with(route, bogus=True),
            "do_sample with zero temperature": _with(route, do_sample=True, temperature=0),
            "huge top_n_tokens": _with(route, top_n_tokens=10**9),
            "best_of": _with(route, best_of=10**9),
            "huge truncate": _with(route, truncate=10**30),
            "negative truncate": _with(route, truncate=-1),
            "too many stops": _with(route, stop=["a"] * 1000),
            "typical_p": _with(route, typical_p=1.5),
            "grammar unknown type": _with(route, grammar={"type": "ebnf", "value": "x"}),
            "grammar without type": _with(route, grammar={"value": "x"}),
            "grammar is a string": _with(route, grammar="json"),
            "grammar bad regex": _with(route, grammar={"type": "regex", "value": "[a-"}),
            "grammar regex not a string": _with(route, grammar={"type": "regex", "value": 5}),
            "grammar bad schema text": _with(route, grammar={"type": "json", "value": "{not"}),
            "grammar schema does not compile": _with(
                route, grammar={"type": "json", "value": {"type": "nothing"}}
            ),
            "grammar json_schema without schema": _with(
                route, grammar={"type": "json_schema", "value": {"name": "x"}}
            ),
            "prompt too long": json.dumps({"inputs": "hello " * 5000}).encode(),
        }
    return {name: body for name, body in cases.items() if body is not None}


BAD_CASES = [
    pytest.param(route, name, id=f"{route}:{name}")
    for route in POST_ROUTES
    for name in _bad_bodies(route)
]


@pytest.fixture(scope="module")
def shared_server(launch_server):
    server = launch_server()
    yield server
    try:
        server.wait_idle()
    finally:
        server.stop()


# Finite values a client may legitimately send (OpenAI and vLLM accept any temperature >= 0);
# they must not fail the server, but a 200 is a fine answer.
MAY_SUCCEED = {"huge temperature"}


@pytest.mark.parametrize(("route", "case"), BAD_CASES)
def test_bad_bodies_get_a_4xx_with_a_message(shared_server, route, case):
    body = _bad_bodies(route)[case]
    response = httpx.post(
        f"{shared_server.url}{route}",
        content=body,
        headers={"content-type": "application/json"},
        timeout=WAIT,
    )
    if case in MAY_SUCCEED and response.status_code == 200:
        return
    assert 400 <= response.status_code < 500, (
        f"{route} {case}: {response.status_code} {response.text[:300]}"
    )
    assert_error_shape(route, response)
    assert httpx.get(f"{shared_server.url}/health").status_code == 200


@pytest.mark.parametrize("route", POST_ROUTES)
def test_bad_content_types_and_methods(shared_server, route):
    url = f"{shared_server.url}{route}"
    form = httpx.post(url, data={"prompt": "Hello"}, timeout=WAIT)
    assert 400 <= form.status_code < 500, form.text
    assert_error_shape(route, form)
    text = httpx.post(url, content=b"Hello", headers={"content-type": "text/plain"}, timeout=WAIT)
    assert 400 <= text.status_code < 500, text.text
    assert_error_shape(route, text)
    get = httpx.get(url, timeout=WAIT)
    assert get.status_code == 405, get.text
    assert_error_shape(route, get)
    assert httpx.get(f"{shared_server.url}/health").status_code == 200


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_json_without_a_json_content_type_says_so(shared_server, route, content_type):
    """`curl -d '{...}'` sends valid JSON with a form's Content-Type, which FastAPI does not
    parse: the answer must name the header, not "Input should be a valid dictionary"."""
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps(_valid(route)).encode()
    response = httpx.post(f"{shared_server.url}{route}", content=body, headers=headers)
    error = assert_error_shape(route, response, 400 if route.startswith("/v1") else 422)
    message = error["error"]["message"] if route.startswith("/v1") else error["error"]
    assert "Content-Type: application/json" in message, message


def test_valid_requests_still_work_after_the_bad_ones(shared_server):
    for route in POST_ROUTES:
        response = httpx.post(f"{shared_server.url}{route}", json=_valid(route), timeout=WAIT)
        assert response.status_code == 200, f"{route}: {response.text}"
    shared_server.wait_idle()


@pytest.mark.parametrize("route", POST_ROUTES)
def test_huge_top_k_does_not_kill_the_engine(launch_server, route):
    server = launch_server()  # stopped without the idle check: the engine may be dead
    try:
        extra = {"do_sample": True} if route in TGI_ROUTES else {}
        response = httpx.post(
            f"{server.url}{route}",
            content=_with(route, top_k=10**30, **extra),
            headers={"content-type": "application/json"},
            timeout=WAIT,
        )
        assert response.status_code < 500, response.text
        assert httpx.get(f"{server.url}/health").status_code == 200
        again = httpx.post(f"{server.url}{route}", json=_valid(route), timeout=WAIT)
        assert again.status_code == 200, again.text
        server.wait_idle()
    finally:
        server.stop()


def test_a_dead_engine_is_named_by_health_and_every_route(launch_server, tiny_checkpoint):
    """A failed engine step (a bug, CUDA out of memory) kills the engine; the server stays up
    answering 503, so /health must say why for the orchestrator that restarts it (it said only
    "the engine is not running"), and so must every route (an AssertionError read "()")."""
    from tulu.engine.engine import LLMEngine

    engine = LLMEngine(tiny_checkpoint.model, tiny_checkpoint.tokenizer, EngineConfig())

    def broken_step():
        raise AssertionError

    engine.step = broken_step
    server = launch_server(engine=engine)  # stopped without the idle check: the engine is dead
    try:
        first = httpx.post(f"{server.url}/v1/completions", json=_valid("/v1/completions"))
        assert first.status_code == 503, first.text
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503
        assert health.json() == {
            "error": "the engine is not running (it stopped: AssertionError())",
            "error_type": "unhealthy",
        }
        for route in POST_ROUTES:
            response = httpx.post(f"{server.url}{route}", json=_valid(route), timeout=WAIT)
            assert response.status_code == 503, f"{route}: {response.text}"
            error = response.json()["error"]
            message = error["message"] if route in OPENAI_ROUTES else error
            assert "AssertionError()" in message, f"{route}: {message}"
        assert scrape(server.url)["tulu_engine_up"][()] == 0  # the gauges alone would not say
    finally:
        server.stop()


@pytest.mark.parametrize("route", OPENAI_ROUTES)
def test_huge_n_is_refused_before_the_engine(new_server, route):
    server = new_server()
    reached: list[int] = []
    add_request = server.engine.add_request

    def guarded(prompt, params=None, request_id=None, arrival_time=None):
        # Stand in for the engine's loop over n, which would take the machine down.
        if params is not None and params.n > 4096:
            reached.append(params.n)
            raise GenerationError(f"test guard: n={params.n} reached the engine")
        return add_request(prompt, params, request_id, arrival_time)

    server.engine.add_request = guarded
    response = httpx.post(
        f"{server.url}{route}",
        content=_with(route, n=10**9),
        headers={"content-type": "application/json"},
        timeout=WAIT,
    )
    assert 400 <= response.status_code < 500, response.text
    assert not reached, f"n={reached[0]} was handed to the engine"
    assert "n" in assert_error_shape(route, response)["error"]["message"]


# ----------------------------------------------------------------------------------------------
# API keys
# ----------------------------------------------------------------------------------------------

KEY = "sk-robustness-0123456789"
GUARDED = [
    ("GET", "/v1/models", None),
    ("GET", "/info", None),
    ("GET", "/metrics", None),
    ("POST", "/v1/completions", _valid("/v1/completions")),
    ("POST", "/v1/chat/completions", _valid("/v1/chat/completions")),
    ("POST", "/generate", _valid("/generate")),
    ("POST", "/generate_stream", _valid("/generate_stream")),
    ("POST", "/", _valid("/generate")),
    ("GET", "/no/such/route", None),
]


def test_api_key_guards_every_route_but_health_and_the_page(new_server):
    server = new_server(api_key=KEY)
    refused = {
        "no key": {},
        "wrong bearer": {"Authorization": "Bearer sk-wrong"},
        "key prefix": {"Authorization": f"Bearer {KEY[:-1]}"},
        "key plus a char": {"Authorization": f"Bearer {KEY}x"},
        "wrong x-api-key": {"x-api-key": "sk-wrong"},
        "bare bearer": {"Authorization": "Bearer"},
        "basic auth": {"Authorization": f"Basic {KEY}"},
        "non-ascii key": {"Authorization": "Bearer sk-ünïcode".encode()},
    }
    accepted = {
        "bearer": {"Authorization": f"Bearer {KEY}"},
        "lowercase scheme": {"Authorization": f"bearer {KEY}"},
        "x-api-key": {"x-api-key": KEY},
    }
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        for method, path, body in GUARDED:
            for label, headers in refused.items():
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, f"{method} {path} {label}: {response.text}"
                error = assert_error_shape(path, response, 401)
                kind = error["error"]["type"] if path.startswith("/v1") else error["error_type"]
                assert kind == "authentication_error"
            for label, headers in accepted.items():
                response = client.request(method, path, json=body, headers=headers)
                expected = 404 if path == "/no/such/route" else 200
                assert response.status_code == expected, f"{method} {path} {label}: {response.text}"
        for path in ("/health", "/"):
            assert client.get(path).status_code == 200, path
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 200
        assert client.head("/health").status_code != 401  # 405: HEAD is not routed


def test_api_key_is_compared_in_constant_time(new_server, monkeypatch):
    server = new_server(api_key=KEY)
    calls = []
    original = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert calls and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    assert (b"nope", KEY.encode()) in calls


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def scrape(url: str, headers: dict | None = None) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of /metrics."""
    response = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=WAIT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def requests_total(samples, route: str, status: int) -> float:
    return samples.get("tulu_requests_total", {}).get(
        (("route", route), ("status", str(status))), 0.0
    )


def test_metrics_report_requests_tokens_latencies_and_the_engine(new_server, slow_model):
    server = new_server(model=slow_model(0.005))
    url = server.url
    prompt_tokens = generated = requests = 0
    with httpx.Client(base_url=url, timeout=WAIT) as client:
        for i in range(3):
            body = {"prompt": f"Hello number {i}", "max_tokens": 5 + i, "ignore_eos": True}
            usage = client.post("/v1/completions", json=body).json()["usage"]
            prompt_tokens += usage["prompt_tokens"]
            generated += usage["completion_tokens"]
            requests += 1
        for i in range(2):
            body = long_body("/v1/chat/completions", 4 + i, True)
            body["stream_options"] = {"include_usage": True}
            events = sse_events(client.post("/v1/chat/completions", json=body).text)
            usage = next(e["usage"] for e in events if isinstance(e, dict) and e.get("usage"))
            prompt_tokens += usage["prompt_tokens"]
            generated += usage["completion_tokens"]
            requests += 1
        tgi = client.post(
            "/generate",
            json={
                "inputs": "Hello there",
                "parameters": {"max_new_tokens": 6, "details": True, "decoder_input_details": True},
            },
        ).json()
        prompt_tokens += len(tgi["details"]["prefill"])
        generated += tgi["details"]["generated_tokens"]
        requests += 1
        assert client.post("/v1/completions", json={"prompt": 5}).status_code == 400
        assert client.post("/generate", json={"inputs": ""}).status_code == 422
        assert client.get("/nowhere").status_code == 404
    server.wait_idle()

    def settled():
        samples = scrape(url)
        return (
            requests_total(samples, "/generate", 422) == 1
            and requests_total(samples, "unmatched", 404) == 1
        )

    wait_for(settled, "the request counters")
    samples = scrape(url)
    assert requests_total(samples, "/v1/completions", 200) == 3
    assert requests_total(samples, "/v1/chat/completions", 200) == 2
    assert requests_total(samples, "/generate", 200) == 1
    assert requests_total(samples, "/v1/completions", 400) == 1
    assert requests_total(samples, "/generate", 422) == 1
    assert requests_total(samples, "unmatched", 404) == 1
    assert samples["tulu_prompt_tokens_total"][()] == prompt_tokens
    assert samples["tulu_generation_tokens_total"][()] == generated
    assert samples["tulu_time_to_first_token_seconds_count"][()] == requests
    assert samples["tulu_e2e_request_latency_seconds_count"][()] == requests
    # Every token after a request's first is one inter-token gap.
    assert samples["tulu_inter_token_latency_seconds_count"][()] == generated - requests
    for name in ("tulu_time_to_first_token_seconds", "tulu_e2e_request_latency_seconds"):
        assert samples[f"{name}_sum"][()] > 0
        buckets = samples[f"{name}_bucket"]
        assert buckets[(("le", "+Inf"),)] == requests
    assert samples["tulu_queue_length"][()] == 0
    assert samples["tulu_running_sequences"][()] == 0
    assert samples["tulu_kv_cache_blocks_used"][()] == 0
    assert samples["tulu_kv_cache_blocks_total"][()] == server.engine.pool.num_blocks > 0
    assert samples["tulu_requests_in_flight"][()] == 0
    assert samples["tulu_engine_up"][()] == 1
    queries = samples["tulu_prefix_cache_queries_total"][()]
    assert queries == server.engine.scheduler.prefix_queries > 0
    assert samples["tulu_prefix_cache_hits_total"][()] == server.engine.scheduler.prefix_hits
    # Counted even with speculative decoding off (0), so dashboards need no special case.
    assert samples["tulu_spec_decode_draft_tokens_total"][()] == server.engine.num_draft_tokens
    assert samples["tulu_spec_decode_accepted_tokens_total"][()] == 0


def test_metrics_leave_out_requests_the_engine_refused(new_server):
    """A request admitted and then refused by the engine (it needs more KV cache than the
    whole pool holds: a 400) processed no token; its prompt tokens and an end-to-end latency
    were counted all the same, as if it had been served."""
    block_bytes = 16 * 2 * 2 * 64 * 4  # tokens x (K, V) x layers x hidden x float32
    server = new_server(engine_config=EngineConfig(kv_cache_bytes=4 * block_bytes))
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        refused = client.post("/v1/completions", json={"prompt": [5] * 100, "max_tokens": 1})
        assert refused.status_code == 400, refused.text
        assert "KV cache" in refused.json()["error"]["message"]
        served = client.post("/v1/completions", json={"prompt": [5] * 10, "max_tokens": 2})
        assert served.status_code == 200, served.text
    server.wait_idle()
    samples = scrape(server.url)
    assert samples["tulu_prompt_tokens_total"][()] == 10
    assert samples["tulu_e2e_request_latency_seconds_count"][()] == 1
    assert samples["tulu_generation_tokens_total"][()] == 2


def test_inter_token_latency_of_n_choices_is_per_sequence(new_server, slow_model):
    """The n choices of one request each get a token per engine step: the time between a
    choice's tokens is the step time, not the step time divided by n."""
    delay, n, tokens = 0.02, 8, 6
    server = new_server(model=slow_model(delay))
    body = {"prompt": "Hello", "max_tokens": tokens, "n": n, "ignore_eos": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=WAIT)
    assert response.status_code == 200, response.text
    server.wait_idle()
    samples = scrape(server.url)
    count = samples["tulu_inter_token_latency_seconds_count"][()]
    assert count == n * tokens - n  # every token after each choice's first
    mean = samples["tulu_inter_token_latency_seconds_sum"][()] / count
    assert mean >= delay / 2, f"mean inter-token latency {mean:.4f} s, each step >= {delay} s"


def test_metrics_count_refused_requests_under_their_route(new_server):
    """401 and 413 are answered by the middleware before routing; they still count under the
    route that was asked for, and only paths that are no route count as "unmatched"."""
    server = new_server(api_key=KEY, max_body_bytes=256)
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        assert client.post("/v1/completions", json=_valid("/v1/completions")).status_code == 401
        assert client.post("/generate", json=_valid("/generate")).status_code == 401
        assert client.get("/nowhere").status_code == 401
        big = {"prompt": "a" * 1000}
        assert client.post("/v1/chat/completions", json=big, headers=auth).status_code == 413
    samples = scrape(server.url, auth)
    assert requests_total(samples, "/v1/completions", 401) == 1
    assert requests_total(samples, "/generate", 401) == 1
    assert requests_total(samples, "/v1/chat/completions", 413) == 1
    assert requests_total(samples, "unmatched", 401) == 1
    assert requests_total(samples, "unmatched", 413) == 0


def test_metrics_show_running_and_queued_requests_and_blocks_in_use(new_server, slow_model):
    server = new_server(model=slow_model(0.02), engine_config=EngineConfig(max_num_seqs=2))

    def busy(samples) -> bool:
        return samples["tulu_running_sequences"][()] == 2 and samples["tulu_queue_length"][()] == 2

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
            route = "/v1/completions"
            tasks = [
                asyncio.create_task(client.post(route, json=long_body(route, 50, False)))
                for _ in range(4)
            ]
            try:
                # The gauges are the engine's counters as of its last step: poll (bounded).
                deadline = time.monotonic() + WAIT
                samples = await asyncio.to_thread(scrape, server.url)
                while not busy(samples) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    samples = await asyncio.to_thread(scrape, server.url)
            finally:
                responses = await asyncio.gather(*tasks, return_exceptions=True)
            return samples, responses

    samples, responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 4
    assert busy(samples), {k: v for k, v in samples.items() if "queue" in k or "running" in k}
    assert samples["tulu_kv_cache_blocks_used"][()] >= 2
    assert samples["tulu_requests_in_flight"][()] == 4
    server.wait_idle()
    wait_for(
        lambda: scrape(server.url)["tulu_kv_cache_blocks_used"][()] == 0, "0 KV blocks in /metrics"
    )
    after = scrape(server.url)
    assert after["tulu_running_sequences"][()] == 0
    assert after["tulu_queue_length"][()] == 0
