"""OASST1 message trees: paths, options, deep trees and bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import tulu.data
from tulu.data.records import BadInput, BadRecord, ConversionReport, check_record
from tulu.data.sources import convert_source, converter_options
from tulu.data.sources.oasst1 import convert
from tulu.errors import DataError

SAMPLE = Path(tulu.data.__file__).parent / "samples" / "2023-04-12_oasst_ready.trees.jsonl"


def node(
    message_id: str,
    role: str,
    text: str | None = None,
    *replies: dict[str, Any],
    rank: int | None = None,
    deleted: bool = False,
    lang: str = "en",
) -> dict[str, Any]:
    """A message node in the release's layout (with a few of the fields we ignore)."""
    return {
        "message_id": message_id,
        "parent_id": None,
        "user_id": "u-" + message_id,
        "text": f"text of {message_id}" if text is None else text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "deleted": deleted,
        "rank": rank,
        "synthetic": False,
        "emojis": {"+1": 1},
        "replies": list(replies),
        "labels": {"spam": {"value": 0.0, "count": 3}},
    }


def P(message_id: str, *replies: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return node(message_id, "prompter", None, *replies, **kw)


def A(message_id: str, *replies: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return node(message_id, "assistant", None, *replies, **kw)


def tree(prompt: Any, tree_id: str = "t") -> dict[str, Any]:
    return {"message_tree_id": tree_id, "tree_state": "ready_for_export", "prompt": prompt}


def write_lines(tmp_path: Path, lines: list[Any], name: str = "trees.jsonl") -> Path:
    """JSONL with one line per item; bytes and str items are written as they are."""
    path = tmp_path / name
    with path.open("wb") as out:
        for line in lines:
            if isinstance(line, bytes):
                out.write(line + b"\n")
            elif isinstance(line, str):
                out.write(line.encode("utf-8") + b"\n")
            else:
                out.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def run(
    path: Path, options: dict[str, Any] | None = None, *, skip_bad: bool = False
) -> tuple[list[dict[str, Any]], ConversionReport]:
    """Convert through the registry (option checks, record checks) and collect everything."""
    report = ConversionReport(bad=BadInput(skip_bad=skip_bad))
    records = list(convert_source("oasst1", path, report, options))
    for record in records:
        check_record(record, record["id"])
    return records, report


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in records]


# The hand-built tree, with what each option must give worked out by hand:
#
#   P0
#   ├── A1 (rank 0)
#   │   ├── P2 (rank 0)
#   │   │   ├── A3 (rank 0)
#   │   │   └── A4 (rank 1)
#   │   └── P5 (rank 1)          unanswered follow-up
#   ├── A6 (rank 1)
#   ├── A7 (rank 2, deleted)
#   │   └── P8 (rank 0)
#   │       └── A9 (rank 0)
#   └── A10 (rank null)
#       └── P11 (rank 0)         unanswered follow-up
HAND_TREE = tree(
    P(
        "P0",
        A("A1", P("P2", A("A3", rank=0), A("A4", rank=1), rank=0), P("P5", rank=1), rank=0),
        A("A6", rank=1),
        A("A7", P("P8", A("A9", rank=0), rank=0), rank=2, deleted=True),
        A("A10", P("P11", rank=0)),
    )
)


@pytest.fixture
def hand_tree(tmp_path: Path) -> Path:
    return write_lines(tmp_path, [HAND_TREE])


@pytest.mark.parametrize(
    ("options", "expected", "dropped"),
    [
        ({}, ["A1", "A3", "A4", "A6", "A10"], {"deleted message subtree": 1}),
        # A1 is continued by A3 and A4; A10's only follow-up was never answered.
        ({"paths": "leaves"}, ["A3", "A4", "A6", "A10"], {"deleted message subtree": 1}),
        (
            {"top_k": 1},
            ["A1", "A3"],
            {
                "deleted message subtree": 1,
                "reply outside the top 1": 3,  # A6, P5, A4
                "unranked reply (top_k is set)": 1,  # A10
            },
        ),
        (
            {"top_k": 2},
            ["A1", "A3", "A4", "A6"],
            {"deleted message subtree": 1, "unranked reply (top_k is set)": 1},
        ),
        ({"top_k": 1, "paths": "leaves"}, ["A3"], None),
        ({"skip_deleted": False}, ["A1", "A3", "A4", "A6", "A7", "A9", "A10"], {}),
        ({"skip_deleted": False, "paths": "leaves"}, ["A3", "A4", "A6", "A9", "A10"], {}),
    ],
)
def test_hand_built_tree(
    hand_tree: Path,
    options: dict[str, Any],
    expected: list[str],
    dropped: dict[str, int] | None,
) -> None:
    records, report = run(hand_tree, options)
    assert ids(records) == [f"oasst1_{m}" for m in expected]
    assert report.read == 1 and report.written == len(expected)
    if dropped is not None:
        assert report.dropped == Counter(dropped)


def test_paths_are_root_to_assistant_conversations(hand_tree: Path) -> None:
    records, _ = run(hand_tree, {"skip_deleted": False})
    by_id = {r["id"]: r["messages"] for r in records}
    assert by_id["oasst1_A3"] == [
        {"role": "user", "content": "text of P0"},
        {"role": "assistant", "content": "text of A1"},
        {"role": "user", "content": "text of P2"},
        {"role": "assistant", "content": "text of A3"},
    ]
    assert [m["content"] for m in by_id["oasst1_A9"]] == [
        "text of P0",
        "text of A7",
        "text of P8",
        "text of A9",
    ]
    assert by_id["oasst1_A10"] == [
        {"role": "user", "content": "text of P0"},
        {"role": "assistant", "content": "text of A10"},
    ]


def test_records_do_not_share_message_objects(hand_tree: Path) -> None:
    records, _ = run(hand_tree)
    records[0]["messages"][0]["content"] = "changed"
    assert records[1]["messages"][0]["content"] == "text of P0"


# --- the shipped sample, against a straightforward recursive reference -------------------


def reference(prompt: dict[str, Any], paths: str, top_k: int | None, skip_deleted: bool):
    """(id, messages) of every emitted path, by plain recursion (the sample is shallow).

    Leaves are found differently from the converter: a path is a leaf if no other emitted
    path of the tree extends it.
    """
    found: list[tuple[str, list[dict[str, str]]]] = []

    def visit(message: dict[str, Any], before: list[dict[str, str]]) -> None:
        role = {"prompter": "user", "assistant": "assistant"}[message["role"]]
        messages = [*before, {"role": role, "content": message["text"]}]
        if role == "assistant":
            found.append((f"oasst1_{message['message_id']}", messages))
        for reply in message["replies"]:
            if skip_deleted and reply["deleted"]:
                continue
            if top_k is not None and (reply["rank"] is None or reply["rank"] >= top_k):
                continue
            visit(reply, messages)

    if not (skip_deleted and prompt["deleted"]):
        visit(prompt, [])
    if paths == "leaves":
        found = [
            (i, m)
            for i, m in found
            if not any(len(o) > len(m) and o[: len(m)] == m for _, o in found)
        ]
    return found


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"paths": "leaves"},
        {"top_k": 1},
        {"top_k": 2, "paths": "leaves"},
        {"skip_deleted": False},
        {"lang": ["es", "ja"]},
    ],
)
def test_sample_matches_reference(options: dict[str, Any]) -> None:
    records, report = run(SAMPLE, options)
    langs = options.get("lang")
    expected = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        prompt = json.loads(line)["prompt"]
        if langs is None or prompt["lang"] in langs:
            expected += reference(
                prompt,
                options.get("paths", "all"),
                options.get("top_k"),
                options.get("skip_deleted", True),
            )
    assert [(r["id"], r["messages"]) for r in records] == expected
    assert report.read == 9


