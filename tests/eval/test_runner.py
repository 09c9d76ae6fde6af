"""The evaluation runner: gold outputs score 100 through the whole pipeline, the cache resumes,
missing inputs are listed at once, and `tulu eval` writes the model card's table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tulu.errors import DataError
from tulu.eval.backends import Decoding
from tulu.eval.runner import CachedBackend, EvalContext, TaskResult, markdown_table, run_tasks

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
EVAL = SHARED / "data" / "eval"
EXEMPLARS = SHARED / "recipes" / "gsm_8shot_exemplars.json"


@pytest.fixture(scope="module")
def neox(neox_tokenizer_path):
    from tulu.tokenizer import Tokenizer

    return Tokenizer.from_file(neox_tokenizer_path)


class GoldBackend:
    """Answers every prompt with the gold answer the test registered for it."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.letters: dict[str, str] = {}
        self.calls = 0

    def generate(self, prompts, decoding: Decoding):
        self.calls += 1
        return [
            self.answers[p] * 1
            if len(self.answers[p]) == decoding.n
            else self.answers[p][:1] * decoding.n
            for p in prompts
        ]

    def next_token_logprobs(self, prompts, candidates):
        self.calls += 1
        return [[0.0 if "ABCD"[j] == self.letters[p] else -5.0 for j in range(4)] for p in prompts]


def _need_eval_data() -> None:
    if not (EVAL / "gsm" / "test.jsonl").is_file():
        pytest.skip(f"evaluation data absent ({EVAL})")


def test_gold_answers_score_100_on_mmlu_and_gsm(neox, tmp_path):
    _need_eval_data()
    from tulu.eval import gsm, mmlu

    backend = GoldBackend()
    ctx = EvalContext(
        backend=backend,
        tokenizer=neox,
        data_dir=EVAL,
        max_examples=3,
        options={"gsm_exemplars": EXEMPLARS},
    )
    data = mmlu.load_mmlu(EVAL / "mmlu")
    for k in (0, 5):
        for subject, splits in data.items():
            for row in splits["test"][:3]:
                prompt = mmlu.build_prompt(subject, splits["dev"], row, k, neox, "paper")
                backend.letters[prompt] = row.answer
    questions = gsm.sample_questions(gsm.load_gsm(EVAL / "gsm" / "test.jsonl"), 3)
    source = gsm.resolve_exemplars(EXEMPLARS)
    for mode in ("direct", "cot"):
        for q in questions:
            prompt = gsm.build_prompt(q.question, source.exemplars, mode, "paper")
            backend.answers[prompt] = [f" So the answer is {q.gold}."]
    results = run_tasks(["mmlu_0shot", "mmlu_5shot", "gsm_direct", "gsm_cot"], ctx)
    assert [(r.task, r.value) for r in results] == [
        ("mmlu_0shot", 100.0),
        ("mmlu_5shot", 100.0),
        ("gsm_direct", 100.0),
        ("gsm_cot", 100.0),
    ]
    assert results[0].details["questions"] == 57 * 3


def test_canonical_humaneval_solutions_pass(tmp_path):
    path = EVAL / "codex_humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"HumanEval absent ({path})")
    from tulu.eval import humaneval

    problems = humaneval.load_problems(path)[:4]
    backend = GoldBackend()
    for p in problems:
        backend.answers[p.prompt] = [p.canonical_solution]
    ctx = EvalContext(
        backend=backend,
        tokenizer=None,
        data_dir=EVAL,
        max_examples=4,
        options={"codex_samples": 10},
    )
    (p1, p10) = run_tasks(["codex_pass1", "codex_pass10"], ctx)
    assert (p1.value, p10.value) == (100.0, 100.0)


