"""The ``gpt2exp`` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from gpt2exp.errors import check_inside, describe, printable
from gpt2exp.pipeline.spec import PipelineSpec, load_pipeline
from gpt2exp.spec import ExperimentSpec, SpecError, load_spec

console = Console() if sys.stdout.isatty() else Console(width=160)  # piped output: no truncated tables
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


class OneErrorPath(TyperGroup):
    """The top-level group: whatever a command raises ends as ``error: ...`` (a bad spec: its
    ``FILE: path: reason`` lines) and exit code 1 or 2 (see ``gpt2exp.errors.describe``), Ctrl-C as
    one line and exit code 130; a traceback only with ``GPT2EXP_DEBUG=1``."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as e:
            if type(e).__module__.split(".")[0] in ("typer", "click") or os.environ.get("GPT2EXP_DEBUG") == "1":
                raise  # exits and usage errors are Typer's to handle; debugging: the traceback
            if isinstance(e, SpecError):
                for line in e.lines():
                    err_console.print(printable(line), highlight=False, soft_wrap=True, markup=False)
                raise typer.Exit(e.code) from None
            raise fail(*describe(e)) from None


app = typer.Typer(cls=OneErrorPath, no_args_is_help=True, add_completion=False, help="Compare GPT-2 variants from one YAML spec.")

SpecArg = Annotated[Path, typer.Argument(help="Experiment spec (YAML).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a field: a.b.c=value (repeatable).")]


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


@app.command()
def validate(spec_file: SpecArg, set_: SetOpt = None) -> None:
    """Validate a spec and print its expanded variants (sizes computed from the spec: no model is built)."""
    from gpt2exp.model.size import flops_per_token, num_params

    spec = load_spec(spec_file, set_ or [])
    variants = spec.expand()
    table = Table(title=f"{spec.name}: {len(variants)} variant(s) × {len(spec.train.run_seeds)} seed(s)")
    for col in ("variant", "attention", "positions", "parameters", "FLOPs/token"):
        table.add_column(col, justify="right" if col in ("parameters", "FLOPs/token") else "left")
    for v in variants:
        m = v.spec.model
        table.add_row(v.name, m.attention_kind, m.positional, f"{num_params(m):,}", _human(flops_per_token(m)))
    console.print(table)
    t, p = spec.train, spec.parallel
    budget = f"{t.max_steps} steps" if t.max_steps else f"{t.max_tokens:,} tokens" if t.max_tokens else f"{t.max_epochs} epochs"
    console.print(
        f"data {spec.data.source} · {budget} · batch {t.batch_size}×{spec.model.block_size} tokens "
        f"(micro {spec.micro_batch_size} × accum {spec.grad_accum_steps} × workers {p.num_workers}) · "
        f"{p.launcher}/{p.strategy} · {'GPU' if p.use_gpu else 'CPU'}",
        highlight=False,
    )


@app.command()
def run(
    spec_file: SpecArg,
    set_: SetOpt = None,
    launcher: Annotated[str | None, typer.Option(help="local or ray (default: the spec's parallel.launcher).")] = None,
    output: Annotated[Path, typer.Option(help="Folder for runs, checkpoints and results.")] = Path("outputs"),
    progress: Annotated[bool, typer.Option(help="Live progress table.")] = True,
) -> None:
    """Train every variant of a spec and print the results table."""
    from gpt2exp.launch.plan import experiment_dir
    from gpt2exp.launch.runner import run_experiment

    overrides = list(set_ or []) + ([f"parallel.launcher={launcher}"] if launcher else [])
    spec = load_spec(spec_file, overrides)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks for all ranks
        console.quiet = True
        progress = False
    out_dir = experiment_dir(spec, output)
    try:
        _, results = run_experiment(spec, output, console, show_progress=progress)
    except KeyboardInterrupt:
        raise fail(f"interrupted: rerun the same command to resume from the last checkpoints in {out_dir}", 130) from None
    console.print(f"results: {out_dir / 'results.csv'}")
    failed = [
        f"{r.variant} (seed {r.seed}): {r.status}" + (f" ({r.error})" if isinstance(r.error, str) else "")
        for r in results.itertuples()
        if r.status != "completed"
    ]
    if failed:
        raise fail(f"{len(failed)} run(s) did not complete: {'; '.join(failed)}")


