"""Tests for tulu.data.tokenize: the batched encoder is `encode_messages`, token for token; the
parallel, cached tokenizer writes the same files with any number of workers; the cache is hit,
missed and never read half-written; bad records raise or are counted with their file:line.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken

import tulu.data.encode as encode_module
import tulu.data.tokenize as tk
from tulu.chat import IGNORE_INDEX, encode_messages
from tulu.data.encode import encode_conversations, encode_messages_batch
from tulu.data.readers import iter_records
from tulu.data.records import BadInput, BadRecord
from tulu.data.tokenize import DROPPED_NO_LABEL, cache_key, tokenize_records
from tulu.data.tokenized import TokenizedDataset
from tulu.demo import corpus_text, train_tokenizer
from tulu.errors import ChatFormatError, DataError
from tulu.tokenizer import Tokenizer

EOT = "<|endoftext|>"


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return train_tokenizer(corpus_text(), vocab_size=400)


@pytest.fixture(scope="module")
def neox(neox_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer.from_file(neox_tokenizer_path, {"pad_token": "<pad>"})


@pytest.fixture(params=["tiny", "neox"])
def any_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def copy_of(tokenizer: Tokenizer, **special) -> Tokenizer:
    """An independent Tokenizer with the same backend JSON (safe to modify)."""
    from tokenizers import Tokenizer as Backend

    tokens = {**tokenizer.special_tokens, **special}
    return Tokenizer(Backend.from_str(tokenizer.backend.to_str()), **tokens)


# Pieces chosen to stress every boundary: literal special tokens and chat headers inside
# content, whitespace runs (GPT-NeoX has added tokens for them), combining characters
# (NFC), CRLF, emoji, digits.
PIECES = [
    "the", "a", "capital", "of", "France", "42", "3.14", "ñandú", "日本語", "🙂", "\n\n", "  ",
    "\t", "def f(x):", EOT, "<|user|>", "<|assistant|>\n", "<|system|>", "<|padding|>", "<pad>",
    "e\u0301", "\u0301", "\r\n", "    ", EOT + EOT, "<|", "|>", "endoftext", f"\n{EOT}\n",
    f" {EOT} ", "```python", "Paris.",
]  # fmt: skip


def random_conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)

    def content() -> str:
        r = rng.random()
        if r < 0.08:
            return ""
        if r < 0.12:
            return "   \n "
        return "".join(
            rng.choice(PIECES) + rng.choice([" ", "", "\n", "  "])
            for _ in range(rng.randint(1, 30))
        )

    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append(system(content()))
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": rng.choice(["user"] * 3 + ["system"]), "content": content()})
            if rng.random() < 0.9:
                messages.append(assistant(content() or "ok"))
        if rng.random() < 0.1:
            messages.append(user(content()))
        if rng.random() < 0.1:
            rng.shuffle(messages)
        out.append(messages)
    return out


EDGE_CASES = [
    [user("Hi"), assistant("Hello!")],
    [system("Be brief."), user("Capital of France?"), assistant("Paris.")],
    [user("a"), assistant("b"), user("c"), assistant("d"), user("e"), assistant("f")],
    [user(""), assistant("ok")],  # empty user content
    [system(""), user(""), assistant("ok")],
    [user("Hi"), user("again"), assistant("Hello")],  # consecutive user turns
    [user("q"), assistant("a"), user("trailing user turn")],
    [assistant("answer first"), user("then a question")],
    [user("only a user turn")],  # no label at all -> None
    [user("  padded  "), assistant("  padded answer  \n")],
    [user(f"literal {EOT} in the question"), assistant(f"and {EOT} in the answer")],
    [user("x " * 200), assistant("never reached when truncated")],  # None after truncation
    [user("short"), assistant("long answer " * 100)],  # truncated mid assistant turn
]


def write_jsonl(path: Path, conversations, *, extra_lines: dict[int, str] | None = None) -> Path:
    """Records, one per line; `extra_lines` inserts raw lines at 1-based line numbers."""
    lines = [
        json.dumps({"dataset": "t", "id": f"t_{i}", "messages": m}, ensure_ascii=False)
        for i, m in enumerate(conversations)
    ]
    for number, raw in sorted((extra_lines or {}).items()):
        lines.insert(number - 1, raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def valid(conversations: list[list[dict]]) -> list[list[dict]]:
    """Conversations that pass check_record (an assistant turn, none blank)."""
    return [
        m
        for m in conversations
        if any(x["role"] == "assistant" for x in m)
        and all(x["content"].strip() for x in m if x["role"] == "assistant")
    ]


# --------------------------------------------------------------------------- batched encoder


@pytest.mark.parametrize("max_seq_length", [1, 3, 17, 64, 2048])
def test_batch_equals_encode_messages(any_tokenizer: Tokenizer, max_seq_length: int) -> None:
    conversations = EDGE_CASES + random_conversations(400, seed=max_seq_length)
    expected = [encode_messages(m, any_tokenizer, max_seq_length) for m in conversations]
    assert encode_messages_batch(conversations, any_tokenizer, max_seq_length) == expected
    if max_seq_length == 64:  # the cases the masks are about all occur
        assert any(e is None for e in expected)
        assert any(e is not None and len(e.input_ids) == 64 for e in expected)


def test_edge_cases_are_what_they_claim(tiny: Tokenizer) -> None:
    out = encode_messages_batch(EDGE_CASES, tiny, 32)
    assert out[8] is None  # only a user turn
    assert out[11] is None  # the user turn fills the window
    assert out[12] is not None and len(out[12].input_ids) == 32
    assert out[12].labels[-1] != IGNORE_INDEX  # cut inside the trained assistant turn


def test_whole_prefix_path_when_eos_is_not_a_safe_split(tiny: Tokenizer) -> None:
    """A tokenizer whose added token overlaps the EOS string: every prefix is encoded whole."""
    odd = copy_of(tiny)
    odd.backend.add_tokens([AddedToken("xx<|end", normalized=False)])
    assert encode_module._eos_split_id(tiny, EOT) == 0
    assert encode_module._eos_split_id(odd, EOT) is None
    conversations = EDGE_CASES + random_conversations(100, seed=5)
    conversations.append([user("q"), assistant("see xx"), user("xx"), assistant("y")])
    for tokenizer in (tiny, odd):
        expected = [encode_messages(m, tokenizer, 40) for m in conversations]
        assert encode_messages_batch(conversations, tokenizer, 40) == expected


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.enable_truncation(8),
        lambda b: b.enable_padding(length=64),
        lambda b: setattr(b, "encode_special_tokens", True),
    ],
)
def test_eos_split_needs_plain_encoding(tiny: Tokenizer, change) -> None:
    odd = copy_of(tiny)
    change(odd.backend)
    assert encode_module._eos_split_id(odd, EOT) is None


def test_fallback_when_the_eos_check_fails(tiny: Tokenizer, monkeypatch) -> None:
    """If the full text's EOS ids ever disagreed with its EOS strings, the conversation is
    redone with whole prefixes, still exact."""
    monkeypatch.setattr(encode_module, "_eos_positions", lambda ids, eos_id: [])
    conversations = EDGE_CASES + random_conversations(50, seed=9)
    expected = [encode_messages(m, tiny, 48) for m in conversations]
    assert encode_messages_batch(conversations, tiny, 48) == expected


def test_encode_conversations_flat_arrays(tiny: Tokenizer) -> None:
    conversations = [EDGE_CASES[0], EDGE_CASES[8], EDGE_CASES[1]]
    chunk = encode_conversations(conversations, tiny, 64, dtype=np.uint16)
    assert chunk.input_ids.dtype == np.uint16 and chunk.trained.dtype == np.uint8
    assert chunk.kept.tolist() == [True, False, True]
    first, _, third = (encode_messages(m, tiny, 64) for m in conversations)
    assert chunk.lengths.tolist() == [len(first.input_ids), len(third.input_ids)]
    assert chunk.input_ids.tolist() == first.input_ids + third.input_ids
    labels = np.where(chunk.trained > 0, chunk.input_ids.astype(np.int64), IGNORE_INDEX)
    assert labels.tolist() == first.labels + third.labels
    assert encode_conversations([], tiny, 8).lengths.shape == (0,)


def test_batch_validates_with_the_conversation_index(tiny: Tokenizer) -> None:
    with pytest.raises(ChatFormatError, match=r"conversations\[1\]: message 0: unknown role"):
        encode_messages_batch(
            [[user("a"), assistant("b")], [{"role": "bot", "content": ""}]], tiny, 8
        )


# --------------------------------------------------------------------------- tokenize_records


@pytest.fixture(scope="module")
def corpus() -> list[list[dict]]:
    return valid(EDGE_CASES + random_conversations(300, seed=1))


def expected_examples(conversations, tokenizer, max_seq_length):
    out = [encode_messages(m, tokenizer, max_seq_length) for m in conversations]
    return [e for e in out if e is not None], sum(e is None for e in out)


def test_tokenize_records_matches_encode_messages(tmp_path, tiny, corpus) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus)
    ds = tokenize_records(
        path, tiny, 48, cache_dir=tmp_path / "cache", num_workers=1, progress=False
    )
    expected, dropped = expected_examples(corpus, tiny, 48)
    assert len(ds) == len(expected) and dropped > 0
    for i, example in enumerate(expected):
        ids, labels = ds[i]
        assert ids.dtype == np.int64 and ids.tolist() == example.input_ids
        assert labels.tolist() == example.labels
    assert ds[-1].input_ids.tolist() == expected[-1].input_ids
    with pytest.raises(IndexError):
        ds[len(ds)]
    meta = ds.meta
    assert meta["num_records"] == len(corpus)
    assert meta["dropped"] == {DROPPED_NO_LABEL: dropped}
    assert len(meta["dropped_examples"][DROPPED_NO_LABEL]) == min(dropped, 3)
    assert meta["num_tokens"] == sum(len(e.input_ids) for e in expected)
    assert meta["num_trained_tokens"] == sum(
        sum(label != IGNORE_INDEX for label in e.labels) for e in expected
    )
    # every record has a non-blank assistant turn, so an untruncated encoding is never None
    untruncated = [encode_messages(m, tiny, 100_000) for m in corpus]
    assert meta["num_truncated"] == sum(len(e.input_ids) > 48 for e in untruncated) > 0
    assert meta["settings"]["max_seq_length"] == 48 and meta["format_version"] == tk.FORMAT_VERSION
    assert meta["source"] == str(path) and meta["cache_key"] == cache_key(path, tiny, 48)
    assert ds.lengths.tolist() == [len(e.input_ids) for e in expected]
    assert ds.pad_token_id == tiny.pad_token_id and ds.max_seq_length == 48


def test_memmapped_files(tmp_path, tiny, corpus) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:40])
    ds = tokenize_records(
        path, tiny, 64, output_dir=tmp_path / "out", num_workers=1, progress=False
    )
    assert ds.directory == tmp_path / "out"
    again = TokenizedDataset.open(tmp_path / "out")
    assert isinstance(again.input_ids, np.memmap) and again.input_ids.dtype == np.uint16
    assert isinstance(again.trained, np.memmap) and isinstance(again.offsets, np.memmap)
    assert (tmp_path / "out/input_ids.bin").stat().st_size == 2 * ds.num_tokens
    assert (tmp_path / "out/offsets.bin").stat().st_size == 8 * (len(ds) + 1)
    for i in range(len(ds)):
        assert again[i].labels.tolist() == ds[i].labels.tolist()
    # a truncated file is refused, not misread
    with open(tmp_path / "out/trained.bin", "r+b") as handle:
        handle.truncate(ds.num_tokens - 1)
    with pytest.raises(DataError, match="trained.bin: expected"):
        TokenizedDataset.open(tmp_path / "out")


def test_id_dtype() -> None:
    class Fake:
        def __init__(self, n):
            self.vocab_size = n

    assert tk._id_dtype(Fake(65536)) == "uint16"
    assert tk._id_dtype(Fake(65537)) == "int32"


def bin_files(directory: Path) -> dict[str, bytes]:
    return {
        name: (directory / name).read_bytes()
        for name in ("input_ids.bin", "trained.bin", "offsets.bin")
    }


def stable_meta(ds: TokenizedDataset) -> dict:
    return {k: v for k, v in ds.meta.items() if k not in ("seconds", "created", "workers")}


def test_one_and_two_workers_write_identical_files(tmp_path, tiny, corpus, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus)
    pools = []
    real_pool = tk._run_in_pool

    def counting_pool(chunks, workers, initargs):
        pools.append(workers)
        yield from real_pool(chunks, workers, initargs)

    monkeypatch.setattr(tk, "_run_in_pool", counting_pool)
    kwargs = {"progress": False, "chunk_lines": 16}
    one = tokenize_records(path, tiny, 40, output_dir=tmp_path / "w1", num_workers=1, **kwargs)
    two = tokenize_records(path, tiny, 40, output_dir=tmp_path / "w2", num_workers=2, **kwargs)
    assert pools == [2] and not two.cache_hit  # only the second run started processes
    assert bin_files(one.directory) == bin_files(two.directory)
    assert stable_meta(one) == stable_meta(two)
    # chunking does not change anything either
    big = tokenize_records(
        path, tiny, 40, output_dir=tmp_path / "w1big", num_workers=1, progress=False
    )
    assert bin_files(big.directory) == bin_files(one.directory)


def test_real_tokenizer_end_to_end(tmp_path, neox) -> None:
    conversations = valid(EDGE_CASES + random_conversations(120, seed=3))
    path = write_jsonl(tmp_path / "data.jsonl", conversations)
    ds = tokenize_records(
        path, neox, 64, cache_dir=tmp_path, num_workers=2, chunk_lines=32, progress=False
    )
    expected, _ = expected_examples(conversations, neox, 64)
    assert ds.meta["dtype"] == "uint16"
    assert [ds[i].input_ids.tolist() for i in range(len(ds))] == [e.input_ids for e in expected]
    assert [ds[i].labels.tolist() for i in range(len(ds))] == [e.labels for e in expected]


def test_parquet_gives_the_same_dataset(tmp_path, tiny, corpus) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    rows = [{"dataset": "t", "id": f"t_{i}", "messages": m} for i, m in enumerate(corpus[:50])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    jsonl = write_jsonl(tmp_path / "data.jsonl", corpus[:50])
    a = tokenize_records(tmp_path / "data.parquet", tiny, 40, cache_dir=tmp_path, progress=False)
    b = tokenize_records(jsonl, tiny, 40, cache_dir=tmp_path, progress=False, num_workers=1)
    assert bin_files(a.directory) == bin_files(b.directory)


def test_gzip_file_gives_the_same_dataset(tmp_path, tiny, corpus) -> None:
    import gzip

    jsonl = write_jsonl(tmp_path / "data.jsonl", corpus[:50])
    packed = tmp_path / "data.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl.read_bytes()))
    a = tokenize_records(packed, tiny, 40, cache_dir=tmp_path / "a", progress=True)
    b = tokenize_records(jsonl, tiny, 40, cache_dir=tmp_path / "b", progress=False)
    assert bin_files(a.directory) == bin_files(b.directory)


def test_empty_file(tmp_path, tiny) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    ds = tokenize_records(tmp_path / "empty.jsonl", tiny, 16, cache_dir=tmp_path, progress=False)
    assert len(ds) == 0 and ds.lengths.tolist() == [] and ds.num_tokens == 0
    assert len(TokenizedDataset.open(ds.directory)) == 0


def test_progress_bar_runs(tmp_path, tiny, corpus, capsys) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:20])
    tokenize_records(path, tiny, 16, cache_dir=tmp_path, num_workers=1, progress=True)
    assert "examples" in capsys.readouterr().err


# --------------------------------------------------------------------------- cache


def test_cache_hit_does_not_tokenize(tmp_path, tiny, corpus, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:30])
    first = tokenize_records(path, tiny, 32, cache_dir=tmp_path / "c", progress=False)
    assert not first.cache_hit and first.directory.parent == tmp_path / "c"
    assert first.directory.name == cache_key(path, tiny, 32)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized on a cache hit")

    monkeypatch.setattr(tk, "_write_dataset", no_tokenizing)
    second = tokenize_records(path, tiny, 32, cache_dir=tmp_path / "c", progress=False)
    assert second.cache_hit and second.directory == first.directory
    assert second[0].input_ids.tolist() == first[0].input_ids.tolist()


def test_default_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TULU_CACHE", str(tmp_path / "tc"))
    assert tk.default_cache_dir() == tmp_path / "tc" / "tokenized"
    monkeypatch.delenv("TULU_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tk.default_cache_dir() == tmp_path / "home/.cache/tulu/tokenized"


def test_cache_misses_on_any_change(tmp_path, tiny, corpus) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:30])
    cache = tmp_path / "c"

    def run(tokenizer=tiny, max_len=32):
        return tokenize_records(path, tokenizer, max_len, cache_dir=cache, progress=False)

    keys = {run().directory.name}
    keys.add(run(max_len=33).directory.name)  # settings
    keys.add(run(copy_of(tiny, pad_token="<pad>")).directory.name)  # special tokens
    keys.add(run(train_tokenizer(corpus_text(), vocab_size=380)).directory.name)  # vocabulary
    with open(path, "a", encoding="utf-8") as handle:  # data bytes
        handle.write("\n")
    keys.add(run().directory.name)
    assert len(keys) == 5
    assert len([d for d in cache.iterdir() if not d.name.startswith(".")]) == 5


def test_a_renamed_file_read_another_way_is_not_a_cache_hit(tmp_path, tiny, corpus) -> None:
    """A JSONL file renamed ``.parquet`` holds the same bytes but is read as Parquet: it must
    be refused as a broken Parquet file, not answered with the JSONL file's cached tokens."""
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:30])
    tokenize_records(path, tiny, 32, cache_dir=tmp_path / "c", progress=False)
    renamed = path.rename(tmp_path / "data.parquet")
    with pytest.raises(DataError, match="data.parquet"):
        tokenize_records(renamed, tiny, 32, cache_dir=tmp_path / "c", progress=False)


