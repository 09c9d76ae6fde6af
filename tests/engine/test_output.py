"""Tests for tulu.engine.output.IncrementalOutput: deltas, stop strings, held-back text.

Every test runs against a tiny byte-level BPE trained here (always available); most also run
against the real GPT-NeoX-20B tokenizer from ../shared (skipped when it is absent). Token ids
are fed one at a time, as a generator would, and the invariants of streaming are checked
after every push: the concatenated deltas are always a prefix of the final text, never a
character of a (not included) stop string is shown, and nothing is shown twice.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from helpers import train_tiny_bpe
from tulu.engine.output import IncrementalOutput
from tulu.tokenizer import Tokenizer

EOT = "<|endoftext|>"

# ASCII only, so that every non-ASCII character is split into byte-level tokens.
TRAIN_TEXT = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "User: how are you? Assistant: fine, thanks. ###END### done",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
] * 3


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    """A byte-level BPE trained on TRAIN_TEXT (vocab 300, <|endoftext|> = 0): always available;
    conftest's `tok` runs a test with it and with the real tokenizer."""
    return Tokenizer(train_tiny_bpe(TRAIN_TEXT), source="<tiny test BPE>")


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    deltas: list[str] = field(default_factory=list)  # one per push, "" included
    final: str = ""  # what finish() returned
    stopped_at: int | None = None  # index of the token whose push found the stop
    output: IncrementalOutput | None = None

    @property
    def shown(self) -> str:
        return "".join(self.deltas) + self.final


def feed(
    tokenizer: Tokenizer,
    ids: Sequence[int],
    stop: Sequence[str] = (),
    *,
    prompt_ids: Sequence[int] | None = None,
    include_stop: bool = False,
    skip_special_tokens: bool = True,
    keep_pushing: bool = True,
    min_tokens: int = 0,
) -> Run:
    """Push `ids` one by one, then finish(); check the streaming invariants on the way."""
    out = IncrementalOutput(
        tokenizer,
        prompt_ids,
        stop,
        include_stop=include_stop,
        skip_special_tokens=skip_special_tokens,
        min_tokens=min_tokens,
    )
    run = Run(output=out)
    for i, token in enumerate(ids):
        if run.stopped_at is not None and not keep_pushing:
            break
        delta = out.push(token)
        run.deltas.append(delta)
        shown = "".join(run.deltas)
        # Whatever was shown is final: out.text only ever grows past it.
        assert out.text.startswith(shown), (shown, out.text)
        if run.stopped_at is not None:
            assert delta == "", "push() after the stop must return nothing"
        elif out.stopped_by is not None:
            run.stopped_at = i
            # Once a stop is found, everything up to it is delivered at once.
            assert shown == out.text
    text_before_finish = out.text
    run.final = out.finish()
    if run.stopped_at is not None:
        assert run.final == ""
        assert out.text == text_before_finish
    assert run.shown == out.text
    assert out.finish() == "", "a second finish() returns nothing"
    return run


def split_tokens(tokenizer: Tokenizer, text: str, piece: str) -> list[int]:
    """The ids (within `text`'s encoding) of the tokens that overlap `piece`'s first occurrence."""
    ids = tokenizer.encode(text)
    start = text.index(piece)
    end = start + len(piece)
    overlapping: list[int] = []
    group: list[int] = []  # tokens since the last complete-UTF-8 boundary
    pos = 0
    for k in range(1, len(ids) + 1):
        group.append(k - 1)
        decoded = tokenizer.decode(ids[:k])
        if decoded.endswith("\ufffd") and k < len(ids):
            continue  # mid-character: these bytes count with the next complete prefix
        new_pos = len(decoded)
        if new_pos > start and pos < end:
            overlapping.extend(group)
        pos, group = new_pos, []
    return overlapping


# ----------------------------------------------------------------------------------------------
# Plain detokenization
# ----------------------------------------------------------------------------------------------

