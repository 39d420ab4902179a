"""Tokenize a data source once into ``train.bin``/``val.bin`` (flat uint16 GPT-2 tokens) + ``meta.json``.

Token stream: each document's tokens, with EOT (50256) between consecutive documents.

Split rule (``SPLIT_RULE``): the stream is cut into segments of ``SEGMENT_TOKENS`` (2**20) tokens, the
last one shorter; the last ``round(len(segment) * val_fraction)`` tokens of every segment go to
``val.bin``, the rest to ``train.bin``. Deterministic, streaming with bounded memory, spread over
large corpora, and it works for a single small document (validation = its tail).

Cache: ``<cache_root>/<key[:24]>/`` where the key hashes the content (see ``sources``), the tokenizer,
the split rule and val_fraction, so every run and variant on the same text reuses one folder. A
folder is used only when its ``meta.json`` (written last) records the size and SHA-256 of both files
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
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from gpt2exp.data.sources import DataError, Source, resolve_source
from gpt2exp.data.tokenizer import EOT, get_tokenizer
from gpt2exp.spec import DataSpec

try:
    import fcntl
except ImportError:  # Windows: no lock; the atomic rename still keeps the cache consistent
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 2  # 2: meta.json records each file's size and SHA-256
SPLIT_RULE = "segment-tail/v1"
SEGMENT_TOKENS = 1 << 20
GROUP_CHARS = 1 << 18  # text per encoding task (a file piece is about 1 MiB: one per task)
IN_FLIGHT_PER_THREAD = 3  # tasks queued per encoding thread
DEFAULT_CACHE = "~/.cache/gpt2exp/tokens"

Split = Literal["train", "val"]


def open_tokens(tokens: np.ndarray | str | Path) -> np.ndarray:
    """A token array: an array as is, or a ``.bin`` file of uint16 tokens memory-mapped read-only."""
    if isinstance(tokens, np.ndarray):
        return tokens
    path = Path(tokens)
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


@dataclass(frozen=True)
class TokenData:
    """A complete token cache folder."""

    dir: Path
    meta: dict[str, Any]

    def tokens(self, split: Split) -> np.ndarray:
        """The split's tokens, memory-mapped read-only: (n,) uint16."""
        return open_tokens(self.dir / f"{split}.bin")

    @property
    def train(self) -> np.ndarray:
        return self.tokens("train")

    @property
    def val(self) -> np.ndarray:
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


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex digest}`` of a file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


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
        for split in ("train", "val"):
            name = f"{split}.bin"
            if problem := file_mismatch(folder / name, meta["files"][name]):
                return problem
            if meta["files"][name]["size"] != 2 * meta[f"n_{split}_tokens"]:
                return f"{name}: size does not match n_{split}_tokens"
    except FileNotFoundError:
        return "no meta.json"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"meta.json unreadable ({type(e).__name__}: {e})"
    return TokenData(folder, meta)


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
            meta = _build(source, tmp, spec.val_fraction, show_progress, num_threads)
            files = {name: file_digest(tmp / name) for name in ("train.bin", "val.bin")}
            meta.update(key=key, source=spec.source, tokenizer=enc.name, val_fraction=spec.val_fraction, files=files)
            _write_json(tmp / "meta.json", meta)  # last: marks the folder complete
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


