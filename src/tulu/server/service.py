"""What every generation route shares: admission, encoding, timeouts, disconnects, metrics.

The OpenAI and TGI routes only translate their protocol to `SamplingParams` and back; the
life of a request (queue limit, deadline, abort when the client goes away, latency and token
metrics) is handled here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tulu.chat import generation_prompt
from tulu.engine.async_engine import AsyncLLM
from tulu.engine.engine import RequestOutput
from tulu.engine.sampling import SamplingParams
from tulu.engine.structured import StructuredOutput
from tulu.errors import GenerationError, TuluError
from tulu.server.metrics import ServerMetrics
from tulu.server.openai_protocol import MAX_N
from tulu.tokenizer import Tokenizer

INLINE_TOKENIZE_CHARS = 16_384  # shorter texts tokenize in well under a millisecond
#: Structured outputs compiled at once. A deeply nested schema can take long to compile; more
#: at once would take the CPU from the engine thread (and xgrammar already compiles one
#: grammar on 2 threads).
COMPILE_WORKERS = 2
#: The longest structured output spec (a schema's JSON, a regex, a grammar, the choices), in
#: bytes of UTF-8. A real schema is a few KiB; compile time grows with the spec.
MAX_STRUCTURED_OUTPUT_BYTES = 64 << 10
#: The most samples one prompt's `best_of` may draw: the OpenAI route's `n` limit, and so the
#: largest `--max-best-of` (TGI's limit) a server accepts.
MAX_BEST_OF = MAX_N


class Overloaded(TuluError):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


class RequestTimedOut(TuluError):
    """The request ran past the server's request timeout and was aborted."""


class ClientDisconnected(TuluError):
    """The client went away; the request was aborted (answered with 499, which nobody reads)."""


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_num_seqs: int = 256
    max_queue: int = 1024  # requests admitted beyond max_num_seqs before answering 429
    max_best_of: int = 2  # TGI's `best_of` limit (TGI's --max-best-of default)
    request_timeout: float = 600.0  # seconds from arrival to the last token
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown
    # Request bodies beyond this are refused (413) before they are read: a 2,048-token context
    # is ~10 KB of text, and tokenizing megabytes would hold up the event loop.
    max_body_bytes: int = 1 << 20
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA updates).
    allow_runtime_lora_updating: bool = False

    def __post_init__(self) -> None:
        """Refuse a `max_best_of` out of 1 … MAX_BEST_OF here, at construction: 0 would be
        served and fail every TGI request (even those without `best_of`), and a huge one would
        let one request draw more samples than the OpenAI route ever does."""
        best_of = self.max_best_of
        if isinstance(best_of, bool) or not isinstance(best_of, int):
            raise TuluError(f"max_best_of must be an integer, got {best_of!r}")
        if not 1 <= best_of <= MAX_BEST_OF:
            raise TuluError(f"max_best_of must be >= 1 and <= {MAX_BEST_OF}, got {best_of}")


def check_structured_output_size(spec: StructuredOutput, where: str) -> None:
    """Raise GenerationError naming `where` (the request field) when the text of `spec` is
    longer than `MAX_STRUCTURED_OUTPUT_BYTES`: checked before the request is admitted, so an
    oversized spec never reaches the compiler."""
    value = getattr(spec, spec.kind)
    if value is True:  # json_object: no text of its own
        return
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_STRUCTURED_OUTPUT_BYTES:
        raise GenerationError(
            f"{where} is {size:,} bytes long; this server compiles structured outputs of at "
            f"most {MAX_STRUCTURED_OUTPUT_BYTES:,} bytes (64 KiB)"
        )


class Admission:
    """The admission slots one HTTP request holds, from its capacity check to its generations.

    A route takes its slots (`GenerationService.admit`) before any slow preparation (compiling
    a structured output can take seconds), so a full server answers 429 at once and requests
    being prepared count against the limit. Each generation takes over one slot
    (`hand_over`) and frees it when it ends; leaving the ``with`` block gives back the slots
    no generation took (the request failed before generating, e.g. its grammar did not
    compile), so a refused request never keeps capacity.
    """

    def __init__(self, service: GenerationService, slots: int):
        self._service = service
        self._left = slots

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._service._free(self._left)
        self._left = 0

    def hand_over(self) -> None:
        """Pass one slot to a starting generation, which frees it when it ends."""
        if self._left > 0:
            self._left -= 1
            return
        # Only a generation started after its request gave its slots back gets here: it
        # passes admission as a new request would.
        self._service.admit().hand_over()


