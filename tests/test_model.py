"""Behaviour of the GPT model family on tiny configs: every attention kind (MHA, GQA, MQA) ×
positional encoding × sliding window, checked against a plain reference implementation written
here (explicit repeat_interleave of k/v, explicit masked softmax, RoPE and ALiBi by formula)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2exp.model import GPT, KVCache
from gpt2exp.model.decode import Decoder
from gpt2exp.model.gpt import ContextTooLong
from gpt2exp.model.positional import alibi_slopes
from gpt2exp.spec import ModelSpec

GPT2_VOCAB = 50257
N_HEAD = 4
ATTENTION = {"mha": N_HEAD, "gqa": 2, "mqa": 1}  # name -> n_kv_head
POSITIONALS = ("learned", "sinusoidal", "rope", "alibi", "none")
WINDOWS = (None, 8)
pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = [
    pytest.param(kv, pos, w, id=f"{name}-{pos}-{'sw' + str(w) if w else 'full'}")
    for name, kv in ATTENTION.items()
    for pos in POSITIONALS
    for w in WINDOWS
]


def tiny(
    n_kv_head: int = N_HEAD,
    positional: str = "learned",
    window: int | None = None,
    *,
    vocab_size: int = 256,
    n_layer: int = 2,
    block_size: int = 32,
    seed: int = 0,
    **spec: object,
) -> GPT:
    """A small GPT (4 heads of 16) with a fixed seed."""
    torch.manual_seed(seed)
    return GPT(
        ModelSpec(
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=n_layer,
            n_head=N_HEAD,
            n_kv_head=n_kv_head,
            n_embd=64,
            positional=positional,
            sliding_window=window,
            **spec,
        )
    )


def randomize_(model: GPT, std: float = 0.3, seed: int = 1) -> GPT:
    """Give every parameter (LayerNorms and biases included) sizeable random values, so that
    comparisons are not dominated by the near-zero logits of a freshly initialised model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * std
            p.copy_(1.0 + noise if "ln_" in name and name.endswith("weight") else noise)
    return model


# ------------------------------------------------------------------------- reference model
def reference_logits(model: GPT, idx: Tensor) -> Tensor:
    """Logits of ``model`` recomputed from its weights with textbook formulas, no SDPA."""
    s = model.spec
    B, T = idx.shape
    C, H, Hkv, hs = s.n_embd, s.n_head, s.n_kv_head, s.head_size
    tr = model.transformer
    dtype = tr.wte.weight.dtype
    pos = torch.arange(T, dtype=dtype)
    x = tr.wte.weight[idx]
    if s.positional == "learned":
        x = x + tr.wpe.weight[:T]
    elif s.positional == "sinusoidal":  # PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(...)
        angle = pos[:, None] / 10000 ** (torch.arange(0, C, 2, dtype=dtype) / C)
        pe = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(T, C)
        x = x + model.pos_scale * pe  # scaled sinusoidal: a learnable amplitude

    def rope(t: Tensor) -> Tensor:  # rotate pairs (i, i + hs/2) by p * theta^(-2i/hs)
        half = hs // 2
        angle = pos[:, None] * s.rope_theta ** (-2 * torch.arange(half, dtype=dtype) / hs)
        cos, sin = angle.cos(), angle.sin()
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    dist = pos[:, None] - pos[None, :]  # query position - key position
    allowed = dist >= 0
    if s.sliding_window:
        allowed &= dist < s.sliding_window
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=dtype)  # power-of-two H

    for blk in tr.h:
        a = blk.attn
        h = F.layer_norm(x, (C,), blk.ln_1.weight, blk.ln_1.bias)
        qkv = h @ a.c_attn.weight.T + a.c_attn.bias
        q, k, v = qkv.split([H * hs, Hkv * hs, Hkv * hs], dim=-1)
        q = q.view(B, T, H, hs).transpose(1, 2)
        k = k.view(B, T, Hkv, hs).transpose(1, 2)
        v = v.view(B, T, Hkv, hs).transpose(1, 2)
        if s.positional == "rope":
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // Hkv, dim=1)  # query head j uses kv head j // (H / Hkv)
        v = v.repeat_interleave(H // Hkv, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, H, T, T)
        if s.positional == "alibi":
            scores = scores - slopes[:, None, None] * dist
        att = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ a.c_proj.weight.T + a.c_proj.bias
        h = F.layer_norm(x, (C,), blk.ln_2.weight, blk.ln_2.bias)
        m = h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias
        m = 0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3)))
        x = x + m @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    x = F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias)
    return x @ model.lm_head.weight.T


