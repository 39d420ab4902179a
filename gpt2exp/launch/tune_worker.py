"""The trial side of a sweep (``gpt2exp.launch.tune``): one job trained by the worker loop inside a Ray Tune trial,
with the local launcher's checkpoints, metric records sent to the driver's progress bus, and each evaluation but
the last reported to Tune once it is stored in MLflow (the scheduler may stop the trial at any report: what it
saw is then in the run). The last one is reported once the job is done and its outcome recorded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from gpt2exp.launch.local import LocalSession, run_logger
from gpt2exp.launch.status import outcome
from gpt2exp.training.job import Diverged, TrainJob
from gpt2exp.training.loop import RunLog, train

REPORTED = ("step", "val_loss", "train_loss", "tokens_seen")


class Reporting:
    """The trial's run log (``RunLogger``, or none) that reports each evaluation before the last to Tune."""

    def __init__(self, log: RunLog | None, total_steps: int) -> None:
        self.inner, self.total_steps = log, total_steps

    def log_params(self, params: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.log_params(params)

    def log(self, record: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner.log(record)
        if "val_loss" in record and record["step"] < self.total_steps:
            self.flush()  # stored before Tune may stop the trial
            tune.report({k: record[k] for k in REPORTED})

    def log_series(self, key: str, values: dict[int, float]) -> None:
        if self.inner is not None:
            self.inner.log_series(key, values)

    def flush(self) -> None:
        if self.inner is not None:
            self.inner.flush()

    def checkpoint(self, step: int, location: str) -> None:
        if self.inner is not None:
            self.inner.checkpoint(step, location)

    def final_model(self, final_dir: Path, step: int) -> None:
        if self.inner is not None:
            self.inner.final_model(final_dir, step)


def run_trial(job: TrainJob, bus: Any) -> None:
    """Train ``job`` in this trial (resuming from its checkpoints), record its outcome, report the end to Tune."""
    session = LocalSession(job, lambda record: bus.put.remote(job.key, record))
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    session.emit({"event": "start"})
    t0, summary, error = time.perf_counter(), None, None
    try:
        with run_logger(job, session.rank) as logger:
            summary = train(job, session, Reporting(logger, job.total_steps))
    except Diverged as e:  # an outcome: recorded, and the sweep goes on
        error = e
    record = outcome(job, summary, time.perf_counter() - t0, error)
    session.emit({"event": "status", "status": "done" if error is None else "diverged"})
    final = {k: summary[k] for k in REPORTED if k in summary} if summary else {}
    tune.report({**final, "step": job.total_steps, "outcome": record["status"]})
