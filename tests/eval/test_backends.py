"""Evaluation backends: the in-process engine and an OpenAI-compatible server agree with the
model itself (greedy continuations and candidate next-token log-probabilities)."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def _prompt_of(tokenizer, tokens: int) -> tuple[str, int]:
    """A prompt of about `tokens` tokens, and its exact length."""
    ids = tokenizer.encode("Question: what comes next in this long story? " * tokens)[:tokens]
    prompt = tokenizer.decode(ids)
    return prompt, len(tokenizer.encode(prompt))


def test_every_backend_fits_max_tokens_into_the_window(checkpoint):
    """A server refuses prompt + max_tokens beyond its window (400), so the HTTP backends cap
    max_tokens per prompt as the engine does, with the window the server reports."""
    from server.conftest import start_server
    from tulu.engine.engine import LLM
    from tulu.eval.backends import TGIBackend

    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    window = model.config.max_position_embeddings  # 512
    near, length = _prompt_of(tokenizer, window - 6)
    assert 0 < window - length < 12
    full, _ = _prompt_of(tokenizer, window + 5)  # fills the window on its own
    decoding = Decoding(max_tokens=512)  # BBH's and the protocol's, more than the room left
    expected = [[_greedy(model, tokenizer, near, window - length)], [""]]

    engine = EngineBackend(LLM(model, tokenizer), progress=False)
    assert engine.generate([near, full], decoding) == expected
    server = start_server(checkpoint)
    try:
        backends = [
            OpenAIBackend(f"http://{server.host}:{server.port}/v1", "tiny", tokenizer),
            TGIBackend(f"http://{server.host}:{server.port}", tokenizer=tokenizer),
        ]
        for backend in backends:
            assert backend.window() == window  # /v1/models' max_model_len, /info's total
            assert backend.generate([near, full], decoding) == expected
            assert backend.too_long == 1  # the prompt that fills the window was not sent
            sampled = backend.generate([near], Decoding(max_tokens=512, n=2, temperature=0.5))
            assert len(sampled[0]) == 2
    finally:
        server.stop()
    assert engine.too_long == 1


class _Recorder(ThreadingHTTPServer):
    """A server that reports no context window: records what the backends send."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # /v1/models without max_model_len, /info without sizes
                self._send({"data": [{"id": "tiny", "object": "model"}]})

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                recorder.payloads.append(payload)
                if self.path.endswith("/completions"):
                    self._send({"choices": [{"index": 0, "text": "ok"}]})
                else:
                    self._send({"generated_text": "ok"})

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_api_backends_fall_back_when_the_server_does_not_say(checkpoint):
    from tulu.eval.backends import TGIBackend

    tokenizer = checkpoint.tokenizer
    prompt, length = _prompt_of(tokenizer, 290)
    recorder = _Recorder()
    threading.Thread(target=recorder.serve_forever, args=(0.05,), daemon=True).start()
    try:
        for make, key in (
            (lambda **kw: OpenAIBackend(recorder.url + "/v1", "tiny", tokenizer, **kw), None),
            (lambda **kw: TGIBackend(recorder.url, tokenizer=tokenizer, **kw), "parameters"),
        ):
            given, default = make(context_window=300), make()
            assert (given.window(), default.window()) == (300, 2048)
            for backend, sent in ((given, 300 - length), (default, 512)):
                recorder.payloads.clear()
                assert backend.generate([prompt], Decoding(max_tokens=512)) == [["ok"]]
                (payload,) = recorder.payloads
                payload = payload[key] if key else payload
                assert payload.get("max_tokens", payload.get("max_new_tokens")) == sent
    finally:
        recorder.shutdown()
        recorder.server_close()
    # unreachable: the window falls back too (the request itself then names the URL)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert OpenAIBackend(f"http://127.0.0.1:{port}/v1", "tiny").window() == 2048


def _cached_runs(checkpoint, tmp_path, capsys, recorder, runs) -> tuple[list[int], list[str]]:
    """`tulu eval` of one BBH CoT example against `recorder`, once per entry of `runs` (each
    sets the server up and returns that run's own arguments), sharing one output directory
    and its cache: the requests each run sent, and its stderr."""
    from tulu.cli import main
    from tulu.demo.eval_data import write_eval_data
    from tulu.model.checkpoint import save_model

    save_model(checkpoint.model, tmp_path / "model", tokenizer=checkpoint.tokenizer)
    data = write_eval_data(tmp_path / "data")
    threading.Thread(target=recorder.serve_forever, args=(0.05,), daemon=True).start()
    sent, errors = [], []
    try:
        for run in runs:
            recorder.payloads.clear()
            args = ["eval", str(tmp_path / "model"), "--data-dir", str(data.data_dir)]
            args += ["--task", "bbh_cot", "--max-examples", "1", "--output", str(tmp_path / "o")]
            assert main([*args, *run()]) == 0, capsys.readouterr().err
            sent.append(len(recorder.payloads))
            errors.append(capsys.readouterr().err)
    finally:
        recorder.shutdown()
        recorder.server_close()
    return sent, errors


