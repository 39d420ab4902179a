"""Peak memory of one training step: gpt2exp's GPT (chunked loss), the same GPT with the loss over the
full logits, and ``transformers.GPT2LMHeadModel``, on the models and batch of ``train_step.py``.

Each model runs in a fresh process. After ``--warmup`` steps (AdamW's moments exist), the step's peak
is measured: on CPU the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
above its resident set before the step, with ``MALLOC_MMAP_THRESHOLD_`` fixed so glibc returns freed
large blocks to the OS (RSS then follows live memory); on CUDA ``torch.cuda.max_memory_allocated``
above the memory allocated before the step.

    python benchmarks/peak_memory.py                                  # CPU, train_step.py's default config
    python benchmarks/peak_memory.py --device cuda --layers 12 --embd 768 --heads 12 --block 1024 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
from train_step import adamw, build_models, decay_groups, make_step

MB = 1e6
MODELS = ("chunked", "full-logits", "hf")
NAMES = {
    "chunked": "gpt2exp GPT (chunked loss)",
    "full-logits": "gpt2exp GPT, full logits",
    "hf": "HF GPT2LMHeadModel (sdpa)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--embd", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--warmup", type=int, default=1, help="steps before the measured one")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (CUDA)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=131072, help="MALLOC_MMAP_THRESHOLD_ of the CPU processes")
    p.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    # train_step.build_models / adamw read these
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    return p.parse_args(argv)


def rss() -> tuple[float, float]:
    """(current, peak since the last reset) resident set of this process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return float(fields["VmRSS"].split()[0]) * 1024, float(fields["VmHWM"].split()[0]) * 1024


def child(args: argparse.Namespace) -> dict:
    """Build one model, warm it up, and measure the peak of one more training step."""
    device = torch.device(args.device)
    ours, hf = build_models(args)
    model = (hf if args.child == "hf" else ours).to(device)
    del ours, hf
    data = torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=torch.Generator().manual_seed(args.seed))
    idx, targets = data[:, :-1].to(device), data[:, 1:].to(device)
    forward = {
        "chunked": lambda m: m(idx, targets)[1],
        "full-logits": lambda m: m(idx, targets, return_logits=True)[1],
        "hf": lambda m: m(input_ids=idx, labels=idx, use_cache=False).loss,
    }[args.child]
    groups = decay_groups(model, args.weight_decay)
    step = make_step(model, forward, adamw(groups, args), args.grad_clip)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before, _ = rss()
            step()
            peak = rss()[1]
    return {"model": args.child, "before": before, "peak": peak, "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
    records = []
    for name in MODELS:  # a fresh process each: peaks never mix
        out = subprocess.run(
            [sys.executable, __file__, *(argv or sys.argv[1:]), "--child", name],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
    where = "CUDA max_memory_allocated" if args.device == "cuda" else f"RSS, MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
    print(
        f"{datetime.now(UTC):%Y-%m-%d} torch {torch.__version__}, {args.device}{' bf16' if args.bf16 else ''}; n_layer={args.layers} "
        f"n_embd={args.embd} n_head={args.heads} block={args.block} batch={args.batch} vocab={args.vocab}; {where}"
    )
    print(f"{'model':<28}  {'before step MB':>14}  {'step peak MB':>12}  {'peak - before MB':>16}")
    for r in records:
        print(
            f"{NAMES[r['model']]:<28}  {r['before'] / MB:>14.0f}  {r['peak'] / MB:>12.0f}  {(r['peak'] - r['before']) / MB:>16.0f}"
        )
    base = {r["model"]: r["peak"] - r["before"] for r in records}
    print(
        f"step transient, chunked / full logits: {base['chunked'] / base['full-logits']:.3f}; chunked / HF: {base['chunked'] / base['hf']:.3f}"
    )


if __name__ == "__main__":
    main()
