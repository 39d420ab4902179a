"""Shared test fixtures: the read-only ``../shared`` folder (tokenizer cache, corpus)."""

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def corpus_head(corpus_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """``corpus_head(n)`` -> a file holding the first n bytes of the corpus (tokenizing stays quick)."""
    folder = tmp_path_factory.mktemp("corpus")

    def make(n_bytes: int) -> Path:
        path = folder / f"shakespeare_{n_bytes}.txt"
        if not path.exists():
            path.write_bytes(corpus_path.read_bytes()[:n_bytes])
        return path

    return make


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token caches of the whole session in one temporary folder, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("tokens")
    old = os.environ.get("GPT2EXP_CACHE")
    os.environ["GPT2EXP_CACHE"] = str(folder)
    yield folder
    if old is None:
        del os.environ["GPT2EXP_CACHE"]
    else:
        os.environ["GPT2EXP_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models: they gain nothing from more, and on a busy
    machine OpenMP threads that wait for each other make every small op many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