def test_cache_resumes_without_calling_the_backend(tmp_path):
    class Counting:
        calls = 0

        def generate(self, prompts, decoding):
            Counting.calls += len(prompts)
            return [[p.upper()] for p in prompts]

        def next_token_logprobs(self, prompts, candidates):
            Counting.calls += len(prompts)
            return [[float(len(p))] * len(candidates) for p in prompts]

    path = tmp_path / "cache.jsonl"
    first = CachedBackend(Counting(), path)
    assert first.generate(["a", "b"], Decoding(max_tokens=4)) == [["A"], ["B"]]
    assert first.next_token_logprobs(["abc"], [1, 2]) == [[3.0, 3.0]]
    with open(path, "a", encoding="utf-8") as out:
        out.write('{"key": "cut off')  # an interrupted write
    second = CachedBackend(Counting(), path)
    calls = Counting.calls
    assert second.generate(["b", "a", "c"], Decoding(max_tokens=4)) == [["B"], ["A"], ["C"]]
    assert Counting.calls == calls + 1  # only "c" was new
    # other decoding settings are other generations
    second.generate(["a"], Decoding(max_tokens=5))
    assert Counting.calls == calls + 2


def test_missing_inputs_are_listed_together(tmp_path):
    ctx = EvalContext(
        backend=GoldBackend(),
        tokenizer=None,
        data_dir=tmp_path,
        options={"gsm_exemplars": tmp_path / "ex.json"},
    )
    with pytest.raises(DataError) as info:
        run_tasks(["mmlu_0shot", "gsm_cot", "codex_pass1"], ctx)
    message = str(info.value)
    assert f"missing evaluation data under {tmp_path}" in message
    for fragment in (
        "mmlu_0shot: ",
        "mmlu/dev",
        "gsm_cot: ",
        "gsm/test.jsonl",
        "ex.json",
        "codex_pass1: ",
        "HumanEval.jsonl.gz",
    ):
        assert fragment in message
    with pytest.raises(DataError, match="unknown or not yet available task"):
        run_tasks(["mmlu_7shot"], ctx)


def test_markdown_table_follows_the_model_card():
    results = [TaskResult("gsm_cot", "em", 15.5), TaskResult("mmlu_0shot", "acc", 34.1)]
    assert markdown_table(results) == (
        "| MMLU 0-shot | GSM CoT | Average |\n|---|---|---|\n| 34.1 | 15.5 | 24.8 |\n"
    )


def test_tulu_eval_end_to_end_on_a_tiny_checkpoint(tmp_path, capsys):
    _need_eval_data()
    from server.conftest import TinyCheckpoint  # noqa: F401  (the tiny model the server tests use)
    from tulu.cli import main
    from tulu.demo import corpus_text, tiny_model, train_tokenizer
    from tulu.model.checkpoint import save_model

    tokenizer = train_tokenizer(corpus_text())
    save_model(tiny_model(len(tokenizer), 0), tmp_path / "model", tokenizer=tokenizer)
    args = [
        "eval",
        str(tmp_path / "model"),
        "--data-dir",
        str(EVAL),
        "--output",
        str(tmp_path / "out"),
        "--max-examples",
        "1",
        "--gsm-exemplars",
        str(EXEMPLARS),
        "--task",
        "mmlu_0shot",
        "--task",
        "gsm_direct",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("| MMLU 0-shot | GSM Direct | Average |")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["task"] for r in results["results"]] == ["mmlu_0shot", "gsm_direct"]
    assert len(results["results"][0]["predictions"]) == 57
    report = (tmp_path / "out" / "results.md").read_text()
    assert "### MMLU 0-shot" in report and "| abstract_algebra | " in report
    cached = (tmp_path / "out" / "cache.jsonl").read_text().count("\n")
    assert main(args) == 0  # resumed: everything comes from the cache
    assert (tmp_path / "out" / "cache.jsonl").read_text().count("\n") == cached


