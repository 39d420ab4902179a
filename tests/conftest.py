"""Shared test fixtures: the read-only ``../shared`` folder (tokenizer cache, corpus)."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"no shared data folder at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def corpus_path(shared_dir: Path) -> Path:
    path = shared_dir / "corpus" / "shakespeare.txt"
    if not path.is_file():
        pytest.skip(f"no corpus at {path}")
    return path
