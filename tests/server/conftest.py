"""Shared fixtures for the server tests: a tiny checkpoint and real uvicorn servers.

Every server is a real `uvicorn.Server` listening on 127.0.0.1 (a free port, bound before the
server starts, so there is no race for it), running `tulu.server.app.create_app` in a
background thread, so the tests talk HTTP to it with the real clients (`openai`,
`text-generation`, httpx).

- `tiny_checkpoint` (session): the demo tokenizer and a tiny random GPT-NeoX (in memory);
  `tiny_checkpoint_dir` saves them as an HF checkpoint directory, for tests that load one.
- `launch_server` (session): `launch_server(**overrides) -> RunningServer`; the caller stops
  it (for module-scoped servers, see test_openai.py).
- `make_server` (per test): the same factory; its servers are checked to be idle (KV pool
  empty) and stopped when the test ends.

Overrides: any `ServerSettings` field (`api_key=`, `max_queue=`, `request_timeout=`, ...),
`settings=` (a whole ServerSettings), `engine_config=` (an EngineConfig) or `engine=` (a
ready LLMEngine, e.g. over a scripted model), `model=` / `tokenizer=`.

The helpers are handed out as fixtures rather than imported, because several test
directories have a module called `conftest`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import torch

from tulu.engine.engine import EngineConfig, LLMEngine
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.server.service import ServerSettings
from tulu.tokenizer import Tokenizer

SERVED_MODEL_NAME = "tiny"
MODEL_SEED = 0


@dataclass
class TinyCheckpoint:
    model: GPTNeoXForCausalLM
    tokenizer: Tokenizer


@pytest.fixture(scope="session")
def tiny_checkpoint() -> TinyCheckpoint:
    """The demo's byte-level BPE (600 tokens, <|endoftext|> = 0) and a tiny random GPT-NeoX
    (2 layers, hidden 64, vocabulary padded to 640, context window 512, float32)."""
    from tulu.demo import corpus_text, tiny_model, train_tokenizer

    tokenizer = train_tokenizer(corpus_text())
    return TinyCheckpoint(tiny_model(len(tokenizer), MODEL_SEED), tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """`tiny_checkpoint` saved as an HF checkpoint directory (safetensors + tokenizer files)."""
    from tulu.model.checkpoint import save_model

    directory = tmp_path_factory.mktemp("tiny-checkpoint")
    save_model(tiny_checkpoint.model, directory, tokenizer=tiny_checkpoint.tokenizer)
    return directory


# ----------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------

_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 0


def _single_thread(enter: bool) -> None:
    """Tiny models run fastest on one torch thread; restored when the last server stops."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if enter:
            if _threads_users == 0:
                _threads_saved = torch.get_num_threads()
                torch.set_num_threads(1)
            _threads_users += 1
        else:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


