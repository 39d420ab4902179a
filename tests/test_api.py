"""gpt2exp from Python: ``gpt2exp.run`` returns the runs, their MLflow ids and the comparison as values (what
``gpt2exp run`` prints), and ``gpt2exp.compare`` gives the same table again from MLflow; a tiny real experiment
on the real corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
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
