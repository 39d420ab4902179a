"""Where a pipeline's progress lives: one MLflow run (experiment ``pipeline:<name>``) whose tags
``gpt2exp.stage.<stage>`` hold each stage's state as JSON (status, attempt, fingerprint, outputs,
times). It is in the tracking store, so a pipeline resumes from any machine that reaches the store."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus

from gpt2exp.tracking.runs import experiment_id

TAG = "gpt2exp.stage."
PIPELINE_TAG = "gpt2exp.pipeline"
EXPERIMENT = "pipeline:{name}"  # the MLflow experiment of a pipeline's runs


@dataclass
class StageState:
    status: str  # running, completed, failed, interrupted
    attempt: int
    fingerprint: str
    output: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # unix seconds
    seconds: float | None = None
    error: str | None = None


class PipelineRun:
    """The MLflow run of one execution history of a pipeline (reruns continue it)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.states = {
            key.removeprefix(TAG): StageState(**json.loads(value))
            for key, value in client.get_run(run_id).data.tags.items()
            if key.startswith(TAG)
        }

    @classmethod
    def find(cls, uri: str, name: str) -> PipelineRun | None:
        """The pipeline's latest run in the store, if any."""
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT.format(name=name))
        if experiment is None:
            return None
        found = client.search_runs(
            [experiment.experiment_id],
            f"tags.`{PIPELINE_TAG}` = '{name}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return cls(client, found[0].info.run_id) if found else None

    @classmethod
    def open(cls, uri: str, name: str, output: Path, new: bool = False, spec: dict[str, Any] | None = None) -> PipelineRun:
        """The pipeline's latest run in the store (``new``: a fresh one), marked running."""
        run = None if new else cls.find(uri, name)
        client = MlflowClient(uri)
        if run is None:
            exp_id = experiment_id(client, EXPERIMENT.format(name=name), output)
            run = cls(client, client.create_run(exp_id, run_name=name, tags={PIPELINE_TAG: name}).info.run_id)
        else:
            client.update_run(run.run_id, status="RUNNING")
        if spec is not None:
            client.log_dict(run.run_id, spec, "pipeline.yaml")
        return run

    def save(self, stage: str, state: StageState) -> None:
        self.states[stage] = state
        self.client.set_tag(self.run_id, TAG + stage, json.dumps(asdict(state), default=str))

    def start(self, stage: str, attempt: int, fingerprint: str) -> StageState:
        state = StageState("running", attempt, fingerprint, started=time.time())
        self.save(stage, state)
        return state

    def end(
        self, stage: str, state: StageState, status: str, output: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        state.status, state.output, state.error = status, output or {}, error
        state.seconds = round(time.time() - state.started, 1)
        self.save(stage, state)
        if status == "completed":
            self.client.log_metric(self.run_id, f"stage_seconds/{stage}", state.seconds)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, RunStatus.to_string(getattr(RunStatus, status)))