ROUND_TRIP_TEXTS = [
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Accents: café, naïve, façade, Ångström.",
    "Emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 too",
    "中文字符测试，日本語のテキスト、한국어",
    "  leading and trailing spaces  ",
    "x",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_deltas_concatenate_to_the_decoded_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    run = feed(tok, ids)
    assert run.shown == text == tok.decode(ids)
    assert run.output.stopped_by is None
    assert all("\ufffd" not in d for d in run.deltas), "half a character was shown"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_deltas_with_unmatched_stop_strings(tok: Tokenizer, text: str) -> None:
    """Stops that never match: the hold-back changes when text is shown, not what is shown."""
    ids = tok.encode(text)
    run = feed(tok, ids, stop=["@@never@@", "Z"])
    assert run.shown == text
    assert run.output.stopped_by is None


def test_without_stops_nothing_is_held_back(tok: Tokenizer) -> None:
    text = "Hello world. The quick brown fox"
    ids = tok.encode(text)
    out = IncrementalOutput(tok)
    shown = ""
    for k, token in enumerate(ids, start=1):
        shown += out.push(token)
        assert shown == tok.decode(ids[:k])
    assert out.finish() == ""


def test_prompt_context_keeps_the_leading_space(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello")
    ids = tok.encode(" world")
    # Decoded alone, some byte-level tokenizers would still give " world"; with the prompt as
    # context the first delta must be exactly the text the token adds after the prompt.
    run = feed(tok, ids, prompt_ids=prompt)
    full = tok.decode(prompt + ids)
    assert run.shown == full[len(tok.decode(prompt)) :] == " world"


# ----------------------------------------------------------------------------------------------
# Stop strings
# ----------------------------------------------------------------------------------------------

STOP_CASES = [
    # (text, stop, expected text before the stop)
    ("Hello world\n\nUser: how are you", "\n\nUser:", "Hello world"),
    ("The answer is 42.###END### more", "###END###", "The answer is 42."),
    ("print(add(1, 2)) and more", "(1, 2)", "print(add"),
]


@pytest.mark.parametrize(("text", "stop", "before"), STOP_CASES)
def test_stop_split_across_tokens_is_found_and_never_shown(
    tok: Tokenizer, text: str, stop: str, before: str
) -> None:
    ids = tok.encode(text)
    spanning = split_tokens(tok, text, stop)
    assert len(spanning) >= 2, f"the test needs {stop!r} split over tokens, got {spanning}"
    run = feed(tok, ids, stop=[stop])
    out = run.output
    assert out.stopped_by == stop
    assert out.text == before
    assert run.shown == before
    # It stops on the token that completes the stop string, not earlier, not later.
    assert run.stopped_at == spanning[-1]
    # At every step, what was shown is a prefix of the text before the stop: no character of
    # the stop string was ever shown, not even its first one.
    shown = ""
    for delta in run.deltas:
        shown += delta
        assert before.startswith(shown), shown


@pytest.mark.parametrize(("text", "stop", "before"), STOP_CASES)
def test_include_stop_keeps_the_stop_string(
    tok: Tokenizer, text: str, stop: str, before: str
) -> None:
    ids = tok.encode(text)
    run = feed(tok, ids, stop=[stop], include_stop=True)
    assert run.output.stopped_by == stop
    assert run.output.text == before + stop
    assert run.shown == before + stop
    assert run.stopped_at == split_tokens(tok, text, stop)[-1]


def test_stop_matches_with_generation_stopped_at_the_stop(tok: Tokenizer) -> None:
    """A generator stops pushing after the stop: the result is the same."""
    text, stop, before = STOP_CASES[0]
    run = feed(tok, tok.encode(text), stop=[stop], keep_pushing=False)
    assert run.output.text == before == run.shown


def test_stop_at_the_very_start(tok: Tokenizer) -> None:
    run = feed(tok, tok.encode("###END### and the rest"), stop=["###END###"])
    assert run.output.stopped_by == "###END###"
    assert run.output.text == "" == run.shown


@pytest.mark.parametrize("order", [1, -1])
def test_earliest_stop_wins_when_several_complete_together(tok: Tokenizer, order: int) -> None:
    # " three" completes both stops on the same token; "two three" starts earlier.
    stops = ["two three", "three"][::order]
    run = feed(tok, tok.encode("one two three four"), stop=stops)
    assert run.output.stopped_by == "two three"
    assert run.output.text == "one " == run.shown


@pytest.mark.parametrize("order", [1, -1])
def test_earliest_stop_wins(tok: Tokenizer, order: int) -> None:
    stops = ["world", "lo w"][::order]
    run = feed(tok, tok.encode("Hello world"), stop=stops)
    assert run.output.stopped_by == "lo w"
    assert run.output.text == "Hel" == run.shown


def test_first_completed_stop_ends_generation(tok: Tokenizer) -> None:
    """A short stop that completes first ends it even if a longer one would start earlier."""
    text = "say hello world now"
    ids = tok.encode(text)
    run = feed(tok, ids, stop=["hello world", "hel"])
    assert run.output.stopped_by == "hel"
    assert run.output.text == "say "


def test_stop_repeated_in_text_stops_at_first_occurrence(tok: Tokenizer) -> None:
    run = feed(tok, tok.encode("a: b: c: d"), stop=[": "])
    assert run.output.stopped_by == ": "
    assert run.output.text == "a"


def test_min_tokens_holds_back_stop_strings_as_vllm_does(tok: Tokenizer) -> None:
    """A stop string counts only once more than min_tokens tokens are out, and only if it
    ends after them: one complete within the first min_tokens tokens never stops."""
    text = "a: b: c: d"
    ids = tok.encode(text)
    first = next(k for k in range(1, len(ids) + 1) if ": " in tok.decode(ids[:k]))
    run = feed(tok, ids, stop=[": "], min_tokens=first)  # the first ": " is inside them
    assert run.output.stopped_by == ": "
    assert run.output.text == "a: b"
    assert run.stopped_at is not None and run.stopped_at >= first
    # Longer than the whole output: no stop string ever counts.
    run = feed(tok, ids, stop=[": "], min_tokens=len(ids))
    assert run.output.stopped_by is None and run.output.text == text
    # A stop string that starts inside the first min_tokens tokens but ends after them counts.
    run = feed(tok, ids, stop=["a: b: c"], min_tokens=first)
    assert run.output.stopped_by == "a: b: c" and run.output.text == ""


def test_text_before_the_stop_is_fully_delivered(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog.###END###"
    run = feed(tok, tok.encode(text), stop=["###END###"])
    assert run.shown == "The quick brown fox jumps over the lazy dog."
    # It arrived progressively (held back by at most len(stop) - 1 characters).
    assert sum(1 for d in run.deltas if d) > 1
    for k in range(len(run.deltas)):
        if run.stopped_at is not None and k >= run.stopped_at:
            break
        shown = "".join(run.deltas[: k + 1])
        so_far = tok.decode(tok.encode(text)[: k + 1]).rstrip("\ufffd")
        assert len(so_far) - len(shown) <= len("###END###") - 1


def test_partial_stop_prefix_is_held_then_released_by_finish(tok: Tokenizer) -> None:
    text = "Hello world\n\nUs"
    stop = "\n\nUser:"
    ids = tok.encode(text)
    run = feed(tok, ids, stop=[stop])
    assert run.output.stopped_by is None
    pushed = "".join(run.deltas)
    assert "\n" not in pushed, "a possible start of the stop string was shown early"
    assert run.final.endswith("\n\nUs")
    assert run.shown == text == run.output.text


def test_partial_prefix_that_turns_out_not_to_be_a_stop_is_released(tok: Tokenizer) -> None:
    text = "a ### b ###END"
    run = feed(tok, tok.encode(text), stop=["###END###"])
    assert run.output.stopped_by is None
    assert run.shown == text


def test_push_after_stop_returns_nothing(tok: Tokenizer) -> None:
    out = IncrementalOutput(tok, stop=["world"])
    shown = ""
    for token in tok.encode("Hello world"):
        shown += out.push(token)
    assert out.stopped_by == "world"
    for token in tok.encode(" and more world text"):
        assert out.push(token) == ""
    assert out.finish() == ""
    assert out.text == "Hello " == shown
    assert out.stopped_by == "world"


def test_empty_stop_strings_are_ignored(tok: Tokenizer) -> None:
    run = feed(tok, tok.encode("Hello world"), stop=["", "xyz"])
    assert run.output.stopped_by is None
    assert run.shown == "Hello world"


def test_stop_found_with_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("User: hi\nAssistant:")
    run = feed(tok, tok.encode(" fine, thanks.\nUser: bye"), stop=["\nUser:"], prompt_ids=prompt)
    assert run.output.stopped_by == "\nUser:"
    assert run.shown == " fine, thanks."


def test_stop_in_prompt_does_not_count(tok: Tokenizer) -> None:
    """Only generated text is searched: the prompt is context for decoding, not output."""
    prompt = tok.encode("###END### Hello")
    run = feed(tok, tok.encode(" world"), stop=["###END###", "Hello"], prompt_ids=prompt)
    assert run.output.stopped_by is None
    assert run.shown == " world"


# ----------------------------------------------------------------------------------------------
# Multi-byte UTF-8
# ----------------------------------------------------------------------------------------------

UTF8_CASES = [
    # (text, stop) with the stop a character made of several byte-level tokens
    ("Party 🎉 time", "🎉"),
    ("Emoji 😀👍🏽 end", "👍"),
    ("中文字符测试，日本語", "测"),
    ("abc é def", "é"),
]


def _multi_token_char(tok: Tokenizer, text: str, stop: str) -> bool:
    return len(split_tokens(tok, text, stop)) >= 2


@pytest.mark.parametrize(("text", "stop"), UTF8_CASES)
@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_inside_multibyte_text(
    tok: Tokenizer, text: str, stop: str, include_stop: bool
) -> None:
    if not _multi_token_char(tok, text, stop):
        pytest.skip(f"{stop!r} is a single token in this tokenizer")
    run = feed(tok, tok.encode(text), stop=[stop], include_stop=include_stop)
    before = text[: text.index(stop)]
    expected = before + stop if include_stop else before
    assert run.output.stopped_by == stop
    assert run.output.text == expected == run.shown
    assert all("\ufffd" not in d for d in run.deltas)
    assert run.stopped_at == split_tokens(tok, text, stop)[-1]
    if not include_stop:
        assert not any(stop in d for d in run.deltas)


def test_multibyte_chars_are_multi_token_in_the_tiny_tokenizer(tiny_tok: Tokenizer) -> None:
    """Guard: the tiny tokenizer really splits these characters (so the tests above run)."""
    for text, stop in UTF8_CASES:
        assert _multi_token_char(tiny_tok, text, stop), stop


def test_multi_character_stop_ending_inside_an_emoji(tok: Tokenizer) -> None:
    text = "go 🎉🎉 stop 🎉 end"
    run = feed(tok, tok.encode(text), stop=["p 🎉"])
    assert run.output.stopped_by == "p 🎉"
    assert run.shown == "go 🎉🎉 sto"


def test_incomplete_character_at_the_end_is_released_by_finish(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🎉")
    spanning = split_tokens(tok, "ok 🎉", "🎉")
    assert len(spanning) >= 2
    cut = ids[: spanning[-1]]  # the emoji's last byte never arrives
    run = feed(tok, cut, stop=["zzz"])
    assert run.output.stopped_by is None
    assert "\ufffd" not in "".join(run.deltas)
    assert run.shown == tok.decode(cut)
    assert run.shown.startswith("ok")


# ----------------------------------------------------------------------------------------------
# Special tokens
# ----------------------------------------------------------------------------------------------


def test_endoftext_is_skipped_by_default(tok: Tokenizer) -> None:
    ids = tok.encode("Hi" + EOT + " there")
    assert tok.eos_token_id in ids
    run = feed(tok, ids)
    assert run.shown == "Hi there"


def test_endoftext_is_kept_without_skip_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Hi" + EOT + " there")
    run = feed(tok, ids, skip_special_tokens=False)
    assert run.shown == "Hi" + EOT + " there"


def test_endoftext_as_a_stop_string(tok: Tokenizer) -> None:
    ids = tok.encode("Hi" + EOT + " there")
    kept = feed(tok, ids, stop=[EOT], skip_special_tokens=False)
    assert kept.output.stopped_by == EOT
    assert kept.shown == "Hi"
    # Skipped special tokens are not text, so they cannot match a stop string.
    skipped = feed(tok, ids, stop=[EOT])
    assert skipped.output.stopped_by is None
    assert skipped.shown == "Hi there"


def test_stop_across_a_skipped_special_token(tok: Tokenizer) -> None:
    """With the special token skipped the text is 'Hi there', and a stop spanning the gap
    matches that text."""
    ids = tok.encode("Hi" + EOT + " there")
    run = feed(tok, ids, stop=["i t"])
    assert run.output.stopped_by == "i t"
    assert run.shown == "H"


# ----------------------------------------------------------------------------------------------
# Randomised check against an independent oracle (tiny tokenizer, always runs)
# ----------------------------------------------------------------------------------------------

ALPHABET = list("ab c\n:#") + ["é", "🎉", "中"]


def _oracle(tokenizer: Tokenizer, ids: list[int], stops: list[str], include: bool):
    """Expected (text, stopped_by) computed from whole-prefix decodes.

    Text becomes visible at token boundaries where the decoded prefix is complete UTF-8. At the
    first such boundary where some stop occurrence lies entirely inside the text, the
    occurrence that starts earliest wins (ties: the first stop in the list).
    """
    full = tokenizer.decode(ids)
    boundaries = []
    for k in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:k])
        if not decoded.endswith("\ufffd"):
            boundaries.append(len(decoded))
    boundaries.append(len(full))
    occurrences = []  # (start, list index, stop)
    for index, stop in enumerate(stops):
        at = full.find(stop)
        while at != -1:
            occurrences.append((at, index, stop))
            at = full.find(stop, at + 1)
    for boundary in boundaries:
        done = [o for o in occurrences if o[0] + len(o[2]) <= boundary]
        if done:
            at, _, stop = min(done)
            return full[: at + len(stop)] if include else full[:at], stop
    return full, None


def test_random_texts_against_oracle(tiny_tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for case in range(300):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.6 and len(text) > 1:
                i = rng.randrange(len(text))
                stops.append(text[i : i + rng.randint(1, 4)])
            else:
                stops.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3))))
        include = rng.random() < 0.5
        ids = tiny_tok.encode(text)
        run = feed(tiny_tok, ids, stop=stops, include_stop=include)
        expected_text, expected_stop = _oracle(tiny_tok, ids, stops, include)
        where = f"case {case}: text={text!r} stops={stops!r} include={include}"
        assert run.output.stopped_by == expected_stop, where
        assert run.output.text == expected_text, where
        assert run.shown == expected_text, where
