"""Sweeps: the spec's rules, and a real sweep on a private Ray with Ray Tune (2 variants x 2 learning rates, seeds
1 and 2, ASHA): the MLflow hierarchy, the selection on seed 1, the verdict on seed 2 at the chosen setting, ASHA's
early stops recorded as such, and a rerun that trains nothing."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from rich.console import Console

from gpt2exp.cli.experiment import _trials
from gpt2exp.launch.runner import run_experiment
from gpt2exp.spec import SpecError, validate_spec

SPEC = {
    "name": "sw",
    "data": {"path": "CORPUS"},
    "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "train": {"max_steps": 16, "batch_size": 8, "warmup_steps": 2, "eval_interval": 4, "eval_tokens": 256, "seeds": [1, 2]},
    "parallel": {"max_concurrent": 1},  # one trial at a time: ASHA's decisions do not depend on timing
    "variants": [{"name": "mha", "set": {}}, {"name": "mqa", "set": {"model.n_kv_head": 1}}],
    # a good and a hopeless learning rate, in this order: the hopeless one reaches ASHA's first rung second
    "sweep": {"params": {"train.lr": [2e-2, 1e-6]}, "scheduler": "asha", "grace_period": 4},
}


def spec_for(corpus: Path, **changes: object) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(SPEC))
    raw["data"]["path"] = str(corpus)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw[section] = value if not field else {**raw[section], field: value}
    return raw


@pytest.fixture(scope="module")
def corpus(corpus_head) -> Path:
    return corpus_head(100_000)


@pytest.fixture(scope="module")
def private_ray() -> Iterator[None]:
    """The private Ray cluster a sweep starts (``gpt2exp.launch.cluster``), stopped after this module's sweep."""
    import ray

    from gpt2exp.launch.cluster import shutdown

    yield
    if ray.is_initialized():
        shutdown()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"train__seeds": [1]}, "sweep: needs at least 2 seeds"),
        ({"parallel__num_workers": 2, "parallel__strategy": "ddp", "parallel__launcher": "ray"}, "parallel.num_workers: 1"),
        ({"tracking": {"enabled": False}}, "set tracking.enabled: true"),
        ({"grid": {"train.lr": [1e-3]}}, "sweep.params.train.lr: also set by grid"),
        ({"sweep__params": {"train.rate": [1e-3]}}, "sweep.params: 'train.rate' is not a spec field"),
        ({"sweep__params": {"train.lr": [-1.0]}}, "variants[mha+lr=-1.0]"),
        ({"sweep__reduction_factor": 1}, "sweep.reduction_factor"),
    ],
)
def test_a_sweep_the_spec_cannot_run_is_one_line_per_problem(corpus: Path, changes: dict, expected: str) -> None:
    with pytest.raises(SpecError) as e:
        validate_spec(spec_for(corpus, **changes))
    assert expected in str(e.value)


def test_validate_lists_the_trials(corpus: Path) -> None:
    trials = _trials(validate_spec(spec_for(corpus, train__seeds=[1, 2, 3])))["sweep"]
    assert trials["selection"] == ["mha+lr=0.02/seed=1", "mha+lr=1e-06/seed=1", "mqa+lr=0.02/seed=1", "mqa+lr=1e-06/seed=1"]
    assert trials["verdict"] == ["mha/seed=2", "mha/seed=3", "mqa/seed=2", "mqa/seed=3"]


@pytest.mark.slow
def test_a_sweep_selects_on_seed_1_and_judges_on_the_others(corpus: Path, tmp_path: Path, private_ray: None) -> None:
    spec = validate_spec(spec_for(corpus))
    result = run_experiment(spec, tmp_path, Console(file=io.StringIO()), show_progress=False)

    status = {(r["variant"], r["seed"]): r["status"] for r in result.runs.to_dict("records")}
    assert status == {
        ("mha+lr=0.02", 1): "completed",
        ("mha+lr=1e-06", 1): "stopped",  # ASHA, at step 4: worse than the other setting there
        ("mqa+lr=0.02", 1): "completed",
        ("mqa+lr=1e-06", 1): "stopped",
        ("mha+lr=0.02", 2): "completed",  # the verdict: each variant's chosen setting on seed 2
        ("mqa+lr=0.02", 2): "completed",
    }
    assert result.completed  # stopped early is an outcome, not a failure
    stopped = json.loads((result.out_dir / "runs" / "mha" / "lr=1e-06" / "seed_1" / "status.json").read_text())
    assert stopped["status"] == "stopped" and stopped["tokens"] < 16 * 8 * 32

    # MLflow: parent -> one run per variant -> its trials, tagged with setting, seed and phase
    client = MlflowClient(result.tracking_uri)
    experiment_id = client.get_experiment_by_name("sw").experiment_id
    children = lambda run_id: client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    variants = {r.data.tags["gpt2exp.variant"]: r for r in children(result.parent_run_id)}
    assert set(variants) == {"mha", "mqa"} and {r.data.tags["gpt2exp.role"] for r in variants.values()} == {"variant"}
    trials = {
        (t.data.tags["gpt2exp.setting"], t.data.tags["gpt2exp.seed"], t.data.tags["gpt2exp.phase"]): t
        for t in children(variants["mqa"].info.run_id)
    }
    assert set(trials) == {("lr=0.02", "1", "selection"), ("lr=1e-06", "1", "selection"), ("lr=0.02", "2", "verdict")}
    bad = trials[("lr=1e-06", "1", "selection")]
    assert bad.info.status == "KILLED" and bad.data.tags["gpt2exp.stopped_early"] == "true"
    assert [m.step for m in client.get_metric_history(bad.info.run_id, "val_loss")] == [4]  # what ASHA saw is in the run
    assert trials[("lr=0.02", "2", "verdict")].info.status == "FINISHED"
    assert trials[("lr=0.02", "2", "verdict")].data.params["train.lr"] == "0.02"

    # the comparison: the chosen setting per variant, the verdict over seed 2 only
    table = result.comparison
    assert table is not None
    assert list(table.setting) == ["lr=0.02", "lr=0.02"] and list(table.n_seeds) == [1, 1]
    assert table.attrs["verdict_seeds"] == [2]
    verdict_loss = json.loads((result.out_dir / "runs" / "mqa" / "lr=0.02" / "seed_2" / "status.json").read_text())["val_loss"]
    assert table.loc[table.variant == "mqa", "final_val_loss"].item() == pytest.approx(verdict_loss)
    chosen = {s["variant"]: (s["setting"], s["status"]) for s in table.attrs["selection"] if s["chosen"]}
    assert chosen == {"mha": ("lr=0.02", "finished"), "mqa": ("lr=0.02", "finished")}
    assert "## Selection of each variant's setting" in (result.out_dir / "report" / "report.md").read_text()

    # a rerun trains nothing and finds the same runs
    again = run_experiment(spec, tmp_path, Console(file=io.StringIO()), show_progress=False)
    assert list(again.runs.status) == list(result.runs.status) and list(again.runs.run_id) == list(result.runs.run_id)
