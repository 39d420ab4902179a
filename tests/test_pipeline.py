"""Pipelines end to end on the real corpus, tokenizer and MLflow store: validation, every stage kind,
stage state in MLflow, resume after a kill, reruns that skip what is done, --from, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from gpt2exp.cli import app
from gpt2exp.pipeline.spec import load_pipeline
from gpt2exp.pipeline.state import PipelineRun
from gpt2exp.tracking.runs import project_store

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "model": {"vocab_size": 50304, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
    "train": {"max_steps": 16, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "eval_interval": 8, "eval_tokens": 256},
    "tracking": {"system_metrics": False},
    "variants": [{"name": "fast", "set": {}}, {"name": "slow", "set": {"train.lr": 1e-4}}],
}


def write(folder: Path, name: str, content: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def stages(run: PipelineRun) -> dict[str, dict]:
    return {name: vars(state) for name, state in run.states.items()}


@pytest.fixture(scope="module")
def corpus(corpus_head) -> Path:
    return corpus_head(300_000)


# ------------------------------------------------------------------------------------ validation
def test_shipped_pipelines_are_valid() -> None:
    files = sorted((REPO / "pipelines").glob("*.yaml"))
    assert REPO / "pipelines" / "attention_study.yaml" in files
    for path in files:
        load_pipeline(path)
    study = load_pipeline(REPO / "pipelines" / "attention_study.yaml")
    assert [s.kind for s in study.stages] == ["prepare", "run", "run", "compare", "register", "generate"]
    assert study.stage("compare").runs == study.stage("register").runs == ["attention", "positions"]
    attention = study.stage("attention").experiment
    assert attention.name == "gqa_vs_mha" and [v.name for v in attention.expand()] == [
        "n_kv_head=8",
        "n_kv_head=2",
        "n_kv_head=1",
    ]
    assert attention.data == study.stage("data").data
    for stage in ("attention", "positions"):  # a verdict needs seeds
        assert len(set(study.stage(stage).experiment.train.run_seeds)) >= 3
    same = {"data", "model", "train", "parallel"}  # one table compares all eight variants: same base, same budget
    learned = next(v.spec for v in study.stage("positions").experiment.expand() if v.name == "positional=learned")
    assert attention.expand()[0].spec.model_dump(include=same) == learned.model_dump(include=same)


def test_bad_pipeline_lists_every_problem_and_starts_nothing(tmp_path: Path) -> None:
    write(tmp_path, "tiny.yaml", TINY)
    bad = write(
        tmp_path,
        "bad.yaml",
        {
            "name": "bad",
            "stages": [
                {"name": "data", "kind": "prepare"},
                {"name": "train", "kind": "run", "spec": "tiny.yaml", "data": "nope", "set": {"train.max_steps": -1}},
                {"name": "cmp", "kind": "compare", "runs": ["data", "later"]},
                {"name": "best", "kind": "register", "model_name": "m"},
                {"name": "later", "kind": "generate", "model": "best"},
                {"name": "train", "kind": "export", "model": "later"},
            ],
        },
    )
    result = CliRunner().invoke(app, ["pipeline", "run", str(bad), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    expected = [
        f"{bad}: stages.1.run.data: 'nope' is not the name of a stage",
        f"{bad}: stages.1.run.spec: {tmp_path / 'tiny.yaml'}: train.max_steps: Input should be greater than 0",
        f"{bad}: stages.2.compare.runs: 'data' is a prepare stage; give a run stage",
        f"{bad}: stages.2.compare.runs: 'later' is a later stage; a stage can only use earlier ones",
        f"{bad}: stages.5.export.name: 'train' is already the name of an earlier stage",
        f"{bad}: stages.5.export.model: 'later' is a generate stage; give a register or run stage",
    ]
    assert all(line in lines for line in expected), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    unknown = write(tmp_path, "unknown.yaml", {"name": "u", "stages": [{"name": "a", "kind": "train"}]})
    result = CliRunner().invoke(app, ["pipeline", "status", str(unknown)])
    assert result.exit_code == 2 and "stages.0: Input tag 'train' found using 'kind' does not match" in result.output


# ------------------------------------------------------------------------------- every stage kind
@pytest.fixture(scope="module")
def study(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PipelineRun]:
    """prepare → run (two variants) → compare → register → generate → export, run once."""
    folder = tmp_path_factory.mktemp("study")
    write(folder, "tiny.yaml", TINY)
    pipeline = {
        "name": "study",
        "stages": [
            {"name": "data", "kind": "prepare", "data": {"path": str(corpus)}},
            {"name": "train", "kind": "run", "spec": "tiny.yaml", "data": "data"},
            {"name": "cmp", "kind": "compare"},
            {"name": "best", "kind": "register", "model_name": "tiny-best", "alias": "champion"},
            {"name": "samples", "kind": "generate", "model": "best", "prompts": ["ROMEO:", "JULIET:"], "max_new_tokens": 12},
            {"name": "hf", "kind": "export", "model": "best"},
        ],
    }
    path = write(folder, "study.yaml", pipeline)
    result = CliRunner().invoke(app, ["pipeline", "run", str(path), "--output", str(folder / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    run = PipelineRun.find(project_store(folder / "out"), "study")
    assert run is not None
    return folder, run


def test_stages_record_their_outputs_in_mlflow(study: tuple[Path, PipelineRun]) -> None:
    folder, run = study
    client = MlflowClient(project_store(folder / "out"))
    assert client.get_run(run.run_id).info.status == "FINISHED"
    state = stages(run)
    assert [s["status"] for s in state.values()] == ["completed"] * 6 and all(s["attempt"] == 1 for s in state.values())
    data, train = state["data"]["output"], state["train"]["output"]
    assert data["train_tokens"] > 50_000 and data["source"].startswith("path:")
    parent = client.get_run(train["parent_run_id"])
    assert parent.data.tags["gpt2exp.pipeline_run"] == run.run_id
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    losses = {c.data.tags["gpt2exp.variant"]: c.data.metrics["val_loss"] for c in children}
    assert set(losses) == {"fast", "slow"} and train["best_variant"] == min(losses, key=losses.get) == "fast"
    assert state["cmp"]["output"]["best_variant"] == "fast"
    children = client.search_runs(
        [run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'", order_by=["attributes.start_time"]
    )
    assert [c.info.run_name for c in children] == list(state) and {c.info.status for c in children} == {"FINISHED"}
    best = next(c for c in children if c.info.run_name == "best")
    assert (
        best.data.params["model_name"] == "tiny-best" and best.data.tags["output.version"] == state["best"]["output"]["version"]
    )
    assert all(state[c.info.run_name]["run_id"] == c.info.run_id for c in children)
    logged = {a.path for a in client.list_artifacts(run.run_id, "stages/cmp")}
    assert {"stages/cmp/report.html", "stages/cmp/report.md", "stages/cmp/val_loss.png"} <= logged


def test_register_generate_export(study: tuple[Path, PipelineRun]) -> None:
    folder, run = study
    uri = project_store(folder / "out")
    client = MlflowClient(uri)
    state = stages(run)
    version = client.get_model_version_by_alias("tiny-best", "champion")
    assert str(version.version) == state["best"]["output"]["version"] and version.run_id == state["best"]["output"]["run_id"]
    assert client.get_run(version.run_id).data.tags["gpt2exp.variant"] == "fast"

    from gpt2exp.tracking.pyfunc import generate_text, load_model
    from gpt2exp.tracking.runs import using

    with using(uri):
        model, tokenizer = load_model("models:/tiny-best@champion")
    text = client.download_artifacts(run.run_id, "stages/samples/samples.txt", str(folder))
    samples = Path(text).read_text()
    for prompt in ("ROMEO:", "JULIET:"):  # the same text as generating again with the same seed
        assert prompt + generate_text(model, tokenizer, [prompt], 12, 0.8, 200, None, 0)[0] in samples

    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    hf_dir = Path(state["hf"]["output"]["folder"])
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    idx = torch.tensor([tokenizer.encode("ROMEO: What light through yonder window breaks?")])
    with torch.no_grad():
        ours, _ = model(idx)
        torch.testing.assert_close(hf(idx).logits, ours, atol=1e-4, rtol=1e-4)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert GPT2TokenizerFast.from_pretrained(hf_dir)(text)["input_ids"] == tokenizer.encode(text)


def test_rerun_skips_completed_stages(study: tuple[Path, PipelineRun]) -> None:
    folder, run = study
    client = MlflowClient(project_store(folder / "out"))
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["pipeline", "run", str(folder / "study.yaml"), "--output", str(folder / "out")])
    assert result.exit_code == 0, result.output
    assert result.output.count("done earlier") == 6 and time.perf_counter() - t0 < 30
    again = PipelineRun.find(project_store(folder / "out"), "study")
    assert again is not None and again.run_id == run.run_id and stages(again) == stages(run)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before
    changed = yaml.safe_load((folder / "study.yaml").read_text())
    changed["stages"][4]["max_new_tokens"] = 13  # the generate stage
    status = CliRunner().invoke(
        app, ["pipeline", "status", str(write(folder, "changed.yaml", changed)), "--output", str(folder / "out")]
    )
    assert status.exit_code == 0, status.output
    cells = [line.split("│") for line in status.output.splitlines() if line.count("│") > 6]
    rows = {c[1].strip(): c[3].strip() for c in cells if c[1].strip()}
    assert rows == {"data": "completed", "train": "completed", "cmp": "completed", "best": "completed"} | {
        "samples": "completed, will rerun",
        "hf": "completed",
    }, status.output
    as_json = CliRunner().invoke(
        app, ["pipeline", "status", str(folder / "changed.yaml"), "--output", str(folder / "out"), "--json"]
    )
    data = json.loads(as_json.stdout)  # the same, for scripts: with every stage's outputs
    assert data["run_id"] == run.run_id and [s["stage"] for s in data["stages"]] == list(rows)
    assert {s["stage"]: s["status"] for s in data["stages"]} == rows
    assert next(s for s in data["stages"] if s["stage"] == "train")["output"] == run.states["train"].output


def test_failed_stage_is_recorded_and_the_fixed_pipeline_continues(study: tuple[Path, PipelineRun]) -> None:
    folder, _ = study
    pipeline = {
        "name": "sampling",
        "stages": [
            {
                "name": "data",
                "kind": "prepare",
                "data": {"path": str(load_pipeline(folder / "study.yaml").stage("data").data.path)},
            },
            {"name": "samples", "kind": "generate", "model": "models:/no-such-model@best", "max_new_tokens": 4},
        ],
    }
    path = write(folder, "sampling.yaml", pipeline)
    args = ["pipeline", "run", str(path), "--output", str(folder / "out"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "stage 2/2: samples (generate) failed" in result.output and "no-such-model" in result.output
    run = PipelineRun.find(project_store(folder / "out"), "sampling")
    assert run is not None and run.client.get_run(run.run_id).info.status == "FAILED"
    assert run.states["data"].status == "completed" and run.states["samples"].status == "failed"
    assert "no-such-model" in run.states["samples"].error
    pipeline["stages"][1]["model"] = "models:/tiny-best@champion"
    write(folder, "sampling.yaml", pipeline)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "stage 1/2: data (prepare): done earlier" in result.output
    run = PipelineRun.find(project_store(folder / "out"), "sampling")
    assert run is not None and run.states["samples"].status == "completed" and run.states["samples"].attempt == 2


# --------------------------------------------------------------------------------------- resume
def test_two_stage_pipeline_resumes_after_a_kill(corpus: Path, tmp_path: Path) -> None:
    """SIGKILL during the run stage; the rerun skips prepare and resumes the runs from their checkpoints,
    in the same MLflow runs; a third run does nothing; --from reruns the run stage in a fresh folder."""
    spec = dict(
        TINY,
        variants=[{"name": "mha", "set": {}}],
        train=dict(TINY["train"], max_steps=40, checkpoint_interval=4, log_interval=2),
    )
    write(tmp_path, "tiny.yaml", spec)
    path = write(
        tmp_path,
        "two.yaml",
        {
            "name": "two",
            "stages": [
                {"name": "data", "kind": "prepare", "data": {"path": str(corpus)}},
                {"name": "train", "kind": "run", "spec": "tiny.yaml", "data": "data"},
            ],
        },
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gpt2exp.cli", "pipeline", "run", str(path), "--output", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while not list(out.glob("two/*/train/runs/mha/seed_1337/checkpoints/step_00000008")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the pipeline ended before it was killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    uri = project_store(out)
    killed = PipelineRun.find(uri, "two")
    assert killed is not None
    assert killed.states["data"].status == "completed" and killed.states["train"].status == "running"
    (run_dir,) = out.glob("two/*/train/runs/mha/seed_1337")
    assert not (run_dir / "status.json").exists()
    child_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]

    args = cmd[3:]  # the same command, in this process from now on
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "stage 1/2: data (prepare): done earlier" in done.output and "train (run) · resuming" in done.output
    resumed = PipelineRun.find(uri, "two")
    assert resumed is not None and resumed.run_id == killed.run_id
    assert vars(resumed.states["data"]) == vars(killed.states["data"])  # not run again
    assert resumed.states["train"].status == "completed" and resumed.states["train"].attempt == 1
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == child_id  # the same MLflow run, continued
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "step"]
    assert max(steps) == 40 and steps.count(2) == steps.count(4) == 1  # resumed from a checkpoint, not from the start
    assert max(m.step for m in MlflowClient(uri).get_metric_history(child_id, "train_loss")) == 40

    third = CliRunner().invoke(app, args)
    assert third.exit_code == 0 and third.output.count("done earlier") == 2

    again = CliRunner().invoke(app, [*args, "--from", "train"])
    assert again.exit_code == 0, again.output
    fresh = PipelineRun.find(uri, "two")
    assert fresh is not None and fresh.states["train"].attempt == 2 and fresh.states["data"].attempt == 1
    assert fresh.states["train"].output["parent_run_id"] != resumed.states["train"].output["parent_run_id"]
    assert list(out.glob("two/*/train.2/runs/mha/seed_1337/final/model.safetensors"))