@pytest.mark.parametrize("n_kv_head, positional, window", VARIANTS)
def test_matches_reference_implementation(n_kv_head: int, positional: str, window: int | None) -> None:
    model = randomize_(tiny(n_kv_head, positional, window, block_size=24)).double().eval()
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(idx)
        expected = reference_logits(model, idx)
    # sinusoidal and RoPE tables are built in float32 by the model, so those agree to float32 precision
    tol = 1e-5 if positional in ("sinusoidal", "rope") else 1e-9
    torch.testing.assert_close(logits, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------- shapes, grads, causality
@pytest.mark.parametrize("n_kv_head, positional, window", VARIANTS)
def test_forward_backward_and_initial_loss(n_kv_head: int, positional: str, window: int | None) -> None:
    model = tiny(n_kv_head, positional, window, vocab_size=GPT2_VOCAB)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, GPT2_VOCAB, (2, 32), generator=g)
    targets = torch.randint(0, GPT2_VOCAB, (2, 32), generator=g)
    logits, loss = model(idx, targets, return_logits=True)
    assert logits.shape == (2, 32, GPT2_VOCAB)
    assert loss is not None and loss.shape == ()
    assert abs(loss.item() - math.log(GPT2_VOCAB)) < 0.3, "a fresh model should predict near-uniformly"
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.shape == p.shape
    assert model(idx)[1] is None


def test_ignore_index_targets() -> None:
    model = tiny().eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = idx.roll(-1, dims=1)
    masked = targets.clone()
    masked[:, 8:] = -1
    (logits, _), (_, loss) = model(idx), model(idx, masked)
    expected = F.cross_entropy(logits[:, :8].reshape(-1, 256), targets[:, :8].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("n_kv_head, positional, window", VARIANTS)
def test_causality(n_kv_head: int, positional: str, window: int | None) -> None:
    model = tiny(n_kv_head, positional, window).double().eval()
    idx = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base, _ = model(idx)
        for t in (0, 5, 17, 31):
            changed = idx.clone()
            changed[0, t] = (idx[0, t] + 1) % 256
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-12, msg=f"future token {t} leaked")
            assert (logits[:, t] - base[:, t]).abs().max() > 1e-6, f"token {t} does not affect its own logits"


def test_learned_positions_reject_a_sequence_longer_than_block() -> None:
    model = tiny(positional="learned", block_size=16)
    assert model.max_context == 16
    with pytest.raises(ContextTooLong, match="longer than the 16 positions a model with learned positions has"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("positional", ["sinusoidal", "rope", "alibi", "none"])
def test_positions_that_are_functions_extend_past_block(positional: str) -> None:
    """A model trained at block 16 scores 40 tokens as the same weights built for block 64 do."""
    short = randomize_(tiny(2, positional, block_size=16)).double().eval()
    long = tiny(2, positional, block_size=64).double().eval()
    long.load_state_dict(short.state_dict())
    assert short.max_context is None
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(short(idx)[0], long(idx)[0], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("positional", POSITIONALS)
@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("n_layer", [1, 2])
def test_sliding_window_receptive_field(positional: str, n_kv_head: int, n_layer: int) -> None:
    """With window W, a token sees the last W tokens, so after L layers the logits at t depend on
    tokens t - L(W-1) .. t only. With learned/sinusoidal positions this runs purely through attention."""
    W, T = 4, 20
    reach = n_layer * (W - 1)
    model = randomize_(tiny(n_kv_head, positional, W, n_layer=n_layer, block_size=T), std=0.1).double().eval()
    idx = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0))
    ts = range(reach + 1, T)
    batch = [idx[0]]
    for t in ts:  # one row with token t - reach - 1 changed, one with token t - reach changed
        for j in (t - reach - 1, t - reach):
            row = idx[0].clone()
            row[j] = (row[j] + 1) % 256
            batch.append(row)
    with torch.no_grad():
        logits, _ = model(torch.stack(batch))
    base = logits[0]
    for i, t in enumerate(ts):
        outside, inside = logits[1 + 2 * i, t], logits[2 + 2 * i, t]
        torch.testing.assert_close(outside, base[t], rtol=0, atol=1e-12, msg=f"logit {t} sees token {t - reach - 1}")
        assert (inside - base[t]).abs().max() > 1e-8, f"logit {t} does not see token {t - reach}"


