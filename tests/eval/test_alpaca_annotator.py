"""AlpacaFarm auto-annotators (the paper's batched GPT-4 judge): config loading, ChatML,
batching, verdict parsing, and judging end to end against a local judge server, on fixture
configs always and on the real ``greedy_gpt4`` files of ``../shared`` when present."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from eval.test_alpaca_farm import FakeJudge, server  # noqa: F401  (the fixture)
from tulu.errors import DataError
from tulu.eval import alpaca_farm as af
from tulu.eval.alpaca_annotator import (
    PADDING,
    Annotator,
    Comparison,
    chatml_messages,
    fill_batch,
    parse_batched,
)
from tulu.eval.backends import Decoding
from tulu.eval.runner import CachedBackend, EvalContext, check_tasks, run_tasks

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
DATA_DIR = SHARED / "data" / "eval" / "alpaca_farm"
PAPER_ANNOTATOR = DATA_DIR / "annotator_greedy_gpt4"

# A two-example batch in the layout of AlpacaFarm's prompts, small enough to read in a test.
TEMPLATE_WITHOUT = """<|im_start|>system
Pick the better output.
<|im_end|>
<|im_start|>user
## Example 1
I: {instruction}
(a): {output_1}
(b): {output_2}

## Example 2
I: {instruction}
(a): {output_1}
(b): {output_2}
<|im_end|>
"""
TEMPLATE_WITH = TEMPLATE_WITHOUT.replace("I: {instruction}\n", "I: {instruction}\nIn: {input}\n")
CONFIG = """# a fixture annotator
tiny_judge:
  prompt_templates:
    with_inputs: "annotators/tiny/with.txt"
    without_inputs: "annotators/tiny/without.txt"
  fn_decoder: "openai_completions"
  decoder_kwargs:
    model_name: "judge-0314"
    max_tokens: 100
    temperature: 0
  outputs_to_match:
    1: '(?:^|\\n) ?Output \\(a\\)'
    2: '(?:^|\\n) ?Output \\(b\\)'
  batch_size: 2
