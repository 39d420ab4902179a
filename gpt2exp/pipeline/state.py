"""Where a pipeline's progress lives: a parent MLflow run (experiment ``pipeline:<name>``) whose tags
``gpt2exp.stage.<stage>`` hold each stage's state as JSON (status, attempt, fingerprint, outputs,
times), with one child run per stage attempt (its configuration as params, its outputs as tags) for
the MLflow UI. It is in the tracking store, so a pipeline resumes from any machine that reaches it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from gpt2exp.pipeline.spec import Stage
from gpt2exp.tracking.runs import experiment_id, flatten, store_lock

TAG = "gpt2exp.stage."
PIPELINE_TAG = "gpt2exp.pipeline"
EXPERIMENT = "pipeline:{name}"  # the MLflow experiment of a pipeline's runs
RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


@dataclass
class StageState:
    status: str  # running, completed, failed, interrupted
    attempt: int
    fingerprint: str
    output: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # unix seconds
    seconds: float | None = None
    error: str | None = None
    run_id: str | None = None  # the attempt's child run


class PipelineRun:
    """The parent MLflow run of one execution history of a pipeline (reruns continue it)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        run = client.get_run(run_id)
        self.client, self.run_id, self.experiment_id = client, run_id, run.info.experiment_id
        self.states = {
            key.removeprefix(TAG): StageState(**json.loads(value)) for key, value in run.data.tags.items() if key.startswith(TAG)
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
        with store_lock(uri):  # a new SQLite store is made here: by one process at a time
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

    def start(self, stage: Stage, attempt: int, fingerprint: str) -> StageState:
        """Record the stage as running: a new attempt gets a child run, a resumed one continues its own."""
        old = self.states.get(stage.name)
        if old is not None and old.attempt == attempt and old.run_id:
            run_id = old.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": self.run_id, "gpt2exp.stage": stage.name, "gpt2exp.attempt": str(attempt)}
            name = stage.name if attempt == 1 else f"{stage.name}.{attempt}"
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            params = flatten(stage.model_dump(mode="json", exclude={"spec"}))
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        state = StageState("running", attempt, fingerprint, started=time.time(), run_id=run_id)
        self.save(stage.name, state)
        return state

    def end(
        self, stage: str, state: StageState, status: str, output: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        """Record how the attempt ended, on the parent (the state) and on its child run (status, outputs, time)."""
        state.status, state.output, state.error = status, output or {}, error
        state.seconds = round(time.time() - state.started, 1)
        self.save(stage, state)
        if state.run_id:
            tags = {f"output.{k}": str(v)[:5000] for k, v in state.output.items()} | ({"error": error[:5000]} if error else {})
            now = int(time.time() * 1000)
            self.client.log_batch(
                state.run_id, metrics=[Metric("seconds", state.seconds, now, 0)], tags=[RunTag(k, v) for k, v in tags.items()]
            )
            self.client.set_terminated(state.run_id, RUN_STATUS[status])

    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)
