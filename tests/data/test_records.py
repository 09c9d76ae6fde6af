"""The record format, bad-input reporting and the location-aware readers."""

from __future__ import annotations

import datetime
import importlib
import json
import os

import pytest

from tulu.data.readers import iter_json_array, iter_jsonl, iter_records
from tulu.data.records import (
    BadInput,
    BadRecord,
    ConversionReport,
    check_record,
    make_record,
    write_records,
)
from tulu.errors import DataError

GOOD = make_record(
    "mine", "mine_0", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hé!"}]
)


@pytest.mark.parametrize(
    ("value", "kind", "fragment"),
    [
        ([1], "not a JSON object", "expected a JSON object, got list"),
        ({"id": "x", "messages": []}, "missing field", "missing field 'dataset'"),
        ({"dataset": 3, "id": "x", "messages": []}, "wrong type", "field 'dataset'"),
        ({"dataset": "d", "id": "x", "messages": {}}, "wrong type", "field 'messages'"),
        ({"dataset": "d", "id": "x", "messages": []}, "no messages", "is empty"),
        ({"dataset": "d", "id": "x", "messages": ["hi"]}, "wrong type", "messages[0]"),
        (
            {"dataset": "d", "id": "x", "messages": [{"role": "user"}]},
            "missing field",
            "messages[0]: missing field 'content'",
        ),
        (
            {"dataset": "d", "id": "x", "messages": [{"role": "bot", "content": "a"}]},
            "unknown role",
            "messages[0].role: unknown role 'bot'",
        ),
        (
            {"dataset": "d", "id": "x", "messages": [{"role": "user", "content": None}]},
            "wrong type",
            "messages[0].content: expected a string, got null",
        ),
        (
            {
                "dataset": "d",
                "id": "x",
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": " \n"},
                ],
            },
            "empty assistant turn",
            "messages[1]: empty assistant turn",
        ),
        (
            {"dataset": "d", "id": "x", "messages": [{"role": "user", "content": "q"}]},
            "no assistant turn",
            "no assistant turn",
        ),
        (
            {"dataset": "d", "id": "x", "messages": [{"role": "assistant", "content": "\ud800"}]},
            "not UTF-8",
            "unpaired surrogate",
        ),
        (
            {"dataset": "d", "id": "x\ud83d", "messages": [{"role": "assistant", "content": "a"}]},
            "not UTF-8",
            "field 'id': contains an unpaired surrogate",
        ),
    ],
)
def test_check_record_names_the_problem(value, kind, fragment):
    with pytest.raises(BadRecord) as info:
        check_record(value, "f.jsonl:7")
    assert info.value.kind == kind
    assert str(info.value).startswith("f.jsonl:7: ")
    assert fragment in str(info.value)


def test_check_record_keeps_extra_fields():
    record = dict(GOOD, source_url="https://example.org")
    assert check_record(record, "here") == record


def test_bad_input_raises_by_default_and_counts_when_skipping():
    error = BadRecord("f:1", "wrong type", "field 'x'")
    with pytest.raises(BadRecord):
        BadInput()(error)
    bad = BadInput(skip_bad=True)
    for line in range(1, 6):
        bad(BadRecord(f"f:{line}", "wrong type"))
    bad(BadRecord("f:9", "unknown role"))
    assert bad.counts == {"wrong type": 5, "unknown role": 1}
    assert bad.total == 6
    assert bad.summary_lines()[0] == "5 skipped: wrong type (e.g. f:1, f:2, f:3)"
    assert bad.errors == []  # only `collect` keeps every error


def test_conversion_report_lists_everything_that_did_not_come_out():
    report = ConversionReport(bad=BadInput(skip_bad=True))
    report.read, report.written = 10, 7
    report.drop("system turn", 2)
    report.bad(BadRecord("f:3", "missing field"))
    assert report.summary_lines() == [
        "7 records written from 10 read",
        "2 dropped: system turn",
        "1 skipped: missing field (e.g. f:3)",
    ]


