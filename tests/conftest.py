"""Shared fixtures: the real GPT-NeoX-20B tokenizer from ../shared, skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NEOX_TOKENIZER = REPO_ROOT.parent / "shared" / "data/tokenizer/gpt-neox-20b/tokenizer.json"


@pytest.fixture(scope="session")
def neox_tokenizer_path() -> Path:
    """Path to the GPT-NeoX-20B tokenizer.json; skips the test when ../shared lacks it."""
    if not NEOX_TOKENIZER.is_file():
        pytest.skip(f"GPT-NeoX-20B tokenizer absent ({NEOX_TOKENIZER})")
    return NEOX_TOKENIZER
