"""HTML-cleaned ShareGPT (``sg_90k_part1_html_cleaned.json``, ...) -> conversation chunks.

Each release file is one JSON array of ``{"id", "conversations": [{"from", "value"}]}``. Tulu v1
used FastChat's cleaned dumps, then open-instruct's rules, which this converter follows
(differences below):

1. Roles: ``human``/``user`` -> user, ``gpt``/``chatgpt`` -> assistant. A conversation with a
   ``system`` or ``bing`` turn is dropped (those are not ChatGPT conversations, or carry a
   prompt the user never wrote). Any other ``from`` value is bad input.
2. A conversation must alternate user, assistant, user, ... starting with the user; one that
   does not (two user turns in a row, an assistant turn first) is dropped, since it cannot be
   cut into exchanges. A trailing unanswered user turn is removed (counted), the rest is kept.
3. Long conversations are split into chunks of at most `max_tokens` tokens, FastChat-style, so
   that training sees whole exchanges instead of conversations truncated mid-answer: a turn
   costs ``len(tokens(value)) + 6`` (room for the chat-format markers), the user/assistant
   exchanges are taken in order, and a chunk is closed when the next exchange would not fit.
   An exchange that does not fit on its own is dropped (counted) and the next chunk starts
   after it; FastChat would keep it and let training truncate it, open-instruct's copy of the
   splitter (``scripts/split_sharegpt_conversations.py``) drops it as we do.

Where the public Tulu v1 mixture differs, on purpose: open-instruct's splitter never emits a
conversation's last chunk when its last exchange does not fit in the chunk before it (the
chunk is only written from the ``i == len - 2`` branch), losing that exchange; we keep it.
Its splitter also cut a trailing odd turn of any speaker before checking roles, then checked
roles per chunk and accepted only ``human``/``gpt``: it kept the valid chunks of a
conversation that rule 1 or 2 drops whole, and dropped the chunks with ``user``/``chatgpt``
turns, which rule 1 maps. So a few conversations give different chunks or ids here than in
that mixture.

Records are named ``sharegpt_{id}_{start}``, `start` being the index of the chunk's first turn
in the conversation, as FastChat names its split conversations (``{id}_{start}``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tulu.data.readers import iter_json_array, numbered_items
from tulu.data.records import (
    BadRecord,
    ConversionReport,
    OptionError,
    check_object,
    make_record,
    string_field,
    type_name,
)
from tulu.errors import TokenizerError
from tulu.tokenizer import Tokenizer

__all__ = ["TURN_OVERHEAD", "convert"]

DATASET = "sharegpt"

#: Tokens added to each turn's own tokens when sizing chunks (FastChat's allowance).
TURN_OVERHEAD = 6

#: ``from`` value -> record role; None marks the speakers whose conversations are dropped.
_ROLES: dict[str, str | None] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "system": None,
    "bing": None,
}


def convert(
    path: Path,
    report: ConversionReport,
    *,
    tokenizer: str | None = None,
    max_tokens: int = 2048,
) -> Iterator[dict[str, Any]]:
    """Yield the chunks of every usable conversation of the array in `path`.

    `tokenizer` (a tokenizer directory, a tokenizer.json or a hub id) is required: chunk sizes
    are counted in the tokens of the model to be trained. Options are checked, and the
    tokenizer loaded, before any data is read, so a bad recipe fails at once with a `DataError`.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise OptionError(
            f"source {DATASET!r}: option max_tokens must be a positive integer, got {max_tokens!r}"
        )
    return _convert(Path(path), report, _load_tokenizer(tokenizer), max_tokens)


def _load_tokenizer(option: str | os.PathLike[str] | None) -> Tokenizer:
    if option is None:
        raise OptionError(
            f"source {DATASET!r} needs the option tokenizer (a tokenizer directory, a "
            "tokenizer.json or a hub id): long conversations are split into chunks of "
            "max_tokens tokens"
        )
    if not isinstance(option, str | os.PathLike):
        raise OptionError(
            f"source {DATASET!r}: option tokenizer must be a path, got {type_name(option)}"
        )
    try:
        return Tokenizer.load(option)
    except TokenizerError as err:
        raise OptionError(f"source {DATASET!r}: option tokenizer: {err}") from None


