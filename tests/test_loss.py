"""The chunked linear cross-entropy (``gpt2exp.model.loss``) against the plain path it replaces:
``F.cross_entropy`` over the full logits, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2exp.model import GPT
from gpt2exp.model.loss import linear_cross_entropy
from gpt2exp.spec import ModelSpec

N, C, V, CHUNK = 301, 24, 1001, 64  # N not a multiple of the chunk, V odd
TOL = dict(rtol=1e-5, atol=1e-6)


def data(ignored: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states (N, C), a head (V, C) scaled to give peaked logits, and targets (N,) with some -1."""
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = -1
    return h.requires_grad_(), w.requires_grad_(), targets


def plain(h: Tensor, w: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    return F.cross_entropy(h @ w.T, targets, ignore_index=-1, reduction=reduction)


def grads(loss: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("chunk", [CHUNK, N, 1000])
def test_loss_and_gradients_equal_plain_cross_entropy(chunk: int) -> None:
    h, w, targets = data()
    ours, expected = linear_cross_entropy(h, w, targets, chunk=chunk), plain(h, w, targets)
    assert ours.item() > 5.0  # peaked logits, far from uniform: a real test of the softmax
    torch.testing.assert_close(ours, expected, **TOL)
    for got, want in zip(grads(ours * 3.0, h, w), grads(expected * 3.0, h, w), strict=True):  # scaled like loss / accum
        torch.testing.assert_close(got, want, **TOL)
    assert grads(linear_cross_entropy(h, w, targets, chunk=chunk), h)[0][targets == -1].abs().max() == 0


def test_per_token_losses_and_no_grad() -> None:
    h, w, targets = data()
    rows = linear_cross_entropy(h, w, targets, reduction="none", chunk=CHUNK)
    torch.testing.assert_close(rows, plain(h, w, targets, "none"), **TOL)
    assert rows[targets == -1].abs().max() == 0
    torch.testing.assert_close(grads(rows.sum(), w)[0], grads(plain(h, w, targets, "none").sum(), w)[0], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, targets, chunk=CHUNK), plain(h, w, targets), **TOL)


def test_extreme_logits_and_nothing_scored() -> None:
    h, w, targets = data()
    big = h.detach() * 60  # losses of hundreds of nats: p(target) underflows to 0 in float32
    ours = linear_cross_entropy(big, w, targets, chunk=CHUNK)
    assert torch.isfinite(ours) and ours.item() > 200
    torch.testing.assert_close(ours, plain(big, w, targets), rtol=1e-5, atol=1e-3)
    none = torch.full_like(targets, -1)
    assert linear_cross_entropy(h, w, none).isnan() and plain(h, w, none).isnan()  # the mean of nothing
    assert grads(linear_cross_entropy(h, w, none), w)[0].abs().max() == 0


def test_autocast_bf16_matches_the_plain_path_under_autocast() -> None:
    h, w, targets = data(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, expected = linear_cross_entropy(h, w, targets, chunk=CHUNK), plain(h, w, targets)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected.float(), rtol=1e-3, atol=1e-3)
    for got, want in zip(grads(ours, h, w), grads(expected, h, w), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-4)  # bf16 matmuls on both sides


def gpt(dropout: float = 0.0) -> GPT:
    spec = ModelSpec(vocab_size=V, block_size=160, n_layer=2, n_head=2, n_embd=32, dropout=dropout)
    return GPT(spec, seed=0)


def batch() -> tuple[Tensor, Tensor]:
    data = torch.randint(0, V, (2, 161), generator=torch.Generator().manual_seed(0))  # 320 rows: 2 chunks of 256 rows
    idx, targets = data[:, :-1], data[:, 1:].clone()
    targets[0, :7] = -1
    return idx, targets


def test_gpt_gradients_equal_the_logits_path() -> None:
    """Every parameter's gradient after a full backward, with dropout on (same seed, same masks)."""
    idx, targets = batch()
    model = gpt(dropout=0.1)
    results = []
    for return_logits in (False, True):
        torch.manual_seed(0)
        logits, loss = model(idx, targets, return_logits=return_logits)
        assert (logits is None) != return_logits
        results.append((loss, grads(loss, *model.parameters())))
    (ours, ours_grads), (expected, expected_grads) = results
    torch.testing.assert_close(ours, expected, **TOL)
    for (name, _), got, want in zip(model.named_parameters(), ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    per_token = model.eval()(idx, targets, reduction="none")[1]
    assert per_token.shape == targets.shape
    torch.testing.assert_close(per_token[targets != -1].mean(), model(idx, targets, return_logits=True)[1], **TOL)


def test_three_training_steps_give_the_same_weights() -> None:
    """Within 2% of one AdamW step: Adam divides each gradient element by its own scale, so where a
    gradient is ~1e-8 (embedding rows of tokens absent from the batch) float rounding shows in the update."""
    idx, targets = batch()
    trained, lr = [], 1e-2
    for return_logits in (False, True):
        model = gpt()
        opt = torch.optim.AdamW(model.optim_groups(0.1), lr=lr)
        for _ in range(3):
            model(idx, targets, return_logits=return_logits)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        trained.append(model.state_dict())
    ours, expected = trained
    for name, want in expected.items():
        torch.testing.assert_close(ours[name], want, rtol=0, atol=0.02 * lr, msg=lambda m, name=name: f"{name}: {m}")