def test_jsonl_reader_reports_each_bad_line_and_goes_on(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"a": 1}\n'
        b"\n"
        b'{"a": \n'  # truncated
        b"\xff\xfe not utf-8\n"
        b"[1, 2] trailing\n"  # invalid JSON
        b'{"a": 2}\n'
    )
    bad = BadInput(collect=True)
    items = list(iter_jsonl(path, bad))
    assert items == [(f"{path}:1", {"a": 1}), (f"{path}:6", {"a": 2})]
    assert [(e.where, e.kind) for e in bad.errors] == [
        (f"{path}:3", "truncated JSON"),
        (f"{path}:4", "not UTF-8"),
        (f"{path}:5", "invalid JSON"),
    ]


def test_json_array_reader_gives_the_line_of_each_element(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"x": 1},\n  {"x":\n    2},\n\n  {"x": "é"}\n]\n', encoding="utf-8")
    items = list(iter_json_array(path, BadInput()))
    assert items == [(f"{path}:2", {"x": 1}), (f"{path}:3", {"x": 2}), (f"{path}:6", {"x": "é"})]


def test_json_array_reader_locates_elements_sharing_a_line_by_column_and_index(tmp_path):
    # A minified array is one line: every element was "file:1", useless for record 5000.
    path = tmp_path / "a.json"
    path.write_text('[{"x": "é"},{"x": 2}, {"x": 3},\n {"x": 4}, "five"]', encoding="utf-8")
    items = list(iter_json_array(path, BadInput()))
    assert [where for where, _ in items] == [
        f"{path}:1",  # the first element of its line: the line finds it
        f"{path}:1:13 (array index 1)",  # columns count characters ("é" is one)
        f"{path}:1:23 (array index 2)",
        f"{path}:2",
        f"{path}:2:12 (array index 4)",
    ]


def test_json_array_reader_truncated_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"x": 1},\n {"x": 2},\n {"x": ', encoding="utf-8")
    with pytest.raises(BadRecord, match=r"a\.json:3: truncated JSON"):
        list(iter_json_array(path, BadInput()))
    bad = BadInput(skip_bad=True)
    assert [v for _, v in iter_json_array(path, bad)] == [{"x": 1}, {"x": 2}]
    assert bad.counts == {"truncated JSON": 1}


def test_json_array_reader_skips_only_an_element_with_a_raw_control_character(tmp_path):
    # A literal tab inside a string breaks that element only, as it breaks one JSON Lines line;
    # the elements after it are still read, so the bad count is the real loss.
    path = tmp_path / "a.json"
    path.write_text('[{"x": "ok"},\n{"x": "a\tb"},\n{"x": "fine"},\n{"x": "c\x00"}]', "utf-8")
    with pytest.raises(BadRecord, match=r"a\.json:2: invalid JSON \(Invalid control character"):
        list(iter_json_array(path, BadInput()))
    bad = BadInput(skip_bad=True)
    items = list(iter_json_array(path, bad))
    assert [(where.rsplit(":", 1)[1], v["x"]) for where, v in items] == [("1", "ok"), ("3", "fine")]
    assert bad.counts == {"invalid JSON": 2}
    assert bad.examples["invalid JSON"] == [f"{path}:2", f"{path}:4"]


def test_json_array_reader_skips_elements_with_bad_bytes(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[{"x": "ok"},\n{"x": "\xff"},\n{"x": "fine"}]')
    with pytest.raises(BadRecord, match=r"a\.json:2: contains bytes that are not valid UTF-8"):
        list(iter_json_array(path, BadInput()))
    bad = BadInput(skip_bad=True)
    assert [v["x"] for _, v in iter_json_array(path, bad)] == ["ok", "fine"]
    assert bad.counts == {"not UTF-8": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"x": 1}', "expected a JSON array"),
        ("", "expected a JSON array"),
    ],
)
def test_json_array_reader_rejects_non_arrays(tmp_path, text, message):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        list(iter_json_array(path, BadInput()))


def test_json_array_reader_empty_array_and_bom(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf [ ] \n")
    assert list(iter_json_array(path, BadInput())) == []


def test_jsonl_reader_skips_a_byte_order_mark_on_the_first_line_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\n\xef\xbb\xbf{"a": 3}\n')
    bad = BadInput(collect=True)
    assert list(iter_jsonl(path, bad)) == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]
    assert [(e.where, e.kind) for e in bad.errors] == [(f"{path}:3", "invalid JSON")]


