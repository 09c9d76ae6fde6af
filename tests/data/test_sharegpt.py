"""ShareGPT: role mapping, drop rules, chunking into max_tokens, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

import tulu.data
from tulu.data.records import BadInput, BadRecord, ConversionReport, check_record
from tulu.data.sources import convert_source, converter_options
from tulu.data.sources.sharegpt import TURN_OVERHEAD, convert
from tulu.errors import DataError
from tulu.tokenizer import Tokenizer

SAMPLE = Path(tulu.data.__file__).parent / "samples" / "sharegpt_html_cleaned.json"


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer.json with one token per whitespace-separated word, so counts are known."""
    backend = Backend(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("words") / "tokenizer.json"
    backend.save(str(path))
    return path


def words(n: int, tag: str = "w") -> str:
    """A text of exactly `n` words (tokens, for the word tokenizer)."""
    return " ".join(f"{tag}{i}" for i in range(n))


def cost(text: str) -> int:
    """What a turn costs with the word tokenizer."""
    return len(text.split()) + TURN_OVERHEAD


def conv(conversation_id: Any, *turns: tuple[str, Any]) -> dict[str, Any]:
    return {"id": conversation_id, "conversations": [{"from": f, "value": v} for f, v in turns]}


def write_array(tmp_path: Path, items: list[Any], name: str = "sg.json") -> Path:
    """A JSON array with element i on line i + 2 (line 1 is the opening bracket)."""
    path = tmp_path / name
    body = ",\n".join(json.dumps(item, ensure_ascii=False) for item in items)
    path.write_text(f"[\n{body}\n]\n", encoding="utf-8")
    return path


def run(
    path: Path,
    tokenizer: Path | str | None,
    max_tokens: int | None = None,
    *,
    skip_bad: bool = False,
) -> tuple[list[dict[str, Any]], ConversionReport]:
    """Convert through the registry (option checks, record checks) and collect everything."""
    options: dict[str, Any] = {"tokenizer": None if tokenizer is None else str(tokenizer)}
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    report = ConversionReport(bad=BadInput(skip_bad=skip_bad))
    records = list(convert_source("sharegpt", path, report, options))
    for record in records:
        check_record(record, record["id"])
    return records, report


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in records]


def contents(record: dict[str, Any]) -> list[str]:
    return [m["content"] for m in record["messages"]]


def test_word_tokenizer_counts_words(word_tokenizer: Path) -> None:
    tokenizer = Tokenizer.from_file(word_tokenizer)
    assert [len(ids) for ids in tokenizer.encode_batch(["a b  c\nd", "", words(17)])] == [4, 0, 17]


def test_unpaired_surrogates_are_bad_input_not_a_crash(
    tmp_path: Path, word_tokenizer: Path
) -> None:
    """A cut emoji escaped in the dump ("\\ud83d") cannot be tokenized nor written as UTF-8:
    the conversation is bad input, whether the surrogate is in a turn or in the id."""
    path = tmp_path / "sg.json"
    items = [
        conv("a", ("human", "hi \ud83d"), ("gpt", "hello")),
        conv("b\udc80", ("human", "hi"), ("gpt", "hello")),
        conv("c", ("human", "hi"), ("gpt", "hello")),
    ]
    body = ",\n".join(json.dumps(item) for item in items)  # ASCII escapes, as in the dumps
    path.write_text(f"[\n{body}\n]\n", encoding="utf-8")
    with pytest.raises(BadRecord, match=r"sg.json:2: conversations\[0\].value: .* surrogate"):
        run(path, word_tokenizer)
    records, report = run(path, word_tokenizer, skip_bad=True)
    assert ids(records) == ["sharegpt_c_0"]
    assert report.bad.counts == Counter({"not UTF-8": 2})


# --- roles and drop rules -----------------------------------------------------------------


def test_roles_are_mapped(tmp_path: Path, word_tokenizer: Path) -> None:
    item = conv(
        "r1",
        ("human", "Bonjour, ça va ?"),
        ("gpt", "Très bien, merci !"),
        ("user", "日本語は？"),
        ("chatgpt", "はい、話せます。"),
    )
    records, report = run(write_array(tmp_path, [item]), word_tokenizer)
    assert records == [
        {
            "dataset": "sharegpt",
            "id": "sharegpt_r1_0",
            "messages": [
                {"role": "user", "content": "Bonjour, ça va ?"},
                {"role": "assistant", "content": "Très bien, merci !"},
                {"role": "user", "content": "日本語は？"},
                {"role": "assistant", "content": "はい、話せます。"},
            ],
        }
    ]
    assert (report.read, report.written, report.bad.total) == (1, 1, 0)
    assert not report.dropped


