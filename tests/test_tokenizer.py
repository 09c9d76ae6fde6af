"""Tests for tulu.tokenizer: special tokens, encode/decode, save round trip, streaming."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from tulu.errors import TokenizerError, TuluError
from tulu.tokenizer import StreamDecoder, Tokenizer

EOT = "<|endoftext|>"

TRAIN_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into ids, and ids back into text.",
    "def add(a, b):\n    return a + b\n",
    "Streaming output should never split a character in half.",
] * 3

STREAM_TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 in one go.",
    "中文字符测试，日本語のテキスト、한국어 텍스트.",
    "Accents: café, naïve, façade, Ångström, ñandú, Œuvre.",
    "def f(x):\n    return {'k': [x, x ** 2]}\n\n\tprint(f(3))  # done\n",
    "Line one\nLine two\r\n\nLine four<|endoftext|>after eos",
    "Mixed ✓ ≤ ∞ → ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and    runs   of spaces",
]


def _train_tiny(special: list[str]) -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_SENTENCES, trainer)
    return tok


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE whose only special token is <|endoftext|> (id 0)."""
    path = tmp_path_factory.mktemp("tiny") / "tokenizer.json"
    _train_tiny([EOT]).save(str(path))
    return path


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny_json: Path) -> Path:
    shutil.copy(tiny_json, tmp_path / "tokenizer.json")
    return tmp_path


def _write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


# --------------------------------------------------------------------------- special tokens


def test_neox_defaults_when_nothing_configured(tiny_json: Path) -> None:
    tok = Tokenizer.from_file(tiny_json)
    assert tok.bos_token == tok.eos_token == tok.unk_token == EOT
    assert tok.bos_token_id == tok.eos_token_id == tok.unk_token_id == 0
    assert tok.pad_token is None and tok.pad_token_id is None


def test_no_defaults_without_endoftext(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    _train_tiny(["</s>"]).save(str(path))
    tok = Tokenizer.from_file(path)
    assert tok.special_tokens == {
        "bos_token": None,
        "eos_token": None,
        "unk_token": None,
        "pad_token": None,
    }
    assert tok.eos_token_id is None


def test_from_file_accepts_string_and_dict_forms(tiny_json: Path) -> None:
    base = Tokenizer.from_file(tiny_json)
    tok = Tokenizer.from_file(
        tiny_json,
        {"pad_token": {"content": "<pad>", "special": True, "lstrip": False}, "bos_token": EOT},
    )
    assert tok.pad_token == "<pad>"
    assert tok.pad_token_id == base.vocab_size  # the next free id
    assert tok.bos_token_id == 0


def test_from_file_rejects_unknown_key_and_bad_value(tiny_json: Path) -> None:
    with pytest.raises(TokenizerError, match="'sep_token'"):
        Tokenizer.from_file(tiny_json, {"sep_token": "<sep>"})
    with pytest.raises(TokenizerError, match="'eos_token'"):
        Tokenizer.from_file(tiny_json, {"eos_token": 5})
    with pytest.raises(TokenizerError, match="'pad_token'"):
        Tokenizer.from_file(tiny_json, {"pad_token": {"special": True}})


def test_tokenizer_config_string_form(tiny_dir: Path) -> None:
    _write(tiny_dir / "tokenizer_config.json", {"eos_token": EOT, "pad_token": "<pad>"})
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.eos_token == EOT and tok.pad_token == "<pad>"
    assert tok.pad_token_id == len(tok) - 1


def test_tokenizer_config_dict_form(tiny_dir: Path) -> None:
    added = {"content": "<pad>", "single_word": False, "lstrip": False, "rstrip": False}
    _write(
        tiny_dir / "tokenizer_config.json",
        {"pad_token": added, "eos_token": {"content": EOT, "__type": "AddedToken"}},
    )
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.pad_token == "<pad>" and tok.eos_token == EOT


def test_special_tokens_map_used_and_config_takes_precedence(tiny_dir: Path) -> None:
    _write(tiny_dir / "tokenizer_config.json", {"pad_token": "<pad>", "bos_token": None})
    _write(
        tiny_dir / "special_tokens_map.json",
        {"pad_token": "<other_pad>", "bos_token": {"content": "<s>"}, "unk_token": "<unk>"},
    )
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.pad_token == "<pad>"  # tokenizer_config.json wins
    assert tok.bos_token == "<s>"  # null in the config falls through to the map
    assert tok.unk_token == "<unk>"  # only in the map
    assert tok.eos_token == EOT  # GPT-NeoX default
    assert tok.token_to_id("<other_pad>") is None  # not named, so not added
    # new tokens get consecutive ids in bos, eos, unk, pad order
    base = Tokenizer.from_file(tiny_dir / "tokenizer.json").vocab_size
    assert (tok.bos_token_id, tok.unk_token_id, tok.pad_token_id) == (base, base + 1, base + 2)


def test_model_max_length(tiny_dir: Path) -> None:
    _write(tiny_dir / "tokenizer_config.json", {"model_max_length": 2048})
    assert Tokenizer.from_dir(tiny_dir).model_max_length == 2048
    # transformers' "unset" sentinel
    _write(tiny_dir / "tokenizer_config.json", {"model_max_length": 1e30})
    assert Tokenizer.from_dir(tiny_dir).model_max_length is None


def test_real_tokenizer_pad_gets_50277(neox_tokenizer_path: Path, tmp_path: Path) -> None:
    shutil.copy(neox_tokenizer_path, tmp_path / "tokenizer.json")
    _write(tmp_path / "tokenizer_config.json", {"pad_token": "<pad>", "model_max_length": 2048})
    tok = Tokenizer.from_dir(tmp_path)
    assert len(Tokenizer.from_file(neox_tokenizer_path)) == 50277
    assert tok.pad_token_id == 50277
    assert tok.vocab_size == len(tok) == 50278
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 0, 0)
    assert tok.token_to_id("<|padding|>") == 1
    # the new special token is recognised in text and skipped on request
    ids = tok.encode("a<pad>b")
    assert 50277 in ids
    assert tok.decode(ids) == "a<pad>b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


