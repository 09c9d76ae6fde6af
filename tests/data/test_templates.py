"""Prompt templates: the shipped default set, template-file checks, and the selection rule."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tulu.data.templates import (
    Template,
    TemplateSet,
    default_templates,
    encode_instruction,
    load_templates,
    make_rng,
)
from tulu.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
PAPER_TEMPLATES = SHARED / "recipes" / "instruction_templates.json"


@pytest.fixture
def paper_templates_path() -> Path:
    if not PAPER_TEMPLATES.is_file():
        pytest.skip(f"the paper's template set is absent ({PAPER_TEMPLATES})")
    return PAPER_TEMPLATES


def _one(prompt: str, prompt_without: str = "W: {instruction}") -> TemplateSet:
    return TemplateSet(
        (Template(prompt, "{output}", 1.0),), (Template(prompt_without, "{output}", 1.0),)
    )


# --- the shipped default set -------------------------------------------------------------


def test_default_set_shape() -> None:
    templates = default_templates()
    for entries in (templates.with_input, templates.without_input):
        assert 8 <= len(entries) <= 12
        assert math.isclose(sum(t.weight for t in entries), 1.0)
        assert len({t.prompt for t in entries}) == len(entries)
        assert all("{instruction}" in t.prompt and "{output}" in t.completion for t in entries)
    assert all("{input}" in t.prompt for t in templates.with_input)
    assert not any("{input}" in t.prompt for t in templates.without_input)


def _wording(prompt: str) -> str:
    """A prompt's words, with placeholders and layout whitespace removed."""
    text = prompt.replace("{instruction}", " ").replace("{input}", " ")
    return " ".join(text.split())


def test_default_set_is_our_own(paper_templates_path: Path) -> None:
    """No phrasing of the default set is taken from the paper's (bare layouts aside)."""
    paper = json.loads(paper_templates_path.read_text(encoding="utf-8"))
    theirs = {
        _wording(e["prompt"]) for name in ("with_input", "without_input") for e in paper[name]
    }
    ours = default_templates()
    shared = {_wording(t.prompt) for t in ours.with_input + ours.without_input} & theirs
    assert shared <= {""}


def test_default_file_loads_by_path() -> None:
    import tulu.data

    path = Path(tulu.data.__file__).parent / "templates" / "default.json"
    assert load_templates(path).with_input == default_templates().with_input


# --- encoding ----------------------------------------------------------------------------


def test_strips_and_picks_list_by_stripped_input() -> None:
    templates = _one("I: {instruction} | {input}")
    rng = make_rng(0)
    with_input = encode_instruction(templates, rng, "  Do it \n", "\n data \t", "  done\n")
    assert with_input == [
        {"role": "user", "content": "I: Do it | data"},
        {"role": "assistant", "content": "done"},
    ]
    blank_input = encode_instruction(templates, rng, "Do it", "  \n ", "done")
    assert blank_input[0]["content"] == "W: Do it"


def test_braces_in_the_data_are_not_interpreted() -> None:
    templates = _one("{instruction}\n{input}")
    messages = encode_instruction(
        templates, make_rng(1), "Fill {input} and {0}", "d = {'a': 1}", "{output} }{"
    )
    assert messages[0]["content"] == "Fill {input} and {0}\nd = {'a': 1}"
    assert messages[1]["content"] == "{output} }{"


def _picks(templates: TemplateSet, seed: int, n: int = 200) -> list[str]:
    rng = make_rng(seed)
    return [
        encode_instruction(templates, rng, "q", "ctx" if i % 3 else "", "a")[0]["content"]
        for i in range(n)
    ]


def test_choice_is_deterministic_per_seed() -> None:
    templates = default_templates()
    assert _picks(templates, 42) == _picks(templates, 42)
    assert _picks(templates, 42) != _picks(templates, 43)