def test_sample_counts() -> None:
    records, report = run(SAMPLE)
    assert (report.read, report.written, len(records)) == (9, 26, 26)
    assert report.dropped == Counter({"deleted message subtree": 1})
    assert report.bad.total == 0
    assert len(set(ids(records))) == len(records)
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert record["dataset"] == "oasst1"
    texts = " ".join(m["content"] for r in records for m in r["messages"])
    for non_ascii in ("«ser»", "自己紹介", "höfliche", "photosynthèse"):
        assert non_ascii in texts
    leaves, _ = run(SAMPLE, {"paths": "leaves"})
    assert len(leaves) == 19
    # An id names the same message whatever the options: leaves are a subset of all paths.
    assert set(ids(leaves)) < set(ids(records))


def test_lang_option(tmp_path: Path) -> None:
    trees = [
        tree(P("en0", A("en1"), lang="en")),
        tree(P("es0", A("es1", lang="es"), lang="es")),
        tree(P("de0", A("de1", lang="de"), lang="de")),
        tree({**P("xx0", A("xx1")), "lang": None}),
    ]
    path = write_lines(tmp_path, trees)
    records, report = run(path, {"lang": "es"})
    assert ids(records) == ["oasst1_es1"]
    # A prompt without a language (null or absent) is counted as such, not as "another".
    assert report.dropped == Counter({"tree in another language": 2, "tree without a language": 1})
    assert ids(run(path, {"lang": ["en", "de"]})[0]) == ["oasst1_en1", "oasst1_de1"]
    assert ids(run(path, {"lang": "en, de"})[0]) == ["oasst1_en1", "oasst1_de1"]
    assert len(run(path)[0]) == 4


