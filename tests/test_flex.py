"""FlexAttention (``gpt2exp.model.flex``) against today's SDPA path: the same logits and gradients for
every attention × positions × window, with and without the KV cache; block masks that skip what a
window excludes; ALiBi kept in fp32 under bf16; the backend choice."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from test_model import VARIANTS, randomize_, tiny
from torch import Tensor

from gpt2exp.model import KVCache, flex
from gpt2exp.model.positional import alibi_slopes

# eager flex (the unfused reference) is what these correctness tests run on the CPU, on purpose
pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.usefixtures("one_thread"),
]


@contextmanager
def backend(name: flex.Backend) -> Iterator[None]:
    previous = flex.set_attention_backend(name)
    try:
        yield
    finally:
        flex.set_attention_backend(previous)


def flex_calls() -> int:
    """Block masks asked of the cache so far: how many times a model attended through flex."""
    info = flex._cached_block_mask.cache_info()
    return info.hits + info.misses


def logits_and_steps(model, idx: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Full-sequence logits, and the cached path's: a 10-token prefill, a 5-token chunk (queries offset
    from keys), then 3 single-token decode steps."""
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.spec.n_layer, model.spec.block_size)
        steps = [
            model.lm_head(model.hidden_states(idx[:, a:b], cache)) for a, b in ((0, 10), (10, 15), (15, 16), (16, 17), (17, 18))
        ]
    return full, steps


@pytest.mark.parametrize("n_kv_head, positional, window", VARIANTS)
def test_flex_matches_sdpa(n_kv_head: int, positional: str, window: int | None) -> None:
    model = randomize_(tiny(n_kv_head, positional, window, block_size=24)).eval()
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with backend("sdpa"):
        full_sdpa, steps_sdpa = logits_and_steps(model, idx)
    before = flex_calls()
    with backend("flex"):
        full_flex, steps_flex = logits_and_steps(model, idx)
    # flex runs for windows and ALiBi only (2 layers × 6 forwards); plain causal attention keeps SDPA's is_causal
    assert flex_calls() - before == (12 if window or positional == "alibi" else 0)
    torch.testing.assert_close(full_flex, full_sdpa, rtol=1e-4, atol=1e-4)
    for got, expected in zip(steps_flex, steps_sdpa, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps_flex, dim=1), full_flex[:, :18], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window, alibi", [(8, False), (None, True), (8, True)], ids=["sw8", "alibi", "sw8-alibi"])
