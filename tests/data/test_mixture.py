"""Recipes and mixtures: strict recipe checking, sampling, de-duplication, splits, stats."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tulu.data.mixture import build_mixture, validation_path_for
from tulu.data.recipe import load_recipe
from tulu.data.records import BadRecord
from tulu.demo import corpus_text, train_tokenizer
from tulu.errors import DataError


def _record(dataset: str, index: int, text: str | None = None) -> dict:
    text = text if text is not None else f"{dataset} question {index}"
    return {
        "dataset": dataset,
        "id": f"{dataset}_{index}",
        "messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": f"answer {index} " * (1 + index % 5)},
        ],
    }


def _write(path: Path, records: list) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def two_sources(tmp_path):
    _write(tmp_path / "a.jsonl", [_record("a", i) for i in range(30)])
    _write(tmp_path / "b.jsonl", [_record("b", i) for i in range(10)])
    return tmp_path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_counts_fractions_split_and_shuffle(two_sources):
    recipe = load_recipe(
        _recipe(
            two_sources,
            "seed: 1\nvalidation: 0.25\nsources:\n"
            "  - {name: a, path: a.jsonl, count: 20}\n"
            "  - {name: b, path: b.jsonl, fraction: 0.5}\n",
        )
    )
    out = two_sources / "out" / "mix.jsonl"
    result = build_mixture(recipe, out)
    train, valid = _read(out), _read(validation_path_for(out))
    assert (result.train_count, result.validation_count) == (19, 6)
    assert len(train) == 19 and len(valid) == 6
    everything = train + valid
    assert sum(r["dataset"] == "a" for r in everything) == 20
    assert sum(r["dataset"] == "b" for r in everything) == 5
    assert len({r["id"] for r in everything}) == 25
    # shuffled: the two sources interleave rather than coming in blocks
    datasets = [r["dataset"] for r in train]
    assert datasets != sorted(datasets) and datasets != sorted(datasets, reverse=True)
    stats = {s.name: s for s in result.sources}
    assert (stats["a"].available, stats["a"].selected) == (30, 20)
    assert stats["b"].train + stats["b"].validation == 5


def test_same_seed_same_mixture_other_seed_differs(two_sources):
    text = (
        "seed: {seed}\nsources:\n  - {{name: a, path: a.jsonl, count: 12}}\n  - {{path: b.jsonl}}\n"
    )
    outputs = []
    for seed in (3, 3, 4):
        recipe = load_recipe(_recipe(two_sources, text.format(seed=seed)))
        out = two_sources / f"mix-{len(outputs)}.jsonl"
        build_mixture(recipe, out)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_dedup_by_content_and_id_and_renaming_across_files(tmp_path):
    _write(tmp_path / "a.jsonl", [_record("a", 0), _record("a", 1), _record("a", 0)])
    # same ids as a.jsonl's records but different content: a different file numbers from 0 too
    _write(tmp_path / "b.jsonl", [_record("a", 0, "other text"), dict(_record("a", 1), id="a_5")])
    recipe = load_recipe(
        _recipe(
            tmp_path,
            "sources:\n  - {name: first, path: a.jsonl}\n  - {name: second, path: b.jsonl}\n",
        )
    )
    result = build_mixture(recipe, tmp_path / "mix.jsonl")
    ids = sorted(r["id"] for r in _read(tmp_path / "mix.jsonl"))
    # a_0 repeated in a.jsonl -> duplicate; b's a_0 renamed; b's a_5 repeats a_1's messages
    assert ids == ["a_0", "a_0@b", "a_1"]
    stats = {s.name: s for s in result.sources}
    assert stats["first"].duplicates == 1
    assert stats["second"].duplicates == 1
    assert any("made unique as id@file" in note for note in result.notes)


def test_files_sharing_a_stem_keep_distinct_ids(tmp_path):
    # a/x.jsonl, b/x.jsonl and c/x.jsonl all number from a_0: the third one's a_0 must not
    # take the second one's renamed id (and be dropped as its duplicate).
    for folder in "abc":
        (tmp_path / folder).mkdir()
        _write(tmp_path / folder / "x.jsonl", [_record("a", 0, f"text from {folder}")])
    recipe = load_recipe(
        _recipe(tmp_path, "sources:\n  - {name: x, path: [a/x.jsonl, b/x.jsonl, c/x.jsonl]}\n")
    )
    result = build_mixture(recipe, tmp_path / "mix.jsonl")
    records = _read(tmp_path / "mix.jsonl")
    assert sorted(r["id"] for r in records) == ["a_0", "a_0@x", "a_0@x.2"]
    assert result.sources[0].duplicates == 0


def test_dedup_can_be_turned_off(tmp_path):
    _write(tmp_path / "a.jsonl", [_record("a", 0)] * 3)
    recipe = load_recipe(_recipe(tmp_path, "dedup: []\nsources:\n  - {path: a.jsonl}\n"))
    assert build_mixture(recipe, tmp_path / "mix.jsonl").train_count == 3


def test_short_source_is_reported_not_padded(two_sources):
    recipe = load_recipe(
        _recipe(two_sources, "sources:\n  - {name: b, path: b.jsonl, count: 50}\n")
    )
    result = build_mixture(recipe, two_sources / "mix.jsonl")
    assert result.train_count == 10
    assert result.notes == [
        "b: the recipe asks for 50 records but only 10 unique ones were converted; all of them are used"
    ]


def test_validation_count_and_explicit_output(two_sources):
    recipe = load_recipe(_recipe(two_sources, "validation: 4\nsources:\n  - {path: b.jsonl}\n"))
    result = build_mixture(
        recipe, two_sources / "t.jsonl", validation_output=two_sources / "v.jsonl"
    )
    assert len(_read(two_sources / "v.jsonl")) == 4
    assert result.validation_path == two_sources / "v.jsonl"


def test_token_statistics_and_histogram(two_sources):
    tokenizer = train_tokenizer(corpus_text())
    recipe = load_recipe(
        _recipe(
            two_sources, "max_seq_length: 12\nsources:\n  - {path: a.jsonl}\n  - {path: b.jsonl}\n"
        )
    )
    result = build_mixture(recipe, two_sources / "mix.jsonl", tokenizer=tokenizer)
    from tulu.chat import render

    expected = {"a": 0, "b": 0}
    truncated = {"a": 0, "b": 0}
    for record in _read(two_sources / "mix.jsonl"):
        n = len(tokenizer.encode(render(record["messages"], tokenizer.eos_token)))
        expected[record["dataset"]] += n
        truncated[record["dataset"]] += n > 12
    stats = {s.name: s for s in result.sources}
    assert {name: stats[name].tokens for name in ("a", "b")} == {
        "a": expected["a"],
        "b": expected["b"],
    }
    assert stats["a"].truncated == truncated["a"] and truncated["a"] > 0
    assert stats["a"].turns == 60
    pytest.importorskip("matplotlib")
    from tulu.data.stats import save_histogram

    png = save_histogram(result.lengths, two_sources / "lengths.png", 12)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_records_stop_the_mixture_unless_skipped(tmp_path):
    records = [
        _record("a", 0),
        {"dataset": "a", "id": "x", "messages": [{"role": "user", "content": "q"}]},
    ]
    _write(tmp_path / "a.jsonl", records)
    recipe = load_recipe(_recipe(tmp_path, "sources:\n  - {path: a.jsonl}\n"))
    with pytest.raises(BadRecord, match=r"a\.jsonl:2: no assistant turn"):
        build_mixture(recipe, tmp_path / "mix.jsonl")
    assert not (tmp_path / "mix.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl", "recipe.yaml"]  # no spool left
    result = build_mixture(recipe, tmp_path / "mix.jsonl", skip_bad=True)
    assert result.train_count == 1
    assert result.sources[0].bad_reasons == {"no assistant turn": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sources: []\n", "sources: expected a non-empty list"),
        ("sorces: []\n", "unknown key(s) 'sorces' (valid: seed, validation"),
        ("sources:\n  - {path: a.jsonl, cout: 3}\n", "sources[0]: unknown key(s) 'cout'"),
        ("sources:\n  - {source: dolli, path: a.jsonl}\n", "unknown source 'dolli'"),
        ("sources:\n  - {name: x}\n", "sources[0]: missing key 'path'"),
        ("sources:\n  - {path: a.jsonl, count: -1}\n", "count: expected a non-negative integer"),
        ("sources:\n  - {path: a.jsonl, fraction: 2}\n", "fraction: expected a number from 0 to 1"),
        ("sources:\n  - {path: a.jsonl, count: 1, fraction: 0.5}\n", "either count or fraction"),
        ("sources:\n  - {path: a.jsonl, options: {seed: 1}}\n", "options: unknown key(s) 'seed'"),
        ("sources:\n  - {path: a.jsonl}\n  - {path: x/a.jsonl}\n", "'a' used more than once"),
        ("seed: x\nsources:\n  - {path: a.jsonl}\n", "seed: expected an integer"),
        ("validation: 1.5\nsources:\n  - {path: a.jsonl}\n", "validation: expected a fraction"),
        ("validation: .nan\nsources:\n  - {path: a.jsonl}\n", "validation: expected a fraction"),
        ("dedup: [ids]\nsources:\n  - {path: a.jsonl}\n", "dedup: expected a list"),
        ("sources: [\n", "recipe.yaml:2: invalid YAML"),
        ("- 1\n", "expected a mapping with a 'sources' list"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(DataError) as info:
        load_recipe(_recipe(tmp_path, text))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: 2023-13-45\n", "invalid YAML (month must be in 1..12)"),
        ("seed: " + "9" * 5000 + "\n", "invalid YAML ("),
        ("sources: " + "[" * 5000 + "]" * 5000 + "\n", "invalid YAML (nested too deeply)"),
    ],
    ids=["bad-date", "huge-int", "deep"],
)
def test_yaml_the_loader_rejects_is_an_error_not_a_crash(tmp_path, text, message):
    # PyYAML lets ValueError (a value its constructors refuse) and RecursionError through.
    path = _recipe(tmp_path, text)
    with pytest.raises(DataError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_output_that_is_a_directory_fails_before_writing_anything(two_sources):
    recipe = load_recipe(_recipe(two_sources, "validation: 4\nsources:\n  - {path: b.jsonl}\n"))
    (two_sources / "out").mkdir()
    before = sorted(p.name for p in two_sources.iterdir())
    with pytest.raises(DataError, match=r"out: is a directory, expected an output file name"):
        build_mixture(recipe, two_sources / "out")
    with pytest.raises(DataError, match=r"mix\.parquet: records are written as JSON Lines"):
        build_mixture(
            recipe, two_sources / "mix.jsonl", validation_output=two_sources / "mix.parquet"
        )
    assert sorted(p.name for p in two_sources.iterdir()) == before  # no validation split left


def test_missing_input_file_is_named(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "sources:\n  - {path: nowhere.jsonl}\n"))
    with pytest.raises(
        DataError, match=r"nowhere\.jsonl: no such file \(input of source 'records'\)"
    ):
        build_mixture(recipe, tmp_path / "mix.jsonl")


@pytest.mark.parametrize(
    ("source", "sample", "options", "message"),
    [
        (
            "dolly",
            "databricks-dolly-15k.jsonl",
            "{seed: abc}",
            "option 'seed': expected an integer",
        ),
        ("oasst1", "2023-04-12_oasst_ready.trees.jsonl", "{top_k: -1}", "option top_k must be"),
    ],
)
def test_a_bad_converter_option_names_the_recipe_and_source(
    tmp_path, source, sample, options, message
):
    """Converters check option values when they start; the error says where in the recipe."""
    path = Path(__file__).resolve().parents[2] / "src/tulu/data/samples" / sample
    text = f"sources:\n  - {{name: mine, source: {source}, path: {path}, options: {options}}}\n"
    recipe = load_recipe(_recipe(tmp_path, text))
    with pytest.raises(DataError) as info:
        build_mixture(recipe, tmp_path / "mix.jsonl")
    assert str(info.value).startswith(f"{tmp_path / 'recipe.yaml'}: sources[0] (mine).options: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("tok", "{base}/tok"),  # a path, relative to the recipe's folder like the data files
        ("org/tok", "{base}/org/tok"),  # an existing path wins over the hub id it resembles
        ("EleutherAI/pythia-6.9b", "EleutherAI/pythia-6.9b"),  # no such path: a hub id
        ("missing/tokenizer.json", "{base}/missing/tokenizer.json"),  # reads as a file
    ],
)
def test_recipe_tokenizer_path_or_hub_id(tmp_path, written, expected):
    (tmp_path / "tok").mkdir()
    (tmp_path / "org" / "tok").mkdir(parents=True)
    recipe = load_recipe(
        _recipe(tmp_path, f"tokenizer: {written}\nsources:\n  - {{path: a.jsonl}}\n")
    )
    assert str(recipe.tokenizer) == expected.format(base=tmp_path)


def test_file_options_resolve_like_the_data_files(tmp_path):
    # They resolved against the working directory: a recipe naming its own templates file
    # worked only when run from the recipe's folder.
    (tmp_path / "tok").mkdir()
    recipe = load_recipe(
        _recipe(
            tmp_path,
            "sources:\n"
            "  - {source: dolly, path: d.jsonl, options: {templates: t.json}}\n"
            "  - {source: sharegpt, path: s.json, options: {tokenizer: tok}}\n"
            "  - {source: sharegpt, path: h.json, options: {tokenizer: EleutherAI/pythia-70m}}\n",
        )
    )
    options = [spec.options for spec in recipe.sources]
    assert options == [
        {"templates": str(tmp_path / "t.json")},
        {"tokenizer": str(tmp_path / "tok")},
        {"tokenizer": "EleutherAI/pythia-70m"},  # no such path: a hub id, kept as written
    ]


def test_data_dir_overrides_the_recipe_folder(tmp_path, two_sources):
    recipe_dir = tmp_path / "elsewhere"
    recipe_dir.mkdir()
    recipe = load_recipe(
        _recipe(recipe_dir, "sources:\n  - {path: b.jsonl}\n"), data_dir=two_sources
    )
    assert recipe.sources[0].paths == (two_sources / "b.jsonl",)


def test_shipped_tulu_v1_recipe_sizes():
    root = Path(__file__).resolve().parents[2]
    recipe = load_recipe(root / "configs/data/tulu-v1.yaml")
    counts = {}
    for spec in recipe.sources:
        key = "cot" if spec.source == "cot" else spec.source
        counts[key] = counts.get(key, 0) + spec.count
    assert counts == {
        "flan_v2": 100_000,
        "cot": 100_000,
        "dolly": 15_011,
        "oasst1": 34_795,
        "gpt4_alpaca": 52_002,
        "code_alpaca": 20_022,
        "sharegpt": 168_864,
    }
    assert sum(counts.values()) == 490_694


def test_bundled_samples_mix_all_seven_sources(tmp_path):
    samples = Path(__file__).resolve().parents[2] / "src/tulu/data/samples"
    tokenizer = train_tokenizer(corpus_text())
    tokenizer.save(tmp_path / "tok")
    recipe = load_recipe(samples / "mixture.yaml")
    recipe = dataclasses.replace(recipe, tokenizer=tmp_path / "tok")
    result = build_mixture(recipe, tmp_path / "mix.jsonl")
    records = _read(tmp_path / "mix.jsonl") + _read(validation_path_for(tmp_path / "mix.jsonl"))
    datasets = {r["dataset"] for r in records}
    assert datasets == {
        "flan_v2",
        "cot",
        "dolly",
        "oasst1",
        "gpt4_alpaca",
        "code_alpaca",
        "sharegpt",
    }
    assert len(records) == result.train_count + result.validation_count
    assert len({r["id"] for r in records}) == len(records)
    assert all(s.bad == 0 for s in result.sources)
    assert {s.name: s.selected for s in result.sources}["dolly"] == 20