def test_window_equal_to_block_is_plain_causal() -> None:
    full, windowed = tiny(window=None, block_size=16), tiny(window=16, block_size=16)
    windowed.load_state_dict(full.state_dict())
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(windowed(idx)[0], full(idx)[0])


# ------------------------------------------------------------------------ grouped-query order
@pytest.mark.parametrize("positional", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["gqa", "mqa"])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_head: int, positional: str) -> None:
    """A GQA model equals the MHA model whose k/v heads are copies: query head j uses kv head
    j // (n_head / n_kv_head)."""
    gqa = randomize_(tiny(n_kv_head, positional)).double().eval()
    mha = tiny(N_HEAD, positional).double().eval()
    state = gqa.state_dict()
    hs, rep = 16, N_HEAD // n_kv_head
    for i in range(2):
        for kind in ("weight", "bias"):
            key = f"transformer.h.{i}.attn.c_attn.{kind}"
            q, k, v = state[key].split([N_HEAD * hs, n_kv_head * hs, n_kv_head * hs], dim=0)
            k = k.unflatten(0, (n_kv_head, hs)).repeat_interleave(rep, dim=0).flatten(0, 1)
            v = v.unflatten(0, (n_kv_head, hs)).repeat_interleave(rep, dim=0).flatten(0, 1)
            state[key] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-10, atol=1e-10)


def test_gqa_with_all_heads_is_mha() -> None:
    assert tiny(n_kv_head=N_HEAD).spec.attention_kind == "MHA"
    a, b = tiny(), GPT(ModelSpec(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64))  # n_kv_head defaulted
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a(idx)[0], b(idx)[0], rtol=0, atol=0)


def test_alibi_slopes() -> None:
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0**-i for i in (2, 4, 6, 8)]
    # non-power-of-two: the 4-head slopes, then every other slope of the 8-head set
    assert alibi_slopes(6).tolist() == [2.0**-i for i in (2, 4, 6, 8, 1, 3)]


# --------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("n_kv_head, positional, window", VARIANTS)
def test_cached_and_uncached_generation_agree_far_past_block(n_kv_head: int, positional: str, window: int | None) -> None:
    """Block 16, a 5-token prompt, 50 new tokens: the cache rolls (relative positions) or the window slides
    and is re-encoded (absolute ones) many times, and at every step both paths give the same logits."""
    model = randomize_(tiny(n_kv_head, positional, window, block_size=16), std=0.1).double().eval()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    cached, uncached = Decoder(model, prompt, 50), Decoder(model, prompt, 50, use_cache=False)
    with torch.no_grad():
        for step in range(50):
            logits = cached.logits()
            torch.testing.assert_close(logits, uncached.logits(), rtol=1e-9, atol=1e-9, msg=f"step {step}")
            nxt = logits.argmax(-1, keepdim=True)
            cached.append(nxt)
            uncached.append(nxt)
    out = model.generate(prompt, 50, temperature=0)
    assert out.shape == (2, 55) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, cached.idx) and torch.equal(model.generate(prompt, 50, temperature=0, use_cache=False), out)


