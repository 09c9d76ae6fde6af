"""TyDi QA protocol: golden prompts, loading and sampling, truncation, templates and scoring."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tulu.errors import DataError
from tulu.eval import tydiqa
from tulu.eval.tydiqa import TyDiExample
from tulu.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TYDI_DIR = SHARED / "data" / "eval" / "tydiqa"
PAPER_TEMPLATES = SHARED / "recipes" / "tydiqa_templates.json"
TRAIN_LANGUAGES = ["english", "korean", "swahili"]  # the per-language train files ../shared has


@pytest.fixture(scope="module")
def dev() -> dict[str, list[TyDiExample]]:
    if not (TYDI_DIR / tydiqa.DEV_FILE).is_file():
        pytest.skip(f"TyDi QA dev data absent ({TYDI_DIR})")
    return tydiqa.load_dev(TYDI_DIR)


@pytest.fixture(scope="module")
def train() -> dict[str, list[TyDiExample]]:
    if not all((TYDI_DIR / "train" / f"{x}_tydiqa_train.json").is_file() for x in TRAIN_LANGUAGES):
        pytest.skip(f"TyDi QA train data absent ({TYDI_DIR / 'train'})")
    return tydiqa.load_train(TYDI_DIR, TRAIN_LANGUAGES)


@pytest.fixture(scope="module")
def templates() -> dict[str, dict[str, tydiqa.Template]]:
    return tydiqa.load_templates()


def _find(dev: dict[str, list[TyDiExample]], qid: str) -> TyDiExample:
    language = qid.split("-")[0]
    return next(e for e in dev[language] if e.id == qid)


EX_EN = TyDiExample(
    "english-0-0",
    "english",
    "The Nile flows north into the Mediterranean Sea.",
    "Where does the Nile flow into?",
    ("the Mediterranean Sea", "Mediterranean"),
)
EX_KO = TyDiExample(
    "korean-0-0", "korean", "서울은 대한민국의 수도이다.", "대한민국의 수도는 어디인가?", ("서울",)
)


def test_load_dev_real_data(dev: dict[str, list[TyDiExample]]) -> None:
    assert list(dev) == list(tydiqa.LANGUAGES)
    assert sum(len(rows) for rows in dev.values()) == 5077
    assert len(dev["bengali"]) == 113 and len(dev["english"]) == 440
    kangaroo = _find(dev, "english--2793335619968126759-4")
    assert kangaroo.context == "Current populations stand around 45 million.[6]"
    assert kangaroo.answers == ("45 million", "45 million")


def test_sampling_9_languages_x_100(
    dev: dict[str, list[TyDiExample]], train: dict[str, list[TyDiExample]]
) -> None:
    questions, exemplars = tydiqa.sample_tydiqa(dev)
    assert list(questions) == list(tydiqa.LANGUAGES)
    assert all(len(rows) == 100 for rows in questions.values())
    assert all(rows == [] for rows in exemplars.values())
    assert tydiqa.sample_tydiqa(dev)[0] == questions
    state = random.getstate()
    try:
        random.seed(42)
        expected = {lang: random.sample(dev[lang], 100) for lang in sorted(dev)}
    finally:
        random.setstate(state)
    assert questions == expected
    # paper draws exemplars from the same generator, so it needs every language's train data
    with pytest.raises(DataError, match="arabic, bengali, finnish, indonesian, russian, telugu"):
        tydiqa.sample_tydiqa(dev, train)
    # clean: per-language generators, so a subset of languages gives the same draws
    subset = {lang: dev[lang] for lang in TRAIN_LANGUAGES}
    q_clean, ex_clean = tydiqa.sample_tydiqa(subset, train, protocol="clean")
    for lang in TRAIN_LANGUAGES:
        assert q_clean[lang] == random.Random(42).sample(dev[lang], 100)
        assert ex_clean[lang] == random.Random(42).sample(train[lang], 1)
        assert ex_clean[lang][0].language == lang
    _, ex_one = tydiqa.sample_tydiqa({"korean": dev["korean"]}, train, protocol="clean")
    assert ex_one["korean"] == ex_clean["korean"]
    # paper on a subset: one generator across the questions, then the exemplars
    q_paper, ex_paper = tydiqa.sample_tydiqa(subset, train)
    rng = random.Random(42)
    assert q_paper == {lang: rng.sample(dev[lang], 100) for lang in TRAIN_LANGUAGES}
    assert ex_paper == {lang: rng.sample(train[lang], 1) for lang in TRAIN_LANGUAGES}


def test_golden_english_gp_and_cb(
    dev: dict[str, list[TyDiExample]], templates: dict[str, dict[str, tydiqa.Template]]
) -> None:
    q = _find(dev, "english--2793335619968126759-4")
    gp = tydiqa.build_prompt(q, [EX_EN], templates, "gp", "paper")
    assert gp == (
        "<|user|>\n"
        "Read the passage below and answer the question using the information it contains.\n\n"
        "Passage: The Nile flows north into the Mediterranean Sea.\n"
        "Question: Where does the Nile flow into?\n"
        "Answer: the Mediterranean Sea\n\n"
        "Passage: Current populations stand around 45 million.[6]\n"
        "Question: What is the kangaroo population in Australia?\n"
        "\n<|assistant|>\nAnswer:"
    )
    assert tydiqa.build_prompt(q, [EX_EN], templates, "gp", "clean") == gp.replace(
        "Australia?\n\n<|assistant|>", "Australia?\n<|assistant|>"
    )
    cb = tydiqa.build_prompt(q, [EX_EN], templates, "cb", "paper")
    assert cb == (
        "<|user|>\nAnswer the question below.\n\n"
        "Question: Where does the Nile flow into?\n"
        "Answer: the Mediterranean Sea\n\n"
        "Question: What is the kangaroo population in Australia?\n"
        "\n<|assistant|>\nAnswer:"
    )
    assert tydiqa.build_prompt(q, [], templates, "cb", "clean") == (
        "<|user|>\nAnswer the question below.\n\n"
        "Question: What is the kangaroo population in Australia?\n<|assistant|>\nAnswer:"
    )


def test_golden_korean_gp_and_cb(
    dev: dict[str, list[TyDiExample]], templates: dict[str, dict[str, tydiqa.Template]]
) -> None:
    q = _find(dev, "korean--5185921566892783712-5")
    assert q.context.startswith(" ")  # the passage in the file starts with a space
    gp = tydiqa.build_prompt(q, [EX_KO], templates, "gp", "paper")
    assert gp == (
        "<|user|>\n아래 글을 읽고 글에 담긴 정보를 사용하여 질문에 답하세요.\n\n"
        "글: 서울은 대한민국의 수도이다.\n질문: 대한민국의 수도는 어디인가?\n답: 서울\n\n"
        "글:  수도는 예루살렘이며, 라말라(요르단 강 서안 지구)는 임시 행정 수도이다.\n"
        "질문: 팔레스타인의 수도는 어디인가?\n\n<|assistant|>\n답:"
    )
    assert tydiqa.build_prompt(q, [EX_KO], templates, "gp", "clean") == (
        "<|user|>\n아래 글을 읽고 글에 담긴 정보를 사용하여 질문에 답하세요.\n\n"
        "글: 서울은 대한민국의 수도이다.\n질문: 대한민국의 수도는 어디인가?\n답: 서울\n\n"
        "글: 수도는 예루살렘이며, 라말라(요르단 강 서안 지구)는 임시 행정 수도이다.\n"
        "질문: 팔레스타인의 수도는 어디인가?\n<|assistant|>\n답:"
    )
    assert tydiqa.build_prompt(q, [EX_KO], templates, "cb", "paper") == (
        "<|user|>\n아래 질문에 답하세요.\n\n"
        "질문: 대한민국의 수도는 어디인가?\n답: 서울\n\n"
        "질문: 팔레스타인의 수도는 어디인가?\n\n<|assistant|>\n답:"
    )


def test_own_and_paper_templates_share_layout(
    dev: dict[str, list[TyDiExample]],
    train: dict[str, list[TyDiExample]],
    templates: dict[str, dict[str, tydiqa.Template]],
) -> None:
    for mode in ("gp", "cb"):
        assert sorted(templates[mode]) == sorted(tydiqa.LANGUAGES)
    assert all(t.passage for t in templates["gp"].values())
    assert templates["gp"]["english"].answer == templates["cb"]["english"].answer == "Answer:"
    if not PAPER_TEMPLATES.is_file():
        pytest.skip(f"paper TyDi QA templates absent ({PAPER_TEMPLATES})")
    paper = tydiqa.load_templates(PAPER_TEMPLATES)
    for mode in ("gp", "cb"):
        assert sorted(paper[mode]) == sorted(templates[mode])
        assert paper[mode]["english"].answer == "Answer:"
        # our phrasing is our own
        assert all(
            paper[mode][lang].instruction != templates[mode][lang].instruction
            for lang in tydiqa.LANGUAGES
        )
    q = dev["swahili"][0]
    exemplar = train["swahili"][0]
    t = paper["gp"]["swahili"]
    prompt = tydiqa.build_prompt(q, [exemplar], paper, "gp", "paper")
    assert prompt == (
        f"<|user|>\n{t.instruction}\n\n"
        f"{t.passage} {exemplar.context}\n{t.question} {exemplar.question}\n"
        f"{t.answer} {exemplar.answers[0]}\n\n"
        f"{t.passage} {q.context}\n{t.question} {q.question}\n\n<|assistant|>\n{t.answer}"
    )


def test_passage_truncation_real_tokenizer(
    dev: dict[str, list[TyDiExample]], neox_tokenizer_path: Path
) -> None:
    tok = Tokenizer.from_file(neox_tokenizer_path)
    long_en = _find(dev, "english--619238655688596520-9")
    assert len(tok.encode(long_en.context)) == 661
    cut = tydiqa.truncate_passage(long_en.context, tok)
    assert long_en.context.startswith(cut) and len(cut) < len(long_en.context)
    assert len(tok.encode(cut)) == tydiqa.MAX_PASSAGE_TOKENS
    assert cut.endswith("(1,122ha).[19")
    short = dev["english"][0].context
    if len(tok.encode(short)) <= 512:
        assert tydiqa.truncate_passage(short, tok) == short
    # a cut inside a multi-byte character: paper keeps U+FFFD, clean drops it
    korean = _find(dev, "korean--5206906769056834183-0")
    paper_cut = tydiqa.truncate_passage(korean.context, tok, protocol="paper")
    clean_cut = tydiqa.truncate_passage(korean.context, tok, protocol="clean")
    assert paper_cut.endswith("\ufffd") and paper_cut.rstrip("\ufffd") == clean_cut
    assert korean.context.startswith(clean_cut)
    assert tydiqa.truncate_passage(korean.context, tok, max_tokens=5) == tok.decode(
        tok.encode(korean.context)[:5]
    )


def test_gold_scores_100_and_wrong_scores_0(dev: dict[str, list[TyDiExample]]) -> None:
    questions, _ = tydiqa.sample_tydiqa(dev)
    gold = {
        lang: [f" {q.answers[-1]}\nQuestion: more" for q in rows]
        for lang, rows in questions.items()
    }
    result = tydiqa.score(gold, questions)
    assert result.f1 == pytest.approx(1.0) and result.exact_match == pytest.approx(1.0)
    assert all(s.total == 100 and s.f1 == pytest.approx(1.0) for s in result.per_language.values())
    wrong = {lang: ["zzzqqq"] * len(rows) for lang, rows in questions.items()}
    result = tydiqa.score(wrong, questions)
    assert result.f1 == 0.0 and result.exact_match == 0.0
    table = result.table()
    assert list(table) == list(tydiqa.LANGUAGES)
    assert table["telugu"] == {"f1": 0.0, "exact_match": 0.0, "total": 100}


def test_a_dev_language_without_train_questions_is_named() -> None:
    dev = {"english": [EX_EN], "klingon": [TyDiExample("klingon-1", "klingon", "c", "q", ("a",))]}
    with pytest.raises(DataError, match="dev questions include klingon.*it has: english"):
        tydiqa.sample_tydiqa(dev, {"english": [EX_EN]})


def test_macro_average_over_languages() -> None:
    questions = {
        "english": [TyDiExample("english-1", "english", "", "q", ("cat",))],
        "swahili": [TyDiExample(f"swahili-{i}", "swahili", "", "q", ("paka",)) for i in range(3)],
    }
    outputs = {"english": ["the cat sat"], "swahili": ["paka", "mbwa", "mbwa"]}
    result = tydiqa.score(outputs, questions)
    assert result.per_language["english"].f1 == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert result.per_language["english"].exact_match == 0.0
    assert result.per_language["swahili"].exact_match == pytest.approx(1 / 3)
    assert result.f1 == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result.exact_match == pytest.approx((0 + 1 / 3) / 2)


def test_f1_normalisation_cases() -> None:
    assert tydiqa.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert tydiqa.normalize_answer("An apple, a pear and THE plum.") == "apple pear and plum"
    assert tydiqa.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert tydiqa.normalize_answer("  45\tmillion\n") == "45 million"
    assert tydiqa.f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert tydiqa.f1("cat", ["dog", "the cat"]) == 1.0  # max over gold answers
    assert tydiqa.f1("", ["cat"]) == 0.0
    assert tydiqa.f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert tydiqa.exact_match("An apple.", ["apple"]) == 1.0
    assert tydiqa.exact_match("apples", ["apple"]) == 0.0
    # only ASCII punctuation is removed: the Bengali danda stays, as in SQuAD's script
    assert tydiqa.exact_match("কলকাতা।", ["কলকাতা"]) == 0.0
    assert tydiqa.postprocess(" 4년\n질문: x") == "4년"


def test_generation_settings() -> None:
    assert tydiqa.GENERATION.temperature == 0.0
    assert tydiqa.GENERATION.max_tokens == 50
    assert tydiqa.GENERATION.stop == ("\n",)


def _squad(records: list[tuple[str, str, str, str]]) -> dict[str, object]:
    return {
        "data": [
            {
                "title": qid,
                "paragraphs": [
                    {
                        "context": context,
                        "qas": [
                            {"id": qid, "question": q, "answers": [{"text": a, "answer_start": 0}]}
                        ],
                    }
                ],
            }
            for qid, context, q, a in records
        ]
    }


def test_missing_files_and_combined_train_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dev file not found"):
        tydiqa.load_dev(tmp_path)
    base = tmp_path / "tydiqa"
    (base / "train").mkdir(parents=True)
    records = [("english-1-0", "c", "q", "a"), ("korean-2-0", "c2", "q2", "a2")]
    (base / tydiqa.DEV_FILE).write_text(json.dumps(_squad(records)))
    assert list(tydiqa.load_dev(tmp_path)) == ["english", "korean"]
    (base / "train" / "english_tydiqa_train.json").write_text(json.dumps(_squad(records[:1])))
    with pytest.raises(DataError) as info:
        tydiqa.load_train(tmp_path)
    message = str(info.value)
    assert "8 per-language file(s) missing" in message
    assert "arabic_tydiqa_train.json" in message and "telugu_tydiqa_train.json" in message
    assert "english_tydiqa_train.json" not in message.split("missing:")[1]
    assert tydiqa.load_train(tmp_path, ["english"])["english"][0].answers == ("a",)
    # open-instruct's combined train file wins when present
    (base / tydiqa.TRAIN_FILE).write_text(json.dumps(_squad(records)))
    train = tydiqa.load_train(base, ["english", "korean"])
    assert [e.id for e in train["korean"]] == ["korean-2-0"]
    with pytest.raises(DataError, match="no train questions for arabic"):
        tydiqa.load_train(base, ["arabic", "english"])


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("id", 7, "qas[1]: expected string 'id'"),
        ("question", None, "qas[1]: expected string 'id'"),
        ("answers", [{"text": 5}], "qas[1] (english-2-1): every answer needs a string 'text'"),
        ("context", ["c"], "paragraphs[1]: expected a string 'context'"),
    ],
)
def test_wrongly_typed_fields_are_refused_with_their_place(
    tmp_path: Path, field: str, value: object, where: str
) -> None:
    """Not a raw AttributeError, nor a value that fails later in tokenization or scoring."""

    def qa(qid: str) -> dict[str, object]:
        return {"id": qid, "question": "q", "answers": [{"text": "a", "answer_start": 0}]}

    paragraphs = [
        {"context": "c", "qas": [qa("english-1-0")]},
        {"context": "c2", "qas": [qa("english-2-0"), qa("english-2-1")]},
    ]
    target = paragraphs[1] if field == "context" else paragraphs[1]["qas"][1]
    target[field] = value
    (tmp_path / tydiqa.DEV_FILE).write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}))
    with pytest.raises(DataError) as info:
        tydiqa.load_dev(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / tydiqa.DEV_FILE}: data[0].paragraphs[1]")
    assert where in str(info.value)


def test_bad_templates_and_score_errors(tmp_path: Path) -> None:
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"with_context": {"english": {"instruction": "x"}}}))
    with pytest.raises(DataError, match="with_context.english needs"):
        tydiqa.load_templates(bad)
    bad.write_text(json.dumps({"with_context": {}}))
    with pytest.raises(DataError, match="missing or empty 'with_context'"):
        tydiqa.load_templates(bad)
    questions = {"english": [EX_EN]}
    with pytest.raises(DataError, match="2 outputs for 1"):
        tydiqa.score({"english": ["a", "b"]}, questions)
    with pytest.raises(DataError, match="unknown TyDi QA language"):
        tydiqa.score({"english": ["a"], "klingon": ["b"]}, questions)
    with pytest.raises(DataError, match="no gp entry for 'klingon'"):
        odd = TyDiExample("klingon-1", "klingon", "c", "q", ("a",))
        tydiqa.build_prompt(odd, [], tydiqa.load_templates(), "gp")
