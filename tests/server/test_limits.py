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


def test_head_health(make_server):
    server = make_server()
    assert httpx.head(f"{server.url}/health", timeout=30).status_code == 200


def test_tokenizing_a_large_prompt_does_not_hold_up_the_event_loop(make_server):
    """A ~900 KB prompt is tokenized on a worker thread: /health answers meanwhile."""
    import threading
    import time

    server = make_server()
    prompt = "The quick brown fox jumps over the lazy dog. " * 20_000
    result = {}

    def post() -> None:
        result["response"] = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": prompt, "max_tokens": 2},
            headers=server.headers,
            timeout=60,
        )

    worker = threading.Thread(target=post)
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        started = time.perf_counter()
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
    worker.join()
    assert result["response"].status_code == 400  # far longer than the context window
    assert "context window" in result["response"].json()["error"]["message"]
    assert slowest < 0.2, f"/health took {slowest:.3f} s while the prompt was tokenized"
