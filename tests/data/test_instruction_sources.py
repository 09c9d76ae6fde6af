"""Instruction-style converters: Dolly, GPT-4 Alpaca / Code-Alpaca, FLAN V2 / CoT."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import tulu.data
from tulu.data.records import BadInput, BadRecord, ConversionReport, check_record
from tulu.data.sources import convert_source, converter_options
from tulu.data.sources.flan import user_content
from tulu.data.templates import default_templates
from tulu.errors import DataError

SAMPLES = Path(tulu.data.__file__).parent / "samples"
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PAPER_TEMPLATES = SHARED / "recipes" / "instruction_templates.json"
CODE_ALPACA_2K = SHARED / "data" / "instruct" / "code_alpaca_2k.json"

#: source -> (sample file, a non-ASCII string some record of the sample carries)
SAMPLE_FILES = {
    "dolly": ("databricks-dolly-15k.jsonl", "昆布"),
    "gpt4_alpaca": ("alpaca_gpt4_data.json", "木漏れ日"),
    "code_alpaca": ("code_alpaca_20k.json", "Zoë Müller"),
    "flan_v2": ("flan_v2.jsonl", "おはようございます"),
    "cot": ("cot.jsonl", "東京"),
}


def _convert(
    name: str, path: Path, options: dict[str, Any] | None = None, *, skip_bad: bool = False
) -> tuple[list[dict[str, Any]], ConversionReport]:
    report = ConversionReport(bad=BadInput(skip_bad=skip_bad))
    records = list(convert_source(name, path, report, options))
    return records, report


def _raw_items(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _triple(name: str, item: dict[str, Any]) -> tuple[str, str, str]:
    if name == "dolly":
        return item["instruction"], item["context"], item["response"]
    return item["instruction"], item.get("input") or "", item["output"]


# --- the shipped samples -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLE_FILES))
def test_converts_its_sample(name: str) -> None:
    filename, non_ascii = SAMPLE_FILES[name]
    path = SAMPLES / filename
    raw = _raw_items(path)
    assert 15 <= len(raw) <= 30
    records, report = _convert(name, path)
    assert len(records) == report.written == report.read == len(raw)
    assert report.bad.total == 0 and not report.dropped
    assert [r["id"] for r in records] == [f"{name}_{i}" for i in range(len(raw))]
    for record in records:
        assert check_record(record, record["id"]) == record
        assert record["dataset"] == name
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert any(non_ascii in m["content"] for r in records for m in r["messages"])
    assert "\\u" not in json.dumps(records, ensure_ascii=False)


@pytest.mark.parametrize("name", ["dolly", "gpt4_alpaca", "code_alpaca"])
def test_samples_cover_both_template_lists(name: str) -> None:
    raw = _raw_items(SAMPLES / SAMPLE_FILES[name][0])
    inputs = [_triple(name, item)[1].strip() for item in raw]
    assert sum(1 for x in inputs if x) >= 3 and sum(1 for x in inputs if not x) >= 3


@pytest.mark.parametrize("name", ["dolly", "gpt4_alpaca", "code_alpaca"])
def test_templated_sources_use_the_default_set_and_raw_answers(name: str) -> None:
    raw = _raw_items(SAMPLES / SAMPLE_FILES[name][0])
    records, _ = _convert(name, SAMPLES / SAMPLE_FILES[name][0])
    templates = default_templates()
    for item, record in zip(raw, records, strict=True):
        instruction, input_text, output = (s.strip() for s in _triple(name, item))
        user, assistant = (m["content"] for m in record["messages"])
        entries = templates.with_input if input_text else templates.without_input
        options = {t.prompt.format(instruction=instruction, input=input_text) for t in entries}
        assert user in options
        assert assistant == output


@pytest.mark.parametrize("name", ["dolly", "gpt4_alpaca", "code_alpaca"])
def test_template_choice_follows_the_seed(name: str) -> None:
    path = SAMPLES / SAMPLE_FILES[name][0]
    default, _ = _convert(name, path)
    seed_42, _ = _convert(name, path, {"seed": 42})
    again, _ = _convert(name, path, {"seed": 42})
    other, _ = _convert(name, path, {"seed": 7})
    assert default == seed_42 == again
    assert other != seed_42
    assert [r["id"] for r in other] == [r["id"] for r in seed_42]


def _expected_paper_picks(items: list[tuple[str, str, str]]) -> list[list[dict[str, str]]]:
    """The paper's selection, computed as its "selection" field describes it."""
    raw = json.loads(PAPER_TEMPLATES.read_text(encoding="utf-8"))
    state = random.getstate()
    try:
        random.seed(42)
        expected = []
        for instruction, input_text, output in items:
            instruction, input_text, output = (
                instruction.strip(),
                input_text.strip(),
                output.strip(),
            )
            entries = raw["with_input"] if input_text else raw["without_input"]
            entry = random.choices(entries, weights=[e["weight"] for e in entries])[0]
            fields = {"instruction": instruction}
            if input_text:
                fields["input"] = input_text
            expected.append(
                [
                    {"role": "user", "content": entry["prompt"].format(**fields)},
                    {"role": "assistant", "content": entry["completion"].format(output=output)},
                ]
            )
    finally:
        random.setstate(state)
    return expected


