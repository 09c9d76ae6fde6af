"""TGI-compatible routes: /generate, /generate_stream, POST / (the client's route), /info.

A drop-in for text-generation-inference clients (the `text_generation` package, huggingface_hub's
`InferenceClient.text_generation`, curl scripts written for TGI):

- `POST /generate` -> `{"generated_text", "details"?}`; `details` only when asked for.
- `POST /generate_stream` -> server-sent events, one per token
  (`data: {"index", "token", "top_tokens"?, "generated_text": null, "details": null}`); the last
  event carries the whole `generated_text`, and the `details` when they were asked for (as TGI). An error after the stream has
  started is sent as an event `data: {"error", "error_type"}`.
- `POST /` with `{"inputs", "parameters", "stream"}`: what the `text_generation` client posts to
  the base URL. `stream` false answers a one-element list (TGI's "compat" route), true streams.
- `GET /info`; `GET /health` is in `tulu.server.app`.

`inputs` is used as raw text (no chat template, as in TGI). Invalid requests get HTTP 422 with
`{"error": "...", "error_type": "validation"}`, a full server 429 `overloaded` (both answered by
the app's error handlers).

Differences from TGI worth knowing:

- As in TGI, a request samples when `do_sample` is true or when it sets a `temperature` other
  than 1, a `top_k`, or a `top_p` or `typical_p` below 1 (TGI's "warpers" turn sampling on);
  otherwise it is greedy. A sampled request without a `seed` gets a random one, reported in `details.seed` so
  the result can be reproduced; greedy requests report `seed: null`.
- Log-probabilities are those of the model (the raw logits), before penalties, temperature and
  truncation.
- A stop sequence is kept at the end of `generated_text` (as TGI does); generation stops where
  the stop sequence ends, even inside a token.
- `grammar` (`json`, `regex` or `json_schema`, at most 64 KiB of text) constrains the
  generated text; it is compiled once the request is admitted (a full server answers 429
  without compiling), on the service's compile threads, before the request reaches the
  engine, and a schema or regex that does not compile is a 422 with the compiler's reason.
  The text ends (`eos_token`) when the grammar is complete.
- `best_of` draws that many samples and answers with the one of the highest mean
  log-probability per generated token (TGI's rule, with the model's log-probabilities); the
  others are in `details.best_of_sequences`, each with the seed that reproduces it alone.
- `watermark` is rejected (422) unless false.
- `adapter_id` names one of the LoRA adapters of `tulu serve --lora-modules` (as TGI's
  multi-LoRA does); the served model's own name, or none, is the base model.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from tulu import __version__
from tulu.engine.async_engine import EngineDeadError
from tulu.engine.engine import CompletionOutput, RequestOutput, sample_seed
from tulu.engine.sampling import MAX_LOGPROBS, SamplingParams
from tulu.engine.structured import StructuredOutput, name_structured_field
from tulu.errors import GenerationError, TuluError
from tulu.server.best_of import rank_samples
from tulu.server.service import (
    GenerationService,
    Overloaded,
    RequestTimedOut,
    check_structured_output_size,
)
from tulu.server.tgi_protocol import (
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Grammar,
    JsonSchemaGrammar,
    PrefillToken,
    RegexGrammar,
    StreamDetails,
    StreamResponse,
    Token,
)
from tulu.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("tulu.server")
router = APIRouter()

MAX_STOP_SEQUENCES = 16
SEED_LIMIT = 1 << 64
ABORTED_MESSAGE = "the request was aborted before it finished (the server is shutting down)"


# ---------------------------------------------------------------------------------- /info
@router.get("/info")
async def info(request: Request):
    service = request.app.state.service
    return {
        "model_id": service.settings.served_model_name,
        "model_dtype": str(service.llm.engine.dtype).removeprefix("torch."),
        "model_device_type": service.llm.engine.device.type,
        "max_input_tokens": service.max_model_len - 1,
        "max_total_tokens": service.max_model_len,
        "max_concurrent_requests": service.settings.max_num_seqs + service.settings.max_queue,
        "max_best_of": service.settings.max_best_of,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_top_n_tokens": MAX_LOGPROBS,
        "router": "tulu",
        "version": __version__,
    }


# ---------------------------------------------------------------------------------- requests
@dataclass
class _Job:
    """A validated request: what to run and how to answer."""

    inputs: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None
    top_n: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    lora: str | None = None
    best_of: int = 1
    """Samples drawn (the engine request's ``n``); the most likely is the answer."""


def _invalid(message: str) -> GenerationError:
    return GenerationError(message)


def _check_best_of(p: GenerateParameters, max_best_of: int, *, stream: bool) -> int:
    """The number of samples to draw (`best_of`, 1 when unset), with TGI's checks, wording
    and order (its router checks `best_of` before the other parameters, and streaming before
    the limit): no streaming (the best is known only at the end), none at all when
    `--max-best-of` is 1, up to the limit, sampling, and no fixed seed (each sample gets its
    own, reported in its details)."""
    best_of = p.best_of if p.best_of is not None else 1
    if best_of != 1 and stream:
        raise _invalid("`best_of` != 1 is not supported when streaming tokens")
    if best_of != 1 and max_best_of == 1:
        raise _invalid("`best_of` != 1 is not allowed for this endpoint")
    if not 0 < best_of <= max_best_of:
        raise _invalid(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")
    if best_of == 1:
        return 1
    # TGI's test here: any sampling parameter given, whatever its value (`temperature: 1.0`
    # alone passes, yet warps nothing: the samples are then greedy, all the same).
    sampling = p.do_sample or any(
        value is not None for value in (p.temperature, p.top_k, p.top_p, p.typical_p)
    )
    if not sampling:
        raise _invalid("you must use sampling when `best_of` is > 1")
    if p.seed is not None:
        raise _invalid("`seed` must not be set when `best_of` > 1")
    return best_of


def _check_parameters(p: GenerateParameters, max_input_tokens: int, *, stream: bool) -> None:
    """TGI's value checks, with TGI's wording (plus the value that was given)."""
    if p.typical_p is not None and not 0 < p.typical_p < 1:
        raise _invalid(f"`typical_p` must be > 0.0 and < 1.0, got {p.typical_p}")
    if p.watermark:
        raise _invalid("`watermark` is not supported by this server; leave it false")
    if p.temperature is not None and p.temperature <= 0:
        raise _invalid(f"`temperature` must be strictly positive, got {p.temperature}")
    if p.top_p is not None and not 0 < p.top_p < 1:
        raise _invalid(f"`top_p` must be > 0.0 and < 1.0, got {p.top_p}")
    if p.top_k is not None and p.top_k <= 0:
        raise _invalid(f"`top_k` must be strictly positive, got {p.top_k}")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise _invalid(
            f"`repetition_penalty` must be strictly positive, got {p.repetition_penalty}"
        )
    if p.frequency_penalty is not None and not -2 <= p.frequency_penalty <= 2:
        raise _invalid(f"`frequency_penalty` must be >= -2.0 and <= 2.0, got {p.frequency_penalty}")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise _invalid(f"`max_new_tokens` must be strictly positive, got {p.max_new_tokens}")
    if p.seed is not None and not 0 <= p.seed < SEED_LIMIT:
        raise _invalid(f"`seed` must be >= 0 and < 2**64, got {p.seed}")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise _invalid(
            f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences, got {len(p.stop)}"
        )
    if any(not s for s in p.stop):
        raise _invalid("`stop` sequences must be non-empty strings")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= MAX_LOGPROBS:
        raise _invalid(f"`top_n_tokens` must be >= 0 and <= {MAX_LOGPROBS}, got {p.top_n_tokens}")
    if p.truncate is not None and not 0 < p.truncate <= max_input_tokens:
        raise _invalid(
            f"`truncate` must be strictly positive and at most {max_input_tokens} (the longest "
            f"input the model takes), got {p.truncate}"
        )
    if stream and p.decoder_input_details:
        raise _invalid("`decoder_input_details` is not supported when streaming tokens")


def _warps(p: GenerateParameters) -> bool:
    """Whether the parameters change the distribution, which makes TGI sample even with
    `do_sample` false (its NextTokenChooser: ``sampling = do_sample or has_warpers``)."""
    return (
        (p.temperature is not None and p.temperature != 1.0)
        or bool(p.top_k)
        or (p.top_p is not None and p.top_p < 1.0)
        or (p.typical_p is not None and p.typical_p < 1.0)
    )


def _structured_output(grammar: Grammar | None) -> StructuredOutput | None:
    """The StructuredOutput of a `grammar` parameter (checked, not compiled)."""
    if grammar is None:
        return None
    try:
        if isinstance(grammar, RegexGrammar):
            spec = StructuredOutput(regex=grammar.value)
        elif isinstance(grammar, JsonSchemaGrammar):
            spec = StructuredOutput(json=grammar.value.schema_)
        else:
            spec = StructuredOutput(json=grammar.value)
        check_structured_output_size(spec, "`grammar`")
    except GenerationError as err:
        raise _invalid(name_structured_field(str(err), "`grammar`")) from None
    return spec


async def _compile(service: GenerationService, spec: StructuredOutput | None) -> None:
    """Compile the grammar off the event loop; a 422 with the compiler's reason if it fails.

    Called inside the request's admission, which gives its slot back when this raises."""
    if spec is None:
        return
    try:
        await service.compile_structured_output(spec)
    except GenerationError as err:
        raise _invalid(name_structured_field(str(err), "`grammar`")) from None


async def _prepare(body: GenerateRequest, service: GenerationService, *, stream: bool) -> _Job:
    """Validate a request and turn it into prompt ids and SamplingParams (GenerationError -> 422).

    The grammar is checked, not compiled: that waits until the request is admitted."""
    p = body.parameters or GenerateParameters()
    best_of = _check_best_of(p, service.settings.max_best_of, stream=stream)
    _check_parameters(p, service.max_model_len - 1, stream=stream)
    structured_output = _structured_output(p.grammar)
    lora = _adapter(p.adapter_id, service)
    if not body.inputs:
        raise _invalid("`inputs` cannot be empty")
    prompt_ids = await service.encode_text(body.inputs)
    if p.truncate is not None and len(prompt_ids) > p.truncate:
        prompt_ids = prompt_ids[-p.truncate :]
    max_tokens = service.check_length(len(prompt_ids), p.max_new_tokens)

    if p.do_sample or _warps(p):
        temperature = p.temperature if p.temperature is not None else 1.0
        seed = p.seed if p.seed is not None else _random_seed()
    else:
        temperature, seed = 0.0, None  # greedy: the seed plays no part
    shown = stream or p.details  # the tokens (and their alternatives) reach the client
    top_n = (p.top_n_tokens or 0) if shown else 0
    # best_of ranks the samples by their log-probabilities: computed whenever it draws several,
    # but the alternatives only when someone sees them.
    want_token_logprobs = shown or best_of > 1
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=p.top_k if p.top_k is not None else 0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty if p.frequency_penalty is not None else 0.0,
        seed=seed,
        n=best_of,
        stop=list(p.stop),
        include_stop_str_in_output=True,  # TGI keeps the stop sequence in the text
        logprobs=top_n if want_token_logprobs else None,
        prompt_logprobs=0 if p.decoder_input_details and p.details else None,
        structured_output=structured_output,
    )
    return _Job(
        inputs=body.inputs,
        prompt_ids=prompt_ids,
        params=params,
        seed=seed,
        top_n=top_n,
        details=p.details,
        decoder_input_details=p.decoder_input_details and p.details,
        return_full_text=bool(p.return_full_text),
        lora=lora,
        best_of=best_of,
    )


def _random_seed() -> int:
    """The seed of a sampled request that gave none (reported in `details.seed`); a function
    of its own so that a test can fix it without patching the stdlib's `random`."""
    return random.getrandbits(63)


def _adapter(adapter_id: str | None, service: GenerationService) -> str | None:
    """The LoRA adapter `adapter_id` names (None: the base model, also under its own name)."""
    if adapter_id is None or adapter_id == service.settings.served_model_name:
        return None
    adapters = service.lora_adapters
    if adapter_id not in adapters:
        loaded = ", ".join(map(repr, adapters)) or "none"
        raise _invalid(f"`adapter_id` {adapter_id!r} is not a loaded adapter; loaded: {loaded}")
    return adapter_id


# ---------------------------------------------------------------------------------- tokens
class _TokenTexts:
    """Texts and flags of one request's tokens.

    Generated tokens are decoded incrementally after the prompt, special tokens included, so
    that the texts of the non-special tokens concatenate to the generated text (a token that
    ends inside a multi-byte character has text "" and the next one carries the character).
    Prompt and top-n tokens are decoded on their own.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.special = tokenizer.special_ids()
        self.decoder = StreamDecoder(tokenizer, prompt_ids, skip_special_tokens=False)

    def generated(self, token_id: int, logprob: float | None, last: bool) -> Token:
        text = self.decoder.push(token_id)
        if last:
            text += self.decoder.flush()
        return Token(id=token_id, text=text, logprob=logprob, special=token_id in self.special)

    def alone(self, token_id: int, logprob: float | None) -> Token:
        return Token(
            id=token_id,
            text=self.tokenizer.decode([token_id]),
            logprob=logprob,
            special=token_id in self.special,
        )


def _finish_reason(completion: CompletionOutput, eos_token_id: int | None) -> str:
    if completion.finish_reason == "length":
        return "length"
    reason = completion.stop_reason
    if isinstance(reason, int) and not isinstance(reason, bool) and reason == eos_token_id:
        return "eos_token"
    return "stop_sequence"


class _Aborted(Exception):
    """The engine aborted the request (the server is shutting down)."""


def _top_tokens(texts: _TokenTexts, completion: CompletionOutput, index: int) -> list[Token]:
    entry = completion.logprobs[index] if completion.logprobs is not None else None
    return [texts.alone(t, lp) for t, lp in entry.top] if entry is not None else []


def _logprob(completion: CompletionOutput, index: int) -> float | None:
    if completion.logprobs is None or index >= len(completion.logprobs):
        return None
    return completion.logprobs[index].logprob


def _ranked(job: _Job, output: RequestOutput) -> list[CompletionOutput]:
    """The samples, the answer first (the most likely per token, with `best_of`)."""
    samples = rank_samples(output.outputs) if job.best_of > 1 else list(output.outputs)
    if any(sample.finish_reason == "abort" for sample in samples):
        raise _Aborted(ABORTED_MESSAGE)
    return samples


def _response(
    job: _Job, output: RequestOutput, samples: list[CompletionOutput], service: GenerationService
) -> GenerateResponse:
    """The answer, `samples[0]` (see `_ranked`), and its details when asked for, the other
    samples' in `best_of_sequences`."""
    best = samples[0]
    text = _generated_text(job, best)
    if not job.details:
        return GenerateResponse(generated_text=text)
    prefill = _prefill(job, output, service)  # the prompt's: the same for every sample
    details = Details(**_sample_details(job, best, prefill, service))
    if job.best_of > 1:
        details.best_of_sequences = [
            BestOfSequence(
                generated_text=_generated_text(job, sample),
                **_sample_details(job, sample, prefill, service),
            )
            for sample in samples[1:]
        ]
    return GenerateResponse(generated_text=text, details=details)


def _generated_text(job: _Job, sample: CompletionOutput) -> str:
    """A sample's `generated_text`: after the inputs with `return_full_text`, as TGI."""
    return job.inputs + sample.text if job.return_full_text else sample.text


def _prefill(job: _Job, output: RequestOutput, service: GenerationService) -> list[PrefillToken]:
    """The prompt's tokens and log-probabilities (`decoder_input_details`), else []."""
    if not job.decoder_input_details:
        return []
    scored = output.prompt_logprobs or []
    prefill = []
    for i, token_id in enumerate(output.prompt_token_ids):
        entry = scored[i] if i < len(scored) else None
        prefill.append(
            PrefillToken(
                id=token_id,
                text=service.tokenizer.decode([token_id]),
                logprob=entry.logprob if entry is not None else None,
            )
        )
    return prefill


def _sample_details(
    job: _Job, sample: CompletionOutput, prefill: list[PrefillToken], service: GenerationService
) -> dict[str, Any]:
    """The fields TGI's `details` and each of its `best_of_sequences` share, for one sample.

    Its `seed` reproduces it alone (with `best_of` 1): sample i of a request seeded S was
    drawn with ``sample_seed(S, i)``."""
    texts = _TokenTexts(service.tokenizer, job.prompt_ids)
    ids = sample.token_ids
    tokens = [texts.generated(t, _logprob(sample, i), i == len(ids) - 1) for i, t in enumerate(ids)]
    return {
        "finish_reason": _finish_reason(sample, service.llm.engine.eos_token_id),
        "generated_tokens": len(ids),
        "seed": sample_seed(job.seed, sample.index),
        "prefill": prefill,
        "tokens": tokens,
        "top_tokens": [_top_tokens(texts, sample, i) for i in range(len(ids))]
        if job.top_n
        else None,
    }


def _error_body(message: str, kind: str) -> dict:
    return ErrorResponse(error=message, error_type=kind).model_dump()


def _stream_error(err: Exception) -> dict:
    if isinstance(err, _Aborted):
        return _error_body(str(err), "incomplete_generation")
    if isinstance(err, Overloaded):
        return _error_body(str(err), "overloaded")
    if isinstance(err, RequestTimedOut):
        return _error_body(str(err), "timeout")
    if isinstance(err, EngineDeadError):
        return _error_body(str(err), "generation")
    if isinstance(err, TuluError):
        return _error_body(str(err), "validation")
    log.exception("error while streaming a TGI response", exc_info=err)
    return _error_body(f"internal error: {type(err).__name__}", "generation")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------- routes
async def _generate(job: _Job, request: Request) -> tuple[GenerateResponse, dict[str, str]]:
    service: GenerationService = request.app.state.service
    with service.admit() as admission:  # before compiling: a full server answers at once
        await _compile(service, job.params.structured_output)
        output = await service.run_to_end(
            job.prompt_ids,
            job.params,
            service.request_id("tgi"),
            admission,
            request.is_disconnected,
            lora=job.lora,
        )
    samples = _ranked(job, output)
    response = _response(job, output, samples, service)
    headers = {
        "x-compute-type": service.llm.engine.device.type,
        "x-prompt-tokens": str(len(job.prompt_ids)),
        # As TGI: the answer's tokens, not those of the other samples `best_of` drew.
        "x-generated-tokens": str(len(samples[0].token_ids)),
    }
    return response, headers


def _aborted_response() -> JSONResponse:
    return JSONResponse(_error_body(ABORTED_MESSAGE, "incomplete_generation"), status_code=503)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    """Generate text for `inputs` and return it at once (TGI's /generate)."""
    job = await _prepare(body, request.app.state.service, stream=False)
    try:
        response, headers = await _generate(job, request)
    except _Aborted:
        return _aborted_response()
    return JSONResponse(response.to_json(), headers=headers)


class _EventStream(StreamingResponse):
    """An SSE response that closes its event generator and the request's output stream however
    the response ends (finished, client gone before or during the body, cancelled), so that the
    request is aborted and its KV blocks are freed at once."""

    def __init__(self, events: AsyncGenerator[str, None], outputs: AsyncGenerator):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events = events
        self._outputs = outputs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._outputs.aclose()  # in case the events never started


async def _events(
    job: _Job,
    service: GenerationService,
    outputs: AsyncGenerator[RequestOutput, None],
    first: RequestOutput,
) -> AsyncGenerator[str, None]:
    texts = _TokenTexts(service.tokenizer, job.prompt_ids)
    eos = service.llm.engine.eos_token_id
    try:
        output = first
        while True:
            completion = output.outputs[0]
            if completion.finish_reason == "abort":
                raise _Aborted(ABORTED_MESSAGE)
            new = completion.delta_token_ids
            start = len(completion.token_ids) - len(new)
            for j, token_id in enumerate(new):
                index = start + j
                last = completion.finished and j == len(new) - 1
                event = StreamResponse(
                    index=index + 1,
                    token=texts.generated(token_id, _logprob(completion, index), last),
                    top_tokens=_top_tokens(texts, completion, index) if job.top_n else None,
                )
                if last:
                    event.generated_text = _generated_text(job, completion)
                    if job.details:  # as TGI: only when asked for
                        event.details = StreamDetails(
                            finish_reason=_finish_reason(completion, eos),
                            generated_tokens=len(completion.token_ids),
                            seed=job.seed,
                            input_length=len(job.prompt_ids),
                        )
                yield _sse(event.to_json())
            if output.finished:
                return
            output = await anext(outputs)
    except Exception as err:  # after the headers went out: report it as an event
        yield _sse(_stream_error(err))
    finally:
        await outputs.aclose()  # aborts the request if it had not finished


async def _generate_stream(job: _Job, request: Request) -> _EventStream:
    service: GenerationService = request.app.state.service
    with service.admit() as admission:  # before compiling: a full server answers at once
        await _compile(service, job.params.structured_output)
        outputs = service.generate(
            job.prompt_ids,
            job.params,
            service.request_id("tgi"),
            admission,
            request.is_disconnected,
            lora=job.lora,
        )
        try:
            # The first output before answering: validation errors become HTTP errors.
            first = await anext(outputs)
        except BaseException:
            await outputs.aclose()
            raise
    return _EventStream(_events(job, service, outputs, first), outputs)


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request):
    """Generate text for `inputs`, one server-sent event per token (TGI's /generate_stream)."""
    job = await _prepare(body, request.app.state.service, stream=True)
    return await _generate_stream(job, request)


@router.post("/")
async def compat_generate(request: Request):
    """What the `text_generation` client posts to the base URL: `stream` false answers
    `[{"generated_text", "details"}]` (a one-element list), true streams like /generate_stream."""
    raw = await request.body()
    try:
        body = CompatGenerateRequest.model_validate_json(raw)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None
    service = request.app.state.service
    job = await _prepare(body, service, stream=body.stream)
    if body.stream:
        return await _generate_stream(job, request)
    try:
        response, headers = await _generate(job, request)
    except _Aborted:
        return _aborted_response()
    return JSONResponse([response.to_json()], headers=headers)
