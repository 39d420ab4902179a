"""The Ray launcher: Ray Train ``TorchTrainer`` worker groups (DDP or FSDP, CPU or GPU), all in one
Ray session. Starting a worker group costs many seconds, so jobs of the same worker shape share one:
a group ("lane") trains its jobs one after another, and lanes run side by side when the cluster
has room.

This module is the driver's side (it imports neither torch nor the model); ``ray_worker`` is the
workers'. Workers send metric records to a small actor that the driver drains for the progress view;
``ray.train.report`` is called only with checkpoints (it is a barrier across workers); it returns once
the checkpoint is in storage and reported, and only then is it logged to MLflow as a logged model.

A private cluster (no RAY_ADDRESS) is run lean, for a small machine: no prestarted idle workers,
no Ray Train helper actors that have nothing to do there, and a shutdown without Ray's waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from gpt2exp import _ray_compat
from gpt2exp.launch.cluster import Background, ensure_ray, own_cluster, shutdown_under
from gpt2exp.launch.plan import Plan
from gpt2exp.launch.progress import Recorder
from gpt2exp.launch.status import outcome, read_status
from gpt2exp.launch.torch_backend import LateTorchConfig
from gpt2exp.spec import ParallelSpec
from gpt2exp.training.job import TrainJob


@ray.remote(num_cpus=0)
class ProgressBus:
    """Metric records from rank 0 of every run, drained by the driver."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    @ray.method  # types .remote() on the actor's handle; no options
    def put(self, key: str, record: dict[str, Any]) -> None:
        self.records.append((key, record))

    @ray.method
    def drain(self) -> list[tuple[str, dict[str, Any]]]:
        out, self.records = self.records, []
        return out


def _lane_worker(config: dict[str, Any]) -> None:
    """Every worker of a lane (the worker side, with torch and the loop, is imported there only)."""
    from gpt2exp.launch.ray_worker import lane_worker

    lane_worker(config)


