"""The Ray launcher: Ray Train ``TorchTrainer`` worker groups (DDP or FSDP, CPU or GPU), all in one
Ray session. Starting a worker group costs many seconds, so jobs of the same worker shape share one:
a group ("lane") trains its jobs one after another, and lanes run side by side when the cluster
has room.

Workers send metric records to a small actor that the driver drains for the progress view;
``ray.train.report`` is called only with checkpoints (it is a barrier across workers), and
checkpoints upload asynchronously so steps do not wait for storage.

A private cluster (no RAY_ADDRESS) is run lean, for a small machine: no prestarted idle workers,
no Ray Train helper actors that have nothing to do there, and a shutdown without Ray's waits."""

from __future__ import annotations

import atexit
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from gpt2exp.launch.plan import Plan, read_status
from gpt2exp.launch.runner import Recorder, outcome
from gpt2exp.parallel.distributed import pick_device
from gpt2exp.spec import ParallelSpec
from gpt2exp.training.checkpoint import META
from gpt2exp.training.loop import Diverged, TrainJob, train

# Ray's Train controller polls workers every 2 s by default, which makes each report (and the end
# of every run) wait; 0.2 s keeps that latency small. Single-machine Ray binds to loopback.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

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
    """The loop's view of a Ray Train worker running one job of its lane."""

    def __init__(self, job: TrainJob, bus: Any) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = pick_device(job.spec.parallel.use_gpu)
        self.job, self.bus = job, bus

    def restore(self, read: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
        """The lane's latest registered checkpoint, when it belongs to this job."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            meta = json.loads((Path(folder) / META).read_text())
            return read(Path(folder)) if (meta["variant"], meta["seed"]) == (self.job.variant, self.job.seed) else None

    def checkpoint(self, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        folder = Path(tempfile.mkdtemp(prefix="gpt2exp-ckpt-"))
        write(folder)
        name = f"{self.job.variant}-seed{self.job.seed}-step_{metrics['step']:08d}"
        ray.train.report(
            {k: v for k, v in metrics.items() if v is not None},
            checkpoint=Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
        return str(Path(self.job.run_dir).parents[2] / "ray" / ray.train.get_context().get_experiment_name() / name)

    def emit(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.bus.put.remote(self.job.key, record)


def _lane_worker(config: dict[str, Any]) -> None:
    """Every worker of a lane: train its jobs one after another in the same worker group."""
    if not config["jobs"][0].spec.parallel.use_gpu:  # the CPUs Ray gave this worker, not one thread
        import torch

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    for job in config["jobs"]:
        if read_status(job).get("status") == "completed":
            continue
        session = RaySession(job, config["bus"])
        session.emit({"event": "start"})
        t0, summary, error = time.perf_counter(), None, None
        try:
            summary = train(job, session)
        except Diverged as e:  # the same on every rank: the group goes on with the next job
            error = e
        if session.rank == 0:
            outcome(job, summary, time.perf_counter() - t0, error)
            session.emit({"event": "status", "status": "done" if error is None else "diverged"})


def ensure_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a private one on this machine (127.0.0.1)."""
    if ray.is_initialized():
        return
    # workers' logs stay in Ray's session folder; errors come back as exceptions, metrics through the bus
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    address = os.environ.get("RAY_ADDRESS", "")
    if not address or address.startswith(("http://", "https://")):  # a dashboard address is for `gpt2exp jobs`
        # no idle workers prestarted for the driver: only the progress bus could use one (Ray Train's
        # actors carry a runtime env of their own), and starting them made ray.init 0.6 s slower here
        config = {"prestart_worker_first_driver": False}
        kwargs |= {"address": "local", "num_cpus": os.cpu_count(), "_node_ip_address": "127.0.0.1", "_system_config": config}
    ray.init(**kwargs)
    if _own_cluster():
        atexit.unregister(_shutdown)  # once, however often Ray is started in this process
        atexit.register(_shutdown)  # runs before Ray's own exit hook (registered at import)
        _start_autoscaling_coordinator()


def _start_autoscaling_coordinator() -> None:
    """Start the actor that every ``fit`` asks for resources now, while the driver sets up MLflow,
    rather than on the critical path of the first ``fit`` (a process start and a Ray Data import,
    about 1.3 s on 2 cores)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import get_or_create_autoscaling_coordinator
    except ImportError:  # a Ray Train without it
        return
    get_or_create_autoscaling_coordinator()


def _own_cluster() -> bool:
    """Whether this process started the cluster it is connected to (a private one, without dashboard)."""
    return ray._private.worker._global_node is not None


def _shutdown() -> None:
    """``ray.shutdown()`` without waiting 1 s for the autoscaler monitor of a cluster this process
    started to obey SIGTERM (on one machine it has nothing to tidy up, so it is killed outright).
    At exit it also runs instead of Ray's own hook, which sleeps 0.5 s for worker log lines that
    log_to_driver=False never sends."""
    if _own_cluster():
        for info in ray._private.worker._global_node.all_processes.get(ray._private.ray_constants.PROCESS_TYPE_MONITOR, []):
            info.process.kill()
    ray.shutdown()


def worker_resources(p: ParallelSpec) -> dict[str, float]:
    """Ray resources of one worker. A CPU worker group fills one node unless the spec says
    otherwise (torch threads scale within a node; side-by-side groups would only split them)."""
    if p.use_gpu:
        return {"CPU": p.cpus_per_worker or 1, "GPU": p.gpus_per_worker}
    node_cpus = min((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"]), default=1)
    return {"CPU": p.cpus_per_worker or max(1, int(node_cpus // p.num_workers))}


def lanes(jobs: list[TrainJob], resources: dict[str, float]) -> dict[str, list[TrainJob]]:
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


class _LaneTrainer(TorchTrainer):
    """A ``TorchTrainer`` without Ray Data's DatasetManager actor (lanes pass no datasets) and, on the
    private cluster, without the PlacementGroupCleaner actor (it asks the state API, which a cluster
    without dashboard does not serve, so it could never act). Each is one more process to start, and
    to feed, on a small machine at every ``fit``."""

    def _create_default_callbacks(self) -> list[Any]:
        unused = {"DatasetsCallback"} | ({"PlacementGroupCleanerCallback"} if _own_cluster() else set())
        return [cb for cb in super()._create_default_callbacks() if type(cb).__name__ not in unused]


def _trainer(name: str, jobs: list[TrainJob], bus: Any, storage: Path) -> TorchTrainer:
    p = jobs[0].spec.parallel
    return _LaneTrainer(
        _lane_worker,
        train_loop_config={"jobs": jobs, "bus": bus},
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker=worker_resources(p)),
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
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

    def fit(name: str) -> None:
        while todo := [j for j in all_lanes[name] if j.key not in failed and read_status(j).get("status") != "completed"]:
            try:
                _trainer(name, todo, bus, plan.out_dir / "ray").fit()
                return
            except Exception as e:  # the lane's current job failed for good; go on without it
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
    pool = ThreadPoolExecutor(max(1, len(all_lanes)))
    futures = [pool.submit(fit, name) for name in all_lanes]
    try:
        while wait(futures, timeout=0.25).not_done:
            drain()
        drain()
        for f in futures:
            f.result()
    except KeyboardInterrupt:  # stop the workers; registered checkpoints stay for the rerun
        for key in running.values():
            if read_status(by_key[key]).get("status") != "completed":
                outcome(by_key[key], None, time.perf_counter() - started[key], KeyboardInterrupt())
        _shutdown()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _does_not_fit(p: ParallelSpec, resources: dict[str, float]) -> str | None:
    """Why a worker group of this shape can never be placed on the cluster, or None."""
    for kind, amount in worker_resources(p).items():
        if resources.get(kind, 0) < p.num_workers * amount:
            return (
                f"needs {p.num_workers} workers x {amount:g} {kind} but the Ray cluster has {resources.get(kind, 0):g}; "
                f"lower parallel.num_workers{' or set parallel.use_gpu=false' if kind == 'GPU' else ' or parallel.cpus_per_worker'}"
            )
    return None