def test_drop_rules_are_counted(tmp_path: Path, word_tokenizer: Path) -> None:
    items = [
        conv("system", ("system", "Answer in French."), ("human", "Hi"), ("gpt", "Salut")),
        conv("bing", ("human", "Weather?"), ("bing", "Sunny."), ("human", "Thanks"), ("gpt", "!")),
        conv("two-users", ("human", "Hi"), ("human", "Hello?"), ("gpt", "Hi there")),
        conv("gpt-first", ("gpt", "How can I help?"), ("human", "2+2?"), ("gpt", "4")),
        conv("two-gpts", ("human", "2+2?"), ("gpt", "4"), ("gpt", "Four")),
        conv("trailing", ("human", "Hi"), ("gpt", "Hello"), ("human", "Are you there?")),
        conv("lone-user", ("human", "Anyone?")),
        conv("empty"),
        conv("kept", ("human", "Hi"), ("gpt", "Hello")),
    ]
    records, report = run(write_array(tmp_path, items), word_tokenizer)
    assert ids(records) == ["sharegpt_trailing_0", "sharegpt_kept_0"]
    assert contents(records[0]) == ["Hi", "Hello"]
    assert report.dropped == Counter(
        {
            "conversation with a system turn": 1,
            "conversation with a bing turn": 1,
            "roles do not alternate user, assistant": 3,
            "trailing user turn removed": 1,
            "no assistant turn": 1,
            "empty conversation": 1,
        }
    )
    assert (report.read, report.written, report.bad.total) == (9, 2, 0)


# --- chunking -----------------------------------------------------------------------------


def test_chunk_boundaries(tmp_path: Path, word_tokenizer: Path) -> None:
    turns = [
        ("human", words(4)),  # exchange at 0: 10 + 14 = 24
        ("gpt", words(8)),
        ("human", words(2)),  # at 2: 8 + 8 = 16 -> 40, exactly max_tokens: same chunk
        ("gpt", words(2)),
        ("human", words(1)),  # at 4: 7 + 7 = 14 -> 54 > 40: new chunk
        ("gpt", words(1)),
        ("human", words(10)),  # at 6: 16 + 16 = 32 -> 46 > 40: new chunk
        ("gpt", words(10)),
        ("human", words(30)),  # at 8: 36 + 7 = 43 > 40 on its own: dropped
        ("gpt", words(1)),
        ("human", words(2)),  # at 10: 16, a new chunk after the dropped exchange
        ("gpt", words(2)),
        ("human", words(3)),  # at 12: 9 + 9 = 18 -> 34: same chunk
        ("gpt", words(3)),
    ]
    assert [cost(t) for _, t in turns[:4]] == [10, 14, 8, 8]
    records, report = run(write_array(tmp_path, [conv("c", *turns)]), word_tokenizer, 40)
    texts = [t for _, t in turns]
    assert ids(records) == ["sharegpt_c_0", "sharegpt_c_4", "sharegpt_c_6", "sharegpt_c_10"]
    assert [contents(r) for r in records] == [texts[0:4], texts[4:6], texts[6:8], texts[10:14]]
    for record in records:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"] * (
            len(record["messages"]) // 2
        )
    assert report.dropped == Counter({"exchange longer than 40 tokens": 1})
    assert (report.read, report.written) == (1, 4)


def test_one_token_more_splits(tmp_path: Path, word_tokenizer: Path) -> None:
    turns = [("human", words(4)), ("gpt", words(8)), ("human", words(2)), ("gpt", words(2))]
    path = write_array(tmp_path, [conv("c", *turns)])
    assert ids(run(path, word_tokenizer, 40)[0]) == ["sharegpt_c_0"]
    assert ids(run(path, word_tokenizer, 39)[0]) == ["sharegpt_c_0", "sharegpt_c_2"]
    assert ids(run(path, word_tokenizer, 2048)[0]) == ["sharegpt_c_0"]