"""


def _write_annotator(directory: Path, config: str = CONFIG, with_inputs: str = TEMPLATE_WITH):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configs.yaml").write_text(config)
    (directory / "with.txt").write_text(with_inputs)
    (directory / "without.txt").write_text(TEMPLATE_WITHOUT)
    return directory


def _tiny_answer(messages: list[dict[str, str]]) -> str:
    """Judge the fixture template: prefer an output holding GOOD, else the reference; answer
    with the text after SAY: when an output holds it."""
    user = messages[-1]["content"]
    verdicts = []
    for a, b in re.findall(r"\(a\): (.*)\n\(b\): (.*)", user):
        for text in (a, b):
            if text.startswith("SAY:"):
                return text[4:]
        if "GOOD" in a or "GOOD" in b:
            verdicts.append("Output (a)" if "GOOD" in a else "Output (b)")
        else:  # a weak output loses to the reference
            verdicts.append("Output (a)" if a.startswith("reference") else "Output (b)")
    return "\n".join(verdicts)


def _examples(n: int, with_input_every: int = 0) -> list[af.AlpacaFarmExample]:
    return [
        af.AlpacaFarmExample(
            f"Task {i}",
            f"input {i}" if with_input_every and i % with_input_every == 0 else "",
            f"reference {i}",
            "test",
            i,
        )
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------- pieces


def test_chatml_messages() -> None:
    text = (
        "ignored preamble<|im_start|>system\n  Be fair.\n<|im_end|>\n"
        "<|im_start|>system name=example_user\nKnock knock.\n<|im_end|>\n"
        "<|im_start|>user\nOrange.\n<|im_end|>"
    )
    assert chatml_messages(text) == [
        {"role": "system", "content": "Be fair."},
        {"role": "system", "content": "Knock knock.", "name": "example_user"},
        {"role": "user", "content": "Orange."},
    ]
    with pytest.raises(DataError, match="no ChatML message"):
        chatml_messages("just text", "x.txt")
    with pytest.raises(DataError, match="bad role parameter 'oops'"):
        chatml_messages("<|im_start|>system oops\nhi<|im_end|>")
    with pytest.raises(DataError, match="message 1 has no role"):
        chatml_messages("<|im_start|>\nhi<|im_end|>")


def test_fill_batch_takes_the_kth_occurrence_in_one_pass() -> None:
    batch = [Comparison("first {output_2}", "", "a1", "b1"), Comparison("second", "in", "a2", "b2")]
    text = fill_batch(TEMPLATE_WITH, batch)
    assert "I: first {output_2}\nIn: \n(a): a1\n(b): b1" in text  # inserted text not refilled
    assert "I: second\nIn: in\n(a): a2\n(b): b2" in text


def test_parse_batched() -> None:
    patterns = {1: re.compile(r"(?:^|\n) ?Output \(a\)"), 2: re.compile(r"(?:^|\n) ?Output \(b\)")}
    assert parse_batched("Output (b)\nOutput (a)\n Output (b)", patterns) == [2, 1, 2]
    assert parse_batched("I prefer Output (a) in example 1", patterns) == []  # not at a line start
    assert parse_batched("", patterns) == []


# ----------------------------------------------------------------------------------- loading


def test_load_fixture_config(tmp_path: Path) -> None:
    directory = _write_annotator(tmp_path / "tiny")
    for path in (directory, directory / "configs.yaml"):  # the directory or the file
        annotator = Annotator.load(path)
        assert annotator.name == "tiny_judge"
        assert annotator.source == str(directory / "configs.yaml")
        assert (annotator.batch_size, annotator.default_model) == (2, "judge-0314")
        assert (annotator.max_tokens, annotator.temperature) == (100, 0.0)
        assert annotator.templates == {
            "with_inputs": TEMPLATE_WITH,
            "without_inputs": TEMPLATE_WITHOUT,
        }
        assert annotator.unparsable == "drop"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c + "other:\n  batch_size: 1\n", r"holds 2 annotators \(tiny_judge, other\)"),
        (lambda c: c.replace("batch_size: 2", "batch_size: 0"), "batch_size must be a positive"),
        (lambda c: c.replace("with.txt", "absent.txt"), r"template 'annotators/tiny/absent.txt'"),
        (lambda c: c.replace("    2: ", "    3: "), "must map 1 and 2"),
        (lambda c: c.replace("Output \\(b\\)'", "Output (b'"), r"outputs_to_match\[2\]: bad"),
        (lambda c: c.replace("max_tokens: 100", "max_tokens: lots"), "max_tokens must be a number"),
        (lambda c: c.replace("without_inputs:", "plain:"), "must name exactly with_inputs"),
        (lambda c: "- a list\n", "expected a mapping of annotator name"),
        (lambda c: "tiny: [unclosed\n", "cannot read annotator config"),
    ],
)
def test_bad_config_is_refused(tmp_path: Path, edit, message: str) -> None:
    directory = _write_annotator(tmp_path / "tiny", config=edit(CONFIG))
    with pytest.raises(DataError, match=message):
        Annotator.load(directory)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (TEMPLATE_WITH.replace("In: {input}\n", "", 1), r"\{input\} appears 1"),
        (TEMPLATE_WITH.replace("{output_2}", "{verdict}"), r"unknown placeholder\(s\) \{verdict\}"),
        (TEMPLATE_WITH.replace("{instruction}", "x"), r"lacks placeholder\(s\) \{instruction\}"),
        (TEMPLATE_WITH.replace("<|im_start|>", ""), "not a ChatML prompt"),
    ],
)
def test_bad_template_is_refused(tmp_path: Path, template: str, message: str) -> None:
    directory = _write_annotator(tmp_path / "tiny", with_inputs=template)
    with pytest.raises(DataError, match=message):
        Annotator.load(directory)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="annotator config not found"):
        Annotator.load(tmp_path)


# ----------------------------------------------------------------------------------- batching


def test_requests_group_batch_and_pad(tmp_path: Path) -> None:
    annotator = Annotator.load(_write_annotator(tmp_path / "tiny"))
    comparisons = [
        Comparison(f"T{i}", "in" if i % 3 == 0 else "", f"a{i}", f"b{i}") for i in range(10)
    ]
    requests = annotator.requests(comparisons, seed=42)
    with_input = {i for i in range(10) if i % 3 == 0}  # 4 of them: 2 batches; 6 without: 3
    assert [len(r.indices) for r in requests] == [2, 2, 2, 2, 2]
    assert all(set(r.indices).isdisjoint(with_input) for r in requests[:3])
    assert all(set(r.indices) <= with_input for r in requests[3:])
    assert sorted(i for r in requests for i in r.indices) == list(range(10))
    assert [m["role"] for m in requests[0].messages] == ["system", "user"]
    first = requests[0].indices[0]
    assert f"I: T{first}\n(a): a{first}\n(b): b{first}" in requests[0].messages[1]["content"]
    assert "In: in" in requests[3].messages[1]["content"]
    # seeded: the same seed gives the same batches, another seed other ones
    assert [r.indices for r in annotator.requests(comparisons, seed=42)] == [
        r.indices for r in requests
    ]
    assert [r.indices for r in annotator.requests(comparisons, seed=7)] != [
        r.indices for r in requests
    ]
    # a short last batch is padded with AlpacaFarm's dummy example
    (short,) = annotator.requests(comparisons[1:2], seed=0)
    assert short.indices == (0,)
    assert f"I: {PADDING['instruction']}\n(a): 2\n(b): 3" in short.messages[1]["content"]


def test_parse_needs_a_verdict_per_example(tmp_path: Path) -> None:
    annotator = Annotator.load(_write_annotator(tmp_path / "tiny"))
    assert annotator.parse("Output (b)\nOutput (a)", 2) == [2, 1]
    assert annotator.parse("Output (b)\nOutput (a)", 1) == [2]  # the padding's verdict is dropped
    assert annotator.parse("Output (b)", 2) == [None, None]
    assert annotator.parse("Output (b)\nOutput (a)\nOutput (a)", 2) == [None, None]


# ----------------------------------------------------------------------------------- judging


def test_judge_with_annotator_end_to_end(server: FakeJudge, tmp_path: Path) -> None:  # noqa: F811
    server.answer = _tiny_answer
    annotator = Annotator.load(_write_annotator(tmp_path / "tiny"))
    examples = _examples(11, with_input_every=4)
    outputs = [f"GOOD {i}" if i % 2 == 0 else f"weak {i}" for i in range(11)]
    judge = af.Judge(server.base_url, prompt=annotator, seed=3)
    assert judge.model == "judge-0314"
    judgements = judge.judge(examples, outputs)
    assert [j.winner for j in judgements] == [
        "model" if i % 2 == 0 else "reference" for i in range(11)
    ]
    assert [j.model_position for j in judgements] == af.model_positions(11, 3)
    # 3 with an input (2 batches), 8 without (4 batches)
    assert len(server.requests) == 6
    request = server.requests[0]
    assert (request["model"], request["max_tokens"], request["temperature"]) == (
        "judge-0314",
        100,
        0,
    )
    assert [m["role"] for m in request["messages"]] == ["system", "user"]
    result = af.score(judgements, annotator.unparsable)
    assert (result.wins, result.losses, result.dropped) == (6, 5, 0)


def test_unparsable_batch_is_dropped(server: FakeJudge, tmp_path: Path) -> None:  # noqa: F811
    server.answer = _tiny_answer
    annotator = Annotator.load(_write_annotator(tmp_path / "tiny"))
    examples = _examples(4)
    outputs = ["GOOD 0", "GOOD 1", "GOOD 2", "SAY:I cannot choose."]
    judgements = af.Judge(server.base_url, prompt=annotator, seed=0).judge(examples, outputs)
    garbled = [j for j in judgements if j.unparsable]
    assert len(garbled) == 2  # the whole batch holding example 3
    assert 3 in {j.index for j in garbled}
    result = af.score(judgements, "drop")
    assert (result.wins, result.total, result.dropped, result.unparsable) == (2, 2, 2, 2)
    assert result.win_rate == 1.0


class _Outputs:
    """A backend answering every generation with a fixed text per prompt (default GOOD)."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompts, decoding: Decoding):
        self.calls += len(prompts)
        return [["GOOD answer"] for _ in prompts]


