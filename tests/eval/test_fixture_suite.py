"""The whole suite on the bundled fixture benchmarks (`tulu.demo.eval_data`, no ../shared):
right answers score 100 on every task and wrong ones 0, through `run_tasks`.

The oracle answers each prompt from the bundled items alone (``benchmarks.json``), so this also
proves the bundled data consistent: every gold answer is reachable through the task's prompt,
extraction and scoring, and every canonical HumanEval solution passes its tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from pathlib import Path
from typing import Any

import pytest

from tulu.demo import corpus_text, train_tokenizer
from tulu.demo.eval_data import EvalData, load_benchmarks, write_eval_data
from tulu.eval.runner import EvalContext, run_tasks

LETTERS = "ABCD"


def _last(prompt: str, items: list[tuple[str, Any]]) -> Any:
    """The answer of the item whose text occurs last in `prompt`.

    Few-shot prompts hold other items of the same pool earlier, so the item asked about is the
    one whose last occurrence ends last (the longer text wins a tie, so that an item that is a
    suffix of another cannot shadow it).
    """
    found = [
        (prompt.rfind(text) + len(text), len(text), answer)
        for text, answer in items
        if text in prompt
    ]
    assert found, f"no bundled item in the prompt: {prompt[-300:]!r}"
    return max(found, key=lambda f: (f[0], f[1]))[2]


class Oracle:
    """Answers every prompt right (or, with `wrong`, wrong) by looking up the bundled item it
    asks about and that item's gold answer."""

    def __init__(self, wrong: bool) -> None:
        self.wrong = wrong
        items = load_benchmarks()
        self.mmlu = [(q["question"], q["answer"]) for q in items["mmlu"]["questions"]]
        gsm = [
            (q["question"], ("gsm", re.search(r"####\s*(\S+)", q["answer"])[1].replace(",", "")))
            for q in items["gsm"]["test"]
        ]
        bbh = [(e["input"], ("bbh", e["target"])) for e in items["bbh"]["examples"]]
        tydiqa = [
            (q["question"], ("tydiqa", q["answer"]))
            for q in items["tydiqa"]["dev"] + items["tydiqa"]["train"]
        ]
        codex = [(p["prompt"], ("codex", p["canonical_solution"])) for p in items["humaneval"]]
        self.generated = gsm + bbh + tydiqa + codex

    def next_token_logprobs(self, prompts, candidates):
        rows = []
        for prompt in prompts:
            right = LETTERS.index(_last(prompt, self.mmlu))
            pick = (right + 1) % 4 if self.wrong else right
            rows.append([0.0 if j == pick else -3.0 for j in range(len(candidates))])
        return rows

    def generate(self, prompts, decoding):
        outputs = []
        for prompt in prompts:
            kind, gold = _last(prompt, self.generated)
            if kind == "gsm":
                number = int(gold) + 1 if self.wrong else int(gold)
                text = f" So the answer is {number}."
            elif kind == "bbh":
                text = f" So the answer is {gold}{'x' if self.wrong else ''}."
            elif kind == "tydiqa":
                text = " Town" if self.wrong else f" {gold}"
            else:
                text = "    return None\n" if self.wrong else gold
            outputs.append([text] * decoding.n)
        return outputs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> EvalData:
    return write_eval_data(tmp_path_factory.mktemp("eval-data"))


TASKS = [
    "mmlu_0shot",
    "mmlu_5shot",
    "gsm_direct",
    "gsm_cot",
    "bbh_direct",
    "bbh_cot",
    "tydiqa_gp",
    "tydiqa_cb",
    "codex_pass1",
    "codex_pass10",
]


@pytest.mark.parametrize("protocol", ["paper", "clean"])
@pytest.mark.parametrize(("wrong", "expected"), [(False, 100.0), (True, 0.0)])
def test_every_task_on_the_bundled_benchmarks(data, protocol, wrong, expected):
    ctx = EvalContext(
        backend=Oracle(wrong),
        tokenizer=train_tokenizer(corpus_text()),
        data_dir=Path(data.data_dir),
        protocol=protocol,
        options={"gsm_exemplars": data.gsm_exemplars, "codex_samples": 10},
    )
    # The demo tokenizer has no single " A" token, so clean MMLU (which scores " A".." D")
    # refuses it; test_mmlu.py covers clean MMLU with the real tokenizer.
    tasks = TASKS if protocol == "paper" else [t for t in TASKS if not t.startswith("mmlu")]
    results = run_tasks(tasks, ctx)
    assert {r.task: r.value for r in results} == {task: expected for task in tasks}
    # every bundled item was asked (the pools are cycled over subjects, tasks and languages)
    counts = {r.task: r.details for r in results}
    if protocol == "paper":
        assert counts["mmlu_0shot"]["questions"] == 57
    assert counts["gsm_cot"]["questions"] == len(load_benchmarks()["gsm"]["test"])
    assert counts["codex_pass1"]["problems"] == len(load_benchmarks()["humaneval"])


