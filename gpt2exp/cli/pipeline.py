"""Pipelines: ``pipeline run``, ``status``, ``submit`` (as one Ray Job) and ``schema``."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from gpt2exp.cli.jobs import send_job
from gpt2exp.cli.options import (
    AddressOpt,
    AutoscalingOpt,
    ClusterOutputOpt,
    DryRunOpt,
    ExcludeOpt,
    FollowOpt,
    JsonOpt,
    Launcher,
    OutputOpt,
    SubmissionIdOpt,
    TrackingUriOpt,
    WorkingDirOpt,
)
from gpt2exp.cli.output import console, fail, print_json
from gpt2exp.pipeline.spec import PipelineSpec, load_pipeline

pipeline_app = typer.Typer(
    no_args_is_help=True, help="Multi-stage pipelines (pipelines/*.yaml): prepare, run, compare, register, generate, export."
)
PipelineArg = Annotated[Path, typer.Argument(help="Pipeline file (YAML).", show_default=False)]
FromOpt = Annotated[str | None, typer.Option("--from", help="Rerun this stage and every stage after it.", show_default=False)]
NewOpt = Annotated[bool, typer.Option("--new", help="Start a new pipeline run instead of continuing the latest.")]


def check_from(pipeline: PipelineSpec, from_: str | None, path: Path) -> None:
    """``--from STAGE`` names one of the pipeline's stages (else exit 2)."""
    if from_ is not None and from_ not in (names := [s.name for s in pipeline.stages]):
        raise fail(f"--from {from_}: {path} has no such stage; its stages are {', '.join(names)}", 2)


@pipeline_app.command("run")
def pipeline_run(
    pipeline_file: PipelineArg,
    output: Annotated[Path, typer.Option(help="Folder for the stages' outputs (and the default MLflow store).")] = Path(
        "outputs"
    ),
    from_: FromOpt = None,
    new: NewOpt = False,
    launcher: Annotated[Launcher | None, typer.Option(help="The launcher of every run stage (default: each spec's).")] = None,
    progress: Annotated[bool, typer.Option(help="Live progress of the run stages.")] = True,
) -> None:
    """Run a pipeline's stages in order; a rerun skips the stages that are done and resumes the others."""
    from gpt2exp.pipeline.runner import PipelineError, run_pipeline

    pipeline = load_pipeline(pipeline_file)
    check_from(pipeline, from_, pipeline_file)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `jobs stop`, `kill`: record the stage as interrupted
    try:
        run_pipeline(
            pipeline,
            output,
            start_from=from_,
            new=new,
            launcher=launcher and launcher.value,
            console=console,
            show_progress=progress,
        )
    except PipelineError as e:
        raise fail(f"{e}; fix it and rerun the same command to continue from this stage") from None
    except KeyboardInterrupt:
        raise fail("interrupted: rerun the same command to continue where the pipeline stopped", 130) from None


@pipeline_app.command("status")
def pipeline_status(
    pipeline_file: PipelineArg,
    output: OutputOpt = Path("outputs"),
    tracking_uri: TrackingUriOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Validate a pipeline and show its stages' state from its latest MLflow run."""
    from gpt2exp.pipeline.runner import status_rows, status_table
    from gpt2exp.pipeline.state import PipelineRun
    from gpt2exp.tracking.runs import store_uri
    from gpt2exp.tracking.store import missing_sqlite

    pipeline = load_pipeline(pipeline_file)
    uri = store_uri(output, tracking_uri or pipeline.tracking_uri)
    run = None if missing_sqlite(uri) else PipelineRun.find(uri, pipeline.name)  # no store yet: not run yet
    if json_:
        print_json({"pipeline": pipeline.name, "run_id": run.run_id if run else None, "stages": status_rows(pipeline, run)})
    else:
        console.print(status_table(pipeline, run))


@pipeline_app.command("submit")
def pipeline_submit(
    pipeline_file: PipelineArg,
    address: AddressOpt = None,
    output: ClusterOutputOpt = None,
    follow: FollowOpt = False,
    from_: FromOpt = None,
    new: NewOpt = False,
    working_dir: WorkingDirOpt = None,
    exclude: ExcludeOpt = None,
    autoscaling: AutoscalingOpt = False,
    submission_id: SubmissionIdOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Run a whole pipeline on a Ray cluster as one Ray Job (its run stages use Ray Train there)."""
    from gpt2exp.jobs.submit import submit_pipeline

    check_from(load_pipeline(pipeline_file), from_, pipeline_file)  # a bad pipeline: FILE: field: reason lines, exit 2
    send_job(
        submit_pipeline,
        pipeline_file,
        address,
        output=output,
        extra_args=[*(["--from", from_] if from_ else []), *(["--new"] if new else [])],
        follow=follow,
        working_dir=working_dir,
        exclude=exclude,
        autoscaling=autoscaling,
        submission_id=submission_id,
        dry_run=dry_run,
    )


@pipeline_app.command("schema")
def pipeline_schema() -> None:
    """Print the JSON Schema of pipeline files."""
    sys.stdout.write(json.dumps(PipelineSpec.model_json_schema(), indent=2) + "\n")
