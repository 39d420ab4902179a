"""Tokenize a data source once into ``train.bin``/``val.bin`` (flat uint16 GPT-2 tokens) + ``meta.json``.

Token stream: each document's tokens, with EOT (50256) between consecutive documents.

Split rule (``SPLIT_RULE``): the stream is cut into segments of ``SEGMENT_TOKENS`` (2**20) tokens, the
last one shorter; the last ``round(len(segment) * val_fraction)`` tokens of every segment go to
``val.bin``, the rest to ``train.bin``. Deterministic, streaming with bounded memory, spread over
large corpora, and it works for a single small document (validation = its tail).

``data.prepare_with: ray`` tokenizes with Ray Data into one shard per file instead (``shards``): the
same token stream and split, stored as shards + ``train.json``/``val.json`` (the split as ranges).

Cache: ``<cache_root>/<key[:24]>/`` where the key hashes the content (see ``sources``), the tokenizer,
the split rule and val_fraction, so every run and variant on the same text reuses one folder. A
folder is used only when its ``meta.json`` (written last) records the size and SHA-256 of every file
and they still match (token ids are checked against the vocabulary when written); a folder that does
not is rebuilt with a one-line warning. It is built in a temporary sibling folder and renamed into
place under a lock file (``fcntl.flock``), so a crashed or concurrent preparer never leaves a
half-written cache that is taken for a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gpt2exp.data.build import SPLIT_RULE, build_local, build_sharded, file_digest, write_json
from gpt2exp.data.shards import ShardedTokens
from gpt2exp.data.sources import DataError, Source, resolve_source
from gpt2exp.data.tokenizer import get_tokenizer
from gpt2exp.spec import DataSpec

try:
    import fcntl
except ImportError:  # Windows: no lock; the atomic rename still keeps the cache consistent
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 2  # 2: meta.json records each file's size and SHA-256
DEFAULT_CACHE = "~/.cache/gpt2exp/tokens"

Split = Literal["train", "val"]
Tokens = np.ndarray | ShardedTokens  # (n,) uint16


def open_tokens(tokens: Tokens | str | Path) -> Tokens:
    """A token array: an array as is, a ``.bin`` file of uint16 tokens memory-mapped read-only, or a
    split stored over shards (``train.json``/``val.json``)."""
    if not isinstance(tokens, (str, Path)):
        return tokens
    path = Path(tokens)
    if path.suffix == ".json":
        return ShardedTokens(path)
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


@dataclass(frozen=True)
class TokenData:
    """A complete token cache folder."""

    dir: Path
    meta: dict[str, Any]

    def path(self, split: Split) -> Path:
        """The file that ``open_tokens`` reads the split from: ``train.bin`` or, sharded, ``train.json``."""
        return self.dir / f"{split}.{'json' if self.meta.get('layout') == 'shards' else 'bin'}"

    def tokens(self, split: Split) -> Tokens:
        """The split's tokens, memory-mapped read-only: (n,) uint16."""
        return open_tokens(self.path(split))

    @property
    def train(self) -> Tokens:
        return self.tokens("train")

    @property
    def val(self) -> Tokens:
        return self.tokens("val")

    @property
    def n_train(self) -> int:
        return int(self.meta["n_train_tokens"])

    @property
    def n_val(self) -> int:
        return int(self.meta["n_val_tokens"])

    def check_min_tokens(self, block_size: int) -> None:
        """Raise DataError unless each split holds at least one window of ``block_size + 1`` tokens."""
        for split, n, fix in (
            ("train", self.n_train, "lower data.val_fraction"),
            ("val", self.n_val, "raise data.val_fraction"),
        ):
            if n < block_size + 1:
                raise DataError(
                    f"{self.meta['source']}: the {split} split has {n:,} tokens but model.block_size={block_size} needs at least "
                    f"{block_size + 1:,}; add more text, lower model.block_size or {fix}"
                )