def test_leftover_temp_directory_is_never_read(tmp_path, tiny, corpus) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:30])
    cache = tmp_path / "c"
    key = cache_key(path, tiny, 32)
    # A killed run's leftovers: a temp dir that even has a meta.json claiming the key, from a
    # pid that no longer exists, and one from a live process (ours) that must not be touched.
    host = __import__("socket").gethostname()
    dead = cache / f"{tk._TMP_PREFIX}{key[:16]}-{host}-999999999-abc"
    live = cache / f"{tk._TMP_PREFIX}{key[:16]}-{host}-{os.getpid()}-def"
    for leftover in (dead, live):
        leftover.mkdir(parents=True)
        (leftover / "meta.json").write_text(json.dumps({"format_version": 1, "cache_key": key}))
        (leftover / "input_ids.bin").write_bytes(b"\0\0")
    ds = tokenize_records(path, tiny, 32, cache_dir=cache, progress=False)
    assert not ds.cache_hit and ds.directory == cache / key
    assert not dead.exists() and live.exists()
    expected, _ = expected_examples(corpus[:30], tiny, 32)
    assert ds[0].input_ids.tolist() == expected[0].input_ids


def test_interrupted_run_leaves_no_entry(tmp_path, tiny, corpus, monkeypatch) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:60])
    cache = tmp_path / "c"
    real = tk._Encoder.jsonl_chunk
    calls = {"n": 0}

    def dies_on_second_chunk(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(tk._Encoder, "jsonl_chunk", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        tokenize_records(
            path, tiny, 32, cache_dir=cache, num_workers=1, chunk_lines=8, progress=False
        )
    assert list(cache.iterdir()) == []  # no entry, no temp dir
    monkeypatch.undo()
    assert not tokenize_records(path, tiny, 32, cache_dir=cache, progress=False).cache_hit


def _refuses_a_rewrite_after_hashing(
    monkeypatch, path: Path, tiny, cache: Path, rewrite: Callable[[], object]
) -> None:
    """Tokenize `path` with `rewrite` run right after its first hash (the one the cache key is
    made of): the change must be refused, leaving no cache entry. Later hashes (a retry) run
    unchanged."""
    real = tk._data_digest
    rewrites = iter([rewrite])

    def hash_then_rewrite(target):
        digest = real(target)
        next(rewrites, lambda: None)()  # the first hash only
        return digest

    monkeypatch.setattr(tk, "_data_digest", hash_then_rewrite)
    changed = rf"{re.escape(path.name)}: changed while it was being tokenized"
    with pytest.raises(DataError, match=changed):
        tokenize_records(path, tiny, 32, cache_dir=cache, num_workers=1, progress=False)
    assert list(cache.iterdir()) == []  # no entry, no temp dir


def test_a_file_rewritten_after_hashing_is_never_cached(tmp_path, tiny, corpus, monkeypatch):
    # The file is hashed for the key, then read again to tokenize: rewritten in between, the
    # new tokens were stored under the old bytes' key and reused when those bytes came back.
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:20])
    old_bytes = path.read_bytes()
    cache = tmp_path / "c"
    _refuses_a_rewrite_after_hashing(
        monkeypatch, path, tiny, cache, lambda: write_jsonl(path, corpus[20:40])
    )
    path.write_bytes(old_bytes)
    ds = tokenize_records(path, tiny, 32, cache_dir=cache, num_workers=1, progress=False)
    expected, _ = expected_examples(corpus[:20], tiny, 32)
    assert not ds.cache_hit and ds.meta["source_sha256"] == hashlib.sha256(old_bytes).hexdigest()
    assert [ds[i].input_ids.tolist() for i in range(len(ds))] == [e.input_ids for e in expected]