@pytest.mark.parametrize("name", ["dolly", "gpt4_alpaca", "code_alpaca"])
def test_paper_templates_reproduce_the_selection_rule(name: str) -> None:
    if not PAPER_TEMPLATES.is_file():
        pytest.skip(f"the paper's template set is absent ({PAPER_TEMPLATES})")
    path = SAMPLES / SAMPLE_FILES[name][0]
    items = [_triple(name, item) for item in _raw_items(path)]
    records, _ = _convert(name, path, {"templates": str(PAPER_TEMPLATES)})
    assert [r["messages"] for r in records] == _expected_paper_picks(items)


def test_custom_template_file(tmp_path: Path) -> None:
    templates = tmp_path / "mine.json"
    templates.write_text(
        json.dumps(
            {
                "with_input": [
                    {"prompt": "<{instruction}|{input}>", "completion": "={output}=", "weight": 2}
                ],
                "without_input": [
                    {"prompt": "<{instruction}>", "completion": "={output}=", "weight": 1}
                ],
            }
        ),
        encoding="utf-8",
    )
    data = tmp_path / "a.json"
    data.write_text(
        json.dumps(
            [
                {"instruction": " Add ", "input": " 1, 2 ", "output": " 3 "},
                {"instruction": "Greet", "output": "Hi"},
                {"instruction": "Greet", "input": None, "output": "Hi"},
                {"instruction": "Greet", "input": " \n", "output": "Hi", "extra": [1]},
            ]
        ),
        encoding="utf-8",
    )
    records, _ = _convert("gpt4_alpaca", data, {"templates": str(templates)})
    assert [[m["content"] for m in r["messages"]] for r in records] == [
        ["<Add|1, 2>", "=3="],
        ["<Greet>", "=Hi="],
        ["<Greet>", "=Hi="],
        ["<Greet>", "=Hi="],
    ]


def test_options_through_the_registry(tmp_path: Path) -> None:
    assert converter_options("dolly") == {"templates": None, "seed": 42}
    assert converter_options("code_alpaca") == {"templates": None, "seed": 42}
    assert converter_options("flan_v2") == {}
    sample = SAMPLES / SAMPLE_FILES["dolly"][0]
    with pytest.raises(DataError, match=r"unknown option\(s\) 'sed' \(valid: templates, seed\)"):
        _convert("dolly", sample, {"sed": 1})
    with pytest.raises(DataError, match="unknown option"):
        _convert("cot", SAMPLES / "cot.jsonl", {"seed": 1})
    with pytest.raises(DataError, match="option 'seed': expected an integer, got str"):
        _convert("dolly", sample, {"seed": "42"})
    with pytest.raises(DataError, match="missing.json: cannot read template file"):
        _convert(
            "gpt4_alpaca",
            SAMPLES / SAMPLE_FILES["gpt4_alpaca"][0],
            {"templates": str(tmp_path / "missing.json")},
        )