def test_mmlu_counts_questions_whose_answer_tokens_the_server_did_not_return(data):
    """Over an API a candidate outside the server's top 20 reads -inf; a question whose four
    candidates all do goes to "A" by the tie rule. That happened silently; it is counted."""

    class Unscoring(Oracle):
        def next_token_logprobs(self, prompts, candidates):
            rows = super().next_token_logprobs(prompts, candidates)
            return [[-math.inf] * len(candidates) if i % 3 == 0 else r for i, r in enumerate(rows)]

    ctx = EvalContext(
        backend=Unscoring(False),
        tokenizer=train_tokenizer(corpus_text()),
        data_dir=Path(data.data_dir),
        protocol="paper",
        options={},
    )
    (result,) = run_tasks(["mmlu_0shot"], ctx)
    assert result.details["unscored"] == len(range(0, result.details["questions"], 3))
    (clean,) = run_tasks(["mmlu_0shot"], dataclasses.replace(ctx, backend=Oracle(False)))
    assert "unscored" not in clean.details


class Mixed(Oracle):
    """Right on some prompts and wrong on others (by a hash of the prompt, so deterministic),
    so that per-example scores must really follow the answers."""

    def _set(self, prompt: str) -> None:
        self.wrong = zlib.crc32(prompt.encode("utf-8")) % 3 == 0

    def next_token_logprobs(self, prompts, candidates):
        rows = []
        for prompt in prompts:
            self._set(prompt)
            rows += super().next_token_logprobs([prompt], candidates)
        return rows

    def generate(self, prompts, decoding):
        outputs = []
        for prompt in prompts:
            self._set(prompt)
            kind, gold = _last(prompt, self.generated)
            if kind == "tydiqa" and self.wrong:  # partly right: F1 between 0 and 1, EM 0
                outputs.append([f" {gold} and more"] * decoding.n)
            else:
                outputs += super().generate([prompt], decoding)
        return outputs


def _results_json(data: EvalData, task: str) -> dict[str, Any]:
    """The task's entry of results.json, as `tulu eval` writes it (asdict, then JSON)."""
    ctx = EvalContext(
        backend=Mixed(False),
        tokenizer=train_tokenizer(corpus_text()),
        data_dir=Path(data.data_dir),
        options={"gsm_exemplars": data.gsm_exemplars},
    )
    (result,) = run_tasks([task], ctx)
    return json.loads(json.dumps(dataclasses.asdict(result), default=str))


def _mixed(flags: list[Any]) -> None:
    assert len(set(flags)) > 1, "every example scored alike: the test would prove nothing"


def test_results_json_mmlu_predictions_carry_gold_and_correct(data):
    from tulu.eval import mmlu

    entry = _results_json(data, "mmlu_5shot")
    questions = mmlu.load_mmlu(Path(data.data_dir) / "mmlu")
    for p in entry["predictions"]:
        assert set(p) == {"subject", "index", "prediction", "gold", "correct"}
        assert p["gold"] == questions[p["subject"]]["test"][p["index"]].answer
        assert p["correct"] is (p["prediction"] == p["gold"])
    flags = [p["correct"] for p in entry["predictions"]]
    _mixed(flags)
    assert entry["value"] == pytest.approx(100 * sum(flags) / len(flags))  # micro average


def test_results_json_bbh_predictions_carry_answer_and_correct(data):
    from tulu.eval import bbh

    entry = _results_json(data, "bbh_cot")
    by_task: dict[str, list[bool]] = {}
    for p in entry["predictions"]:
        assert set(p) == {"task", "input", "output", "target", "answer", "correct"}
        assert p["answer"] == bbh.extract_answer(p["output"])
        assert p["correct"] is bbh.answers_match(p["answer"], p["target"])
        by_task.setdefault(p["task"], []).append(p["correct"])
    _mixed([flag for flags in by_task.values() for flag in flags])
    for name, flags in by_task.items():  # the per-task table and the macro average agree
        assert entry["details"]["per_task"][name]["accuracy"] == sum(flags) / len(flags)
    macro = sum(sum(f) / len(f) for f in by_task.values()) / len(by_task)
    assert entry["value"] == pytest.approx(100 * macro)


def test_results_json_tydiqa_predictions_carry_f1_and_exact_match(data):
    from tulu.eval import tydiqa

    entry = _results_json(data, "tydiqa_gp")
    by_language: dict[str, list[tuple[float, float]]] = {}
    for p in entry["predictions"]:
        assert set(p) == {"language", "id", "output", "answers", "f1", "exact_match"}
        answer = tydiqa.postprocess(p["output"])
        assert p["f1"] == tydiqa.f1(answer, p["answers"])
        assert p["exact_match"] == tydiqa.exact_match(answer, p["answers"])
        by_language.setdefault(p["language"], []).append((p["f1"], p["exact_match"]))
    scores = [score for pairs in by_language.values() for score in pairs]
    _mixed([f1 for f1, _ in scores])
    assert any(0 < f1 < 1 and em == 0 for f1, em in scores)  # F1 and exact match differ
    for metric, column in ((0, "f1"), (1, "exact_match")):
        means = {lang: sum(s[metric] for s in v) / len(v) for lang, v in by_language.items()}
        for lang, mean in means.items():
            assert entry["details"]["per_language"][lang][column] == pytest.approx(mean)
        macro = 100 * sum(means.values()) / len(means)
        assert (entry["value"] if column == "f1" else entry["details"]["exact_match"]) == (
            pytest.approx(macro)
        )
