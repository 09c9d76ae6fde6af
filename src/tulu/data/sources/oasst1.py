"""OpenAssistant OASST1 message trees (``2023-04-12_oasst_ready.trees.jsonl``) -> conversations.

The release holds one message tree per line: a prompter message (``prompt``) whose ``replies``
are assistant messages, whose replies are prompter follow-ups, and so on. Every root-to-node
path is a conversation, so one tree yields many records that share their first turns.

Options (keyword-only, as in a recipe or on the command line):

- ``paths="all"`` emits one record per assistant message: the conversation from the prompt
  down to it. This is what Tulu v1 trained on (open-instruct keeps every intermediate assistant
  turn, not just leaves). ``paths="leaves"`` emits only conversations that cannot be continued:
  one per assistant message below which nothing is emitted. This is the literal "assistant node
  with no replies" whenever replies exist, and it also keeps a conversation whose only
  continuations are a prompter follow-up nobody answered (or replies filtered out or skipped as
  bad), which the literal rule would lose without a trace.
- ``top_k``: at every node keep only the replies whose ``rank`` is below `top_k` (0 is the
  best). Unranked replies (``rank`` null) are dropped when `top_k` is set: their quality is
  unknown, and the point of the option is to keep only the replies human rankers preferred.
- ``skip_deleted`` (default True): a deleted message and its whole subtree are skipped, since
  a follow-up to a deleted message answers something the conversation no longer contains.
- ``lang``: keep only trees whose prompt is in one of these languages (``"en"``, ``["en",
  "es"]`` or ``"en,es"``); replies are written in the language of the prompt.

A path ending at a prompter message is never emitted: there is no assistant turn to train on.
Records are named ``oasst1_{message_id}`` after the last message, which is unique and does not
depend on the options or on other trees.

Trees are walked with an explicit stack, never by recursion. A line nested deeper than the
``json`` module can parse (about 500 turns in this layout; real threads are far shorter) is
reported as bad input ("nested too deeply") rather than ending the conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tulu.data.readers import iter_jsonl, numbered_items
from tulu.data.records import BadRecord, ConversionReport, OptionError, make_record, type_name

__all__ = ["PATHS", "convert"]

DATASET = "oasst1"

#: Values of the ``paths`` option.
PATHS = ("all", "leaves")

#: OASST role -> record role.
_ROLES = {"prompter": "user", "assistant": "assistant"}

#: Location strings of deep nodes keep this many ``.replies[i]`` steps at each end.
_LOCATION_ENDS = 3


@dataclass(frozen=True)
class _Options:
    paths: str
    top_k: int | None
    skip_deleted: bool
    langs: frozenset[str] | None


def convert(
    path: Path,
    report: ConversionReport,
    *,
    paths: str = "all",
    top_k: int | None = None,
    skip_deleted: bool = True,
    lang: list[str] | str | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one record per emitted conversation path of every tree in `path`.

    Options are checked here, before any data is read, so a bad recipe fails at once with a
    `DataError` naming the option.
    """
    options = _Options(
        paths=_check_paths(paths),
        top_k=_check_top_k(top_k),
        skip_deleted=_check_bool("skip_deleted", skip_deleted),
        langs=_check_lang(lang),
    )
    return _convert(Path(path), report, options)


# --------------------------------------------------------------------------- options


def _option_error(name: str, expected: str, value: Any) -> OptionError:
    return OptionError(f"source {DATASET!r}: option {name} must be {expected}, got {value!r}")


def _check_paths(value: Any) -> str:
    if value not in PATHS:
        raise _option_error("paths", " or ".join(map(repr, PATHS)), value)
    return value


def _check_top_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _option_error("top_k", "a positive integer or null", value)
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _option_error(name, "true or false", value)
    return value


