"""Score text a model never saw: mean next-token loss over non-overlapping block-size windows, with
its standard error over windows; at a fixed context of any length (strided windows, :class:`StridedWindows`),
and by position in the window."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gpt2exp.data.loader import EvalWindows, StridedWindows, to_device
from gpt2exp.data.sources import DataError, find_files, read_pieces
from gpt2exp.data.tokenizer import EOT
from gpt2exp.model import GPT
from gpt2exp.parallel.distributed import all_sum
from gpt2exp.spec.sections import context_metric


def token_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Next-token loss of each token: x, y (b, T) -> (b, T) float32."""
    return model(x, y, reduction="none")[1]  # chunked over the vocabulary: no (b, T, V) logits


def window_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token loss of each window: x, y (b, T) -> (b,) float32."""
    return token_losses(model, x, y).mean(1)


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


def score_files(
    model: GPT, tokenizer: Any, path: str, max_tokens: int, context: int, stride: int, batch_size: int = 8
) -> tuple[float, float, int]:
    """Mean loss per predicted token of the files at ``path`` (:class:`StridedWindows` from the first token: windows of
    ``context`` tokens advancing by ``stride``; stride = context: non-overlapping), its standard error and the number
    of tokens predicted."""
    tokens = tokenize_files(path, tokenizer, max_tokens)
    if len(tokens) < 2:
        raise DataError(f"{path}: no text to score; give a file with at least a few words")
    micro = max(1, batch_size * model.spec.block_size // context)  # about batch_size windows of block_size in memory
    return score_strided(model, StridedWindows(tokens, context, stride), micro, next(model.parameters()).device)


def default_stride(context: int) -> int:
    """Half the context: each scored token sees context/2 + 1 to context tokens, for two forwards per token (a stride of
    1 would give exactly ``context`` for ``context`` forwards per token)."""
    return max(1, context // 2)


@torch.no_grad()
def score_strided(
    model: nn.Module, windows: StridedWindows, micro: int, device: torch.device, rank: int = 0, world_size: int = 1
) -> tuple[float, float, int]:
    """Mean loss over the targets ``windows`` scores (each once, at its context), its standard error over windows
    (ratio estimator: windows hold different numbers of targets) and the number of targets scored."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(6, dtype=torch.float64)  # windows, targets, Σ s, Σ s², Σ s·n, Σ n² (s, n: a window's loss sum, targets)
    for x, y, scored in windows.batches(micro, rank, world_size):
        losses = token_losses(model, *to_device(x, y, device)).double().cpu()  # (b, L)
        s, n = (losses * scored).sum(1), scored.sum(1).double()  # (b,)
        stats += torch.stack([(n > 0).double().sum(), n.sum(), s.sum(), s.square().sum(), (s * n).sum(), n.square().sum()])
    model.train(was_training)
    k, count, total, s2, sn, n2 = all_sum(stats.tolist(), device)
    mean = total / count
    var = k / (k - 1) * max(0.0, s2 - 2 * mean * sn + mean * mean * n2) / count**2 if k > 1 else math.nan
    return mean, math.sqrt(var), int(count)


@torch.no_grad()
def position_losses(
    model: nn.Module, eval_set: EvalWindows, n: int, micro: int, device: torch.device, rank: int = 0, world_size: int = 1
) -> list[float]:
    """Mean loss at each position 0..T-1 of the first ``n`` windows of ``eval_set`` (non-overlapping, T its block size):
    how loss falls as context grows, and whether it rises again past the trained length."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(eval_set.block_size, dtype=torch.float64)  # (T,)
    for x, y, rows in eval_set.batches(n, micro, rank, world_size):
        sums += token_losses(model, *to_device(x, y, device))[:rows].double().sum(0).cpu()
    model.train(was_training)
    return [v / n for v in all_sum(sums.tolist(), device)]


def bucket_means(values: list[float], width: int) -> dict[int, float]:
    """Mean of each run of ``width`` values, keyed by its first index: {0: mean(values[:width]), width: ...}."""
    return {i: sum(values[i : i + width]) / len(values[i : i + width]) for i in range(0, len(values), width)}


class ContextEval:
    """The long-context evaluation (``eval.contexts``) on fixed sets of the validation split, shared by every variant
    and seed: the split's last ``n_tokens`` targets (at most half of them), the same at every context, scored at each
    context N by :class:`StridedWindows` with stride N/2 (so every target sees N/2 + 1 to N tokens: differences
    between contexts are context, not text), and the loss by position over the first non-overlapping windows of the
    longest context (:class:`EvalWindows`). Built before training, so a split too short fails before training does."""

    def __init__(self, tokens: np.ndarray | str, contexts: list[int], n_tokens: int) -> None:
        longest = max(contexts)
        self.by_position = EvalWindows(tokens, longest)
        if len(self.by_position.tokens) < 2 * longest + 2:
            raise DataError(
                f"the validation split has {len(self.by_position.tokens):,} tokens, too few for eval.contexts up to "
                f"{longest} (at least {2 * longest + 2:,}); lower eval.contexts or raise data.val_fraction"
            )
        last = min(n_tokens, (len(self.by_position.tokens) - 1) // 2)  # targets: the split's last ones (first >= longest)
        first = len(self.by_position.tokens) - 1 - last
        self.strided = {n: StridedWindows(tokens, n, default_stride(n), first=first) for n in sorted(contexts)}
        self.n_windows = self.by_position.count(n_tokens)

    def run(
        self, model: nn.Module, micro_tokens: int, device: torch.device, rank: int = 0, world_size: int = 1
    ) -> tuple[dict[str, float], dict[int, float]]:
        """``val_loss_ctxN`` and ``val_loss_se_ctxN`` at each context, and the loss by position at the longest, the
        mean of each 1/32 of it ({bucket start: loss}); micro-batches of about ``micro_tokens`` tokens."""
        record = {}
        for n, windows in self.strided.items():
            loss, se, _ = score_strided(model, windows, max(1, micro_tokens // n), device, rank, world_size)
            record[context_metric("val_loss", n)], record[context_metric("val_loss_se", n)] = loss, se
        longest = self.by_position.block_size
        micro = max(1, micro_tokens // longest)
        losses = position_losses(model, self.by_position, self.n_windows, micro, device, rank, world_size)
        return record, bucket_means(losses, max(1, longest // 32))
