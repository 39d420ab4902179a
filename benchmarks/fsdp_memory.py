"""Per-worker memory of FSDP2 against DDP (2 CPU workers, gloo), with the unwrapped model as reference.

For each strategy a fresh group of processes is spawned (``torch.multiprocessing.spawn``, so peak
RSS figures never mix): every rank builds the same ``GPT`` (same seed), wraps it with
``gpt2exp.parallel.distributed.wrap`` (DDP, or FSDP2 = ``fully_shard`` per block then the root),
builds gpt2exp's AdamW, runs ``--steps`` training steps on a small random-token batch and then,
after the last ``optimizer.step()`` and before ``zero_grad`` (parameters, gradients and both Adam
moments all alive: the steady-state high-water mark of training state), measures on each rank:

* state: bytes of parameters + gradients + optimizer state held by this rank (DTensors counted by
  their local shard, ``.to_local()``);
* RSS: the process's resident memory at start (torch imported), after building the model, after
  wrapping, after the steps (psutil), and its peak (``resource.getrusage().ru_maxrss``); then once
  more after ``malloc_trim(0)`` (glibc keeps freed heap pages, e.g. FSDP's all-gather buffers, in
  the process: "trimmed" is closer to the memory actually alive).

    python benchmarks/fsdp_memory.py                    # GPT-2 small (124M), batch 2 x 128, 2 steps
    python benchmarks/fsdp_memory.py --layers 8 --steps 1
    python benchmarks/fsdp_memory.py --malloc-mmap-threshold 131072   # RSS without glibc's heap retention
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

MB = 1e6
STRATEGIES = ("none", "ddp", "fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (12 x 768 = GPT-2 small, 124M)")
    p.add_argument("--embd", type=int, default=768, help="model width")
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary")
    p.add_argument("--block", type=int, default=128, help="sequence length (= block_size: the position table's size)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--steps", type=int, default=2, help="training steps before measuring")
    p.add_argument("--workers", type=int, default=2, help="processes for ddp and fsdp")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per process, the reference included (default: cores / workers)"
    )
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES), help="what to measure")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the workers: allocations above it are mmap'd and returned "
        "to the OS when freed (a fixed threshold also turns off glibc's dynamic one); default: glibc's behaviour",
    )
    p.add_argument("--seed", type=int, default=1337, help="weights (same on every rank) and data")
    p.add_argument("--json", type=Path, default=None, help="also write every rank's record to this file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ measuring
def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB


def malloc_trim() -> bool:
    """Hand the C heap's free pages back to the OS (glibc), so RSS shows live memory, not the allocator's cache."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc
        return False


def local_bytes(t: Tensor | None) -> int:
    """Bytes this process holds for ``t``: a DTensor's local shard, a plain tensor's storage view."""
    if t is None:
        return 0
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())  # tied weights once
    optim = sum(local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, Tensor))
    return {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params),
        "optim": optim,
        "numel_local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params),
    }


# -------------------------------------------------------------------------------------- workers
def worker(rank: int, strategy: str, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from gpt2exp.model import GPT
    from gpt2exp.parallel.distributed import wrap
    from gpt2exp.spec import ModelSpec, ParallelSpec, TrainSpec
    from gpt2exp.training.optim import build_optimizer

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.workers))  # same for all strategies
    rec: dict = {"strategy": strategy, "rank": rank, "world": world, "rss_start_mb": rss_mb()}
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    device = torch.device("cpu")
    spec = ModelSpec(vocab_size=args.vocab, block_size=args.block, n_layer=args.layers, n_head=args.heads, n_embd=args.embd)
    torch.manual_seed(args.seed)  # same weights on every rank and in every strategy
    raw = GPT(spec)
    rec["n_params"] = raw.num_params()
    rec["rss_built_mb"] = rss_mb()
    parallel = ParallelSpec(launcher="ray", strategy=strategy, num_workers=world)
    t0 = time.perf_counter()
    model = wrap(raw, parallel, device, bf16=False)
    rec["wrap_s"] = time.perf_counter() - t0
    rec["rss_wrapped_mb"] = rss_mb()
    opt = build_optimizer(raw, TrainSpec(max_steps=args.steps), device)

    g = torch.Generator().manual_seed(args.seed + rank)  # each rank its own batch, as in data parallelism
    x = torch.randint(0, args.vocab, (args.batch, args.block), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.block), generator=g)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step < args.steps - 1:
            opt.zero_grad(set_to_none=True)
    rec["step_s"] = (time.perf_counter() - t0) / args.steps
    rec["loss"] = loss.item()
    rec.update(state_bytes(model, opt))  # before zero_grad: params, grads and Adam moments all held
    rec["rss_end_mb"] = rss_mb()
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["rss_trimmed_mb"] = rss_mb() if malloc_trim() else float("nan")
    Path(out, f"{strategy}-{rank}.json").write_text(json.dumps(rec))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_strategy(strategy: str, args: argparse.Namespace, out: str) -> list[dict]:
    world = 1 if strategy == "none" else args.workers
    mp.spawn(worker, args=(strategy, world, free_port(), args, out), nprocs=world, join=True)  # fresh processes
    return [json.loads(Path(out, f"{strategy}-{r}.json").read_text()) for r in range(world)]


