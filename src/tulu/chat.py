"""The Tulu chat format, exactly as Pythia-Tulu was trained on it.

A conversation is written as::

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}{eos}\\n ...

with every content stripped and the whole string stripped at the end; there is no BOS. The
strings and the label masks below mirror open-instruct's ``encode_with_messages_format`` and
``encode_with_prompt_completion_format``, the code the released checkpoints were fine-tuned
with. They are not "cleaned up" on purpose: a model only follows the format it saw, and a mask
that differs by one token (the newline after EOS, the ``<|assistant|>\\n`` header) changes what
the model learns to emit. The tests pin the exact ids and masks against an independent
re-implementation of open-instruct's algorithm.

`render` gives the training text, `generation_prompt` the text that makes the model answer as
the assistant, and `encode_messages` / `encode_prompt_completion` the token ids and labels
(``-100`` where no loss is taken) for supervised fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

from tulu.errors import ChatFormatError, TokenizerError
from tulu.tokenizer import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "EncodedExample",
    "Message",
    "encode_messages",
    "encode_prompt_completion",
    "generation_prompt",
    "render",
]

#: Label value that the loss ignores (PyTorch's cross-entropy default).
IGNORE_INDEX = -100

ROLES = ("system", "user", "assistant")

ASSISTANT_HEADER = "<|assistant|>\n"

_WHITESPACE = (" ", "\n", "\t")


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass
class EncodedExample:
    """One training example: token ids and labels (`IGNORE_INDEX` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def _validate(messages: Sequence[Mapping[str, object]]) -> None:
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ChatFormatError(
            f"messages: expected a list of messages, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ChatFormatError("messages: the conversation is empty (need at least one message)")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatFormatError(
                f"message {index}: expected an object with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        for field in ("role", "content"):
            if field not in message:
                raise ChatFormatError(f"message {index}: missing field {field!r}")
        role = message["role"]
        if role not in ROLES:
            raise ChatFormatError(
                f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)})"
            )
        content = message["content"]
        if not isinstance(content, str):
            raise ChatFormatError(
                f"message {index}, field 'content': expected a string, got {type(content).__name__}"
            )


def _check_eos(eos_token: object) -> None:
    if not isinstance(eos_token, str) or not eos_token:
        raise ChatFormatError(f"eos_token: expected a non-empty string, got {eos_token!r}")


def _concat(messages: Sequence[Mapping[str, object]], eos_token: str) -> str:
    """The conversation text without the final strip (open-instruct's ``_concat_messages``).

    The label masks are computed from these unstripped prefixes, so each one keeps its
    trailing newline. Callers validate `messages` first.
    """
    parts: list[str] = []
    for message in messages:
        role = message["role"]
        content = str(message["content"]).strip()
        if role == "system":
            parts.append("<|system|>\n" + content + "\n")
        elif role == "user":
            parts.append("<|user|>\n" + content + "\n")
        else:
            parts.append(ASSISTANT_HEADER + content + eos_token + "\n")
    return "".join(parts)


def render(messages: Sequence[Message], eos_token: str) -> str:
    """The training text of a conversation: each content stripped, whole string stripped.

    Every assistant turn ends with `eos_token` so the model learns to stop; no BOS is added
    because the model was not trained with one.
    """
    _validate(messages)
    _check_eos(eos_token)
    return _concat(messages, eos_token).strip()


def conversation_text(messages: Sequence[Message], eos_token: str) -> str:
    """The conversation as the model reads it before the next turn, each turn ending with its
    newline: `generation_prompt` without the assistant header (what a chat template gives
    without ``add_generation_prompt``)."""
    _validate(messages)
    _check_eos(eos_token)
    return _concat(messages, eos_token)


def generation_prompt(messages: Sequence[Message], eos_token: str) -> str:
    """The text to feed the model so that it writes the next assistant turn.

    This is the conversation followed by the assistant header, laid out exactly like the
    training prefix that precedes an assistant answer (``_concat(messages) + "<|assistant|>\\n"``,
    the same prefix `encode_messages` masks), e.g. ``[user "Hi"]`` gives
    ``"<|user|>\\nHi\\n<|assistant|>\\n"`` as in the model card. Whenever the last message has
    non-empty content this equals ``render(messages) + "\\n<|assistant|>\\n"``; when it is
    empty, the training layout (an empty line for the empty content) is kept.
    """
    _validate(messages)
    _check_eos(eos_token)
    return _concat(messages, eos_token) + ASSISTANT_HEADER


