"""The trial side of a sweep (``gpt2exp.launch.tune``): one job trained by the worker loop inside a Ray Tune trial,
with the local launcher's checkpoints, metric records sent to the driver's progress bus, and each evaluation but
the last reported to Tune once it is stored in MLflow (the scheduler may stop the trial at any report: what it
saw is then in the run). The last one is reported once the job is done and its outcome recorded."""

from __future__ import annotations

import time
from typing import Any

import ray
import torch
from ray import tune

from gpt2exp.launch.local import LocalSession
from gpt2exp.launch.status import outcome
from gpt2exp.tracking.runs import RunLogger
from gpt2exp.training.job import Diverged, RunRef, TrainJob
from gpt2exp.training.loop import train

REPORTED = ("step", "val_loss", "train_loss", "tokens_seen")


class Reporting(RunLogger):
    """The trial's MLflow run log (a sweep's trials always have one) that also reports each evaluation before the last
    to Tune, once it is stored."""

    def __init__(self, ref: RunRef, system_metrics: bool, total_steps: int) -> None:
        super().__init__(ref, system_metrics)
        self.total_steps = total_steps

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        if "val_loss" in record and record["step"] < self.total_steps:
            self.flush()  # stored before Tune may stop the trial
            tune.report({k: record[k] for k in REPORTED})


def run_trial(job: TrainJob, bus: Any) -> None:
    """Train ``job`` in this trial (resuming from its checkpoints), record its outcome, report the end to Tune."""
    session = LocalSession(job, lambda record: bus.put.remote(job.key, record))
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    session.emit({"event": "start"})
    t0, summary, error = time.perf_counter(), None, None
    assert job.tracking is not None  # a sweep needs tracking (a spec rule)
    logger = Reporting(job.tracking, job.spec.tracking.system_metrics, job.total_steps)
    try:
        summary = train(job, session, logger)
    except Diverged as e:  # an outcome: recorded, and the sweep goes on
        error = e
    finally:
        logger.close()
    record = outcome(job, summary, time.perf_counter() - t0, error)
    session.emit({"event": "status", "status": "done" if error is None else "diverged"})
    final = {k: summary[k] for k in REPORTED if k in summary} if summary else {}
    tune.report({**final, "step": job.total_steps, "outcome": record["status"]})