# ------------------------------------------------------------------------------------- building
class _SplitWriter:
    """Appends the token stream to train/val files by the segment-tail rule (memory: one segment)."""

    def __init__(self, folder: Path, val_fraction: float, vocab_size: int) -> None:
        self.files: dict[str, BinaryIO] = {s: open(folder / f"{s}.bin", "wb") for s in ("train", "val")}  # noqa: SIM115
        self.counts = {"train": 0, "val": 0}
        self.val_fraction, self.vocab_size = val_fraction, vocab_size
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, tokens: np.ndarray) -> None:  # (n,) uint16
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise RuntimeError(f"the tokenizer produced token id {int(tokens.max())} >= its vocabulary size {self.vocab_size}")
        self.pending.append(tokens)
        self.n_pending += len(tokens)
        while self.n_pending >= SEGMENT_TOKENS:
            stream = np.concatenate(self.pending)
            self._segment(stream[:SEGMENT_TOKENS])
            self.pending, self.n_pending = [stream[SEGMENT_TOKENS:]], len(stream) - SEGMENT_TOKENS

    def _segment(self, seg: np.ndarray) -> None:
        n_val = int(len(seg) * self.val_fraction + 0.5)
        for split, part in (("train", seg[: len(seg) - n_val]), ("val", seg[len(seg) - n_val :])):
            self.files[split].write(part.tobytes())
            self.counts[split] += len(part)

    def close(self) -> None:
        if self.n_pending:
            self._segment(np.concatenate(self.pending))
            self.pending, self.n_pending = [], 0
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _build(source: Source, folder: Path, val_fraction: float, show_progress: bool, num_threads: int | None) -> dict[str, Any]:
    """Stream, encode on every core and split ``source`` into ``folder``; returns the meta fields.

    Pieces (grouped up to ``GROUP_CHARS`` so that small documents share a task) are encoded by a
    thread pool (tiktoken releases the GIL), at most ``IN_FLIGHT_PER_THREAD`` tasks per thread in
    flight, and written in input order.
    """
    enc = get_tokenizer()
    threads = num_threads or _cpu_count()
    writer = _SplitWriter(folder, val_fraction, enc.n_vocab)
    start, n_bytes, n_docs = time.perf_counter(), 0, 0
    group: list[tuple[str, bool]] = []  # pieces encoded by one task: (text, EOT before it?)
    group_chars = group_bytes = 0
    in_flight: deque[tuple[Future[np.ndarray], int]] = deque()  # (tokens, input bytes), oldest first

    def encode(items: list[tuple[str, bool]]) -> np.ndarray:  # (n,) uint16
        parts = [np.array(enc.encode_ordinary(text), dtype=np.uint16) for text, _ in items]
        eots = [np.array([EOT] if eot else [], dtype=np.uint16) for _, eot in items]
        return np.concatenate([a for pair in zip(eots, parts, strict=True) for a in pair])

    with _progress(source, show_progress) as advance, ThreadPoolExecutor(threads) as pool:

        def submit() -> None:
            nonlocal group, group_chars, group_bytes
            in_flight.append((pool.submit(encode, group), group_bytes))
            group, group_chars, group_bytes = [], 0, 0
            while len(in_flight) > threads * IN_FLIGHT_PER_THREAD:
                write_oldest()

        def write_oldest() -> None:
            future, size = in_flight.popleft()
            writer.add(future.result())
            advance(size)

        try:
            for doc in source.documents():
                first = True
                for text, size in doc:
                    n_bytes, group_bytes = n_bytes + size, group_bytes + size
                    if not text:
                        continue
                    if "\0" in text:
                        raise DataError(
                            f"{source.name}: document {n_docs + first} holds NUL bytes, so it is not text (a zero-filled or "
                            "binary file?); convert it to UTF-8 text or leave it out"
                        )
                    group.append((text, first and n_docs > 0))
                    n_docs, first, group_chars = n_docs + first, False, group_chars + len(text)
                    if group_chars >= GROUP_CHARS:
                        submit()
            if group:
                submit()
            while in_flight:
                write_oldest()
        finally:
            for future, _ in in_flight:
                future.cancel()
            writer.close()
    if writer.counts["train"] + writer.counts["val"] == 0:
        raise DataError(f"{source.name}: no text to tokenize; give a non-empty UTF-8 text source")
    seconds = time.perf_counter() - start
    return {
        "format": FORMAT_VERSION,
        "n_train_tokens": writer.counts["train"],
        "n_val_tokens": writer.counts["val"],
        "n_documents": n_docs,
        "n_bytes": n_bytes,
        "dtype": "uint16",
        "eot": EOT,
        "split_rule": SPLIT_RULE,
        "segment_tokens": SEGMENT_TOKENS,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "mb_per_s": round(n_bytes / 1e6 / max(seconds, 1e-9), 2),
        "threads": threads,
    }


@contextlib.contextmanager
def _progress(source: Source, show: bool) -> Iterator[Any]:
    """Yields ``advance(n_bytes)``: a rich progress bar of bytes processed, or a no-op."""
    if not show:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        TextColumn("tokenizing {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(source.name, total=source.total_bytes)
        yield lambda n: bar.advance(task, n)


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


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
