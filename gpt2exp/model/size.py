"""A model's size from its spec alone: what ``GPT(spec).num_params()`` and ``flops_per_token()``
return, and the bytes its KV cache holds per token, computed without building (or allocating)
anything, so ``gpt2exp validate`` stays instant."""

from __future__ import annotations

from gpt2exp.spec import ExperimentSpec, ModelSpec


def num_params(spec: ModelSpec, exclude_embeddings: bool = False) -> int:
    """Parameters of ``GPT(spec)`` (tied weights once); without token and position embeddings if asked."""
    c, bias = spec.n_embd, int(spec.bias)
    qkv = (spec.n_head + 2 * (spec.n_kv_head or spec.n_head)) * spec.head_size
    norm = c * (1 + bias)  # LayerNorm: weight (+ bias)
    attention = c * qkv + qkv * bias + c * c + c * bias  # c_attn, c_proj
    hidden = spec.mlp_width
    mlp = c * hidden + hidden * bias + hidden * c + c * bias  # c_fc, c_proj
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


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int = 4) -> int:
    """Bytes the KV cache holds per token of context: keys and values of every layer's n_kv_head
    heads, 2·L·Hkv·hs elements of ``dtype_bytes`` each (4: fp32, the CPU; 2: bf16/fp16 autocast on a GPU).
    A sliding window caps what decoding needs at ``sliding_window`` tokens (see :func:`kv_cache_bytes`)."""
    return 2 * spec.n_layer * (spec.n_kv_head or spec.n_head) * spec.head_size * dtype_bytes


def kv_cache_bytes(spec: ModelSpec, context: int, dtype_bytes: int = 4) -> int:
    """Bytes of the KV cache that decoding at ``context`` tokens needs (one sequence): a sliding window keeps only its last W."""
    return kv_bytes_per_token(spec, dtype_bytes) * min(context, spec.sliding_window or context)


def precision_bytes(precision: str, use_gpu: bool) -> int:
    """Bytes per activation (and cached key/value) element of a run: 2 under bf16/fp16 autocast (``auto`` on a GPU), else 4."""
    return 4 if precision == "fp32" or (precision == "auto" and not use_gpu) else 2


def run_kv_bytes_per_token(spec: ExperimentSpec) -> int:
    """:func:`kv_bytes_per_token` of a run, in its precision on its device."""
    return kv_bytes_per_token(spec.model, precision_bytes(spec.train.precision, spec.parallel.use_gpu))
