"""Fixed cost of the Ray launcher over the local one for the same tiny training.

Runs ``gpt2exp run`` on the same small spec with ``--launcher local`` and ``--launcher ray``, each
in a fresh process and output folder (so Ray's start-up is counted), for 1 and for N variants,
and prints wall times, the Ray overhead per experiment and per variant, and the training speed
under Ray relative to local (tokens/s of the runs themselves).

    python benchmarks/launcher_overhead.py [--variants 3] [--steps 40] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "shakespeare.txt"


def spec(n_variants: int, steps: int, corpus: Path | None) -> dict:
    data = {"path": str(corpus)} if corpus and corpus.is_file() else {"builtin": "shakespeare"}
    return {
        "name": f"overhead{n_variants}",
        "data": data,
        "model": {"vocab_size": 50304, "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64},
        "train": {
            "max_steps": steps,
            "batch_size": 8,
            "lr": 3e-3,
            "eval_interval": steps,
            "eval_tokens": 256,
            "checkpoint_interval": steps // 2,
        },
        "grid": {"model.n_kv_head": [4, 2, 1, 4, 2, 1, 4, 2][:n_variants]} if n_variants > 1 else {},
        "variants": [] if n_variants > 1 else [{"name": "one", "set": {}}],
    }


def run(launcher: str, raw: dict, workdir: Path) -> tuple[float, pd.DataFrame]:
    out = Path(tempfile.mkdtemp(dir=workdir))
    spec_file = out / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    cmd = [
        sys.executable,
        "-m",
        "gpt2exp.cli",
        "run",
        str(spec_file),
        "--launcher",
        launcher,
        "--output",
        str(out),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"GPT2EXP_CACHE": str(workdir / "tokens")})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{launcher} run failed:\n{proc.stderr[-3000:]}")
    return wall, pd.read_csv(out / raw["name"] / "results.csv")


RAY_FLOOR = """
import sys, time
t0 = time.perf_counter()
from gpt2exp.launch.cluster import ensure_ray, shutdown
from gpt2exp.launch.ray import _LaneTrainer
from gpt2exp.launch.torch_backend import LateTorchConfig
from ray.train import RunConfig, ScalingConfig
t1 = time.perf_counter()
ensure_ray()
t2 = time.perf_counter()
_LaneTrainer(lambda: None, backend_config=LateTorchConfig(backend="gloo"), scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
             run_config=RunConfig(name="floor", storage_path=sys.argv[1])).fit()
t3 = time.perf_counter()
shutdown()
print(t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)
"""


def ray_floor(workdir: Path) -> dict[str, float]:
    """Ray's own fixed cost in a fresh process, as the launcher runs Ray: imports, starting the private
    cluster, an empty one-worker ``fit`` of the lane trainer, shutdown."""
    out = subprocess.run(
        [sys.executable, "-c", RAY_FLOOR, str(workdir / "floor")], capture_output=True, text=True, check=True
    ).stdout
    values = [float(v) for v in out.split()[-4:]]
    return dict(zip(["import s", "ray.init s", "empty fit s", "shutdown s"], values, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=3, help="variants in the multi-variant experiment (<= 8)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1, help="repeat each measurement and keep the median")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run("local", spec(1, 2, args.corpus), workdir)  # warm the token cache and the OS file cache
        for n in (1, args.variants):
            raw = spec(n, args.steps, args.corpus)
            for r in range(args.rounds):
                for launcher in ("local", "ray"):
                    wall, results = run(launcher, raw, workdir)
                    rows.append(
                        {
                            "variants": n,
                            "launcher": launcher,
                            "round": r,
                            "wall_s": wall,
                            "tokens_per_sec": results.tokens_per_sec_during_training.mean(),
                        }
                    )
                    print(f"  {n} variant(s), {launcher:5s}: {wall:6.1f} s", file=sys.stderr)
        floor = ray_floor(workdir)
    df = pd.DataFrame(rows).groupby(["variants", "launcher"]).median(numeric_only=True).drop(columns="round").unstack("launcher")
    table = pd.DataFrame(
        {
            "local wall s": df["wall_s"]["local"],
            "ray wall s": df["wall_s"]["ray"],
            "ray overhead s": df["wall_s"]["ray"] - df["wall_s"]["local"],
            "overhead per variant s": (df["wall_s"]["ray"] - df["wall_s"]["local"]) / df.index,
            "ray/local tokens/s": df["tokens_per_sec"]["ray"] / df["tokens_per_sec"]["local"],
        }
    )
    print(f"Ray launcher overhead ({args.steps} steps per variant, {os.cpu_count()} CPUs)")
    print(table.round(2).to_string())
    print("Ray's floor as the launcher runs it, same session: " + ", ".join(f"{k} {v:.1f}" for k, v in floor.items()))


if __name__ == "__main__":
    main()
