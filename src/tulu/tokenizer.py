"""The checkpoint's own tokenizer, with its special tokens.

`Tokenizer` wraps a `tokenizers.Tokenizer` built from the checkpoint's ``tokenizer.json`` and
adds what that file does not say on its own: which strings are the BOS / EOS / UNK / PAD
tokens. Those come from ``tokenizer_config.json`` and ``special_tokens_map.json`` in the same
directory, the way transformers reads them, so a checkpoint tokenizes identically here and in
transformers.

Two decisions matter for training and serving:

- `Tokenizer.encode` never adds template tokens (no BOS, no EOS). The Tulu chat format
  (`tulu.chat`) writes the EOS string into the text itself, and GPT-NeoX models were not
  trained with a BOS. Special tokens written literally in the text (``<|endoftext|>``) are
  still recognised as their ids, because ``tokenizers`` matches added tokens before BPE.
- A named special token that the vocabulary lacks is added as a special token and gets the
  next free id. The released Pythia-6.9B-Tulu checkpoint relies on this: its config names
  ``<pad>``, which is not in the GPT-NeoX-20B vocabulary (ids 0..50276), so it becomes 50277.

`StreamDecoder` turns a stream of generated ids into text without ever emitting half of a
multi-byte UTF-8 character, in O(window) work per token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from tulu.chat_template import CHAT_TEMPLATE
from tulu.errors import TokenizerError
from tulu.hub import looks_like_hub_id, snapshot

__all__ = ["SPECIAL_TOKEN_NAMES", "StreamDecoder", "Tokenizer", "check_text"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

#: What `Tokenizer.load` fetches of a hub repository: the files `from_dir` reads, no weights.
TOKENIZER_HUB_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)

#: The special-token fields we read and write, in the order new tokens are added.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

#: GPT-NeoX's single special token: BOS, EOS and UNK at once when nothing else is configured.
NEOX_ENDOFTEXT = "<|endoftext|>"

# transformers writes int(1e30) as model_max_length when the limit is unknown.
_UNSET_MAX_LENGTH = int(1e29)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: not UTF-8 text: {exc}") from exc


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc


def _read_json_object(path: Path) -> dict[str, Any]:
    data = _parse_json(path, _read_text(path))
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, where: str) -> str | None:
    """A special-token value as a string: either a plain string or AddedToken form."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        if isinstance(content, str):
            return content
        raise TokenizerError(f"{where}: expected a string 'content' in the token object")
    raise TokenizerError(
        f"{where}: expected a string or an object with 'content', got {type(value).__name__}"
    )


