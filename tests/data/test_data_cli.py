"""`tulu data ...` from the command line: exit codes, messages, files written."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tulu.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "src/tulu/data/samples"

GOOD = {
    "dataset": "mine",
    "id": "mine_0",
    "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
}


def _lines(*values) -> str:
    return "".join((v if isinstance(v, str) else json.dumps(v)) + "\n" for v in values)


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tokenizer, saved once for the module: training it is the slow part of these
    tests, and none of them changes it."""
    from tulu.demo import corpus_text, train_tokenizer

    directory = tmp_path_factory.mktemp("demo") / "tok"
    train_tokenizer(corpus_text()).save(directory)
    return directory


def _tokenize_argv(records: Path, tokenizer: Path, cache: Path, *extra: str) -> list[str]:
    """`tulu data tokenize` of `records` on one worker (no process pool to start) into its own
    `cache`, so that no test sees another's cache hits."""
    return [
        "data",
        "tokenize",
        str(records),
        "--tokenizer",
        str(tokenizer),
        "--workers",
        "1",
        "--cache-dir",
        str(cache),
        *extra,
    ]


def test_validate_reports_every_bad_line(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(
        _lines(
            GOOD,
            "{not json",
            dict(GOOD, messages=[{"role": "bot", "content": "x"}]),
            GOOD,
            dict(GOOD, id=7),
        ),
        encoding="utf-8",
    )
    assert main(["data", "validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{path}:3: messages[0].role: unknown role 'bot' (expected one of system, user, assistant)",
        f"{path}:5: field 'id': expected a string, got int",
    ]
    assert f"{path}: 2 valid records, 3 bad" in err


def test_validate_passes_good_files(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(_lines(GOOD, GOOD), encoding="utf-8")
    assert main(["data", "validate", str(path)]) == 0
    assert "2 valid records, ok" in capsys.readouterr().err


def test_validate_reports_an_unreadable_file_and_goes_on(tmp_path, capsys):
    good = tmp_path / "r.jsonl"
    good.write_text(_lines(GOOD, "{not json"), encoding="utf-8")
    missing = tmp_path / "nope.jsonl"
    assert main(["data", "validate", str(missing), str(tmp_path), str(good)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{missing}: cannot open (No such file or directory)",
        f"{tmp_path}: is a directory, expected a file",
        f"{good}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
    ]
    assert f"{missing}: 0 valid records, unreadable" in err
    assert f"{good}: 1 valid records, 1 bad" in err


def test_convert_records_and_option_checks(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(_lines(GOOD, "[1]", GOOD), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["data", "convert", "--source", "records", "--input", str(source), "--output", str(out)]
    assert main(args) == 1
    assert (
        f"tulu data convert: error: {source}:2: expected a JSON object, got list"
        in capsys.readouterr().err
    )
    assert not out.exists()
    assert main([*args, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "2 records written from 3 read" in err and "1 skipped: not a JSON object" in err
    assert len(out.read_text().splitlines()) == 2
    assert main([*args, "--top-k", "2"]) == 1
    assert "--top-k does not apply to source 'records'" in capsys.readouterr().err


def test_convert_several_inputs_keeps_ids_unique(tmp_path, capsys):
    # Positional ids restart in every file (cot_0, ...); left as is, a later mix would drop the
    # second file's records as duplicates of the first's.
    files = []
    for name, texts in (("zs", ["a", "b"]), ("fs", ["c", "d", "e"])):
        files += ["--input", str(tmp_path / f"{name}.jsonl")]
        (tmp_path / f"{name}.jsonl").write_text(
            _lines(*({"inputs": f"q{t}", "targets": t} for t in texts)), encoding="utf-8"
        )
    out = tmp_path / "cot.jsonl"
    assert main(["data", "convert", "--source", "cot", *files, "--output", str(out)]) == 0
    assert "2 ids also used by an earlier input file" in capsys.readouterr().err
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == ["cot_0", "cot_1", "cot_0@fs", "cot_1@fs", "cot_2"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sources:\n  - {path: cot.jsonl}\n")
    assert main(["data", "mix", str(recipe), "--output", str(tmp_path / "mix.jsonl")]) == 0
    assert "5 train + 0 validation records" in capsys.readouterr().err


def test_convert_inputs_sharing_a_stem_get_distinct_ids(tmp_path, capsys):
    files = []
    for folder in "abc":
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cot.jsonl").write_text(
            _lines({"inputs": f"q{folder}", "targets": folder}), encoding="utf-8"
        )
        files += ["--input", str(tmp_path / folder / "cot.jsonl")]
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", "--source", "cot", *files, "--output", str(out)]) == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == ["cot_0", "cot_0@cot", "cot_0@cot.2"]


def test_convert_unknown_source(tmp_path, capsys):
    code = main(
        ["data", "convert", "--source", "nope", "--input", "x", "--output", str(tmp_path / "o")]
    )
    assert code == 1
    assert "unknown source 'nope' (known: records, flan_v2" in capsys.readouterr().err


def test_mix_writes_splits_stats_and_histogram(tmp_path, capsys, demo_tokenizer_dir):
    pytest.importorskip("matplotlib")
    records = [
        dict(
            GOOD,
            id=f"mine_{i}",
            messages=[
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ],
        )
        for i in range(20)
    ]
    (tmp_path / "mine.jsonl").write_text(_lines(*records), encoding="utf-8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("validation: 0.2\nsources:\n  - {name: mine, path: mine.jsonl}\n")
    out = tmp_path / "out" / "mix.jsonl"
    code = main(
        ["data", "mix", str(recipe), "--output", str(out), "--tokenizer", str(demo_tokenizer_dir)]
    )
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "16 train + 4 validation records" in err
    stats = json.loads((tmp_path / "out" / "mix.stats.json").read_text())
    assert stats["total"]["selected"] == 20 and stats["total"]["tokens"] > 0
    assert (tmp_path / "out" / "mix.validation.jsonl").is_file()
    assert (tmp_path / "out" / "mix.lengths.png").read_bytes()[:4] == b"\x89PNG"

    # Mixed again without a validation split and without the plot: the earlier run's files
    # stay (they may be the user's) but are named, since the old split may hold records the
    # new mixture trains on.
    recipe.write_text("validation: 0\nsources:\n  - {name: mine, path: mine.jsonl}\n")
    assert main(["data", "mix", str(recipe), "--output", str(out), "--no-plot"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    for name in ("mix.validation.jsonl", "mix.lengths.png"):
        assert f"note: {tmp_path / 'out' / name} is left from an earlier run" in err
        assert (tmp_path / "out" / name).is_file()
    stats = json.loads((tmp_path / "out" / "mix.stats.json").read_text())
    assert stats["validation"] is None and len(stats["notes"]) == 2


def test_mix_recipe_error_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sources:\n  - {path: a.jsonl, cuont: 1}\n")
    assert main(["data", "mix", str(recipe), "--output", str(tmp_path / "m.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tulu data mix: error: ") and "unknown key(s) 'cuont'" in err
    assert "\n" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--validation-output", "{out}/mix.jsonl"], "would overwrite --output"),
        (["--validation-output", "{out}/mix.stats.json"], "the statistics would overwrite"),
        (["--validation-output", "{out}/sub/../mix.lengths.png"], "the histogram would overwrite"),
    ],
)
def test_mix_refuses_two_outputs_at_one_path(tmp_path, capsys, extra, message):
    # Otherwise the later write silently replaces the earlier file (validation split lost).
    (tmp_path / "mine.jsonl").write_text(
        _lines(*(dict(GOOD, id=f"mine_{i}") for i in range(10))), encoding="utf-8"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("validation: 0.5\ndedup: [id]\nsources:\n  - {path: mine.jsonl}\n")
    out = tmp_path / "out"
    args = [a.format(out=out) for a in extra]
    assert main(["data", "mix", str(recipe), "--output", str(out / "mix.jsonl"), *args]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys, link):
    # The output replaced the release it was converted from once conversion ended.
    raw = tmp_path / "dolly.jsonl"
    shutil.copy(SAMPLES / "databricks-dolly-15k.jsonl", raw)
    before = raw.read_bytes()
    out = raw if link == "same" else tmp_path / "out.jsonl"
    if link == "symlink":
        out.symlink_to(raw)
    elif link == "hardlink":
        out.hardlink_to(raw)
    args = ["data", "convert", "--source", "dolly", "--input", str(raw), "--output", str(out)]
    assert main(args) == 1
    assert f"{out}: --output would overwrite the input {raw}" in capsys.readouterr().err
    assert raw.read_bytes() == before


def test_convert_input_in_a_symlink_loop_is_one_line(tmp_path, capsys):
    # The check that the output is not an input raised pathlib's RuntimeError on the loop.
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    args = ["data", "convert", "--source", "dolly", "--input", str(loop)]
    assert main([*args, "--output", str(tmp_path / "out.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{loop}: no such file (input of source 'dolly')" in err


def test_convert_refuses_a_pipe_as_output(tmp_path, capsys):
    # The records were renamed over the named pipe (over /dev/null, as root, the device).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    raw = str(SAMPLES / "databricks-dolly-15k.jsonl")
    assert (
        main(["data", "convert", "--source", "dolly", "--input", raw, "--output", str(fifo)]) == 1
    )
    assert f"{fifo}: not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(fifo.stat().st_mode)


@pytest.mark.parametrize("flag", ["--output", "--validation-output"])
def test_mix_refuses_to_overwrite_an_input(tmp_path, capsys, flag):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(_lines(*(dict(GOOD, id=f"mine_{i}") for i in range(4))), encoding="utf-8")
    before = mine.read_bytes()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("validation: 0.5\nsources:\n  - {path: mine.jsonl}\n")
    outputs = {"--output": str(tmp_path / "mix.jsonl"), flag: str(mine)}
    args = [item for pair in outputs.items() for item in pair]
    assert main(["data", "mix", str(recipe), *args, "--no-plot"]) == 1
    assert f"{mine}: {flag} would overwrite the input {mine}" in capsys.readouterr().err
    assert mine.read_bytes() == before


def test_convert_parquet_with_a_column_json_cannot_hold(tmp_path, capsys):
    # A timestamp column ended the conversion with a TypeError traceback.
    pa = pytest.importorskip("pyarrow")
    import datetime

    import pyarrow.parquet as pq

    path = tmp_path / "mine.parquet"
    table = pa.table(
        {**{k: [v] for k, v in GOOD.items()}, "when": [datetime.datetime(2023, 4, 12)]}
    )
    pq.write_table(table, path)
    out = tmp_path / "out.jsonl"
    args = ["data", "convert", "--source", "records", "--input", str(path), "--output", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tulu data convert: error: {path}:row 1: field 'when': cannot be")
    assert "\n" not in err and not out.exists()


def test_sources_lists_every_converter(capsys):
    assert main(["data", "sources"]) == 0
    out = capsys.readouterr().out
    from tulu.data.sources import SOURCES

    for name in SOURCES:
        assert name in out


def test_tokenize_reports_counts_and_batching(tmp_path, capsys, demo_tokenizer_dir):
    records = [
        dict(
            GOOD,
            id=f"mine_{i}",
            messages=[
                {"role": "user", "content": "word " * (i % 3 + 1)},
                {"role": "assistant", "content": "reply " * (i + 1)},
            ],
        )
        for i in range(12)
    ]
    path = tmp_path / "mix.jsonl"
    path.write_text(_lines(*records), encoding="utf-8")
    extra = ("--max-seq-length", "40", "--batch-size", "4")
    args = _tokenize_argv(path, demo_tokenizer_dir, tmp_path / "cache", *extra)
    assert main(args) == 0
    out, err = capsys.readouterr()
    directory = Path(out.strip())
    assert directory.parent == tmp_path / "cache" and (directory / "meta.json").is_file()
    assert (
        "tokenized: " in err
        and "12 examples" in err
        and "0 truncated" not in err
        and "truncated at 40" in err
    )
    for mode in ("padding-random", "padding-sorted", "packing"):
        assert mode in err
    assert main(args) == 0
    assert "cache hit: " in capsys.readouterr().err


@pytest.mark.parametrize("case", ["negative seed", "output a dangling link"])
def test_tokenize_bad_settings_are_one_line(tmp_path, capsys, case, demo_tokenizer_dir):
    # Both were tracebacks: numpy's ValueError after the work, os.rename's NotADirectoryError.
    records = tmp_path / "r.jsonl"
    records.write_text(_lines(GOOD), encoding="utf-8")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    extra = ["--seed", "-1"] if case == "negative seed" else ["--output", str(link)]
    assert main(_tokenize_argv(records, demo_tokenizer_dir, tmp_path / "c", *extra)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    expected = "--seed: expected a non-negative integer, got -1"
    assert (
        expected if case == "negative seed" else f"{link}: exists and is not a directory"
    ) in err
    assert link.is_symlink()


def test_tokenize_bad_record_is_one_line(tmp_path, capsys, demo_tokenizer_dir):
    path = tmp_path / "mix.jsonl"
    path.write_text(_lines(GOOD, dict(GOOD, messages=[])), encoding="utf-8")
    assert main(_tokenize_argv(path, demo_tokenizer_dir, tmp_path / "cache")) == 1
    err = capsys.readouterr().err
    assert f"tulu data tokenize: error: {path}:2: field 'messages' is empty" in err


def test_byte_order_mark_is_read_by_validate_and_tokenize(tmp_path, capsys, demo_tokenizer_dir):
    path = tmp_path / "excel.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _lines(GOOD, GOOD).replace("\n", "\r\n").encode())
    assert main(["data", "validate", str(path)]) == 0
    assert "2 valid records, ok" in capsys.readouterr().err
    assert main(_tokenize_argv(path, demo_tokenizer_dir, tmp_path / "cache")) == 0
    assert "2 examples" in capsys.readouterr().err


# ------------------------------------------------------------------------ hub ids for --tokenizer


def _tulu(*argv: str | Path, env: dict[str, str]) -> subprocess.Popen:
    """`tulu ...` in a subprocess: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when it
    is imported. `tulu data` imports no torch, so these start in a fraction of a second."""
    script = Path(sys.executable).with_name("tulu")
    found = str(script) if script.is_file() else shutil.which("tulu")
    assert found, "the `tulu` console script is not installed (pip install -e .)"
    return subprocess.Popen(
        [found, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_tokenizer_hub_ids_from_an_offline_cache(tmp_path, offline_hub, demo_tokenizer_dir):
    """`--tokenizer EleutherAI/pythia-6.9b` (and a recipe's `tokenizer:`) resolve through the HF
    cache as `tulu chat MODEL` does; the result equals the local directory's."""
    hub_id = "EleutherAI/pythia-6.9b"
    snapshot = offline_hub.add(hub_id, demo_tokenizer_dir)
    records = tmp_path / "records.jsonl"
    records.write_text(_lines(*(dict(GOOD, id=f"mine_{i}") for i in range(5))), encoding="utf-8")
    sharegpt = SAMPLES / "sharegpt_html_cleaned.json"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"tokenizer: {hub_id}\nsources:\n  - {{name: mine, path: {records}}}\n"
        f"  - {{name: sharegpt, source: sharegpt, path: {sharegpt}}}\n"
    )
    tokenize = ["data", "tokenize", records, "--workers", "1", "--cache-dir"]
    convert = ["data", "convert", "--source", "sharegpt", "--input", sharegpt, "--output"]
    commands = {
        "tokenize": [*tokenize, tmp_path / "cache", "--tokenizer", hub_id],
        "tokenize-local": [*tokenize, tmp_path / "cache-local", "--tokenizer", demo_tokenizer_dir],
        "convert": [*convert, tmp_path / "hub.jsonl", "--tokenizer", hub_id],
        "convert-local": [*convert, tmp_path / "local.jsonl", "--tokenizer", demo_tokenizer_dir],
        "mix": ["data", "mix", recipe, "--output", tmp_path / "mix.jsonl", "--no-plot"],
    }
    procs = {name: _tulu(*argv, env=offline_hub.env) for name, argv in commands.items()}
    done = {name: _finish(proc) for name, proc in procs.items()}
    for name, (rc, _, err) in done.items():
        assert rc == 0, f"{name}: {err}"
    hub_dir = Path(done["tokenize"][1].strip())
    meta = json.loads((hub_dir / "meta.json").read_text())
    assert Path(meta["tokenizer"]["source"]).resolve() == snapshot.resolve()
    # the same tokenizer, so the same cache key as the local directory's
    assert hub_dir.name == Path(done["tokenize-local"][1].strip()).name
    converted = (tmp_path / "hub.jsonl").read_text(encoding="utf-8")
    assert converted and converted == (tmp_path / "local.jsonl").read_text(encoding="utf-8")
    stats = json.loads((tmp_path / "mix.stats.json").read_text())
    assert stats["total"]["tokens"] > 0
    assert {s["name"]: s["selected"] for s in stats["sources"]}["sharegpt"] > 0


def test_unknown_tokenizer_hub_id_offline_is_one_line(tmp_path, offline_hub):
    records = tmp_path / "records.jsonl"
    records.write_text(_lines(GOOD), encoding="utf-8")
    missing = "EleutherAI/not-cached"
    sharegpt = SAMPLES / "sharegpt_html_cleaned.json"
    commands = {
        "data tokenize": ["data", "tokenize", records, "--tokenizer", missing],
        "data convert": ["data", "convert", "--source", "sharegpt", "--input", sharegpt]
        + ["--output", tmp_path / "o.jsonl", "--tokenizer", missing],
    }
    procs = {name: _tulu(*argv, env=offline_hub.env) for name, argv in commands.items()}
    for command, proc in procs.items():
        rc, out, err = _finish(proc)
        assert rc == 1 and out == "", err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"tulu {command}: error: ")
        assert (
            f"{missing}: not found in the Hugging Face cache and could not be downloaded "
            "(HF_HUB_OFFLINE is set)"
        ) in err