@pytest.mark.parametrize("positional, window", [(p, w) for p in POSITIONALS for w in WINDOWS])
def test_tokens_fed_per_step(positional: str, window: int | None) -> None:
    """After the prefill a relative model feeds one token per step for good, into a cache of
    min(context, window) slots; an absolute one re-prefills half its context once per context/2 + 1 tokens."""
    model = tiny(2, positional, window, block_size=16).eval()
    fed: list[int] = []
    model.transformer.wte.register_forward_hook(lambda _m, args, _out: fed.append(args[0].size(1)))
    model.generate(torch.zeros(1, 5, dtype=torch.long), 50, temperature=0)
    assert len(fed) == 50
    if positional in ("rope", "alibi", "none"):
        assert fed == [5] + [1] * 49
    else:  # the window [start, T) reaches 17 tokens at T = 17, 26, 35, 44, 53 and keeps its last 8
        assert [n for n in fed if n > 1] == [5, 8, 8, 8, 8, 8] and len(fed) == 50
    decoder = Decoder(model, torch.zeros(1, 5, dtype=torch.long), 50)
    decoder.logits()
    assert decoder.cache is not None and decoder.cache.capacity == (window or 16)
    assert decoder.cache.k[0] is not None and decoder.cache.k[0].shape == (1, 2, window or 16, 16)  # a window of 8 keeps 8


@pytest.mark.parametrize("positional", ["rope", "alibi", "none"])
def test_relative_context_is_a_sliding_window(positional: str) -> None:
    """With relative positions, generating with context 6 is generating with a sliding window of 6."""
    full = randomize_(tiny(2, positional, block_size=16), std=0.1).double().eval()
    windowed = tiny(2, positional, 6, block_size=16).double().eval()
    windowed.load_state_dict(full.state_dict())
    prompt = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    out = full.generate(prompt, 30, temperature=0, context=6)
    assert torch.equal(out, windowed.generate(prompt, 30, temperature=0))
    assert not torch.equal(out, full.generate(prompt, 30, temperature=0))  # the default context, 16, differs


@pytest.mark.parametrize("n_kv_head, positional, window", VARIANTS)
def test_kv_cache_chunked_prefill_and_rolling(n_kv_head: int, positional: str, window: int | None) -> None:
    """Feeding a sequence in chunks through the cache gives the hidden states of one full pass; a cache
    of 12 slots rolls and gives those of attention to the last 12 positions."""
    model = randomize_(tiny(n_kv_head, positional, window)).double().eval()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    chunks = ((0, 10), (10, 11), (11, 25), (25, 26), (26, 32))
    with torch.no_grad():
        cache = KVCache(model.spec.n_layer, 32)
        parts = [model.hidden_states(idx[:, a:b], cache) for a, b in chunks]
        torch.testing.assert_close(torch.cat(parts, dim=1), model.hidden_states(idx), rtol=1e-10, atol=1e-10)
        cache = KVCache(model.spec.n_layer, 12)
        parts = [model.hidden_states(idx[:, a:b], cache) for a, b in chunks]
        torch.testing.assert_close(torch.cat(parts, dim=1), model.hidden_states(idx, window=12), rtol=1e-10, atol=1e-10)
    # the next token (32) overwrites the oldest, 20: the last 12 positions in slot order
    assert cache.pos == 32 and cache.key_positions(1, idx.device).tolist() == [24, 25, 26, 27, 28, 29, 30, 31, 32, 21, 22, 23]


@pytest.mark.parametrize("positional", POSITIONALS)
def test_first_token_after_a_prompt_longer_than_context(positional: str) -> None:
    """Absolute positions: the first token sees the last 16 tokens, encoded from position 0. Relative
    ones: every layer attends to the last 16 positions of the whole prompt, at its own positions."""
    model = randomize_(tiny(2, positional, block_size=16), std=0.1).double().eval()
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, 1, temperature=0)
    with torch.no_grad():
        if positional in ("learned", "sinusoidal"):
            expected = model(prompt[:, -16:])[0][:, -1].argmax(-1)
        else:
            expected = model.lm_head(model.hidden_states(prompt, window=16))[:, -1].argmax(-1)
    assert out[0, 40] == expected
    assert torch.equal(out, model.generate(prompt, 1, temperature=0, use_cache=False))