def _check_max_seq_length(max_seq_length: object) -> int:
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool):
        raise ChatFormatError(f"max_seq_length: expected an integer, got {max_seq_length!r}")
    if max_seq_length <= 0:
        raise ChatFormatError(f"max_seq_length: must be positive, got {max_seq_length}")
    return max_seq_length


def _eos_of(tokenizer: Tokenizer) -> str:
    eos = tokenizer.eos_token
    if not eos:
        raise TokenizerError(
            f"{getattr(tokenizer, 'source', 'tokenizer')}: no eos_token configured; the Tulu "
            "chat format ends every assistant turn with it"
        )
    return eos


def encode_messages(
    messages: Sequence[Message], tokenizer: Tokenizer, max_seq_length: int
) -> EncodedExample | None:
    """Token ids and labels of a conversation, masked as open-instruct masks them.

    ``input_ids`` is the rendered text, right-truncated to `max_seq_length`. The loss is taken
    only on assistant turns: for every non-assistant message, the tokens from the end of the
    previous prefix to the end of this message (plus the ``<|assistant|>\\n`` header when an
    assistant turn follows) are set to `IGNORE_INDEX`. Prefix lengths come from encoding
    unstripped prefixes separately, as open-instruct does, so the assistant content, its EOS and
    (between turns) the newline after the EOS are trained. Returns None when no label is left
    (e.g. truncation cut every assistant token): open-instruct drops such examples.
    """
    _validate(messages)
    max_len = _check_max_seq_length(max_seq_length)
    eos = _eos_of(tokenizer)

    input_ids = tokenizer.encode(_concat(messages, eos).strip())[:max_len]
    labels = list(input_ids)

    # Collect every prefix that open-instruct would encode, then encode them in one batch.
    spans: list[tuple[int | None, int]] = []  # (index of start prefix or None, end prefix)
    prefixes: list[str] = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start_ref: int | None = None
        if i > 0:
            start_ref = len(prefixes)
            prefixes.append(_concat(messages[:i], eos))
        end_text = _concat(messages[: i + 1], eos)
        if i < last and messages[i + 1]["role"] == "assistant":
            end_text += ASSISTANT_HEADER  # the assistant header is not trained either
        spans.append((start_ref, len(prefixes)))
        prefixes.append(end_text)
    lengths = [min(len(ids), max_len) for ids in tokenizer.encode_batch(prefixes)]

    for start_ref, end_ref in spans:
        start = 0 if start_ref is None else lengths[start_ref]
        end = lengths[end_ref]
        labels[start:end] = [IGNORE_INDEX] * len(labels[start:end])
        if end >= max_len:
            break

    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedExample(input_ids=input_ids, labels=labels)


def encode_prompt_completion(
    prompt: str, completion: str, tokenizer: Tokenizer, max_seq_length: int
) -> EncodedExample | None:
    """Token ids and labels of a prompt/completion pair (open-instruct's other format).

    The two are joined with one space unless the prompt ends or the completion starts with
    whitespace (space, newline, tab), then the EOS string is appended. The labels of the
    prompt's tokens (its own encoding, truncated) are masked. Returns None when no label is
    left.
    """
    for field, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            raise ChatFormatError(f"{field}: expected a string, got {type(value).__name__}")
    max_len = _check_max_seq_length(max_seq_length)
    eos = _eos_of(tokenizer)

    if not prompt.endswith(_WHITESPACE) and not completion.startswith(_WHITESPACE):
        text = prompt + " " + completion
    else:
        text = prompt + completion
    text += eos

    full, prompt_ids = tokenizer.encode_batch([text, prompt])
    input_ids = full[:max_len]
    labels = list(input_ids)
    prompt_len = min(len(prompt_ids), max_len)
    labels[:prompt_len] = [IGNORE_INDEX] * len(labels[:prompt_len])

    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedExample(input_ids=input_ids, labels=labels)
