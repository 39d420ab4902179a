"""Submitting: check the cluster's rules for a payload, pack the project, send it as a Ray Job.

:func:`submit` (an experiment spec) and :func:`submit_pipeline` (a whole pipeline) build the payload, then
:func:`send` connects, plans (:func:`plan_submission`: every rule checked, all problems listed at once), packs and
submits under an id that names the experiment, ``gpt2exp-<name>-<UTC time>``; with ``follow`` it streams the
job's logs until the job ends. ``dry_run`` (:func:`show_dry_run`) contacts no one."""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from gpt2exp import env
from gpt2exp.jobs.connection import (
    Cluster,
    Node,
    Patience,
    SubmitError,
    connect,
    describe_nodes,
    job_api_error,
    ray_answer,
    resolve_address,
    to_stderr,
)
from gpt2exp.jobs.follow import follow_job, to_stdout
from gpt2exp.jobs.package import (
    PACKAGE_WARNING,
    SPEC_DIR,
    Payload,
    build_package,
    experiment_payload,
    pipeline_payload,
    project_folder,
)
from gpt2exp.jobs.rules import absolute_store, check_data_cache, check_fit, check_output, check_tracking, is_file_store

JOB_ENV_DEFAULTS = env.MLFLOW | env.RAY_TRAIN | {"PYTHONUNBUFFERED": "1"}  # unbuffered: logs reach `--follow` as written


@dataclass
class Submission:
    """What will be submitted, and why it is allowed to run on this cluster."""

    payload: Payload
    submission_id: str
    output: str
    tracking_uri: str | None
    env_vars: dict[str, str]
    entrypoint: str
    working_dir: Path
    nodes: list[Node]
    notes: list[str] = field(default_factory=list)


def new_submission_id(name: str, now: datetime | None = None) -> str:
    """``gpt2exp-<spec name>-<UTC yyyymmdd-hhmmss>``: readable, sortable, names the experiment."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"gpt2exp-{re.sub(r'[^A-Za-z0-9_-]', '-', name)}-{stamp}"


def job_env(tracking_uri: str | None, output: str, multi_node: bool, on_this_machine: bool) -> dict[str, str]:
    """The environment of the job (driver and workers): tracking, caches, Ray Train's poll interval."""
    env = dict(JOB_ENV_DEFAULTS)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if tiktoken_cache := os.environ.get("TIKTOKEN_CACHE_DIR"):  # missing there: the tokenizer falls back to its package
        env["TIKTOKEN_CACHE_DIR"] = tiktoken_cache
    if multi_node:  # the driver tokenizes, workers on every node read the token files
        env["GPT2EXP_CACHE"] = str(PurePosixPath(output) / ".token-cache")
    elif on_this_machine and os.environ.get("GPT2EXP_CACHE"):
        env["GPT2EXP_CACHE"] = os.environ["GPT2EXP_CACHE"]
    return env


def entrypoint(
    spec_in_package: str, output: str, check_shared: bool, command: Iterable[str] = ("run",), extra: Iterable[str] = ()
) -> str:
    """The job's shell command (quoted with shlex: no user text is ever interpreted by the shell).

    With ``check_shared`` the same driver process first checks that every node sees the output folder, then
    runs. One process, not ``check && run``: when a first driver of a job exits, Ray may garbage-collect the
    job's unpacked ``working_dir`` while the job still runs in it (seen with Ray 2.60: the next process
    started in a deleted folder and died loading torch)."""
    args = [*command, spec_in_package, "--launcher", "ray", "--output", output, "--no-progress", *extra]
    if not check_shared:
        return shlex.join(["python", "-m", "gpt2exp.cli", *args])
    return shlex.join(["python", "-m", "gpt2exp.jobs.checked_run", output, *args])