def test_flex_op_matches_sdpa(n_kv_head: int, window: int | None, alibi: bool) -> None:
    """The op against SDPA with an explicit mask/bias, queries offset from keys; positions given as
    tensors (any positions, e.g. a rolling cache's keys) give what ranges give; gradients agree on CUDA
    (torch 2.13's flex has no backward on the CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    T, S, H, hs = 7, 20, 4, 16
    q, k, v = (torch.randn(2, h, n, hs, generator=g).to(device) for h, n in ((H, T), (n_kv_head, S), (n_kv_head, S)))
    q_pos, k_pos = torch.arange(S - T, S, device=device), torch.arange(S, device=device)
    dist = q_pos[:, None] - k_pos[None, :]  # (T, S)
    allowed = (dist >= 0) & (dist < (window or S))
    bias = -alibi_slopes(H).to(device)[:, None, None] * dist if alibi else torch.zeros(H, T, S, device=device)  # (H, T, S)
    mask = bias.masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        y_tensors = flex.flex_attention(q, k, v, q_pos, k_pos, window=window, alibi=alibi)
    if device == "cuda":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    y_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    y_flex = flex.flex_attention(q, k, v, range(S - T, S), range(S), window=window, alibi=alibi)
    torch.testing.assert_close(y_flex, y_sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_tensors, y_flex, rtol=0, atol=0)
    if device == "cuda":
        grads_sdpa = torch.autograd.grad(y_sdpa.square().sum(), (q, k, v))
        grads_flex = torch.autograd.grad(y_flex.square().sum(), (q, k, v))
        for got, expected in zip(grads_flex, grads_sdpa, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_window_block_mask_skips_blocks_outside_the_window() -> None:
    """At block 1024 and window 128 (128-token blocks) each query block reads at most 2 key blocks, 15 of
    the 36 a causal mask reads in all, so attention costs ~T·W, not T²; the mask is cached."""
    mask = flex.block_mask(range(1024), range(1024), 128, torch.device("cpu"))
    blocks = mask.kv_num_blocks + mask.full_kv_num_blocks  # (1, 1, 8) key blocks read per query block
    assert blocks.flatten().tolist() == [1] + [2] * 7
    causal = flex.block_mask(range(1024), range(1024), None, torch.device("cpu"))
    assert int((causal.kv_num_blocks + causal.full_kv_num_blocks).sum()) == 36
    assert flex.block_mask(range(1024), range(1024), 128, torch.device("cpu")) is mask


def test_alibi_bias_stays_fp32_under_bf16() -> None:
    """Head 0 of 8 has slope 1/2; keys at distances 1001 and 1000: the bias SDPA gets under bf16 rounds
    both to -500, so they get equal weight; flex adds the bias to its fp32 scores, keeping e^-0.5 between them."""
    bias = -0.5 * torch.tensor([1001.0, 1000.0])  # keys at positions 0 and 1, query at 1001
    assert bias.tolist() == [-500.5, -500.0]
    assert bias.to(torch.bfloat16).tolist() == [-500.0, -500.0]  # bf16 steps by 2 between 256 and 512
    q, k = torch.zeros(1, 8, 1, 16, dtype=torch.bfloat16), torch.zeros(1, 8, 2, 16, dtype=torch.bfloat16)
    v = torch.tensor([1.0, 0.0], dtype=torch.bfloat16).view(1, 1, 2, 1).expand(1, 8, 2, 16)  # output = key 0's weight
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(torch.bfloat16).view(1, 1, 1, 2))
    flexed = flex.flex_attention(q, k, v, range(1001, 1002), range(2), window=None, alibi=True)
    assert sdpa[0, 0, 0, 0].item() == 0.5
    assert flexed[0, 0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(0.5)), abs=2e-3)  # 0.3775


def test_alibi_slope_in_the_kernel_is_alibi_slopes() -> None:
    for n_head in range(1, 17):
        slopes = flex.alibi_slope(torch.arange(n_head), n_head)
        torch.testing.assert_close(slopes, alibi_slopes(n_head), rtol=1e-6, atol=0)


def test_backend_choice() -> None:
    q, decode = torch.zeros(1, 4, 3, 16), torch.zeros(1, 4, 1, 16)
    with backend("auto"):
        assert not flex.use_flex(q, 0.0)  # the CPU: SDPA (compiled flex was not faster here; eager flex is unfused)
        assert not flex.use_flex(q.clone().requires_grad_(), 0.0)
        if torch.cuda.is_available():
            assert flex.use_flex(q.cuda(), 0.0) and not flex.use_flex(decode.cuda(), 0.0)  # not to decode one token
    with backend("sdpa"):
        assert not flex.use_flex(q, 0.0)
    with backend("flex"):
        assert flex.use_flex(q, 0.0) and flex.use_flex(decode, 0.0)
        with pytest.raises(flex.AttentionBackendError, match=r"no attention dropout .* GPT2EXP_ATTENTION=auto"):
            flex.use_flex(q, 0.1)
        with pytest.raises(flex.AttentionBackendError, match="no backward pass off CUDA"):
            flex.use_flex(q.clone().requires_grad_(), 0.0)
    with pytest.raises(flex.AttentionBackendError, match="'fast' is not one of auto, flex, sdpa"):
        flex.set_attention_backend("fast")  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_model_with_flex_on_cpu() -> None:
    """The path under torch.compile (the block mask built in the graph, ALiBi slopes from the head index),
    through torch 2.13's CPU flex template: SDPA's logits. About 35 s of compilation on 2 cores."""
    model = randomize_(tiny(2, "alibi", 8, n_layer=1, block_size=32)).eval()
    idx = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = model(idx)
        with backend("flex"):
            got, _ = torch.compile(model, fullgraph=True)(idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positional, window", [("alibi", None), ("rope", 8), ("alibi", 8)])
def test_flex_matches_sdpa_through_a_rolled_cache(positional: str, window: int | None) -> None:
    """Generation past block_size, where the rolling cache has wrapped and hands flex its keys' positions
    as a tensor: the same greedy tokens as SDPA."""
    model = randomize_(tiny(2, positional, window, block_size=16), std=0.1).double().eval()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name in ("sdpa", "flex"):
        with backend(name), torch.no_grad():
            runs[name] = model.generate(prompt, 30, temperature=0)
    torch.testing.assert_close(runs["flex"], runs["sdpa"], rtol=0, atol=0)
