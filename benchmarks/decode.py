"""Decoding speed with the KV cache: tokens/s generating ``--blocks`` × block_size tokens, this tree
against another checkout of gpt2exp (e.g. the main branch, before the rolling cache).

Each round runs both checkouts, alternating, each in a fresh process with ``PYTHONPATH`` at its root,
on the same model (``GPT(spec, seed=0)``, positions ``--positional``), the same 1-token prompt and greedy
decoding; a warm-up generation comes first. Prints the median tokens/s per checkout and the ratio,
and how many leading tokens the two outputs share (they agree up to block_size, where the windows differ).

    python benchmarks/decode.py --other /work/main [--rounds 3] [--blocks 3] [--positional rope]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNITS = ("tokens/s", "tokens/CPU-s")  # wall clock, and CPU time (fairer on a shared machine: one thread)


def child(args: argparse.Namespace) -> None:
    import torch

    from gpt2exp.model import GPT
    from gpt2exp.spec import ModelSpec

    torch.set_num_threads(args.threads)
    spec = ModelSpec(
        vocab_size=50304, block_size=args.block, n_layer=args.layers, n_head=4, n_embd=args.embd, positional=args.positional
    )
    model = GPT(spec, seed=0).eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    model.generate(idx, 8, temperature=0)  # warm-up
    n = args.blocks * args.block
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = model.generate(idx, n, temperature=0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"tokens/s": n / seconds, "tokens/CPU-s": n / cpu, "tokens": out[0].tolist()}))


def run(root: Path, argv: list[str]) -> dict:
    env = os.environ | {"PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, __file__, "--child", *argv], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", type=Path, help="root of another checkout to compare with (e.g. /work/main)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--blocks", type=int, default=3, help="generate this many block_size of tokens")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--positional", default="rope")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    argv = [f"--{k}={getattr(args, k)}" for k in ("blocks", "block", "layers", "embd", "positional", "threads")]
    trees = {"this tree": REPO, f"other ({args.other})": args.other} if args.other else {"this tree": REPO}
    speeds = {(name, unit): [] for name in trees for unit in UNITS}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, root in trees.items():
            result = run(root, argv)
            for unit in UNITS:
                speeds[name, unit].append(result[unit])
            tokens[name] = result["tokens"]
    n = args.blocks * args.block
    print(
        f"{args.positional}, {args.layers} layers × {args.embd}, block {args.block}: {n} tokens, greedy, {args.threads} thread(s)\n"
    )
    print("| code | tokens/s (median) | min–max | tokens per CPU-second (median) |\n|---|---:|---:|---:|")
    for name in trees:
        wall, cpu = speeds[name, "tokens/s"], speeds[name, "tokens/CPU-s"]
        print(f"| {name} | {statistics.median(wall):.1f} | {min(wall):.1f}–{max(wall):.1f} | {statistics.median(cpu):.1f} |")
    if args.other:
        this, other = trees
        for unit in UNITS:
            a, b = speeds[this, unit], speeds[other, unit]
            paired = statistics.median(x / y for x, y in zip(a, b, strict=True))
            print(
                f"\nthis/other, {unit}: {statistics.median(a) / statistics.median(b):.2f}× (median of per-round ratios {paired:.2f}×)"
            )
        shared = next((i for i, (x, y) in enumerate(zip(*tokens.values(), strict=True)) if x != y), n + 1)
        print(f"\nthe two outputs share their first {shared} tokens (prompt included)")


if __name__ == "__main__":
    main()
