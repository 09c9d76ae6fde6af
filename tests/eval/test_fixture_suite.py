"""The whole suite on fixture-sized data written by the test (runs without ../shared):
right answers score 100 on every task and wrong ones 0, through `run_tasks`."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from tulu.demo import corpus_text, train_tokenizer
from tulu.eval import bbh, mmlu, tydiqa
from tulu.eval.runner import EvalContext, run_tasks


def _write_mmlu(root: Path) -> None:
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject in mmlu.SUBJECTS:
            rows = [
                [f"{subject} question {i}?", "red", "green", "blue", "black", "ABCD"[i % 4]]
                for i in range(5 if split == "dev" else 2)
            ]
            path = root / "mmlu" / split / f"{subject}_{split}.csv"
            with open(path, "w", newline="", encoding="utf-8") as out:
                csv.writer(out).writerows(rows)


def _write_gsm(root: Path) -> Path:
    (root / "gsm").mkdir()
    lines = [
        json.dumps(
            {"question": f"Tom has {i} apples and buys {i}. How many?", "answer": f"#### {2 * i}"}
        )
        for i in range(1, 4)
    ]
    (root / "gsm" / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    exemplars = [
        {
            "question": f"What is {i} plus {i}?",
            "cot_answer": f"{i} plus {i} is {2 * i}. So the answer is {2 * i}.",
            "short_answer": str(2 * i),
        }
        for i in range(8)
    ]
    path = root / "exemplars.json"
    path.write_text(json.dumps({"exemplars": exemplars}), encoding="utf-8")
    return path


def _write_bbh(root: Path) -> None:
    (root / "bbh" / "bbh").mkdir(parents=True)
    (root / "bbh" / "cot-prompts").mkdir()
    for task in bbh.TASKS:
        examples = [{"input": f"{task} puzzle {i}", "target": f"answer{i}"} for i in range(3)]
        (root / "bbh" / "bbh" / f"{task}.json").write_text(json.dumps({"examples": examples}))
        shots = "\n\n".join(
            f"Q: sample {i}\nA: Let's think. So the answer is yes{i}." for i in range(3)
        )
        (root / "bbh" / "cot-prompts" / f"{task}.txt").write_text(f"canary\n-----\n{shots}")


def _write_tydiqa(root: Path) -> None:
    base = root / "tydiqa"
    base.mkdir()
    for name in (tydiqa.DEV_FILE, tydiqa.TRAIN_FILE):
        paragraphs = [
            {
                "context": f"Place {i} has the capital City{i}.",
                "qas": [
                    {
                        "id": f"{lang}-{name[-9:-5]}-{i}",
                        "question": f"Capital of place {i}?",
                        "answers": [{"text": f"City{i}"}],
                    }
                ],
            }
            for lang in tydiqa.LANGUAGES
            for i in range(2)
        ]
        (base / name).write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}))


def _write_humaneval(root: Path) -> None:
    (root / "codex_humaneval").mkdir()
    problems = [
        {
            "task_id": f"Fixture/{i}",
            "prompt": f'def add{i}(a, b):\n    """Add two numbers."""\n',
            "canonical_solution": "    return a + b\n",
            "test": "def check(f):\n    assert f(1, 2) == 3\n",
            "entry_point": f"add{i}",
        }
        for i in range(2)
    ]
    with gzip.open(root / "codex_humaneval" / "HumanEval.jsonl.gz", "wt") as out:
        out.write("".join(json.dumps(p) + "\n" for p in problems))


class Oracle:
    """Answers every prompt right (or, with `wrong`, wrong) by reading it."""

    def __init__(self, wrong: bool) -> None:
        self.wrong = wrong

    def next_token_logprobs(self, prompts, candidates):
        rows = []
        for prompt in prompts:
            index = int(re.findall(r"question (\d+)\?", prompt)[-1])
            right = (index % 4 + (1 if self.wrong else 0)) % 4
            rows.append([0.0 if j == right else -3.0 for j in range(4)])
        return rows

    def generate(self, prompts, decoding):
        outputs = []
        for prompt in prompts:
            if "def add" in prompt and "<|user|>" not in prompt:
                text = "    return a - b\n" if self.wrong else "    return a + b\n"
            elif "apples" in prompt:
                n = int(re.findall(r"Tom has (\d+) apples", prompt)[-1])
                text = f" So the answer is {2 * n + (1 if self.wrong else 0)}."
            elif "puzzle" in prompt:
                i = re.findall(r"puzzle (\d+)", prompt)[-1]
                text = f" So the answer is answer{i}{'x' if self.wrong else ''}."
            else:
                i = re.findall(r"place (\d+)\?", prompt)[-1]
                text = " Town" if self.wrong else f" City{i}"
            outputs.append([text] * decoding.n)
        return outputs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    _write_mmlu(root)
    exemplars = _write_gsm(root)
    _write_bbh(root)
    _write_tydiqa(root)
    _write_humaneval(root)
    return root, exemplars


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
def test_every_task_on_fixture_data(data_dir, protocol, wrong, expected):
    root, exemplars = data_dir
    ctx = EvalContext(
        backend=Oracle(wrong),
        tokenizer=train_tokenizer(corpus_text()),
        data_dir=root,
        protocol=protocol,
        options={"gsm_exemplars": exemplars, "codex_samples": 10},
    )
    # The demo tokenizer has no single " A" token, so clean MMLU (which scores " A".." D")
    # refuses it; test_mmlu.py covers clean MMLU with the real tokenizer.
    tasks = TASKS if protocol == "paper" else [t for t in TASKS if not t.startswith("mmlu")]
    results = run_tasks(tasks, ctx)
    assert {r.task: r.value for r in results} == {task: expected for task in tasks}
