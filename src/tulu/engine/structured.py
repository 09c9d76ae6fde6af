"""Structured output: a request's tokens constrained to a JSON schema, any JSON, a regular
expression, a list of choices or an EBNF grammar.

The grammars are compiled and matched by xgrammar, the library vLLM, SGLang and TensorRT-LLM
use; it is an optional dependency (``pip install 'tulu[structured]'``), imported only when a
request asks for structure. Per step, each constrained row's matcher fills one row of a token
bitmask (the tokens its grammar allows next) and the disallowed logits are set to -inf before
anything else runs, as in vLLM; after sampling, the row's matcher accepts the chosen token.
When the grammar is complete its matcher allows only the end-of-sequence token, and accepting
that ends the completion (finish reason "stop").

The tokenizer's vocabulary is handed to xgrammar as each token's exact bytes
(`tulu.token_strings.TokenStrings`); special tokens (``<|endoftext|>``, ``<|padding|>``) are
given as empty, which xgrammar never allows inside a grammar, and the EOS is the stop token.
Ids past the tokenizer's vocabulary (the model's padded embedding rows) are never allowed.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tulu.errors import GenerationError

if TYPE_CHECKING:
    from tulu.tokenizer import Tokenizer

__all__ = [
    "GrammarCompiler",
    "StructuredOutput",
    "apply_grammar_masks",
    "grammar_compiler",
    "matchers_for",
    "name_structured_field",
]

_KINDS = ("json", "json_object", "regex", "choice", "grammar")
# xgrammar's C++ errors hold "[12:00:00] /project/cpp/file.cc:123: " and its check text, at the
# start or nested inside another error's message.
# "SamplingParams.structured_output.regex cannot be compiled: ..." or "min_tokens cannot be
# combined with structured_output": where an error names the constraint.
_STRUCTURED_FIELD = re.compile(r"(?:SamplingParams\.)?structured_output(?:\.\w+)?")
_CPP_LOCATION = re.compile(r"\[[\d:]+\] \S+:\d+: (?:Check failed: .*? is false: )?")
#: Compiled grammars kept for reuse (vLLM's default): beyond it the least recently used go.
CACHE_LIMIT_BYTES = 512 << 20


def _fail(requirement: str, value: object) -> GenerationError:
    return GenerationError(f"SamplingParams.structured_output must be {requirement}, got {value!r}")


@dataclass(frozen=True)
class StructuredOutput:
    """What a completion must match: exactly one of the fields (vLLM's
    ``StructuredOutputsParams``).

    - ``json``: a JSON schema, as a dict or its JSON text (OpenAI's ``json_schema`` format);
    - ``json_object``: True for any JSON object (OpenAI's ``json_object`` format);
    - ``regex``: a regular expression the whole completion matches;
    - ``choice``: the completion is exactly one of these strings;
    - ``grammar``: an EBNF grammar in xgrammar's dialect (GBNF, with a ``root`` rule).
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, Sequence):
                raise _fail("a list of strings for choice", self.choice)
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise _fail("a non-empty list of non-empty strings for choice", self.choice)
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise _fail("a JSON schema (an object or its JSON text) for json", self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _fail(f"a non-empty string for {name}", value)
        if not isinstance(self.json_object, bool):
            raise _fail("a bool for json_object", self.json_object)
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise GenerationError(
                "SamplingParams.structured_output must set exactly one of "
                f"{', '.join(_KINDS)}; got {', '.join(given) if given else 'none'}"
            )

    @property
    def kind(self) -> str:
        """The field that is set: "json", "json_object", "regex", "choice" or "grammar"."""
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise GenerationError(
            "structured output needs the xgrammar package: pip install 'tulu[structured]'"
        ) from None
    return xgrammar


def _message(err: Exception) -> str:
    """xgrammar's error, without its C++ source location."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _CPP_LOCATION.sub("", text)


class GrammarCompiler:
    """Compiles a tokenizer's constraints once each (xgrammar caches compiled grammars) and
    hands out a fresh matcher per sequence. Safe to share between threads: xgrammar's compiler
    is made for concurrent compiles (vLLM compiles from a thread pool), so the server compiles
    in a worker thread while the engine thread looks up what is already compiled."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_id: int | None):
        from tulu.token_strings import TokenStrings

        if eos_token_id is None:  # a complete grammar would then allow no token at all
            raise GenerationError(
                "structured output needs an end-of-sequence token, and the tokenizer has none"
            )
        xgr = _xgrammar()
        if len(tokenizer) > vocab_size:
            raise GenerationError(
                f"the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size}"
            )
        strings = TokenStrings(tokenizer)
        special = tokenizer.special_ids()
        vocab = [b"" if i in special else bytes(strings.get(i)[1]) for i in range(len(tokenizer))]
        info = xgr.TokenizerInfo(
            vocab,
            xgr.VocabType.RAW,
            vocab_size=vocab_size,
            stop_token_ids=[eos_token_id],
        )
        self._xgr = xgr
        self._compiler = xgr.GrammarCompiler(
            info, max_threads=2, cache_limit_bytes=CACHE_LIMIT_BYTES
        )
        self._vocab_size = vocab_size
        # Specs already found to match some text: the server's compile checks, the engine's
        # compile of the same request then only looks the grammar up (bounded, oldest out).
        self._checked: dict[str, None] = {}
        self._checked_lock = threading.Lock()

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar; a bad schema, regex or grammar, or one that no text can
        match, is a GenerationError naming the field and the reason."""
        compiled = self._compile(spec)
        key = f"{spec.kind}:{json.dumps(getattr(spec, spec.kind), sort_keys=True)}"
        with self._checked_lock:
            if key in self._checked:
                return compiled
        bitmask = self._xgr.allocate_token_bitmask(1, self._vocab_size)
        self._xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
        if not bool(bitmask.any()):  # e.g. the regex [^\s\S]
            raise GenerationError(
                f"SamplingParams.structured_output.{spec.kind} matches no text: no token can "
                "start it"
            )
        with self._checked_lock:
            self._checked[key] = None
            if len(self._checked) > _CHECKED_LIMIT:
                del self._checked[next(iter(self._checked))]
        return compiled

    def _compile(self, spec: StructuredOutput) -> Any:
        compiler = self._compiler
        try:
            if spec.json is not None:
                return compiler.compile_json_schema(spec.json, any_whitespace=False)
            if spec.json_object:  # OpenAI's "json_object": an object, not any value
                return compiler.compile_json_schema({"type": "object"}, any_whitespace=False)
            if spec.regex is not None:
                return compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
                return compiler.compile_grammar(f"root ::= {alternatives}")
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as err:
            raise GenerationError(
                f"SamplingParams.structured_output.{spec.kind} cannot be compiled: {_message(err)}"
            ) from None

    def matcher(self, compiled: Any) -> Any:
        """A new matcher at the start of `compiled` (one per sequence: it holds its state)."""
        return self._xgr.GrammarMatcher(compiled)


_BUILDING = threading.Lock()
_CHECKED_LIMIT = 4096  # specs remembered as matching some text, per compiler


@functools.lru_cache(maxsize=4)
def _cached_compiler(
    tokenizer: Tokenizer, vocab_size: int, eos_token_id: int | None
) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size, eos_token_id)


def grammar_compiler(
    tokenizer: Tokenizer, vocab_size: int, eos_token_id: int | None
) -> GrammarCompiler:
    """The compiler of a tokenizer (as an object) for a model's vocabulary size and stop
    token, built once: it reads the whole vocabulary, so two threads asking
    first at the same time must not both build one."""
    with _BUILDING:
        return _cached_compiler(tokenizer, vocab_size, eos_token_id)


grammar_compiler.cache_clear = _cached_compiler.cache_clear  # type: ignore[attr-defined]


def matchers_for(
    spec: StructuredOutput,
    count: int,
    tokenizer: Tokenizer | None,
    vocab_size: int,
    eos_token_id: int | None,
) -> list[Any]:
    """`count` fresh matchers of `spec` (one per sequence), compiled for a model's vocabulary
    and stop token (a cache hit when the spec was compiled before); what the engine and the
    reference generator both need."""
    if tokenizer is None:
        raise GenerationError("structured_output needs a tokenizer")
    compiler = grammar_compiler(tokenizer, vocab_size, eos_token_id)
    compiled = compiler.compile(spec)
    return [compiler.matcher(compiled) for _ in range(count)]


def name_structured_field(message: str, where: str) -> str:
    """A structured output error reworded to name `where` (a flag or request field) where it
    names the constraint: "SamplingParams.structured_output.regex cannot be compiled: ..." or
    "... cannot be combined with structured_output"."""
    return _STRUCTURED_FIELD.sub(lambda _: where, message, count=1)


def apply_grammar_masks(logits: torch.Tensor, matchers: Sequence[Any | None]) -> torch.Tensor:
    """New float32 logits ``[B, V]`` in which each row with a matcher has -inf for every token
    its grammar does not allow next; rows whose matcher is None are unchanged."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    xgr = _xgrammar()
    logits = logits.float().clone()
    batch, vocab = logits.shape
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    if logits.device.type == "cuda":
        # xgrammar's CUDA kernel launches on the current device: make it the logits' one.
        with torch.cuda.device(logits.device):
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
    else:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
    return logits
