"""The output folder fails under the run: a read-only folder and a disk that fills up mid-run (small
tmpfs mounts, so the test needs root and mount; it skips elsewhere). One line, exit 1 or 2, nothing
taken for finished, and once there is room the rerun ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

SPEC = {
    "name": "disk",
    "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
    "train": {"max_steps": 12, "batch_size": 4, "lr": 2e-2, "eval_interval": 4, "eval_tokens": 256, "log_interval": 2},
    "tracking": {"system_metrics": False},
}


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run(spec: Path, output: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gpt2exp.cli", "run", str(spec), "--output", str(output), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def spec_file(corpus_head, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "data": {"path": str(corpus_head(200_000))}}))
    return path


def test_read_only_output_is_one_line(spec_file: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        proc = run(spec_file, ro / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Read-only file system" in lines[0], proc.stderr


def test_a_full_disk_fails_cleanly_and_the_rerun_finishes(spec_file: Path, tmp_path: Path) -> None:
    reference = run(spec_file, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    expected = pd.read_csv(tmp_path / "reference" / "disk" / "results.csv").val_loss[0]
    with tmpfs(tmp_path / "small", "size=12m") as small:  # the first checkpoint (model + AdamW, ~20 MB) does not fit
        full = run(spec_file, small)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
        assert lines and lines[-1].startswith("error: ") and "No space left on device" in full.stderr, full.stderr
        assert not (small / "disk" / "runs" / "base" / "seed_1337" / "final").exists()  # nothing taken for finished
        subprocess.run(["mount", "-o", "remount,size=512m", str(small)], check=True)
        again = run(spec_file, small)
        assert again.returncode == 0, again.stderr
        results = pd.read_csv(small / "disk" / "results.csv")
        assert results.status.tolist() == ["completed"]
        assert results.val_loss[0] == pytest.approx(expected, abs=1e-4)
        client = MlflowClient(f"sqlite:///{small / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("disk")
        runs = client.search_runs([experiment.experiment_id])
        assert {r.info.status for r in runs} == {"FINISHED"}
        child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(2, 13, 2)), steps  # each step once
