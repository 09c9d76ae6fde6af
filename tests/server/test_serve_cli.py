"""`tulu serve` as a real process: start-up log, API keys from the flag and the environment,
and SIGTERM: in-flight streams are drained within `--drain-timeout`, new connections are
refused, and the process exits by itself.

Each test starts the CLI (`tulu.cli.main`, as the console script does) on a free port of
127.0.0.1 with a tiny checkpoint saved by `save_model`, and talks to it with httpx. Every
process started here is killed at the end of its test if it is still running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tulu.errors import GenerationError, TuluError

pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the server extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from tulu.demo import corpus_text, train_tokenizer  # noqa: E402
from tulu.model import GPTNeoXForCausalLM, preset  # noqa: E402
from tulu.model.checkpoint import save_model  # noqa: E402
from tulu.server.launch import DrainCutLog  # noqa: E402

CONTEXT = 4096  # long enough for a stream that lasts a while on a fast CPU
STARTUP_TIMEOUT = 90.0
CLI = "import sys; from tulu.cli import main; sys.exit(main())"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random GPT-NeoX with the demo tokenizer, saved as an HF checkpoint directory."""
    tokenizer = train_tokenizer(corpus_text())
    config = preset(
        "pythia-14m",
        vocab_size=640,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        torch_dtype="float32",
        max_position_embeddings=CONTEXT,
        initializer_range=0.1,
    )
    model = GPTNeoXForCausalLM(config)
    model.init_weights(0)
    return save_model(
        model.eval(), tmp_path_factory.mktemp("serve-cli") / "tiny", tokenizer=tokenizer
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """The exit code; fails (with the log) if the process is still running after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"tulu serve still running {timeout} s later; log:\n{self.log()[-3000:]}"
            ) from None


def launch(
    checkpoint: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Served:
    """Start `tulu serve CHECKPOINT --port P ARGS` and return once /health answers 200."""
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    environment = {k: v for k, v in os.environ.items() if k != "TULU_API_KEY"}
    environment.update(env or {})
    environment.setdefault("OMP_NUM_THREADS", "1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "serve", str(checkpoint), "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
        )
    served = Served(proc, port, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"tulu serve exited with {proc.returncode}:\n{served.log()}")
        try:
            if httpx.get(f"{served.url}/health", timeout=2.0).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise AssertionError(
                f"tulu serve not healthy after {STARTUP_TIMEOUT} s:\n{served.log()}"
            )
        time.sleep(0.1)


def kill_all(started: list[Served]) -> None:
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(10)


@pytest.fixture
def serve(checkpoint, tmp_path):
    """Factory: `serve(*cli_args, env={...})` -> a healthy `tulu serve` (see `launch`).
    Processes still alive at teardown are killed."""
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Served:
        started.append(launch(checkpoint, tmp_path, *args, env=env))
        return started[-1]

    yield start
    kill_all(started)


# ----------------------------------------------------------------------------------------------
# Start-up and API keys
# ----------------------------------------------------------------------------------------------


def test_startup_log_names_the_model_memory_and_url(serve, checkpoint):
    served = serve("--served-model-name", "tiny-cli", "--max-num-seqs", "4")
    log = served.log()
    assert f"loaded {checkpoint}" in log
    assert "parameters" in log and "float32 on cpu" in log
    assert "weights" in log and "KV cache" in log and "GiB" in log and "blocks of 16 tokens" in log
    assert f"serving 'tiny-cli' at http://127.0.0.1:{served.port}" in log
    assert "API key required" not in log
    models = httpx.get(f"{served.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-cli"]
    # The start-up line uses the checkpoint path as the model name by default.
    assert httpx.get(f"{served.url}/info", timeout=10).json()["max_concurrent_requests"] == 4 + 1024


@pytest.mark.parametrize("how", ["flag", "env"])
def test_api_key_from_flag_or_environment(serve, how):
    if how == "flag":
        served = serve("--api-key", "s3cret-flag")
        key = "s3cret-flag"
    else:
        served = serve(env={"TULU_API_KEY": "s3cret-env"})
        key = "s3cret-env"
    assert "API key required" in served.log()
    url = served.url
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    assert "API key" in wrong.json()["error"]["message"]
    ok = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert ok.status_code == 200
    assert httpx.get(f"{url}/info", headers={"x-api-key": key}, timeout=10).status_code == 200
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    served.proc.send_signal(signal.SIGTERM)
    served.wait(30)


def test_bad_flags_are_refused_without_a_traceback(checkpoint):
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            "serve",
            str(checkpoint),
            "--max-num-seqs",
            "0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "--max-num-seqs must be >= 1" in run.stderr
    assert "Traceback" not in run.stderr


def test_engine_options_reach_the_engine(checkpoint, monkeypatch) -> None:
    """vLLM's engine flags size the served engine: the window the APIs report and check,
    the step budget, prefix caching, the KV-cache share of free memory (GPU only: on CPU,
    --kv-cache-gb)."""
    from server.conftest import record_started_apps
    from tulu.cli import main

    apps = record_started_apps(monkeypatch)
    flags = ["--max-model-len", "100", "--max-num-batched-tokens", "64", "--max-num-seqs", "8"]
    flags += ["--kv-cache-gb", "0.001"]
    flags += ["--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5"]
    assert main(["serve", str(checkpoint), "--port", str(free_port()), *flags]) == 0
    service = apps[0].state.service
    engine = service.llm.engine
    assert service.max_model_len == engine.max_model_len == 100
    with pytest.raises(GenerationError, match="but the max_model_len is 100 tokens"):
        service.check_length(90, 20)  # the cap, not the model's window of 512, is named
    assert engine.scheduler.max_num_batched_tokens == 64
    assert not engine.pool.enable_prefix_caching
    assert engine.config.gpu_memory_fraction == 0.5
    assert engine.cache.nbytes <= 0.001 * 2**30


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-cache-gb", "nan"], "--kv-cache-gb must be a finite number > 0, got nan"),
        (["--kv-cache-gb", "inf"], "--kv-cache-gb must be a finite number > 0, got inf"),
        (["--max-model-len", "0"], "--max-model-len must be >= 1, got 0"),
        (["--max-num-batched-tokens", "-4"], "--max-num-batched-tokens must be >= 1, got -4"),
        (
            ["--max-num-batched-tokens", "64", "--max-num-seqs", "65"],
            "--max-num-batched-tokens (64) must be at least --max-num-seqs (65)",
        ),
        (
            ["--gpu-memory-utilization", "1.5"],
            "--gpu-memory-utilization must be in (0, 1], got 1.5",
        ),
        (
            ["--gpu-memory-utilization", "nan"],
            "--gpu-memory-utilization must be in (0, 1], got nan",
        ),
        (
            ["--request-timeout", "0"],
            "--request-timeout must be a finite number > 0 or inf (no timeout), got 0.0",
        ),
        (
            ["--request-timeout", "nan"],
            "--request-timeout must be a finite number > 0 or inf (no timeout), got nan",
        ),
        (
            ["--request-timeout=-inf"],
            "--request-timeout must be a finite number > 0 or inf (no timeout), got -inf",
        ),
        (["--drain-timeout", "-5"], "--drain-timeout must be a finite number >= 0, got -5.0"),
        (["--max-best-of", "0"], "--max-best-of must be >= 1 and <= 128"),
        (
            ["--max-best-of", "129"],
            "--max-best-of must be >= 1 and <= 128 (the OpenAI route's limit), got 129",
        ),
    ],
)
def test_non_finite_or_non_positive_sizes_and_timeouts_are_refused(
    checkpoint, flags, message, capsys, monkeypatch
):
    """float() takes "nan" and "inf": --kv-cache-gb nan was a ValueError traceback, and a
    --request-timeout of 0 (or below) served a server that answered every request with 504."""
    from tulu.cli import main
    from tulu.server import launch

    def no_serving(config):
        raise AssertionError(f"{flags} was accepted: the server started")

    monkeypatch.setattr(launch, "_graceful_server", no_serving)
    assert main(["serve", str(checkpoint), "--port", str(free_port()), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "loaded" not in err  # refused before the model was loaded


@pytest.mark.parametrize(
    ("max_best_of", "message"),
    [
        (0, "max_best_of must be >= 1 and <= 128, got 0"),
        (129, "max_best_of must be >= 1 and <= 128, got 129"),
        (True, "max_best_of must be an integer, got True"),
        ("2", "max_best_of must be an integer, got '2'"),
    ],
)
def test_a_max_best_of_out_of_range_is_refused_by_the_settings(max_best_of, message):
    """Built in code (not by `tulu serve`), a max_best_of of 0 was served, and every TGI
    request failed validation; it is refused where the settings are made."""
    from tulu.server.service import ServerSettings

    with pytest.raises(TuluError) as err:
        ServerSettings(served_model_name="m", max_best_of=max_best_of)
    assert str(err.value) == message
    assert ServerSettings(served_model_name="m", max_best_of=128).max_best_of == 128


def test_a_kv_cache_smaller_than_one_request_is_refused(checkpoint, capsys, monkeypatch):
    """--kv-cache-gb 0.0001 (6 blocks, 96 tokens) served a model whose /v1/models and /info
    advertised a window of CONTEXT tokens, and answered every request longer than 96 tokens
    with a 400; vLLM refuses to start so, naming the flags to change."""
    from server.conftest import record_started_apps
    from tulu.cli import main
    from tulu.server import launch

    def no_serving(config):
        raise AssertionError("a KV cache of 96 tokens was accepted: the server started")

    monkeypatch.setattr(launch, "_graceful_server", no_serving)
    flags = ["--kv-cache-gb", "0.0001", "--port", str(free_port())]
    assert main(["serve", str(checkpoint), *flags]) == 1
    err = capsys.readouterr().err
    assert "the KV cache holds 96 tokens (6 blocks of 16)" in err, err
    assert f"--max-model-len {CONTEXT} needs ({CONTEXT - 1})" in err, err
    # With the window lowered to what the cache holds, it serves.
    apps = record_started_apps(monkeypatch)
    assert main(["serve", str(checkpoint), *flags, "--max-model-len", "97"]) == 0
    assert apps[0].state.service.max_model_len == 97


def test_a_device_the_model_cannot_run_on_is_refused_at_start_up(checkpoint, capsys, monkeypatch):
    """--device meta holds tensors but no data: the server started, and every request was a
    503 with the engine thread's traceback in the log."""
    from tulu.cli import main
    from tulu.server import launch

    def no_serving(config):
        raise AssertionError("--device meta was accepted: the server started")

    monkeypatch.setattr(launch, "_graceful_server", no_serving)
    assert main(["serve", str(checkpoint), "--device", "meta", "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "--device: cannot use device 'meta'" in err, err
    assert "Traceback" not in err and "loaded" not in err


def test_request_timeout_inf_means_no_timeout(checkpoint, monkeypatch, make_server) -> None:
    """`--request-timeout inf` is how one asks for no timeout; it worked before the finite
    check, which refused it."""
    import math

    from server.conftest import record_started_apps
    from tulu.cli import main

    apps = record_started_apps(monkeypatch)
    argv = ["serve", str(checkpoint), "--port", str(free_port()), "--request-timeout", "inf"]
    assert main(argv) == 0
    assert apps[0].state.service.settings.request_timeout == math.inf
    server = make_server(request_timeout=math.inf)
    reply = httpx.post(
        server.base_url + "/completions",
        json={"model": "tiny", "prompt": "Hello", "max_tokens": 3},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "-1"], "--port must be in 0..65535, got -1"),
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy} (Address already in use)"),
        (["--host", "no-such-host.invalid", "--port", "{free}"], "--host 'no-such-host.invalid'"),
        (["--api-key", "", "--port", "{free}"], "--api-key is empty"),
    ],
    ids=["bad-port", "port-in-use", "bad-host", "empty-api-key"],
)
def test_unusable_address_or_key_is_refused_before_loading(checkpoint, flags, message):
    """The port is taken before the model loads: a busy port or a bad host is a one-line
    error at once. An empty --api-key (an unset variable) would silently serve without one."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        values = {"busy": busy.getsockname()[1], "free": free_port()}
        run = subprocess.run(
            [sys.executable, "-c", CLI, "serve", str(checkpoint)]
            + [flag.format(**values) for flag in flags],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 1, run.stderr
    assert message.format(**values) in run.stderr
    assert "Traceback" not in run.stderr
    assert "loaded" not in run.stderr  # refused before the model was loaded


# ----------------------------------------------------------------------------------------------
# SIGTERM
# ----------------------------------------------------------------------------------------------


@dataclass
class StreamRecord:
    """What a streaming completion received, filled in by a background thread."""

    chunks: list[dict] = field(default_factory=list)
    done: bool = False  # saw data: [DONE]
    error: str | None = None
    status: int | None = None
    first_chunk: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None

    @property
    def finish_reasons(self) -> list[str]:
        return [
            c["finish_reason"]
            for ch in self.chunks
            for c in ch.get("choices", ())
            if c.get("finish_reason")
        ]

    @property
    def usage(self) -> dict | None:
        return next((ch["usage"] for ch in self.chunks if ch.get("usage")), None)


def stream_in_background(url: str, max_tokens: int) -> tuple[StreamRecord, threading.Thread]:
    record = StreamRecord()
    body = {
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def run() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                record.status = response.status_code
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        record.done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = str(chunk["error"])
                    record.chunks.append(chunk)
                    record.first_chunk.set()
        except httpx.HTTPError as err:
            record.error = f"{type(err).__name__}: {err}"
        finally:
            record.ended_at = time.monotonic()
            record.first_chunk.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return record, thread


def seconds_per_token(url: str) -> float:
    """Measured through the server: a 300-token streaming completion, read to its end."""
    record, thread = stream_in_background(url, 300)
    started = time.monotonic()
    thread.join(60)
    assert record.done and record.usage["completion_tokens"] == 300, record.error
    return (record.ended_at - started) / 300


@dataclass
class DrainRun:
    served: Served
    records: list[StreamRecord]
    max_tokens: int
    expected_s: float
    signalled_at: float
    refused_while_draining: bool
    keep_alive_probe: str | None  # what a connection opened before SIGTERM got meanwhile
    exit_code: int
    exited_after: float


def sigterm_mid_stream(serve, drain_timeout: float, target_s: float, streams: int) -> DrainRun:
    """Start `streams` long completions (sized to last about `target_s` seconds), SIGTERM the
    server after their first chunks, probe for new connections while they drain, wait for exit.

    A keep-alive connection opened before the signal, idle at it, is probed too once new
    connections are refused (uvicorn closes idle connections in the same turn)."""
    served = serve("--drain-timeout", str(drain_timeout), "--log-level", "info")
    idle = httpx.Client(base_url=served.url, timeout=5)
    assert idle.get("/health").status_code == 200
    per_token = seconds_per_token(served.url) * max(1.0, streams / 2)
    max_tokens = int(min(CONTEXT - 16, max(200, target_s / per_token)))
    started = [stream_in_background(served.url, max_tokens) for _ in range(streams)]
    for record, _ in started:
        assert record.first_chunk.wait(30), "no first chunk within 30 s"
        assert record.status == 200 and record.chunks, record.error
    served.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    refused = False
    keep_alive_probe = None
    while any(t.is_alive() for _, t in started) and time.monotonic() - signalled < 30:
        if connection_refused(served.port):
            refused = any(t.is_alive() for _, t in started)
            keep_alive_probe = probe(idle) if refused else None
            break
        time.sleep(0.02)
    idle.close()
    exit_code = served.wait(drain_timeout + 30)
    exited_after = time.monotonic() - signalled
    for _, thread in started:
        thread.join(30)
    return DrainRun(
        served,
        [r for r, _ in started],
        max_tokens,
        max_tokens * per_token,
        signalled,
        refused,
        keep_alive_probe,
        exit_code,
        exited_after,
    )


def probe(client: httpx.Client) -> str:
    """A GET /health on the client's kept-alive connection: the HTTP status, or the name of
    the transport error."""
    try:
        return str(client.get("/health").status_code)
    except httpx.TransportError as err:
        return type(err).__name__


@pytest.fixture(scope="module")
def drained(checkpoint, tmp_path_factory):
    """One SIGTERM run shared by the drain tests: one stream of about 1.5 s, drain 5 s."""
    started: list[Served] = []
    log_dir = tmp_path_factory.mktemp("drain")

    def serve_once(*args: str) -> Served:
        started.append(launch(checkpoint, log_dir, *args))
        return started[-1]

    try:
        yield sigterm_mid_stream(serve_once, drain_timeout=5, target_s=1.5, streams=1)
    finally:
        kill_all(started)


def test_sigterm_lets_the_in_flight_stream_finish(drained):
    record = drained.records[0]
    assert record.error is None, f"{record.error}\n{drained.served.log()[-3000:]}"
    assert record.done, "the stream ended without data: [DONE]"
    assert record.finish_reasons == ["length"]
    assert record.usage["completion_tokens"] == drained.max_tokens
    text = "".join(c["text"] for ch in record.chunks for c in ch["choices"])
    assert text, "no text was streamed"
    assert record.ended_at > drained.signalled_at, "the stream finished before the signal"


def test_sigterm_refuses_new_connections_while_draining(drained):
    assert drained.refused_while_draining, (
        "a new connection was accepted while the server was draining "
        f"(stream of {drained.max_tokens} tokens, ~{drained.expected_s:.1f} s)"
    )


def test_sigterm_refuses_requests_on_kept_alive_connections_while_draining(drained):
    """A client that kept its connection open is not admitted during the drain either (to be
    aborted when it ends): the idle connection was closed, and the client's reconnection is
    refused, so it fails over at once."""
    assert drained.keep_alive_probe is not None, "the stream ended before the probe"
    assert not drained.keep_alive_probe.isdigit(), (
        f"a request on a kept-alive connection was answered {drained.keep_alive_probe} "
        "while the server was draining"
    )


def test_sigterm_process_exits_within_the_deadline(drained):
    assert drained.exited_after < 5 + 10, f"exited {drained.exited_after:.1f} s after SIGTERM"
    assert drained.exit_code is not None


def test_sigterm_exit_status_is_zero(drained):
    assert drained.exit_code == 0, f"exit status {drained.exit_code}"


def test_sigterm_past_the_drain_timeout_aborts_and_exits(serve):
    """Streams that would outlast `--drain-timeout 0.25` are cut, and the process still exits
    promptly (uvicorn's graceful timeout, then the engine's own drain, then exit); the cut is
    one log line, without the tracebacks of the cancelled requests (`DrainCutLog`).

    The drain is short and the streams run to the context window, so they are cut on any
    machine: one that streamed them before the cut fails the premise below, never skips."""
    drain = 0.25
    run = sigterm_mid_stream(serve, drain_timeout=drain, target_s=12.0, streams=2)
    assert run.expected_s > 4 * drain, (
        f"premise: {run.max_tokens}-token streams take ~{run.expected_s:.2f} s, too few to "
        f"outlast a {drain} s drain"
    )
    assert run.exited_after < drain + 10, f"exited {run.exited_after:.1f} s after SIGTERM"
    log = run.served.log()
    assert "Traceback" not in log, log[-3000:]  # the cut is expected: no crash reported
    for record in run.records:
        assert not (record.done and record.finish_reasons == ["length"]), (
            f"a {run.max_tokens}-token stream finished normally despite a {drain} s drain timeout"
        )
        assert record.ended_at - run.signalled_at < drain + 10
    assert f"WARNING:  --drain-timeout {drain:g} s passed: cutting 2 open request(s)" in log, log


def uvicorn_record(msg: str, *args, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_the_drain_cut_log_drops_only_the_cancellations_that_follow_the_cut():
    """Unit check of the filter the SIGTERM test above sees at work: before uvicorn announces
    the cut, and for any other error, records pass unchanged."""
    cut_log = DrainCutLog(2.5)
    cancelled = asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded")
    crashed = RuntimeError("a real bug")
    assert cut_log.filter(uvicorn_record("Exception in ASGI application\n", exc=cancelled))
    announce = uvicorn_record("Cancel %s running task(s), timeout graceful shutdown exceeded", 3)
    assert cut_log.filter(announce)
    assert announce.getMessage() == "--drain-timeout 2.5 s passed: cutting 3 open request(s)"
    assert announce.levelname == "WARNING"
    assert not cut_log.filter(uvicorn_record("Exception in ASGI application\n", exc=cancelled))
    assert cut_log.filter(uvicorn_record("Exception in ASGI application\n", exc=crashed))
    assert cut_log.filter(uvicorn_record("Application shutdown complete."))


def test_sigterm_honours_a_fractional_drain_timeout(serve):
    """A stream needing ~0.4 s after SIGTERM finishes within `--drain-timeout 0.9`."""
    run = sigterm_mid_stream(serve, drain_timeout=0.9, target_s=0.4, streams=1)
    record = run.records[0]
    assert record.done and record.finish_reasons == ["length"], record.error