def _fixture_data_dir(tmp_path: Path, n: int = 5) -> Path:
    import json

    split = [{"instruction": f"Task {i}", "input": "x" if i == 0 else ""} for i in range(n)]
    refs = [
        {"instruction": af.merge_instruction(r["instruction"], r["input"]), "output": "ref"}
        for r in split
    ]
    (tmp_path / "data" / "alpaca_farm").mkdir(parents=True)
    (tmp_path / "data" / "alpaca_farm" / af.SPLIT_FILE).write_text(json.dumps(split))
    (tmp_path / "data" / "alpaca_farm" / af.REFERENCE_FILE).write_text(json.dumps(refs))
    return tmp_path / "data"


def test_runner_caches_judge_answers(server: FakeJudge, tmp_path: Path) -> None:  # noqa: F811
    server.answer = _tiny_answer
    directory = _write_annotator(tmp_path / "tiny")
    options = {"judge_url": server.base_url, "judge_annotator": directory, "seed": 1}
    cache_path, data_dir = tmp_path / "cache.jsonl", _fixture_data_dir(tmp_path)

    def run():
        ctx = EvalContext(CachedBackend(_Outputs(), cache_path), None, data_dir, options=options)
        (result,) = run_tasks(["alpaca_farm"], ctx)
        return result

    first = run()
    assert first.value == 100.0
    assert first.details["judge"] == {
        "model": "judge-0314",
        "prompt": "tiny_judge",
        "source": str(directory / "configs.yaml"),
        "batch_size": 2,
    }
    assert (first.details["judged"], first.details["dropped"]) == (5, 0)
    asked = len(server.requests)
    assert asked == 3  # 4 without an input (2 batches), 1 with (1 batch)
    second = run()  # resumed: generations and judge answers come from the cache
    assert len(server.requests) == asked
    assert second.value == first.value and second.predictions == first.predictions


