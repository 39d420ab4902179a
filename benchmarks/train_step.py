"""Training-step throughput of gpt2exp's ``GPT`` against ``transformers.GPT2LMHeadModel``.

Both models get the same architecture, the same initial weights (ours exported to the Hugging Face
layout), the same batch and the same AdamW settings (decay on >= 2-D parameters, gradient clipping).
Rounds alternate the models (A, B, A, B, ...) in one process, so drifting machine load hits both
alike; each round times ``--steps`` full steps (forward, loss, backward, clip, optimizer) and the
median step time over rounds is reported.

    python benchmarks/train_step.py                      # eager, default config
    python benchmarks/train_step.py --rounds 20 --compile  # also torch.compile'd versions
    python benchmarks/train_step.py --full-logits      # also ours with the loss over the full logits
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch
from torch import Tensor, nn

from gpt2exp.model import GPT
from gpt2exp.spec import ModelSpec

Step = Callable[[], float]


@dataclass
class Contender:
    """One model under test: its training step and the timings collected so far."""

    name: str
    step: Step
    setup_s: float = 0.0  # first steps (for compiled models: compilation)
    times: list[float] = field(default_factory=list)  # seconds per step, one entry per round

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=6, help="transformer blocks")
    p.add_argument("--embd", type=int, default=384, help="model width")
    p.add_argument("--heads", type=int, default=6, help="attention heads")
    p.add_argument("--block", type=int, default=256, help="sequence length (= context size)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary (GPT-2's 50257 padded to a multiple of 64)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds; the median over rounds is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    p.add_argument("--lr", type=float, default=6e-4, help="AdamW learning rate (betas 0.9, 0.95)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of >= 2-D parameters")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (none: torch's choice)")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time steps by the process's CPU time instead of wall time (with --threads 1: the work a step takes, "
        "much less sensitive than wall time to other jobs on a shared machine)",
    )
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd versions of both models")
    p.add_argument(
        "--full-logits",
        action="store_true",
        help="also measure ours with the loss taken from the full logits (return_logits=True, the path before model/loss.py)",
    )
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="reuse the on-disk inductor cache instead of a fresh one (compile times are then not cold)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and data")
    return p.parse_args(argv)


def adamw(params: list[dict], args: argparse.Namespace) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The grouping of ``GPT.optim_groups`` for any model: decay on >= 2-D parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_models(args: argparse.Namespace) -> tuple[GPT, nn.Module]:
    """Our GPT and a Hugging Face GPT-2 (sdpa attention, no dropout) with identical weights."""
    import transformers
    from transformers import GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    spec = ModelSpec(
        vocab_size=args.vocab, block_size=args.block, n_layer=args.layers, n_head=args.heads, n_embd=args.embd, dropout=0.0
    )
    ours = GPT(spec)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa", use_cache=False)
    return ours.train(), hf.train()


def make_step(model: nn.Module, forward: Callable[[nn.Module], Tensor], opt: torch.optim.Optimizer, clip: float) -> Step:
    """A full training step returning the loss: forward, backward, clip, AdamW, zero_grad."""

    def step() -> float:
        loss = forward(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def contenders(args: argparse.Namespace, idx: Tensor, targets: Tensor) -> list[Contender]:
    ours, hf = build_models(args)
    # ours takes next-token targets; HF takes labels = inputs and shifts them itself
    fwd_ours: Callable[[nn.Module], Tensor] = lambda m: m(idx, targets)[1]
    fwd_hf: Callable[[nn.Module], Tensor] = lambda m: m(input_ids=idx, labels=idx, use_cache=False).loss
    with torch.no_grad():
        l_ours, l_hf = fwd_ours(ours).item(), fwd_hf(hf).item()
    print(f"initial loss: ours {l_ours:.4f}, HF {l_hf:.4f} (same weights; HF averages over T-1 positions)")
    out = [
        Contender(
            "gpt2exp GPT (eager)", make_step(ours, fwd_ours, adamw(ours.optim_groups(args.weight_decay), args), args.grad_clip)
        ),
        Contender(
            "HF GPT2LMHeadModel (eager, sdpa)",
            make_step(hf, fwd_hf, adamw(decay_groups(hf, args.weight_decay), args), args.grad_clip),
        ),
    ]
    if args.full_logits:
        full, _ = build_models(args)
        fwd_full: Callable[[nn.Module], Tensor] = lambda m: m(idx, targets, return_logits=True)[1]
        opt = adamw(full.optim_groups(args.weight_decay), args)
        out.append(Contender("gpt2exp GPT, full logits (eager)", make_step(full, fwd_full, opt, args.grad_clip)))
    if args.compile:
        c_ours, c_hf = build_models(args)
        opt_o, opt_h = adamw(c_ours.optim_groups(args.weight_decay), args), adamw(decay_groups(c_hf, args.weight_decay), args)
        out += [
            Contender("gpt2exp GPT (compiled)", make_step(torch.compile(c_ours), fwd_ours, opt_o, args.grad_clip)),
            Contender("HF GPT2LMHeadModel (compiled)", make_step(torch.compile(c_hf), fwd_hf, opt_h, args.grad_clip)),
        ]
    return out


def run(args: argparse.Namespace) -> list[Contender]:
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=g)
    idx, targets = data[:, :-1], data[:, 1:]
    models = contenders(args, idx, targets)
    for c in models:  # warm-up (and, for compiled models, compilation), timed separately
        t0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            c.step()
        c.setup_s = time.perf_counter() - t0
    clock = time.process_time if args.cpu_time else time.perf_counter
    for r in range(args.rounds):
        for c in models:  # A, B, A, B, ...
            t0 = clock()
            for _ in range(args.steps):
                c.step()
            c.times.append((clock() - t0) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c.name} {1e3 * c.times[-1]:.0f} ms" for c in models), flush=True)
    return models


def report(args: argparse.Namespace, models: list[Contender]) -> None:
    tokens = args.batch * args.block
    print()
    print(
        f"{datetime.now(UTC):%Y-%m-%d} torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"n_layer={args.layers} n_embd={args.embd} n_head={args.heads} block={args.block} batch={args.batch} "
        f"vocab={args.vocab}; median of {args.rounds} rounds x {args.steps} steps"
        f"{' (CPU time)' if args.cpu_time else ''}"
    )
    width = max(len(c.name) for c in models)
    print(f"{'model':<{width}}  {'tokens/s':>9}  {'ms/step':>8}  {'min-max ms':>12}  {'warmup s':>8}")
    for c in models:
        spread = f"{1e3 * min(c.times):.0f}-{1e3 * max(c.times):.0f}"
        print(f"{c.name:<{width}}  {tokens / c.median:>9.0f}  {1e3 * c.median:>8.0f}  {spread:>12}  {c.setup_s:>8.1f}")
    for ours in (c for c in models if not c.name.startswith("HF")):  # each against HF of its kind
        kind = "compiled" if "compiled" in ours.name else "eager"
        hf = next(c for c in models if c.name.startswith("HF") and kind in c.name)
        paired = statistics.median(h / o for o, h in zip(ours.times, hf.times, strict=True))
        print(f"ratio {ours.name} / HF (tokens/s): {hf.median / ours.median:.3f} (median of per-round ratios: {paired:.3f})")
    if args.compile:  # kernels both models share are compiled once, while compiling ours (first)
        compiled = (c for c in models if "compiled" in c.name)
        print(f"compile time (first {max(1, args.warmup)} steps): " + ", ".join(f"{c.name} {c.setup_s:.1f} s" for c in compiled))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.compile or args.warm_cache:
        report(args, run(args))
        return
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read when inductor first compiles
        report(args, run(args))


if __name__ == "__main__":
    main()
