"""Experiments: ``validate``, ``run``, ``compare`` and ``schema``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gpt2exp.cli.options import SetOpt, SpecArg
from gpt2exp.cli.output import console, err_console, fail
from gpt2exp.errors import check_inside
from gpt2exp.spec import ExperimentSpec, load_spec


def _human(n: float) -> str:
    """A count with a metric suffix and 3 significant digits, e.g. 124M."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


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
        results = run_experiment(spec, output, console, show_progress=progress).runs
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


def schema() -> None:
    """Print the JSON Schema of experiment specs (for editor autocompletion of the YAML)."""
    sys.stdout.write(json.dumps(ExperimentSpec.model_json_schema(), indent=2) + "\n")
