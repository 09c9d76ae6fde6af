"""Tokenizers named by hub id (``EleutherAI/pythia-6.9b``), as checkpoints already are:
`Tokenizer.load` resolves them through the Hugging Face cache, fetching tokenizer files only."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tulu.errors import CheckpointError, TokenizerError
from tulu.hub import looks_like_hub_id
from tulu.tokenizer import TOKENIZER_HUB_FILES, Tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tokenizer directory whose pad token comes from its tokenizer_config.json."""
    from tulu.demo import corpus_text, train_tokenizer

    directory = tmp_path_factory.mktemp("tok")
    tokenizer = train_tokenizer(corpus_text())
    tokenizer.pad_token = "<|padding|>"
    tokenizer.save(directory)
    return directory


@pytest.mark.parametrize(
    "name",
    ["EleutherAI/pythia-6.9b", "allenai/open-instruct-pythia-6.9b-tulu", "org/name_v1.5"],
)
def test_hub_ids_may_hold_dots(name: str) -> None:
    assert looks_like_hub_id(name)


@pytest.mark.parametrize(
    "name",
    ["./org/name", "/org/name", "~/org", "name", "a/b/c", "data/tokenizer.json", "o/n.safetensors"],
)
def test_paths_written_as_paths_are_not_hub_ids(name: str) -> None:
    assert not looks_like_hub_id(name)


def test_load_fetches_only_the_tokenizer_files(tmp_path, tokenizer_dir, monkeypatch) -> None:
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tokenizer_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    tokenizer = Tokenizer.load("EleutherAI/pythia-6.9b", revision="v1")
    assert tokenizer.source == str(tokenizer_dir) and tokenizer.pad_token == "<|padding|>"
    ((repo_id, kwargs),) = calls
    assert repo_id == "EleutherAI/pythia-6.9b" and kwargs["revision"] == "v1"
    assert sorted(kwargs["allow_patterns"]) == sorted(TOKENIZER_HUB_FILES)  # no weights
    # an existing path is never looked up
    assert Tokenizer.load(tokenizer_dir).source == str(tokenizer_dir)
    assert Tokenizer.load(tokenizer_dir / "tokenizer.json").source.endswith("tokenizer.json")
    assert len(calls) == 1


def test_hub_errors_are_tokenizer_errors_on_one_line(monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def missing(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find\nan appropriate cached snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(TokenizerError, match=r"^org/name: not found in the Hugging Face cache"):
        Tokenizer.load("org/name")

    def refused(repo_id, **kwargs):  # huggingface_hub's messages span lines
        raise OSError("401 Client Error.\n\nRepository Not Found for url: x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.load("org/name")
    assert str(caught.value) == (
        "org/name: could not fetch from the hub: 401 Client Error. Repository Not Found for url: x"
    )


def test_a_missing_path_is_not_a_hub_lookup(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no such tokenizer .* or a hub id org/name"):
        Tokenizer.load(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        Tokenizer.load("./org/name")


def test_hub_ids_from_an_offline_cache(tokenizer_dir, offline_hub) -> None:
    """Through the real huggingface_hub (HF_HUB_CACHE, HF_HUB_OFFLINE=1): the tokenizer of a
    dotted repository name, the train config's model.tokenizer (training, and the dry run that
    only reads the cache), a checkpoint of a dotted name
    (which resolve_checkpoint used to take for a file: ".9b-tulu" read as a suffix), and an
    unknown id."""
    snapshot = offline_hub.add("EleutherAI/pythia-6.9b", tokenizer_dir)
    offline_hub.add("allenai/open-instruct-pythia-6.9b-tulu", tokenizer_dir)
    script = textwrap.dedent(
        """
        from tulu.errors import TokenizerError
        from tulu.model.checkpoint import resolve_checkpoint
        from tulu.tokenizer import Tokenizer
        from tulu.train.cli import _local_tokenizer
        from tulu.train.config import parse_train_config
        from tulu.train.trainer import load_tokenizer

        tokenizer = Tokenizer.load("EleutherAI/pythia-6.9b")
        print(tokenizer.source)
        print(tokenizer.pad_token)
        model = {"preset": "pythia-14m", "tokenizer": "EleutherAI/pythia-6.9b"}
        config = parse_train_config({"model": model, "data": {"train": "x.jsonl"}})
        print(load_tokenizer(config).vocab_size == tokenizer.vocab_size)
        print(_local_tokenizer(config).source == tokenizer.source)  # --dry-run: cache only
        print(resolve_checkpoint("allenai/open-instruct-pythia-6.9b-tulu").name)
        try:
            Tokenizer.load("EleutherAI/not-cached")
        except TokenizerError as err:
            print("ERR", err)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=offline_hub.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert Path(lines[0]).resolve() == snapshot.resolve()
    assert lines[1:5] == ["<|padding|>", "True", "True", offline_hub.COMMIT]
    assert lines[5] == (
        "ERR EleutherAI/not-cached: not found in the Hugging Face cache and could not be "
        "downloaded (HF_HUB_OFFLINE is set)"
    )


def test_checkpoint_errors_keep_their_wording(tmp_path) -> None:
    from tulu.model.checkpoint import resolve_checkpoint

    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint("data/model.safetensors")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="expected a checkpoint directory, found a file"):
        resolve_checkpoint(tmp_path / "file")