@app.command()
def compare(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment (the spec's name), or the spec YAML.", show_default=False)],
    output: Annotated[Path, typer.Option(help="The --output folder of `gpt2exp run` (holds mlflow.db).")] = Path("outputs"),
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store (default: MLFLOW_TRACKING_URI, else OUTPUT/mlflow.db).")
    ] = None,
    format_: Annotated[str, typer.Option("--format", "-f", help="table, markdown, csv or json.")] = "table",
    metric: Annotated[str, typer.Option(help="Metric compared (final and best value).")] = "val_loss",
    baseline: Annotated[
        str | None, typer.Option(help="Variant compared to (default: the spec's baseline, else the first).")
    ] = None,
    run_id: Annotated[str | None, typer.Option(help="Parent run (default: the experiment's latest).")] = None,
    include_unfinished: Annotated[bool, typer.Option(help="Also use runs that failed, were killed or still run.")] = False,
    report: Annotated[
        bool, typer.Option(help="Also write report.md/.html/.png under OUTPUT/EXPERIMENT/report and log them on the parent run.")
    ] = False,
) -> None:
    """Compare the variants of an experiment from MLflow: one row per variant, mean ± 95% CI over seeds."""
    from gpt2exp.report import FORMATS, default_tracking_uri, load_runs, print_table, render, write_report
    from gpt2exp.report import comparison_table as make_table

    if format_ not in FORMATS:
        raise fail(f"--format {format_!r}: use one of {', '.join(FORMATS)}", 2)
    name, folder = experiment, output / experiment
    if experiment.endswith((".yaml", ".yml")) and Path(experiment).is_file():
        from gpt2exp.tracking.runs import tracking_uri as spec_tracking_uri

        spec = load_spec(experiment)
        name, folder = spec.tracking.experiment_name or spec.name, output / spec.name
        tracking_uri = tracking_uri or spec_tracking_uri(spec, output)
    uri = tracking_uri or default_tracking_uri(output)
    runs = load_runs(uri, name, run_id)
    table = make_table(runs, metric, baseline, finished_only=not include_unfinished)
    paths = write_report(runs, table, check_inside(output, folder)) if report else None
    if format_ == "table":
        print_table(console, table)
    else:
        sys.stdout.write(render(table, format_))
    if paths:
        (console if format_ == "table" else err_console).print(f"report: {paths['html']}", highlight=False)  # csv/json stay clean


@app.command()
def schema() -> None:
    """Print the JSON Schema of experiment specs (for editor autocompletion of the YAML)."""
    sys.stdout.write(json.dumps(ExperimentSpec.model_json_schema(), indent=2) + "\n")


ModelUriOpt = Annotated[
    str | None, typer.Option("--model-uri", help="runs:/<id>/model, models:/<name>@best, models:/<model_id>, or a model folder.")
]


OutputOpt = Annotated[Path, typer.Option(help="The project's output folder (its MLflow store: <output>/mlflow.db).")]
TrackingUriOpt = Annotated[
    str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the output folder's store).")
]


