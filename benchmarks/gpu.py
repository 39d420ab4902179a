"""GPT-2 small training throughput and model FLOPs utilisation (MFU) on one GPU.

The training loop's recipe on one device: bf16 autocast, fused AdamW (``gpt2exp.training.optim``),
gradient clipping, ``torch.compile`` of the model, and the attention path the model picks on CUDA.
After ``--warmup`` untimed steps (compilation included, timed apart), ``--steps`` steps are timed
with CUDA events; tokens/s counts the tokens of the global batch, and

    MFU = flops_per_token x tokens/s / peak bf16 FLOP/s of the GPU

with ``GPT.flops_per_token`` (PaLM appendix B: 6N + 12·L·H·hs·T) and the peak from
``gpt2exp.training.metrics.PEAK_BF16_FLOPS`` (or ``--peak-tflops``). On a machine without CUDA it
prints why it skips and exits 0.

    python benchmarks/gpu.py                                # GPT-2 small, micro-batch 16 x 1024, 30 steps
    python benchmarks/gpu.py --batch 32 --no-compile        # eager, larger batch
    python benchmarks/gpu.py --positional alibi --window 128  # the attention variants gpt2exp compares
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt2exp.model import GPT
from gpt2exp.spec import ModelSpec, TrainSpec
from gpt2exp.training.metrics import peak_flops
from gpt2exp.training.optim import build_optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--positional", default="learned", choices=["learned", "sinusoidal", "rope", "alibi", "none"])
    p.add_argument("--window", type=int, default=None, help="sliding window (tokens)")
    p.add_argument("--block", type=int, default=1024, help="sequence length")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (micro-batch)")
    p.add_argument("--vocab", type=int, default=50304, help="GPT-2's 50257 padded to a multiple of 64")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager mode")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: known-GPU table)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script itself on a tiny config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA GPU here (torch.cuda.is_available() is False); run this on a machine with one")
        return
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    spec = ModelSpec(
        vocab_size=args.vocab,
        block_size=args.block,
        n_layer=args.layers,
        n_head=args.heads,
        n_kv_head=args.kv_heads,
        n_embd=args.embd,
        positional=args.positional,
        sliding_window=args.window,
    )
    raw = GPT(spec, seed=0).to(device)
    optimizer = build_optimizer(raw, TrainSpec(max_steps=args.steps, lr=6e-4), device)
    model = torch.compile(raw) if args.compile else raw
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = model(x, y)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else lambda: None
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)

    peak = peak_flops(device, args.peak_tflops * 1e12 if args.peak_tflops else None)
    step_s = statistics.median(times)
    tokens_per_sec = args.batch * args.block / step_s
    flops = raw.flops_per_token()
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(
        f"{name}, torch {torch.__version__}; {raw.num_params() / 1e6:.1f}M params, {spec.attention_kind}, "
        f"{spec.positional} positions; batch {args.batch} x {args.block}; "
        f"{'compiled' if args.compile else 'eager'}, bf16 autocast, {'fused ' if cuda else ''}AdamW"
    )
    print(f"{'ms/step':>8}  {'min-max ms':>12}  {'tokens/s':>10}  {'TFLOP/s':>8}  {'MFU':>6}  {'peak GiB':>8}  {'warmup s':>8}")
    mfu = f"{flops * tokens_per_sec / peak:.1%}" if peak else "n/a"
    spread = f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f}"
    print(
        f"{1e3 * step_s:>8.1f}  {spread:>12}  {tokens_per_sec:>10,.0f}  {flops * tokens_per_sec / 1e12:>8.1f}  {mfu:>6}  "
        f"{peak_gib:>8.1f}  {warmup_s:>8.1f}"
    )
    if not peak:
        print(f"no peak FLOP/s known for {name!r}: give --peak-tflops for MFU")


if __name__ == "__main__":
    main()
