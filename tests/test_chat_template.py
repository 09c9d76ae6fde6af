"""The chat template every saved tokenizer carries renders, in transformers, exactly the text
(and so the ids) tulu's own chat code gives: other tools prompt an exported model as tulu does."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tulu.chat import conversation_text, generation_prompt
from tulu.chat_template import CHAT_TEMPLATE
from tulu.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Your message here!"}],
    [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. "},
        {"role": "user", "content": "\u3000Bye\u2028"},
    ],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "x"}, {"role": "system", "content": "a late system turn"}],
    [{"role": "user", "content": "{{ not jinja }} {% raw %} '\" <|endoftext|> \\n"}],
]
PIECES = ["word", " ", "\n", "\t", "\u00a0", "\u3000", "é", "😀", "<|user|>", "{{", "%}", "'"]


def random_conversation(rng: random.Random) -> list[dict[str, str]]:
    return [
        {
            "role": rng.choice(["system", "user", "assistant"]),
            "content": "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8))),
        }
        for _ in range(rng.randint(1, 5))
    ]


@pytest.fixture(scope="module")
def saved(neox_tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """(tulu's tokenizer, transformers' tokenizer loaded from what tulu saved)."""
    tok = Tokenizer.from_file(neox_tokenizer_path, {"pad_token": "<pad>"})
    directory = tmp_path_factory.mktemp("saved")
    tok.save(directory)
    return tok, transformers.AutoTokenizer.from_pretrained(str(directory))


def test_saved_config_carries_the_template(saved, tmp_path: Path) -> None:
    tok, _hf = saved
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_renders_tulus_text(saved, add_generation_prompt: bool) -> None:
    tok, hf = saved
    ours = generation_prompt if add_generation_prompt else conversation_text
    rng = random.Random(0)
    conversations = CONVERSATIONS + [random_conversation(rng) for _ in range(200)]
    for messages in conversations:
        text = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert text == ours(messages, tok.eos_token), messages


def test_transformers_ids_are_tulus_ids(saved) -> None:
    tok, hf = saved
    for messages in CONVERSATIONS:
        encoded = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        assert encoded["input_ids"] == tok.encode(generation_prompt(messages, tok.eos_token))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "tool", "content": "x"}], "message 0: unknown role 'tool'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": None}],
            "message 1, field 'content': expected a string",
        ),
    ],
)
def test_what_the_format_refuses_is_an_error_naming_the_message(saved, messages, message) -> None:
    _tok, hf = saved
    with pytest.raises(Exception, match="message") as info:
        hf.apply_chat_template(messages, tokenize=False)
    assert message in str(info.value)