def test_numbers_python_cannot_read_are_bad_json_not_a_crash(tmp_path):
    # json raises a plain ValueError (not JSONDecodeError) past int()'s 4300-digit limit.
    huge = "9" * 5000
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(f'{{"a": {huge}}}\n{{"a": 2}}\n', encoding="utf-8")
    with pytest.raises(BadRecord, match=r"d\.jsonl:1: invalid JSON \(a number longer than"):
        list(iter_jsonl(jsonl, BadInput()))
    bad = BadInput(skip_bad=True)
    assert [v for _, v in iter_jsonl(jsonl, bad)] == [{"a": 2}]
    assert bad.counts == {"invalid JSON": 1}

    array = tmp_path / "a.json"
    array.write_text(f'[{{"a": 1}},\n {{"a": {huge}}},\n {{"a": 3}}]', encoding="utf-8")
    with pytest.raises(BadRecord, match=r"a\.json:2: invalid JSON \(a number longer than"):
        list(iter_json_array(array, BadInput()))
    bad = BadInput(skip_bad=True)
    assert [v for _, v in iter_json_array(array, bad)] == [{"a": 1}]
    assert bad.counts == {"invalid JSON": 1}


def test_missing_file_and_directory_are_clear(tmp_path):
    with pytest.raises(DataError, match="cannot open"):
        list(iter_jsonl(tmp_path / "nope.jsonl", BadInput()))
    with pytest.raises(DataError, match="is a directory"):
        list(iter_jsonl(tmp_path, BadInput()))


@pytest.mark.parametrize("compress", ["gzip", "bz2", "lzma"])
def test_a_compressed_file_reads_as_the_plain_one(tmp_path, compress):
    """Releases ship compressed (OASST1's trees are .jsonl.gz): read as raw lines its bytes
    were "not valid UTF-8" by the random chunk, and --skip-bad turned it into zero records."""
    module = importlib.import_module(compress)
    records = [dict(GOOD, id=f"mine_{i}") for i in range(50)]
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    (tmp_path / "r.jsonl.z").write_bytes(module.compress(lines))
    (tmp_path / "a.json.z").write_bytes(module.compress(json.dumps(records).encode()))
    for reader, name in ((iter_jsonl, "r.jsonl.z"), (iter_records, "r.jsonl.z")):
        items = list(reader(tmp_path / name, BadInput()))
        assert [value["id"] for _, value in items] == [r["id"] for r in records]
        assert items[-1][0] == f"{tmp_path / name}:50"  # lines of the decompressed text
    assert len(list(iter_json_array(tmp_path / "a.json.z", BadInput()))) == 50


@pytest.mark.parametrize("compress", ["gzip", "bz2", "lzma"])
def test_a_truncated_compressed_file_is_named_even_when_skipping(tmp_path, compress):
    module = importlib.import_module(compress)
    lines = "".join(json.dumps(dict(GOOD, id=f"mine_{i}")) + "\n" for i in range(500))
    path = tmp_path / "r.jsonl.z"
    path.write_bytes(module.compress(lines.encode())[:-40])
    for reader in (iter_jsonl, iter_json_array, iter_records):
        with pytest.raises(DataError, match=r"r\.jsonl\.z: corrupt or truncated \w+ data"):
            list(reader(path, BadInput(skip_bad=True)))


@pytest.mark.parametrize("kind", ["zstd", "zip"])
def test_zstd_and_zip_files_are_named_as_such(tmp_path, kind):
    path = tmp_path / "r.jsonl"
    if kind == "zip":
        import zipfile

        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("r.jsonl", json.dumps(GOOD) + "\n")
    else:  # a zstd frame's magic number, then anything
        path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 32)
    for reader in (iter_jsonl, iter_json_array, iter_records):
        with pytest.raises(DataError, match=rf"r\.jsonl: is a {kind}-compressed file"):
            list(reader(path, BadInput(skip_bad=True)))


