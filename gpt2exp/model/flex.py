"""FlexAttention for sliding windows and ALiBi.

Through SDPA, a window or an ALiBi bias is an explicit (T, S) mask, which rules out the flash kernels:
a window then costs the full T² of attention, and under bf16 autocast the ALiBi bias is rounded to
bf16 (at distance ~1000, neighbouring keys get the same bias). ``torch.nn.attention.flex_attention``
takes the window as a block mask (blocks wholly outside it are skipped, so attention costs ~T·W) and
ALiBi as a ``score_mod`` applied to the fp32 scores inside the kernel.

Flex is fused only when compiled, and in torch 2.13 it has no attention dropout and no backward pass
off CUDA. ``auto`` (the default) therefore takes flex on CUDA (a compiled ``flex_attention``, or the model's
own graph under ``torch.compile``) and SDPA elsewhere: on the CPU, flex could only serve evaluation, and
there the compiled CPU template was not faster than SDPA's masked path (``benchmarks/README.md``); eager
flex is an unfused reference that materialises the scores. ``GPT2EXP_ATTENTION=flex`` (or
``set_attention_backend``) forces flex wherever it can run, ``sdpa`` forces today's path. The backend is an
execution detail like the SDPA kernel, not part of the experiment: both compute the same attention.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Literal, cast, get_args

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as flex

from gpt2exp.errors import INPUT, Gpt2expError

Backend = Literal["auto", "flex", "sdpa"]
Positions = range | Tensor  # absolute positions: a range (contiguous, block mask cached) or a (n,) tensor


class AttentionBackendError(Gpt2expError, ValueError):
    """An attention backend that does not exist, or flex asked for what it cannot do."""

    code = INPUT


def _checked(backend: str) -> Backend:
    if backend not in get_args(Backend):
        raise AttentionBackendError(f"attention backend {backend!r} is not one of auto, flex, sdpa (GPT2EXP_ATTENTION)")
    return cast(Backend, backend)


_backend: Backend = _checked(os.environ.get("GPT2EXP_ATTENTION", "auto"))


def set_attention_backend(backend: Backend) -> Backend:
    """Choose how windowed and ALiBi attention runs in this process; returns the previous choice."""
    global _backend
    previous, _backend = _backend, _checked(backend)
    return previous


def use_flex(q: Tensor, dropout: float) -> bool:
    """Whether windowed/ALiBi attention of queries q (B, H, T, hs), or of a block's input (B, T, C), goes through
    flex: ``auto`` = on CUDA for T > 1 (flex has no attention dropout, and no backward pass off CUDA)."""
    if _backend == "sdpa":
        return False
    missing = "attention dropout" if dropout > 0 else "backward pass off CUDA" if q.requires_grad and not q.is_cuda else None
    if missing is not None:
        if _backend == "flex":
            raise AttentionBackendError(
                f"the flex attention backend has no {missing} (torch {torch.__version__}); "
                "use GPT2EXP_ATTENTION=auto, which takes SDPA there"
            )
        return False
    # a single decoding query gains nothing from block sparsity, and each step's new length would recompile flex
    return _backend == "flex" or (q.is_cuda and q.size(-2) > 1)


def _position(pos: Positions) -> Callable[[Tensor], Tensor]:
    """Index -> absolute position: an offset for a range, a lookup for a tensor."""
    if isinstance(pos, range):
        assert pos.step == 1, "positions given as a range must be contiguous"
        return lambda i: i + pos.start
    return lambda i: pos[i]


def _mask_mod(q_pos: Positions, k_pos: Positions, window: int | None) -> Callable[..., Tensor]:
    qp, kp = _position(q_pos), _position(k_pos)

    def causal_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = qp(q_idx) - kp(kv_idx)
        return (distance >= 0) & (distance < window) if window is not None else distance >= 0

    return causal_window


@functools.lru_cache(maxsize=32)
def _cached_block_mask(q_pos: range, k_pos: range, window: int | None, device: torch.device) -> flex.BlockMask:
    return flex.create_block_mask(_mask_mod(q_pos, k_pos, window), None, None, len(q_pos), len(k_pos), device=device)


def block_mask(q_pos: Positions, k_pos: Positions, window: int | None, device: torch.device) -> flex.BlockMask:
    """The causal (optionally windowed) block mask of queries at q_pos over keys at k_pos, shared by
    batch and heads; cached per (T, S, offsets, window, device) when both are ranges."""
    if isinstance(q_pos, range) and isinstance(k_pos, range) and not torch.compiler.is_compiling():
        return _cached_block_mask(q_pos, k_pos, window, device)
    return flex.create_block_mask(_mask_mod(q_pos, k_pos, window), None, None, len(q_pos), len(k_pos), device=device)


def alibi_slope(h: Tensor, n_head: int) -> Tensor:
    """ALiBi's slope of head h (``positional.alibi_slopes``) computed from h in fp32 inside the kernel: no
    captured tensor to create, move or cast (a model cast to bf16 keeps fp32 slopes)."""
    closest = 2 ** math.floor(math.log2(n_head))
    slope = torch.exp2(-8.0 * (h + 1) / closest)  # 2^(-8/c), 2^(-16/c), ...
    if closest == n_head:
        return slope
    return torch.where(h < closest, slope, torch.exp2(-4.0 * (2 * (h - closest) + 1) / closest))  # odd terms of 2c


def _alibi_mod(q_pos: Positions, k_pos: Positions, n_head: int) -> Callable[..., Tensor]:
    qp, kp = _position(q_pos), _position(k_pos)

    def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - alibi_slope(h, n_head) * (qp(q_idx) - kp(kv_idx))  # score is fp32 inside flex, whatever q's dtype

    return alibi


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """flex_attention compiled once (on first use: importing dynamo is slow): the fused kernel on CUDA."""
    return torch.compile(flex.flex_attention, dynamic=False)


def flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Positions,
    k_pos: Positions,
    *,
    window: int | None,
    alibi: bool,
    scale: float | None = None,
) -> Tensor:
    """Causal attention of q (B, H, T, hs) over k, v (B, Hkv, S, hs) -> (B, H, T, hs): query i at
    q_pos[i] sees key j at k_pos[j] when 0 <= q_pos[i] - k_pos[j] (< window), with the ALiBi bias
    -slope_h · (q_pos[i] - k_pos[j]) added to the fp32 scores with ``alibi``."""
    mask = block_mask(q_pos, k_pos, window, q.device)
    score_mod = _alibi_mod(q_pos, k_pos, q.size(1)) if alibi else None
    attend = flex.flex_attention if torch.compiler.is_compiling() or not q.is_cuda else _compiled_flex()
    y = attend(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    return cast(Tensor, y)
