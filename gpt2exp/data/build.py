"""Building a token cache folder's files: the local streaming build (every core of this machine) and the
sharded build (Ray Data). Both write the token stream of ``prepare``'s docstring and split it by
``SPLIT_RULE``; ``prepare`` verifies, records and publishes the folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tiktoken

from gpt2exp.data.shards import SHARD_DIR, split_ranges, tokenize_shards
from gpt2exp.data.sources import DataError, Source
from gpt2exp.data.tokenizer import EOT, encode_pieces

SPLIT_RULE = "segment-tail/v1"
SEGMENT_TOKENS = 1 << 20
GROUP_CHARS = 1 << 17  # text per encoding task at least (a file piece, about 256 KiB, is one task)
IN_FLIGHT_PER_THREAD = 3  # tasks queued per encoding thread


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex digest}`` of a file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


class _SplitWriter:
    """Appends the token stream to train/val files by the segment-tail rule (memory: one segment)."""

    def __init__(self, folder: Path, val_fraction: float) -> None:
        self.files: dict[str, BinaryIO] = {s: open(folder / f"{s}.bin", "wb") for s in ("train", "val")}  # noqa: SIM115
        self.counts = {"train": 0, "val": 0}
        self.val_fraction = val_fraction
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, tokens: np.ndarray) -> None:  # (n,) uint16
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


def build_local(
    source: Source, folder: Path, val_fraction: float, enc: tiktoken.Encoding, show_progress: bool, num_threads: int | None
) -> dict[str, Any]:
    """Stream, encode on every core and split ``source`` into ``folder/{train,val}.bin``; returns the meta fields.

    Pieces (grouped up to ``GROUP_CHARS`` so that small documents share a task) are encoded by a pool of
    ``num_threads`` threads (tiktoken releases the GIL) while this one reads, splits and writes (one thread:
    this one alone); at most ``IN_FLIGHT_PER_THREAD`` tasks per thread in flight, written in input order.
    """
    threads = num_threads or _cpu_count()
    writer = _SplitWriter(folder, val_fraction)
    start, n_bytes, n_docs = time.perf_counter(), 0, 0
    group: list[tuple[str, bool]] = []  # pieces encoded by one task: (text, EOT before it?)
    group_chars = group_bytes = 0
    in_flight: deque[tuple[Future[np.ndarray], int]] = deque()  # (tokens, input bytes), oldest first
    n_tasks = 0

    with _progress(source, show_progress) as advance, ThreadPoolExecutor(threads) as pool:

        def submit() -> None:
            nonlocal group, group_chars, group_bytes, n_tasks
            if threads > 1:
                future = pool.submit(encode_pieces, enc, group)
            else:  # one thread: this one (a pool thread would only add handing over)
                future = Future()
                future.set_result(encode_pieces(enc, group))
            in_flight.append((future, group_bytes))
            n_tasks += 1
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
    files = {name: file_digest(folder / name) for name in ("train.bin", "val.bin")}
    return _meta(writer.counts["train"], writer.counts["val"], n_docs, n_bytes, start, threads=threads, files=files)


def build_sharded(source: Source, folder: Path, val_fraction: float) -> dict[str, Any]:
    """``source``'s files tokenized by Ray Data into shards and split by ranges (see ``shards``); returns the meta fields."""
    if not source.files or source.read is None:
        raise DataError(
            f"{source.name}: data.prepare_with: ray tokenizes files (data.path, data.url or data.builtin); "
            "use prepare_with: local for this source"
        )
    start = time.perf_counter()
    shards = tokenize_shards(source.files, source.read, folder)
    counts = [s["n_tokens"] for s in shards]
    if not (with_text := [s["index"] for s in shards if s["n_tokens"]]):
        raise DataError(f"{source.name}: no text to tokenize; give a non-empty UTF-8 text source")
    ranges = split_ranges(counts, int(with_text[0] > 0), SEGMENT_TOKENS, val_fraction)  # skip an EOT with no text before it
    files = {f"{SHARD_DIR}/part-{s['index']:05d}.bin": {"size": s["size"], "sha256": s["sha256"]} for s in shards}
    for split in ("train", "val"):
        write_json(folder / f"{split}.json", {"ranges": ranges[split]})
        files[f"{split}.json"] = file_digest(folder / f"{split}.json")
    n_train, n_val = (sum(hi - lo for _, lo, hi in ranges[split]) for split in ("train", "val"))
    n_bytes = sum(s["n_bytes"] for s in shards)
    return _meta(n_train, n_val, len(with_text), n_bytes, start, layout="shards", shards=len(shards), files=files)


def _meta(n_train: int, n_val: int, n_docs: int, n_bytes: int, start: float, **extra: Any) -> dict[str, Any]:
    """The meta fields of a build that began at ``start`` (``time.perf_counter``)."""
    seconds = time.perf_counter() - start
    return {
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "n_documents": n_docs,
        "n_bytes": n_bytes,
        "dtype": "uint16",
        "eot": EOT,
        "split_rule": SPLIT_RULE,
        "segment_tokens": SEGMENT_TOKENS,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "mb_per_s": round(n_bytes / 1e6 / max(seconds, 1e-9), 2),
        **extra,
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


def write_json(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
