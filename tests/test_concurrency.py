"""Faults of concurrency and resumption, with the CLI run as a user runs it: two runs of one experiment
at once (one trains, the other is turned away at once), two processes making one fresh MLflow store at
the same instant, a run killed after its second checkpoint and rerun (the uninterrupted result, each step
logged once), and the Ray launcher logging a checkpoint to MLflow only once Ray has it."""

from __future__ import annotations

import json
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from gpt2exp.launch.plan import make_plan
from gpt2exp.launch.progress import parse_records
from gpt2exp.launch.runner import run_plan
from gpt2exp.spec import validate_spec

pytestmark = pytest.mark.slow

SPEC = {
    "name": "conc",
    "data": {"path": "CORPUS"},
    "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
    "train": {
        "max_steps": 12,
        "batch_size": 4,
        "lr": 2e-2,
        "warmup_steps": 2,
        "eval_interval": 5,
        "eval_tokens": 256,
        "log_interval": 2,
        "checkpoint_interval": 4,
    },
    "tracking": {"system_metrics": False},
}
LOGGED = {"train_loss": [2, 4, 5, 6, 8, 10, 12], "val_loss": [5, 10, 12]}  # checkpoints at steps 4 and 8
RUN_DIR = Path("conc", "runs", "base", "seed_1337")


def raw_spec(corpus: Path, **fields: object) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(SPEC)) | fields
    raw["data"]["path"] = str(corpus)
    return raw


def cli(folder: Path, corpus: Path) -> list[str]:
    spec = folder / "conc.yaml"
    spec.write_text(yaml.safe_dump(raw_spec(corpus)))
    return [sys.executable, "-m", "gpt2exp.cli", "run", str(spec), "--output", str(folder / "out"), "--no-progress"]


def histories(out: Path) -> dict[str, list[int]]:
    """The steps of each metric's history in the run's MLflow run, as logged (sorted, repeats kept)."""
    run_id = json.loads((out / RUN_DIR / "mlflow.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in LOGGED}


def recorded_steps(run_dir: Path) -> list[int]:
    """The steps in the run's ``metrics.jsonl``, as written (repeats kept)."""
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in parse_records(path.read_text() if path.is_file() else "") if r["event"] == "step"]


@pytest.fixture(scope="module")
def corpus(corpus_head) -> Path:
    return corpus_head(300_000)


class Ended(NamedTuple):
    proc: subprocess.CompletedProcess
    pid: int
    seconds: float  # after the start


@pytest.fixture(scope="module")
def twice(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Ended]]:
    """``gpt2exp run`` of one experiment started twice at once, in a fresh output folder."""
    folder = tmp_path_factory.mktemp("twice")
    cmd, t0 = cli(folder, corpus), time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder) for _ in range(2)]
    ended: dict[int, float] = {}
    while len(ended) < len(procs) and time.monotonic() - t0 < 240:
        ended |= {i: time.monotonic() - t0 for i, p in enumerate(procs) if i not in ended and p.poll() is not None}
        time.sleep(0.05)
    return folder / "out", [
        Ended(subprocess.CompletedProcess(p.args, p.returncode, *p.communicate(timeout=10)), p.pid, ended[i])
        for i, p in enumerate(procs)
    ]


def test_a_second_run_of_one_experiment_is_turned_away(twice: tuple[Path, list[Ended]]) -> None:
    out, (first, second) = twice
    assert sorted([first.proc.returncode, second.proc.returncode]) == [0, 1], (first.proc.stderr, second.proc.stderr)
    winner, loser = (first, second) if first.proc.returncode == 0 else (second, first)
    error = loser.proc.stderr.strip()
    assert "Traceback" not in error and len(error.splitlines()) == 1, error
    assert error.startswith(f"error: {out / 'conc'} is in use by pid {winner.pid} on {platform.node()} since "), error
    assert re.search(r"since [\d-]+ [\d:]+ \S+ \(gpt2exp run \S+ --output \S+ --no-progress\); wait for it or stop it$", error)
    assert loser.seconds < winner.seconds  # at once, not after the winner
    assert histories(out) == LOGGED and recorded_steps(out / RUN_DIR) == LOGGED["train_loss"]


STORE_RACE = """
import json, sys, time
from pathlib import Path
from gpt2exp.spec import validate_spec
from gpt2exp.tracking.runs import ExperimentTracker
spec, out = validate_spec(json.loads(sys.argv[1])), Path(sys.argv[2])
name = spec.name
(out / f"ready-{name}").touch()
while len(list(out.glob("ready-*"))) < 2:  # both imported: go at the same instant
    time.sleep(0.001)
ExperimentTracker(spec, out, out / name)
"""


def test_two_processes_make_one_fresh_store_at_once(corpus: Path, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STORE_RACE, json.dumps(raw_spec(corpus, name=name)), str(tmp_path)],
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for name in ("one", "two")
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("three")  # the store works afterwards
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "one", "three", "two"]
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 2


def test_a_run_killed_after_its_second_checkpoint_resumes_and_logs_each_step_once(
    corpus: Path, twice: tuple[Path, list[Ended]], tmp_path: Path
) -> None:
    """Killed once steps 10 and 12 are in MLflow (the last one, as the final model is being logged), past its
    checkpoint at step 8: the rerun goes on from there, to the uninterrupted run's loss, and logs none of the
    steps after the checkpoint again."""
    cmd, out = cli(tmp_path, corpus), tmp_path / "out"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / RUN_DIR / "checkpoints" / "step_00000008").is_dir() and {10, 12} <= set(histories(out)["train_loss"]):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / RUN_DIR / "status.json").exists(), "the run finished before it was killed"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    reference = pd.read_csv(twice[0] / "conc" / "results.csv").val_loss[0]
    assert pd.read_csv(out / "conc" / "results.csv").val_loss[0] == pytest.approx(reference, abs=1e-4)
    assert histories(out) == LOGGED
    assert recorded_steps(out / RUN_DIR) == LOGGED["train_loss"]


def test_ray_logs_a_checkpoint_once_ray_has_it(corpus: Path, tmp_path: Path) -> None:
    """One worker: each checkpoint's logged model names a checkpoint Ray registered, and was made after
    every file of it was in Ray's storage; each step is logged once."""
    from gpt2exp.launch.cluster import shutdown

    plan = make_plan(validate_spec(raw_spec(corpus, parallel={"launcher": "ray"})), tmp_path, show_progress=False)
    try:
        results = run_plan(plan, "ray", show_progress=False).runs
    finally:
        shutdown()
    assert results.status.tolist() == ["completed"], results.error.tolist()
    assert histories(tmp_path) == LOGGED
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ref = plan.jobs[0].tracking
    found = client.search_logged_models([ref.experiment_id], f"source_run_id = '{ref.run_id}' AND model_type = 'checkpoint'")
    checkpoints = {m.name: m for m in found}
    assert sorted(checkpoints) == ["checkpoint-00000004", "checkpoint-00000008"]
    assert {m.key for m in checkpoints["checkpoint-00000008"].metrics} >= {"train_loss", "lr"}  # its step's record
    (snapshot,) = (tmp_path / "conc" / "ray").glob("*/checkpoint_manager_snapshot.json")
    registered = {c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]}
    for model in checkpoints.values():
        folder = Path(model.tags["gpt2exp.checkpoint"])
        assert folder.name in registered
        newest_file_ms = max(int(f.stat().st_mtime * 1000) for f in folder.rglob("*") if f.is_file())
        assert model.creation_timestamp >= newest_file_ms, f"{model.name} was logged before Ray had all of {folder}"
