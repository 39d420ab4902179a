"""The worker side of the Ray launcher: each Ray Train worker of a lane trains the lane's jobs one
after another with the worker loop, checkpointing through ``ray.train.report`` and sending metric
records to the driver's progress bus."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint

from gpt2exp.launch.local import run_logger
from gpt2exp.launch.status import outcome, read_status
from gpt2exp.parallel.distributed import pick_device
from gpt2exp.training.checkpoint import restore_newest
from gpt2exp.training.job import Diverged, TrainJob
from gpt2exp.training.loop import train


class RaySession:
    """The loop's view of a Ray Train worker running one job of its lane."""

    def __init__(self, job: TrainJob, bus: Any) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = pick_device(job.spec.parallel.use_gpu)
        self.job, self.bus = job, bus
        self.prefix = f"{job.variant}-seed{job.seed}-step_"  # + the step, 8 digits: this job's checkpoint folders

    def restore(self, read: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
        """The newest checkpoint of this job that verifies, from the lane's latest registered one back
        (in the merged folder Ray keeps: every rank's files); none when that one is another job's."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None or not (latest := Path(checkpoint.path)).name.startswith(self.prefix):
            return None
        ours = [p for p in latest.parent.iterdir() if p.name.startswith(self.prefix) and p.name <= latest.name]
        return restore_newest(sorted(ours, reverse=True), read, self.emit, self.job.total_steps)

    def checkpoint(self, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        """Report this rank's part to Ray; returns once it is in storage and reported (Ray's controller takes it
        at its next poll), so the loop logs the checkpoint to MLflow only then."""
        folder = Path(tempfile.mkdtemp(prefix="gpt2exp-ckpt-"))
        write(folder)
        name = f"{self.prefix}{metrics['step']:08d}"
        ray.train.report(
            {k: v for k, v in metrics.items() if v is not None},
            checkpoint=Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.SYNC,
            delete_local_checkpoint_after_upload=True,
        )
        return str(Path(self.job.run_dir).parents[2] / "ray" / ray.train.get_context().get_experiment_name() / name)

    def emit(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.bus.put.remote(self.job.key, record)


def lane_worker(config: dict[str, Any]) -> None:
    """Every worker of a lane: train its jobs one after another in the same worker group."""
    jobs: list[TrainJob] = ray.get(config["jobs"])
    if not jobs[0].spec.parallel.use_gpu:  # the CPUs Ray gave this worker, not one thread
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    for job in jobs:
        if read_status(job).get("status") == "completed":
            continue
        session = RaySession(job, config["bus"])
        session.emit({"event": "start"})
        t0, summary, error = time.perf_counter(), None, None
        try:
            with run_logger(job, session.rank) as logger:
                summary = train(job, session, logger)
        except Diverged as e:  # the same on every rank: the group goes on with the next job
            error = e
        if session.rank == 0:
            outcome(job, summary, time.perf_counter() - t0, error)
            session.emit({"event": "status", "status": "done" if error is None else "diverged"})