def cache_root(spec: DataSpec) -> Path:
    """``spec.cache_dir``, else ``$GPT2EXP_CACHE``, else ``~/.cache/gpt2exp/tokens``."""
    return Path(os.path.expanduser(spec.cache_dir or os.environ.get("GPT2EXP_CACHE") or DEFAULT_CACHE))


def cache_key(source: Source, val_fraction: float, tokenizer: str = "gpt2") -> str:
    parts = (
        f"format={FORMAT_VERSION}",
        f"content={source.key}",
        f"tokenizer={tokenizer}",
        f"split={SPLIT_RULE}",
        f"val={val_fraction!r}",
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def file_mismatch(path: Path, record: Any) -> str | None:
    """Why ``path`` does not match its ``file_digest`` record (missing, size, content), or None when it does."""
    try:
        size = path.stat().st_size
        if size != record["size"]:
            return f"{path.name}: {size:,} bytes, {record['size']:,} recorded"
        return None if file_digest(path)["sha256"] == record["sha256"] else f"{path.name}: sha256 mismatch"
    except FileNotFoundError:
        return f"{path.name}: missing"
    except OSError as e:
        return f"{path.name}: unreadable ({e.strerror or e})"
    except (KeyError, TypeError, ValueError):
        return f"{path.name}: no valid size and sha256 recorded"


def load_complete(folder: Path) -> TokenData | str:
    """The cache in ``folder`` if it is complete and intact, else what is wrong with it (one line)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            return f"format {meta.get('format')}, expected {FORMAT_VERSION}"
        data = TokenData(folder, meta)
        for split in ("train", "val"):
            if (name := data.path(split).name) not in meta["files"]:
                return f"{name}: not recorded"
        for name, record in meta["files"].items():
            if problem := file_mismatch(folder / name, record):
                return problem
        for split in ("train", "val"):
            if len(data.tokens(split)) != meta[f"n_{split}_tokens"]:
                return f"{data.path(split).name}: size does not match n_{split}_tokens"
    except FileNotFoundError:
        return "no meta.json"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"meta.json unreadable ({type(e).__name__}: {e})"
    return data


def prepare(spec: DataSpec, *, show_progress: bool = True, num_threads: int | None = None) -> TokenData:
    """Tokenize the spec's source into the cache (once) and return it; later calls just find it."""
    root = cache_root(spec)
    root.mkdir(parents=True, exist_ok=True)
    source = resolve_source(spec, root)
    enc = get_tokenizer()
    key = cache_key(source, spec.val_fraction, enc.name)
    final = root / key[:24]
    if isinstance(done := load_complete(final), TokenData):
        return done
    with _locked(root / f".{key[:24]}.lock"):
        if isinstance(done := load_complete(final), TokenData):  # another process finished it while we waited
            return done
        if final.exists():
            print(f"warning: token cache {final}: {done}; rebuilding it", file=sys.stderr, flush=True)
        for stale in root.glob(f".tmp-{key[:24]}-*"):  # left by a crashed preparer (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{key[:24]}-"))
        try:
            if spec.prepare_with == "ray":
                meta = build_sharded(source, tmp, spec.val_fraction)
            else:
                meta = build_local(source, tmp, spec.val_fraction, enc, show_progress, num_threads)
            meta.update(format=FORMAT_VERSION, key=key, source=spec.source, tokenizer=enc.name, val_fraction=spec.val_fraction)
            write_json(tmp / "meta.json", meta)  # last: marks the folder complete
            if final.exists():  # incomplete or damaged (intact ones returned above)
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if show_progress:
        from rich.console import Console

        Console(soft_wrap=True).print(
            f"[green]tokenized[/] {spec.source}: {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens "
            f"in {meta['seconds']:.1f}s ({meta['mb_per_s']:.1f} MB/s) -> {final}"
        )
    return TokenData(final, meta)


# ------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock held across processes (and threads: each call opens its own descriptor)."""
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