def test_answers_cached_under_another_window_are_not_reused(checkpoint, tmp_path, capsys):
    """The window decides which prompts are skipped and how many tokens each may get; the
    cache used to answer a rerun with a larger --max-model-len from the smaller one's run."""
    recorder = _Recorder()
    api = ["--api-base", recorder.url + "/v1", "--api-model", "tiny"]
    runs = [
        lambda window=window: [*api, "--max-model-len", window]
        for window in ("400", "2048", "2048")
    ]
    sent, _ = _cached_runs(checkpoint, tmp_path, capsys, recorder, runs)
    assert sent[0] == 0  # every prompt too long for 400 tokens: empty answers, cached
    assert sent[1] > 0  # another window: asked again, not answered with those
    assert sent[2] == 0  # the same window again: every answer from the cache


def test_tgi_answers_cached_under_another_input_limit_are_not_reused(checkpoint, tmp_path, capsys):
    """TGI's max_input_tokens also decides which prompts are skipped (empty answers): a server
    restarted with a larger one must be asked again, not answered from the smaller one's run."""
    info = {"max_total_tokens": 2048}
    recorder = _Recorder()

    def do_get(handler) -> None:  # /info: the same window, the input limit set per run
        handler._send(info)

    recorder.RequestHandlerClass.do_GET = do_get

    def run(max_input: int) -> list[str]:
        info["max_input_tokens"] = max_input
        return ["--api-base", recorder.url, "--api-style", "tgi"]

    runs = [lambda max_input=max_input: run(max_input) for max_input in (400, 2047, 2047)]
    sent, errors = _cached_runs(checkpoint, tmp_path, capsys, recorder, runs)
    assert sent[0] == 0  # every prompt longer than 400 input tokens: empty answers, cached
    # ... and the notice names the limit that skipped them, not only the window
    limit = "did not fit the 2048-token window or the server's 400-token input limit"
    assert limit in errors[0]
    assert sent[1] > 0  # a larger input limit: asked again
    assert sent[2] == 0  # the same limits again: every answer from the cache


def test_tulu_eval_engine_options(checkpoint, tmp_path, capsys, monkeypatch):
    """The in-process engine takes the engine flags; --max-model-len caps its window (more
    prompts out of reach), and answers cached under the model's own window are not reused."""
    import tulu.engine.engine
    from tulu.cli import main
    from tulu.demo.eval_data import write_eval_data
    from tulu.model.checkpoint import save_model

    save_model(checkpoint.model, tmp_path / "model", tokenizer=checkpoint.tokenizer)
    data = write_eval_data(tmp_path / "data")
    common = ["eval", str(tmp_path / "model"), "--data-dir", str(data.data_dir), "--device", "cpu"]
    common += ["--task", "bbh_cot", "--max-examples", "1", "--output", str(tmp_path / "o")]
    configs = []
    real_init = tulu.engine.engine.LLMEngine.__init__

    def recording_init(self, model, tokenizer, config=None, *args, **kwargs):
        configs.append(config)
        real_init(self, model, tokenizer, config, *args, **kwargs)

    monkeypatch.setattr(tulu.engine.engine.LLMEngine, "__init__", recording_init)
    assert main([*common, "--max-num-seqs", "3", "--no-enable-prefix-caching"]) == 0
    assert (configs[-1].max_num_seqs, configs[-1].enable_prefix_caching) == (3, False)
    uncapped = _details(tmp_path / "o")["prompts_too_long"]
    capsys.readouterr()
    assert main([*common, "--max-model-len", "300"]) == 0
    assert configs[-1].max_model_len == 300
    assert "did not fit the 300-token window" in capsys.readouterr().err
    assert _details(tmp_path / "o")["prompts_too_long"] > uncapped
    assert main([*common, "--max-model-len", "513"]) == 1
    assert "--max-model-len is 513, beyond the model's context window of 512" in (
        capsys.readouterr().err
    )
    assert main([*common, "--kv-cache-gb", "0"]) == 1
    assert "--kv-cache-gb must be a finite number > 0, got 0.0" in capsys.readouterr().err