def test_choice_matches_an_independent_choices_call() -> None:
    """One ``Random(seed).choices(list, weights)`` call per example, in order."""
    templates = default_templates()
    rng = random.Random(42)
    expected = []
    for i in range(300):
        entries = templates.with_input if i % 2 else templates.without_input
        pick = rng.choices(entries, weights=[t.weight for t in entries])[0]
        expected.append(pick.prompt.format(instruction="q", input="ctx"))
    rng2 = make_rng(42)
    got = [
        encode_instruction(templates, rng2, "q", "ctx" if i % 2 else "", "a")[0]["content"]
        for i in range(300)
    ]
    assert got == expected


def test_paper_selection_rule(paper_templates_path: Path) -> None:
    """The paper's set, picked as its "selection" field says: random.seed(42), then choices."""
    raw = json.loads(paper_templates_path.read_text(encoding="utf-8"))
    assert "random.seed(42)" in raw["selection"] and "strip" in raw["selection"]
    examples = [
        (f"  instruction {i} ", " some input " if i % 3 == 0 else "  ", f" answer {i}\n")
        for i in range(500)
    ]
    state = random.getstate()
    try:
        random.seed(42)
        expected = []
        for instruction, input_text, output in examples:
            if input_text.strip():
                entries = raw["with_input"]
                fields = {"instruction": instruction.strip(), "input": input_text.strip()}
            else:
                entries = raw["without_input"]
                fields = {"instruction": instruction.strip()}
            entry = random.choices(entries, weights=[e["weight"] for e in entries])[0]
            expected.append(
                [
                    {"role": "user", "content": entry["prompt"].format(**fields)},
                    {
                        "role": "assistant",
                        "content": entry["completion"].format(output=output.strip()),
                    },
                ]
            )
    finally:
        random.setstate(state)
    templates = load_templates(paper_templates_path)
    rng = make_rng(42)
    assert [encode_instruction(templates, rng, *example) for example in examples] == expected


@pytest.mark.parametrize("seed", ["42", 4.2, True, None])
def test_seed_must_be_an_int(seed: object) -> None:
    with pytest.raises(DataError, match="option 'seed': expected an integer"):
        make_rng(seed)  # type: ignore[arg-type]


# --- template-file errors ----------------------------------------------------------------

GOOD_ENTRY = {"prompt": "{instruction}\n{input}", "completion": "{output}", "weight": 1}
GOOD_PLAIN = {"prompt": "{instruction}", "completion": "{output}", "weight": 0.5}


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_valid_file_loads_and_ignores_extra_keys(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "source": "mine",
            "with_input": [dict(GOOD_ENTRY, note="x")],
            "without_input": [GOOD_PLAIN],
        },
    )
    templates = load_templates(path)
    assert templates.with_input == (Template("{instruction}\n{input}", "{output}", 1.0),)
    assert templates.without_input[0].weight == 0.5
    assert templates.source == str(path)


def _replace(entry: dict, **changes: object) -> dict:
    return {**entry, **changes}


