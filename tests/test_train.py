"""Training end to end on the real corpus with the real tokenizer: local launcher, resume after a
kill, divergence, sibling isolation, and the CLI."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from gpt2exp.data.loader import EvalWindows
from gpt2exp.launch.plan import make_plan
from gpt2exp.launch.progress import read_metrics
from gpt2exp.launch.runner import run_plan
from gpt2exp.spec import validate_spec
from gpt2exp.training.checkpoint import load_final, verify
from gpt2exp.training.evaluate import score_windows

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "data": {"path": "CORPUS"},
    "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "train": {
        "max_steps": 20,
        "batch_size": 8,
        "micro_batch_size": 4,
        "lr": 2e-2,
        "warmup_steps": 2,
        "eval_interval": 10,
        "eval_tokens": 256,
        "log_interval": 2,
    },
}


def tiny_spec(corpus: Path, **sections: dict) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw["data"]["path"] = str(corpus)
    for section, fields in sections.items():
        raw.setdefault(section, {}).update(fields) if isinstance(fields, dict) else raw.__setitem__(section, fields)
    return raw


@pytest.fixture(scope="module")
def small_corpus(corpus_head) -> Path:
    return corpus_head(400_000)


@pytest.fixture(scope="module")
def reference(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, object]:
    """An uninterrupted local run of the tiny spec (two variants)."""
    raw = tiny_spec(
        small_corpus,
        variants=[{"name": "mha", "set": {}}, {"name": "mqa_rope", "set": {"model.n_kv_head": 1, "model.positional": "rope"}}],
    )
    plan = make_plan(validate_spec(raw), tmp_path_factory.mktemp("ref"), show_progress=False)
    return run_plan(plan, "local", show_progress=False).runs, plan


def test_local_run_learns_and_writes_results(reference: tuple[pd.DataFrame, object]) -> None:
    results, plan = reference
    assert list(results.variant) == ["mha", "mqa_rope"] and set(results.status) == {"completed"}
    saved = pd.read_csv(plan.out_dir / "results.csv")
    assert list(saved.columns[:11]) == [
        "variant",
        "seed",
        "params",
        "tokens",
        "train_loss",
        "val_loss",
        "val_loss_se",
        "val_perplexity",
        "tokens_per_sec_during_training",
        "wall_s",
        "status",
    ]
    assert (saved.tokens == 20 * 8 * 32).all()
    assert (saved.val_loss < math.log(50257) - 2).all(), saved.val_loss  # learned well beyond uniform guessing
    assert saved.val_perplexity.round(3).tolist() == saved.val_loss.map(math.exp).round(3).tolist()
    metrics = read_metrics(plan.jobs[0])
    assert metrics.step.tolist() == list(range(2, 21, 2))
    assert metrics.dropna(subset=["val_loss"]).step.tolist() == [10, 20]
    assert {"train_loss", "lr", "grad_norm", "tokens_per_sec_during_training", "tokens_seen", "mfu"} <= set(metrics.columns)
    assert metrics.lr.iloc[-1] < metrics.lr.iloc[0] or metrics.lr.iloc[0] < 3e-3  # warmup, then cosine decay


def test_final_weights_reload_and_reproduce_val_loss(reference: tuple[pd.DataFrame, object]) -> None:
    results, plan = reference
    job = plan.jobs[1]
    model = load_final(Path(job.run_dir) / "final").eval()
    assert model.spec.positional == "rope" and model.spec.n_kv_head == 1
    eval_set = EvalWindows(job.val_tokens, 32)
    loss, se = score_windows(model, eval_set, job.spec.train.final_eval_budget(20 * 8 * 32), 16, torch.device("cpu"))
    assert loss == pytest.approx(results.val_loss[1], abs=1e-4) and 0 < se < 0.3  # 40 windows of 32 tokens


def test_val_loss_does_not_depend_on_the_micro_batch(
    small_corpus: Path, reference: tuple[pd.DataFrame, object], tmp_path: Path
) -> None:
    """The same training as micro-batches of 8 instead of 4 (same global batch): the same final
    val_loss, scored on the same fixed windows."""
    results, plan = reference
    raw = tiny_spec(small_corpus, train={"micro_batch_size": 8})
    other = run_plan(make_plan(validate_spec(raw), tmp_path, show_progress=False), "local", show_progress=False).runs
    assert other.val_loss[0] == pytest.approx(results.val_loss[0], abs=1e-3)
    metrics = read_metrics(plan.jobs[0])
    se = metrics.dropna(subset=["val_loss"]).val_loss_se
    assert (se > 0).all() and se.iloc[-1] < se.iloc[0]  # the final evaluation scores more windows
    # one definition of tokens/s: tokens trained per second of training, evaluation and checkpoints excluded
    last = metrics.iloc[-1]
    assert results.tokens_per_sec_during_training[0] == pytest.approx(last.tokens_seen / last.train_seconds, rel=1e-9)
    assert metrics.train_seconds.is_monotonic_increasing


def test_checkpoints_are_complete_and_pruned(reference: tuple[pd.DataFrame, object]) -> None:
    _, plan = reference
    folders = sorted((Path(plan.jobs[0].run_dir) / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step_00000010"]  # the last step writes final weights instead
    verify(folders[0])  # every file as its manifest lists it
    assert {"rng_0.pt", "manifest_0.json", "meta.json", ".metadata"} <= {f.name for f in folders[0].iterdir()}


def test_rerun_skips_finished_runs(reference: tuple[pd.DataFrame, object]) -> None:
    """A rerun trains nothing: every run stays completed, and no run's metrics or checkpoints are touched."""
    _, plan = reference
    written = {f: f.stat().st_mtime_ns for f in plan.out_dir.rglob("*") if f.is_file() and "runs" in f.parts}
    again = run_plan(make_plan(plan.spec, plan.out_dir.parent, show_progress=False), "local", show_progress=False).runs
    assert set(again.status) == {"completed"} and len(again) == len(plan.jobs)
    assert {f: f.stat().st_mtime_ns for f in written} == written