def test_iter_records_validates_jsonl(tmp_path):
    path = tmp_path / "r.jsonl"
    bad_record = dict(GOOD, messages=[{"role": "robot", "content": "x"}])
    path.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in (GOOD, bad_record, GOOD)) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(BadRecord, match=r"r\.jsonl:2: messages\[0\]\.role: unknown role 'robot'"):
        list(iter_records(path, BadInput()))
    bad = BadInput(skip_bad=True)
    assert [where for where, _ in iter_records(path, bad)] == [f"{path}:1", f"{path}:3"]
    assert bad.counts == {"unknown role": 1}


def test_iter_records_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "mix.parquet"
    rows = [GOOD, dict(GOOD, id="mine_1", messages=[{"role": "user", "content": "only"}])]
    pq.write_table(pa.Table.from_pylist(rows), path)
    bad = BadInput(skip_bad=True)
    assert [(w, r["id"]) for w, r in iter_records(path, bad)] == [(f"{path}:row 1", "mine_0")]
    assert bad.examples == {"no assistant turn": [f"{path}:row 2"]}


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "mix.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(iter_records(path, BadInput()))


def test_damaged_parquet_page_is_a_clear_error(tmp_path):
    # The footer is intact, so the file opens; the damage shows only when a page is decoded.
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "mix.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD] * 4), path, row_group_size=2)
    column = pq.ParquetFile(path).metadata.row_group(1).column(3)  # messages' content
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    middle = start + column.total_compressed_size // 2
    data[middle - 4 : middle + 4] = bytes(b ^ 0xFF for b in data[middle - 4 : middle + 4])
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"mix\.parquet: not a readable Parquet file past row"):
        list(iter_records(path, BadInput()))


def test_write_records_refuses_a_parquet_name(tmp_path):
    # It writes JSON Lines; under a .parquet name every reader would call the file corrupt.
    path = tmp_path / "mix.parquet"
    with pytest.raises(DataError, match=r"mix\.parquet: records are written as JSON Lines"):
        write_records([GOOD], path)
    assert list(tmp_path.iterdir()) == []


def test_write_records_is_atomic(tmp_path):
    path = tmp_path / "out" / "r.jsonl"
    assert write_records([GOOD, GOOD], path) == 2
    assert path.read_text(encoding="utf-8").count("Hé!") == 2

    def failing():
        yield GOOD
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_records(failing(), path)
    assert path.read_text(encoding="utf-8").count("\n") == 2  # the previous file is intact
    assert [p.name for p in path.parent.iterdir()] == ["r.jsonl"]  # no temporary left behind


@pytest.mark.parametrize(
    ("extra", "kind", "fragment"),
    [
        ({"note": "cut \ud83d"}, "not UTF-8", "field 'note': contains an unpaired surrogate"),
        ({"when": datetime.datetime(2023, 4, 12)}, "wrong type", "field 'when': cannot be written"),
        ({"blob": b"\xff"}, "wrong type", "field 'blob': cannot be written as JSON"),
    ],
)
def test_check_record_rejects_extra_fields_that_cannot_be_written(extra, kind, fragment):
    # Extra fields are written back as they are: one that JSON or UTF-8 cannot take (an escaped
    # half emoji in a JSONL line, a Parquet timestamp or binary column) passed validation and
    # then ended `convert` and `mix` with a traceback.
    with pytest.raises(BadRecord) as err:
        check_record({**GOOD, **extra}, "f.parquet:row 3")
    assert err.value.kind == kind
    assert str(err.value).startswith(f"f.parquet:row 3: {fragment}")


def test_check_record_rejects_a_message_field_that_cannot_be_written():
    messages = [{"role": "user", "content": "Hi", "name": "\udc80"}, GOOD["messages"][1]]
    with pytest.raises(BadRecord, match=r"messages\[0\]\.name: contains an unpaired surrogate"):
        check_record({**GOOD, "messages": messages}, "here")


def test_write_records_gives_the_umask_permissions(tmp_path):
    # tempfile creates 0600 files: renamed into place, a mixture was unreadable to the group.
    old = os.umask(0o022)
    try:
        write_records([GOOD], tmp_path / "r.jsonl")
    finally:
        os.umask(old)
    assert (tmp_path / "r.jsonl").stat().st_mode & 0o777 == 0o644
