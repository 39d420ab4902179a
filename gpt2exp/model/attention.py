"""Causal self-attention with n_kv_head key/value heads (MHA, GQA, MQA), an optional sliding
window, RoPE or ALiBi, and a KV cache for generation. Scores go through
``F.scaled_dot_product_attention``, or for windows and ALiBi on CUDA through FlexAttention
(``model/flex.py``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2exp.model import flex
from gpt2exp.model.positional import alibi_slopes, apply_rope
from gpt2exp.spec import ModelSpec


class KVCache:
    """Keys and values of every layer for generation, each (B, n_kv_head, capacity, hs): a rolling buffer
    in which the token at position p lives in slot (p - start) % capacity, so once it is full each new
    token overwrites the oldest. Attention through a cache sees at most its last ``capacity`` tokens (a
    sliding window that wide). ``pos`` is the position of the next token; a cache may start past 0 to
    continue a sequence whose beginning it never saw. Allocated on first write with the keys' dtype and device."""

    def __init__(self, n_layer: int, capacity: int, pos: int = 0) -> None:
        self.capacity, self.start, self.pos = capacity, pos, pos
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer

    def key_positions(self, T: int, device: torch.device) -> Tensor:
        """Positions (S,) of the keys ``update`` returns when T tokens come in: the cached ones in slot
        order, then the new ones (a single token is written in place, so it is among the slots)."""
        n, cap = self.pos - self.start, self.capacity  # tokens seen so far
        if T == 1:
            slots = torch.arange(min(n + 1, cap), device=device)
            return self.pos - (n - slots) % cap
        slots = torch.arange(min(n, cap), device=device)
        return torch.cat([self.pos - 1 - (n - 1 - slots) % cap, torch.arange(self.pos, self.pos + T, device=device)])

    def key_range(self, T: int) -> range | None:
        """``key_positions(T)`` as a range while they are contiguous (the buffer has not wrapped), else None."""
        n = self.pos - self.start
        return range(self.start, self.pos + T) if n < self.capacity or (T > 1 and n == self.capacity) else None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add k, v (B, Hkv, T, hs) at positions pos..pos+T; return the keys/values they attend to, at
        ``key_positions(T)``: the cached ones, then the new ones."""
        B, Hkv, T, hs = k.shape
        n, cap = self.pos - self.start, self.capacity
        keys, values = self.k[layer], self.v[layer]
        if keys is None or values is None:  # both, on the first write
            keys = self.k[layer] = k.new_empty(B, Hkv, cap, hs)
            values = self.v[layer] = v.new_empty(B, Hkv, cap, hs)
        if T == 1:  # decoding: overwrite the oldest slot, attend to every filled one
            keys[:, :, n % cap], values[:, :, n % cap] = k[:, :, 0], v[:, :, 0]
            return keys[:, :, : min(n + 1, cap)], values[:, :, : min(n + 1, cap)]
        old = min(n, cap)
        all_k = torch.cat([keys[:, :, :old], k], dim=2) if old else k  # (B, Hkv, old + T, hs)
        all_v = torch.cat([values[:, :, :old], v], dim=2) if old else v
        kept = min(T, cap)  # the newest tokens, into their slots
        slots = torch.arange(n + T - kept, n + T, device=k.device) % cap
        keys.index_copy_(2, slots, k[:, :, T - kept :])
        values.index_copy_(2, slots, v[:, :, T - kept :])
        return all_k, all_v


def narrowest_window(spec: ModelSpec, window: int | None) -> int | None:
    """The window in force: ``window`` (a generation context) or the spec's sliding window, the narrower."""
    if window is None or spec.sliding_window is None:  # no generator under min(): torch.compile traces this
        return spec.sliding_window if window is None else window
    return min(window, spec.sliding_window)


def attention_mask(spec: ModelSpec, start: int, T: int, keys: Tensor, window: int | None = None) -> Tensor | None:
    """What queries at positions start..start+T may see of keys at positions ``keys`` (S,): the causal
    past within the last ``window`` positions, or the spec's sliding window if narrower.

    None when plain causal attention is exact (``is_causal`` for a fresh sequence, nothing for a single
    query) and no window cuts in; else a bool mask (T, S), or for ALiBi an additive float bias (1, H, T, S).
    """
    window = narrowest_window(spec, window)
    S = keys.size(0)  # the keys are the last S positions: fresh (S == T) or the past of one query (T == 1)
    if spec.positional != "alibi" and (S == T or T == 1) and (window is None or window >= S):
        return None
    dist = torch.arange(start, start + T, device=keys.device)[:, None] - keys[None, :]  # (T, S) query - key position
    allowed = dist >= 0
    if window is not None:
        allowed &= dist < window
    if spec.positional != "alibi":
        return allowed
    slopes = alibi_slopes(spec.n_head).to(keys.device)[:, None, None]  # (H, 1, 1)
    bias = -slopes * dist.float()  # (H, T, S)
    return bias.masked_fill(~allowed, float("-inf"))[None]  # (1, H, T, S)


class Span(NamedTuple):
    """Where a forward pass through flex attends: query positions, key positions (a range when contiguous, else
    the cache's (S,) tensor) and the narrowest window in force (the generation context or the spec's), None
    when it cuts off no key."""

    queries: range
    keys: flex.Positions
    window: int | None


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        assert spec.n_kv_head is not None  # ModelSpec defaults it to n_head
        self.layer, self.n_head, self.n_kv_head, self.hs = layer, spec.n_head, spec.n_kv_head, spec.head_size
        # fused projection to [q (H*hs) | k (Hkv*hs) | v (Hkv*hs)], GPT-2's c_attn layout when Hkv = H
        self.c_attn = nn.Linear(spec.n_embd, (spec.n_head + 2 * spec.n_kv_head) * spec.head_size, bias=spec.bias)
        self.c_proj = nn.Linear(spec.n_embd, spec.n_embd, bias=spec.bias)
        self.resid_dropout = nn.Dropout(spec.dropout)
        self.dropout = spec.dropout
        self.alibi = spec.positional == "alibi"  # with a window, flex's cases (see model/flex.py)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        span: Span | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, Hkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, Hkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hs)
        dropout = self.dropout if self.training else 0.0
        if span is not None:  # GPT.hidden_states chose flex (a window or ALiBi, where flex runs)
            y = flex.flex_attention(q, k, v, span.queries, span.keys, window=span.window, alibi=self.alibi)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None and T > 1,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, H, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))