def test_deleted_prompt_drops_the_tree(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [tree(P("p", A("a"), deleted=True)), tree(P("q", A("b")))])
    records, report = run(path)
    assert ids(records) == ["oasst1_b"]
    assert report.dropped == Counter({"deleted message subtree": 1})
    assert ids(run(path, {"skip_deleted": False})[0]) == ["oasst1_a", "oasst1_b"]


def test_prompter_only_tree_emits_nothing(tmp_path: Path) -> None:
    records, report = run(write_lines(tmp_path, [tree(P("p", P("p2")))]))
    assert records == [] and report.read == 1 and report.bad.total == 0


def test_missing_optional_fields_read_as_null(tmp_path: Path) -> None:
    """The export may leave out null fields (exclude_none): no rank, replies, deleted, lang."""
    bare = {
        "message_id": "p",
        "role": "prompter",
        "text": "hi",
        "replies": [{"message_id": "a", "role": "assistant", "text": "hello"}],
    }
    records, _ = run(write_lines(tmp_path, [{"prompt": bare}]))
    assert ids(records) == ["oasst1_a"]


# --- options ------------------------------------------------------------------------------


def test_options_are_listed() -> None:
    assert converter_options("oasst1") == {
        "paths": "all",
        "top_k": None,
        "skip_deleted": True,
        "lang": None,
    }


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"paths": "every"}, "paths"),
        ({"paths": None}, "paths"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"skip_deleted": "yes"}, "skip_deleted"),
        ({"lang": []}, "lang"),
        ({"lang": ["en", 3]}, "lang"),
        ({"lang": " , "}, "lang"),
        ({"toplevel": 1}, "toplevel"),
    ],
)
def test_invalid_options(hand_tree: Path, options: dict[str, Any], named: str) -> None:
    with pytest.raises(DataError, match=named):
        run(hand_tree, options)


def test_options_are_checked_before_reading(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="paths"):
        convert(tmp_path / "never-opened.jsonl", ConversionReport(), paths="leaf")


# --- deep trees -----------------------------------------------------------------------------


def chain_line(depth: int, bad_at: int | None = None) -> str:
    """A tree that is one thread of `depth` alternating messages, as JSON text.

    Built as text: `json.dumps` itself cannot nest this deep.
    """
    parts = []
    for i in range(depth):
        role = "prompter" if i % 2 == 0 else "assistant"
        text = json.dumps(f"turn {i}") if i != bad_at else "null"
        parts.append(
            f'{{"message_id": "m{i}", "role": "{role}", "text": {text}, "lang": "en", '
            f'"deleted": false, "rank": 0, "replies": ['
        )
    return '{"message_tree_id": "deep", "prompt": ' + "".join(parts) + "]}" * depth + "}"


def test_deep_chain_converts(tmp_path: Path) -> None:
    # 400 turns nest 800 JSON levels: json.loads still parses it; the walk must not recurse.
    path = write_lines(tmp_path, [chain_line(400), tree(P("p", A("a")))])
    records, report = run(path, {"paths": "leaves"})
    assert ids(records) == ["oasst1_m399", "oasst1_a"]
    messages = records[0]["messages"]
    assert len(messages) == 400
    assert messages[0] == {"role": "user", "content": "turn 0"}
    assert messages[-1] == {"role": "assistant", "content": "turn 399"}
    records, report = run(path)  # every assistant turn of the thread ends one record
    assert len(records) == 200 + 1 and report.read == 2


def test_bad_message_deep_in_a_chain_is_located(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [chain_line(300, bad_at=201)])
    with pytest.raises(BadRecord) as caught:
        run(path, {"paths": "leaves"})
    error = caught.value
    assert error.where == f"{path}:1" and error.kind == "wrong type"
    assert error.detail.startswith("prompt.replies[0].replies[0].replies[0]...(195 levels)...")
    assert error.detail.endswith(".replies[0].text: expected a string, got null")
    records, report = run(path, {"paths": "leaves"}, skip_bad=True)
    assert ids(records) == ["oasst1_m199"]  # the thread up to the last good assistant turn
    assert report.bad.counts == Counter({"wrong type": 1})


def test_line_nested_beyond_the_json_parser_is_bad_input(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [chain_line(5000), tree(P("p", A("a")))])
    with pytest.raises(BadRecord, match="nested too deeply") as caught:
        run(path)
    assert caught.value.where == f"{path}:1"
    records, report = run(path, skip_bad=True)
    assert ids(records) == ["oasst1_a"]
    assert report.bad.counts == Counter({"nested too deeply": 1}) and report.read == 2


