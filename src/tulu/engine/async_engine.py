"""AsyncLLM: the engine for asyncio code (the server), streaming per-request deltas.

The model's forward pass blocks, so the engine runs in one background thread that owns it:
coroutines hand it requests and aborts through a queue, and it hands back each step's outputs
to per-request asyncio queues on the event loop. The event loop never waits on the model.

Leaving the `async for` early (the client went away, the task was cancelled) aborts the
request, which frees its KV blocks on the engine thread's next turn.

A consumer slower than the engine is not waited for: the outputs it has not taken yet are
merged into one (as vLLM's output collector does), so a stream holds at most one output, not
one per step, each with every token so far.

Each submission has its own engine request id (the caller's id plus a serial number), so the
abort notice of a stream that was left can never reach a later stream reusing the caller's id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from tulu.engine.engine import LLMEngine, Prompt, RequestOutput
from tulu.engine.sampling import SamplingParams
from tulu.errors import GenerationError, TuluError

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can run."""


@dataclass
class _Add:
    request_id: str  # the engine's id of this submission
    prompt: Prompt
    params: SamplingParams
    lora: str | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run `fn` on the engine thread (between steps) and settle `future` with its outcome."""

    fn: Callable[[], Any]
    future: asyncio.Future


class _Stream:
    """One request's outputs not yet taken by its consumer, then at most one error.

    Outputs are cumulative except for their deltas, so merging keeps the newest output with
    the deltas of all of them joined: the consumer's deltas still add up to the full text.
    An output always comes before an error (a finished one makes later errors unseen)."""

    def __init__(self) -> None:
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._error = self._error or item
        elif self._output is None:
            self._output = item
        else:  # the consumer is behind: join the deltas (new outputs are never shared)
            for old, new in zip(self._output.outputs, item.outputs, strict=True):
                old.delta_token_ids.extend(new.delta_token_ids)
                new.delta_token_ids = old.delta_token_ids
                new.delta_text = old.delta_text + new.delta_text
            self._output = item
        self._ready.set()

    async def get(self) -> RequestOutput:
        """The next (merged) output; raises the error once no output is left."""
        while self._output is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        output, self._output = self._output, None
        if output is None:
            assert self._error is not None
            raise self._error
        return output


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # by engine request id
        self._calls: set[asyncio.Future] = set()  # `_on_engine_thread` calls not yet settled
        self._engine_ids: dict[str, str] = {}  # the caller's request id -> the engine's
        self._submissions = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._ids = 0
        self._stats: dict[str, Any] = engine.stats()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tulu-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Wait up to `drain_timeout` seconds for running requests, abort the rest, stop.

        New requests are refused from the start (EngineDeadError): one admitted during the
        drain would only be aborted when it ends.
        """
        self._stopping = True
        deadline = time.monotonic() + drain_timeout
        while self._streams and time.monotonic() < deadline and self.is_running:
            await asyncio.sleep(0.05)
        for engine_id in list(self._streams):
            self._abort(engine_id)
        self._commands.put(None)
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def num_requests(self) -> int:
        """Requests submitted and not yet finished (running, waiting or being added)."""
        return len(self._streams)

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of its last step (safe to read from the event loop), and
        whether its thread still runs ("engine_up": after a failed step the counters stay as
        they were, and only this says the engine is gone)."""
        return {**self._stats, "engine_up": int(self.is_running)}

    # ------------------------------------------------------------------ requests
    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        lora: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as they come; the last one has finished=True.

        `lora` names one of the engine's LoRA adapters (None: the base model).

        Validation errors (a TuluError, usually GenerationError) are raised before the first
        output.
        """
        self._check_running()
        if request_id is None:
            self._ids += 1
            request_id = f"async-{self._ids}"
        if request_id in self._engine_ids:
            raise GenerationError(f"request id {request_id!r} is already in use")
        self._submissions += 1
        engine_id = f"{request_id}#{self._submissions}"
        # A refusal, the outputs and the engine's death all arrive on this one stream.
        stream = _Stream()
        self._streams[engine_id] = stream
        self._engine_ids[request_id] = engine_id
        self._commands.put(_Add(engine_id, prompt, params or SamplingParams(), lora))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if item.finished:
                    # Released before the last yield: a consumer that stops reading at the
                    # final output may reuse the id at once, and shutdown need not wait for it.
                    finished = True
                    self._release(request_id, engine_id)
                yield dataclasses.replace(item, request_id=request_id)
        finally:
            if not finished:
                self._release(request_id, engine_id)
                self._abort(engine_id)

    def _release(self, request_id: str, engine_id: str) -> None:
        """Forget a submission's stream and free the caller's id for reuse."""
        self._streams.pop(engine_id, None)
        if self._engine_ids.get(request_id) == engine_id:
            self._engine_ids.pop(request_id)

    async def load_lora(self, name: str, directory: str) -> None:
        """Add LoRA adapter `name` while serving (the engine must have LoRA enabled). Its files
        are read on a worker thread; only the hand-over waits for the engine's current step."""
        adapters = self.engine._lora_enabled()
        adapter = await asyncio.to_thread(adapters.read, name, directory)
        await self._on_engine_thread(lambda: adapters.install(adapter))

    async def unload_lora(self, name: str) -> None:
        """Remove LoRA adapter `name` for new requests; the running ones finish with it."""
        await self._on_engine_thread(lambda: self.engine.unload_lora(name))

    async def _on_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run by the engine thread between two steps (never during one)."""
        self._check_running()
        future = asyncio.get_running_loop().create_future()
        self._calls.add(future)
        try:
            self._commands.put(_Call(fn, future))
            self._wake.set()
            return await future
        finally:
            self._calls.discard(future)

    def check_health(self) -> None:
        """Raise EngineDeadError saying why a new request would not run (for /health)."""
        self._check_running()

    def _check_running(self) -> None:
        """Raise EngineDeadError saying why no request can run: the engine failed, is shutting
        down (the thread may be past its last look at the queue) or shut down, or never
        started."""
        if self._error is not None:
            # repr: names the failure's type too (an AssertionError's str is empty).
            raise EngineDeadError(f"the engine is not running (it stopped: {self._error!r})")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down or has shut down")
        if not self.is_running:
            raise EngineDeadError("the engine is not running (not started)")

    def abort(self, request_id: str) -> None:
        """Abort the running request with this (caller's) id; its stream ends with the notice."""
        engine_id = self._engine_ids.get(request_id)
        if engine_id is not None:
            self._abort(engine_id)

    def _abort(self, engine_id: str) -> None:
        self._commands.put(_Abort(engine_id))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(item)

    def _fail_all(self, error: BaseException) -> None:
        """On the event loop: end every stream, including those still waiting for admission.

        Runs on the loop (not the engine thread) so that no `generate` call can register a
        stream between the snapshot and the notice: once this is scheduled, `is_running` (or
        `_stopping`) already refuses new ones.
        """
        for stream in self._streams.values():
            stream.put(error)
        for future in self._calls:  # calls the engine thread will never run
            if not future.done():
                future.set_exception(error)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        stop = False
        try:
            while True:
                # Stop only once shutdown's sentinel is taken: the aborts it queued before it
                # are then applied (checking `_stopping` alone could skip them, and their
                # streams would get EngineDeadError instead of their abort notices).
                stop = self._apply_commands(loop) or stop
                if stop and not self.engine.has_pending_outputs:
                    break
                if self.engine.has_unfinished_requests() or self.engine.has_pending_outputs:
                    outputs = self.engine.step()
                    self._stats = self.engine.stats()
                    for output in outputs:
                        loop.call_soon_threadsafe(self._deliver, output.request_id, output)
                else:
                    self._stats = self.engine.stats()
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException as err:  # a bug or out-of-memory: fail every waiting client loudly
            log.exception("engine thread died")
            self._error = err
            loop.call_soon_threadsafe(
                self._fail_all, EngineDeadError(f"the engine stopped: {err!r}")
            )
            return
        # Shut down: whoever still waits (a request submitted during shutdown) is told so.
        loop.call_soon_threadsafe(self._fail_all, EngineDeadError("the engine shut down"))

    @staticmethod
    def _settle(loop: asyncio.AbstractEventLoop, call: _Call) -> None:
        try:
            result = call.fn()
        except TuluError as err:  # a refusal (in use, already loaded): the caller's to report
            outcome: tuple[str, Any] = ("set_exception", err)
        else:
            outcome = ("set_result", result)

        def settle() -> None:
            if not call.future.done():  # the caller may have been cancelled meanwhile
                getattr(call.future, outcome[0])(outcome[1])

        loop.call_soon_threadsafe(settle)

    def _apply_commands(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Apply the queued commands; True when shutdown's sentinel (None) was among them."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return False
            if command is None:
                return True
            if isinstance(command, _Abort):
                self.engine.abort(command.request_id)
                continue
            if isinstance(command, _Call):
                self._settle(loop, command)
                continue
            try:
                self.engine.add_request(
                    command.prompt, command.params, command.request_id, lora=command.lora
                )
            except TuluError as err:  # bad input (GenerationError, ChatFormatError, ...)
                loop.call_soon_threadsafe(self._deliver, command.request_id, err)
