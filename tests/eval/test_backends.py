"""Evaluation backends: the in-process engine and an OpenAI-compatible server agree with the
model itself (greedy continuations and candidate next-token log-probabilities)."""

from __future__ import annotations

import math

import pytest
import torch

from tulu.errors import TuluError
from tulu.eval.backends import Decoding, EngineBackend, OpenAIBackend

PROMPTS = ["<|user|>\nHello there\n<|assistant|>\n", "The answer is:", "Question: 2+2?\nAnswer:"]


@pytest.fixture(scope="module")
def checkpoint():
    from server.conftest import TinyCheckpoint
    from tulu.demo import corpus_text, tiny_model, train_tokenizer

    tokenizer = train_tokenizer(corpus_text())
    return TinyCheckpoint(tiny_model(len(tokenizer), 0), tokenizer)


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    return tokenizer.decode(out)


def _candidate_logprobs(model, tokenizer, prompt: str, candidates: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(prompt)]))[0, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[c]) for c in candidates]


def test_engine_backend_matches_the_model(checkpoint):
    from tulu.engine.engine import LLM

    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    backend = EngineBackend(LLM(model, tokenizer), progress=False)
    texts = backend.generate(PROMPTS, Decoding(max_tokens=8))
    assert texts == [[_greedy(model, tokenizer, p, 8)] for p in PROMPTS]
    candidates = [tokenizer.encode(x)[0] for x in ("A", "B", "C", "D")]
    rows = backend.next_token_logprobs(PROMPTS, candidates)
    for prompt, row in zip(PROMPTS, rows, strict=True):
        assert row == pytest.approx(
            _candidate_logprobs(model, tokenizer, prompt, candidates), abs=1e-4
        )


def test_engine_backend_samples_n_per_prompt(checkpoint):
    from tulu.engine.engine import LLM

    backend = EngineBackend(LLM(checkpoint.model, checkpoint.tokenizer), progress=False)
    texts = backend.generate(PROMPTS[:2], Decoding(max_tokens=6, temperature=0.8, n=3, seed=1))
    assert [len(t) for t in texts] == [3, 3]
    again = backend.generate(PROMPTS[:2], Decoding(max_tokens=6, temperature=0.8, n=3, seed=1))
    assert texts == again


def test_openai_backend_against_tulu_serve(checkpoint):
    from server.conftest import start_server

    server = start_server(checkpoint)
    try:
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
        backend = OpenAIBackend(f"http://{server.host}:{server.port}/v1", "tiny", tokenizer)
        texts = backend.generate(PROMPTS, Decoding(max_tokens=8))
        assert texts == [[_greedy(model, tokenizer, p, 8)] for p in PROMPTS]
        stopped = backend.generate(PROMPTS[:1], Decoding(max_tokens=8, stop=("e",)))
        assert "e" not in stopped[0][0]
        candidates = [tokenizer.encode(x)[0] for x in ("A", "B")]
        rows = backend.next_token_logprobs(PROMPTS, candidates)
        for prompt, row in zip(PROMPTS, rows, strict=True):
            expected = _candidate_logprobs(model, tokenizer, prompt, candidates)
            # Only tokens among the server's top 20 come back; the others read as -inf.
            for got, want in zip(row, expected, strict=True):
                assert got == -math.inf or got == pytest.approx(want, abs=1e-3)
    finally:
        server.stop()


def test_openai_backend_names_the_url_when_unreachable(checkpoint):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "tiny", retries=0)
    with pytest.raises(TuluError, match=rf"http://127.0.0.1:{port}/v1/completions: request failed"):
        backend.generate(["hi"], Decoding(max_tokens=2))


def test_tgi_backend_against_tulu_serve(checkpoint):
    from server.conftest import start_server
    from tulu.eval.backends import TGIBackend

    server = start_server(checkpoint)
    try:
        model, tokenizer = checkpoint.model, checkpoint.tokenizer
        backend = TGIBackend(f"http://{server.host}:{server.port}")
        texts = backend.generate(PROMPTS, Decoding(max_tokens=8))
        assert texts == [[_greedy(model, tokenizer, p, 8)] for p in PROMPTS]
        full = _greedy(model, tokenizer, PROMPTS[0], 8)
        stop = next((c for c in full[1:] if c.strip()), None)
        if stop is not None:  # the stop text is cut, as the engine and OpenAI routes do
            (stopped,) = backend.generate(PROMPTS[:1], Decoding(max_tokens=8, stop=(stop,)))
            assert stopped == [full[: full.index(stop)]]
        sampled = backend.generate(
            PROMPTS[:1], Decoding(max_tokens=5, temperature=0.9, n=3, seed=4)
        )
        assert len(sampled[0]) == 3
        assert sampled == backend.generate(
            PROMPTS[:1], Decoding(max_tokens=5, temperature=0.9, n=3, seed=4)
        )
        top = int(
            torch.tensor(
                _candidate_logprobs(model, tokenizer, PROMPTS[1], list(range(600)))
            ).argmax()
        )
        rows = backend.next_token_logprobs(PROMPTS[1:2], [top, 599])
        expected = _candidate_logprobs(model, tokenizer, PROMPTS[1], [top, 599])
        assert rows[0][0] == pytest.approx(expected[0], abs=1e-3)
        assert rows[0][1] == -math.inf or rows[0][1] == pytest.approx(expected[1], abs=1e-3)
    finally:
        server.stop()