def _load_backend(path: Path) -> _Backend:
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    text = _read_text(path)
    data = _parse_json(path, text)  # for a message naming the line, before the library sees it
    if not isinstance(data, dict) or "model" not in data:
        raise TokenizerError(f"{path}: not a tokenizers JSON file (no 'model' field)")
    try:
        backend = _Backend.from_str(text)
    except Exception as exc:  # the library raises plain Exception subclasses
        raise TokenizerError(f"{path}: cannot build tokenizer: {exc}") from exc
    # A tokenizer.json may carry truncation/padding settings from whoever saved it; encode()
    # must return every token of the text, so switch both off.
    backend.no_truncation()
    backend.no_padding()
    return backend


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special tokens.

    Build it with `Tokenizer.from_dir` (a checkpoint directory) or `Tokenizer.from_file` (a
    tokenizer.json and, optionally, the special tokens as a dict).
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        model_max_length: int | None = None,
        source: str = "<tokenizer>",
    ) -> None:
        self._backend = backend
        self.source = source
        self.model_max_length = model_max_length
        given = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
        }
        # GPT-NeoX convention: <|endoftext|> is BOS, EOS and UNK unless told otherwise.
        if backend.token_to_id(NEOX_ENDOFTEXT) is not None:
            for name in ("bos_token", "eos_token", "unk_token"):
                if given[name] is None:
                    given[name] = NEOX_ENDOFTEXT
        self.bos_token: str | None = given["bos_token"]
        self.eos_token: str | None = given["eos_token"]
        self.unk_token: str | None = given["unk_token"]
        self.pad_token: str | None = given["pad_token"]
        self._register_special_tokens([given[name] for name in SPECIAL_TOKEN_NAMES])
        self._special_ids: frozenset[int] | None = None  # `special_ids`, once asked

    def _register_special_tokens(self, tokens: Iterable[str | None]) -> None:
        """Make every named special token a special added token.

        A token already in the vocabulary keeps its id (it is only marked special, so that it
        is matched literally in text and skipped by ``skip_special_tokens``); a token the
        vocabulary lacks gets the next free id, as transformers does.
        """
        added = {tok.content for tok in self._backend.get_added_tokens_decoder().values()}
        for token in tokens:
            if token is None or token in added:
                continue
            if token == "":
                raise TokenizerError(f"{self.source}: a special token is the empty string")
            self._backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            added.add(token)

    # ----------------------------------------------------------------------- construction

    @classmethod
    def from_file(
        cls,
        tokenizer_json_path: str | Path,
        special_tokens: Mapping[str, Any] | None = None,
        *,
        model_max_length: int | None = None,
    ) -> Tokenizer:
        """Load a tokenizer.json; `special_tokens` maps ``bos_token``/``eos_token``/
        ``unk_token``/``pad_token`` to a string or an AddedToken-style ``{"content": ...}``."""
        path = Path(tokenizer_json_path)
        backend = _load_backend(path)
        tokens: dict[str, str | None] = {}
        for key, value in (special_tokens or {}).items():
            if key not in SPECIAL_TOKEN_NAMES:
                raise TokenizerError(
                    f"special_tokens for {path}: unknown key {key!r} "
                    f"(expected one of {', '.join(SPECIAL_TOKEN_NAMES)})"
                )
            tokens[key] = _token_content(value, f"special_tokens for {path}, field {key!r}")
        return cls(backend, model_max_length=model_max_length, source=str(path), **tokens)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a checkpoint directory.

        Special tokens come from tokenizer_config.json, then special_tokens_map.json (the first
        file that gives a non-null value wins), then the GPT-NeoX default (`<|endoftext|>` for
        BOS, EOS and UNK when it is in the vocabulary).
        """
        directory = Path(path)
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: not a directory (expected a checkpoint directory)")
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{directory}: no {TOKENIZER_FILE} in the checkpoint directory "
                f"(looked for {tokenizer_file})"
            )
        backend = _load_backend(tokenizer_file)

        configs: list[tuple[Path, dict[str, Any]]] = []
        for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
            config_path = directory / name
            if config_path.is_file():
                configs.append((config_path, _read_json_object(config_path)))

        tokens: dict[str, str | None] = {}
        for key in SPECIAL_TOKEN_NAMES:
            for config_path, config in configs:
                value = _token_content(config.get(key), f"{config_path}, field {key!r}")
                if value is not None:
                    tokens[key] = value
                    break

        model_max_length = None
        if configs and configs[0][0].name == TOKENIZER_CONFIG_FILE:
            config_path, config = configs[0]
            raw = config.get("model_max_length")
            if raw is not None:
                if not isinstance(raw, int | float) or isinstance(raw, bool) or raw <= 0:
                    raise TokenizerError(
                        f"{config_path}, field 'model_max_length': expected a positive number, "
                        f"got {raw!r}"
                    )
                if raw < _UNSET_MAX_LENGTH:
                    model_max_length = int(raw)
        return cls(backend, model_max_length=model_max_length, source=str(directory), **tokens)

    @classmethod
    def load(cls, path: str | Path, *, revision: str | None = None) -> Tokenizer:
        """A checkpoint directory (`from_dir`), a bare tokenizer.json (`from_file`), or a hub id
        ``org/name`` (its tokenizer files only, through the HF cache, as `tulu chat` resolves a
        checkpoint).

        Commands that only need a tokenizer (data conversion, tokenization) accept any of them.
        """
        local = Path(path).expanduser()
        if local.is_dir():
            return cls.from_dir(local)
        if local.is_file():
            return cls.from_file(local)
        if looks_like_hub_id(path):
            return cls.from_dir(
                snapshot(
                    str(path),
                    revision=revision,
                    allow_patterns=TOKENIZER_HUB_FILES,
                    error=TokenizerError,
                )
            )
        raise TokenizerError(
            f"{path}: no such tokenizer (expected a checkpoint directory, a tokenizer.json or "
            "a hub id org/name)"
        )

    # ----------------------------------------------------------------------- vocabulary

    @property
    def backend(self) -> _Backend:
        """The underlying `tokenizers.Tokenizer` (shared, not a copy)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES}

    # ----------------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added; literal special tokens are recognised.

        A string that is not valid Unicode (an unpaired surrogate, which JSON's ``\\ud83d``
        escapes can produce) is a `TokenizerError` saying where, not the library's TypeError.
        """
        try:
            return self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            check_text(text, "the text")
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the tokenizers library)."""
        texts = list(texts)
        if not texts:
            return []
        batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        try:
            return [enc.ids for enc in batch(texts, add_special_tokens=False)]
        except TypeError:
            for index, text in enumerate(texts):
                check_text(text, f"text {index}" if len(texts) > 1 else "the text")
            raise

    def special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens: those ``skip_special_tokens`` drops.

        Computed once: every streamed request asks, and the special tokens are all registered
        when the tokenizer is made.
        """
        if self._special_ids is None:
            added = self._backend.get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, token in added.items() if token.special)
        return self._special_ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----------------------------------------------------------------------- save

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

        The files load in `transformers.AutoTokenizer` with the same special tokens and ids.
        Every special-token field is written, null included: transformers' GPTNeoXTokenizer
        would otherwise fill a missing pad_token with its own default. The config carries the
        Tulu format as its ``chat_template`` (`tulu.chat_template`), so transformers, vLLM and
        TGI prompt the saved model the way tulu does.
        """
        out = Path(directory)
        try:
            out.mkdir(parents=True, exist_ok=True)
            # The same bytes as the backend's save(), whose path must be valid UTF-8 (a
            # directory name in another encoding raised UnicodeEncodeError).
            (out / TOKENIZER_FILE).write_text(self._backend.to_str(pretty=True), encoding="utf-8")
            config: dict[str, Any] = {
                "tokenizer_class": "GPTNeoXTokenizer",
                **self.special_tokens,
                "add_bos_token": False,
                "add_eos_token": False,
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            }
            if self.model_max_length is not None:
                config["model_max_length"] = self.model_max_length
            special_map = {k: v for k, v in self.special_tokens.items() if v is not None}
            for name, data in (
                (TOKENIZER_CONFIG_FILE, config),
                (SPECIAL_TOKENS_MAP_FILE, special_map),
            ):
                (out / name).write_text(
                    json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
                )
        except OSError as exc:
            raise TokenizerError(f"{out}: cannot save tokenizer: {exc}") from exc

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, unk={self.unk_token!r}, "
            f"pad={self.pad_token!r})"
        )