def worker_resources(p: ParallelSpec) -> dict[str, float]:
    """Ray resources of one worker. A CPU worker group fills one node unless the spec says
    otherwise (torch threads scale within a node; side-by-side groups would only split them)."""
    if p.use_gpu:
        return {"CPU": p.cpus_per_worker or 1, "GPU": p.gpus_per_worker}
    node_cpus = min((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"]), default=1)
    return {"CPU": p.cpus_per_worker or max(1, int(node_cpus // p.num_workers))}


def lanes(jobs: list[TrainJob], resources: Mapping[str, float]) -> dict[str, list[TrainJob]]:
    """Jobs with the same worker shape share worker groups ("lanes"), as many lanes side by side
    as the cluster fits. Lanes are named by their place in the whole plan, so a rerun finds them."""
    groups: dict[str, list[TrainJob]] = {}
    for job in jobs:
        groups.setdefault(
            job.spec.parallel.model_dump_json(include={"num_workers", "use_gpu", "gpus_per_worker", "cpus_per_worker"}), []
        ).append(job)
    out = {}
    for members in groups.values():
        p = members[0].spec.parallel
        need = worker_resources(p)
        fit = min(int(resources.get(kind, 0) // (p.num_workers * amount)) for kind, amount in need.items())
        n = max(1, min(len(members), p.max_concurrent or len(members), fit))
        for i in range(n):
            out[f"{p.num_workers}x{'gpu' if p.use_gpu else 'cpu'}-lane{i + 1}of{n}"] = members[i::n]
    return out


class _LaneTrainer(DataParallelTrainer):
    """Ray's ``TorchTrainer`` (a data-parallel trainer with the torch backend, here the late-loading one
    of ``torch_backend``, so that neither this driver nor the Train controller wait for torch's import)
    without Ray Data's DatasetManager actor (lanes pass no datasets) and, on the
    private cluster, without the PlacementGroupCleaner actor (it asks the state API, which a cluster
    without dashboard does not serve, so it could never act). Each is one more process to start, and
    to feed, on a small machine at every ``fit``."""

    def _create_default_callbacks(self) -> list[Any]:
        unused = {"DatasetsCallback"} | ({"PlacementGroupCleanerCallback"} if own_cluster() else set())
        return _ray_compat.without_default_callbacks(super()._create_default_callbacks(), unused)


def _trainer(name: str, jobs: list[TrainJob], bus: Any, storage: Path) -> DataParallelTrainer:
    p = jobs[0].spec.parallel
    return _LaneTrainer(
        _lane_worker,
        # the jobs by reference: the Train controller unpickles this config too, and has no use for
        # the jobs (their classes would make it import MLflow on the critical path of every fit)
        train_loop_config={"jobs": ray.put(jobs), "bus": bus},
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker=worker_resources(p)),
        backend_config=LateTorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=p.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def run_jobs_on_ray(plan: Plan, recorder: Recorder) -> None:
    """Run the plan's unfinished jobs on Ray Train: one trainer per lane, lanes side by side.

    When a lane's trainer fails (a worker crashed beyond ``max_failures``, or a job raised), the
    job it was running is marked failed and the lane restarts with the jobs after it."""
    if not plan.pending():
        return
    ensure_ray()
    bus = ProgressBus.remote()
    all_lanes = lanes(plan.jobs, ray.cluster_resources())
    running: dict[str, str] = {}  # lane -> key of the job it runs
    started: dict[str, float] = {}
    by_key = {j.key: j for j in plan.jobs}
    lane_of = {j.key: name for name, members in all_lanes.items() for j in members}
    failed: set[str] = set()
    stop = threading.Event()  # Ctrl-C: lanes return without going on

    def fit(name: str) -> None:
        while not stop.is_set() and (
            todo := [j for j in all_lanes[name] if j.key not in failed and read_status(j).get("status") != "completed"]
        ):
            try:
                _trainer(name, todo, bus, plan.out_dir / "ray").fit()
                return
            except Exception as e:  # the lane's current job failed for good; go on without it
                if stop.is_set():
                    return
                drain()
                job = by_key.get(running.get(name, ""), todo[0])
                failed.add(job.key)
                outcome(job, None, time.perf_counter() - started.get(job.key, time.perf_counter()), e)
                recorder.status(job.key, "failed")

    def drain() -> None:
        for key, record in ray.get(bus.drain.remote()):
            event = record.get("event")
            if event == "start":
                running[lane_of[key]], started[key] = key, time.perf_counter()
                recorder.status(key, "running")
            elif event == "status":
                recorder.status(key, record["status"])
            else:
                recorder.record(key, record)

    resources = ray.cluster_resources()
    for name, members in list(all_lanes.items()):
        if problem := _does_not_fit(members[0].spec.parallel, resources):
            for job in members:
                outcome(job, None, 0.0, RuntimeError(problem))
                recorder.status(job.key, "failed")
            del all_lanes[name]
    fits = [Background(partial(fit, name), f"lane-{name}") for name in all_lanes]
    try:
        while busy := [b for b in fits if not b.ended.is_set()]:
            busy[0].ended.wait(0.25)
            drain()
        drain()
    except KeyboardInterrupt:  # stop the workers; registered checkpoints stay for the rerun
        for key in running.values():
            if read_status(by_key[key]).get("status") != "completed":
                outcome(by_key[key], None, time.perf_counter() - started[key], KeyboardInterrupt())
        shutdown_under(fits, stop)
        raise
    if errors := [b.error for b in fits if b.error is not None]:
        raise errors[0]


def _does_not_fit(p: ParallelSpec, resources: Mapping[str, float]) -> str | None:
    """Why a worker group of this shape can never be placed on the cluster, or None."""
    for kind, amount in worker_resources(p).items():
        if resources.get(kind, 0) < p.num_workers * amount:
            return (
                f"needs {p.num_workers} workers x {amount:g} {kind} but the Ray cluster has {resources.get(kind, 0):g}; "
                f"lower parallel.num_workers{' or set parallel.use_gpu=false' if kind == 'GPU' else ' or parallel.cpus_per_worker'}"
            )
    return None