# ------------------------------------------------------------------------------------- reporting
def report(records: list[dict], args: argparse.Namespace) -> None:
    n = records[0]["n_params"]
    print(
        f"# fsdp_memory  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  "
        f"{platform.machine()} {os.cpu_count()} cores  gloo, {args.workers} workers"
    )
    print(
        f"# model {args.layers} x {args.embd} ({args.heads} heads, vocab {args.vocab}, block {args.block}): {n / 1e6:.1f}M parameters "
        f"= {4 * n / MB:.0f} MB fp32; AdamW; batch {args.batch} x {args.block} per rank; measured after step {args.steps}"
    )
    print(f"# MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc default, dynamic)')}")
    print()
    head = (
        f"{'strategy':8} {'rank':>4} {'params MB':>9} {'grads MB':>9} {'optim MB':>9} {'state MB':>9} "
        f"{'RSS start':>9} {'built':>7} {'wrapped':>8} {'RSS end':>8} {'trimmed':>8} {'peak RSS MB':>11} {'s/step':>7} {'loss':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in records:
        total = r["params"] + r["grads"] + r["optim"]
        print(
            f"{r['strategy']:8} {r['rank']:>4} {r['params'] / MB:>9.1f} {r['grads'] / MB:>9.1f} {r['optim'] / MB:>9.1f} "
            f"{total / MB:>9.1f} {r['rss_start_mb']:>9.0f} {r['rss_built_mb']:>7.0f} {r['rss_wrapped_mb']:>8.0f} "
            f"{r['rss_end_mb']:>8.0f} {r['rss_trimmed_mb']:>8.0f} {r['peak_rss_mb']:>11.0f} {r['step_s']:>7.2f} {r['loss']:>7.3f}"
        )
    by = {s: [r for r in records if r["strategy"] == s] for s in STRATEGIES}

    def mean(s: str, f) -> float:
        return sum(f(r) for r in by[s]) / len(by[s])

    state = lambda r: r["params"] + r["grads"] + r["optim"]
    if by["ddp"] and by["fsdp"]:
        print()
        print("FSDP / DDP per rank (mean over ranks):")
        print(
            f"  state (params+grads+optim) {mean('fsdp', state) / mean('ddp', state):.3f}   (ideal 1/{args.workers} = {1 / args.workers:.3f})"
        )
        for key, label in (
            ("rss_end_mb", "RSS after steps"),
            ("rss_trimmed_mb", "RSS after malloc_trim"),
            ("peak_rss_mb", "peak RSS"),
        ):
            print(f"  {label:26} {mean('fsdp', lambda r, k=key: r[k]) / mean('ddp', lambda r, k=key: r[k]):.3f}")
        grow = lambda r: r["peak_rss_mb"] - r["rss_start_mb"]
        print(f"  peak RSS above start       {mean('fsdp', grow) / mean('ddp', grow):.3f}")
        losses = {s: [round(r["loss"], 5) for r in by[s]] for s in ("ddp", "fsdp")}
        print(f"  last-step loss per rank    ddp {losses['ddp']}  fsdp {losses['fsdp']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.malloc_mmap_threshold is not None:  # read by glibc at start-up: spawned workers inherit it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as out:
        for strategy in args.strategies:
            t0 = time.perf_counter()
            records += run_strategy(strategy, args, out)
            print(f"[{strategy}: {time.perf_counter() - t0:.0f}s]", flush=True)
    print()
    report(records, args)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