@dataclass
class RunningServer:
    """A live server: its address, app, engine and tokenizer, and client helpers."""

    app: Any
    engine: LLMEngine
    model: GPTNeoXForCausalLM
    tokenizer: Tokenizer
    settings: ServerSettings
    host: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _socket: socket.socket = field(repr=False)
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return f"{self.url}/v1"

    @property
    def api_key(self) -> str | None:
        return self.settings.api_key

    @property
    def headers(self) -> dict[str, str]:
        """Authorization header for this server's key (empty without one)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def service(self):
        return self.app.state.service

    @property
    def pool(self):
        """The engine's KV block pool (`pool.num_used == 0` when nothing runs)."""
        return self.engine.pool

    def openai(self, **kwargs):
        """An `openai.OpenAI` client for this server (no retries, so errors surface at once)."""
        import openai

        kwargs.setdefault("api_key", self.api_key or "unused")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60.0)
        return openai.OpenAI(base_url=self.base_url, **kwargs)

    def async_openai(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", self.api_key or "unused")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60.0)
        return openai.AsyncOpenAI(base_url=self.base_url, **kwargs)

    def is_idle(self) -> bool:
        engine = self.engine
        return (
            engine.pool.num_used == 0
            and engine.num_unfinished_requests == 0
            and not engine.scheduler.waiting
            and not engine.scheduler.running
            and self.service.in_flight == 0
        )

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until no request runs and every KV block is free; fail after `timeout` s.

        Aborts (a client that went away) reach the engine thread asynchronously, hence the
        wait rather than a single check.
        """
        deadline = time.monotonic() + timeout
        while not self.is_idle():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server not idle after {timeout} s: in flight {self.service.in_flight}, "
                    f"engine {self.engine.stats()}, unfinished "
                    f"{self.engine.num_unfinished_requests}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 30.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()
        _single_thread(False)
        if self._thread.is_alive():
            raise AssertionError(f"the server on port {self.port} did not stop in {timeout} s")


def start_server(
    checkpoint: TinyCheckpoint,
    *,
    settings: ServerSettings | None = None,
    engine: LLMEngine | None = None,
    engine_config: EngineConfig | None = None,
    model: GPTNeoXForCausalLM | None = None,
    tokenizer: Tokenizer | None = None,
    startup_timeout: float = 30.0,
    **settings_fields: Any,
) -> RunningServer:
    import uvicorn

    from tulu.server.app import create_app

    tokenizer = tokenizer or (engine.tokenizer if engine is not None else checkpoint.tokenizer)
    model = model or (engine.model if engine is not None else checkpoint.model)
    if engine is None:
        engine = LLMEngine(model, tokenizer, engine_config or EngineConfig())
    if settings is None:
        known = {f.name for f in fields(ServerSettings)}
        unknown = set(settings_fields) - known
        if unknown:
            raise TypeError(f"unknown ServerSettings fields: {sorted(unknown)}")
        values = {"served_model_name": SERVED_MODEL_NAME, "drain_timeout": 1.0}
        values.update(settings_fields)
        settings = ServerSettings(**values)
    elif settings_fields:
        raise TypeError("pass either settings= or ServerSettings fields, not both")
    app = create_app(engine, tokenizer, settings)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it: without, every response written as headers + body waits
    # ~40 ms for the client's delayed ACK (Nagle), making the many small test requests slow.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    _single_thread(True)
    thread.start()
    running = RunningServer(
        app, engine, model, tokenizer, settings, host, port, server, thread, sock
    )
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            running.stop(5.0)
            raise RuntimeError(f"the test server on port {port} did not start")
        time.sleep(0.01)
    return running


@pytest.fixture(scope="session")
def launch_server(tiny_checkpoint) -> Callable[..., RunningServer]:
    """Factory: `launch_server(**overrides) -> RunningServer` serving `tiny_checkpoint` as
    "tiny"; the caller must `stop()` it."""

    def launch(**overrides: Any) -> RunningServer:
        return start_server(tiny_checkpoint, **overrides)

    return launch


@pytest.fixture
def make_server(launch_server) -> Iterator[Callable[..., RunningServer]]:
    """Factory for servers that live for one test: each is checked to be idle (no request,
    KV pool empty) and then stopped when the test ends."""
    servers: list[RunningServer] = []

    def make(**overrides: Any) -> RunningServer:
        server = launch_server(**overrides)
        servers.append(server)
        return server

    yield make
    try:
        for server in servers:
            server.wait_idle()
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def kv_pool() -> Callable[[RunningServer], Any]:
    """`kv_pool(server)`: the engine's KV block pool, for `assert pool.num_used == 0`."""
    return lambda server: server.engine.pool


@pytest.fixture
def compile_threads(monkeypatch) -> list[str]:
    """The names of the threads that compile a structured output's grammar in the test."""
    from tulu.engine.structured import GrammarCompiler

    calls: list[str] = []
    compile_spec = GrammarCompiler.compile

    def recording(self, spec):
        calls.append(threading.current_thread().name)
        return compile_spec(self, spec)

    monkeypatch.setattr(GrammarCompiler, "compile", recording)
    return calls


def record_started_apps(monkeypatch) -> list:
    """Make `tulu serve` hand its app to the returned list instead of serving it."""
    from tulu.server import launch

    started = []

    class Recorder:
        def __init__(self, config) -> None:
            started.append(config.app)

        def run(self, sockets) -> None:
            sockets[0].close()

    monkeypatch.setattr(launch, "_graceful_server", Recorder)
    return started