def test_tulu_eval_engine_bar_follows_the_terminal(checkpoint, tmp_path, capsys, monkeypatch):
    """The engine's generation bar follows EvalContext.progress_bars, as the sandbox's does:
    none when stderr is not a terminal. EngineBackend's own default used to draw one per
    generate call into a batch job's log, with no way to turn it off."""
    import sys

    from tulu.cli import main
    from tulu.demo.eval_data import write_eval_data
    from tulu.model.checkpoint import save_model

    save_model(checkpoint.model, tmp_path / "model", tokenizer=checkpoint.tokenizer)
    data = write_eval_data(tmp_path / "data")
    common = ["eval", str(tmp_path / "model"), "--data-dir", str(data.data_dir), "--device", "cpu"]
    common += ["--task", "mmlu_0shot", "--max-examples", "1"]
    assert main([*common, "--output", str(tmp_path / "log")]) == 0
    assert "generating" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*common, "--output", str(tmp_path / "terminal")]) == 0
    assert "generating" in capsys.readouterr().err


def test_tulu_eval_over_the_api_runs_prompts_near_the_window(checkpoint, tmp_path, capsys):
    """`tulu eval --api-base` used to stop on bbh_cot: its 512 new tokens do not fit after a
    long prompt. Now max_tokens is fitted to the window the server reports (512 here)."""
    from tulu.cli import main
    from tulu.demo.eval_data import write_eval_data
    from tulu.model.checkpoint import save_model

    save_model(checkpoint.model, tmp_path / "model", tokenizer=checkpoint.tokenizer)
    data = write_eval_data(tmp_path / "data")
    common = ["eval", str(tmp_path / "model"), "--data-dir", str(data.data_dir)]
    common += ["--task", "bbh_cot", "--max-examples", "1"]
    assert main([*common, "--output", str(tmp_path / "local"), "--device", "cpu"]) == 0
    too_long = _details(tmp_path / "local")["prompts_too_long"]
    assert too_long > 0 and "did not fit the 512-token window" in capsys.readouterr().err
    for style, captured in _eval_over_both_apis(checkpoint, common, tmp_path, capsys):
        assert "context window of 512 tokens" in captured.err
        assert captured.out.startswith("| BBH CoT | Average |")
        # the same prompts are out of reach over the API as in-process
        assert _details(tmp_path / style)["prompts_too_long"] == too_long


def _eval_over_both_apis(checkpoint, common: list[str], tmp_path, capsys):
    """Run `tulu eval` with arguments `common` against a `tulu serve` of `checkpoint` in the
    OpenAI and then the TGI style (results under tmp_path/STYLE); yield (style, captured)."""
    from server.conftest import start_server
    from tulu.cli import main

    server = start_server(checkpoint)
    try:
        for style, base in (("openai", "/v1"), ("tgi", "")):
            args = [*common, "--output", str(tmp_path / style)]
            args += ["--api-base", f"http://{server.host}:{server.port}{base}"]
            args += ["--api-style", style, "--api-model", "tiny"]
            assert main(args) == 0, capsys.readouterr().err
            yield style, capsys.readouterr()
    finally:
        server.stop()


def _details(output) -> dict:
    (result,) = json.loads((output / "results.json").read_text(encoding="utf-8"))["results"]
    return result["details"]


def _top_text_token(tokenizer, row: list[float]) -> int:
    """The most likely token of a full-vocabulary row that decodes to whole text (the OpenAI
    API names byte tokens its own way, so the backend cannot look those up)."""
    for token in sorted(range(len(row)), key=lambda t: -row[t]):
        text = tokenizer.decode([token])
        if text and "\ufffd" not in text:
            return token
    raise AssertionError("no text token")


