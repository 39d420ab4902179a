"""Position information: added to the embeddings (learned, sinusoidal), rotated into q/k (RoPE),
or added to the attention scores (ALiBi). ``none`` relies on the causal mask alone (NoPE)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoidal_table(n: int, n_embd: int, start: int = 0) -> Tensor:
    """Fixed sin/cos embeddings of "Attention Is All You Need" for positions start..start+n: (n, n_embd)."""
    pos = torch.arange(start, start + n, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd))  # (C/2,)
    table = torch.zeros(n, n_embd)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: n_embd // 2])
    return table


def rope_cache(n: int, head_size: int, theta: float, start: int = 0) -> tuple[Tensor, Tensor]:
    """cos and sin of RoPE angles for positions start..start+n, each (n, head_size), laid out for ``rotate_half``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(start, start + n, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, hs) by the angles of its positions; cos/sin are (T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(n_head: int) -> Tensor:
    """Per-head slopes of ALiBi (Press et al. 2022), including the non-power-of-two rule: (n_head,)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(closest)
    if closest < n_head:
        slopes += power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)
