"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

The routes translate the OpenAI protocol (`tulu.server.openai_protocol`) to `SamplingParams`
and prompt ids, hand them to the `GenerationService` (admission, timeouts, disconnects,
metrics) and translate the engine's outputs back. What a vLLM user relies on:

- several prompts in one completions request run concurrently (at most ``max_num_seqs +
  max_queue`` of them, else 400); prompt ``i``'s ``n`` choices get the indices
  ``i * n .. i * n + n - 1``;
- ``echo`` with ``logprobs`` scores the prompt (``max_tokens=0`` scores without generating);
  the first prompt token has no log-probability (null);
- log-probabilities come from the raw model logits (before penalties and temperature);
- a streaming request is only answered with ``200`` once its first output exists, so invalid
  input, a full queue or an engine failure before that are proper HTTP errors; an error after
  that is a ``data: {"error": ...}`` event followed by ``data: [DONE]``;
- a client that goes away (streaming or not) aborts its requests, which frees their KV blocks;
- ``usage.prompt_tokens_details.cached_tokens`` (OpenAI's field) counts the prompt tokens the
  prefix cache served: once per prompt whatever ``n``, summed over a request's prompts;
- structured output (OpenAI's ``response_format``, vLLM's ``structured_outputs`` or one of its
  ``guided_*`` fields; one of them per request) is compiled once the request is admitted (a
  full server answers 429 without compiling), on the service's compile threads, before the
  request reaches the engine; its errors are 400s naming the field it came from;
- ``allowed_token_ids`` and ``logit_bias`` name tokens of the tokenizer: the model's padded
  embedding rows past it are refused (as vLLM checks ``allowed_token_ids``).

Token strings in log-probabilities are the token's bytes as UTF-8 text; a token that is not
valid UTF-8 on its own (part of a multi-byte character) is written ``bytes:\\xe2\\x80`` as
OpenAI does, and its exact bytes are in the chat format's ``bytes`` field.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from tulu.chat import conversation_text, generation_prompt
from tulu.engine.async_engine import EngineDeadError
from tulu.engine.engine import CompletionOutput, RequestOutput
from tulu.engine.reference import TokenLogprob
from tulu.engine.sampling import SamplingParams, check_token_ids_in_vocab
from tulu.engine.structured import StructuredOutput, name_structured_field
from tulu.errors import GenerationError, TuluError
from tulu.server.best_of import rank_samples
from tulu.server.openai_protocol import (
    MAX_N,
    MAX_TOP_LOGPROBS,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TopLogprob,
    Usage,
)
from tulu.server.openai_protocol import TokenLogprob as ChatTokenLogprob
from tulu.server.service import (
    Admission,
    GenerationService,
    RequestTimedOut,
    check_structured_output_size,
)
from tulu.token_strings import TokenStrings
from tulu.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("tulu.server")
router = APIRouter()
CREATED = int(time.time())


@router.get("/v1/models")
async def list_models(request: Request):
    service = request.app.state.service
    name = service.settings.served_model_name
    entry = {"object": "model", "created": CREATED, "owned_by": "tulu"}
    entry["max_model_len"] = service.max_model_len
    # LoRA adapters are listed as vLLM lists them: `root` the adapter, `parent` the base.
    adapters = [
        {"id": lora, **entry, "root": path, "parent": name}
        for lora, path in service.lora_adapters.items()
    ]
    return {"object": "list", "data": [{"id": name, **entry}, *adapters]}


@router.post("/tokenize")
async def tokenize(body: dict[str, Any], request: Request):
    """vLLM's: the token ids of a text or of chat messages, as a generation request would
    see them, with the window they must fit in."""
    return await _answer(request, _tokenize(body, request))


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    """vLLM's: the text of token ids."""
    return await _answer(request, _detokenize(body, request))


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    return await _answer(request, _completion(body, request))


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    return await _answer(request, _chat(body, request))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in OpenAI's shape, with the offending parameter."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


def _error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error_of(err: BaseException) -> dict:
    """The OpenAI error body for an exception raised while generating."""
    if isinstance(err, ApiError):
        return _error_body(err.status, err.message, err.kind, err.param)
    if isinstance(err, RequestTimedOut):
        return _error_body(504, str(err), "timeout")
    if isinstance(err, EngineDeadError):
        return _error_body(503, str(err), "engine_unavailable")
    if isinstance(err, TuluError):
        return _error_body(400, str(err), "invalid_request_error")
    log.error("unexpected error while streaming", exc_info=err)
    return _error_body(500, f"internal error: {type(err).__name__}", "internal_error")


async def _answer(request: Request, work: Awaitable[Response]) -> Response:
    """Run a route's work; parameter errors become 400s naming the parameter.

    Overloaded, RequestTimedOut and EngineDeadError pass through to the app's handlers (429,
    504, 503).
    """
    try:
        return await work
    except ApiError as err:
        body = _error_body(err.status, err.message, err.kind, err.param)
        return _json(body, err.status)
    except ClientGone:
        return _json(_error_body(499, "the client closed the connection", "client_closed"), 499)


def _json(body: Any, status: int = 200) -> Response:
    if hasattr(body, "model_dump_json"):
        body = body.model_dump_json()
    else:
        body = json.dumps(body, ensure_ascii=False)
    return Response(body, status_code=status, media_type="application/json")


_SAMPLING_FIELD = re.compile(r"^SamplingParams\.(\w+)(?:\[[^\]]*\])? ")


def _param_error(err: GenerationError, rename: dict[str, str] | None = None) -> ApiError:
    """A SamplingParams error ("SamplingParams.top_p must be ...") as a 400 naming the field."""
    message = str(err)
    match = _SAMPLING_FIELD.match(message)
    if match is None:
        return ApiError(message)
    field = match.group(1)
    param = (rename or {}).get(field, field)
    return ApiError(param + message[match.end(1) :], param)


# ----------------------------------------------------------------------------------------------
# Shared request handling
# ----------------------------------------------------------------------------------------------


#: Model names Hugging Face's clients send when they cannot know the served one: TGI's docs
#: use "tgi", and `huggingface_hub.InferenceClient(base_url=...)` sends "dummy". TGI accepts
#: any name; this server, like vLLM, 404s unknown names but takes these as the base model.
PLACEHOLDER_MODELS = frozenset({"tgi", "dummy"})


def _check_model(model: str | None, service: GenerationService) -> tuple[str, str | None]:
    """(the model name to answer with, the LoRA adapter it names or None for the base).

    An adapter literally named like a placeholder (`PLACEHOLDER_MODELS`) is still that adapter.
    """
    served = service.settings.served_model_name
    if model is None or model == served:
        return served, None
    adapters = service.lora_adapters
    if model in adapters:
        return model, model
    if model in PLACEHOLDER_MODELS:
        return served, None
    also = f" and the LoRA adapters {', '.join(map(repr, adapters))}" if adapters else ""
    raise ApiError(
        f"the model {model!r} does not exist; this server serves {served!r}{also}",
        "model",
        404,
        "not_found_error",
    )


def _check_common(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError("stream_options is only allowed when stream is true", "stream_options")
    if body.n > MAX_N:
        raise ApiError(f"n must be at most {MAX_N}, got {body.n}", "n")


def _truncation(
    body: CompletionRequest | ChatCompletionRequest,
    service: GenerationService,
    requested: int | None,
) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: how many of a prompt's last tokens to keep, or None.
    -1 keeps as many as leave room for the `requested` new tokens (at least one; vLLM's -1 is
    the window itself, which leaves none)."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return None
    longest = service.max_model_len - 1
    if keep == -1:
        return max(service.max_model_len - max(requested or 1, 1), 1)
    if not 1 <= keep <= longest:
        raise ApiError(
            f"truncate_prompt_tokens must be -1 or 1 .. {longest} (the longest prompt that "
            f"leaves room for one token in max_model_len {service.max_model_len}), got {keep}",
            "truncate_prompt_tokens",
        )
    return keep


def _check_length(
    service: GenerationService,
    ids: list[int],
    requested: int | None,
    prompt_field: str,
    max_field: str,
) -> int:
    try:
        return service.check_length(len(ids), requested)
    except GenerationError as err:
        fits = 0 < len(ids) < service.max_model_len
        raise ApiError(
            str(err), max_field if fits and requested is not None else prompt_field
        ) from None


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` keyed by token ids (the JSON object's keys are strings of
    decimal digits). The values are checked by SamplingParams ([-100, 100]; vLLM clamps a
    bias outside it, here it is refused, naming the key)."""
    if not raw:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        if not (key.isascii() and key.isdigit()):
            raise ApiError(
                f"logit_bias: the key {key!r} is not a token id (a whole number >= 0)",
                "logit_bias",
            )
        bias[int(key)] = value
    return bias


def _sampling_params(
    body: CompletionRequest | ChatCompletionRequest,
    service: GenerationService,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    rename: dict[str, str] | None = None,
    constraint: _Constraint | None = None,
    samples: int | None = None,
) -> SamplingParams:
    """The request's SamplingParams; `samples` overrides ``n`` (``best_of`` draws more)."""

    def pick(value, default):
        return default if value is None else value

    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=pick(body.temperature, 1.0),
            top_p=pick(body.top_p, 1.0),
            top_k=pick(body.top_k, 0),
            min_p=pick(body.min_p, 0.0),
            repetition_penalty=pick(body.repetition_penalty, 1.0),
            presence_penalty=pick(body.presence_penalty, 0.0),
            frequency_penalty=pick(body.frequency_penalty, 0.0),
            seed=body.seed,
            n=samples if samples is not None else body.n,
            stop=pick(body.stop, []),
            stop_token_ids=pick(body.stop_token_ids, []),
            bad_words=pick(body.bad_words, []),
            include_stop_str_in_output=body.include_stop_str_in_output,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            min_tokens=body.min_tokens,
            skip_special_tokens=body.skip_special_tokens,
            logit_bias=_logit_bias(body.logit_bias),
            allowed_token_ids=body.allowed_token_ids,
            structured_output=constraint.spec if constraint is not None else None,
        )
        check_token_ids_in_vocab(
            params, service.llm.engine.model_config.vocab_size, len(service.tokenizer)
        )
    except GenerationError as err:
        error = _param_error(err, rename)
        if constraint is not None:  # "min_tokens cannot be combined with structured_output"
            error.message = name_structured_field(error.message, constraint.field)
        raise error from None
    return params


# ----------------------------------------------------------------------------------------------
# Structured output
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Constraint:
    """A request's structured output and the request field it came from."""

    spec: StructuredOutput
    field: str
    """The request field, the ``param`` of its errors: response_format, structured_outputs,
    guided_json, ..."""
    path: str
    """What a compile error names: ``response_format.json_schema.schema``,
    ``structured_outputs.regex``, ``guided_json``, ..."""


def _constraint_sources(body: CompletionRequest | ChatCompletionRequest) -> list[tuple[str, dict]]:
    """(request field, StructuredOutput fields) of every structured output the request sets."""
    sources: list[tuple[str, dict]] = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        sources.append(("response_format", {"json_object": True}))
    elif response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.schema_
        if schema is not None:  # no schema: no constraint, as OpenAI and vLLM
            sources.append(("response_format", {"json": schema}))
    if body.structured_outputs is not None:
        given = body.structured_outputs
        fields = {
            "json": given.json_,
            "json_object": bool(given.json_object),
            "regex": given.regex,
            "choice": given.choice,
            "grammar": given.grammar,
        }
        sources.append(("structured_outputs", fields))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            sources.append((f"guided_{kind}", {kind: value}))
    return sources


def _constraint(body: CompletionRequest | ChatCompletionRequest) -> _Constraint | None:
    """The request's structured output, checked (not compiled); None without one."""
    _check_structured_options(body)
    sources = _constraint_sources(body)
    if not sources:
        return None
    if len(sources) > 1:
        names = [name for name, _ in sources]
        raise ApiError(
            f"{', '.join(names[:-1])} and {names[-1]} cannot be combined: give the structured "
            "output once",
            names[1],
        )
    field, fields = sources[0]
    try:
        spec = StructuredOutput(**fields)
    except GenerationError as err:
        raise ApiError(name_structured_field(str(err), field), field) from None
    if field == "response_format":
        path = "response_format.json_schema.schema" if spec.json is not None else field
    elif field == "structured_outputs":
        path = f"{field}.{spec.kind}"
    else:
        path = field
    try:
        check_structured_output_size(spec, path)
    except GenerationError as err:
        raise ApiError(str(err), field) from None
    return _Constraint(spec, field, path)


#: vLLM's ``structured_outputs`` options that change what a constraint matches in ways this
#: server cannot: set (not null), they are refused. (``disable_any_whitespace``,
#: ``disable_additional_properties`` and ``disable_fallback`` are accepted: see
#: `tulu.server.openai_protocol.StructuredOutputs`.)
_UNSUPPORTED_STRUCTURED_OPTIONS = {
    "whitespace_pattern": "JSON is always generated without free whitespace (xgrammar's "
    "fixed separators); a custom whitespace pattern is not supported",
    "structural_tag": "structural tags (tool-call formats) are not supported by this server",
}


def _check_structured_options(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse vLLM's structured output options whose meaning this server cannot honour."""
    if body.guided_whitespace_pattern is not None:
        reason = _UNSUPPORTED_STRUCTURED_OPTIONS["whitespace_pattern"]
        raise ApiError(f"guided_whitespace_pattern: {reason}", "guided_whitespace_pattern")
    given = body.structured_outputs
    if given is None:
        return
    for name, reason in _UNSUPPORTED_STRUCTURED_OPTIONS.items():
        if getattr(given, name) is not None:
            param = f"structured_outputs.{name}"
            raise ApiError(f"{param}: {reason}", param)


async def _compile(service: GenerationService, constraint: _Constraint | None) -> None:
    """Compile the structured output off the event loop; a 400 naming its field if it fails.

    Called inside the request's admission, which gives its slots back when this raises."""
    if constraint is None:
        return
    try:
        await service.compile_structured_output(constraint.spec)
    except GenerationError as err:
        raise ApiError(name_structured_field(str(err), constraint.path), constraint.field) from None


def _check_finished(output: RequestOutput) -> None:
    """An aborted choice (the server is shutting down) is an error, never a finish_reason."""
    if any(c.finish_reason == "abort" for c in output.outputs):
        raise EngineDeadError("the request was aborted: the server is shutting down")


def _stop_reason(reason: int | str | None, params: SamplingParams, eos: int | None) -> Any:
    """vLLM's stop_reason: the stop string or stop token id; None for EOS and length."""
    if reason == eos and reason not in params.stop_token_ids:
        return None
    return reason


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------


class _Streams:
    """Runs the `service.generate` streams of one HTTP request concurrently and merges them
    into one iteration of ``(stream index, RequestOutput)`` in arrival order.

    Each stream is pumped by its own task; a watcher task polls the client's connection and
    ends the iteration with `ClientGone` when it closes. `close()` stops every stream that
    still runs, which aborts its request in the engine and frees its KV blocks.

    Stopping does not rely on cancellation alone: on Python < 3.12 `asyncio.wait_for` (which
    the service awaits each output with) returns the output instead of raising when the
    cancellation and the output arrive in the same loop iteration, swallowing the cancel. So
    the pumps also check a flag after every output and leave their loop (closing the
    generator at its `yield`, which aborts the request deterministically).
    """

    POLL_SECONDS = 0.25

    def __init__(self, streams: list[AsyncIterator[RequestOutput]], request: Request | None):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = len(streams)
        self._closing = False
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)]
        self._watcher = asyncio.ensure_future(self._watch(request)) if request else None

    async def _pump(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    if self._closing:
                        return
                    self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._queue.put_nowait((index, err))
        else:
            self._queue.put_nowait((index, None))

    async def _watch(self, request: Request) -> None:
        while True:
            await asyncio.sleep(self.POLL_SECONDS)
            if await request.is_disconnected():
                self._queue.put_nowait((-1, ClientGone()))
                return

    async def _get(self) -> tuple[int, RequestOutput | None]:
        index, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return index, item

    async def start(self) -> None:
        """Wait until every stream has its first output; raise the first error (or
        ClientGone) instead. The outputs are kept for the iteration."""
        started: set[int] = set()
        while len(started) < len(self._tasks):
            index, output = await self._get()
            if output is None:
                self._open -= 1
            else:
                self._buffer.append((index, output))
            started.add(index)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        buffered, self._buffer = self._buffer, []
        for item in buffered:
            yield item
        while self._open > 0:
            index, output = await self._get()
            if output is None:
                self._open -= 1
            else:
                yield index, output

    async def finish(self) -> list[RequestOutput]:
        """Run every stream to its end; the final output of each, in stream order."""
        final: dict[int, RequestOutput] = {}
        async for index, output in self:
            final[index] = output
        return [final[i] for i in range(len(self._tasks))]

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._tasks, *([self._watcher] if self._watcher else [])]
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


class _EventStream(StreamingResponse):
    """Server-sent events over running streams. However the response ends (finished, client
    gone, send failed before the body started), the body generator is closed and the
    streams are stopped, so no request outlives its response."""

    def __init__(self, streams: _Streams, produce: AsyncIterator[str]):
        self.streams = streams
        super().__init__(
            _events(streams, produce),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.streams.close()


def _sse(payload: Any, exclude: set[str] | None = None) -> str:
    if hasattr(payload, "model_dump_json"):
        data = payload.model_dump_json(exclude=exclude)
    else:
        data = json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _generate(
    request: Request,
    service: GenerationService,
    jobs: list[tuple[list[int], SamplingParams, str]],
    admission: Admission,
    stream: bool,
    lora: str | None = None,
    score_only: bool = False,
) -> _Streams | list[RequestOutput]:
    """Run the generations of one HTTP request, each on one of `admission`'s slots.

    Streaming: wait for every generation's first output (so invalid input or an engine
    failure is still an HTTP error) and return the running streams. Otherwise: the final
    output of each. Either way a client that leaves aborts them (ClientGone).
    `score_only`: the sampled tokens are discarded (see `GenerationService.generate`).
    """
    streams = _Streams(
        [
            service.generate(ids, params, rid, admission, lora=lora, score_only=score_only)
            for ids, params, rid in jobs
        ],
        request,
    )
    done_with_streams = not stream
    try:
        if stream:
            await streams.start()
            return streams
        return await streams.finish()
    except BaseException:
        done_with_streams = True
        raise
    finally:
        if done_with_streams:
            await streams.close()


async def _events(streams: _Streams, produce: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE body: the route's events, an error event if generation fails, then [DONE]."""
    try:
        try:
            async for event in produce:
                yield event
        except ClientGone:
            return
        except Exception as err:
            yield _sse(_error_of(err))
        yield "data: [DONE]\n\n"
    finally:
        with anyio.CancelScope(shield=True):
            await produce.aclose()
            await streams.close()


# ----------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------


def _token_strings(request: Request, tokenizer: Tokenizer) -> TokenStrings:
    strings = getattr(request.app.state, "openai_token_strings", None)
    if strings is None or strings.tokenizer is not tokenizer:
        strings = TokenStrings(tokenizer)
        request.app.state.openai_token_strings = strings
    return strings


class _LegacyLogprobs:
    """The completions format's log-probabilities of one run of tokens, built piece by piece
    (for streaming). ``text_offset`` counts characters of the returned text: the position where
    each token's text starts (a token inside a multi-byte character gets the character's).

    The decoder's text gives the position after the tokens it has turned into text; tokens it
    still holds back (their bytes end inside a character, or are invalid and await what
    follows) are placed by their bytes: each token after an invalid byte or a cut-off
    character starts one character (the U+FFFD) further. Without exact bytes (a tokenizer
    that is not byte-level), held-back tokens get the decoder's position.
    """

    def __init__(
        self,
        strings: TokenStrings,
        context: list[int] | None,
        offset: int,
        skip_special_tokens: bool,
    ):
        self.strings = strings
        self.decoder = StreamDecoder(
            strings.tokenizer, context, skip_special_tokens=skip_special_tokens
        )
        self.skipped = strings.tokenizer.special_ids() if skip_special_tokens else frozenset()
        self.offset = offset  # the characters the decoder has returned so far
        self.held = b""  # the bytes of the tokens the decoder holds back

    def add(self, token_ids: list[int], entries: list[TokenLogprob | None]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries, strict=True):
            text, raw = self.strings.get(token_id)
            out.tokens.append(text)
            first = bytes(raw[:1]) if token_id not in self.skipped else b""
            out.text_offset.append(self.offset + _chars_before(self.held, first))
            delta = self.decoder.push(token_id)
            if delta:
                self.offset += len(delta)
                self.held = b""
            elif token_id not in self.skipped and self.strings.exact_bytes:
                self.held += bytes(raw)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(entry.logprob)
            top: dict[str, float] = {}
            for alt_id, alt_logprob in entry.top:
                top.setdefault(self.strings.text(alt_id), alt_logprob)
            # As OpenAI's legacy format and vLLM: the chosen token is always among them, so
            # there are up to logprobs + 1 (one with logprobs 0).
            top.setdefault(text, entry.logprob)
            out.top_logprobs.append(top)
        return out


def _chars_before(held: bytes, first: bytes) -> int:
    """How many characters of the text `held` (bytes the decoder has not returned yet) makes
    before a token starting with the byte `first`: its complete characters and invalid
    sequences (one U+FFFD each, as the tokenizer's lossy decoding counts them), plus the unfinished
    character at its end unless `first` continues that character."""
    if not held:
        return 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars = len(decoder.decode(held))
    unfinished = decoder.getstate()[0]
    if unfinished and first:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(unfinished + first)
        except UnicodeDecodeError:  # `first` cannot continue it: it becomes a U+FFFD
            chars += 1
    return chars


def _merge(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for part in parts:
        out.tokens += part.tokens
        out.text_offset += part.text_offset
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
    return out


def _chat_logprobs(strings: TokenStrings, entries: list[TokenLogprob]) -> ChoiceLogprobs:
    content = []
    for entry in entries:
        text, raw = strings.get(entry.token_id)
        top = []
        for alt_id, alt_logprob in entry.top:
            alt_text, alt_raw = strings.get(alt_id)
            top.append(TopLogprob(token=alt_text, logprob=alt_logprob, bytes=alt_raw))
        content.append(
            ChatTokenLogprob(token=text, logprob=entry.logprob, bytes=raw, top_logprobs=top)
        )
    return ChoiceLogprobs(content=content)


# ----------------------------------------------------------------------------------------------
# /tokenize, /detokenize
# ----------------------------------------------------------------------------------------------


async def _tokenize(data: dict[str, Any], request: Request) -> Response:
    service: GenerationService = request.app.state.service
    # vLLM's two request forms, told apart as vLLM does: by `messages`.
    form = TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest
    try:
        body = form.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None
    _check_model(body.model, service)
    if isinstance(body, TokenizeChatRequest):
        if body.chat_template is not None:
            raise ApiError(
                "chat_template is not supported: prompts are always in the Tulu format",
                "chat_template",
            )
        if body.continue_final_message:
            raise ApiError(
                "continue_final_message is not supported by this server", "continue_final_message"
            )
        render = generation_prompt if body.add_generation_prompt else conversation_text
        try:
            ids = await service.encode_text(
                render(chat_messages(body.messages), service.tokenizer.eos_token)
            )
        except TuluError as err:
            raise ApiError(str(err), "messages") from None
    else:
        try:
            ids = await service.encode_text(body.prompt)
        except TuluError as err:
            raise ApiError(str(err), "prompt") from None
    pieces = [service.tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None
    return _json(
        {
            "count": len(ids),
            "max_model_len": service.max_model_len,
            "tokens": ids,
            "token_strs": pieces,
        }
    )


async def _detokenize(body: DetokenizeRequest, request: Request) -> Response:
    service: GenerationService = request.app.state.service
    _check_model(body.model, service)
    vocab = service.llm.engine.model_config.vocab_size
    for index, token in enumerate(body.tokens):
        if not 0 <= token < vocab:
            raise ApiError(
                f"tokens[{index}] is {token}, outside the vocabulary [0, {vocab})", "tokens"
            )
    return _json({"prompt": service.tokenizer.decode(body.tokens)})


# ----------------------------------------------------------------------------------------------
# /v1/completions
# ----------------------------------------------------------------------------------------------


@dataclass
class _Prompt:
    ids: list[int]
    echo: str  # the text echoed back: the prompt string, or the decoded token ids
    params: SamplingParams
    request_id: str


async def _completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], service: GenerationService
) -> list[tuple[list[int], str]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        items: list[Any] = [prompt]
    else:
        items = list(prompt)
    # Each prompt takes one admission slot: a batch larger than all of them can never run, so
    # it is a bad request (not "retry later"), refused before tokenizing it on the event loop.
    limit = service.settings.max_num_seqs + service.settings.max_queue
    if len(items) > max(limit, 1):
        raise ApiError(
            f"the request has {len(items)} prompts, more than this server admits at once "
            f"({limit}); send them in several requests",
            "prompt",
        )
    vocab = service.llm.engine.model_config.vocab_size
    prompts = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            prompts.append((await service.encode_text(item), item))
            continue
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
            where = f"prompt {index}" if len(items) > 1 else "the prompt"
            raise ApiError(
                f"{where} has token id {bad[0]}, outside the vocabulary [0, {vocab})", "prompt"
            )
        prompts.append((list(item), service.tokenizer.decode(item)))
    return prompts


async def _completion(body: CompletionRequest, request: Request) -> Response:
    service: GenerationService = request.app.state.service
    model, lora = _check_model(body.model, service)
    _check_common(body)
    if body.suffix is not None:
        raise ApiError("suffix is not supported by this server", "suffix")
    score_only = body.max_tokens == 0 and body.echo
    best_of = _best_of(body, score_only)
    requested = 1 if score_only else body.max_tokens
    want_prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    # best_of ranks the samples by their log-probabilities: they are computed even when the
    # client did not ask for them (it is not shown them then: the view has no token strings).
    logprobs = body.logprobs if body.logprobs is not None or best_of == body.n else 0
    constraint = _constraint(body)
    keep = _truncation(body, service, requested)
    base_id = service.request_id("cmpl")
    texts = await _completion_prompts(body.prompt, service)
    if keep is not None:  # the echo is the prompt the model saw
        texts = [
            (ids[-keep:], service.tokenizer.decode(ids[-keep:])) if len(ids) > keep else (ids, echo)
            for ids, echo in texts
        ]
    prompts = []
    for index, (ids, echo) in enumerate(texts):
        try:
            max_tokens = _check_length(service, ids, requested, "prompt", "max_tokens")
        except ApiError as err:
            if len(texts) > 1:  # say which of the prompts does not fit
                err.message = f"prompt {index}: {err.message}"
            raise
        params = _sampling_params(
            body,
            service,
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=want_prompt_logprobs,
            constraint=constraint,
            samples=best_of,
        )
        if best_of > body.n and params.is_greedy:
            raise ApiError(
                f"best_of ({best_of}) > n ({body.n}) needs sampling (temperature > 0): greedy "
                f"samples are all the same",
                "best_of",
            )
        request_id = base_id if len(texts) == 1 else f"{base_id}-{index}"
        prompts.append(_Prompt(ids, echo, params, request_id))
    with service.admit(len(prompts)) as admission:  # one slot per prompt, before compiling
        await _compile(service, constraint)
        created = int(time.time())
        strings = _token_strings(request, service.tokenizer) if body.logprobs is not None else None
        view = _CompletionView(body, service, strings, prompts, score_only)

        jobs = [(p.ids, p.params, p.request_id) for p in prompts]
        if body.stream:
            streams = await _generate(
                request, service, jobs, admission, stream=True, lora=lora, score_only=score_only
            )
            produce = view.stream(streams, base_id, created, model)
            return _EventStream(streams, produce)

        outputs = await _generate(
            request, service, jobs, admission, stream=False, lora=lora, score_only=score_only
        )
    choices = []
    for index, output in enumerate(outputs):
        _check_finished(output)
        if best_of > body.n:
            output.outputs, discarded = _best_samples(output.outputs, body.n)
            view.discarded_tokens += discarded
        for completion in output.outputs:
            state = view.state(index, completion.index)
            choices.append(view.finish(state, output, completion))
    return _json(
        CompletionResponse(
            id=base_id,
            created=created,
            model=model,
            choices=choices,
            usage=view.usage(),
        )
    )


def _best_of(body: CompletionRequest, score_only: bool) -> int:
    """How many samples to draw per prompt: ``best_of`` (n to MAX_N), n when unset. A request
    that only scores its prompt draws n (there is nothing to rank), but its ``best_of`` must
    still be a valid one: checked first."""
    if body.best_of is None:
        return body.n
    if not body.n <= body.best_of <= MAX_N:
        raise ApiError(
            f"best_of must be at least n ({body.n}) and at most {MAX_N}, got {body.best_of}",
            "best_of",
        )
    if score_only:
        return body.n
    if body.best_of > body.n and body.stream:
        raise ApiError(
            f"best_of ({body.best_of}) > n ({body.n}) cannot be streamed: the best samples are "
            f"known only when all have finished",
            "best_of",
        )
    return body.best_of


def _best_samples(samples: list[CompletionOutput], n: int) -> tuple[list[CompletionOutput], int]:
    """The `n` most likely samples (renumbered 0..n-1, best first) and the number of tokens
    of those left out (they count in the usage: they were generated)."""
    ranked = rank_samples(samples)
    kept = [replace(sample, index=i) for i, sample in enumerate(ranked[:n])]
    return kept, sum(len(sample.token_ids) for sample in ranked[n:])


@dataclass
class _ChoiceState:
    prompt: int
    sample: int
    index: int
    started: bool = False
    done: bool = False
    logprobs_sent: int = 0
    prompt_logprobs: _LegacyLogprobs | None = None
    output_logprobs: _LegacyLogprobs | None = None
    completion_tokens: int = 0


class _CompletionView:
    """Turns engine outputs into completions choices, whole or as stream chunks."""

    def __init__(
        self,
        body: CompletionRequest,
        service: GenerationService,
        strings: TokenStrings | None,
        prompts: list[_Prompt],
        score_only: bool,
    ):
        self.body = body
        self.service = service
        self.strings = strings
        self.prompts = prompts
        self.score_only = score_only
        self.states: dict[tuple[int, int], _ChoiceState] = {}
        # Prompt index -> the tokens the prefix cache served it: once per prompt, whatever n.
        self.cached_tokens: dict[int, int] = {}
        # Tokens of the samples best_of drew and left out: generated, so in the usage.
        self.discarded_tokens = 0

    def state(self, prompt: int, sample: int) -> _ChoiceState:
        key = (prompt, sample)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _ChoiceState(prompt, sample, prompt * self.body.n + sample)
            if self.strings is not None:
                p = self.prompts[prompt]
                offset = 0
                if self.body.echo:
                    state.prompt_logprobs = _LegacyLogprobs(self.strings, None, 0, False)
                    offset = len(p.echo)
                state.output_logprobs = _LegacyLogprobs(
                    self.strings, p.ids, offset, p.params.skip_special_tokens
                )
        return state

    def _prompt_part(self, state: _ChoiceState, output: RequestOutput) -> tuple[str, list]:
        """The echoed prompt text and its log-probabilities (once per choice)."""
        state.started = True
        if not self.body.echo:
            return "", []
        logprobs = []
        if state.prompt_logprobs is not None:
            entries = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
            logprobs.append(state.prompt_logprobs.add(output.prompt_token_ids, entries))
        return self.prompts[state.prompt].echo, logprobs

    def _output_part(self, state: _ChoiceState, completion) -> list:
        if state.output_logprobs is None or completion.logprobs is None:
            return []
        entries = completion.logprobs[state.logprobs_sent :]
        tokens = completion.token_ids[state.logprobs_sent : state.logprobs_sent + len(entries)]
        state.logprobs_sent += len(entries)
        return [state.output_logprobs.add(tokens, entries)]

    def finish(self, state: _ChoiceState, output: RequestOutput, completion) -> CompletionChoice:
        """The whole choice of a finished output (non-streaming)."""
        self.cached_tokens[state.prompt] = output.num_cached_tokens
        text, parts = self._prompt_part(state, output)
        if self.score_only:
            return self._choice(state, text, parts, "length", None)
        parts += self._output_part(state, completion)
        state.completion_tokens = len(completion.token_ids)
        reason = _stop_reason(
            completion.stop_reason,
            self.prompts[state.prompt].params,
            self.service.tokenizer.eos_token_id,
        )
        return self._choice(state, text + completion.text, parts, completion.finish_reason, reason)

    def _choice(self, state, text, parts, finish_reason, stop_reason) -> CompletionChoice:
        logprobs = _merge(parts) if self.strings is not None else None
        return CompletionChoice(
            index=state.index,
            text=text,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )

    def usage(self) -> Usage:
        """The whole request's usage: every prompt once, every choice's tokens."""
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        completion_tokens = sum(s.completion_tokens for s in self.states.values())
        completion_tokens += self.discarded_tokens
        return Usage.of(prompt_tokens, completion_tokens, sum(self.cached_tokens.values()))

    async def stream(
        self, streams: _Streams, request_id: str, created: int, model: str
    ) -> AsyncIterator[str]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}

        def chunk(choice: CompletionChoice) -> str:
            return _sse(
                CompletionResponse(id=request_id, created=created, model=model, choices=[choice]),
                exclude,
            )

        async for prompt, output in streams:
            _check_finished(output)
            self.cached_tokens[prompt] = output.num_cached_tokens
            params = self.prompts[prompt].params
            for completion in output.outputs:
                state = self.state(prompt, completion.index)
                if state.done:
                    continue
                text, parts = ("", []) if state.started else self._prompt_part(state, output)
                if self.score_only:
                    state.done = True
                    yield chunk(self._choice(state, text, parts, "length", None))
                    continue
                text += completion.delta_text
                parts += self._output_part(state, completion)
                finish = completion.finish_reason
                if finish is not None:
                    state.done = True
                    state.completion_tokens = len(completion.token_ids)
                if text or finish is not None or any(p.tokens for p in parts):
                    reason = _stop_reason(
                        completion.stop_reason, params, self.service.tokenizer.eos_token_id
                    )
                    yield chunk(self._choice(state, text, parts, finish, reason))
        if include_usage:
            usage = CompletionResponse(
                id=request_id, created=created, model=model, choices=[], usage=self.usage()
            )
            yield _sse(usage)


# ----------------------------------------------------------------------------------------------
# /v1/chat/completions
# ----------------------------------------------------------------------------------------------


def _check_chat(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise ApiError("tools are not supported by this server", "tools")
    if body.tool_choice not in (None, "none"):
        raise ApiError("tool_choice is not supported by this server", "tool_choice")
    if body.functions:
        raise ApiError("functions are not supported by this server", "functions")
    if body.function_call not in (None, "none"):
        raise ApiError("function_call is not supported by this server", "function_call")
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise ApiError("top_logprobs requires logprobs to be true", "top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {body.top_logprobs}",
                "top_logprobs",
            )


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The Tulu format's messages of a request's (OpenAI's "developer" is a system turn)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        for m in messages
    ]


async def _chat(body: ChatCompletionRequest, request: Request) -> Response:
    service: GenerationService = request.app.state.service
    model, lora = _check_model(body.model, service)
    _check_common(body)
    _check_chat(body)
    constraint = _constraint(body)
    keep = _truncation(body, service, body.max_completion_tokens or body.max_tokens)
    try:
        ids = await service.encode_chat(chat_messages(body.messages))
    except TuluError as err:
        raise ApiError(str(err), "messages") from None
    if keep is not None:
        ids = ids[-keep:]
    if body.max_completion_tokens is not None:
        requested, max_field = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, max_field = body.max_tokens, "max_tokens"
    max_tokens = _check_length(service, ids, requested, "messages", max_field)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling_params(
        body,
        service,
        max_tokens=max_tokens,
        logprobs=logprobs,
        rename={"max_tokens": max_field},
        constraint=constraint,
    )
    with service.admit() as admission:  # before compiling: a full server answers at once
        await _compile(service, constraint)
        request_id = service.request_id("chatcmpl")
        created = int(time.time())
        strings = _token_strings(request, service.tokenizer) if body.logprobs else None
        eos = service.tokenizer.eos_token_id

        jobs = [(ids, params, request_id)]
        if body.stream:
            streams = await _generate(request, service, jobs, admission, stream=True, lora=lora)
            produce = _chat_stream(
                body, streams, params, strings, ids, request_id, created, model, eos
            )
            return _EventStream(streams, produce)

        (output,) = await _generate(request, service, jobs, admission, stream=False, lora=lora)
    _check_finished(output)
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=_chat_logprobs(strings, c.logprobs or []) if strings is not None else None,
            finish_reason=c.finish_reason,
            stop_reason=_stop_reason(c.stop_reason, params, eos),
        )
        for c in output.outputs
    ]
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    usage = Usage.of(len(ids), completion_tokens, output.num_cached_tokens)
    return _json(
        ChatCompletionResponse(
            id=request_id, created=created, model=model, choices=choices, usage=usage
        )
    )


async def _chat_stream(
    body: ChatCompletionRequest,
    streams: _Streams,
    params: SamplingParams,
    strings: TokenStrings | None,
    ids: list[int],
    request_id: str,
    created: int,
    model: str,
    eos: int | None,
) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    exclude = None if include_usage else {"usage"}

    def chunk(choice: ChatStreamChoice) -> str:
        payload = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
        return _sse(payload, exclude)

    for index in range(params.n):
        yield chunk(ChatStreamChoice(index=index, delta={"role": "assistant", "content": ""}))
    sent = [0] * params.n
    done = [False] * params.n
    completion_tokens = 0
    cached_tokens = 0
    async for _, output in streams:
        _check_finished(output)
        cached_tokens = output.num_cached_tokens
        for c in output.outputs:
            if done[c.index]:
                continue
            logprobs = None
            if strings is not None and c.logprobs is not None:
                new = c.logprobs[sent[c.index] :]
                sent[c.index] += len(new)
                if new:
                    logprobs = _chat_logprobs(strings, new)
            if c.delta_text or logprobs is not None:
                yield chunk(
                    ChatStreamChoice(
                        index=c.index, delta={"content": c.delta_text}, logprobs=logprobs
                    )
                )
            if c.finish_reason is not None:
                done[c.index] = True
                completion_tokens += len(c.token_ids)
                yield chunk(
                    ChatStreamChoice(
                        index=c.index,
                        delta={},
                        finish_reason=c.finish_reason,
                        stop_reason=_stop_reason(c.stop_reason, params, eos),
                    )
                )
    if include_usage:
        usage = Usage.of(len(ids), completion_tokens, cached_tokens)
        payload = ChatCompletionChunk(
            id=request_id, created=created, model=model, choices=[], usage=usage
        )
        yield _sse(payload)