def _count_opens(monkeypatch, path: Path) -> list[Path]:
    """Record every time `path` is opened to be read through (as tokenize reads its data)."""
    import tulu.data.readers as readers

    real = readers.open_binary
    opened: list[Path] = []

    def counting(target: Path):
        if Path(target) == path:
            opened.append(target)
        return real(target)

    monkeypatch.setattr(readers, "open_binary", counting)
    return opened


@pytest.mark.parametrize("form", ["plain", "gzip", "no final newline"])
def test_a_miss_reads_the_file_twice_and_a_hit_once(tmp_path, tiny, corpus, monkeypatch, form):
    # A miss hashed the file for the key, read it to tokenize, then hashed it a third time to
    # check it had not changed: three full reads of GBs of data. The bytes read for tokenizing
    # are now hashed on the way (the decompressed ones, as the key hashes them).
    import gzip

    plain = write_jsonl(tmp_path / "data.jsonl", corpus[:40])
    path = plain
    if form == "gzip":
        path = tmp_path / "data.jsonl.gz"
        path.write_bytes(gzip.compress(plain.read_bytes()))
    elif form == "no final newline":
        plain.write_bytes(plain.read_bytes().rstrip(b"\n"))
    opened = _count_opens(monkeypatch, path)
    run = dict(cache_dir=tmp_path / "c", num_workers=1, chunk_lines=8, progress=False)
    miss = tokenize_records(path, tiny, 32, **run)
    assert not miss.cache_hit and miss.meta["num_records"] == 40 and len(opened) == 2
    opened.clear()
    assert tokenize_records(path, tiny, 32, **run).cache_hit and len(opened) == 1