BAD_FILES = [
    ([1, 2], "expected a JSON object"),
    ({"without_input": [GOOD_PLAIN]}, "missing list 'with_input'"),
    ({"with_input": [GOOD_ENTRY]}, "missing list 'without_input'"),
    ({"with_input": {}, "without_input": [GOOD_PLAIN]}, "field 'with_input': expected a list"),
    ({"with_input": [], "without_input": [GOOD_PLAIN]}, "field 'with_input' is empty"),
    ({"with_input": [GOOD_ENTRY], "without_input": ["x"]}, "without_input[0]: expected an object"),
    (
        {
            "with_input": [GOOD_ENTRY, {"prompt": "{instruction}{input}", "weight": 1}],
            "without_input": [GOOD_PLAIN],
        },
        "with_input[1]: missing field 'completion'",
    ),
    (
        {"with_input": [_replace(GOOD_ENTRY, weight=0)], "without_input": [GOOD_PLAIN]},
        "with_input[0].weight: must be a positive number, got 0",
    ),
    (
        {"with_input": [GOOD_ENTRY], "without_input": [_replace(GOOD_PLAIN, weight=-0.1)]},
        "without_input[0].weight: must be a positive number",
    ),
    (
        {"with_input": [_replace(GOOD_ENTRY, weight="0.2")], "without_input": [GOOD_PLAIN]},
        "with_input[0].weight: expected a number, got str",
    ),
    (
        {"with_input": [_replace(GOOD_ENTRY, weight=True)], "without_input": [GOOD_PLAIN]},
        "with_input[0].weight: expected a number, got bool",
    ),
    (
        {"with_input": [_replace(GOOD_ENTRY, prompt=3)], "without_input": [GOOD_PLAIN]},
        "with_input[0].prompt: expected a string, got int",
    ),
    (
        {
            "with_input": [_replace(GOOD_ENTRY, prompt="{instruction} {inptu}")],
            "without_input": [GOOD_PLAIN],
        },
        "with_input[0].prompt: unknown placeholder {inptu}",
    ),
    (
        {
            "with_input": [GOOD_ENTRY],
            "without_input": [_replace(GOOD_PLAIN, prompt="{instruction} {input}")],
        },
        "without_input[0].prompt: unknown placeholder {input}",
    ),
    (
        {
            "with_input": [_replace(GOOD_ENTRY, prompt="{} {instruction} {input}")],
            "without_input": [GOOD_PLAIN],
        },
        "with_input[0].prompt: unknown placeholder {} (allowed: {instruction}, {input})",
    ),
    (
        {
            "with_input": [_replace(GOOD_ENTRY, prompt="{instruction} {input.upper}")],
            "without_input": [GOOD_PLAIN],
        },
        "with_input[0].prompt: unknown placeholder {input.upper}",
    ),
    (
        {
            "with_input": [_replace(GOOD_ENTRY, prompt="{instruction} {input:>{width}}")],
            "without_input": [GOOD_PLAIN],
        },
        "with_input[0].prompt: unknown placeholder {width}",
    ),
    (
        {
            "with_input": [_replace(GOOD_ENTRY, prompt="{instruction} {input:d}")],
            "without_input": [GOOD_PLAIN],
        },
        "with_input[0].prompt: malformed template",
    ),
    (
        {
            "with_input": [_replace(GOOD_ENTRY, prompt="{instruction} {input")],
            "without_input": [GOOD_PLAIN],
        },
        "with_input[0].prompt: malformed template",
    ),
    (
        {
            "with_input": [_replace(GOOD_ENTRY, prompt="{instruction} only")],
            "without_input": [GOOD_PLAIN],
        },
        "with_input[0].prompt: lacks the placeholder {input}",
    ),
    (
        {
            "with_input": [GOOD_ENTRY],
            "without_input": [_replace(GOOD_PLAIN, completion="{answer}")],
        },
        "without_input[0].completion: unknown placeholder {answer}",
    ),
    (
        {"with_input": [GOOD_ENTRY], "without_input": [_replace(GOOD_PLAIN, completion="fixed")]},
        "without_input[0].completion: lacks the placeholder {output}",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_FILES)
def test_bad_template_files(tmp_path: Path, data: object, message: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(DataError) as err:
        load_templates(path)
    assert str(err.value).startswith(f"{path}:")
    assert message in str(err.value)


def test_unreadable_template_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="nope.json: cannot read template file"):
        load_templates(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"with_input": [\n  {"prompt": "x",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:3: template file is not valid JSON"):
        load_templates(broken)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"with_input": "\xe9"}')
    with pytest.raises(DataError, match="latin1.json: template file is not valid UTF-8"):
        load_templates(latin1)


def test_template_files_json_cannot_read_are_errors_not_crashes(tmp_path: Path) -> None:
    huge = tmp_path / "huge.json"
    huge.write_text('{"with_input": [{"weight": ' + "9" * 5000 + "}]}", encoding="utf-8")
    with pytest.raises(DataError, match=r"huge\.json: template file is not valid JSON \(a number"):
        load_templates(huge)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(DataError, match=r"deep\.json: template file is not valid JSON \(nested"):
        load_templates(deep)