@pytest.mark.parametrize(
    ("sizes", "expected", "too_long"),
    [
        ([(30, 1), (1, 1), (1, 1)], ["_2"], 1),  # the first exchange is too long
        ([(1, 1), (1, 1), (30, 1)], ["_0"], 1),  # the last one is
        ([(1, 1), (30, 1), (30, 1), (1, 1)], ["_0", "_6"], 2),  # two in a row
        ([(30, 1), (1, 30)], [], 2),  # all of them: nothing is left
    ],
)
def test_too_long_exchanges(
    tmp_path: Path,
    word_tokenizer: Path,
    sizes: list[tuple[int, int]],
    expected: list[str],
    too_long: int,
) -> None:
    turns = [t for u, a in sizes for t in (("human", words(u)), ("gpt", words(a)))]
    records, report = run(write_array(tmp_path, [conv("c", *turns)]), word_tokenizer, 40)
    assert ids(records) == [f"sharegpt_c{suffix}" for suffix in expected]
    assert report.dropped == Counter({"exchange longer than 40 tokens": too_long})


def test_tokenizer_directory(tmp_path: Path, word_tokenizer: Path) -> None:
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(word_tokenizer.read_bytes())
    path = write_array(tmp_path, [conv("c", ("human", words(10)), ("gpt", words(10)))])
    assert ids(run(path, directory, 32)[0]) == ["sharegpt_c_0"]
    assert ids(run(path, directory, 31)[0]) == []


