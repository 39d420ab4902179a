"""Windowed vs full causal attention: what a sliding window costs through each attention path.

The attention op alone, q (B, H, T, hs) over k, v (B, Hkv, T, hs):

    sdpa-full     F.scaled_dot_product_attention(is_causal=True): the flash path, T² / 2 of work
    sdpa-window   SDPA with the explicit (T, T) window mask gpt2exp builds: no flash kernel, full T²
    flex-full     gpt2exp.model.flex without a window (a causal block mask), compiled: T² / 2
    flex-window   gpt2exp.model.flex with the window (blocks outside it skipped), compiled: ~T·W

After ``--warmup`` untimed calls (flex compiles there; timed apart) each flex path is checked against
SDPA with the same mask; then the rounds alternate the paths, each round timing ``--calls`` calls of
each, and the table gives the median per call over rounds. Forward and forward+backward are timed
apart; torch 2.13's flex has no backward off CUDA, so on the CPU that cell is empty. ``--alibi`` adds
ALiBi to every path but sdpa-full (flex: a score_mod; SDPA: the float bias gpt2exp builds).

    python benchmarks/attention.py                          # block 1024, window 128, 12 heads of 64
    python benchmarks/attention.py --device cuda --dtype bfloat16 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2exp.model import flex
from gpt2exp.model.positional import alibi_slopes

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--block", type=int, default=1024, help="sequence length T")
    p.add_argument("--window", type=int, default=128, help="sliding window W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--alibi", action="store_true", help="ALiBi on the window paths")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds; the median is reported")
    p.add_argument("--calls", type=int, default=3, help="timed calls per path per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per path first (flex compiles here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (none: torch's choice)")
    return p.parse_args(argv)


def sdpa_mask(args: argparse.Namespace, window: int, device: torch.device) -> Tensor:
    """The mask gpt2exp's SDPA path builds: bool (T, T), or with ALiBi a float bias (1, H, T, T)."""
    pos = torch.arange(args.block, device=device)
    dist = pos[:, None] - pos[None, :]  # (T, T) query - key
    allowed = (dist >= 0) & (dist < window)
    if not args.alibi:
        return allowed
    bias = -alibi_slopes(args.heads).to(device)[:, None, None] * dist
    return bias.masked_fill(~allowed, float("-inf"))[None].to(getattr(torch, args.dtype))


def paths(args: argparse.Namespace, device: torch.device) -> dict[str, Attend]:
    T, W, H = args.block, args.window, args.heads
    mask = sdpa_mask(args, W, device)
    gqa = (args.kv_heads or H) != H

    def flexed(window: int | None) -> Attend:
        return torch.compile(lambda q, k, v: flex.flex_attention(q, k, v, range(T), range(T), window=window, alibi=args.alibi))

    return {
        "sdpa-full": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
        "sdpa-window": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa),
        "flex-full": flexed(None),
        "flex-window": flexed(W),
    }


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [
        (args.batch, h, args.block, args.head_size)
        for h in (args.heads, args.kv_heads or args.heads, args.kv_heads or args.heads)
    ]
    q, k, v = (torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes)
    attends = paths(args, device)
    backward_ok = {name: not (name.startswith("flex") and device.type != "cuda") for name in attends}

    def forward(name: str) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return attends[name](q, k, v)

        return run

    def forward_backward(name: str) -> Callable[[], object]:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return lambda: attends[name](*leaves).sum().backward()

    with torch.no_grad():  # what each flex path must give: SDPA with the same mask (ALiBi included)
        reference = {
            name: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(args, w, device), enable_gqa=q.size(1) != k.size(1))
            for name, w in (("flex-full", args.block), ("flex-window", args.window))
        }
    warmup: dict[str, float] = {}
    for name in attends:
        warmup[name] = timed(lambda name=name: [forward(name)() for _ in range(args.warmup)], device)
        if name in reference:
            torch.testing.assert_close(forward(name)(), reference[name], rtol=2e-2, atol=2e-2)
        if backward_ok[name]:
            [forward_backward(name)() for _ in range(args.warmup)]
    fwd: dict[str, list[float]] = {name: [] for name in attends}
    fwd_bwd: dict[str, list[float]] = {name: [] for name in attends}
    for _ in range(args.rounds):
        for name in attends:
            fwd[name].append(timed(lambda name=name: [forward(name)() for _ in range(args.calls)], device) / args.calls)
            if backward_ok[name]:
                fwd_bwd[name].append(
                    timed(lambda name=name: [forward_backward(name)() for _ in range(args.calls)], device) / args.calls
                )
    report(args, device, fwd, fwd_bwd, warmup)


def report(
    args: argparse.Namespace,
    device: torch.device,
    fwd: dict[str, list[float]],
    fwd_bwd: dict[str, list[float]],
    warmup: dict[str, float],
) -> None:
    print(
        f"attention, T={args.block} W={args.window} B={args.batch} H={args.heads} Hkv={args.kv_heads or args.heads} "
        f"hs={args.head_size} alibi={args.alibi} {args.dtype} on {device} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, {args.rounds} rounds x {args.calls} calls"
    )
    print(f"| {'path':<12} | {'fwd ms':>8} | {'min–max ms':>13} | {'fwd+bwd ms':>10} | {'warm-up s':>9} |")
    print(f"|{'-' * 14}|{'-' * 9}:|{'-' * 14}:|{'-' * 11}:|{'-' * 10}:|")
    for name, times in fwd.items():
        both = f"{1e3 * statistics.median(fwd_bwd[name]):.1f}" if fwd_bwd[name] else "n/a"
        spread = f"{1e3 * min(times):.1f}–{1e3 * max(times):.1f}"
        print(f"| {name:<12} | {1e3 * statistics.median(times):>8.1f} | {spread:>13} | {both:>10} | {warmup[name]:>9.1f} |")
    ratio = [w / f for w, f in zip(fwd["sdpa-window"], fwd["flex-window"], strict=True)]
    print(f"forward, sdpa-window / flex-window: median of per-round ratios {statistics.median(ratio):.2f}")
    ratio = [f / w for f, w in zip(fwd["flex-full"], fwd["flex-window"], strict=True)]
    print(f"forward, flex-full / flex-window: median of per-round ratios {statistics.median(ratio):.2f}")


if __name__ == "__main__":
    main()
