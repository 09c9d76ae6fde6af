"""Tests for tulu.interactive: ChatSession (history, system prompt, context trimming) and run_chat."""

from __future__ import annotations

import pytest

import tulu.interactive
from tulu.chat import generation_prompt
from tulu.demo import corpus_text, tiny_model, train_tokenizer
from tulu.engine.reference import generate_text
from tulu.engine.sampling import SamplingParams
from tulu.errors import GenerationError, TuluError
from tulu.interactive import HELP, ChatSession, run_chat
from tulu.model import GPTNeoXForCausalLM, preset
from tulu.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(corpus_text())


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> GPTNeoXForCausalLM:
    return tiny_model(len(tokenizer), seed=0)  # context window 512


@pytest.fixture(scope="module")
def small_window_model() -> GPTNeoXForCausalLM:
    config = preset(
        "pythia-14m",
        vocab_size=640,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        torch_dtype="float32",
    )
    net = GPTNeoXForCausalLM(config)
    net.init_weights(1)
    return net.eval()


class Recorder:
    """Stands in for tulu.interactive.generate_text: records every call and its result."""

    def __init__(self) -> None:
        self.messages: list[list[dict]] = []
        self.results = []

    def __call__(self, model, tokenizer, messages, params, **kwargs):
        self.messages.append([dict(m) for m in messages])
        result = generate_text(model, tokenizer, messages, params, **kwargs)
        self.results.append(result)
        return result


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    spy = Recorder()
    monkeypatch.setattr(tulu.interactive, "generate_text", spy)
    return spy


def prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(generation_prompt(messages, tokenizer.eos_token))


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------ ChatSession


def test_each_turn_adds_user_and_assistant(model, tokenizer, recorder) -> None:
    session = ChatSession(model, tokenizer, GREEDY)
    streamed: list[str] = []
    first = session.reply("Hello there", streamed.append)
    assert first and "".join(streamed) == first
    assert session.turns == [user("Hello there"), assistant(first)]
    second = session.reply("Tell me more", lambda _: None)
    assert session.turns == [
        user("Hello there"),
        assistant(first),
        user("Tell me more"),
        assistant(second),
    ]
    assert session.messages() == session.turns  # no system prompt
    # the second prompt is the whole conversation so far, in the Tulu format
    expected = prompt_ids(tokenizer, session.turns[:3])
    assert recorder.results[1].prompt_token_ids == expected
    # and the reply is what the reference generator gives for that conversation
    assert second == generate_text(model, tokenizer, session.turns[:3], GREEDY).text


def test_system_prompt_is_in_the_rendered_prompt(model, tokenizer, recorder) -> None:
    session = ChatSession(model, tokenizer, GREEDY, system="You answer in one word.")
    reply = session.reply("Hi", lambda _: None)
    system = {"role": "system", "content": "You answer in one word."}
    assert session.messages() == [system, user("Hi"), assistant(reply)]
    assert session.turns == [user("Hi"), assistant(reply)]  # the system prompt is not a turn
    ids = recorder.results[0].prompt_token_ids
    assert ids == prompt_ids(tokenizer, [system, user("Hi")])
    assert tokenizer.decode(ids).startswith("<|system|>\nYou answer in one word.\n<|user|>\nHi\n")
    assert ids != prompt_ids(tokenizer, [user("Hi")])


def test_old_exchanges_are_dropped_when_the_window_fills(
    small_window_model, tokenizer, recorder
) -> None:
    window = small_window_model.config.max_position_embeddings
    assert window == 64
    system = {"role": "system", "content": "Be brief."}
    session = ChatSession(small_window_model, tokenizer, GREEDY, system="Be brief.")
    log: list[dict] = []  # every turn ever taken
    questions = [f"Question number {i}: what do birds eat?" for i in range(8)]
    for question in questions:
        reply = session.reply(question, lambda _: None)
        log += [user(question), assistant(reply)]
        # what is kept is always the newest exchanges, whole and in order
        assert len(session.turns) % 2 == 0
        assert session.turns == log[len(log) - len(session.turns) :]
        assert session.turns[-2:] == [user(question), assistant(reply)]
    # every prompt fitted the window, and every prompt kept the system prompt first
    for messages, result in zip(recorder.messages, recorder.results, strict=True):
        assert messages[0] == system
        assert len(result.prompt_token_ids) < window
        assert result.prompt_token_ids == prompt_ids(tokenizer, messages)
    assert len(session.turns) < len(log), "the conversation never outgrew the window"
    assert session.messages()[0] == system
    # trimming drops only as much as needed: one more exchange would not have fitted
    for messages in recorder.messages:
        index = next(i for i, m in enumerate(log) if m == messages[1])
        if index >= 2:
            longer = [system, *log[index - 2 : index], *messages[1:]]
            assert len(prompt_ids(tokenizer, longer)) >= window


