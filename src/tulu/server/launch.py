"""`tulu serve`: load the model, build the engine and the app, run uvicorn until SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time

from tulu.errors import TuluError

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
    from tulu.engine.options import decode_path_settings
    from tulu.pretrained import load_pretrained
    from tulu.server.service import ServerSettings

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name, value in (("--max-num-seqs", args.max_num_seqs), ("--max-queue", args.max_queue)):
        if value < (1 if name == "--max-num-seqs" else 0):
            raise TuluError(
                f"{name} must be {'>= 1' if name == '--max-num-seqs' else '>= 0'}, got {value}"
            )
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        raise TuluError(f"--kv-cache-gb must be > 0, got {args.kv_cache_gb}")
    api_key = args.api_key or os.environ.get("TULU_API_KEY") or None

    started = time.perf_counter()
    loaded = load_pretrained(
        args.model, dtype=args.dtype, device=args.device, revision=args.revision
    )
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        kv_cache_bytes=int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None,
        **decode_path_settings(args),
    )
    engine = LLMEngine(loaded.model, loaded.tokenizer, config)
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
        served_model_name=args.served_model_name or str(args.model),
        api_key=api_key,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        drain_timeout=args.drain_timeout,
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
    _graceful_server(config).run()


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
