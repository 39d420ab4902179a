"""Score text a model never saw: mean next-token loss over non-overlapping block-size windows, with
its standard error over windows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gpt2exp.data.loader import EvalWindows, to_device
from gpt2exp.data.sources import DataError, find_files, read_pieces
from gpt2exp.data.tokenizer import EOT
from gpt2exp.model import GPT
from gpt2exp.parallel.distributed import all_sum


def window_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token loss of each window: x, y (b, T) -> (b,) float32."""
    return model(x, y, reduction="none")[1].mean(1)  # (b, T) -> (b,)


@torch.no_grad()
def score_windows(
    model: nn.Module, eval_set: EvalWindows, n_tokens: int, micro: int, device: torch.device, rank: int = 0, world_size: int = 1
) -> tuple[float, float]:
    """Mean loss over the first windows of the fixed evaluation set (``n_tokens`` of them, each rank
    a disjoint share) and its standard error over windows; the same whatever ``micro`` and the world size."""
    was_training = model.training
    model.eval()
    stats = [0.0, 0.0, 0.0]  # windows, sum of their losses, sum of squares
    for x, y, rows in eval_set.batches(eval_set.count(n_tokens), micro, rank, world_size):
        losses = window_losses(model, *to_device(x, y, device))[:rows].double()
        stats = [stats[0] + rows, stats[1] + losses.sum().item(), stats[2] + losses.square().sum().item()]
    model.train(was_training)
    count, total, total_sq = all_sum(stats, device)
    mean = total / count
    var = max(0.0, (total_sq - count * mean * mean) / (count - 1)) if count > 1 else math.nan
    return mean, math.sqrt(var / count)


def tokenize_files(path: str, tokenizer: Any, max_tokens: int) -> np.ndarray:
    """GPT-2 tokens of the files at ``path`` (EOT between files), at most ``max_tokens + 1``: (n,) int64."""
    tokens: list[int] = []
    for i, file in enumerate(find_files(path)):
        if i:
            tokens.append(EOT)
        for text, _ in read_pieces(file):
            tokens += tokenizer.encode_ordinary(text)
            if len(tokens) > max_tokens:
                return np.array(tokens[: max_tokens + 1], dtype=np.int64)
    return np.array(tokens, dtype=np.int64)


@torch.no_grad()
def score_files(model: GPT, tokenizer: Any, path: str, max_tokens: int, batch_size: int = 8) -> tuple[float, int]:
    """Mean loss per predicted token over non-overlapping windows of the model's block size, and
    the number of tokens predicted."""
    tokens = tokenize_files(path, tokenizer, max_tokens)
    block = model.spec.block_size
    if len(tokens) < 2:
        raise DataError(f"{path}: no text to score; give a file with at least a few words")
    n_full = (len(tokens) - 1) // block
    full = torch.from_numpy(tokens[: n_full * block + 1])
    windows = [(full[i * block : (i + 1) * block], full[i * block + 1 : (i + 1) * block + 1]) for i in range(n_full)]
    total, count = 0.0, 0
    model.eval()
    for i in range(0, n_full, batch_size):
        x, y = (torch.stack(t) for t in zip(*windows[i : i + batch_size], strict=True))  # (b, T)
        total, count = total + model(x, y)[1].item() * y.numel(), count + y.numel()
    if (rest := len(tokens) - 1 - n_full * block) > 0:  # the short last window
        tail = torch.from_numpy(tokens[n_full * block :])[None]  # (1, rest + 1)
        total, count = total + model(tail[:, :-1], tail[:, 1:])[1].item() * rest, count + rest
    return total / count, count