# --------------------------------------------------------------------------- encode / decode


def test_encode_adds_nothing_and_recognises_literal_specials(neox_tokenizer_path: Path) -> None:
    tok = Tokenizer.from_file(neox_tokenizer_path)
    # The tokenizer.json post-processor is ByteLevel: it adds no tokens even when asked to.
    assert tok.backend.post_processor is not None
    assert tok.backend.encode("Hello", add_special_tokens=True).ids == [12092]
    assert tok.encode("Hello") == [12092]
    assert tok.encode("Hello<|endoftext|>") == [12092, 0]
    assert tok.encode("") == []
    assert tok.id_to_token(12092) == "Hello" and tok.token_to_id("Hello") == 12092
    assert tok.token_to_id("no-such-token-xyz") is None


def test_encode_batch_matches_encode(tiny_json: Path) -> None:
    tok = Tokenizer.from_file(tiny_json)
    texts = ["", "fox", *STREAM_TEXTS]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


def test_text_with_an_unpaired_surrogate_is_a_tokenizer_error(tiny_json: Path) -> None:
    """A cut emoji escaped in JSON ("\\ud83d") names where it is; other texts still encode."""
    tok = Tokenizer.from_file(tiny_json)
    with pytest.raises(TokenizerError, match=r"unpaired surrogate '\\ud83d' at character 3"):
        tok.encode("abc\ud83d")
    with pytest.raises(TokenizerError, match=r"text 1 contains .* at character 0"):
        tok.encode_batch(["fine", "\udc00x"])
    with pytest.raises(TypeError):  # not a string at all: the caller's bug, not bad input
        tok.encode(None)  # type: ignore[arg-type]
    assert tok.encode_batch(["abc"]) == [tok.encode("abc")]


def test_decode_round_trip(tiny_json: Path) -> None:
    tok = Tokenizer.from_file(tiny_json)
    for text in STREAM_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"


# --------------------------------------------------------------------------- save


