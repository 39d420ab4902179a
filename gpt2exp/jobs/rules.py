"""The rules a cluster puts on an experiment, checked on the client before anything is sent.

The workers fit the cluster's nodes; on a remote head the output folder is absolute; on several nodes the output
folder, the token cache and the MLflow store are reachable from every node. (Whether the output folder is really
shared is only visible from inside the cluster: :mod:`gpt2exp.jobs.checked_run` checks that in the job.)
Each rule raises a :class:`SubmitError` with exit code 2."""

from __future__ import annotations

import urllib.parse
from pathlib import Path, PurePosixPath

from gpt2exp.jobs.connection import Node, SubmitError
from gpt2exp.spec import ExperimentSpec

OBJECT_STORES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "az://", "hdfs://")
FILE_STORES = ("sqlite:", "file:")


def _gpu_and_cpu_need(spec: ExperimentSpec) -> list[tuple[str, int, float, float]]:
    """(variant, workers, GPUs per worker, CPUs per worker) of every variant."""
    out = []
    for v in spec.expand():
        p = v.spec.parallel
        out.append((v.name, p.num_workers, p.gpus_per_worker if p.use_gpu else 0.0, float(p.cpus_per_worker or 1)))
    return out


def check_fit(spec: ExperimentSpec, nodes: list[Node]) -> None:
    """Every variant's worker group fits the cluster: GPUs (in total, and per worker on one node) and CPUs."""
    total_gpus, total_cpus = sum(n.gpus for n in nodes), sum(n.cpus for n in nodes)
    max_node_gpus = max((n.gpus for n in nodes), default=0.0)
    where = f"the cluster has {len(nodes)} node(s), {total_cpus:g} CPU(s), {total_gpus:g} GPU(s)"
    for name, workers, gpus, cpus in _gpu_and_cpu_need(spec):
        label = f"variant {name}: " if name != "base" else ""
        if gpus:
            if total_gpus == 0:
                raise SubmitError(f"{label}parallel.use_gpu is true but {where}: add GPU nodes or set parallel.use_gpu=false", 2)
            if workers * gpus > total_gpus:
                raise SubmitError(
                    f"{label}{workers} workers x {gpus:g} GPU = {workers * gpus:g} GPUs, but {where}: lower parallel.num_workers "
                    "or parallel.gpus_per_worker",
                    2,
                )
            if gpus > max_node_gpus:
                raise SubmitError(
                    f"{label}parallel.gpus_per_worker={gpus:g} but the largest node has {max_node_gpus:g} GPU(s) (a worker runs on one node)",
                    2,
                )
        if workers * cpus > total_cpus:
            raise SubmitError(
                f"{label}{workers} workers x {cpus:g} CPU = {workers * cpus:g} CPUs, but {where}: lower parallel.num_workers"
                + (" or parallel.cpus_per_worker" if cpus > 1 else ""),
                2,
            )


def is_file_store(uri: str) -> bool:
    """A tracking URI that is a file on one machine (SQLite, a file store, a bare path)."""
    return uri.startswith(FILE_STORES) or ("://" not in uri and not uri.startswith("databricks"))


def check_tracking(uri: str | None, multi_node: bool) -> None:
    """On a multi-node cluster the workers log to MLflow themselves: the store must be a server they reach."""
    if not multi_node:
        return
    if uri is None:
        raise SubmitError(
            "a multi-node cluster needs an MLflow server that every node reaches (the default store is a SQLite file on one "
            "node): start `mlflow server --host 0.0.0.0 --port 5000` and pass --set tracking.tracking_uri=http://HOST:5000 "
            "(or set MLFLOW_TRACKING_URI)",
            2,
        )
    if is_file_store(uri):
        raise SubmitError(
            f"MLflow at {uri} is a file on one machine; workers on other nodes can't reach it: start `mlflow server "
            "--host 0.0.0.0 --port 5000` and pass --set tracking.tracking_uri=http://HOST:5000",
            2,
        )
    host = urllib.parse.urlparse(uri).hostname or ""
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        raise SubmitError(
            f"MLflow at {uri} is a loopback address: on the other nodes it means themselves; use the server's network "
            "address (e.g. http://10.0.0.5:5000) and start it with --host 0.0.0.0",
            2,
        )


def absolute_store(uri: str | None, on_this_machine: bool) -> str | None:
    """A relative SQLite URI (``sqlite:///mlflow.db``) would land in the job's temporary copy of the project: made
    absolute here when the head is this machine, refused otherwise."""
    if not uri or not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return uri
    if on_this_machine:
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    raise SubmitError(
        f"MLflow at {uri} is a relative path: in the job it would be a file in a temporary copy of the project; give "
        "an absolute one (sqlite:////path/mlflow.db) or a server (http://HOST:5000)",
        2,
    )


def check_output(output: str | None, multi_node: bool, on_this_machine: bool) -> str:
    """The output folder the job writes to, as the cluster will see it.

    Single node on this machine: any folder (made absolute here). Single remote node: an absolute path on that
    node (the job runs in a temporary copy of the project, so a relative one would vanish). Several nodes: an
    absolute path on a filesystem mounted at the same place on every node, because the workers write run status
    and Ray Train checkpoints there; the job checks that before it trains (:mod:`gpt2exp.jobs.checked_run`)."""
    if output and output.startswith(OBJECT_STORES):
        raise SubmitError(
            f"--output {output}: gpt2exp writes its run folders with ordinary file I/O; mount the bucket on every node "
            "(s3fs, mountpoint-s3, gcsfuse, blobfuse2) and give the mount path, e.g. --output /mnt/bucket/gpt2exp",
            2,
        )
    if output and "://" in output:
        raise SubmitError(f"--output {output}: give a folder path", 2)
    if on_this_machine and not multi_node:
        return str(Path(output or "outputs").expanduser().resolve())
    if not output or not PurePosixPath(output).is_absolute():  # `~` too: it would mean this machine's home
        what = "several nodes" if multi_node else "a remote head node"
        raise SubmitError(
            f"a cluster with {what} needs --output as an absolute path that "
            + (
                "every node mounts at the same place (NFS, EFS, Filestore, a mounted bucket), e.g. --output /mnt/shared/gpt2exp"
                if multi_node
                else "exists on the head node, e.g. --output /home/ray/gpt2exp-outputs"
            )
            + ": the job runs in a temporary copy of the project",
            2,
        )
    return output


def check_data_cache(spec: ExperimentSpec, multi_node: bool) -> None:
    """Workers read the token files that the driver wrote: on several nodes a custom cache must be absolute."""
    if not multi_node:
        return
    for v in spec.expand():
        cache = v.spec.data.cache_dir
        if cache is not None and not cache.startswith(("/", "~")):
            raise SubmitError(
                f"data.cache_dir {cache!r} is relative: workers on other nodes read the token files from it; leave it unset "
                "(the job keeps its token cache in the shared output folder) or give an absolute shared path",
                2,
            )
