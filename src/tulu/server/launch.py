"""`tulu serve`: check the flags, take the port, load the model, build the engine and the app,
run uvicorn until SIGTERM.

The listening socket is bound before the model is loaded (as vLLM does): a port in use or a
host that does not resolve is found in a second, not after minutes of loading weights.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING

from tulu.errors import GenerationError, TuluError

if TYPE_CHECKING:
    from tulu.engine.engine import LLMEngine

log = logging.getLogger("tulu.server")


def serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from tulu.server.app import create_app
    except ImportError as err:
        raise TuluError(
            f"tulu serve needs the 'serve' extra: pip install 'tulu[serve]' ({err})"
        ) from None
    from tulu.engine.engine import EngineConfig, LLMEngine
    from tulu.engine.lora import parse_lora_modules
    from tulu.engine.options import engine_settings, named_by_flags
    from tulu.pretrained import load_pretrained
    from tulu.server.service import MAX_BEST_OF, ServerSettings

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine_options = engine_settings(args)
    if args.max_queue < 0:
        raise TuluError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 1 <= args.max_best_of <= MAX_BEST_OF:
        raise TuluError(
            f"--max-best-of must be >= 1 and <= {MAX_BEST_OF} (the OpenAI route's limit), "
            f"got {args.max_best_of}"
        )
    # argparse's float() takes "nan" and "inf": a NaN passes every comparison, and a request
    # timeout <= 0 would answer every request with 504. `--request-timeout inf` is no timeout.
    for name, value, low in (
        ("--request-timeout", args.request_timeout, None),
        ("--drain-timeout", args.drain_timeout, 0.0),
    ):
        if name == "--request-timeout" and value == math.inf:
            continue
        if not math.isfinite(value) or (value <= 0 if low is None else value < low):
            bound = "> 0" if low is None else ">= 0"
            also = " or inf (no timeout)" if name == "--request-timeout" else ""
            raise TuluError(f"{name} must be a finite number {bound}{also}, got {value}")
    if args.api_key is not None and not args.api_key.strip():
        # Most likely `--api-key "$KEY"` with KEY unset: serving without a key is not what
        # was asked for.
        raise TuluError("--api-key is empty; omit the option to serve without an API key")
    api_key = args.api_key or os.environ.get("TULU_API_KEY") or None
    served_name = args.served_model_name or str(args.model)
    lora_modules = parse_lora_modules(args.lora_modules, reserved=served_name)
    sock = listening_socket(args.host, args.port)

    started = time.perf_counter()
    loaded = load_pretrained(
        args.model, dtype=args.dtype, device=args.device, revision=args.revision
    )
    try:
        engine = LLMEngine(
            loaded.model,
            loaded.tokenizer,
            EngineConfig(**engine_options),
            lora_modules=lora_modules,
            enable_lora=args.allow_runtime_lora_updating,
        )
    except GenerationError as err:
        raise named_by_flags(err) from None
    check_cache_holds_a_request(engine)
    if lora_modules:
        log.info(
            "LoRA adapters (unmerged): %s", ", ".join(f"{n}={p}" for n, p in lora_modules.items())
        )
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    log.info(
        "loaded %s (%s parameters, %s on %s) in %.1f s: weights %.2f GiB, KV cache %.2f GiB "
        "(%d blocks of %d tokens)",
        loaded.directory,
        f"{loaded.model.num_parameters():,}",
        engine.dtype,
        engine.device,
        time.perf_counter() - started,
        weights / 2**30,
        engine.cache.nbytes / 2**30,
        engine.pool.num_blocks,
        engine.pool.block_size,
    )
    settings = ServerSettings(
        served_model_name=served_name,
        api_key=api_key,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        max_best_of=args.max_best_of,
        request_timeout=args.request_timeout,
        drain_timeout=args.drain_timeout,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
    )
    app = create_app(engine, loaded.tokenizer, settings)
    log.info(
        "serving %r at http://%s:%d (OpenAI: /v1, TGI: /generate, chat page: /, metrics: /metrics)%s",
        settings.served_model_name,
        args.host,
        args.port,
        "; API key required" if api_key else "",
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout,
    )
    uvicorn_log = logging.getLogger("uvicorn.error")
    cut_log = DrainCutLog(args.drain_timeout)
    uvicorn_log.addFilter(cut_log)
    try:
        _graceful_server(config).run(sockets=[sock])
    finally:
        uvicorn_log.removeFilter(cut_log)


def check_cache_holds_a_request(engine: LLMEngine) -> None:
    """Refuse a KV cache too small for one request of the window the server advertises.

    /v1/models and /info report `max_model_len`, and clients budget prompt + max_tokens
    against it; with a smaller cache every such request would be a 400 ("the whole cache
    holds ..."). vLLM refuses to start in this case too. The last token needs no KV slot.
    """
    capacity = engine.pool.num_blocks * engine.pool.block_size
    needed = engine.max_model_len - 1
    if capacity < needed:
        raise TuluError(
            f"the KV cache holds {capacity} tokens ({engine.pool.num_blocks} blocks of "
            f"{engine.pool.block_size}), fewer than one request of --max-model-len "
            f"{engine.max_model_len} needs ({needed}); raise --kv-cache-gb (or "
            "--gpu-memory-utilization) or lower --max-model-len"
        )


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), listening; a TuluError naming both if it cannot be.

    uvicorn serves on it (`Server.run(sockets=...)`), so nothing can take the port between this
    check and the first request. SO_REUSEADDR as uvicorn sets it: a restart does not wait for
    the old connections' TIME_WAIT.
    """
    if not 0 <= port <= 65535:
        raise TuluError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise TuluError(f"--host {host!r}: cannot listen there ({err.strerror or err})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise TuluError(
            f"cannot listen on {host}:{port} ({err.strerror or err}); is another server "
            "using the port? Pick another with --port"
        ) from None
    sock.set_inheritable(True)
    return sock


class DrainCutLog(logging.Filter):
    """uvicorn's log when `--drain-timeout` passes: one line, not a traceback per request.

    uvicorn then cuts the requests still open (streams end without their last chunk, as in
    vLLM): it logs "Cancel N running task(s), timeout graceful shutdown exceeded", cancels
    them, and logs each one's CancelledError as "Exception in ASGI application" with a
    traceback, although nothing crashed. The first line is reworded to name the flag, and
    the cancellations that follow it are dropped. Every other record passes unchanged (if
    uvicorn rewords that line, its tracebacks come back rather than anything being hidden).
    """

    CANCEL_MESSAGE = "Cancel %s running task(s), timeout graceful shutdown exceeded"

    def __init__(self, drain_timeout: float):
        super().__init__()
        self.drain_timeout = drain_timeout
        self.cutting = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.CANCEL_MESSAGE:
            self.cutting = True
            record.msg = "--drain-timeout %g s passed: cutting %s open request(s)"
            record.args = (self.drain_timeout, *record.args)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        cancelled = record.exc_info is not None and isinstance(
            record.exc_info[1], asyncio.CancelledError
        )
        return not (self.cutting and cancelled)


def _graceful_server(config):
    """A uvicorn server whose orderly shutdown on SIGTERM/SIGINT exits 0.

    uvicorn re-raises the caught signal after its graceful shutdown, so the process would die
    by that signal (exit 143) even though every in-flight request was drained.
    """
    import uvicorn

    class GracefulServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return GracefulServer(config)
