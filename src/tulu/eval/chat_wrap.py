"""Wrap an evaluation prompt as a single Tulu user turn, followed by an answer prefix.

The Tulu paper evaluates its chat models by putting the whole benchmark prompt (instructions,
few-shot exemplars and the question) into one user turn and then starting the assistant turn
with a short answer prefix ("The answer is:" for MMLU, "Answer:" for GSM8K), so the model
continues an answer rather than chatting. The prefix is appended directly after the assistant
header's newline, with no space: ``"...<|assistant|>\\nThe answer is:"``. No BOS is added (GPT-NeoX
models were not trained with one) and no EOS, since the assistant turn is still open.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ASSISTANT_HEADER", "USER_HEADER", "ProtocolName", "chat_wrap", "check_protocol"]

USER_HEADER = "<|user|>\n"
ASSISTANT_HEADER = "<|assistant|>\n"


def chat_wrap(prompt: str, answer_prefix: str = "") -> str:
    """Return ``"<|user|>\\n" + prompt + "\\n<|assistant|>\\n" + answer_prefix``.

    The prompt is used as given (callers strip it where the protocol says so), because MMLU
    strips the whole prompt while GSM8K only strips the question.
    """
    return USER_HEADER + prompt + "\n" + ASSISTANT_HEADER + answer_prefix


#: ``"paper"`` reproduces the paper's quirks, ``"clean"`` fixes them (see each task module).
ProtocolName = Literal["paper", "clean"]


def check_protocol(protocol: str) -> None:
    """Every task takes ``protocol="paper"`` (the paper's quirks) or ``"clean"``."""
    if protocol not in ("paper", "clean"):
        raise ValueError(f"unknown protocol {protocol!r} (expected 'paper' or 'clean')")