def test_message_longer_than_window_raises_and_is_not_kept(small_window_model, tokenizer) -> None:
    session = ChatSession(small_window_model, tokenizer, GREEDY, system="Be brief.")
    session.reply("Hi", lambda _: None)
    before = list(session.turns)
    assert len(before) == 2
    with pytest.raises(GenerationError, match="context window is 64 tokens"):
        session.reply("birds " * 80, lambda _: None)
    # the failed user turn is not kept, and the earlier exchange survives
    assert session.turns == before
    assert session.system == "Be brief."


def test_stop_token_id_outside_the_vocabulary_is_refused_at_once(model, tokenizer) -> None:
    """`tulu chat --stop-token-ids 999999` must fail at start, not on every message."""
    params = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=[3, 999999])
    with pytest.raises(GenerationError, match=r"stop_token_ids contains 999999, outside the vocab"):
        ChatSession(model, tokenizer, params)


# ---------------------------------------------------------------------------------- run_chat


def drive(session: ChatSession, lines: list[str]) -> str:
    pending = list(lines)
    out: list[str] = []

    def read(prompt: str) -> str:
        out.append(prompt)
        if not pending:
            raise EOFError
        return pending.pop(0)

    run_chat(session, read, out.append)
    return "".join(out)


def test_run_chat_commands(model, tokenizer) -> None:
    session = ChatSession(model, tokenizer, GREEDY)
    out = drive(session, ["Hello", "/history", "/system Be kind.", "/history", "/bogus", "/reset"])
    reply = generate_text(model, tokenizer, [user("Hello")], GREEDY).text
    assert f">>> {reply}\n" in out
    assert f"[user] Hello\n[assistant] {reply}\n" in out
    assert "(system prompt set; conversation reset)" in out
    assert ">>> [system] Be kind.\n>>> " in out
    assert f"unknown command '/bogus'\n{HELP}\n" in out
    assert "(conversation reset)" in out
    assert out.endswith(">>> \n")  # EOF
    assert session.system == "Be kind." and session.turns == []


def test_a_message_that_begins_with_a_slash_is_sent_with_two(model, tokenizer) -> None:
    session = ChatSession(model, tokenizer, GREEDY)
    out = drive(session, ["//etc/hosts is where?"])
    reply = generate_text(model, tokenizer, [user("/etc/hosts is where?")], GREEDY).text
    assert "unknown command" not in out
    assert session.turns == [user("/etc/hosts is where?"), {"role": "assistant", "content": reply}]


def test_run_chat_exit_and_interrupt(model, tokenizer) -> None:
    session = ChatSession(model, tokenizer, GREEDY)
    out = drive(session, ["/exit", "Hello"])
    assert out.endswith(">>> ") and session.turns == []

    def interrupted(prompt: str) -> str:
        raise KeyboardInterrupt

    written: list[str] = []
    run_chat(session, interrupted, written.append)  # Ctrl-C at the prompt ends the chat
    assert written[-1] == "\n"


def test_run_chat_reports_generation_errors_and_goes_on(small_window_model, tokenizer) -> None:
    session = ChatSession(small_window_model, tokenizer, GREEDY)
    out = drive(session, ["birds " * 80, "Hi"])
    assert "\nerror: the message needs" in out and "64 tokens" in out
    assert [m["role"] for m in session.turns] == ["user", "assistant"]
    assert session.turns[0] == user("Hi")


