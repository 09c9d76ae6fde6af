"""Shared fixtures: the real GPT-NeoX-20B tokenizer from ../shared (skipped when absent), and
one intra-op thread for modules that run tiny models."""

from __future__ import annotations

from collections.abc import Iterator
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
