"""Shared fixtures: the real GPT-NeoX-20B tokenizer from ../shared (skipped when absent), one
intra-op thread for modules that run tiny models, and an offline Hugging Face cache."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
NEOX_TOKENIZER = REPO_ROOT.parent / "shared" / "data/tokenizer/gpt-neox-20b/tokenizer.json"


@pytest.fixture(scope="session")
def neox_tokenizer_path() -> Path:
    """Path to the GPT-NeoX-20B tokenizer.json; skips the test when ../shared lacks it."""
    if not NEOX_TOKENIZER.is_file():
        pytest.skip(f"GPT-NeoX-20B tokenizer absent ({NEOX_TOKENIZER})")
    return NEOX_TOKENIZER


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on tiny models a second intra-op thread only adds synchronisation, which costs
    milliseconds per op on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class OfflineHub:
    """A Hugging Face cache laid out on disk, and the environment that makes huggingface_hub
    use it offline. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported,
    so code that must see them runs in a subprocess with `env`."""

    cache: Path

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "HF_HUB_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1"}
        env.pop("HF_HOME", None)
        return env

    def add(self, repo_id: str, files: Path) -> Path:
        """Cache the files of directory `files` as `repo_id`'s main revision; the snapshot."""
        org, name = repo_id.split("/")
        repo = self.cache / f"models--{org}--{name}"
        snapshot = repo / "snapshots" / self.COMMIT
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(self.COMMIT)
        for file in files.iterdir():
            shutil.copy(file, snapshot / file.name)
        return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path) -> OfflineHub:
    """An empty offline HF cache under tmp_path (`OfflineHub.add` fills it)."""
    return OfflineHub(tmp_path / "hub")
