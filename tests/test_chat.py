"""Tests for tulu.chat: the Tulu chat format and open-instruct's label masks.

Expected ids and masks come from two independent sources: ids hard-coded after checking every
span by hand, and a re-implementation of open-instruct's algorithm on top of transformers'
tokenizer (not on tulu's), compared case by case: the one in benchmarks/tokenization.py, which
that benchmark times as open-instruct's side and which these tests thereby check too.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from helpers import train_tiny_bpe
from tulu.chat import (
    IGNORE_INDEX,
    EncodedExample,
    conversation_text,
    encode_messages,
    encode_prompt_completion,
    generation_prompt,
    render,
)
from tulu.errors import ChatFormatError, TokenizerError
from tulu.tokenizer import Tokenizer

EOT = "<|endoftext|>"


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def neox(neox_tokenizer_path: Path) -> Tokenizer:
    # as in the released Pythia-6.9B-Tulu checkpoint: <pad> added as id 50277
    return Tokenizer.from_file(neox_tokenizer_path, {"pad_token": "<pad>"})


@pytest.fixture(scope="module")
def hf(neox_tokenizer_path: Path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(neox_tokenizer_path), eos_token=EOT
    )
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok("Hi")["input_ids"] == [12764]  # no BOS is added
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    backend = train_tiny_bpe(["Question: what is two plus two? Answer: four."] * 4)
    path = tmp_path_factory.mktemp("tiny") / "tokenizer.json"
    backend.save(str(path))
    return Tokenizer.from_file(path)


# --------------------------------------------------------------------------- the reference


@functools.cache
def _tokenization_benchmark() -> ModuleType:
    """benchmarks/tokenization.py as a module: its `open_instruct_encode` is the one re-typing
    of open-instruct's encode_with_messages_format, the peer that benchmark times and the
    oracle here."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tokenization.py"
    spec = importlib.util.spec_from_file_location("tokenization_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_messages(messages, hf_tok, max_seq_length):
    """open-instruct's encode_with_messages_format on transformers' tokenizer, as (input_ids,
    labels) lists; None where open-instruct drops the example (every label masked)."""
    encode = _tokenization_benchmark().open_instruct_encode
    encoded = encode({"messages": messages}, hf_tok, max_seq_length)
    labels = encoded["labels"].tolist()
    if all(label == -100 for label in labels):
        return None
    return encoded["input_ids"].tolist(), labels


def reference_prompt_completion(prompt, completion, hf_tok, max_seq_length):
    """open-instruct's encode_with_prompt_completion_format, re-typed."""
    if not prompt.endswith((" ", "\n", "\t")) and not completion.startswith((" ", "\n", "\t")):
        text = prompt + " " + completion
    else:
        text = prompt + completion
    text = text + hf_tok.eos_token
    input_ids = hf_tok(text, max_length=max_seq_length, truncation=True)["input_ids"]
    labels = list(input_ids)
    n_prompt = len(hf_tok(prompt, max_length=max_seq_length, truncation=True)["input_ids"])
    for pos in range(min(n_prompt, len(labels))):
        labels[pos] = -100
    if all(label == -100 for label in labels):
        return None
    return input_ids, labels


def as_pair(example: EncodedExample | None):
    return None if example is None else (example.input_ids, example.labels)


# --------------------------------------------------------------------------- render


def test_render_single_turn() -> None:
    msgs = [user("  What is 2+2?\n"), assistant("\n4 \n")]
    assert render(msgs, EOT) == "<|user|>\nWhat is 2+2?\n<|assistant|>\n4<|endoftext|>"


def test_render_system_and_multi_turn() -> None:
    msgs = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Bye"), assistant("Bye!")]
    assert render(msgs, "</s>") == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nBye\n<|assistant|>\nBye!</s>"
    )


def test_render_strips_the_end_only() -> None:
    assert render([user("Hi")], EOT) == "<|user|>\nHi"
    assert render([user("")], EOT) == "<|user|>"
    assert render([user(""), assistant("")], EOT) == "<|user|>\n\n<|assistant|>\n<|endoftext|>"


def test_generation_prompt_exact() -> None:
    assert generation_prompt([user("Hi")], EOT) == "<|user|>\nHi\n<|assistant|>\n"
    assert generation_prompt([system("S"), user(" Q ")], EOT) == (
        "<|system|>\nS\n<|user|>\nQ\n<|assistant|>\n"
    )
    assert generation_prompt([user("Hi"), assistant("Yo"), user("More")], EOT) == (
        "<|user|>\nHi\n<|assistant|>\nYo<|endoftext|>\n<|user|>\nMore\n<|assistant|>\n"
    )