def test_every_backend_cuts_over_long_scoring_prompts_alike(checkpoint):
    """MMLU scoring needs room for one token after the prompt. The engine keeps the last
    window - 1 tokens of a longer prompt and counts it; the HTTP backends used to send it
    whole, and the server's 400 stopped the run. Now they send the same last tokens (as
    text), count the same prompts, and read the same log-probabilities."""
    from server.conftest import start_server
    from tulu.engine.engine import LLM
    from tulu.eval.backends import TGIBackend

    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    window = model.config.max_position_embeddings  # 512
    fits, fits_length = _prompt_of(tokenizer, window - 1)  # exactly room for the answer
    edge, edge_length = _prompt_of(tokenizer, window)  # fills the window: cut by one token
    long, long_length = _prompt_of(tokenizer, window + 90)
    assert (fits_length, edge_length, long_length) == (window - 1, window, window + 90)
    for prompt in (edge, long):  # the cut text is the engine's ids: the rows must agree
        tail = tokenizer.encode(prompt)[-(window - 1) :]
        assert tokenizer.encode(tokenizer.decode(tail)) == tail
    prompts = [PROMPTS[1], fits, edge, long]

    engine = EngineBackend(LLM(model, tokenizer), progress=False)
    full = engine.next_token_logprobs(prompts, list(range(len(tokenizer))))
    assert engine.too_long == 2
    assert full[1] == pytest.approx(
        _candidate_logprobs(model, tokenizer, fits, list(range(len(tokenizer)))), abs=1e-4
    )
    # each prompt's most likely text token: among a server's top 20 alternatives
    candidates = list(dict.fromkeys(_top_text_token(tokenizer, row) for row in full))
    server = start_server(checkpoint)
    try:
        url = f"http://{server.host}:{server.port}"
        for backend in (
            OpenAIBackend(url + "/v1", "tiny", tokenizer, retries=0),
            TGIBackend(url, tokenizer=tokenizer, retries=0, top_n_tokens=20),
        ):
            rows = backend.next_token_logprobs(prompts, candidates)
            assert backend.too_long == 2, type(backend).__name__
            for row, want in zip(rows, full, strict=True):
                for got, token in zip(row, candidates, strict=True):
                    rank = sum(v > want[token] for v in want)
                    if rank < 19:  # among the top 20 (a margin for rounding at the edge)
                        assert got == pytest.approx(want[token], abs=1e-3)
                    else:
                        assert got == -math.inf or got == pytest.approx(want[token], abs=1e-3)
                assert max(row) > -math.inf
    finally:
        server.stop()


@pytest.mark.parametrize("which", ["tiny", "gpt-neox-20b"])
def test_scoring_cut_starts_on_a_whole_character(checkpoint, request, which):
    """The text sent for a cut prompt re-encodes within the limit and is the prompt's own
    tail: a cut through a multi-byte character moves right instead of sending U+FFFD (which
    GPT-NeoX's vocabulary holds as one token, so the length alone does not catch it)."""
    from tulu.eval.backends import _fit_for_scoring
    from tulu.tokenizer import Tokenizer

    if which == "tiny":
        tokenizer = checkpoint.tokenizer
    else:
        tokenizer = Tokenizer.from_file(request.getfixturevalue("neox_tokenizer_path"))
    prompt = "Größe? naïve café, 東京 ✓ — the answer is:" * 6
    length = len(tokenizer.encode(prompt))
    replaced = 0
    for limit in range(1, length + 2):
        (text,), cut = _fit_for_scoring(tokenizer, [prompt], limit)
        assert cut == (length > limit)
        assert len(tokenizer.encode(text)) <= limit
        assert prompt.endswith(text) and text
        ids = tokenizer.encode(prompt)
        replaced += tokenizer.decode(ids[len(ids) - limit :]).startswith("\ufffd")
    assert replaced > 0  # some cuts did fall inside a character