# --- FLAN's newline rule -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ("Translate: hello", "Translate: hello\n"),
        ("Question?\n", "Question?\n"),
        ("Options:\n- yes\n- no\n\n", "Options:\n- yes\n- no\n\n"),
        ("Answer:", "Answer:"),
        ("Answer:  ", "Answer:  "),
        ("Answer: \t", "Answer: \t"),
        ("ratio 1:2", "ratio 1:2\n"),
        ("trailing space ", "trailing space \n"),
        ("Q: why?\nA", "Q: why?\nA\n"),
    ],
)
def test_flan_newline_rule(inputs: str, expected: str) -> None:
    assert user_content(inputs) == expected


@pytest.mark.parametrize("name", ["flan_v2", "cot"])
def test_flan_records_follow_the_newline_rule(name: str) -> None:
    path = SAMPLES / SAMPLE_FILES[name][0]
    raw = _raw_items(path)
    records, _ = _convert(name, path)
    kept = 0
    for item, record in zip(raw, records, strict=True):
        user, assistant = (m["content"] for m in record["messages"])
        assert assistant == item["targets"]
        if item["inputs"].endswith("\n") or item["inputs"].rstrip().endswith(":"):
            assert user == item["inputs"]
            kept += 1
        else:
            assert user == item["inputs"] + "\n"
    assert 0 < kept < len(raw)  # the samples exercise both branches


# --- bad input -----------------------------------------------------------------------------


def _dolly(instruction: Any = "Name a color.", context: Any = "", response: Any = "Blue.") -> bytes:
    return json.dumps(
        {"instruction": instruction, "context": context, "response": response, "category": "x"}
    ).encode()


#: (line, kind, detail) for each bad line; the good lines around them are indices 0 and 7.
DOLLY_BAD_LINES = [
    (_dolly(instruction=5), "wrong type", "field 'instruction': expected a string, got int"),
    (
        b'{"instruction": "a", "context": "", "category": "x"}',
        "missing field",
        "missing field 'response'",
    ),
    (b'{"instruction": "caf\xe9", "context": "", "response": "r"}', "not UTF-8", "not valid UTF-8"),
    (_dolly(response="  \n"), "empty output", "field 'response' is empty"),
    (b"[1, 2]", "not a JSON object", "expected a JSON object, got list"),
    (_dolly(context=None), "wrong type", "field 'context': expected a string, got null"),
]


def _dolly_file(tmp_path: Path) -> Path:
    lines = [_dolly()] + [line for line, _, _ in DOLLY_BAD_LINES] + [b"", _dolly("Say hi.")]
    lines.append(b'{"instruction": "Cut off", "context": "", "respo')
    path = tmp_path / "dolly.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize(("line", "kind", "detail"), DOLLY_BAD_LINES)
def test_dolly_bad_line_raises_by_default(
    tmp_path: Path, line: bytes, kind: str, detail: str
) -> None:
    path = tmp_path / "dolly.jsonl"
    path.write_bytes(_dolly() + b"\n" + line + b"\n")
    with pytest.raises(BadRecord) as err:
        _convert("dolly", path)
    assert err.value.kind == kind
    assert str(err.value).startswith(f"{path}:2: ")
    assert detail in str(err.value)


