"""Fixture-sized versions of the paper's benchmarks, laid out as open-instruct's ``data/eval``.

The hand-written items live in ``benchmarks.json`` next to this module. `write_eval_data` lays
them out in exactly the files and formats that `tulu eval` reads for the real sets (MMLU CSVs
per subject, GSM8K JSONL, BBH task JSON + CoT prompt files, TyDi QA GoldP SQuAD JSON,
HumanEval.jsonl.gz, the AlpacaFarm split and reference outputs), so the demo exercises the
same loaders, prompts and scorers as a real run, in seconds. The loaders insist on every MMLU
subject, BBH task and TyDi QA language, so the small pools are cycled over all of them.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tulu.eval import alpaca_farm, bbh, mmlu, tydiqa

__all__ = ["EvalData", "load_benchmarks", "write_eval_data"]

_SHOTS_PER_TASK = 3
_EXAMPLES_PER_TASK = 2


@dataclass(frozen=True)
class EvalData:
    """Where `write_eval_data` put things: pass these to `tulu eval`."""

    data_dir: Path  # --data-dir
    gsm_exemplars: Path  # --gsm-exemplars


def load_benchmarks() -> dict[str, Any]:
    """The bundled items (``benchmarks.json``)."""
    text = resources.files("tulu.demo").joinpath("benchmarks.json").read_text(encoding="utf-8")
    return json.loads(text)


def _cycle(pool: list[Any], start: int, count: int) -> list[Any]:
    return [pool[(start + i) % len(pool)] for i in range(count)]


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_mmlu(root: Path, items: dict[str, Any]) -> None:
    pool = items["questions"]
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for index, subject in enumerate(mmlu.SUBJECTS):
        test = _cycle(pool, index, 1)
        dev = _cycle(pool, index + 1, 5)
        for split, rows in (("dev", dev), ("test", test)):
            path = root / split / f"{subject}_{split}.csv"
            with path.open("w", newline="", encoding="utf-8") as out:  # no header, answer last
                csv.writer(out).writerows([q["question"], *q["choices"], q["answer"]] for q in rows)


def _write_gsm(root: Path, items: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(q, ensure_ascii=False) for q in items["test"]]
    (root / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    exemplars = root / "exemplars.json"
    _write_json(exemplars, {"exemplars": items["exemplars"]})
    return exemplars


def _cot_prompt(task: str, shots: list[dict[str, str]]) -> str:
    """A CoT prompt file as BBH ships it: canary line, ``-----``, description, then Q/A shots."""
    blocks = [
        f"Q: {s['question']}\nA: Let's think step by step.\n"
        f"{s['rationale']} So the answer is {s['answer']}."
        for s in shots
    ]
    description = f"Questions for the {task.replace('_', ' ')} task (demo version)."
    return "DEMO DATA. NOT FROM BIG-BENCH.\n-----\n" + description + "\n\n" + "\n\n".join(blocks)


def _write_bbh(root: Path, items: dict[str, Any]) -> None:
    for index, task in enumerate(bbh.TASKS):
        examples = _cycle(items["examples"], index * _EXAMPLES_PER_TASK, _EXAMPLES_PER_TASK)
        _write_json(root / "bbh" / f"{task}.json", {"examples": examples})
        shots = _cycle(items["shots"], index, _SHOTS_PER_TASK)
        path = root / "cot-prompts" / f"{task}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_cot_prompt(task, shots), encoding="utf-8")


def _squad(rows: list[dict[str, str]], split: str) -> dict[str, Any]:
    """TyDi QA GoldP's SQuAD layout; the language is the id's prefix, as in the release."""
    paragraphs = []
    for index, row in enumerate(rows):
        start = row["context"].find(row["answer"])
        paragraphs.append(
            {
                "context": row["context"],
                "qas": [
                    {
                        "id": f"{row['language']}-demo-{split}-{index}",
                        "question": row["question"],
                        "answers": [{"text": row["answer"], "answer_start": start}],
                    }
                ],
            }
        )
    return {"version": "TyDiQA-GoldP-1.1-demo", "data": [{"paragraphs": paragraphs}]}


def _write_tydiqa(root: Path, items: dict[str, Any]) -> None:
    _write_json(root / tydiqa.DEV_FILE, _squad(items["dev"], "dev"))
    _write_json(root / tydiqa.TRAIN_FILE, _squad(items["train"], "train"))


def _write_humaneval(root: Path, problems: list[dict[str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as out:
        out.write("".join(json.dumps(p) + "\n" for p in problems))


def _write_alpaca_farm(root: Path, items: list[dict[str, str]]) -> None:
    split = [{"instruction": i["instruction"], "input": i["input"]} for i in items]
    references = [
        {
            "instruction": alpaca_farm.merge_instruction(i["instruction"], i["input"]),
            "output": i["reference"],
            "generator": "demo reference",
            "dataset": i["dataset"],
        }
        for i in items
    ]
    _write_json(root / alpaca_farm.SPLIT_FILE, split)
    _write_json(root / alpaca_farm.REFERENCE_FILE, references)


def write_eval_data(root: str | Path) -> EvalData:
    """Write every benchmark's fixture-sized files under `root` (created if needed)."""
    root = Path(root)
    items = load_benchmarks()
    _write_mmlu(root / "mmlu" / "data", items["mmlu"])
    exemplars = _write_gsm(root / "gsm", items["gsm"])
    _write_bbh(root / "bbh", items["bbh"])
    _write_tydiqa(root / "tydiqa", items["tydiqa"])
    _write_humaneval(root / "codex_humaneval", items["humaneval"])
    _write_alpaca_farm(root / "alpaca_farm", items["alpaca_farm"])
    return EvalData(data_dir=root, gsm_exemplars=exemplars)