def test_one_encode_batch_per_conversation(
    tmp_path: Path, word_tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    batch = Tokenizer.encode_batch

    def counting(self: Tokenizer, texts: list[str]) -> list[list[int]]:
        calls.append(len(texts))
        return batch(self, texts)

    def forbidden(self: Tokenizer, text: str) -> list[int]:
        raise AssertionError("encode called for a single text")

    monkeypatch.setattr(Tokenizer, "encode_batch", counting)
    monkeypatch.setattr(Tokenizer, "encode", forbidden)
    items = [
        conv("a", ("human", "x"), ("gpt", "y"), ("human", "z"), ("gpt", "w")),
        conv("dropped", ("system", "s"), ("human", "x"), ("gpt", "y")),
        conv("b", ("human", "x"), ("gpt", "y"), ("human", "trailing")),
    ]
    run(write_array(tmp_path, items), word_tokenizer)
    assert calls == [4, 2]


# --- the shipped sample -------------------------------------------------------------------


def test_sample_default(word_tokenizer: Path) -> None:
    records, report = run(SAMPLE, word_tokenizer)
    raw = json.loads(SAMPLE.read_text(encoding="utf-8"))
    assert (report.read, report.written, len(raw)) == (20, 15, 20)
    assert ids(records) == [
        f"sharegpt_{c['id']}_0"
        for c in raw
        if c["id"] not in ("sY3mB6v", "jB8hN5z", "cR0tV9p", "gH2kW7e", "oP7aE4i")
    ]
    assert report.dropped == Counter(
        {
            "conversation with a system turn": 1,
            "conversation with a bing turn": 1,
            "roles do not alternate user, assistant": 2,
            "trailing user turn removed": 1,
            "empty conversation": 1,
        }
    )
    by_id = {r["id"]: r for r in records}
    assert len(by_id["sharegpt_mJ4xZ1a_0"]["messages"]) == 4  # trailing question removed
    assert by_id["sharegpt_wE7iO2q_0"]["messages"][1]["role"] == "assistant"  # "chatgpt"
    text = " ".join(m["content"] for r in records for m in r["messages"])
    assert "区块链" in text and "arigatō" in text and "«" in text


def test_sample_long_conversation_chunks(word_tokenizer: Path) -> None:
    records, report = run(SAMPLE, word_tokenizer, 64)
    raw = {c["id"]: c["conversations"] for c in json.loads(SAMPLE.read_text(encoding="utf-8"))}
    trip = [t["value"] for t in raw["Fz6pQ3r"]]
    exchanges = [cost(trip[i]) + cost(trip[i + 1]) for i in range(0, len(trip), 2)]
    assert exchanges == [64, 50, 50, 46, 49, 27, 28]  # the first fills a chunk exactly
    chunks = [r for r in records if r["id"].startswith("sharegpt_Fz6pQ3r_")]
    assert ids(chunks) == [f"sharegpt_Fz6pQ3r_{i}" for i in (0, 2, 4, 6, 8, 10)]
    assert contents(chunks[-1]) == trip[10:14]
    for record in records:
        assert sum(cost(t) for t in contents(record)) <= 64
    assert report.dropped["exchange longer than 64 tokens"] == 11


def test_sample_with_neox_tokenizer(neox_tokenizer_path: Path) -> None:
    """Chunks under the real tokenizer: within budget, maximal, covering every exchange.

    Token counts are taken one text at a time with `encode`, independently of the converter's
    `encode_batch`.
    """
    tokenizer = Tokenizer.from_file(neox_tokenizer_path)
    max_tokens = 160
    records, report = run(SAMPLE, neox_tokenizer_path, max_tokens)
    raw = {c["id"]: c["conversations"] for c in json.loads(SAMPLE.read_text(encoding="utf-8"))}
    by_conversation: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        conversation_id, _, start = record["id"].removeprefix("sharegpt_").rpartition("_")
        by_conversation.setdefault(conversation_id, []).append({**record, "start": int(start)})
    assert len(records) > 15  # some conversations are split
    kept = [i for i in raw if i not in ("sY3mB6v", "jB8hN5z", "cR0tV9p", "gH2kW7e", "oP7aE4i")]
    assert set(by_conversation) <= set(kept)
    too_long = 0
    for conversation_id in kept:
        chunks = by_conversation.get(conversation_id, [])
        values = [t["value"] for t in raw[conversation_id]]
        values = values[: len(values) // 2 * 2]
        costs = [len(tokenizer.encode(v)) + TURN_OVERHEAD for v in values]
        exchange = {i: costs[i] + costs[i + 1] for i in range(0, len(values), 2)}
        covered = set()
        for index, chunk in enumerate(chunks):
            start, end = chunk["start"], chunk["start"] + len(chunk["messages"])
            assert contents(chunk) == values[start:end]
            assert sum(costs[start:end]) <= max_tokens
            covered |= set(range(start, end, 2))
            following = index + 1 < len(chunks) and chunks[index + 1]["start"] == end
            if following:  # closed only because the next exchange did not fit
                assert sum(costs[start:end]) + exchange[end] > max_tokens
        missing = set(exchange) - covered
        assert all(exchange[i] > max_tokens for i in missing)
        too_long += len(missing)
    assert too_long > 0
    assert report.dropped[f"exchange longer than {max_tokens} tokens"] == too_long


# --- options ------------------------------------------------------------------------------


def test_options_are_listed() -> None:
    assert converter_options("sharegpt") == {"tokenizer": None, "max_tokens": 2048}


def test_tokenizer_is_required(tmp_path: Path) -> None:
    path = write_array(tmp_path, [conv("c", ("human", "x"), ("gpt", "y"))])
    with pytest.raises(DataError, match="source 'sharegpt' needs the option tokenizer"):
        run(path, None)
    with pytest.raises(DataError, match="needs the option tokenizer"):
        convert(path, ConversionReport())


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": "2048"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 10.5}, "max_tokens"),
        ({"tokenizer": 3}, "tokenizer"),
        ({"max_len": 10}, "max_len"),
    ],
)
def test_invalid_options(
    tmp_path: Path, word_tokenizer: Path, options: dict[str, Any], named: str
) -> None:
    path = write_array(tmp_path, [conv("c", ("human", "x"), ("gpt", "y"))])
    with pytest.raises(DataError, match=named):
        list(
            convert_source(
                "sharegpt", path, ConversionReport(), {"tokenizer": str(word_tokenizer), **options}
            )
        )


@pytest.mark.parametrize("name", ["missing.json", "missing-dir/", "not-a-tokenizer.json"])
def test_unusable_tokenizer(tmp_path: Path, name: str) -> None:
    (tmp_path / "not-a-tokenizer.json").write_text('{"hello": 1}', encoding="utf-8")
    (tmp_path / "missing-dir").mkdir()
    path = write_array(tmp_path, [conv("c", ("human", "x"), ("gpt", "y"))])
    with pytest.raises(DataError, match="option tokenizer") as caught:
        run(path, tmp_path / name)
    assert str(tmp_path) in str(caught.value)


# --- bad input ----------------------------------------------------------------------------