def test_dolly_skip_bad_counts_per_reason_and_keeps_ids(tmp_path: Path) -> None:
    path = _dolly_file(tmp_path)
    records, report = _convert("dolly", path, skip_bad=True)
    assert [r["id"] for r in records] == ["dolly_0", "dolly_7"]
    assert report.read == 9 and report.written == 2
    assert dict(report.bad.counts) == {
        "wrong type": 2,
        "missing field": 1,
        "not UTF-8": 1,
        "empty output": 1,
        "not a JSON object": 1,
        "truncated JSON": 1,
    }
    assert report.bad.examples["truncated JSON"] == [f"{path}:10"]
    assert report.summary_lines()[0] == "2 records written from 9 read"


def test_dolly_ids_do_not_depend_on_bad_lines(tmp_path: Path) -> None:
    """The template drawn for a good line is the same whether or not bad lines precede it."""
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"\n".join([_dolly(), _dolly("Say hi.")]) + b"\n")
    clean_records, _ = _convert("dolly", clean)
    noisy_records, _ = _convert("dolly", _dolly_file(tmp_path), skip_bad=True)
    assert clean_records[0]["messages"] == noisy_records[0]["messages"]


def _alpaca_file(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_bytes(body)
    return path


GOOD_ALPACA = b'{"instruction": "Add 2 and 2.", "input": "", "output": "4"}'


@pytest.mark.parametrize(
    ("element", "kind", "detail"),
    [
        (
            b'{"instruction": "x", "input": 3, "output": "y"}',
            "wrong type",
            "field 'input': expected a string, got int",
        ),
        (b'{"input": "", "output": "y"}', "missing field", "missing field 'instruction'"),
        (
            b'{"instruction": "x", "output": ["y"]}',
            "wrong type",
            "field 'output': expected a string, got list",
        ),
        (
            b'{"instruction": "x", "input": "ctx", "output": ""}',
            "empty output",
            "field 'output' is empty",
        ),
        (
            b'{"instruction": " ", "input": "ctx", "output": "y"}',
            "empty instruction",
            "field 'instruction' is empty",
        ),
        (b'"just a string"', "not a JSON object", "expected a JSON object, got str"),
        (b'{"instruction": "\xff", "input": "", "output": "y"}', "not UTF-8", "not valid UTF-8"),
    ],
)
def test_alpaca_bad_element(tmp_path: Path, element: bytes, kind: str, detail: str) -> None:
    path = _alpaca_file(
        tmp_path, b"[\n  " + GOOD_ALPACA + b",\n  " + element + b",\n  " + GOOD_ALPACA + b"\n]\n"
    )
    with pytest.raises(BadRecord) as err:
        _convert("code_alpaca", path)
    assert err.value.kind == kind
    assert str(err.value).startswith(f"{path}:3: ") and detail in str(err.value)

    records, report = _convert("code_alpaca", path, skip_bad=True)
    assert [r["id"] for r in records] == ["code_alpaca_0", "code_alpaca_2"]
    assert dict(report.bad.counts) == {kind: 1}
    assert report.read == 3 and report.written == 2


@pytest.mark.parametrize(
    "tail",
    [
        b'{"instruction": "Cut"',
        # Cut inside a string: the reader may call this "invalid JSON"; only the place and the
        # count matter here.
        b'{"instruction": "Cut',
    ],
)
def test_alpaca_truncated_array(tmp_path: Path, tail: bytes) -> None:
    path = _alpaca_file(tmp_path, b"[\n  " + GOOD_ALPACA + b",\n  " + GOOD_ALPACA + b",\n  " + tail)
    with pytest.raises(BadRecord) as err:
        _convert("gpt4_alpaca", path)
    assert str(err.value).startswith(f"{path}:4: ")
    if tail.endswith(b'"'):
        assert err.value.kind == "truncated JSON"
    records, report = _convert("gpt4_alpaca", path, skip_bad=True)
    assert [r["id"] for r in records] == ["gpt4_alpaca_0", "gpt4_alpaca_1"]
    assert report.bad.total == 1
    assert report.read == 3


def test_alpaca_not_an_array(tmp_path: Path) -> None:
    path = _alpaca_file(tmp_path, GOOD_ALPACA + b"\n")
    with pytest.raises(DataError, match="expected a JSON array"):
        _convert("gpt4_alpaca", path)


@pytest.mark.parametrize(
    ("line", "kind", "detail"),
    [
        (
            b'{"inputs": "Q?", "targets": 1}',
            "wrong type",
            "field 'targets': expected a string, got int",
        ),
        (b'{"targets": "A"}', "missing field", "missing field 'inputs'"),
        (b'{"inputs": "Q?", "targets": " \\n "}', "empty output", "field 'targets' is empty"),
        (b'{"inputs": "Q?", "targets": "\xe9t\xe9"}', "not UTF-8", "not valid UTF-8"),
        (b"null", "not a JSON object", "expected a JSON object, got null"),
        (b'{"inputs": "Q?", "targets": "A"', "truncated JSON", "truncated JSON"),
    ],
)
@pytest.mark.parametrize("name", ["flan_v2", "cot"])
def test_flan_bad_line(tmp_path: Path, name: str, line: bytes, kind: str, detail: str) -> None:
    good = b'{"inputs": "Q?", "targets": "A", "task": "t"}'
    path = tmp_path / "flan.jsonl"
    path.write_bytes(good + b"\n" + line + b"\n\n" + good + b"\n")
    with pytest.raises(BadRecord) as err:
        _convert(name, path)
    assert err.value.kind == kind
    assert str(err.value).startswith(f"{path}:2: ") and detail in str(err.value)

    records, report = _convert(name, path, skip_bad=True)
    assert [r["id"] for r in records] == [f"{name}_0", f"{name}_2"]
    assert dict(report.bad.counts) == {kind: 1}
    assert report.read == 3 and report.written == 2


# --- the real Code-Alpaca release ----------------------------------------------------------


@pytest.fixture(scope="module")
def code_alpaca_2k() -> Path:
    if not CODE_ALPACA_2K.is_file():
        pytest.skip(f"the Code-Alpaca 2k release is absent ({CODE_ALPACA_2K})")
    return CODE_ALPACA_2K


def test_real_code_alpaca(code_alpaca_2k: Path) -> None:
    """2017 examples; two have an empty output, which are skipped without shifting the ids."""
    raw = json.loads(code_alpaca_2k.read_text(encoding="utf-8"))
    assert len(raw) == 2017
    empty = [i for i, item in enumerate(raw) if not item["output"].strip()]

    with pytest.raises(BadRecord, match=r"code_alpaca_2k\.json:\d+: field 'output' is empty"):
        _convert("code_alpaca", code_alpaca_2k)

    records, report = _convert("code_alpaca", code_alpaca_2k, skip_bad=True)
    assert report.read == 2017
    assert report.written == len(records) == 2017 - len(empty)
    assert dict(report.bad.counts) == ({"empty output": len(empty)} if empty else {})
    assert [r["id"] for r in records] == [
        f"code_alpaca_{i}" for i in range(2017) if i not in set(empty)
    ]
    for record in records:
        check_record(record, record["id"])
        assert record["dataset"] == "code_alpaca"


def test_real_code_alpaca_with_paper_templates(code_alpaca_2k: Path) -> None:
    """Every example draws a template, skipped ones included, exactly as open-instruct does."""
    if not PAPER_TEMPLATES.is_file():
        pytest.skip(f"the paper's template set is absent ({PAPER_TEMPLATES})")
    raw = json.loads(code_alpaca_2k.read_text(encoding="utf-8"))
    expected = _expected_paper_picks([_triple("code_alpaca", item) for item in raw])
    records, _ = _convert(
        "code_alpaca", code_alpaca_2k, {"templates": str(PAPER_TEMPLATES)}, skip_bad=True
    )
    by_index = {int(r["id"].rsplit("_", 1)[1]): r["messages"] for r in records}
    assert by_index == {
        i: messages for i, messages in enumerate(expected) if raw[i]["output"].strip()
    }
