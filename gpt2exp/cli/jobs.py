"""Ray Jobs: ``submit`` (an experiment as a Ray Job) and the ``jobs`` commands: list, status, logs, stop."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from gpt2exp.cli.options import (
    AddressOpt,
    AutoscalingOpt,
    ClusterOutputOpt,
    DryRunOpt,
    ExcludeOpt,
    FollowOpt,
    JsonOpt,
    SetOpt,
    SpecArg,
    SubmissionIdOpt,
    WorkingDirOpt,
)
from gpt2exp.cli.output import console, note, print_json

JobIdArg = Annotated[str, typer.Argument(help="Submission id (`gpt2exp jobs list` shows them).", show_default=False)]


def send_job(
    call: Callable[..., str],
    *args: Any,
    follow: bool,
    working_dir: Path | None,
    exclude: list[str] | None,
    dry_run: bool,
    **options: Any,
) -> None:
    """Submit through ``call`` (``gpt2exp.jobs.submit``), then print the id (stdout) or the final status;
    ``dry_run``: what would be uploaded and run."""
    sid = call(*args, follow=follow, working_dir=working_dir, excludes=exclude or [], say=note, dry_run=dry_run, **options)
    if dry_run:
        return
    if follow:
        console.print(f"job {sid} SUCCEEDED", highlight=False)
    else:
        print(sid)  # the bare id on stdout: ID=$(gpt2exp submit ...)


def submit(
    spec_file: SpecArg,
    set_: SetOpt = None,
    address: AddressOpt = None,
    output: ClusterOutputOpt = None,
    follow: FollowOpt = False,
    working_dir: WorkingDirOpt = None,
    exclude: ExcludeOpt = None,
    autoscaling: AutoscalingOpt = False,
    submission_id: SubmissionIdOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Run an experiment on a Ray cluster as a Ray Job: the project folder, the effective spec, its environment."""
    from gpt2exp.jobs.submit import submit as submit_job

    send_job(  # a bad spec raises its SpecError before the cluster is contacted: FILE: field: reason lines, exit 2
        submit_job,
        spec_file,
        set_,
        address,
        output=output,
        follow=follow,
        working_dir=working_dir,
        exclude=exclude,
        autoscaling=autoscaling,
        submission_id=submission_id,
        dry_run=dry_run,
    )


jobs_app = typer.Typer(no_args_is_help=True, help="Ray Jobs on a cluster (--address or RAY_ADDRESS): list, status, logs, stop.")


@jobs_app.command("list")
def jobs_list(
    address: AddressOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Also the jobs that gpt2exp did not submit.")] = False,
    json_: JsonOpt = False,
) -> None:
    """The cluster's gpt2exp jobs, oldest first."""
    from gpt2exp.jobs.connection import connect
    from gpt2exp.jobs.follow import job_rows, jobs_table, list_jobs

    jobs = list_jobs(connect(address), all_)
    if json_:
        print_json(job_rows(jobs))
    else:
        console.print(jobs_table(jobs))


@jobs_app.command("status")
def jobs_status(submission_id: JobIdArg, address: AddressOpt = None) -> None:
    """A job's status, Ray's message, and where its experiment writes."""
    from gpt2exp.jobs.connection import connect
    from gpt2exp.jobs.follow import describe_job, job_details

    for line in describe_job(job_details(connect(address), submission_id)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@jobs_app.command("logs")
def jobs_logs(
    submission_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the job ends; exit with its final status.")
    ] = False,
) -> None:
    """A job's logs (driver stdout and stderr)."""
    from gpt2exp.jobs.connection import connect
    from gpt2exp.jobs.follow import follow_job, job_logs

    cluster = connect(address)
    if follow:
        follow_job(cluster, submission_id)
        console.print(f"job {submission_id} SUCCEEDED", highlight=False)
    else:
        sys.stdout.write(job_logs(cluster, submission_id))


@jobs_app.command("stop")
def jobs_stop(submission_id: JobIdArg, address: AddressOpt = None) -> None:
    """Stop a job (its driver and Ray Train workers); finished runs and registered checkpoints stay."""
    from gpt2exp.jobs.connection import connect
    from gpt2exp.jobs.follow import stop_job

    info = stop_job(connect(address), submission_id)
    console.print(f"{submission_id}: {info.status}", highlight=False)