class StreamDecoder:
    """Incremental detokenizer: feed generated ids one at a time, get text as it completes.

    It keeps a small window of ids: ``[prefix_offset, read_offset)`` is text already returned,
    kept only as left context, and ``[read_offset, end)`` is pending. Each `push` decodes the
    window twice (context alone, context + pending) and returns the difference, unless the
    decoded tail ends in U+FFFD, which means the last byte-level tokens stop in the middle of a
    UTF-8 character: then it returns "" and waits for the bytes that complete it. The work per
    token is proportional to the window, not to the length of the generation.

    With `prompt_ids`, the last few prompt ids serve as initial context, so the first
    generated token decodes as it would after the prompt (no context when those ids end inside
    a character: generated bytes that complete it are decoded as `decode` decodes them alone).

    Invariant: ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)``.
    """

    #: Prompt ids kept as initial left context.
    PROMPT_CONTEXT = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Skipped ids decode to nothing, so they never enter the window: a long run of them
        # would otherwise stay pending and be re-decoded at every push (quadratic time).
        self._skipped = tokenizer.special_ids() if skip_special_tokens else frozenset()
        self._ids: list[int] = list(prompt_ids or [])[-self.PROMPT_CONTEXT :]
        if self._decode(self._ids).endswith("\ufffd"):
            # A prompt given as ids can stop inside a character. Generated bytes would then
            # complete it in the context's text but not in decode(generated ids), and the
            # delta would silently lose them; without context the invariant holds.
            self._ids = []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly "")."""
        if token_id in self._skipped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # Drop the ids that are no longer needed as context, so the list stays window-sized.
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still pending (e.g. an incomplete character) and clear it."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        del self._ids[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


def check_text(text: object, what: str) -> None:
    """Raise a `TokenizerError` if `text` is a string UTF-8 cannot encode (what the tokenizers
    library refuses with a bare TypeError), naming the first bad character's index."""
    if not isinstance(text, str):
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise TokenizerError(
            f"{what} contains an unpaired surrogate {text[err.start]!r} at character "
            f"{err.start} (not valid Unicode; a cut emoji?)"
        ) from None