def test_generation_prompt_is_render_plus_header() -> None:
    for msgs in ([user("Hi")], [system("S"), user("Q"), assistant("A"), user("Q2")]):
        assert generation_prompt(msgs, EOT) == render(msgs, EOT) + "\n<|assistant|>\n"
    # empty last content: the training layout (an empty line for it) is kept
    assert generation_prompt([user("")], EOT) == "<|user|>\n\n<|assistant|>\n"


def test_conversation_text_is_the_generation_prompt_without_its_header() -> None:
    """What a chat template gives without add_generation_prompt (vLLM's /tokenize)."""
    assert conversation_text([user("Hi"), assistant(" Yo ")], EOT) == (
        "<|user|>\nHi\n<|assistant|>\nYo<|endoftext|>\n"
    )
    for msgs in ([user("")], [system("S"), user("Q"), assistant("A"), user("Q2")]):
        assert conversation_text(msgs, EOT) + "<|assistant|>\n" == generation_prompt(msgs, EOT)
    with pytest.raises(ChatFormatError):
        conversation_text([{"role": "robot", "content": "x"}], EOT)


def test_generation_prompt_is_the_masked_training_prefix(neox: Tokenizer) -> None:
    """The prompt the model sees at inference is exactly the masked prefix of training."""
    for history in ([user("Hi")], [system("Be nice."), user("Hi there ")], [user("")]):
        example = encode_messages([*history, assistant("Hello!")], neox, 512)
        assert example is not None
        n_masked = example.labels.count(IGNORE_INDEX)
        prompt_ids = neox.encode(generation_prompt(history, neox.eos_token))
        assert prompt_ids == example.input_ids[:n_masked]


# --------------------------------------------------------------------------- errors


def test_unknown_role_names_role_and_index() -> None:
    msgs = [user("Hi"), {"role": "tool", "content": "x"}]
    for call in (render, generation_prompt):
        with pytest.raises(ChatFormatError) as info:
            call(msgs, EOT)
        assert "'tool'" in str(info.value) and "message 1" in str(info.value)


def test_unknown_role_in_encode(tiny: Tokenizer) -> None:
    with pytest.raises(ChatFormatError, match=r"message 2: unknown role 'bot'"):
        encode_messages([user("a"), assistant("b"), {"role": "bot", "content": "c"}], tiny, 64)


def test_bad_content_and_structure() -> None:
    with pytest.raises(ChatFormatError, match=r"message 1, field 'content'.*int"):
        render([user("a"), {"role": "assistant", "content": 3}], EOT)
    with pytest.raises(ChatFormatError, match=r"message 0: missing field 'role'"):
        render([{"content": "x"}], EOT)
    with pytest.raises(ChatFormatError, match=r"message 0: missing field 'content'"):
        render([{"role": "user"}], EOT)
    with pytest.raises(ChatFormatError, match=r"message 0: expected an object"):
        render(["hi"], EOT)  # type: ignore[list-item]
    with pytest.raises(ChatFormatError, match="expected a list"):
        render("hi", EOT)  # type: ignore[arg-type]
    with pytest.raises(ChatFormatError, match="eos_token"):
        render([user("a")], None)  # type: ignore[arg-type]


def test_empty_conversation() -> None:
    with pytest.raises(ChatFormatError, match="empty"):
        generation_prompt([], EOT)
    with pytest.raises(ChatFormatError, match="empty"):
        render([], EOT)


def test_bad_max_seq_length(tiny: Tokenizer) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ChatFormatError, match="max_seq_length"):
            encode_messages([user("a"), assistant("b")], tiny, bad)  # type: ignore[arg-type]
        with pytest.raises(ChatFormatError, match="max_seq_length"):
            encode_prompt_completion("a", "b", tiny, bad)  # type: ignore[arg-type]


def test_tokenizer_without_eos(tmp_path: Path) -> None:
    backend = train_tiny_bpe(["abc"], vocab_size=280, special_tokens=())
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="eos_token"):
        encode_messages([user("a"), assistant("b")], tok, 16)
    with pytest.raises(ChatFormatError, match="completion"):
        encode_prompt_completion("a", None, tok, 16)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- encode_messages

SINGLE_TURN = [user("What is the capital of France?"), assistant("The capital of France is Paris.")]

