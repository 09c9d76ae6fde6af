"""Request-size limit (413 before the body is read) and HEAD /health."""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize(
    ("route", "shape"),
    [("/v1/completions", "openai"), ("/v1/chat/completions", "openai"), ("/generate", "tgi")],
)
def test_oversized_body_is_refused_with_413(make_server, route, shape):
    server = make_server(max_body_bytes=4096)
    body = b'{"prompt": "' + b"a" * 10_000 + b'"}'
    response = httpx.post(
        f"{server.url}{route}",
        content=body,
        headers={**server.headers, "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    payload = response.json()
    message = payload["error"]["message"] if shape == "openai" else payload["error"]
    assert "larger than 4096 bytes" in message
    # A body under the limit still works, and the server is healthy.
    ok = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "Hi", "max_tokens": 2},
        headers=server.headers,
        timeout=30,
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("route", "shape"),
    [
        ("/v1/completions", "openai"),
        ("/v1/chat/completions", "openai"),
        ("/generate", "tgi"),
        ("/", "tgi"),
    ],
)
def test_oversized_chunked_body_is_refused_with_413(make_server, route, shape):
    """Without Content-Length the limit is hit while FastAPI reads the body: still a 413 that
    says why, not FastAPI's generic 400 "There was an error parsing the body"."""
    server = make_server(max_body_bytes=4096)

    def chunks():  # a generator body is sent chunked, with no Content-Length
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    response = httpx.post(
        f"{server.url}{route}",
        content=chunks(),
        headers={**server.headers, "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413, response.text
    payload = response.json()
    message = payload["error"]["message"] if shape == "openai" else payload["error"]
    assert "larger than 4096 bytes" in message


def test_head_health(make_server):
    server = make_server()
    assert httpx.head(f"{server.url}/health", timeout=30).status_code == 200


def test_tokenizing_a_large_prompt_does_not_hold_up_the_event_loop(make_server, monkeypatch):
    """A ~900 KB prompt is tokenized on a worker thread: /health answers meanwhile.

    The tokenization is held until /health has answered; had it run on the event loop,
    /health could not answer while it is held, and its request would time out.
    """
    import threading

    server = make_server()
    prompt = "The quick brown fox jumps over the lazy dog. " * 20_000
    tokenizing, release = threading.Event(), threading.Event()
    encode_batch = server.tokenizer.encode_batch

    def held_encode_batch(texts: list[str]) -> list[list[int]]:
        tokenizing.set()
        release.wait(60)
        return encode_batch(texts)

    monkeypatch.setattr(server.tokenizer, "encode_batch", held_encode_batch)
    result = {}

    def post() -> None:
        result["response"] = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": prompt, "max_tokens": 2},
            headers=server.headers,
            timeout=90,
        )

    worker = threading.Thread(target=post)
    worker.start()
    try:
        assert tokenizing.wait(30), "the long prompt was not tokenized with encode_batch"
        assert httpx.get(f"{server.url}/health", timeout=15).status_code == 200
    finally:
        release.set()
        worker.join()
    assert result["response"].status_code == 400  # far longer than the context window
    assert "context window" in result["response"].json()["error"]["message"]