def test_killed_run_resumes_to_the_same_loss(small_corpus: Path, tmp_path: Path, reference: tuple[pd.DataFrame, object]) -> None:
    """SIGKILL the CLI after its first checkpoint, rerun it: same final losses as without the kill."""
    raw = tiny_spec(small_corpus, variants=[{"name": "mha", "set": {}}], train={"max_steps": 20, "checkpoint_interval": 4})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "gpt2exp.cli", "run", str(spec_file), "--output", str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "out" / "tiny" / "runs" / "mha" / "seed_1337" / "checkpoints" / "step_00000008"
    deadline = time.monotonic() + 120
    while not ckpt.is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.is_dir(), "the run never reached its second checkpoint"
    status = tmp_path / "out" / "tiny" / "runs" / "mha" / "seed_1337" / "status.json"
    assert not status.exists()  # killed: nothing claims it finished
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = pd.read_csv(tmp_path / "out" / "tiny" / "results.csv")
    ref = reference[0]
    assert resumed.train_loss[0] == pytest.approx(ref.train_loss[0], abs=1e-4)
    assert resumed.val_loss[0] == pytest.approx(ref.val_loss[0], abs=1e-4)
    steps = pd.read_json(status.parent / "metrics.jsonl", lines=True).query("event == 'step'").step
    assert steps.iloc[-1] == 20 and steps.is_unique  # steps after the checkpoint were redone, but recorded once


def test_diverging_variant_stops_alone_and_cli_fails(small_corpus: Path, tmp_path: Path) -> None:
    raw = tiny_spec(
        small_corpus,
        train={"max_steps": 6, "eval_interval": 3, "grad_clip": None},
        # the largest learning rate a spec accepts, in fp16: the weights blow past fp16's range in a step or two
        variants=[{"name": "exploding", "set": {"train.lr": 10.0, "train.precision": "fp16"}}, {"name": "fine", "set": {}}],
    )
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2exp.cli", "run", str(spec_file), "--output", str(tmp_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "1 run(s) did not complete: exploding (seed 1337): diverged" in proc.stderr.replace("\n", " ")
    results = pd.read_csv(tmp_path / "tiny" / "results.csv")
    assert results.status.tolist() == ["diverged", "completed"]
    assert "non-finite" in results.error[0] or "loss is" in results.error[0]
    assert "Traceback" not in proc.stderr


def test_bad_data_path_is_one_clear_line(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(tmp_path / "missing" / "*.txt")))
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2exp.cli", "run", str(spec_file), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "missing" in proc.stderr, proc.stderr


@pytest.mark.skipif(not os.environ.get("TIKTOKEN_CACHE_DIR"), reason="needs the offline tokenizer cache")
def test_quickstart_spec_is_cpu_sized() -> None:
    from gpt2exp import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml")
    per_run = spec.train.max_steps * spec.train.batch_size * spec.model.block_size
    assert len(spec.expand()) == 2 and len(spec.train.run_seeds) * per_run <= 200_000
    one_factor = [v.overrides for v in spec.expand()]
    assert one_factor == [{}, {"model.n_kv_head": 2}]  # attention alone: a difference has one cause