def plan_submission(
    cluster: Cluster,
    payload: Payload,
    output: str | os.PathLike[str] | None = None,
    working_dir: Path | None = None,
    autoscaling: bool = False,
    submission_id: str | None = None,
    patience: Patience | None = None,
) -> Submission:
    """Check the cluster rules for the payload; everything that will be submitted, nothing sent yet. A head that
    lists no alive node yet (it is starting) is waited for (``patience``)."""
    folder = project_folder(working_dir)
    patience = patience or Patience(cluster.address)
    while not (nodes := cluster.nodes()):
        if not patience.wait("it lists no alive node yet"):
            raise SubmitError(f"the Ray cluster at {cluster.address} has no alive nodes")
    multi_node = len(nodes) > 1 or autoscaling
    here = cluster.on_this_machine(nodes)
    uri = (payload.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) if payload.tracking else None
    problems: list[SubmitError] = []  # every rule is checked: one submission attempt shows all that is wrong

    def rule(check: Callable[..., Any], *args: Any) -> Any:
        try:
            return check(*args)
        except SubmitError as e:
            if e.message not in [p.message for p in problems]:
                problems.append(e)
            return None

    out = rule(check_output, None if output is None else str(output), multi_node, here)
    if payload.tracking:
        uri = rule(absolute_store, uri, here) or uri
        rule(check_tracking, uri, multi_node)
    notes = []
    if autoscaling:
        notes.append("autoscaling cluster: the resource check is left to Ray (workers wait for nodes to join)")
    for spec in payload.experiments:
        rule(check_data_cache, spec, multi_node)
        if not autoscaling:
            rule(check_fit, spec, nodes)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        where = f"the Ray cluster at {cluster.address} ({describe_nodes(nodes)})"
        raise SubmitError(f"{len(problems)} problems with {where}:\n" + "\n".join(f"  - {p.message}" for p in problems), 2)
    if payload.tracking and uri is None:
        notes.append(
            f"MLflow: SQLite in {out}/mlflow.db on the head node (pass tracking.tracking_uri=http://HOST:5000 for a server)"
        )
    sid = submission_id or new_submission_id(payload.name)
    return Submission(
        payload=payload,
        submission_id=sid,
        output=out,
        tracking_uri=uri,
        env_vars=job_env(uri, out, multi_node, here),
        entrypoint=entrypoint(f"{SPEC_DIR}/{sid}.yaml", out, multi_node, payload.command, payload.extra_args),
        working_dir=folder,
        nodes=nodes,
        notes=notes,
    )


def submit(
    spec_path: Path,
    overrides: list[str] | None,
    address: str | None,
    follow: bool = False,
    output: str | os.PathLike[str] | None = None,
    **options: Any,
) -> str:
    """Submit the spec as a Ray Job and return its submission id (``options``: see :func:`send`); a bad spec
    raises its SpecError before anything is contacted."""
    return send(experiment_payload(Path(spec_path), overrides), str(spec_path), address, follow, output, **options)


def submit_pipeline(
    path: Path,
    address: str | None,
    follow: bool = False,
    output: str | os.PathLike[str] | None = None,
    extra_args: Iterable[str] = (),
    **options: Any,
) -> str:
    """Submit a whole pipeline as one Ray Job (its run stages use the Ray launcher on the cluster); a bad
    pipeline raises its SpecError before anything is contacted."""
    return send(pipeline_payload(Path(path), extra_args), str(path), address, follow, output, **options)


def send(
    payload: Payload,
    source: str,
    address: str | None,
    follow: bool = False,
    output: str | os.PathLike[str] | None = None,
    *,
    working_dir: Path | None = None,
    excludes: Iterable[str] = (),
    autoscaling: bool = False,
    submission_id: str | None = None,
    say: Callable[[str], None] = to_stderr,
    write: Callable[[str], None] | None = None,
    dry_run: bool = False,
) -> str:
    """Check the cluster, pack the project with the payload's YAML, submit; returns the submission id.

    ``say`` gets the short notes (to stderr by default); with ``follow`` the job's logs stream through ``write``
    (stdout) and a job that does not succeed raises :class:`SubmitError` with its status and error line.
    ``dry_run``: only :func:`show_dry_run`, through ``write``."""
    if dry_run:
        return show_dry_run(payload, output, working_dir, excludes, autoscaling, submission_id, write or to_stdout)
    patience = Patience(resolve_address(address), say)
    cluster = connect(address, patience)
    plan = plan_submission(cluster, payload, output, working_dir, autoscaling, submission_id, patience)
    say(f"cluster {cluster.address}: {describe_nodes(plan.nodes)}, Ray {cluster.ray_version}")
    if cluster.ray_version and cluster.ray_version.split(".")[:2] != _local_ray_version().split(".")[:2]:
        say(
            f"note: the cluster runs Ray {cluster.ray_version}, this machine {_local_ray_version()}: the job uses the cluster's Python environment"
        )
    for note in plan.notes:
        say(f"note: {note}")
    with tempfile.TemporaryDirectory(prefix="gpt2exp-submit-") as tmp:
        package = build_package(
            plan.working_dir, f"{plan.submission_id}.yaml", payload.yaml_text, Path(tmp) / "package.zip", excludes
        )
        size = package.stat().st_size
        if size >= PACKAGE_WARNING:
            say(f"note: uploading {size / 1024**2:.0f} MiB from {plan.working_dir}; add what the job does not need to .rayignore")
        metadata = {
            "gpt2exp.experiment": payload.name,
            "gpt2exp.spec": source,
            "gpt2exp.output": plan.output,
            "gpt2exp.tracking_uri": plan.tracking_uri or "",
        }
        sid = _submit_job(cluster, plan, package, metadata, patience)
    say(f"submitted {sid} ({payload.name}, {payload.summary}) · output {plan.output}")
    if plan.tracking_uri and not is_file_store(plan.tracking_uri):
        say(f"MLflow: {plan.tracking_uri} (experiment {payload.mlflow_experiment})")
    if not follow:
        say(f"follow it with: gpt2exp jobs logs {sid} --follow --address {cluster.address}")
        return sid
    follow_job(cluster, sid, write=write)
    return sid


