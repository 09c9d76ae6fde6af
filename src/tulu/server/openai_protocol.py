"""Pydantic models of the OpenAI API subset the server speaks (requests and responses).

Requests forbid unknown fields: a misspelt parameter is answered with a 400 naming it rather
than silently ignored. Types are checked here; value ranges (temperature >= 0, top_p in (0, 1],
...) are checked once, by `tulu.engine.sampling.SamplingParams`, whose error names the field.

Besides OpenAI's own parameters the requests accept vLLM's sampling extensions (``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``stop_token_ids``,
``include_stop_str_in_output``, ``skip_special_tokens``, ``allowed_token_ids``) and its
structured output (``structured_outputs`` and the older ``guided_json``, ``guided_regex``,
``guided_choice``, ``guided_grammar``, ``guided_decoding_backend``), so clients written for
vLLM work unchanged. Parameters OpenAI defines but the server does not implement (``suffix``,
tools) are accepted by the schema and refused by the routes with a 400 that says so.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

MAX_TOP_LOGPROBS = 20
MAX_N = 128
"""The most choices one request may ask for (OpenAI's limit)."""


class _Request(BaseModel):
    # strict: no silent coercions ("2" -> 2, true -> 1); an int still passes for a float.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False
    """Send a last chunk (with ``choices: []``) that holds the usage of the whole request."""


class JsonSchemaFormat(_Request):
    """``response_format.json_schema``: OpenAI's named schema."""

    name: str
    description: str | None = None
    """Accepted and unused: the model is not told about the schema, only held to it."""
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """The JSON schema the completion must match. Absent: no constraint (as OpenAI and vLLM)."""
    strict: bool | None = None
    """Accepted and unused: the schema is always enforced."""


class ResponseFormat(_Request):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON
    object) or ``json_schema`` (with ``json_schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs the field json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(
                f"json_schema is only allowed with type 'json_schema', not {self.type!r}"
            )
        return self


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs``: exactly one of the constraints (``json``,
    ``json_object``, ``regex``, ``choice``, ``grammar``), and vLLM's options.

    Of the options, those that describe what this server always does are accepted and
    ignored; those it cannot honour are accepted here and refused by the routes (a 400 naming
    them) when set."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    """A JSON schema, as an object or its JSON text."""
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    """An EBNF grammar (xgrammar's dialect of GBNF, with a ``root`` rule)."""
    disable_any_whitespace: bool | None = None
    """Ignored: JSON is always generated with xgrammar's fixed separators, never free
    whitespace (vLLM's xgrammar backend also ignores the request's value)."""
    disable_additional_properties: bool | None = None
    """Ignored: objects never get properties their schema does not name unless the schema
    allows them (xgrammar's strict mode), which is what ``true`` asks for; vLLM's xgrammar
    backend also ignores the request's value."""
    disable_fallback: bool | None = None
    """Ignored (older vLLM): there is one structured output backend, and no fallback."""
    whitespace_pattern: Any = None
    """Refused when set: a custom whitespace pattern for JSON is not supported."""
    structural_tag: Any = None
    """Refused when set: structural tags (tool-call formats) are not supported."""


class _SamplingFields(_Request):
    """Parameters both generation endpoints share.

    OpenAI documents ``n``, ``stream``, ``echo`` and chat's ``logprobs`` as nullable, and the
    `openai` client sends ``null`` when a caller passes None: null means their default (as in
    vLLM). vLLM's extensions stay non-nullable, as in vLLM.
    """

    _NULL_MEANS_DEFAULT: ClassVar[frozenset[str]] = frozenset({"n", "stream", "echo", "logprobs"})

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        nullable = cls._NULL_MEANS_DEFAULT & cls.model_fields.keys()
        return {k: v for k, v in data.items() if v is not None or k not in nullable}

    model: str | None = None
    """The served model name or an adapter's; None means the served model (as vLLM allows), as
    do "tgi" and "dummy", the names Hugging Face's clients send."""
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, the JSON object's key) -> bias in [-100, 100], added to that
    token's logit before sampling."""
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None
    """Words never generated (see `SamplingParams.bad_words`)."""
    truncate_prompt_tokens: StrictInt | None = None
    """Keep only the prompt's last N tokens (1 .. max_model_len - 1); -1: as many as leave
    room in the window for ``max_tokens`` (one token when unset)."""
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields; at most one of them per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    """vLLM's backend choice ("xgrammar", "guidance", "outlines:no-fallback", ...): ignored,
    constraints are always compiled by xgrammar and mean the same whichever is named."""
    guided_whitespace_pattern: Any = None
    """Refused when set: a custom whitespace pattern for JSON is not supported."""


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    """One prompt (text or token ids) or several (each gets its own ``n`` choices)."""
    max_tokens: int | None = 16
    """OpenAI's default of 16; None means as many as the context window leaves. 0 is allowed
    with ``echo`` (score the prompt without generating)."""
    logprobs: int | None = None
    """Log-probabilities of each token and of this many alternatives (0..20)."""
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("the list of prompts is empty")
        return value


class ChatMessage(_Request):
    """One message of a chat request.

    An assistant message replayed from an OpenAI reply carries fields the Tulu format has no
    place for (``refusal``, ``tool_calls``, ``annotations``, ...). Empty (null or []) they say
    nothing and are dropped, as vLLM ignores them; with a value they stay unknown fields (400).
    """

    _EMPTY_REPLY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"refusal", "tool_calls", "function_call", "audio", "annotations"}
    )

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None
    """Accepted (OpenAI clients send it) and ignored: the Tulu format has no speaker names."""

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_reply_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        empty = cls._EMPTY_REPLY_FIELDS
        return {k: v for k, v in data.items() if k not in empty or v not in (None, [])}

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        """Content parts are joined with newlines; only text parts are supported."""
        if isinstance(value, str):
            return value
        texts = []
        for index, part in enumerate(value):
            kind = part.get("type")
            if kind != "text":
                raise ValueError(
                    f"content part {index} has type {kind!r}; only 'text' parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str) or set(part) - {"type", "text"}:
                raise ValueError(
                    f"content part {index} must be {{'type': 'text', 'text': <string>}}"
                )
            texts.append(text)
        return "\n".join(texts)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    """Deprecated by OpenAI in favour of max_completion_tokens; None: up to the context window."""
    max_completion_tokens: int | None = None
    """Wins over max_tokens when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None


class TokenizeCompletionRequest(_Request):
    """vLLM's ``POST /tokenize`` of a text."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    """vLLM's; GPT-NeoX's tokenizer adds no special tokens either way."""
    return_token_strs: bool = False
    """Also return each token's piece of the vocabulary (``token_strs``)."""


class TokenizeChatRequest(_Request):
    """vLLM's ``POST /tokenize`` of chat messages, rendered in the Tulu format."""

    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    """End with the ``<|assistant|>\\n`` header, as /v1/chat/completions prompts do."""
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None


class DetokenizeRequest(_Request):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[StrictInt]


# ----------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------


class PromptTokensDetails(_Response):
    cached_tokens: int
    """Prompt tokens the prefix cache served (whole KV blocks), so they were not computed."""


class Usage(_Response):
    """A request's token counts. ``prompt_tokens_details`` is OpenAI's (vLLM's with
    ``--enable-prompt-tokens-details``): always given here, so clients can see what caching
    saved."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        """The usage block with its total and the cached part of the prompt filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(_Response):
    """The legacy completions format: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None
    """vLLM's extension: the stop string or token id that ended the choice (None for EOS)."""


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatStreamChoice(_Response):
    index: int
    delta: dict[str, str]
    """``{"role": "assistant", "content": ""}`` first, then ``{"content": ...}``, then ``{}``."""
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
