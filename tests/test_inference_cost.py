"""Inference cost: KV-cache bytes per token from the architecture (checked against a filled cache), and the
interleaved speed benchmark of an experiment's final models, logged in MLflow and shown by compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from rich.console import Console

from gpt2exp.launch.bench import Timer, Trainer, measure
from gpt2exp.launch.runner import run_experiment
from gpt2exp.model import GPT, KVCache
from gpt2exp.model.size import kv_bytes_per_token, kv_cache_bytes
from gpt2exp.report import comparison_table, load_runs, render
from gpt2exp.report.plots import cost_axis
from gpt2exp.report.table import display_frame
from gpt2exp.spec import ModelSpec, validate_spec
from gpt2exp.training.job import BENCH_METRICS


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_kv_bytes_per_token_is_what_the_cache_holds(kv: int) -> None:
    spec = ModelSpec(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=kv)
    model, cache = GPT(spec, seed=0).eval(), KVCache(spec.n_layer, spec.block_size)
    with torch.no_grad():
        model.hidden_states(torch.zeros(3, 5, dtype=torch.long), cache)
    held = sum(t.nbytes for t in cache.k + cache.v if t is not None)  # (B, Hkv, block_size, hs) each
    assert held / (3 * spec.block_size) == kv_bytes_per_token(spec) == 2 * 2 * kv * 8 * 4
    assert kv_bytes_per_token(spec, dtype_bytes=2) == kv_bytes_per_token(spec) // 2
    windowed = spec.model_copy(update={"sliding_window": 4})
    assert kv_cache_bytes(windowed, 1000) == 4 * kv_bytes_per_token(spec) and kv_cache_bytes(spec, 10) == 10 * kv_bytes_per_token(
        spec
    )


@pytest.mark.parametrize("block", [24, 8], ids=["long", "shorter-than-decode"])  # 8 < DECODE_STEPS: 7 steps after 1 token
def test_benchmark_leaves_the_model_as_it_was(block: int) -> None:
    model_spec = {"vocab_size": 64, "block_size": block, "n_layer": 1, "n_head": 2, "n_embd": 16, "positional": "learned"}
    spec = validate_spec({"name": "t", "model": model_spec, "train": {"max_steps": 1, "batch_size": 2}})
    model = GPT(spec.model, seed=0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, spec, Timer(torch.device("cpu")))
    figures = measure(model, trainer, torch.Generator().manual_seed(0))
    assert set(figures) == set(BENCH_METRICS) and all(v > 0 and math.isfinite(v) for v in figures.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the copy trained, not the model
    assert not torch.equal(trainer.model.lm_head.weight, model.lm_head.weight)


def test_experiment_benchmarks_the_first_seed_and_compare_shows_it(corpus_head, tmp_path: Path) -> None:
    spec = validate_spec(
        {
            "name": "cost",
            "data": {"path": str(corpus_head(60_000))},
            "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 4, "n_embd": 32},
            "train": {"max_steps": 1, "batch_size": 2, "eval_tokens": 64, "seeds": [1, 2]},
            "eval": {"benchmark_rounds": 2},
            "variants": [{"name": "mha", "set": {}}, {"name": "mqa", "set": {"model.n_kv_head": 1}}],
            "tracking": {"system_metrics": False},
        }
    )
    result = run_experiment(spec, tmp_path, Console(quiet=True), show_progress=False)
    runs = pd.read_csv(tmp_path / "cost" / "results.csv").set_index(["variant", "seed"])
    assert list(runs.kv_bytes_per_token) == [256, 256, 64, 64]  # 2 (k, v) x 1 layer x kv heads (4, 1) x hs 8 x fp32
    assert "tokens_per_sec_during_training" in runs and "tokens_per_sec" not in runs
    client = MlflowClient(result.tracking_uri)
    for (_, seed), row in runs.iterrows():
        run = client.get_run(row.run_id).data
        assert run.params["kv_bytes_per_token"] == str(row.kv_bytes_per_token)
        for name in BENCH_METRICS:  # the first seed's final model is measured; its figures go on its run alone
            if seed == 1:
                assert row[name] > 0 and run.metrics[name] == pytest.approx(row[name])
            else:
                assert math.isnan(row[name]) and name not in run.metrics
    table = comparison_table(load_runs(result.tracking_uri, "cost"))
    rows = json.loads(render(table, "json"))["rows"]
    for r in rows:
        measured = runs.loc[(r["variant"], 1)]
        assert r["kv_bytes_per_token"] == measured.kv_bytes_per_token
        assert all(r[name] == pytest.approx(measured[name]) for name in BENCH_METRICS)
        assert f"{BENCH_METRICS[0]}_ci95" not in r  # one seed measured: a figure, no interval
    shown = display_frame(table)
    assert {"KV B/token", "prefill tok/s", "decode tok/s", "decode b8 tok/s", "train tok/s", "tokens/s in training"} <= set(shown)
    assert cost_axis(table) == ("decode_ms_per_token", "decode ms/token (batch 1, KV cache near full)")
    png = tmp_path / "cost" / "report" / "val_loss.png"
    assert png.is_file() and png.stat().st_size > 20_000
