"""The TGI (text-generation-inference) wire format: request and response models.

Field names and shapes follow TGI's router, as the `text_generation` client package sees them
(`text_generation.types`). Requests are parsed strictly: an unknown field is an error (HTTP 422)
rather than silently ignored, and numbers must be finite. The value checks that need the model
(lengths) or that TGI words in its own way (`temperature` must be strictly positive, ...) are
made by the routes, in `tulu.server.tgi_routes`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class _Strict(BaseModel):
    # strict: no coercions TGI (serde) does not make either ("2" -> 2, true -> 1, 2.0 -> 2).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class JsonGrammar(_Strict):
    """`{"type": "json", "value": <JSON schema>}` (TGI also takes the type `json_object`): the
    schema as an object or as its JSON text."""

    type: Literal["json", "json_object"]
    value: dict[str, Any] | str


class RegexGrammar(_Strict):
    """`{"type": "regex", "value": <regular expression>}`: the whole text must match it."""

    type: Literal["regex"]
    value: str


class JsonSchemaConfig(_Strict):
    name: str | None = None
    """Accepted and unused."""
    schema_: dict[str, Any] = Field(alias="schema")


class JsonSchemaGrammar(_Strict):
    """`{"type": "json_schema", "value": {"name": ..., "schema": {...}}}` (TGI's form of
    OpenAI's `json_schema`)."""

    type: Literal["json_schema"]
    value: JsonSchemaConfig


Grammar = Annotated[JsonGrammar | RegexGrammar | JsonSchemaGrammar, Field(discriminator="type")]
"""TGI's `parameters.grammar` (the `text_generation` client's `Grammar`)."""


class GenerateParameters(_Strict):
    """`parameters` of /generate, /generate_stream and POST /.

    `watermark`, which this server cannot honour, is accepted when false and rejected
    otherwise. `adapter_id` names a LoRA adapter of ``--lora-modules``.
    """

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Grammar | None = None
    max_new_tokens: int | None = 20
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None


class GenerateRequest(_Strict):
    """Body of /generate and /generate_stream."""

    inputs: str
    parameters: GenerateParameters | None = None


class CompatGenerateRequest(GenerateRequest):
    """Body of POST / (what the `text_generation` client sends): `stream` picks the route."""

    stream: bool = False


class Token(BaseModel):
    """A generated token. `text` is the token's own text in context (special tokens included),
    so the non-special texts of a stream concatenate to the generated text."""

    id: int
    text: str
    logprob: float | None = None
    special: bool


class PrefillToken(BaseModel):
    """A prompt token; the first one has no log-probability (nothing predicts it)."""

    id: int
    text: str
    logprob: float | None = None


class SequenceDetails(BaseModel):
    """What TGI's `details` and each of its `best_of_sequences` tell of one sample."""

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class BestOfSequence(SequenceDetails):
    """One of the samples `best_of` drew and did not answer with."""

    generated_text: str


class Details(SequenceDetails):
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None

    def to_json(self) -> dict[str, Any]:
        """TGI's JSON: `top_tokens` and `best_of_sequences` only when there are some."""
        body: dict[str, Any] = {"generated_text": self.generated_text}
        if self.details is not None:
            details = self.details.model_dump(mode="json", exclude_none=False)
            if self.details.best_of_sequences is None:
                del details["best_of_sequences"]
            for sequence in [details, *details.get("best_of_sequences", [])]:
                if sequence["top_tokens"] is None:
                    del sequence["top_tokens"]
            body["details"] = details
        return body


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int | None = None  # prompt tokens (after `truncate`)


class StreamResponse(BaseModel):
    """One server-sent event of /generate_stream: one token; the last one also carries the
    whole `generated_text` and the `details`."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(
            mode="json", exclude={"top_tokens"} if self.top_tokens is None else None
        )


class ErrorResponse(BaseModel):
    """TGI's error body (also sent as an event when a stream fails after it started)."""

    error: str
    error_type: str
