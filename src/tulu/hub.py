"""Hugging Face hub ids (``org/name``) as local directories, through huggingface_hub's cache.

Checkpoints (`tulu.model.checkpoint.resolve_checkpoint`) and tokenizers (`Tokenizer.load`)
accept a hub id wherever they accept a directory, as transformers does. Both go through
`snapshot_download`, so HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN behave as for every
other HF tool; each caller passes the file patterns it needs (a tokenizer needs no weights).

This module imports neither torch nor huggingface_hub at import time: ``tulu data`` uses it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from tulu.errors import TuluError

__all__ = ["looks_like_hub_id", "snapshot"]

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

#: Endings of files users name, not of hub repositories: "data/tokenizer.json" that does not
#: exist is a missing file, not a repository. (Repository names may hold dots:
#: "EleutherAI/pythia-6.9b", "allenai/open-instruct-pythia-6.9b-tulu".)
_FILE_SUFFIXES = frozenset(
    {".json", ".jsonl", ".safetensors", ".bin", ".pt", ".model", ".txt", ".yaml", ".yml"}
)


def looks_like_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name`, which is not a local path, should be looked up as a hub id ``org/name``.

    Paths written as paths (``./x/y``, ``/x/y``, ``~/x``, one or three components, a file
    ending such as ``.json``) are not, so a typo in a local path is reported as a missing path.
    """
    text = str(name)
    if text.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(text):
        return False
    return Path(text).suffix.lower() not in _FILE_SUFFIXES


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _one_line(err: BaseException) -> str:
    """huggingface_hub's messages span lines; the CLI prints errors on one."""
    return " ".join(str(err).split())


def snapshot(
    repo_id: str,
    *,
    revision: str | None,
    allow_patterns: Sequence[str],
    error: type[TuluError],
) -> Path:
    """The local snapshot directory of `repo_id` with the files matching `allow_patterns`,
    downloaded into the HF cache if needed; failures raise `error` naming the id."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise error(f"{repo_id}: huggingface_hub is needed for hub ids ({err})") from None
    hint = " (HF_HUB_OFFLINE is set)" if _offline() else ""
    try:
        found = snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns))
    except LocalEntryNotFoundError as err:
        if type(err).__name__ == "IncompleteSnapshotError":  # not in older releases
            raise error(
                f"{repo_id}: the cached snapshot is incomplete and could not be completed{hint} "
                f"({_one_line(err)})"
            ) from None
        raise error(
            f"{repo_id}: not found in the Hugging Face cache and could not be downloaded{hint}"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise error(f"{repo_id}: could not fetch from the hub: {_one_line(err)}") from None
    return Path(found)