def test_generation_context_limits() -> None:
    learned = tiny(positional="learned", block_size=16)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ContextTooLong, match=r"17 tokens is longer than the 16 positions .* give at most 16 tokens of context"):
        learned.generate(prompt, 2, context=17)
    with pytest.raises(ValueError, match="context must be at least 1 token, not 0"):
        learned.generate(prompt, 2, context=0)
    assert learned.generate(prompt, 2, context=1).shape == (1, 5)
    # sinusoidal positions extend: a context past block_size encodes positions up to context - 1
    sinusoidal = randomize_(tiny(2, "sinusoidal", block_size=16), std=0.1).double().eval()
    long = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    out = sinusoidal.generate(long, 1, temperature=0, context=24)
    with torch.no_grad():
        assert out[0, 30] == sinusoidal(long[:, -24:])[0][:, -1].argmax(-1)


# --------------------------------------------------------------------------- initialisation
def test_same_seed_shares_every_tensor_whose_name_and_shape_agree() -> None:
    """GPT(spec, seed) draws each parameter from (seed, name): variants differ only where they must."""

    def differing(a: GPT, b: GPT) -> set[str]:
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        return {n for n in pa.keys() | pb.keys() if n not in pa or n not in pb or not torch.equal(pa[n], pb[n])}

    spec = dict(vocab_size=256, block_size=32, n_layer=2, n_head=8, n_embd=64)
    base = GPT(ModelSpec(**spec), seed=7)
    torch.manual_seed(123)  # the global generator plays no part
    assert differing(base, GPT(ModelSpec(**spec), seed=7)) == set()
    assert differing(base, GPT(ModelSpec(**spec, positional="rope"), seed=7)) == {"transformer.wpe.weight"}
    assert differing(base, GPT(ModelSpec(**spec, positional="sinusoidal"), seed=7)) == {"transformer.wpe.weight", "pos_scale"}
    c_attn = {f"transformer.h.{i}.attn.c_attn.{w}" for i in range(2) for w in ("weight", "bias")}
    assert differing(base, GPT(ModelSpec(**spec, n_kv_head=2), seed=7)) == c_attn
    assert differing(base, GPT(ModelSpec(**spec, sliding_window=8), seed=7)) == set()
    drawn = {n for n, p in base.named_parameters() if p.dim() >= 2}  # biases and LayerNorms start constant
    assert differing(base, GPT(ModelSpec(**spec), seed=8)) == drawn
    deeper = GPT(ModelSpec(**{**spec, "n_layer": 3}), seed=7)  # same names, same draws; c_proj std depends on depth
    assert torch.equal(deeper.transformer.h[1].mlp.c_fc.weight, base.transformer.h[1].mlp.c_fc.weight)


def test_init_statistics() -> None:
    model = GPT(ModelSpec(vocab_size=1024, block_size=64, n_layer=4, n_head=4, n_embd=128), seed=0)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert all(
        (p == 0).all() for n, p in model.named_parameters() if n.endswith("bias") and "ln_" not in n
    )  # Linear biases start at 0


def test_sinusoidal_table_starts_at_the_token_embeddings_scale() -> None:
    """A table at amplitude 1 beside embeddings of std 0.02 would be ~35x their norm and drown the tokens."""
    model = GPT(ModelSpec(block_size=1024, positional="sinusoidal"), seed=0)
    rms = lambda t: t.pow(2).mean().sqrt().item()
    ratio = rms(model.pos_scale * model.pos_table) / rms(model.transformer.wte.weight)
    assert 0.5 <= ratio <= 2, ratio
    assert model.pos_scale.requires_grad  # a learnable amplitude (x-transformers' ScaledSinusoidal)


# ------------------------------------------------------------------------- size and compute
def test_gpt2_small_parameter_count() -> None:
    with torch.device("meta"):
        model = GPT()
    assert model.num_params() == 124_439_808
    assert model.num_params(exclude_embeddings=True) == 124_439_808 - 50257 * 768 - 1024 * 768