def test_run_chat_reports_invalid_text_and_keeps_the_conversation(model, tokenizer) -> None:
    """A line that is not valid Unicode (undecodable stdin bytes arrive as surrogates) is
    reported like any bad message; the chat and its history go on."""
    session = ChatSession(model, tokenizer, GREEDY)
    out = drive(session, ["Hello", "caf\udce9", "/history"])
    assert "\nerror: " in out and "unpaired surrogate" in out
    assert [m["role"] for m in session.turns] == ["user", "assistant"]
    assert session.turns[0] == user("Hello")


def test_invalid_text_is_reported_at_its_place_in_the_message(model, tokenizer) -> None:
    """The position names the character of the message the user typed, not of the rendered
    conversation (history and role headers) that the tokenizer was given."""
    session = ChatSession(model, tokenizer, GREEDY)
    session.reply("Hello", lambda _: None)
    out = drive(session, ["caf\udce9 au lait"])
    assert (
        "\nerror: the message: the text contains an unpaired surrogate '\\udce9' at character 3 "
        in out
    )
    assert [m["role"] for m in session.turns] == ["user", "assistant"]


class InterruptFirst:
    """Stands in for tulu.interactive.generate_text: the first call streams a little text and
    then gets Ctrl-C (KeyboardInterrupt, as SIGINT raises it mid-reply); later calls generate."""

    def __init__(self) -> None:
        self.messages: list[list[dict]] = []

    def __call__(self, model, tokenizer, messages, params, **kwargs):
        self.messages.append([dict(m) for m in messages])
        if len(self.messages) == 1:
            kwargs["on_text"]("par")
            raise KeyboardInterrupt
        return generate_text(model, tokenizer, messages, params, **kwargs)


def test_ctrl_c_during_a_reply_stops_it_and_keeps_the_chat(model, tokenizer, monkeypatch) -> None:
    spy = InterruptFirst()
    monkeypatch.setattr(tulu.interactive, "generate_text", spy)
    session = ChatSession(model, tokenizer, GREEDY)
    try:
        out = drive(session, ["Hello", "Hi", "/history"])
    except KeyboardInterrupt:  # re-raised, it would stop the whole test run
        pytest.fail("Ctrl-C during a reply ended the chat")
    reply = generate_text(model, tokenizer, [user("Hi")], GREEDY).text
    assert ">>> par\n(reply interrupted; that message is not kept)\n>>> " in out
    # the chat went on, and the interrupted exchange is not part of the next prompt
    assert spy.messages[1] == [user("Hi")]
    assert f">>> {reply}\n>>> [user] Hi\n[assistant] {reply}\n>>> \n" in out
    assert session.turns == [user("Hi"), assistant(reply)]


def test_interrupted_reply_leaves_the_history_untouched(small_window_model, tokenizer) -> None:
    """Even when the new message made old exchanges drop out of the window: those are only
    dropped for a reply that completes."""
    session = ChatSession(small_window_model, tokenizer, GREEDY)
    for i in range(3):
        session.reply(f"Question number {i}: what do birds eat?", lambda _: None)
    before = list(session.turns)

    def interrupt(_: str) -> None:
        raise KeyboardInterrupt

    long = "Tell me about the birds by the sea " * 3
    assert len(prompt_ids(tokenizer, [*before, user(long)])) >= 64  # would drop old turns
    with pytest.raises(KeyboardInterrupt):
        session.reply(long, interrupt)
    assert session.turns == before


def test_system_prompt_that_is_not_valid_text_is_refused(model, tokenizer) -> None:
    """`/system` with undecodable bytes (surrogates) is refused and the old prompt kept,
    rather than making every later message fail."""
    session = ChatSession(model, tokenizer, GREEDY, system="Be kind.")
    out = drive(session, ["/system caf\udce9", "/history"])
    assert "error: the system prompt: the text contains an unpaired surrogate" in out
    assert ">>> [system] Be kind.\n>>> " in out
    assert session.system == "Be kind."
    with pytest.raises(
        TuluError, match="the system prompt: the text contains an unpaired surrogate"
    ):
        ChatSession(model, tokenizer, GREEDY, system="caf\udce9")
