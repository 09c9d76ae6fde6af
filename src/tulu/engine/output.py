"""Generated token ids -> text deltas, with stop strings found across token boundaries.

A stop string may be split over several tokens, or end inside a multi-byte UTF-8 character,
so it is matched on the decoded text, never on token ids. Text that could still be the start
of a stop string is held back, so that a streaming client never sees any part of the stop
text (unless `include_stop` asks for it).

As in vLLM, stop strings are not looked for until more than `min_tokens` tokens have been
pushed, and then only in text that ends after that point: a stop string complete within the
first `min_tokens` tokens never stops the output (``min_tokens`` means at least that many
tokens, whatever ends the completion).
"""

from __future__ import annotations

from collections.abc import Sequence

from tulu.tokenizer import StreamDecoder, Tokenizer


class IncrementalOutput:
    """Accumulates one sequence's output text and reports stop strings as they complete."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        stop: Sequence[str] = (),
        *,
        include_stop: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ):
        self._decoder = StreamDecoder(
            tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens
        )
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._include_stop = include_stop
        self._min_tokens = min_tokens
        self._pushed = 0
        self._decoded = ""
        self._emitted = 0
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """The text released so far: never part of a possible stop string (all of it after
        `finish()`, cut at the stop string if one was found)."""
        return self._decoded[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add a token; return the text that may now be shown. Check `stopped_by` afterwards."""
        if self.stopped_by is not None:
            return ""
        before = len(self._decoded)
        self._decoded += self._decoder.push(token_id)
        self._pushed += 1
        if self._stop and self._find_stop(before):  # most requests have no stop strings
            return self._take(len(self._decoded))
        return self._take(len(self._decoded) - self._hold)

    def finish(self) -> str:
        """End of generation: release everything held back (after a last stop check)."""
        if self.stopped_by is None:
            before = len(self._decoded)
            self._decoded += self._decoder.flush()
            self._find_stop(before)
        return self._take(len(self._decoded))

    def _find_stop(self, before: int) -> bool:
        """Cut at the earliest stop string that ends in the text added after `before`."""
        if self._pushed <= self._min_tokens:
            return False
        best: tuple[int, str] | None = None
        for stop in self._stop:
            at = self._decoded.find(stop, max(0, before - len(stop) + 1))
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        self._decoded = self._decoded[: at + len(stop) if self._include_stop else at]
        self.stopped_by = stop
        return True

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = self._decoded[self._emitted : upto]
        self._emitted = upto
        return delta