def show_dry_run(
    payload: Payload,
    output: str | os.PathLike[str] | None,
    working_dir: Path | None,
    excludes: Iterable[str],
    autoscaling: bool,
    submission_id: str | None,
    write: Callable[[str], None],
) -> str:
    """What :func:`send` would run and upload, contacting no one: the entrypoint (as on a cluster of one node on
    this machine; with ``autoscaling``, of several nodes) and every file of the package, built as for the job,
    with its size in bytes. Returns the submission id it would use."""
    folder = project_folder(working_dir)
    out = check_output(None if output is None else str(output), autoscaling, on_this_machine=True)
    sid = submission_id or new_submission_id(payload.name)
    command = entrypoint(f"{SPEC_DIR}/{sid}.yaml", out, autoscaling, payload.command, payload.extra_args)
    with tempfile.TemporaryDirectory(prefix="gpt2exp-submit-") as tmp:
        package = build_package(folder, f"{sid}.yaml", payload.yaml_text, Path(tmp) / "package.zip", excludes)
        with zipfile.ZipFile(package) as z:
            files = sorted((i for i in z.infolist() if not i.is_dir()), key=lambda i: i.filename)
        zipped = package.stat().st_size
    where = "several nodes" if autoscaling else "one node on this machine"
    lines = [
        f"dry run, nothing sent: job {sid} ({payload.name}, {payload.summary}) on a cluster of {where}",
        f"entrypoint: {command}",
        f"upload from {folder}: {len(files)} file(s), {sum(i.file_size for i in files):,} bytes ({zipped:,} zipped)",
        *(f"{i.file_size:>12,}  {i.filename}" for i in files),
    ]
    write("\n".join(lines) + "\n")
    return sid


def _local_ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _submit_job(cluster: Cluster, plan: Submission, package: Path, metadata: dict[str, str], patience: Patience) -> str:
    """Submit under the plan's id (``-2`` ... ``-5`` when taken); Ray's "try again later" is waited out."""
    runtime_env = {"working_dir": str(package), "env_vars": plan.env_vars}
    sid, attempt = plan.submission_id, 1
    while True:
        try:
            return cluster.client.submit_job(
                entrypoint=plan.entrypoint, submission_id=sid, runtime_env=runtime_env, metadata=metadata
            )
        except RuntimeError as e:
            if "already exists" in str(e) and attempt < 5:  # two submissions in the same second
                attempt += 1
                sid = f"{plan.submission_id}-{attempt}"
                plan.entrypoint = plan.entrypoint.replace(f"{plan.submission_id}.yaml", f"{sid}.yaml")
                with zipfile.ZipFile(package, "a") as z:
                    z.writestr(f"{SPEC_DIR}/{sid}.yaml", plan.payload.yaml_text)
                continue
            if "try again later" in str(e) and patience.wait(ray_answer(e)):
                continue
            raise job_api_error(cluster, e, "submit the job") from None
        except Exception as e:
            raise job_api_error(cluster, e, "submit the job") from None
