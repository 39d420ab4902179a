"""Cross-entropy of a linear LM head that never materialises the full logits.

``linear_cross_entropy(h, W, targets)`` equals ``F.cross_entropy(h @ W.T, targets, ignore_index=-1)``
in value and gradients (to float32 rounding), but works through the rows of h a chunk at a time: the
forward computes each chunk's logits, its softmax (in place), its loss and at once its gradients w.r.t. h and W,
so only one (rows × vocab) block of logits exists at any moment (the idea of Liger-Kernel's
FusedLinearCrossEntropy and Apple's cut-cross-entropy). The backward only scales the saved gradients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

IGNORE = -1  # targets equal to this are not scored
CHUNK_ROWS = 256  # rows of logits at a time: (256, 50304) float32 is 51 MB


def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, reduction: Literal["mean", "none"] = "mean", chunk: int = CHUNK_ROWS
) -> Tensor:
    """Cross-entropy of logits h @ weight.T: h (N, C), weight (V, C), targets (N,) with -1 ignored.
    ``mean`` over the scored targets (a scalar), or ``none``: (N,) float32, 0 where ignored.
    Under autocast the matmuls run in its dtype and the softmax in float32, as autocast would do."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        if reduction == "none" or not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
            losses = _row_losses(h.to(dtype), weight.to(dtype), targets, chunk)
            return losses if reduction == "none" else losses.sum() / (targets != IGNORE).sum()
        return _LinearCrossEntropy.apply(h, weight, targets, dtype, chunk)


def _row_losses(h: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """Per-row losses (N,), float32 at least, 0 where ignored, a chunk of logits at a time (differentiable, unfused)."""
    out = []
    for s in range(0, h.size(0), chunk):
        logits = h[s : s + chunk] @ weight.T  # (n, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        t = targets[s : s + chunk]
        scored = t != IGNORE
        picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)  # (n,)
        out.append(torch.where(scored, logits.logsumexp(1) - picked, 0.0))
    return torch.cat(out)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy with its gradients computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, chunk: int) -> Tensor:
        N, V = h.size(0), weight.size(0)
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: float32 at least
        scored = targets != IGNORE  # (N,)
        count = scored.sum()
        rows = (scored / count.clamp(min=1)).to(acc)  # (N,) each row's weight in the mean: 1/count, 0 if ignored
        t = targets.clamp(min=0)[:, None]  # (N, 1) a valid index on ignored rows too
        w = weight.to(dtype)  # (V, C)
        grad_h = torch.empty_like(h)  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=acc)  # (V, C) accumulated over chunks
        total = torch.zeros((), device=h.device, dtype=acc)
        logits = torch.empty(min(chunk, N), V, device=h.device, dtype=dtype)  # reused for every chunk
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            hc, tc, rc = h[s : s + n].to(dtype), t[s : s + n], rows[s : s + n, None]  # (n, C), (n, 1), (n, 1)
            z = torch.mm(hc, w.T, out=logits[:n]).to(acc)  # (n, V), in place unless autocast's dtype is narrower
            top, picked = z.amax(1, keepdim=True), z.gather(1, tc)  # (n, 1) each
            p = z.sub_(top).exp_()  # (n, V) softmax numerators, over the logits
            norm = p.sum(1, keepdim=True)  # (n, 1)
            total += ((top + norm.log() - picked) * rc).sum()  # log-sum-exp - target logit
            p.mul_(rc / norm).scatter_add_(1, tc, -rc)  # d loss / d logits = (softmax - one-hot) * row weight
            g = p.to(dtype)
            grad_h[s : s + n] = torch.mm(g, w)
            if grad_w.dtype == dtype:
                grad_w.addmm_(g.T, hc)
            else:
                grad_w += torch.mm(g.T, hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return torch.where(count > 0, total, torch.nan)  # F.cross_entropy's mean of nothing is nan too

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (grad,), (grad_h, grad_w) = grad_outputs, ctx.saved_tensors
        return grad_h * grad, (grad_w * grad).to(ctx.weight_dtype), None, None, None
