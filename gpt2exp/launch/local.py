"""The local launcher: the worker loop in this process on one device, or on every rank of a
``torchrun`` job (the loop picks the process group up from the environment)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2exp.parallel.distributed import init_from_env, pick_device, rank_and_world, set_cpu_threads
from gpt2exp.training.checkpoint import barrier, restore_newest
from gpt2exp.training.job import TrainJob
from gpt2exp.training.loop import train

if TYPE_CHECKING:
    from gpt2exp.tracking.runs import RunLogger

KEEP_CHECKPOINTS = 2


class LocalSession:
    """Checkpoints in ``<run_dir>/checkpoints/step_<N>``, written under a temporary name and renamed; a
    resume uses the newest one that verifies."""

    def __init__(self, job: TrainJob, emit: Callable[[dict[str, Any]], None]) -> None:
        init_from_env(job.spec.parallel.use_gpu)
        self.rank, self.world_size = rank_and_world()
        self.device = pick_device(job.spec.parallel.use_gpu)
        if self.device.type == "cpu":
            set_cpu_threads(job.spec.parallel, int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)))
        self.dir = Path(job.run_dir) / "checkpoints"
        self.job, self._emit = job, emit

    def _checkpoints(self) -> list[Path]:
        """The checkpoint folders, oldest first."""
        found = [p for p in self.dir.glob("step_*") if p.name.removeprefix("step_").isdigit()] if self.dir.is_dir() else []
        return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))

    def restore(self, read: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
        return restore_newest(self._checkpoints()[::-1], read, self.emit, self.job.total_steps)

    def checkpoint(self, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        final = self.dir / f"step_{metrics['step']:08d}"
        tmp = self.dir / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        write(tmp)
        barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self._checkpoints()[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return str(final)

    def emit(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self._emit(record)


def run_local(job: TrainJob, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Train one job here (one process, or this rank of a torchrun group)."""
    session = LocalSession(job, emit)
    with run_logger(job, session.rank) as logger:
        return train(job, session, logger)


@contextlib.contextmanager
def run_logger(job: TrainJob, rank: int) -> Iterator[RunLogger | None]:
    """Rank 0's logger into the job's MLflow run when it has one (closed at the end), else None."""
    if job.tracking is None or rank != 0:
        yield None
        return
    from gpt2exp.tracking.runs import RunLogger

    logger = RunLogger(job.tracking, job.spec.tracking.system_metrics)
    try:
        yield logger
    finally:
        logger.close()