def test_deep_truncated_line_is_bad_input(tmp_path: Path) -> None:
    line = chain_line(300)
    path = write_lines(tmp_path, [line[: len(line) // 2], tree(P("p", A("a")))])
    with pytest.raises(BadRecord, match="truncated JSON") as caught:
        run(path)
    assert caught.value.where == f"{path}:1"
    records, report = run(path, skip_bad=True)
    assert ids(records) == ["oasst1_a"]
    assert report.bad.counts == Counter({"truncated JSON": 1}) and report.read == 2


# --- bad input ----------------------------------------------------------------------------


def with_reply(reply: Any) -> dict[str, Any]:
    """A tree whose prompt has a good reply "ok" and then `reply`."""
    prompt = P("p", A("ok"))
    prompt["replies"].append(reply)
    return tree(prompt)


BAD_LINES: list[tuple[str, Any, str, str]] = [
    # (case, line, kind, text the detail must contain)
    (
        "truncated",
        '{"message_tree_id": "t", "prompt": {"message_id": "p", "te',
        "truncated JSON",
        "column",
    ),
    ("invalid", '{"message_tree_id": "t", "prompt": nope}', "invalid JSON", "column"),
    ("not utf-8", b'{"prompt": "caf\xe9"}', "not UTF-8", "byte"),
    ("array line", [1, 2], "not a JSON object", "got list"),
    (
        "no prompt",
        {"message_tree_id": "t", "tree_state": "ready_for_export"},
        "missing field",
        "'prompt'",
    ),
    ("prompt string", tree("hello"), "wrong type", "field 'prompt'"),
    ("unknown role", with_reply(node("x", "moderator")), "unknown role", "prompt.replies[1].role"),
    ("no text", with_reply({"message_id": "x", "role": "assistant"}), "missing field", "'text'"),
    ("text number", with_reply({**A("x"), "text": 42}), "wrong type", "prompt.replies[1].text"),
    ("id number", with_reply({**A("x"), "message_id": 7}), "wrong type", ".message_id"),
    (
        "replies dict",
        with_reply({**A("x"), "replies": {}}),
        "wrong type",
        ".replies: expected a list",
    ),
    ("rank string", with_reply({**A("x"), "rank": "1"}), "wrong type", ".rank"),
    ("deleted string", with_reply({**A("x"), "deleted": "no"}), "wrong type", ".deleted"),
    ("reply string", with_reply("a reply"), "wrong type", "prompt.replies[1]: expected a message"),
    (
        "empty answer",
        with_reply(node("x", "assistant", " \n", P("y", A("z")))),
        "empty assistant turn",
        "prompt.replies[1].text",
    ),
]


#: The cases built by `with_reply`: their trees still have one good path.
WITH_GOOD_REPLY = {
    "unknown role",
    "no text",
    "text number",
    "id number",
    "replies dict",
    "rank string",
    "deleted string",
    "reply string",
    "empty answer",
}


@pytest.mark.parametrize(
    ("case", "line", "kind", "detail"), BAD_LINES, ids=[c[0] for c in BAD_LINES]
)
def test_bad_line_raises_by_default(
    tmp_path: Path, case: str, line: Any, kind: str, detail: str
) -> None:
    path = write_lines(tmp_path, [tree(P("good", A("g"))), line])
    with pytest.raises(BadRecord) as caught:
        run(path)
    error = caught.value
    assert (error.where, error.kind) == (f"{path}:2", kind)
    assert detail in error.detail
    assert str(error).startswith(f"{path}:2: ")


def test_bad_lines_are_counted_with_skip_bad(tmp_path: Path) -> None:
    lines = [tree(P("first", A("f")))] + [line for _, line, _, _ in BAD_LINES]
    lines += ["", tree(P("last", A("l")))]
    path = write_lines(tmp_path, lines)
    records, report = run(path, skip_bad=True)
    # A tree with one bad message still gives its good paths ("ok" in each with_reply tree).
    assert ids(records) == ["oasst1_f", *["oasst1_ok"] * len(WITH_GOOD_REPLY), "oasst1_l"]
    expected = Counter(kind for _, _, kind, _ in BAD_LINES)
    assert report.bad.counts == expected
    assert report.read == len(BAD_LINES) + 2  # the blank line is not an item
    assert report.written == len(records)
    summary = "\n".join(report.summary_lines())
    assert "skipped: unknown role" in summary and f"{path}:" in summary