def test_alpaca_farm_task_through_a_judge(tmp_path):
    if not (EVAL / "alpaca_farm").is_dir():
        pytest.skip(f"AlpacaFarm data absent ({EVAL / 'alpaca_farm'})")
    import threading

    from eval.test_alpaca_farm import FakeJudge
    from tulu.eval import alpaca_farm

    judge = FakeJudge()
    threading.Thread(target=judge.serve_forever, args=(0.05,), daemon=True).start()
    try:
        examples = alpaca_farm.load_alpaca_farm(EVAL / "alpaca_farm")[:8]
        backend = GoldBackend()
        for i, e in enumerate(examples):  # the judge prefers outputs marked GOOD
            backend.answers[e.prompt] = ["GOOD answer" if i % 4 else "weak"]
        ctx = EvalContext(
            backend=backend,
            tokenizer=None,
            data_dir=EVAL,
            max_examples=8,
            options={"judge_url": judge.base_url, "judge_model": "judge"},
        )
        (result,) = run_tasks(["alpaca_farm"], ctx)
        assert result.details["wins"] == 6 and result.value == pytest.approx(75.0)
        assert len(judge.requests) == 8
        ctx.options["judge_url"] = None
        with pytest.raises(DataError, match="needs a judge"):
            run_tasks(["alpaca_farm"], ctx)
    finally:
        judge.shutdown()
        judge.server_close()


def test_gold_answers_score_100_on_bbh(neox):
    if not (EVAL / "bbh" / "cot-prompts").is_dir():
        pytest.skip(f"BBH data absent ({EVAL / 'bbh'})")
    from tulu.eval import bbh

    tasks = bbh.load_bbh(EVAL / "bbh")
    examples = bbh.sample_examples(tasks, 2, protocol="paper")
    backend = GoldBackend()
    for mode in ("direct", "cot"):
        for name, rows in examples.items():
            prompt = bbh.task_prompt(tasks[name].cot_prompt_file, mode, "paper")
            for row in rows:
                backend.answers[bbh.build_prompt(prompt, row.input)] = [
                    f" Let me think. So the answer is {row.target}."
                ]
    ctx = EvalContext(backend=backend, tokenizer=neox, data_dir=EVAL, max_examples=2)
    results = run_tasks(["bbh_direct", "bbh_cot"], ctx)
    assert [r.value for r in results] == [100.0, 100.0]
    assert len(results[0].details["per_task"]) == 27


def _squad(path: Path, questions: list[tuple[str, str, str, str]]) -> None:
    paragraphs = [
        {"context": context, "qas": [{"id": qid, "question": q, "answers": [{"text": a}]}]}
        for qid, context, q, a in questions
    ]
    path.write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}), encoding="utf-8")


def test_gold_answers_score_100_on_tydiqa_fixture(neox, tmp_path):
    from tulu.eval import tydiqa

    root = tmp_path / "tydiqa"
    root.mkdir()
    rows = [
        (
            f"{lang}-{i}",
            f"The capital of place {i} is City{i}.",
            f"Capital of place {i}?",
            f"City{i}",
        )
        for lang in tydiqa.LANGUAGES
        for i in range(3)
    ]
    _squad(root / tydiqa.DEV_FILE, rows)
    _squad(root / tydiqa.TRAIN_FILE, [(f"{q}-train", c, x, a) for q, c, x, a in rows])
    recorder = GoldBackend()

    class Echo:  # answers each prompt with the gold answer of the question it ends with
        def generate(self, prompts, decoding):
            outputs = []
            for prompt in prompts:
                tail = prompt.rsplit("place ", 1)[1]
                outputs.append([f"City{tail.split('?')[0]}"])
            recorder.calls += 1
            return outputs

    for mode in ("gp", "cb"):
        ctx = EvalContext(backend=Echo(), tokenizer=neox, data_dir=tmp_path, protocol="clean")
        (result,) = run_tasks([f"tydiqa_{mode}"], ctx)
        assert result.value == 100.0
        assert set(result.details["per_language"]) == set(tydiqa.LANGUAGES)
