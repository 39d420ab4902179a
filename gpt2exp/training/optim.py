"""AdamW and the learning-rate schedule (linear warmup, then cosine or linear decay to min_lr)."""

from __future__ import annotations

import math

import torch

from gpt2exp.model import GPT
from gpt2exp.spec import TrainSpec


def build_optimizer(model: GPT, train: TrainSpec, device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on >= 2-D weights only; the fused kernel on GPU."""
    return torch.optim.AdamW(
        model.optim_groups(train.weight_decay),
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        fused=device.type == "cuda",
    )


def lr_at(step: int, total_steps: int, train: TrainSpec) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    min_lr = train.lr / 10 if train.min_lr is None else train.min_lr
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    progress = min(1.0, (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if train.lr_schedule == "cosine" else 1.0 - progress
    return min_lr + shape * (train.lr - min_lr)