def test_a_parquet_file_rewritten_after_hashing_is_never_cached(
    tmp_path, tiny, corpus, monkeypatch
):
    # pyarrow reads Parquet by seeking, so it is hashed again after tokenizing, not on the way.
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"

    def write(conversations) -> None:
        rows = [
            {"dataset": "t", "id": f"t_{i}", "messages": m} for i, m in enumerate(conversations)
        ]
        pq.write_table(pa.Table.from_pylist(rows), path)

    write(corpus[:20])
    _refuses_a_rewrite_after_hashing(
        monkeypatch, path, tiny, tmp_path / "c", lambda: write(corpus[20:40])
    )


def test_a_cache_entry_older_than_source_sha256_gets_it_on_a_hit(tmp_path, tiny, corpus) -> None:
    # Training checkpoints record it; entries written before it existed are still hit.
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:5])
    first = tokenize_records(path, tiny, 32, cache_dir=tmp_path / "c", progress=False)
    meta = json.loads((first.directory / "meta.json").read_text())
    del meta["source_sha256"]
    (first.directory / "meta.json").write_text(json.dumps(meta))
    hit = tokenize_records(path, tiny, 32, cache_dir=tmp_path / "c", progress=False)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hit.cache_hit and hit.meta["source_sha256"] == expected


