"""The Ray launcher: each job is a Ray Train ``TorchTrainer`` (DDP or FSDP workers, CPU or GPU),
all in one Ray session, several side by side when the cluster has room.

Workers send metric records to a small actor that the driver drains for the progress view;
``ray.train.report`` is called only with checkpoints (it is a barrier across workers), and
checkpoints upload asynchronously so steps do not wait for storage."""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpt2exp.launch.runner import Recorder, outcome
from gpt2exp.parallel.distributed import pick_device
from gpt2exp.training.loop import Diverged, TrainJob, train

# Ray's Train controller polls workers every 2 s by default, which makes each report (and the end
# of every run) wait; 0.2 s keeps that latency small. Single-machine Ray binds to loopback.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


@ray.remote(num_cpus=0)
class ProgressBus:
    """Metric records from rank 0 of every run, drained by the driver."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.records.append((key, record))

    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.records = self.records, []
        return out


class RaySession:
    """The loop's view of a Ray Train worker."""

    def __init__(self, job: TrainJob, bus: Any) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = pick_device(job.spec.parallel.use_gpu)
        if self.device.type == "cpu":  # the CPUs Ray gave this worker, not Ray's default of one thread
            import torch

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
        self.job, self.bus = job, bus

    def restore(self, read):
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return read(Path(folder))

    def checkpoint(self, write, metrics: dict[str, Any]) -> None:
        folder = Path(tempfile.mkdtemp(prefix="gpt2exp-ckpt-"))
        write(folder)
        ray.train.report(
            {k: v for k, v in metrics.items() if v is not None},
            checkpoint=Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=f"step_{metrics['step']:08d}",
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )

    def emit(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.bus.put.remote(self.job.key, record)


def _worker(config: dict[str, Any]) -> None:
    train(config["job"], RaySession(config["job"], config["bus"]))


def ensure_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a private one on this machine (127.0.0.1)."""
    if ray.is_initialized():
        return
    # workers' logs stay in Ray's session folder; errors come back as exceptions, metrics through the bus
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs |= {"num_cpus": os.cpu_count(), "_node_ip_address": "127.0.0.1"}
    ray.init(**kwargs)


def _concurrency(jobs: list[TrainJob]) -> int:
    """How many runs fit side by side on the cluster (by the largest run's workers)."""
    resources = ray.cluster_resources()
    fits = []
    for p in (job.spec.parallel for job in jobs):
        if p.use_gpu:
            fits.append(int(resources.get("GPU", 0) // (p.num_workers * p.gpus_per_worker)))
        else:
            fits.append(int(resources.get("CPU", 1) // (p.num_workers * (p.cpus_per_worker or 1))))
    limit = jobs[0].spec.parallel.max_concurrent or len(jobs)
    return max(1, min(len(jobs), limit, min(fits)))


def _cpus_per_worker(job: TrainJob, concurrent: int) -> float:
    """The spec's CPUs per worker, else an equal share of the cluster's CPUs among running workers."""
    p = job.spec.parallel
    return p.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1) // (concurrent * p.num_workers)))


def _fit(job: TrainJob, bus: Any, cpus_per_worker: float) -> None:
    p = job.spec.parallel
    resources = {"CPU": cpus_per_worker} | ({"GPU": p.gpus_per_worker} if p.use_gpu else {})
    storage = Path(job.run_dir).parent.parent.parent / "ray"  # <out>/<experiment>/ray
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job, "bus": bus},
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{job.variant}-seed{job.seed}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=p.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()


def _error(e: BaseException) -> BaseException:
    """The worker's own exception inside Ray's wrapper, when it is a divergence."""
    text = str(e)
    return Diverged(text[text.find("non-finite") if "non-finite" in text else 0 :].splitlines()[0]) if "Diverged" in text else e


def run_jobs_on_ray(jobs: list[TrainJob], view: Recorder) -> None:
    """Run the jobs as Ray Train trainers, as many at once as the cluster fits."""
    if not jobs:
        return
    ensure_ray()
    bus = ProgressBus.remote()
    n = _concurrency(jobs)
    summaries: dict[str, dict[str, Any]] = {}
    started: dict[str, float] = {}

    def fit(job: TrainJob) -> None:
        started[job.key] = time.perf_counter()
        view.status(job.key, "starting")
        _fit(job, bus, _cpus_per_worker(job, n))

    def drain() -> None:
        for key, record in ray.get(bus.drain.remote()):
            view.record(key, record)
            if record.get("event") == "done":
                summaries[key] = record

    with ThreadPoolExecutor(n) as pool:
        futures: dict[Future, TrainJob] = {pool.submit(fit, job): job for job in jobs}
        pending = set(futures)
        while pending:
            time.sleep(0.25)
            drain()
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                drain()
                job = futures[future]
                error = future.exception()
                wall = time.perf_counter() - started.get(job.key, time.perf_counter())
                if error is None and job.key not in summaries:
                    error = RuntimeError("the run ended without a final summary")
                record = outcome(job, summaries.get(job.key), wall, None if error is None else _error(error))
                view.status(job.key, "done" if record["status"] == "completed" else record["status"])