# Checked by hand, span by span:
#   29 '<'  93 '|'  4537 'user'  49651 '|>'  187 '\n'                    "<|user|>\n"
#   1276 'What' 310 ' is' 253 ' the' 5347 ' capital' 273 ' of' 6181 ' France' 32 '?'
#   187 '\n'
#   29 '<'  93 '|'  515 'ass'  5567 'istant'  49651 '|>'  187 '\n'       "<|assistant|>\n"
#   510 'The' 5347 ' capital' 273 ' of' 6181 ' France' 310 ' is' 7785 ' Paris' 15 '.'
#   0 '<|endoftext|>'
SINGLE_TURN_IDS = [
    *[29, 93, 4537, 49651, 187],
    *[1276, 310, 253, 5347, 273, 6181, 32, 187],
    *[29, 93, 515, 5567, 49651, 187],
    *[510, 5347, 273, 6181, 310, 7785, 15, 0],
]
SINGLE_TURN_N_MASKED = 19  # user header + question + newline + assistant header


def test_single_turn_exact_ids(neox: Tokenizer) -> None:
    example = encode_messages(SINGLE_TURN, neox, 2048)
    assert example is not None
    assert example.input_ids == SINGLE_TURN_IDS
    assert example.labels == [IGNORE_INDEX] * SINGLE_TURN_N_MASKED + SINGLE_TURN_IDS[19:]
    assert neox.decode(example.input_ids[19:]) == "The capital of France is Paris.<|endoftext|>"