def test_runner_checks_the_judge_prompt_upfront(tmp_path: Path) -> None:
    data_dir = _fixture_data_dir(tmp_path)
    broken = _write_annotator(
        tmp_path / "tiny", config=CONFIG.replace("batch_size: 2", "batch_size: 3")
    )
    backend = _Outputs()
    ctx = EvalContext(backend, None, data_dir, options={"judge_url": "http://127.0.0.1:1/v1"})
    ctx.options["judge_annotator"] = broken
    with pytest.raises(DataError, match="must appear batch_size=3 times"):
        check_tasks(["alpaca_farm"], ctx)
    ctx.options["judge_template"] = tmp_path / "t.txt"
    (tmp_path / "t.txt").write_text("{instruction} {output_1} {output_2}")
    with pytest.raises(DataError, match="not both"):
        run_tasks(["alpaca_farm"], ctx)
    assert backend.calls == 0  # nothing was generated


def test_cli_refuses_both_judge_prompts(tmp_path: Path, capsys) -> None:
    from tulu.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "m", "--judge-template", "a.txt", "--judge-annotator", "b"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def paper_annotator() -> Annotator:
    if not (PAPER_ANNOTATOR / "configs.yaml").is_file():
        pytest.skip(f"AlpacaFarm annotator absent ({PAPER_ANNOTATOR})")
    return Annotator.load(PAPER_ANNOTATOR)


def test_paper_annotator_config(paper_annotator: Annotator) -> None:
    assert paper_annotator.name == "greedy_gpt4"
    assert paper_annotator.batch_size == 5
    assert paper_annotator.default_model == "gpt-4-0314"
    assert (paper_annotator.max_tokens, paper_annotator.temperature) == (250, 0.0)
    with_inputs = paper_annotator.templates["with_inputs"]
    assert Counter(re.findall(r"\{(\w+)\}", with_inputs)) == {
        "instruction": 5,
        "input": 5,
        "output_1": 5,
        "output_2": 5,
    }
    assert "{input}" not in paper_annotator.templates["without_inputs"]


def _paper_answer(prefer_model: bool):
    """A judge for the paper's template that always picks the model's output (marked
    ``MODEL-OUTPUT``), or always the reference."""

    def answer(messages: list[dict[str, str]]) -> str:
        batch = messages[-1]["content"].split("## Annotation starts below", 1)[1]
        firsts = re.findall(
            r"### Output \(a\) for example \d+:\n(.*?)\n\n### Output \(b\)", batch, flags=re.S
        )
        assert len(firsts) == 5, firsts
        return "\n".join(
            "Output (a)" if a.startswith("MODEL-OUTPUT") == prefer_model else "Output (b)"
            for a in firsts
        )

    return answer


def test_paper_protocol_on_the_real_data(
    server: FakeJudge,  # noqa: F811
    paper_annotator: Annotator,
) -> None:
    examples = af.load_alpaca_farm(DATA_DIR)
    outputs = [f"MODEL-OUTPUT {i}" for i in range(len(examples))]
    judge = af.Judge(server.base_url, prompt=paper_annotator)

    server.answer = _paper_answer(True)  # the model always wins
    best = af.score(judge.judge(examples, outputs), paper_annotator.unparsable)
    assert (best.win_rate, best.total, best.dropped) == (1.0, 805, 0)
    # 597 without an input in 120 batches, 208 with one in 42: 162 requests of 5 examples
    assert len(server.requests) == 162
    first = server.requests[0]
    assert first["model"] == "gpt-4-0314" and first["max_tokens"] == 250
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert first["messages"][0]["content"].startswith("You are a helpful following assistant")
    assert first["messages"][1]["content"].endswith(
        "Now give all the preferred outputs for the batch of 5 examples."
    )
    with_input = [r for r in server.requests if "### Input 5:" in r["messages"][1]["content"]]
    assert len(with_input) == 42

    server.answer = _paper_answer(False)  # the reference always wins
    worst = af.score(judge.judge(examples, outputs), paper_annotator.unparsable)
    assert (worst.win_rate, worst.total) == (0.0, 805)
