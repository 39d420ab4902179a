"""A model's size from its spec alone: what ``GPT(spec).num_params()`` and ``flops_per_token()``
return, computed without building (or allocating) anything, so ``gpt2exp validate`` stays instant."""

from __future__ import annotations

from gpt2exp.spec import ModelSpec


def num_params(spec: ModelSpec, exclude_embeddings: bool = False) -> int:
    """Parameters of ``GPT(spec)`` (tied weights once); without token and position embeddings if asked."""
    c, bias = spec.n_embd, int(spec.bias)
    qkv = (spec.n_head + 2 * (spec.n_kv_head or spec.n_head)) * spec.head_size
    norm = c * (1 + bias)  # LayerNorm: weight (+ bias)
    attention = c * qkv + qkv * bias + c * c + c * bias  # c_attn, c_proj
    mlp = c * 4 * c + 4 * c * bias + 4 * c * c + c * bias  # c_fc, c_proj
    n = spec.n_layer * (2 * norm + attention + mlp) + norm  # blocks, ln_f
    n += int(spec.positional == "sinusoidal")  # pos_scale
    n += 0 if spec.tie_weights else spec.vocab_size * c  # lm_head
    if not exclude_embeddings:
        n += spec.vocab_size * c + (spec.block_size * c if spec.positional == "learned" else 0)
    return n


def flops_per_token(spec: ModelSpec) -> int:
    """Training FLOPs per token as ``GPT.flops_per_token``: 6 x the matmul parameters (the LM head
    counts, embedding lookups do not) + 12·L·H·hs·T for attention over the attended context T."""
    matmul = num_params(spec, exclude_embeddings=True) + (spec.vocab_size * spec.n_embd if spec.tie_weights else 0)
    context = min(spec.block_size, spec.sliding_window or spec.block_size)
    return 6 * matmul + 12 * spec.n_layer * spec.n_head * spec.head_size * context