class GenerationService:
    def __init__(
        self,
        llm: AsyncLLM,
        tokenizer: Tokenizer,
        settings: ServerSettings,
        metrics: ServerMetrics,
        max_model_len: int,
        window_name: str = "the model's context window",
    ):
        self.llm = llm
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.window_name = window_name  # or "the max_model_len" (tulu serve --max-model-len)
        self.in_flight = 0  # admitted requests: being prepared, queued or running
        self._ids = itertools.count()
        # Compiles get their own threads: on asyncio's default pool (tokenization's) a few
        # huge schemas would hold every thread, and they would run unbounded.
        self._compile_pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="tulu-compile")

    def close(self) -> None:
        """Stop the compile threads (the app's shutdown); a compile still running finishes in
        its thread, and nobody waits for it."""
        self._compile_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ prompts
    async def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`; long texts are tokenized on a worker thread, so that no
        request holds up the event loop (1 MiB takes ~0.3 s)."""
        if len(text) > INLINE_TOKENIZE_CHARS:
            # encode_batch, unlike encode, releases the GIL while the Rust tokenizer works.
            batch = await asyncio.to_thread(self.tokenizer.encode_batch, [text])
            return batch[0]
        return self.tokenizer.encode(text)

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        return await self.encode_text(generation_prompt(messages, self.tokenizer.eos_token))

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        """The max_tokens to use: the one given, or what the context window leaves.

        Raises GenerationError naming both lengths when the prompt does not fit.
        """
        room = self.max_model_len - num_prompt_tokens
        if num_prompt_tokens == 0:
            raise GenerationError("the prompt is empty (0 tokens)")
        if room < 1:
            raise GenerationError(
                f"the prompt has {num_prompt_tokens} tokens but {self.window_name} is "
                f"{self.max_model_len} tokens"
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise GenerationError(
                f"the prompt has {num_prompt_tokens} tokens and {max_tokens} new tokens were "
                f"requested, {num_prompt_tokens + max_tokens} in all, but {self.window_name} "
                f"is {self.max_model_len} tokens"
            )
        return max_tokens

    async def compile_structured_output(self, spec: StructuredOutput) -> None:
        """Compile a request's structured output on a compile thread (at most
        `COMPILE_WORKERS` at once, the others wait their turn), before the request is handed
        to the engine. Routes call it once the request is admitted.

        The engine compiles it again in `add_request`, on its own thread between two steps, so
        a slow compile there would stall every running request (the first structured request
        also builds the compiler, which reads the whole vocabulary). The compiler caches the
        grammar and remembers that it matches some text, so after this the engine's compile
        is a lookup. Raises GenerationError with xgrammar's reason when `spec` does not
        compile (or the engine has no tokenizer).
        """
        await asyncio.get_running_loop().run_in_executor(
            self._compile_pool, self.llm.engine.compile_structured_output, spec
        )

    @property
    def lora_adapters(self) -> dict[str, str]:
        """The LoRA adapters a request may name: name -> adapter directory."""
        adapters = self.llm.engine.lora
        return {} if adapters is None else adapters.loaded  # a snapshot, safe off its thread

    def request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # ------------------------------------------------------------------ admission
    def admit(self, slots: int = 1) -> Admission:
        """Take `slots` admission slots (one per generation the request will run), or raise
        Overloaded when the running batch and the waiting queue have no room for them.

        The check and the taking happen with no await between them, so requests arriving
        together cannot all pass the check. Use the result as a ``with`` block around the
        request's preparation and the start of its generations.
        """
        limit = self.settings.max_num_seqs + self.settings.max_queue
        if self.in_flight + slots > limit:
            needs = "" if slots == 1 else f"; this request needs {slots}"
            raise Overloaded(
                f"the server is at capacity ({self.in_flight} requests running or queued, "
                f"limit {limit}{needs}); retry later"
            )
        self.in_flight += slots
        self.metrics.in_flight.inc(slots)
        return Admission(self, slots)

    def _free(self, slots: int) -> None:
        if slots:
            self.in_flight -= slots
            self.metrics.in_flight.dec(slots)

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        admission: Admission,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        lora: str | None = None,
        score_only: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs, with metrics, the request timeout and disconnect checks.

        `lora` names one of the engine's LoRA adapters (None: the base model). `score_only`
        marks a request that only scores its prompt (``echo`` with ``max_tokens=0``): the
        engine must sample one token (its max_tokens is at least 1), but the client never
        sees it, so it is not counted as generated (nor timed as a first token), which keeps
        /metrics equal to the usage the client is told.

        The generation takes over one of `admission`'s slots (the route admitted the request
        before preparing it) and frees it when it ends. Leaving the iteration early aborts the
        request and frees its KV blocks.
        """
        admission.hand_over()
        if lora is not None:
            self.metrics.lora_requests.labels(lora).inc()
        started = time.monotonic()
        last_token_at: float | None = None
        generated = 0
        finished = False  # only finished requests count their prompt and end-to-end latency
        watcher = None
        gone = asyncio.Event()
        consumer = asyncio.current_task()
        if is_disconnected is not None and consumer is not None:
            watcher = asyncio.create_task(self._watch_disconnect(is_disconnected, consumer, gone))
        stream = self.llm.generate(prompt_ids, params, request_id, lora=lora)
        deadline = started + self.settings.request_timeout
        try:
            while True:
                try:
                    output = await asyncio.wait_for(anext(stream), deadline - time.monotonic())
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if not gone.is_set():
                        raise  # a real cancellation (shutdown): let it propagate
                    consumer.uncancel()
                    raise ClientDisconnected("the client closed the connection") from None
                except TimeoutError:
                    raise RequestTimedOut(
                        f"the request did not finish within the server's request timeout of "
                        f"{self.settings.request_timeout:g} s and was aborted"
                    ) from None
                if gone.is_set():
                    # The watcher's cancel can be swallowed by wait_for when an output arrives
                    # in the same loop turn (CPython 3.11); the flag makes the stop certain.
                    raise ClientDisconnected("the client closed the connection")
                now = time.monotonic()
                new = 0 if score_only else sum(len(c.delta_token_ids) for c in output.outputs)
                if new:
                    if last_token_at is None:
                        self.metrics.time_to_first_token.observe(now - started)
                    else:
                        # The n choices advance side by side, by one token a step, or by
                        # several when a speculative step accepts drafted ones: divide the
                        # gap by the tokens that arrived together (the most one choice got
                        # in this output), not by n.
                        together = max(len(c.delta_token_ids) for c in output.outputs)
                        gap = (now - last_token_at) / together
                        for _ in range(new):
                            self.metrics.inter_token_latency.observe(gap)
                    last_token_at = now
                    generated += new
                finished = output.finished
                yield output
        finally:
            await stream.aclose()  # aborts the request if it had not finished
            if watcher is not None:
                watcher.cancel()
            self._free(1)
            self.metrics.generation_tokens.inc(generated)
            if finished:  # not a request the engine refused (400), nor one cut short
                self.metrics.prompt_tokens.inc(len(prompt_ids))
                self.metrics.e2e_latency.observe(time.monotonic() - started)

    async def run_to_end(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        admission: Admission,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        lora: str | None = None,
    ) -> RequestOutput:
        """Generate without streaming; the final (finished) output."""
        final = None
        async for output in self.generate(
            prompt_ids, params, request_id, admission, is_disconnected, lora=lora
        ):
            final = output
        assert final is not None and final.finished
        return final

    @staticmethod
    async def _watch_disconnect(
        is_disconnected: Callable[[], Awaitable[bool]], consumer: asyncio.Task, gone: asyncio.Event
    ) -> None:
        """Stop the consuming task when the client goes away (non-streaming requests)."""
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(0.25)
                if await is_disconnected():
                    gone.set()
                    consumer.cancel()
                    return
