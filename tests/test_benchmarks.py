"""The benchmark scripts run as written: ``benchmarks/gpu.py`` skips without a GPU and, on a tiny
config on the CPU, trains and prints its row (so it runs unchanged on the first GPU machine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from gpt2exp.model.size import flops_per_token
from gpt2exp.spec import ModelSpec

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark runs instead of skipping")
def test_gpu_benchmark_skips_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    load("gpu").main([])
    assert capsys.readouterr().out.startswith("skipped: no CUDA GPU here")


def test_gpu_benchmark_measures_a_tiny_model_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = "--layers 1 --embd 64 --heads 2 --block 32 --batch 2 --vocab 256 --steps 2 --warmup 1 --no-compile"
    load("gpu").main([*tiny.split(), "--device", "cpu", "--positional", "alibi", "--window", "8", "--peak-tflops", "0.01"])
    out = capsys.readouterr().out
    assert "MHA+SW8, alibi positions; batch 2 x 32; eager, bf16 autocast, AdamW" in out
    row = out.splitlines()[2].split()
    ms, tokens_per_sec, mfu = float(row[0]), float(row[2].replace(",", "")), float(row[4].rstrip("%"))
    assert tokens_per_sec == pytest.approx(2 * 32 / (ms / 1e3), rel=0.01)
    spec = ModelSpec(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=64, positional="alibi", sliding_window=8)
    assert mfu == pytest.approx(100 * flops_per_token(spec) * tokens_per_sec / 1e10, abs=0.06)  # printed to 0.1%