def use_store(output: Path, tracking_uri: str | None) -> str:
    """Point MLflow at --tracking-uri, else MLFLOW_TRACKING_URI, else the project's SQLite store."""
    import mlflow

    from gpt2exp.tracking.runs import store_uri
    from gpt2exp.tracking.store import check_store

    uri = store_uri(output, tracking_uri)
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def open_model(
    model_uri: str | None, pretrained: str | None = None, output: Path = Path("outputs"), tracking_uri: str | None = None
):  # noqa: ANN201, RUF100
    """The model to use, from an MLflow URI / folder or imported Hugging Face weights; one-line errors."""
    from gpt2exp.data import get_tokenizer
    from gpt2exp.model import GPT

    if (model_uri is None) == (pretrained is None):
        raise fail("give exactly one model: --model-uri URI or --pretrained PATH_OR_NAME")
    try:
        if pretrained is not None:
            return GPT.from_pretrained(pretrained).eval(), get_tokenizer()
        from mlflow.exceptions import MlflowException

        from gpt2exp.tracking.pyfunc import load_model

        if ":/" in model_uri:
            use_store(output, tracking_uri)
        try:
            return load_model(model_uri)
        except MlflowException as e:
            raise ValueError(f"{model_uri}: {e.message.splitlines()[0]}") from None
    except (FileNotFoundError, ValueError, OSError) as e:
        raise fail(str(e)) from None


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "\n",
    model_uri: ModelUriOpt = None,
    pretrained: Annotated[str | None, typer.Option(help="Hugging Face GPT-2 folder or hub name (gpt2, ...).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 100,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1)] = 200,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    seed: Annotated[int, typer.Option()] = 1337,
    output: OutputOpt = Path("outputs"),
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Generate text from a model, streaming tokens to the terminal."""
    import torch

    from gpt2exp.data import EOT

    model, enc = open_model(model_uri, pretrained, output, tracking_uri)
    idx = torch.tensor([enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]])  # "": from a document start
    gen = torch.Generator().manual_seed(seed)
    sys.stdout.write(prompt)
    new: list[int] = []
    shown = 0
    for tok in model.stream(idx, max_new_tokens, temperature, top_k, top_p, eos=EOT, generator=gen):
        if tok.item() == EOT:
            break
        new.append(tok.item())
        text = enc.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write(enc.decode(new)[shown:] + "\n")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="A text file, folder or glob to score.")],
    model_uri: ModelUriOpt = None,
    pretrained: Annotated[str | None, typer.Option(help="Hugging Face GPT-2 folder or hub name.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Score at most this many tokens.")] = 1_000_000,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    output: OutputOpt = Path("outputs"),
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Score new text with a model: loss, perplexity and tokens, same tokenizer and block size."""
    import math

    from gpt2exp.training.evaluate import score_files

    model, enc = open_model(model_uri, pretrained, output, tracking_uri)
    loss, n_tokens = score_files(model, enc, str(data), max_tokens, batch_size)
    console.print(
        f"loss {loss:.4f} · perplexity {math.exp(loss):.2f} · {n_tokens:,} tokens scored (block {model.spec.block_size})"
    )


@app.command()
def ui(
    output: OutputOpt = Path("outputs"),
    tracking_uri: TrackingUriOpt = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 5000,
    host: Annotated[
        str, typer.Option(help="Address to listen on (MLflow refuses Host headers that are not local or private).")
    ] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the UI in the default web browser.")] = False,
) -> None:
    """Serve the MLflow UI over the project's store (one worker, this machine only) until Ctrl-C."""
    from gpt2exp.tracking.runs import project_store, store_uri
    from gpt2exp.tracking.ui import serve_ui

    own, uri = project_store(output), store_uri(output, tracking_uri)
    code = serve_ui(uri, output / "mlartifacts" if uri == own else None, host=host, port=port, open_browser=open_browser)
    raise typer.Exit(code)


# ------------------------------------------------------------------------ Ray Jobs: submit, jobs
AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="The cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS).",
        show_default=False,
    ),
]
JobIdArg = Annotated[str, typer.Argument(help="Submission id (`gpt2exp jobs list` shows them).", show_default=False)]


def note(text: str) -> None:
    err_console.print(text, highlight=False, markup=False, soft_wrap=True)


ClusterOutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="Output folder as the cluster sees it (several nodes: an absolute path on a shared filesystem). "
        "Default: ./outputs, when the cluster runs on this machine.",
        show_default=False,
    ),
]
FollowOpt = Annotated[bool, typer.Option("--follow", "-f", help="Stream the job's logs and exit with its final status.")]
WorkingDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Project folder to upload (default: the current one; .gitignore and .rayignore apply).", show_default=False
    ),
]
ExcludeOpt = Annotated[list[str] | None, typer.Option(help="Also leave out these paths (gitignore patterns, repeatable).")]
AutoscalingOpt = Annotated[
    bool, typer.Option(help="The cluster adds nodes on demand: multi-node rules apply, the resource check is skipped.")
]
SubmissionIdOpt = Annotated[str | None, typer.Option(help="Job id (default: gpt2exp-<name>-<UTC time>).", show_default=False)]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="List the files that would be uploaded and the entrypoint; contact no one.")
]


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


@app.command()
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
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(
    address: AddressOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Also the jobs that gpt2exp did not submit.")] = False,
) -> None:
    """The cluster's gpt2exp jobs, oldest first."""
    from gpt2exp.jobs.connection import connect
    from gpt2exp.jobs.follow import jobs_table, list_jobs

    console.print(jobs_table(list_jobs(connect(address), all_)))


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


pipeline_app = typer.Typer(
    no_args_is_help=True, help="Multi-stage pipelines (pipelines/*.yaml): prepare, run, compare, register, generate, export."
)
app.add_typer(pipeline_app, name="pipeline")
PipelineArg = Annotated[Path, typer.Argument(help="Pipeline file (YAML).", show_default=False)]


FromOpt = Annotated[str | None, typer.Option("--from", help="Rerun this stage and every stage after it.", show_default=False)]
NewOpt = Annotated[bool, typer.Option("--new", help="Start a new pipeline run instead of continuing the latest.")]


def check_from(pipeline: PipelineSpec, from_: str | None, path: Path) -> None:
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
    launcher: Annotated[str | None, typer.Option(help="local or ray for every run stage (default: each spec's).")] = None,
    progress: Annotated[bool, typer.Option(help="Live progress of the run stages.")] = True,
) -> None:
    """Run a pipeline's stages in order; a rerun skips the stages that are done and resumes the others."""
    from gpt2exp.pipeline.runner import PipelineError, run_pipeline

    if launcher not in (None, "local", "ray"):
        raise fail(f"--launcher {launcher!r}: use local or ray", 2)
    pipeline = load_pipeline(pipeline_file)
    check_from(pipeline, from_, pipeline_file)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `jobs stop`, `kill`: record the stage as interrupted
    try:
        run_pipeline(pipeline, output, start_from=from_, new=new, launcher=launcher, console=console, show_progress=progress)
    except PipelineError as e:
        raise fail(f"{e}; fix it and rerun the same command to continue from this stage") from None
    except KeyboardInterrupt:
        raise fail("interrupted: rerun the same command to continue where the pipeline stopped", 130) from None


@pipeline_app.command("status")
def pipeline_status(
    pipeline_file: PipelineArg,
    output: OutputOpt = Path("outputs"),
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Validate a pipeline and show its stages' state from its latest MLflow run."""
    from gpt2exp.pipeline.runner import status_table
    from gpt2exp.pipeline.state import PipelineRun
    from gpt2exp.tracking.runs import store_uri
    from gpt2exp.tracking.store import sqlite_path

    pipeline = load_pipeline(pipeline_file)
    uri = store_uri(output, tracking_uri or pipeline.tracking_uri)
    stored = (db := sqlite_path(uri)) is None or db.is_file()
    console.print(status_table(pipeline, PipelineRun.find(uri, pipeline.name) if stored else None))


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


def main() -> None:
    """The ``gpt2exp`` command (also ``python -m gpt2exp.cli``); errors go through ``OneErrorPath``."""
    app()


if __name__ == "__main__":
    main()
