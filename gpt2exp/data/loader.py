"""Batches of random token windows from a memory-mapped split, reproducible from (seed, step) alone.

Global batch for optimizer step ``step``: ``batch_size`` windows of ``block_size + 1`` tokens whose
start offsets are drawn by ``numpy.random.default_rng([TRAIN_STREAM, seed, step])``. Rank ``r`` of
``W`` workers takes rows ``[r*B/W, (r+1)*B/W)``, so

- every variant of an experiment sees the same data at a given seed,
- W workers together see exactly what one process sees (e.g. with gradient accumulation),
- resuming at step k needs nothing but k.

Evaluation (:class:`EvalWindows`) scores the validation split cut into non-overlapping windows, in
one fixed order: the same text for every variant, seed, micro-batch size and worker count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gpt2exp.data.prepare import Tokens, open_tokens
from gpt2exp.data.sources import DataError

TRAIN_STREAM, EVAL_STREAM = 0, 1


def epoch_steps(n_train_tokens: int, block_size: int, batch_size: int) -> float:
    """Optimizer steps for one pass over the training split: n_train_tokens / (batch_size * block_size)."""
    return n_train_tokens / (batch_size * block_size)


class BatchSampler:
    """This rank's share of each global batch of random windows (see the module docstring)."""

    def __init__(
        self,
        tokens: Tokens | str | Path,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not a multiple of world_size={world_size}")
        self.tokens = open_tokens(tokens)  # (n,) uint16
        if len(self.tokens) < block_size + 1:
            raise DataError(
                f"{tokens if isinstance(tokens, (str, Path)) else 'the token split'} has {len(self.tokens):,} tokens, fewer than "
                f"block_size + 1 = {block_size + 1:,}; add more text or lower model.block_size"
            )
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        share = batch_size // world_size
        self.rows = slice(rank * share, (rank + 1) * share)

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the whole global batch for ``step``: (batch_size,) int64."""
        rng = np.random.default_rng([TRAIN_STREAM, self.seed % 2**64, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) for optimizer step ``step``: int64 (batch_size/world_size, block_size); y is x shifted by one."""
        return windows(self.tokens, self.starts(step)[self.rows], self.block_size)

    def micro_batches(self, step: int, micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``batch(step)`` split into gradient-accumulation micro-batches of ``micro_batch_size`` rows."""
        x, y = self.batch(step)
        if len(x) % micro_batch_size:
            raise ValueError(f"this rank's {len(x)} rows are not a multiple of micro_batch_size={micro_batch_size}")
        return list(zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True))


def windows(tokens: Tokens, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 (len(starts), block_size) of the windows beginning at ``starts``; y is x shifted by one."""
    idx = starts[:, None] + np.arange(block_size + 1)  # (b, T+1)
    w = torch.from_numpy(tokens[idx].astype(np.int64))  # (b, T+1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class EvalWindows:
    """The fixed evaluation set: the validation split cut into non-overlapping windows of
    ``block_size`` (+1 target) tokens, taken in one fixed pseudo-random order. The first n windows
    are then a uniform sample of the whole split (an intermediate evaluation scores a prefix, the
    final one more of the same order), and nothing depends on the seed or the batch layout."""

    def __init__(self, tokens: Tokens | str | Path, block_size: int) -> None:
        self.tokens, self.block_size = open_tokens(tokens), block_size
        n = (len(self.tokens) - 1) // block_size
        self.starts = np.random.default_rng(EVAL_STREAM).permutation(n) * block_size  # (n,) in visiting order

    def __len__(self) -> int:
        return len(self.starts)

    def count(self, n_tokens: int) -> int:
        """Windows scored for a budget of ``n_tokens`` (at least one, at most all)."""
        return min(len(self), max(1, n_tokens // self.block_size))

    def batches(self, n: int, micro: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """This rank's share of the first ``n`` windows: (x, y, rows) per batch of ``micro`` windows.
        Global batch b holds windows [b·micro·W, (b+1)·micro·W) and rank r its rows [r·micro, (r+1)·micro),
        so the ranks score disjoint windows and together all n. Every rank yields the same number of
        batches (FSDP and DDP forwards are collective); a rank with nothing left scores the first
        window again and reports ``rows == 0`` so it is not counted."""
        for lo, hi in rank_shares(n, micro, rank, world_size):
            starts = self.starts[lo:hi] if hi > lo else self.starts[:1]
            yield (*windows(self.tokens, starts, self.block_size), hi - lo)


def rank_shares(n: int, micro: int, rank: int, world_size: int) -> Iterator[tuple[int, int]]:
    """Rank ``rank``'s rows [lo, hi) of each global batch of ``micro * world_size`` of n items: the same number of
    batches on every rank (forwards are collective), empty (lo == hi) where a rank has nothing left."""
    for g in range(0, n, micro * world_size):
        lo = min(n, g + rank * micro)
        yield lo, min(n, lo + micro)


class StridedWindows:
    """Targets [first, first + n) of a split scored at a fixed context: windows of ``context`` tokens advancing by
    ``stride``, each scoring only the targets no earlier window scored. Each target is scored once; the first window
    scores all it holds (with ``first`` < context - stride, some with less context), every later one its last
    ``stride``, each seeing between context - stride + 1 and context tokens (the one before it included).

    Every window has min(context, first + n) tokens. The set depends on the split, context, stride and
    (first, n) alone: the same for every variant, seed, micro-batch size and worker count."""

    def __init__(self, tokens: np.ndarray | str | Path, context: int, stride: int, first: int = 0, n: int | None = None) -> None:
        if not 0 < stride <= context:
            raise ValueError(f"stride={stride} is not in [1, context={context}]")
        self.tokens = open_tokens(tokens)
        end = len(self.tokens) - 1 if n is None else min(len(self.tokens) - 1, first + n)  # targets [first, end)
        if end <= first:
            raise DataError(f"the split has {len(self.tokens):,} tokens: no target past the first {first:,} to score")
        ends = np.arange(min(end, max(first + stride, context)), end + stride, stride).clip(max=end)  # (K,): the last reaches end
        self.begins = (ends - context).clip(min=0)  # (K,)
        self.lo = np.concatenate([[first], ends[:-1]]) - self.begins  # scored rows [lo, hi) of each window
        self.hi = ends - self.begins
        self.length, self.n_targets = int(self.hi[0]), end - first

    def __len__(self) -> int:
        return len(self.begins)

    def batches(
        self, micro: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This rank's share of the windows (see :func:`rank_shares`): (x, y, scored) (b, length), scored a bool mask;
        a rank with nothing left scores the first window again with nothing marked scored."""
        rows = np.arange(self.length)  # (L,)
        for lo, hi in rank_shares(len(self), micro, rank, world_size):
            pick = slice(lo, hi) if hi > lo else slice(0, 1)
            x, y = windows(self.tokens, self.begins[pick], self.length)
            scored = (rows >= self.lo[pick, None]) & (rows < self.hi[pick, None]) & (hi > lo)  # (b, L)
            yield x, y, torch.from_numpy(scored)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device``; on CUDA through pinned memory, asynchronously."""
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
