"""MMLU protocol: golden prompts, exemplar dropping, candidate tokens, loading and scoring."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulu.errors import DataError
from tulu.eval import mmlu
from tulu.eval.chat_wrap import chat_wrap
from tulu.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MMLU_DIR = SHARED / "data" / "eval"


@pytest.fixture(scope="module")
def data() -> dict[str, dict[str, list[mmlu.MMLUQuestion]]]:
    if not (MMLU_DIR / "mmlu").is_dir():
        pytest.skip(f"MMLU data absent ({MMLU_DIR / 'mmlu'})")
    return mmlu.load_mmlu(MMLU_DIR)


@pytest.fixture(scope="module")
def tokenizer(neox_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.load(neox_tokenizer_path)


def test_chat_wrap() -> None:
    assert chat_wrap("hi", "The answer is:") == "<|user|>\nhi\n<|assistant|>\nThe answer is:"


def test_load_real_data(data: dict) -> None:
    assert sorted(data) == sorted(mmlu.SUBJECTS)
    assert len(data) == 57
    assert sum(len(s["test"]) for s in data.values()) == 14042
    assert all(len(s["dev"]) == 5 for s in data.values())
    first = data["abstract_algebra"]["test"][0]
    assert first.choices == ("0", "4", "2", "6")
    assert first.answer == "B"


def test_accepts_open_instruct_layout(tmp_path: Path) -> None:
    for layout in ("mmlu", "mmlu/data"):
        base = tmp_path / layout.replace("/", "_") / layout
        for split in mmlu.SPLITS:
            (base / split).mkdir(parents=True)
            (base / split / f"anatomy_{split}.csv").write_text('"Q, one",a,b,c,d,C\n')
        loaded = mmlu.load_mmlu(tmp_path / layout.replace("/", "_"), subjects=["anatomy"])
        assert loaded["anatomy"]["test"][0].question == "Q, one"
        assert loaded["anatomy"]["dev"][0].answer == "C"


def test_missing_files_listed(tmp_path: Path) -> None:
    base = tmp_path / "mmlu"
    for split in mmlu.SPLITS:
        (base / split).mkdir(parents=True)
    (base / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(DataError) as info:
        mmlu.load_mmlu(tmp_path, subjects=["anatomy", "virology"])
    message = str(info.value)
    assert str(base) in message
    assert "3 file(s) missing" in message
    for name in ("test/anatomy_test.csv", "dev/virology_dev.csv", "test/virology_test.csv"):
        assert name in message
    assert "dev/anatomy_dev.csv" not in message


def test_no_data_dir_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        mmlu.load_mmlu(tmp_path)
    assert str(tmp_path / "mmlu" / "data") in str(info.value)


def test_bad_row_names_file_and_line(tmp_path: Path) -> None:
    for split in mmlu.SPLITS:
        (tmp_path / split).mkdir()
        (tmp_path / split / f"anatomy_{split}.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"anatomy_dev\.csv:2: answer must be one of"):
        mmlu.load_mmlu(tmp_path, subjects=["anatomy"])


def test_a_utf8_bom_does_not_enter_the_first_question(tmp_path: Path) -> None:
    """Excel writes CSV with a BOM; pandas (open-instruct's reader) drops it, and so must we,
    or the first question's prompt would carry an invisible U+FEFF."""
    for split in mmlu.SPLITS:
        (tmp_path / split).mkdir()
        (tmp_path / split / f"anatomy_{split}.csv").write_text("\ufeffq,a,b,c,d,A\n")
    loaded = mmlu.load_mmlu(tmp_path, subjects=["anatomy"])
    assert [row.question for row in loaded["anatomy"]["test"]] == ["q"]


def test_golden_zero_shot(data: dict, tokenizer: Tokenizer) -> None:
    subject = "abstract_algebra"
    row = data[subject]["test"][0]
    body = (
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    paper = mmlu.build_prompt(subject, data[subject]["dev"], row, 0, tokenizer, "paper")
    assert paper == (
        "<|user|>\nThe following are multiple choice questions (with answers) about  abstract"
        " algebra.\n\n" + body + "\n<|assistant|>\nThe answer is:"
    )
    clean = mmlu.build_prompt(subject, data[subject]["dev"], row, 0, tokenizer, "clean")
    assert clean == (
        "<|user|>\nThe following are multiple choice questions (with answers) about abstract"
        " algebra.\n\n" + body + "\n<|assistant|>\nThe answer is:"
    )


def test_golden_five_shot(data: dict, tokenizer: Tokenizer) -> None:
    subject = "high_school_geography"
    dev = data[subject]["dev"]
    row = data[subject]["test"][0]
    prompt, k = mmlu.build_prompt_and_shots(subject, dev, row, 5, tokenizer, "paper")
    assert k == 5
    header = (
        "<|user|>\nThe following are multiple choice questions (with answers) about  high school"
        " geography.\n\n"
    )
    shots = "".join(
        f"{d.question}\nA. {d.choices[0]}\nB. {d.choices[1]}\nC. {d.choices[2]}\n"
        f"D. {d.choices[3]}\nAnswer: {d.answer}\n\n"
        for d in dev
    )
    test = (
        f"{row.question}\nA. {row.choices[0]}\nB. {row.choices[1]}\nC. {row.choices[2]}\n"
        f"D. {row.choices[3]}\nAnswer:"
    )
    assert prompt == header + shots + test + "\n<|assistant|>\nThe answer is:"
    # And one fully literal five-shot prompt, to pin the format independently of the loop above.
    algebra = data["abstract_algebra"]
    literal = mmlu.build_prompt(
        "abstract_algebra", algebra["dev"], algebra["test"][0], 5, tokenizer, "clean"
    )
    assert literal == (
        "<|user|>\nThe following are multiple choice questions (with answers) about abstract "
        "algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
        "A. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. "
        "Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.\n"
        "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: B\n\n"
        "Statement 1 | Every element of a group generates a cyclic subgroup of the group. "
        "Statement 2 | The symmetric group S_10 has 10 elements.\n"
        "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
        "Statement 1| Every function from a finite set onto itself must be one to one. "
        "Statement 2 | Every subgroup of an abelian group is abelian.\n"
        "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
        "Find the characteristic of the ring 2Z.\n"
        "A. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:\n<|assistant|>\nThe answer is:"
    )


def test_exemplars_dropped_from_the_end(data: dict, tokenizer: Tokenizer) -> None:
    subject = "abstract_algebra"
    dev, row = data[subject]["dev"], data[subject]["test"][0]
    lengths = [
        len(tokenizer.encode(mmlu.build_prompt(subject, dev, row, k, None, "paper")))
        for k in range(6)
    ]
    assert lengths == sorted(lengths) and len(set(lengths)) == 6
    # Room for two exemplars but not three: the first two are kept, the last three dropped.
    prompt, k = mmlu.build_prompt_and_shots(
        subject, dev, row, 5, tokenizer, "paper", max_length=lengths[3] - 1
    )
    assert k == 2
    assert prompt == mmlu.build_prompt(subject, dev, row, 2, None, "paper")
    assert dev[1].question in prompt and dev[2].question not in prompt
    # Exactly at the limit is allowed (the rule is "longer than", not "at least").
    assert (
        mmlu.build_prompt_and_shots(
            subject, dev, row, 5, tokenizer, "paper", max_length=lengths[3]
        )[1]
        == 3
    )
    # Nothing fits: stop at zero exemplars rather than going negative.
    assert mmlu.build_prompt_and_shots(subject, dev, row, 5, tokenizer, "paper", 1)[1] == 0
    # A dev file with too few rows for k: the error names the subject's dev file.
    with pytest.raises(DataError, match=rf"dev set \(dev/{subject}_dev.csv\) has 2"):
        mmlu.build_prompt_and_shots(subject, dev[:2], row, 5, tokenizer, "paper")


def test_real_prompts_fit_the_default_limit(data: dict, tokenizer: Tokenizer) -> None:
    subject = "high_school_european_history"  # the longest questions in MMLU
    dev, rows = data[subject]["dev"], data[subject]["test"]
    for row in rows[:5]:
        prompt, k = mmlu.build_prompt_and_shots(subject, dev, row, 5, tokenizer, "paper")
        assert len(tokenizer.encode(prompt)) <= mmlu.MAX_PROMPT_TOKENS
        assert k < 5


def test_answer_token_ids(tokenizer: Tokenizer) -> None:
    paper = mmlu.answer_token_ids(tokenizer, "paper")
    clean = mmlu.answer_token_ids(tokenizer, "clean")
    assert paper == [tokenizer.token_to_id(c) for c in "ABCD"]
    assert clean == [tokenizer.token_to_id("Ġ" + c) for c in "ABCD"]  # BPE's space marker
    assert paper == [34, 35, 36, 37]
    assert clean == [329, 378, 330, 399]
    assert [tokenizer.decode([i]) for i in clean] == [" A", " B", " C", " D"]


def test_pick_answer() -> None:
    logprobs = [-5.0] * 10
    logprobs[7] = -0.5
    logprobs[3] = -1.0
    assert mmlu.pick_answer(logprobs, [1, 3, 7, 9]) == "C"
    assert mmlu.pick_answer([0.0] * 4, [0, 1, 2, 3]) == "A"  # ties go to the first


def test_score_gold_and_wrong_on_full_data(data: dict) -> None:
    gold = {(s, i): r.answer for s, v in data.items() for i, r in enumerate(v["test"])}
    result = mmlu.score(gold, data)
    assert (result.accuracy, result.correct, result.total, result.missing) == (1.0, 14042, 14042, 0)
    assert len(result.per_subject) == 57
    assert result.table()["anatomy"]["accuracy"] == 1.0
    shift = {"A": "B", "B": "C", "C": "D", "D": "A"}
    wrong = {key: shift[letter] for key, letter in gold.items()}
    assert mmlu.score(wrong, data).accuracy == 0.0


def test_score_micro_average_and_missing(data: dict) -> None:
    small = {"anatomy": data["anatomy"], "virology": data["virology"]}
    n_anat, n_vir = len(small["anatomy"]["test"]), len(small["virology"]["test"])
    predictions = {("anatomy", i): r.answer for i, r in enumerate(small["anatomy"]["test"])}
    result = mmlu.score(predictions, small)
    assert result.missing == n_vir
    assert result.accuracy == pytest.approx(n_anat / (n_anat + n_vir))  # micro, not 0.5
    assert result.per_subject["virology"].accuracy == 0.0
    with pytest.raises(DataError, match="out of range"):
        mmlu.score({("anatomy", n_anat): "A"}, small)
    with pytest.raises(DataError, match="not A-D"):
        mmlu.score({("anatomy", 0): "E"}, small)
