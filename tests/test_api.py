"""The front doors. From Python: ``gpt2exp.run`` returns the runs, their MLflow ids and the comparison as values (what
``gpt2exp run`` prints), and ``gpt2exp.compare`` gives the same table again from MLflow. The CLI: ``run`` ends with the run ids,
the best model and the next commands, speaks JSON, and prints plain lines into a pipe. Tiny real experiments
on the real corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

import gpt2exp
from gpt2exp.spec import SpecError


def tiny(corpus: Path, tmp: Path) -> dict:
    return {
        "name": "api",
        "data": {"path": str(corpus), "cache_dir": str(tmp / "tokens")},
        "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 2e-2, "eval_interval": 4, "eval_tokens": 256, "seeds": [1, 2]},
        "variants": [{"name": "mha", "set": {}}, {"name": "mqa", "set": {"model.n_kv_head": 1}}],
        "tracking": {"system_metrics": False},
    }


@pytest.fixture(scope="module")
def corpus(corpus_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api-corpus") / "corpus.txt"
    path.write_bytes(corpus_path.read_bytes()[:120_000])
    return path


def test_run_returns_the_runs_their_mlflow_ids_and_the_verdicts(corpus: Path, tmp_path: Path) -> None:
    result = gpt2exp.run(tiny(corpus, tmp_path), output=tmp_path / "out", overrides=["train.max_steps=6"], progress=False)
    runs = result.runs
    assert list(zip(runs.variant, runs.seed, strict=True)) == [("mha", 1), ("mha", 2), ("mqa", 1), ("mqa", 2)]
    assert set(runs.status) == {"completed"} and result.completed
    assert list(runs.tokens) == [6 * 4 * 32] * 4  # the override took: 6 steps

    client = MlflowClient(result.tracking_uri)
    for row in runs.itertuples():  # each row names its MLflow child run, which holds the same final figures
        run = client.get_run(row.run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert (run.data.tags["gpt2exp.variant"], int(run.data.tags["gpt2exp.seed"])) == (row.variant, row.seed)
        assert run.data.metrics["val_loss"] == pytest.approx(row.val_loss, abs=1e-9)
        assert row.model_uri == f"runs:/{row.run_id}/model"
    assert pd.read_csv(result.out_dir / "results.csv").run_id.tolist() == runs.run_id.tolist()

    best = result.best
    assert best is not None and best["val_loss"] == runs.val_loss.min()
    assert result.comparison is not None and list(result.comparison.variant) == ["mha", "mqa"]
    assert result.report is not None and result.report.is_file()

    again = gpt2exp.compare("api", output=tmp_path / "out")  # later, from MLflow alone
    pd.testing.assert_frame_equal(again, result.comparison)

    data = json.loads(json.dumps(result.to_dict()))  # JSON-able, NaN as null
    assert data["parent_run_id"] == result.parent_run_id and data["best"]["run_id"] == best["run_id"]
    assert [r["run_id"] for r in data["runs"]] == runs.run_id.tolist()
    assert [r["variant"] for r in data["comparison"]["rows"]] == ["mha", "mqa"]


def test_a_bad_spec_raises_spec_error_with_the_field(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        gpt2exp.run(tiny(corpus, tmp_path), output=tmp_path / "out", overrides=["model.n_head=3"], progress=False)
    assert any("n_head" in line for line in caught.value.lines())
    assert not (tmp_path / "out").exists()  # nothing started


def test_cli_run_ends_with_where_to_look_next_and_speaks_json(corpus: Path, tmp_path: Path) -> None:
    """``gpt2exp run`` with its output piped (a CI log): plain progress lines, the runs, the MLflow run ids, the
    best model's URI and the next commands; ``--json``: the same result as JSON alone on stdout."""
    raw = tiny(corpus, tmp_path) | {"variants": [{"name": "mha", "set": {}}]}
    raw["train"] |= {"seeds": [1], "log_interval": 2}
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "gpt2exp.cli", "run", str(spec), "--output", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "mha/seed=1 · running · step 4/4 · train loss" in done.stdout and "val loss" in done.stdout  # no live table
    assert not any("━" in line or "┃" in line for line in lines[: lines.index(next(x for x in lines if "runs" in x))])
    run_id = pd.read_csv(tmp_path / "out" / "api" / "results.csv").run_id[0]
    assert f"mha/seed=1: run {run_id}" in done.stdout
    assert "best: mha (seed 1, val loss " in done.stdout and f"model runs:/{run_id}/model" in done.stdout
    assert f"  gpt2exp compare {spec} --output {tmp_path / 'out'}" in done.stdout
    assert f"  gpt2exp generate --model-uri runs:/{run_id}/model --output {tmp_path / 'out'}" in done.stdout

    again = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    data = json.loads(again.stdout)  # stdout is the JSON alone; the tables went to stderr
    assert [(r["variant"], r["status"], r["run_id"]) for r in data["runs"]] == [("mha", "completed", run_id)]
    assert data["best"]["model_uri"] == f"runs:/{run_id}/model" and "1 run(s), 0 to do" in again.stderr


def test_cli_version_and_choices() -> None:
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "gpt2exp.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"gpt2exp {version('gpt2exp')}"
    bad = subprocess.run(
        [sys.executable, "-m", "gpt2exp.cli", "compare", "x", "--format", "xml"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "'xml' is not one of" in bad.stderr and "table" in bad.stderr
