"""`tulu chat`: an interactive conversation that keeps its history and streams replies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tulu.chat import Message, generation_prompt
from tulu.engine.reference import generate_text
from tulu.engine.sampling import SamplingParams, check_token_ids_in_vocab
from tulu.errors import GenerationError, TuluError
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.tokenizer import Tokenizer

HELP = """Commands:
  /reset         forget the conversation (keeps the system prompt)
  /system TEXT   set the system prompt (empty TEXT removes it) and reset
  /history       show the conversation so far
  /exit          quit (Ctrl-D works too)
Anything else is sent to the model; start a message with // to send one that begins with /
(the first / is dropped). Ctrl-C stops a reply and keeps the chat."""


@dataclass
class ChatSession:
    """The state of one conversation: an optional system prompt and the turns so far."""

    model: GPTNeoXForCausalLM
    tokenizer: Tokenizer
    params: SamplingParams
    system: str | None = None
    turns: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A stop token id outside the vocabulary would fail every message; say so at once.
        check_token_ids_in_vocab(self.params, self.model.config.vocab_size)
        self.set_system(self.system)

    def set_system(self, text: str | None) -> None:
        """Set (or, with None or "", remove) the system prompt.

        Text the tokenizer cannot encode (undecodable input bytes arrive as surrogates) is
        refused here: accepted, it would make every later message fail.
        """
        if text:
            try:
                self.tokenizer.encode(text)
            except TuluError as err:
                raise TuluError(f"the system prompt: {err}") from None
        self.system = text or None

    def messages(self) -> list[Message]:
        head: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def _prompt_tokens(self, messages: list[Message]) -> int:
        text = generation_prompt(messages, self.tokenizer.eos_token)
        return len(self.tokenizer.encode(text))

    def reply(self, user_text: str, on_text: Callable[[str], None]) -> str:
        """Add a user turn, stream the assistant's answer through `on_text`, keep both turns.

        When the conversation outgrows the context window, the oldest turns are dropped
        (the system prompt stays) until the prompt fits. The history changes only when the
        reply completes: an error or Ctrl-C (KeyboardInterrupt) leaves it as it was.
        Text the tokenizer cannot encode is refused with its position in the message, not in
        the rendered conversation (which starts with the history and the role headers).
        """
        try:
            self.tokenizer.encode(user_text)
        except TuluError as err:
            raise TuluError(f"the message: {err}") from None
        window = self.model.config.max_position_embeddings
        head: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        alone = self._prompt_tokens(head + [{"role": "user", "content": user_text}])
        if alone >= window:
            # Refuse before touching the history: dropping it would not make this fit.
            raise GenerationError(
                f"the message needs {alone} tokens with the system prompt but the model's "
                f"context window is {window} tokens"
            )
        turns: list[Message] = [*self.turns, {"role": "user", "content": user_text}]
        while len(turns) > 1 and self._prompt_tokens(head + turns) >= window:
            del turns[:2]  # the oldest user/assistant exchange
        result = generate_text(
            self.model, self.tokenizer, head + turns, self.params, on_text=on_text
        )
        self.turns = [*turns, {"role": "assistant", "content": result.text or ""}]
        return result.text or ""


def run_chat(
    session: ChatSession,
    read: Callable[[str], str],
    write: Callable[[str], None],
) -> None:
    """The read-eval-print loop. `read(prompt)` raises EOFError at the end of input."""
    write(
        f"Chatting in the Tulu format. {HELP.splitlines()[0]} /reset, /system, /history, /exit.\n"
    )
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("//"):
            line = line.replace("/", "", 1)  # a message that begins with "/", not a command
        elif text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.turns.clear()
                write("(conversation reset)\n")
            elif command == "/system":
                try:
                    session.set_system(argument.strip())
                except TuluError as err:
                    write(f"error: {err}\n")
                    continue
                session.turns.clear()
                write(
                    f"(system prompt {'set' if session.system else 'removed'}; conversation reset)\n"
                )
            elif command == "/history":
                for message in session.messages():
                    write(f"[{message['role']}] {message['content']}\n")
            elif command == "/help":
                write(HELP + "\n")
            else:
                write(f"unknown command {command!r}\n{HELP}\n")
            continue
        try:
            session.reply(line, write)
        except TuluError as err:  # a bad message (too long, not valid Unicode): keep chatting
            write(f"\nerror: {err}\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the conversation
            write("\n(reply interrupted; that message is not kept)\n")
            continue
        write("\n")