def test_save_and_reload_tiny(tiny_json: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_file(tiny_json, {"pad_token": "<pad>"}, model_max_length=128)
    tok.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPTNeoXTokenizer"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["model_max_length"] == 128
    special_map = json.loads((tmp_path / "out" / "special_tokens_map.json").read_text())
    assert special_map == {
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "pad_token": "<pad>",
    }
    again = Tokenizer.from_dir(tmp_path / "out")
    assert again.special_tokens == tok.special_tokens
    assert again.pad_token_id == tok.pad_token_id and len(again) == len(tok)
    assert again.model_max_length == 128
    for text in STREAM_TEXTS:
        assert again.encode(text) == tok.encode(text)


def test_save_into_a_directory_named_in_another_encoding(tiny_json: Path, tmp_path: Path) -> None:
    # tokenizers' own save() takes UTF-8 paths only: `tulu export --output` to a Latin-1
    # directory name raised UnicodeEncodeError.
    out = tmp_path / os.fsdecode(b"caf\xe9")
    tok = Tokenizer.from_file(tiny_json)
    tok.save(out)
    assert Tokenizer.from_dir(out).encode("hello world") == tok.encode("hello world")


@pytest.mark.parametrize("pad", ["<pad>", None])
def test_save_loads_in_transformers(neox_tokenizer_path: Path, tmp_path: Path, pad) -> None:
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_file(
        neox_tokenizer_path, {"pad_token": pad} if pad else None, model_max_length=2048
    )
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token, hf.eos_token, hf.unk_token, hf.pad_token) == (
        tok.bos_token,
        tok.eos_token,
        tok.unk_token,
        tok.pad_token,
    )
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert len(hf) == len(tok)
    assert hf.model_max_length == 2048
    texts = [*STREAM_TEXTS, "<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>", "x<pad>y"]
    for text in texts:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids)


# --------------------------------------------------------------------------- errors


def test_from_dir_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value) and "tokenizer.json" in str(info.value)
    assert isinstance(info.value, TuluError)


def test_from_dir_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_from_file_missing(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE", ', encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(path) in str(info.value) and "invalid JSON" in str(info.value)
    path.write_text('{"version": "1.0"}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_file(path)
    path.write_text('{"model": {"type": "Nonsense"}}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot build tokenizer"):
        Tokenizer.from_file(path)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_corrupt_config(tiny_dir: Path, name: str) -> None:
    (tiny_dir / name).write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(tiny_dir)
    assert str(tiny_dir / name) in str(info.value)
    (tiny_dir / name).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="expected a JSON object"):
        Tokenizer.from_dir(tiny_dir)


def test_bad_token_value_names_file_and_field(tiny_dir: Path) -> None:
    _write(tiny_dir / "tokenizer_config.json", {"eos_token": ["<|endoftext|>"]})
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(tiny_dir)
    assert "tokenizer_config.json" in str(info.value) and "'eos_token'" in str(info.value)


# --------------------------------------------------------------------------- StreamDecoder


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_invariant_real(neox_tokenizer_path: Path, text: str) -> None:
    tok = Tokenizer.from_file(neox_tokenizer_path)
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # with a prompt as context, and with special tokens skipped
    prompt = tok.encode("<|user|>\nSay something\n<|assistant|>\n")
    assert "".join(_stream(tok, ids, prompt_ids=prompt)) == text
    skipped = "".join(_stream(tok, ids, skip_special_tokens=True))
    assert skipped == tok.decode(ids, skip_special_tokens=True)


def test_stream_holds_back_split_characters(tiny_json: Path) -> None:
    tok = Tokenizer.from_file(tiny_json)
    ids = tok.encode("😀")  # never seen in training: four single-byte tokens
    assert len(ids) == 4
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids] == ["", "", "", "😀"]
    assert decoder.flush() == ""
    # an incomplete character at the end comes out of flush() as the decoder writes it
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids[:2]] == ["", ""]
    assert decoder.flush() == tok.decode(ids[:2])


def test_stream_prompt_ending_inside_a_character(tiny_json: Path) -> None:
    """A prompt given as ids may stop inside a character; the generated bytes that complete it
    must not vanish from the output (they decode as `decode` decodes the generated ids)."""
    tok = Tokenizer.from_file(tiny_json)
    emoji = tok.encode("😀")  # four single-byte tokens
    prompt = tok.encode("Say ") + emoji[:2]
    generated = emoji[2:] + tok.encode(" the")
    for skip in (False, True):
        pieces = _stream(tok, generated, prompt_ids=prompt, skip_special_tokens=skip)
        assert "".join(pieces) == tok.decode(generated, skip_special_tokens=skip)
        assert "".join(pieces).startswith("\ufffd")