def gpt2_small_flops(context: int) -> int:
    """6N + 12·L·H·hs·T by hand for GPT-2 small, N = matmul weights + biases + norms incl. the LM head."""
    L, C, V = 12, 768, 50257
    per_layer = (2 * C) + (C * 3 * C + 3 * C) + (C * C + C) + (2 * C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    n = L * per_layer + 2 * C + V * C
    return 6 * n + 12 * L * 12 * 64 * context


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token(tie: bool) -> None:
    with torch.device("meta"):
        model, windowed = GPT(ModelSpec(tie_weights=tie)), GPT(ModelSpec(tie_weights=tie, sliding_window=256))
    assert model.flops_per_token() == gpt2_small_flops(1024)
    assert windowed.flops_per_token() == gpt2_small_flops(256)


def test_gqa_has_fewer_parameters() -> None:
    with torch.device("meta"):
        mha, gqa, mqa = (GPT(ModelSpec(n_kv_head=kv)) for kv in (12, 4, 1))
    per_kv_head = 12 * 2 * (768 * 64 + 64)  # k and v projections (weights + biases) of one head, all layers
    assert mha.num_params() - gqa.num_params() == 8 * per_kv_head
    assert mha.num_params() - mqa.num_params() == 11 * per_kv_head


@pytest.mark.parametrize("tie", [True, False])
def test_optim_groups(tie: bool) -> None:
    model = tiny(tie_weights=tie)
    decay, no_decay = model.optim_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups (or twice in one)"
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    torch.optim.AdamW(model.optim_groups(0.1))  # AdamW accepts them as they are


# ------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def sampler() -> GPT:
    return randomize_(tiny(2, "rope", vocab_size=256), std=0.05).double().eval()


@pytest.fixture(scope="module")
def prompt() -> Tensor:
    return torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(0))


def test_top_k_1_is_greedy(sampler: GPT, prompt: Tensor) -> None:
    greedy = sampler.generate(prompt, 12, temperature=0)
    assert torch.equal(sampler.generate(prompt, 12, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sampler.generate(prompt, 12, temperature=1.5, top_p=1e-6), greedy)


def test_seeded_sampling_is_reproducible(sampler: GPT, prompt: Tensor) -> None:
    def draw(seed: int, **kw: object) -> Tensor:
        return sampler.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(3, top_k=10, top_p=0.9), draw(3, top_k=10, top_p=0.9))


def test_top_k_restricts_support(sampler: GPT, prompt: Tensor) -> None:
    top = sampler(prompt)[0][:, -1].topk(3).indices
    for seed in range(5):
        out = sampler.generate(prompt, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert all(out[b, -1] in top[b] for b in range(2))


def test_eos_stops_and_pads(sampler: GPT, prompt: Tensor) -> None:
    n = 12
    greedy = sampler.generate(prompt, n, temperature=0)[:, 4:]
    eos = int(greedy[0, 2])  # row 0 emits it at step 2 at the latest
    out = sampler.generate(prompt, n, temperature=0, eos=eos)
    expected, stops = [], []
    for row in greedy.tolist():
        k = row.index(eos) if eos in row else n - 1
        stops.append(k)
        expected.append(row[: k + 1] + [eos] * (n - k - 1))
    length = max(stops) + 1  # stops once every row has emitted eos
    assert out.shape == (2, 4 + length)
    assert torch.equal(out[:, :4], prompt)
    assert out[:, 4:].tolist() == [row[:length] for row in expected]
    # a lone row stops right after its eos
    alone = sampler.generate(prompt[:1], n, temperature=0, eos=eos)
    assert alone.shape[1] == 4 + greedy[0].tolist().index(eos) + 1 and alone[0, -1] == eos


# ------------------------------------------------------------------------- training sanity
@pytest.mark.parametrize(
    "n_kv_head, positional, window", [(4, "learned", None), (2, "rope", 8), (1, "alibi", None), (2, "none", 8)]
)
def test_overfits_a_fixed_batch(n_kv_head: int, positional: str, window: int | None) -> None:
    model = tiny(n_kv_head, positional, window)
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    idx, targets = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 5.0
    assert losses[-1] < 0.3 * losses[0], losses


def test_dropout_only_in_training() -> None:
    model = tiny(dropout=0.2)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