def test_incomplete_entry_is_rebuilt(tmp_path, tiny, corpus) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:30])
    cache = tmp_path / "c"
    first = tokenize_records(path, tiny, 32, cache_dir=cache, progress=False)
    (first.directory / "input_ids.bin").write_bytes(b"")  # damaged behind our back
    second = tokenize_records(path, tiny, 32, cache_dir=cache, progress=False)
    assert not second.cache_hit and len(second) == len(first)
    assert (second.directory / "input_ids.bin").stat().st_size == 2 * second.num_tokens
    assert [d.name for d in cache.iterdir()] == [first.directory.name]


def test_output_dir(tmp_path, tiny, corpus) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:30])
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    a = tokenize_records(path, tiny, 32, output_dir=out, progress=False)
    assert a.directory == out and not a.cache_hit
    assert tokenize_records(path, tiny, 32, output_dir=out, progress=False).cache_hit
    b = tokenize_records(path, tiny, 24, output_dir=out, progress=False)  # replaced
    assert (
        not b.cache_hit
        and b.max_seq_length == 24
        and TokenizedDataset.open(out).max_seq_length == 24
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a tokenized dataset"):
        tokenize_records(path, tiny, 32, output_dir=tmp_path / "other", progress=False)


def test_output_dir_gets_the_umask_permissions(tmp_path, tiny, corpus) -> None:
    # tempfile.mkdtemp makes 0700 directories: renamed into place, the dataset was unreadable
    # to the group (a training job running as another user).
    path = write_jsonl(tmp_path / "data.jsonl", corpus[:5])
    old = os.umask(0o022)
    try:
        tokenize_records(path, tiny, 32, output_dir=tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_pipe_or_device_is_refused_and_never_cached(tmp_path, tiny) -> None:
    # Hashing for the cache key used a pipe (`<(zcat data.jsonl.gz)`) up: zero examples were
    # cached under the key of the data, so a later run on the same records from a file hit
    # the empty entry. A device takes the same path and, unlike a pipe, cannot block here.
    with pytest.raises(DataError, match=r"/dev/null: not a regular file \(a pipe or a device\)"):
        tokenize_records(Path("/dev/null"), tiny, 32, cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- bad records

BAD_LINES = {
    3: '{"dataset": "t", "id": "x", "messages": [{"role": "user", "content": "hi"}',  # truncated
    7: "not json at all",
    12: '{"dataset": "t", "id": "x", "messages": [{"role": "user", "content": "no answer"}]}',
    20: '{"dataset": "t", "messages": []}',
    33: "",  # blank lines are not records and not errors
}


def bad_file(tmp_path: Path, corpus) -> Path:
    path = write_jsonl(tmp_path / "bad.jsonl", corpus[:40], extra_lines=BAD_LINES)
    with open(path, "ab") as handle:
        handle.write(b'{"dataset": "t", "id": "\xff", "messages": []}\n')  # not UTF-8, line 46
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_first_bad_record_raises_with_file_line(tmp_path, tiny, corpus, workers) -> None:
    path = bad_file(tmp_path, corpus)
    with pytest.raises(BadRecord) as reference:
        list(iter_records(path, BadInput()))
    with pytest.raises(BadRecord) as caught:
        tokenize_records(
            path, tiny, 32, cache_dir=tmp_path / "c", num_workers=workers, chunk_lines=2,
            progress=False,
        )  # fmt: skip
    assert str(caught.value).startswith(f"{path}:3: truncated JSON")
    assert str(caught.value) == str(reference.value)
    assert not (tmp_path / "c").exists() or list((tmp_path / "c").iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_bad_counts_every_reason(tmp_path, tiny, corpus, workers) -> None:
    path = bad_file(tmp_path, corpus)
    ds = tokenize_records(
        path, tiny, 32, cache_dir=tmp_path / "c", num_workers=workers, chunk_lines=4,
        skip_bad=True, progress=False,
    )  # fmt: skip
    reference = BadInput(skip_bad=True)
    records = list(iter_records(path, reference))
    assert ds.meta["skipped_bad"] == dict(reference.counts)
    assert ds.meta["skipped_bad"] == {
        "truncated JSON": 1, "invalid JSON": 1, "no assistant turn": 1, "missing field": 1,
        "not UTF-8": 1,
    }  # fmt: skip
    assert ds.meta["skipped_bad_examples"]["invalid JSON"] == ["7"]
    assert ds.meta["num_records"] == len(records) == 40
    expected, dropped = expected_examples([r["messages"] for _, r in records], tiny, 32)
    assert len(ds) == len(expected) and sum(ds.meta["dropped"].values()) == dropped
    assert ds.meta["first_bad"]["location"] == "3"

    # The entry holds skipped records: without skip_bad, a cache hit raises like a fresh run.
    with pytest.raises(BadRecord, match=rf"^{path}:3: truncated JSON"):
        tokenize_records(path, tiny, 32, cache_dir=tmp_path / "c", progress=False)


def test_argument_errors(tmp_path, tiny) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot open"):
        tokenize_records(tmp_path / "missing.jsonl", tiny, 16, cache_dir=tmp_path)
    (tmp_path / "data.jsonl").write_text("")
    with pytest.raises(DataError, match="num_workers: must be at least 1"):
        tokenize_records(tmp_path / "data.jsonl", tiny, 16, cache_dir=tmp_path, num_workers=0)
    with pytest.raises(ChatFormatError, match="max_seq_length: must be positive"):
        tokenize_records(tmp_path / "data.jsonl", tiny, 0, cache_dir=tmp_path)
