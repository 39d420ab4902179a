"""Causal self-attention with n_kv_head key/value heads (MHA, GQA, MQA), an optional sliding
window, RoPE or ALiBi, and a KV cache for generation. Scores go through
``F.scaled_dot_product_attention``, or for windows and ALiBi on CUDA through FlexAttention
(``model/flex.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2exp.model import flex
from gpt2exp.model.positional import alibi_slopes, apply_rope
from gpt2exp.spec import ModelSpec


class KVCache:
    """Keys and values of every layer for generation: each (B, n_kv_head, block_size, hs), filled
    up to ``pos``. Allocated on first write with the dtype and device of the keys."""

    def __init__(self, n_layer: int, block_size: int) -> None:
        self.block_size, self.pos = block_size, 0
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, hs) at positions pos..pos+T; return all keys/values so far."""
        B, Hkv, T, hs = k.shape
        keys, values = self.k[layer], self.v[layer]
        if keys is None or values is None:  # both, on the first write
            keys = self.k[layer] = k.new_empty(B, Hkv, self.block_size, hs)
            values = self.v[layer] = v.new_empty(B, Hkv, self.block_size, hs)
        end = self.pos + T
        keys[:, :, self.pos : end] = k
        values[:, :, self.pos : end] = v
        return keys[:, :, :end], values[:, :, :end]


def attention_mask(spec: ModelSpec, start: int, T: int, device: torch.device) -> Tensor | None:
    """What queries at positions start..start+T may see of keys 0..start+T.

    None when plain causal attention is exact (``is_causal`` for a fresh sequence, nothing for a
    single cached query); else a bool mask (T, S), or for ALiBi an additive float bias (1, H, T, S).
    """
    if spec.positional != "alibi" and spec.sliding_window is None and (start == 0 or T == 1):
        return None
    q_pos = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(start + T, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos  # (T, S)
    if spec.sliding_window is not None:
        allowed &= q_pos - k_pos < spec.sliding_window
    if spec.positional != "alibi":
        return allowed
    slopes = alibi_slopes(spec.n_head).to(device)[:, None, None]  # (H, 1, 1)
    bias = -slopes * (q_pos - k_pos).float()  # (H, T, S)
    return bias.masked_fill(~allowed, float("-inf"))[None]  # (1, H, T, S)


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
        self.window, self.alibi = spec.sliding_window, spec.positional == "alibi"  # flex's cases (see model/flex.py)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
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
        if (self.window is not None or self.alibi) and flex.use_flex(q, dropout):
            S = k.size(2)  # queries are the last T of the key positions 0..S
            y = flex.flex_attention(q, k, v, range(S - T, S), range(S), window=self.window, alibi=self.alibi)
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