def _convert(
    path: Path, report: ConversionReport, tokenizer: Tokenizer, max_tokens: int
) -> Iterator[dict[str, Any]]:
    for _, where, value in numbered_items(iter_json_array, path, report):
        try:
            conversation_id, turns = _parse(value, where)
        except BadRecord as err:
            report.bad(err)
            continue
        messages = _normalize(turns, where, report)
        if not messages:
            continue
        lengths = [
            len(ids) + TURN_OVERHEAD
            for ids in tokenizer.encode_batch([m["content"] for m in messages])
        ]
        for start, end in _chunks(lengths, max_tokens, report):
            yield make_record(DATASET, f"{DATASET}_{conversation_id}_{start}", messages[start:end])


def _parse(value: Any, where: str) -> tuple[str, list[tuple[str, str]]]:
    """``(id, [(from, value), ...])`` of one array element, or a `BadRecord` naming the field."""
    item = check_object(value, where)
    conversation_id = string_field(item, "id", where)
    if "conversations" not in item:
        raise BadRecord(where, "missing field", "missing field 'conversations'")
    conversations = item["conversations"]
    if not isinstance(conversations, list):
        raise BadRecord(
            where,
            "wrong type",
            f"field 'conversations': expected a list, got {type_name(conversations)}",
        )
    turns = []
    for index, turn in enumerate(conversations):
        at = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise BadRecord(where, "wrong type", f"{at}: expected an object, got {type_name(turn)}")
        for name in ("from", "value"):
            if name not in turn:
                raise BadRecord(where, "missing field", f"{at}: missing field {name!r}")
            if not isinstance(turn[name], str):
                raise BadRecord(
                    where,
                    "wrong type",
                    f"{at}.{name}: expected a string, got {type_name(turn[name])}",
                )
        try:  # before tokenization, which cannot take an unpaired surrogate (a cut emoji)
            turn["value"].encode("utf-8")
        except UnicodeEncodeError:
            raise BadRecord(
                where, "not UTF-8", f"{at}.value: contains an unpaired surrogate (not UTF-8)"
            ) from None
        if turn["from"] not in _ROLES:
            raise BadRecord(
                where,
                "unknown role",
                f"{at}.from: unknown role {turn['from']!r} (expected one of {', '.join(_ROLES)})",
            )
        turns.append((turn["from"], turn["value"]))
    return conversation_id, turns


def _normalize(
    turns: list[tuple[str, str]], where: str, report: ConversionReport
) -> list[dict[str, str]]:
    """The conversation as alternating user/assistant messages, or [] if it is not kept.

    Drops are counted on `report`; an empty assistant turn is reported as bad input. No turn
    is removed before the last one, so a message's index is its index in the release.
    """
    for speaker, _ in turns:
        if _ROLES[speaker] is None:
            report.drop(f"conversation with a {speaker} turn")
            return []
    if not turns:
        report.drop("empty conversation")
        return []
    messages = [{"role": _ROLES[speaker] or "", "content": text} for speaker, text in turns]
    expected = ("user", "assistant")
    if any(m["role"] != expected[i % 2] for i, m in enumerate(messages)):
        report.drop("roles do not alternate user, assistant")
        return []
    if len(messages) == 1:
        report.drop("no assistant turn")
        return []
    if len(messages) % 2:
        messages.pop()
        report.drop("trailing user turn removed")
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            report.bad(
                BadRecord(
                    where,
                    "empty assistant turn",
                    f"conversations[{index}].value: empty assistant turn",
                )
            )
            return []
    return messages


def _chunks(lengths: list[int], max_tokens: int, report: ConversionReport) -> list[tuple[int, int]]:
    """``(start, end)`` turn ranges of the chunks, for turn costs `lengths` (pairs of turns).

    Greedy in order, as FastChat does: an exchange joins the current chunk if the chunk stays
    within `max_tokens`, else it starts a new chunk; one too long on its own is dropped.
    """
    chunks: list[tuple[int, int]] = []
    start: int | None = None
    total = 0
    for first in range(0, len(lengths), 2):
        cost = lengths[first] + lengths[first + 1]
        if cost > max_tokens:
            if start is not None:
                chunks.append((start, first))
                start = None
            report.drop(f"exchange longer than {max_tokens} tokens")
            continue
        if start is not None and total + cost > max_tokens:
            chunks.append((start, first))
            start = None
        if start is None:
            start, total = first, 0
        total += cost
    if start is not None:
        chunks.append((start, len(lengths)))
    return chunks
