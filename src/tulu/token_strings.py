"""Each token's exact bytes and its text as OpenAI shows tokens in log-probabilities.

Shared by the OpenAI routes and `tulu generate --logprobs`: a token that is not valid UTF-8
on its own (part of a multi-byte character) is written ``bytes:\\xe2\\x80`` as OpenAI does,
and its exact bytes are given beside it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from tulu.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tulu.engine.reference import TokenLogprob


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted: printable Latin-1 bytes stand for
    themselves, the other bytes are numbered on from U+0100 in byte order."""
    direct = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {chr(b): b for b in direct}
    shifted = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class TokenStrings:
    """Each token id's exact bytes, and its text as OpenAI shows it in log-probabilities."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        try:
            from tokenizers import decoders

            self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        except Exception:  # an exotic decoder: fall back to decoding single tokens
            self._byte_level = False
        #: Whether `get` gives the bytes the tokenizer decodes (byte-level BPE); otherwise it
        #: gives the token decoded alone (e.g. U+FFFD for a byte-fallback piece).
        self.exact_bytes = self._byte_level
        added = getattr(backend, "get_added_tokens_decoder", dict)()
        self._added = {int(i): t.content for i, t in added.items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _raw(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:  # padding ids of the embedding matrix beyond the tokenizer
            return b""
        if self._byte_level:
            alphabet = byte_level_alphabet()
            if all(ch in alphabet for ch in piece):
                return bytes(alphabet[ch] for ch in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def get(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._raw(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            cached = self._cache[token_id] = (text, list(raw))
        return cached

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


# The log-probability written for a token the model rules out (-inf is not JSON), as vLLM does.
_IMPOSSIBLE = -9999.0


def token_logprobs(strings: TokenStrings, entries: list[TokenLogprob] | None) -> list[dict]:
    """A completion's log-probabilities as JSON, in OpenAI's chat format plus each token's
    id: ``{"token", "token_id", "logprob", "bytes", "top_logprobs": [...]}`` per token."""

    def described(token_id: int, logprob: float) -> dict:
        text, raw = strings.get(token_id)
        return {
            "token": text,
            "token_id": token_id,
            "logprob": max(logprob, _IMPOSSIBLE),
            "bytes": raw,
        }

    return [
        {
            **described(entry.token_id, entry.logprob),
            "top_logprobs": [described(alt_id, alt) for alt_id, alt in entry.top],
        }
        for entry in entries or []
    ]