def _check_lang(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _option_error("lang", "a language code or a list of them", value)
    langs = frozenset(v.strip() for v in value if v.strip())
    if not langs:
        raise _option_error("lang", "a language code or a non-empty list of them", value)
    return langs


# --------------------------------------------------------------------------- trees


class _Frame:
    """A valid message on the current path; frames link to their parent, not to children.

    Linking upwards makes a path cheap to hold (one frame per message, shared by every path
    through it) and the messages of a record are materialised only when it is emitted.
    """

    __slots__ = ("emitted_below", "index", "message_id", "parent", "role", "text")

    def __init__(
        self, parent: _Frame | None, index: int, message_id: str, role: str, text: str
    ) -> None:
        self.parent = parent
        self.index = index
        self.message_id = message_id
        self.role = role
        self.text = text
        self.emitted_below = False


def _convert(path: Path, report: ConversionReport, options: _Options) -> Iterator[dict[str, Any]]:
    for _, where, tree in numbered_items(iter_jsonl, path, report):
        yield from _convert_tree(where, tree, report, options)


def _convert_tree(
    where: str, tree: Any, report: ConversionReport, options: _Options
) -> Iterator[dict[str, Any]]:
    """The records of one tree; bad messages are reported and their subtrees skipped."""
    if not isinstance(tree, dict):
        report.bad(
            BadRecord(where, "not a JSON object", f"expected a JSON object, got {type_name(tree)}")
        )
        return
    if tree.get("prompt") is None:
        report.bad(BadRecord(where, "missing field", "missing field 'prompt'"))
        return
    prompt = tree["prompt"]
    if not isinstance(prompt, dict):
        report.bad(
            BadRecord(
                where, "wrong type", f"field 'prompt': expected an object, got {type_name(prompt)}"
            )
        )
        return
    if options.langs is not None:
        lang = prompt.get("lang")
        if lang is not None and not isinstance(lang, str):
            report.bad(
                BadRecord(
                    where,
                    "wrong type",
                    f"prompt.lang: expected a string, got {type_name(lang)}",
                )
            )
            return
        if lang not in options.langs:
            report.drop("tree in another language" if lang else "tree without a language")
            return
    if options.skip_deleted and prompt.get("deleted") is True:
        report.drop("deleted message subtree")
        return

    leaves = options.paths == "leaves"
    # Items are (node, parent frame, index in the parent's replies) to visit, or a frame whose
    # subtree is finished (leaves mode: emit it if nothing below it was emitted).
    stack: list[tuple[Any, _Frame | None, int] | _Frame] = [(prompt, None, -1)]
    while stack:
        item = stack.pop()
        if isinstance(item, _Frame):
            if not item.emitted_below:
                _mark_emitted(item)
                yield _record(item)
            continue
        node, parent, index = item
        problem = _check_node(node)
        if problem is not None:
            kind, field, message = problem
            location = _location(parent, index)
            at = f"{location}.{field}" if field else location
            report.bad(BadRecord(where, kind, f"{at}: {message}"))
            continue
        frame = _Frame(parent, index, node["message_id"], _ROLES[node["role"]], node["text"])
        if frame.role == "assistant":
            if not frame.text.strip():
                report.bad(
                    BadRecord(
                        where,
                        "empty assistant turn",
                        f"{_location(parent, index)}.text: empty assistant turn "
                        f"(message {frame.message_id})",
                    )
                )
                continue
            if leaves:
                stack.append(frame)  # popped once the whole subtree below it is done
            else:
                yield _record(frame)
        replies = _kept_replies(node.get("replies") or [], report, options)
        stack.extend((reply, frame, i) for i, reply in reversed(replies))


def _kept_replies(
    replies: list[Any], report: ConversionReport, options: _Options
) -> list[tuple[int, Any]]:
    """``(index, reply)`` for the replies the options keep; the others are counted as drops.

    A reply that is not an object, or whose flags have the wrong type, is kept here so that
    visiting it reports it as bad input.
    """
    kept = []
    for index, reply in enumerate(replies):
        if isinstance(reply, dict):
            if options.skip_deleted and reply.get("deleted") is True:
                report.drop("deleted message subtree")
                continue
            if options.top_k is not None:
                rank = reply.get("rank")
                if rank is None:
                    report.drop("unranked reply (top_k is set)")
                    continue
                if _is_int(rank) and rank >= options.top_k:
                    report.drop(f"reply outside the top {options.top_k}")
                    continue
        kept.append((index, reply))
    return kept


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_node(node: Any) -> tuple[str, str | None, str] | None:
    """``(kind, field, message)`` of the first problem of a message node, or None if usable."""
    if not isinstance(node, dict):
        return "wrong type", None, f"expected a message object, got {type_name(node)}"
    for name in ("message_id", "role", "text"):
        if name not in node:
            return "missing field", None, f"missing field {name!r}"
        if not isinstance(node[name], str):
            return "wrong type", name, f"expected a string, got {type_name(node[name])}"
    if node["role"] not in _ROLES:
        return (
            "unknown role",
            "role",
            f"unknown role {node['role']!r} (expected prompter or assistant)",
        )
    optional: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
        ("deleted", lambda v: isinstance(v, bool), "a boolean"),
        ("rank", _is_int, "an integer"),
        ("replies", lambda v: isinstance(v, list), "a list"),
        ("lang", lambda v: isinstance(v, str), "a string"),
    )
    for name, valid, expected in optional:
        value = node.get(name)
        if value is not None and not valid(value):
            return "wrong type", name, f"expected {expected} or null, got {type_name(value)}"
    return None


def _location(parent: _Frame | None, index: int) -> str:
    """Where a node sits in its tree, e.g. ``prompt.replies[1].replies[0]``.

    Built only for error messages (walking up the parents); in a very deep tree the middle of
    the path is elided so the message stays readable.
    """
    steps: list[int] = []
    if index >= 0:
        steps.append(index)
        frame = parent
        while frame is not None and frame.parent is not None:
            steps.append(frame.index)
            frame = frame.parent
    steps.reverse()
    parts = [f".replies[{i}]" for i in steps]
    if len(parts) > 2 * _LOCATION_ENDS + 1:
        hidden = len(parts) - 2 * _LOCATION_ENDS
        parts = [*parts[:_LOCATION_ENDS], f"...({hidden} levels)...", *parts[-_LOCATION_ENDS:]]
    return "prompt" + "".join(parts)


def _mark_emitted(frame: _Frame) -> None:
    """Mark the ancestors of an emitted frame, so that leaves mode does not emit them.

    Stops at the first ancestor already marked (its own ancestors are marked too), so marking
    costs O(1) amortised per frame.
    """
    ancestor = frame.parent
    while ancestor is not None and not ancestor.emitted_below:
        ancestor.emitted_below = True
        ancestor = ancestor.parent


def _record(frame: _Frame) -> dict[str, Any]:
    """The record of the conversation from the prompt down to `frame` (fresh message dicts)."""
    messages = []
    node: _Frame | None = frame
    while node is not None:
        messages.append({"role": node.role, "content": node.text})
        node = node.parent
    messages.reverse()
    return make_record(DATASET, f"{DATASET}_{frame.message_id}", messages)