@pytest.mark.parametrize("seed", range(3))
def test_stream_invariant_random_ids_after_a_random_prompt(
    neox_tokenizer_path: Path, seed: int
) -> None:
    """Random byte-heavy ids after random id prompts: every delta extends the full decode."""
    tok = Tokenizer.from_file(neox_tokenizer_path)
    rng = random.Random(seed)
    byte_ids = [tok.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    byte_ids = [i for i in byte_ids if i is not None]
    for _ in range(200):
        prompt = [rng.choice(byte_ids) for _ in range(rng.randrange(8))]
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.6 else rng.randrange(len(tok))
            for _ in range(rng.randrange(1, 20))
        ]
        skip = rng.random() < 0.5
        full = tok.decode(ids, skip_special_tokens=skip)
        pieces = _stream(tok, ids, prompt_ids=prompt, skip_special_tokens=skip)
        assert "".join(pieces) == full, (prompt, ids, skip)
        shown = ""
        for piece in pieces:
            shown += piece
            assert full.startswith(shown), (prompt, ids, skip)


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_invariant_tiny_byte_pieces(tiny_json: Path, text: str) -> None:
    tok = Tokenizer.from_file(tiny_json)
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 1  # it really streams


@pytest.mark.parametrize("seed", range(5))
def test_stream_invariant_random_ids(neox_tokenizer_path: Path, seed: int) -> None:
    """Arbitrary id sequences, invalid UTF-8 included: the invariant still holds."""
    tok = Tokenizer.from_file(neox_tokenizer_path)
    rng = random.Random(seed)
    # single-byte tokens (the vocabulary lacks the 13 bytes that never occur in UTF-8)
    byte_ids = [tok.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    byte_ids = [i for i in byte_ids if i is not None]
    assert len(byte_ids) == 256 - 13
    ids = [
        rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(len(tok)) for _ in range(300)
    ]
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_stream_work_is_windowed(tiny_json: Path) -> None:
    tok = Tokenizer.from_file(tiny_json)

    class Counting:
        decoded = 0

        def decode(self, ids, skip_special_tokens=False):
            Counting.decoded += len(ids)
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(STREAM_TEXTS) * 20)
    pieces = _stream(Counting(), ids)  # type: ignore[arg-type]
    assert "".join(pieces) == tok.decode(ids)
    # O(window) per token: total decoded ids grows linearly, far below the O(n^2) of re-decoding
    assert Counting.decoded < 20 * len(ids)


@pytest.mark.parametrize("seed", range(3))
def test_stream_skipping_special_tokens_random_ids(neox_tokenizer_path: Path, seed: int) -> None:
    """Special-heavy random ids (special, other added, byte and ordinary tokens, and prompts
    ending in specials), skipped: the invariant holds and every delta extends the decode."""
    tok = Tokenizer.from_file(neox_tokenizer_path)
    rng = random.Random(seed)
    special = sorted(tok.special_ids())
    added = sorted(tok.backend.get_added_tokens_decoder())
    byte_ids = [tok.token_to_id(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    pools = [special, added, [i for i in byte_ids if i is not None], range(len(tok))]
    for _ in range(200):
        prompt = [rng.choice(rng.choice(pools)) for _ in range(rng.randrange(8))]
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randrange(1, 30))]
        full = tok.decode(ids, skip_special_tokens=True)
        pieces = _stream(tok, ids, prompt_ids=prompt, skip_special_tokens=True)
        assert "".join(pieces) == full, (prompt, ids)
        shown = ""
        for piece in pieces:
            shown += piece
            assert full.startswith(shown), (prompt, ids)


def test_skipped_special_tokens_cost_no_decoding(tiny_json: Path) -> None:
    """A long run of skipped special tokens used to stay pending and be decoded again at each
    push: quadratic in the run's length."""
    tok = Tokenizer.from_file(tiny_json)
    eos = tok.token_to_id("<|endoftext|>")
    assert eos in tok.special_ids()

    class Counting:
        decoded = 0

        def special_ids(self):
            return tok.special_ids()

        def decode(self, ids, skip_special_tokens=False):
            Counting.decoded += len(ids)
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode("Hi") + [eos] * 500 + tok.encode(" there")
    pieces = _stream(Counting(), ids, skip_special_tokens=True)  # type: ignore[arg-type]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "Hi there"
    assert Counting.decoded < 100
