"""Decoding, prefill and training speed of an experiment's variants, measured the way ``gpt2exp run`` does after
training (``gpt2exp.launch.bench``): interleaved rounds, order rotated, median over rounds.

The models are the experiment's final models (first seed) when ``--output`` holds them, else freshly
initialised ones of the same shapes: speed does not depend on the weights' values.

    python benchmarks/inference_cost.py experiments/gqa_vs_mha.yaml
    python benchmarks/inference_cost.py experiments/gqa_vs_mha.yaml --set model.block_size=512 --rounds 5
    python benchmarks/inference_cost.py experiments/gqa_vs_mha.yaml --threads 1 --cpu-time   # on a shared machine

On a machine other jobs load, ``--threads 1 --cpu-time`` counts the CPU time this process spent rather than the
wall time, which the load stretches by whatever share of the cores the process got.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from gpt2exp.launch.bench import Timer, interleaved
from gpt2exp.model import GPT
from gpt2exp.model.size import run_kv_bytes_per_token
from gpt2exp.spec import load_spec
from gpt2exp.training.checkpoint import load_final


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("spec", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a.b.c=value, as on the gpt2exp CLI")
    p.add_argument("--output", type=Path, default=Path("outputs"), help="where `gpt2exp run` put the experiment")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cpu-time", action="store_true", help="time by CPU time of this process (use with --threads 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec, args.overrides)
    models, sources = {}, []
    for v in spec.expand():
        final = args.output / spec.name / "runs" / v.name / f"seed_{spec.train.run_seeds[0]}" / "final"
        model = load_final(final) if final.is_dir() else GPT(v.spec.model, seed=0)
        models[v.name] = (model.eval(), v.spec)
        sources.append("trained" if final.is_dir() else "fresh")
    t0 = time.perf_counter()
    figures = interleaved(
        models, args.rounds, Timer(torch.device("cpu"), time.process_time if args.cpu_time else time.perf_counter)
    )
    m = spec.model
    print(
        f"{spec.name}: {m.n_layer} layers, {m.n_embd} wide, {m.n_head} heads, block {m.block_size}, micro-batch "
        f"{spec.micro_batch_size}; {args.rounds} rounds, {args.threads} threads, {'CPU' if args.cpu_time else 'wall'} time, "
        f"{time.perf_counter() - t0:.0f} s, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    base = figures[next(iter(figures))]
    print("| variant | model | KV B/token | prefill tok/s | decode tok/s (b1) | decode tok/s (b8) | train tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, f), source in zip(figures.items(), sources, strict=True):
        cells = [f"{f[k]:,.0f} ({f[k] / base[k]:.2f}×)" for k in base]
        print(f"| {name} | {source} | {run_kv_bytes_per_token(models[name][1]):,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