CASES = {
    "single_turn": (SINGLE_TURN, 2048),
    "system": ([system("You are a helpful assistant."), user("Hi!"), assistant("Hello.")], 2048),
    "multi_turn": (
        [
            user("Name a prime number."),
            assistant("7 is prime."),
            user("And an even one?"),
            assistant("2 is the only even prime."),
        ],
        2048,
    ),
    "system_multi_turn": (
        [
            system("Answer in one word."),
            user("Colour of the sky?"),
            assistant("Blue"),
            user("Colour of grass?"),
            assistant("Green"),
        ],
        2048,
    ),
    "unicode_emoji": (
        [
            user("Traduis « café crème » en 中文, s'il te plaît 🙏"),
            assistant("当然！“咖啡奶油” ☕️👍🏽 — voilà, naïve Ångström."),
        ],
        2048,
    ),
    "code_whitespace": (
        [
            user("Fix:\n\n```py\ndef f( x ):\n        return x\n```\n"),
            assistant("def f(x):\n    return x"),
        ],
        2048,
    ),
    "empty_user": ([user(""), assistant("Nothing to say?")], 2048),
    "empty_assistant": ([user("Say nothing."), assistant("")], 2048),
    "ends_with_user": ([user("Q1"), assistant("A1"), user("Q2")], 2048),
    "consecutive_users": ([user("First."), user("Second."), assistant("Both read.")], 2048),
    "assistant_first": ([assistant("I start."), user("Ok."), assistant("Fine.")], 2048),
    "only_user": ([user("Hello there")], 2048),
    # literal format strings are text except <|endoftext|> (id 0, as in transformers);
    # CRLF inside is kept, Unicode whitespace at the ends is stripped as str.strip() does
    "format_strings_crlf_unicode_space": (
        [
            system("\u3000Rules:\r\n<|user|> is text\u00a0"),
            user("\r\nSay <|endoftext|> then <|assistant|>\n\x85"),
            assistant(" <|user|>\nok<|endoftext|>\r\n"),
        ],
        2048,
    ),
    "truncate_in_first_user": (SINGLE_TURN, 8),
    "truncate_at_assistant_header": (SINGLE_TURN, 19),
    "truncate_in_assistant": (SINGLE_TURN, 23),
    "truncate_in_second_user": (
        [user("Name a prime number."), assistant("7 is prime."), user("And an even one? " * 5)],
        24,
    ),
    "truncate_in_second_assistant": (
        [
            user("Name a prime number."),
            assistant("7 is prime."),
            user("And an even one?"),
            assistant("2 is the only even prime, " * 5),
        ],
        44,  # 40 tokens of history, then '2 is the only'
    ),
    "tiny_max_length": (SINGLE_TURN, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_open_instruct_reference(neox: Tokenizer, hf, name: str) -> None:
    messages, max_len = CASES[name]
    ours = encode_messages(messages, neox, max_len)
    assert as_pair(ours) == reference_messages(messages, hf, max_len)
    if ours is not None:
        assert len(ours.input_ids) == len(ours.labels) <= max_len
        assert (
            neox.decode(ours.input_ids) == render(messages, EOT)[: len(neox.decode(ours.input_ids))]
        )


def test_truncated_and_fully_masked_examples(neox: Tokenizer) -> None:
    assert encode_messages([user("Hello there")], neox, 2048) is None
    assert encode_messages(SINGLE_TURN, neox, 8) is None  # cut inside the user turn
    assert encode_messages(SINGLE_TURN, neox, 19) is None  # nothing of the answer left
    example = encode_messages(SINGLE_TURN, neox, 23)  # cut inside the answer
    assert example is not None
    assert example.input_ids == SINGLE_TURN_IDS[:23]
    assert example.labels == [IGNORE_INDEX] * 19 + SINGLE_TURN_IDS[19:23]


def test_multi_turn_trains_eos_and_following_newline(neox: Tokenizer) -> None:
    messages = CASES["multi_turn"][0]
    example = encode_messages(messages, neox, 2048)
    assert example is not None
    ids, labels = example.input_ids, example.labels
    eos_positions = [i for i, t in enumerate(ids) if t == neox.eos_token_id]
    assert len(eos_positions) == 2
    first, last = eos_positions
    assert labels[first] == ids[first] == 0  # the EOS is trained
    assert ids[first + 1] == 187 and labels[first + 1] == 187  # and so is the "\n" after it
    assert last == len(ids) - 1 and labels[last] == 0  # the final EOS (no "\n": stripped)
    # what is trained is exactly the assistant contents + EOS (+ "\n" between turns)
    trained = neox.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == "7 is prime.<|endoftext|>\n2 is the only even prime.<|endoftext|>"
    # the "<|user|>" header right after that "\n" is masked
    assert neox.decode(ids[first + 2 : first + 6]) == "<|user|>"
    assert labels[first + 2 : first + 6] == [IGNORE_INDEX] * 4


def test_truncation_inside_later_turns(neox: Tokenizer) -> None:
    """Earlier answers stay trained; the cut answer keeps its first tokens."""
    for name, trained_text in (
        ("truncate_in_second_user", "7 is prime.<|endoftext|>\n"),
        ("truncate_in_second_assistant", "7 is prime.<|endoftext|>\n2 is the only"),
    ):
        messages, max_len = CASES[name]
        example = encode_messages(messages, neox, max_len)
        assert example is not None and len(example.input_ids) == max_len
        kept = [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != -100]
        assert neox.decode(kept) == trained_text


def test_empty_assistant_trains_only_eos(neox: Tokenizer) -> None:
    example = encode_messages(CASES["empty_assistant"][0], neox, 2048)
    assert example is not None
    assert [lab for lab in example.labels if lab != IGNORE_INDEX] == [0]


# --------------------------------------------------------------------------- prompt/completion


@pytest.mark.parametrize(
    ("prompt", "completion", "text"),
    [
        ("Q: two plus two?", "four", "Q: two plus two? four"),  # neither side: add a space
        ("Q: two plus two? ", "four", "Q: two plus two? four"),  # prompt ends with space
        ("Q: two plus two?\n", "four", "Q: two plus two?\nfour"),  # prompt ends with newline
        ("Q: two plus two?", "\tfour", "Q: two plus two?\tfour"),  # completion starts with tab
        ("Q: two plus two?", " four", "Q: two plus two? four"),  # completion starts with space
    ],
)
def test_prompt_completion_join(tiny: Tokenizer, prompt: str, completion: str, text: str) -> None:
    example = encode_prompt_completion(prompt, completion, tiny, 512)
    assert example is not None
    assert tiny.decode(example.input_ids) == text + EOT
    n_prompt = len(tiny.encode(prompt))
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]


@pytest.mark.parametrize(
    ("prompt", "completion", "max_len"),
    [
        ("Translate to French: cheese", "fromage", 2048),
        ("Question: 2+2=\n", "4", 2048),
        ("Write code:", "\tdef f(): pass", 2048),
        ("Résumé in 中文 ", "简历 📄", 2048),
        ("Translate to French: cheese", "fromage", 7),  # cut inside the completion
        ("Translate to French: cheese", "fromage", 3),  # cut inside the prompt: dropped
        ("", "only a completion", 2048),
    ],
)
def test_prompt_completion_matches_reference(
    neox: Tokenizer, hf, prompt: str, completion: str, max_len: int
) -> None:
    ours = encode_prompt_completion(prompt, completion, neox, max_len)
    assert as_pair(ours) == reference_prompt_completion(prompt, completion, hf, max_len)


def test_prompt_completion_exact(neox: Tokenizer) -> None:
    example = encode_prompt_completion("Hello", "world", neox, 2048)
    assert example is not None
    # 'Hello' ' world' '<|endoftext|>'
    assert example.input_ids == [12092, 1533, 0]
    assert example.labels == [IGNORE_INDEX, 1533, 0]
    assert encode_prompt_completion("Hello", "world", neox, 1) is None