BAD_ITEMS: list[tuple[str, Any, str, str]] = [
    # (case, array element, kind, text the detail must contain)
    ("string element", "just text", "not a JSON object", "got str"),
    ("no id", {"conversations": []}, "missing field", "'id'"),
    ("id number", conv(7, ("human", "x"), ("gpt", "y")), "wrong type", "field 'id'"),
    ("no conversations", {"id": "x"}, "missing field", "'conversations'"),
    ("conversations dict", {"id": "x", "conversations": {}}, "wrong type", "'conversations'"),
    ("turn string", {"id": "x", "conversations": ["hi"]}, "wrong type", "conversations[0]"),
    (
        "no from",
        {"id": "x", "conversations": [{"from": "human", "value": "a"}, {"value": "b"}]},
        "missing field",
        "conversations[1]: missing field 'from'",
    ),
    (
        "value null",
        conv("x", ("human", "a"), ("gpt", None)),
        "wrong type",
        "conversations[1].value",
    ),
    (
        "unknown role",
        conv("x", ("human", "a"), ("moderator", "b")),
        "unknown role",
        "conversations[1].from: unknown role 'moderator'",
    ),
    (
        "empty answer",
        conv("x", ("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", " \n ")),
        "empty assistant turn",
        "conversations[3].value",
    ),
]


@pytest.mark.parametrize(
    ("case", "item", "kind", "detail"), BAD_ITEMS, ids=[c[0] for c in BAD_ITEMS]
)
def test_bad_item_raises_by_default(
    tmp_path: Path, word_tokenizer: Path, case: str, item: Any, kind: str, detail: str
) -> None:
    good = conv("good", ("human", "x"), ("gpt", "y"))
    path = write_array(tmp_path, [good, item])
    with pytest.raises(BadRecord) as caught:
        run(path, word_tokenizer)
    error = caught.value
    assert (error.where, error.kind) == (f"{path}:3", kind)
    assert detail in error.detail


def test_bad_items_are_counted_with_skip_bad(tmp_path: Path, word_tokenizer: Path) -> None:
    first = conv("first", ("human", "x"), ("gpt", "y"))
    last = conv("last", ("human", "x"), ("gpt", "y"), ("human", "z"), ("gpt", "w"))
    path = write_array(tmp_path, [first, *(item for _, item, _, _ in BAD_ITEMS), last])
    records, report = run(path, word_tokenizer, skip_bad=True)
    assert ids(records) == ["sharegpt_first_0", "sharegpt_last_0"]
    assert report.bad.counts == Counter(kind for _, _, kind, _ in BAD_ITEMS)
    assert (report.read, report.written) == (len(BAD_ITEMS) + 2, 2)
    position = 1 + [case for case, *_ in BAD_ITEMS].index("unknown role")  # in the array
    assert report.bad.examples["unknown role"] == [f"{path}:{position + 2}"]


def test_truncated_file(tmp_path: Path, word_tokenizer: Path) -> None:
    items = [conv(f"c{i}", ("human", "question"), ("gpt", "answer")) for i in range(3)]
    whole = write_array(tmp_path, items).read_text(encoding="utf-8")
    path = tmp_path / "truncated.json"
    path.write_text(whole[: whole.index('"c2"') + 10], encoding="utf-8")
    with pytest.raises(BadRecord) as caught:
        run(path, word_tokenizer)
    assert caught.value.kind == "truncated JSON" and caught.value.where == f"{path}:4"
    records, report = run(path, word_tokenizer, skip_bad=True)
    assert ids(records) == ["sharegpt_c0_0", "sharegpt_c1_0"]
    assert report.bad.counts == Counter({"truncated JSON": 1})


def test_not_utf8_element(tmp_path: Path, word_tokenizer: Path) -> None:
    items = [conv(f"c{i}", ("human", f"question {i}"), ("gpt", "answer")) for i in range(3)]
    path = write_array(tmp_path, items)
    path.write_bytes(path.read_bytes().replace(b"question 1", b"questi\xf3n 1"))
    with pytest.raises(BadRecord) as caught:
        run(path, word_tokenizer)
    assert (caught.value.kind, caught.value.where) == ("not UTF-8", f"{path}:3")
    records, report = run(path, word_tokenizer, skip_bad=True)
    assert ids(records) == ["sharegpt_c0_0", "sharegpt_c2_0"]
    assert report.bad.counts == Counter({"not UTF-8": 1}) and report.read == 3


def test_not_an_array(tmp_path: Path, word_tokenizer: Path) -> None:
    path = tmp_path / "object.json"
    path.write_text(json.dumps(conv("c", ("human", "x"), ("gpt", "y"))), encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array"):
        run(path, word_tokenizer)
