"""Tokenize a file corpus with Ray Data into token shards, and read a split stored over shards.

``data.prepare_with: ray``: one shard per file. A Ray Data task per file reads it, encodes it
(``encode_pieces``) and writes ``shards/part-NNNNN.bin`` (uint16 tokens) into the cache folder being
built, handing back only its token count and SHA-256: no process but the one that owns a file sees
its text or its tokens. A shard starts with EOT when an earlier file has text, so the shards laid end
to end are exactly the local preparation's token stream (the leading EOT of the first shard with
text is skipped when only empty files precede it).

The split is not copied out of the shards: from the token counts alone, the driver applies the
segment-tail rule to the global stream and writes ``train.json``/``val.json``, the split as ranges
``[shard file, lo, hi)``. :class:`ShardedTokens` reads such a file as one token array (a memmap per
shard, nothing loaded), so training and evaluation windows are the local preparation's, token for
token: a window crosses a shard boundary as it crosses a file boundary in ``train.bin``.

On a multi-node cluster the cache folder (``data.cache_dir``) and the corpus must be on storage that
every node sees at the same path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpt2exp import env
from gpt2exp.data.sources import DataError, Document
from gpt2exp.data.tokenizer import encode_pieces, get_tokenizer

SHARD_DIR = "shards"


class ShardedTokens:
    """A split stored as ranges of shard files (a ``train.json``/``val.json``), read as one (n,) uint16
    array: ``len()`` and integer-array indexing, as the batch samplers use it."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        ranges = json.loads(path.read_text())["ranges"]  # [[shard file, lo, hi], ...] in stream order
        maps: dict[str, np.ndarray] = {}
        for name, _, _ in ranges:
            if name not in maps:
                maps[name] = np.memmap(path.parent / name, dtype=np.uint16, mode="r")
        self.parts = [maps[name][lo:hi] for name, lo, hi in ranges]  # views: nothing read yet
        self.offsets = np.cumsum([0] + [hi - lo for _, lo, hi in ranges])  # (parts + 1,) start of each part

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        """Tokens at global positions ``idx`` (any shape of ints): same shape, uint16."""
        idx = np.asarray(idx)
        part = np.searchsorted(self.offsets, idx, side="right") - 1  # same shape as idx
        out = np.empty(idx.shape, dtype=np.uint16)
        for p in np.unique(part):
            here = part == p
            out[here] = self.parts[p][idx[here] - self.offsets[p]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole split in memory (for small data and tests)."""
        whole = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.uint16)
        return whole if dtype is None else whole.astype(dtype)


def split_ranges(counts: list[int], skip_first: int, segment: int, val_fraction: float) -> dict[str, list[list[Any]]]:
    """The segment-tail split (see ``prepare``) of the stream of shards with ``counts`` tokens, as
    ``[shard file, lo, hi)`` ranges per split; ``skip_first`` tokens at the start of the stream are left out."""
    bounds = []  # (global start, shard index, shard lo) of each shard's part of the stream
    pos = 0
    for i, n in enumerate(counts):
        lo = skip_first if pos == 0 and n else 0  # the first shard with tokens
        if n - lo > 0:
            bounds.append((pos, i, lo))
            pos += n - lo
    total, starts = pos, [b[0] for b in bounds]
    ranges: dict[str, list[list[Any]]] = {"train": [], "val": []}

    def add(split: str, a: int, b: int) -> None:  # the global range [a, b) as shard ranges
        k = int(np.searchsorted(starts, a, side="right")) - 1
        while a < b:
            start, i, lo = bounds[k]
            end = min(b, start + counts[i] - lo)
            ranges[split].append([f"{SHARD_DIR}/part-{i:05d}.bin", lo + a - start, lo + end - start])
            a, k = end, k + 1

    for seg in range(0, total, segment):
        n = min(segment, total - seg)
        n_val = int(n * val_fraction + 0.5)
        add("train", seg, seg + n - n_val)
        add("val", seg + n - n_val, seg + n)
    return ranges


def tokenize_shards(files: tuple[Path, ...], read: Callable[[Path], Document], folder: Path) -> list[dict[str, Any]]:
    """Encode every file into ``folder/shards/part-NNNNN.bin`` with Ray Data (Ray connected, or a private
    Ray started); returns per shard ``{"index", "n_tokens", "size", "sha256", "n_bytes"}`` in file order."""
    import ray

    if not ray.is_initialized():  # the cluster at RAY_ADDRESS, else a private one on 127.0.0.1
        env.apply(env.RAY)
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    (folder / SHARD_DIR).mkdir()
    items = [{"index": i, "path": str(f)} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    tokenize = functools.partial(_tokenize_files, folder=str(folder), read=read)
    rows = ds.map_batches(tokenize, batch_size=1, batch_format="numpy").take_all()
    if errors := [r["error"] for r in rows if r["error"]]:
        raise DataError(str(errors[0]))
    return sorted(({k: v for k, v in r.items() if k != "error"} for r in rows), key=lambda r: r["index"])


def _tokenize_files(batch: Any, folder: str, read: Callable[[Path], Document]) -> dict[str, np.ndarray]:
    """Ray Data task: each file of the batch (numpy columns ``index``, ``path``) into its shard (see the module docstring)."""
    enc = get_tokenizer()
    out: dict[str, list[Any]] = {k: [] for k in ("index", "n_tokens", "size", "sha256", "n_bytes", "error")}
    for index, path in zip(batch["index"].tolist(), batch["path"].tolist(), strict=True):
        h, n_tokens, n_bytes, first, error = hashlib.sha256(), 0, 0, True, ""
        with open(Path(folder) / SHARD_DIR / f"part-{index:05d}.bin", "wb") as f:
            for text, size in read(Path(path)):
                n_bytes += size
                if not text:
                    continue
                if "\0" in text:
                    error = (
                        f"{path} holds NUL bytes, so it is not text (a zero-filled or binary file?); convert it or leave it out"
                    )
                    break
                data = encode_pieces(enc, [(text, first and index > 0)]).tobytes()
                f.write(data)
                h.update(data)
                n_tokens, first = n_tokens + len(data) // 2, False
            f.flush()
            os.fsync(f.fileno())
        for k, v in zip(out, (index, n_tokens, 2 * n_tokens, h.hexdigest(), n_bytes, error), strict=True):
            out[k].append(v)
    return {k: np.array(v) for k, v in out.items()}