def test_tulu_eval_mmlu_over_the_api_counts_the_same_prompts_too_long(checkpoint, tmp_path, capsys):
    """An MMLU question too long for the window even 0-shot: in-process it is scored on its
    last tokens and counted; over the API the run used to stop with the server's 400."""
    import csv

    from tulu.cli import main
    from tulu.demo.eval_data import write_eval_data
    from tulu.eval import mmlu
    from tulu.model.checkpoint import save_model

    save_model(checkpoint.model, tmp_path / "model", tokenizer=checkpoint.tokenizer)
    data = write_eval_data(tmp_path / "data")
    long_question = "Which of these follows from the story told so far? " * 60
    for subject in mmlu.SUBJECTS[:2]:
        path = data.data_dir / "mmlu" / "data" / "test" / f"{subject}_test.csv"
        with path.open("a", newline="", encoding="utf-8") as out:
            csv.writer(out).writerow([long_question, "one", "two", "three", "four", "B"])
    common = ["eval", str(tmp_path / "model"), "--data-dir", str(data.data_dir)]
    common += ["--task", "mmlu_0shot"]
    assert main([*common, "--output", str(tmp_path / "local"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert _details(tmp_path / "local")["prompts_too_long"] == 2
    for style, _ in _eval_over_both_apis(checkpoint, common, tmp_path, capsys):
        details = _details(tmp_path / style)
        assert details["prompts_too_long"] == 2, style
        assert details["questions"] == _details(tmp_path / "local")["questions"]


def _answering(body: bytes):
    """An httpx client whose every POST is answered 200 with `body` (GETs: no window)."""
    import httpx

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404)
        return httpx.Response(200, content=body)

    return httpx.Client(transport=httpx.MockTransport(handle))


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>gateway</html>", "not JSON"),
        (b'{"error": {"message": "overloaded"}}', "unexpected answer"),
        (b'{"choices": [{"index": 0, "text": "a"}]}', "unexpected answer"),  # 1 of 2 samples
        (b'{"choices": [{"index": 0, "text": null}, {"index": 1, "text": "b"}]}', "unexpected"),
        (b'{"generated_text": 3}', "unexpected answer"),
        (b"[]", "unexpected answer"),
    ],
)
def test_api_backends_name_the_url_for_an_answer_they_cannot_read(body, why):
    """A 200 that is not the API's layout (a proxy's page, an error object, fewer samples
    than asked): an error naming the URL, not a KeyError or a short sample list."""
    from tulu.eval.backends import TGIBackend

    for backend, url in (
        (OpenAIBackend("http://server/v1", "tiny"), "http://server/v1/completions"),
        (TGIBackend("http://server"), "http://server/generate"),
    ):
        backend._client = _answering(body)
        with pytest.raises(TuluError, match=rf"^{url}: .*{why}"):
            backend.generate(["hi"], Decoding(max_tokens=2, n=2))


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": [{"index": 0, "text": "a"}]}',  # OpenAI layout, logprobs ignored
        b'{"choices": [{"index": 0, "text": "a", "logprobs": {"top_logprobs": [{}]}}]}',
        b'{"generated_text": "a"}',  # TGI layout, details / top_n_tokens ignored
        b'{"generated_text": "a", "details": {"top_tokens": [[]]}}',
    ],
)
def test_api_scoring_refuses_answers_without_alternatives(checkpoint, body):
    """A server that ignores logprobs / top_n_tokens would score every candidate -inf and
    answer "A" to every MMLU question; that is an error, not a 25% accuracy."""
    from tulu.eval.backends import TGIBackend

    tokenizer = checkpoint.tokenizer
    for backend, url in (
        (OpenAIBackend("http://server/v1", "tiny", tokenizer), "http://server/v1/completions"),
        (TGIBackend("http://server", tokenizer=tokenizer), "http://server/generate"),
    ):
        backend._client = _answering(body)
        with pytest.raises(TuluError, match=rf"^{url}: unexpected answer"):
            backend.next_token_logprobs(["hi"], [1, 2])


@pytest.mark.usefixtures("one_thread")
def test_eval_prompts_sharing_few_shot_exemplars_reuse_cached_blocks(checkpoint, tmp_path):
    """BBH's prompts of one task share its few-shot exemplars: through the in-process backend
    they take those KV blocks from the prefix cache (none with caching off), and the answers
    are the same either way. Generations are cut to 2 tokens to keep the test fast."""
    import dataclasses

    from tulu.demo.eval_data import write_eval_data
    from tulu.engine.engine import LLM, EngineConfig
    from tulu.eval.runner import EvalContext, run_tasks

    data = write_eval_data(tmp_path)
    rates, outputs = {}, {}
    for caching in (True, False):
        llm = LLM(
            checkpoint.model, checkpoint.tokenizer, EngineConfig(enable_prefix_caching=caching)
        )
        engine = EngineBackend(llm, progress=False)

        @dataclasses.dataclass
        class Short:
            engine: EngineBackend

            def generate(self, prompts, decoding):
                return self.engine.generate(prompts, dataclasses.replace(decoding, max_tokens=2))

        ctx = EvalContext(
            backend=Short(engine),
            tokenizer=checkpoint.tokenizer,
            data_dir=data.data_dir,
            context_window=engine.context_window,
        )
        (result,) = run_tasks(["bbh_direct"], ctx)
        rates[caching] = llm.engine.stats()["prefix_cache_hit_rate"]
        outputs[caching] = [p["output"] for p in result.predictions]
    assert rates[True] > 0, rates
    assert rates[False] == 0.0
    assert outputs[True] == outputs[False]
