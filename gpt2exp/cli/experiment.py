"""Experiments: ``validate``, ``run``, ``compare`` and ``schema``."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from gpt2exp.cli.options import Format, JsonOpt, LauncherOpt, SetOpt, SpecArg
from gpt2exp.cli.output import console, err_console, fail, print_json
from gpt2exp.errors import check_inside
from gpt2exp.spec import ExperimentSpec, load_spec

if TYPE_CHECKING:
    from gpt2exp.launch.runner import ExperimentResult


def _human(n: float) -> str:
    """A count with a metric suffix and 3 significant digits, e.g. 124M."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def validate(spec_file: SpecArg, set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """Validate a spec and print its expanded variants with their size and budget (computed from the spec: no
    model is built): parameters, FLOPs/token, KV-cache bytes/token, steps, tokens and training FLOPs."""
    spec = load_spec(spec_file, set_ or [])
    variants = spec.expand()
    t, p = spec.train, spec.parallel
    rows = [{"variant": v.name, **variant_budget(v.spec)} for v in variants]
    budget = (
        f"{t.max_steps} steps"
        if t.max_steps
        else f"{t.max_tokens:,} tokens"
        if t.max_tokens
        else f"{t.max_flops:.3g} FLOPs"
        if t.max_flops
        else f"{t.max_epochs} epochs"
    )
    if json_:
        print_json({"name": spec.name, "seeds": spec.train.run_seeds, "budget": budget, "variants": rows} | _trials(spec))
        return
    dtype = "fp32" if rows and rows[0]["kv_dtype_bytes"] == 4 else "bf16"
    table = Table(title=f"{spec.name}: {len(variants)} variant(s) × {len(spec.train.run_seeds)} seed(s)")
    columns = [  # header, key, format
        ("attention", "attention", "s"),
        ("positions", "positional", "s"),
        ("parameters", "params", ","),
        ("non-emb.", "non_embedding_params", "h"),
        ("FLOPs/token", "flops_per_token", "h"),
        (f"KV B/token ({dtype})", "kv_bytes_per_token", ","),
        ("steps", "steps", ","),
        ("tokens", "tokens", "h"),
        ("train FLOPs", "train_flops", "h"),
    ]
    table.add_column("variant")
    for header, _, fmt in columns:
        table.add_column(header, justify="left" if fmt == "s" else "right")
    cell = lambda v, fmt: "per epoch" if v is None else _human(v) if fmt == "h" else format(v, fmt)
    for r in rows:
        table.add_row(r["variant"], *(cell(r[key], fmt) for _, key, fmt in columns))
    console.print(table)
    console.print(
        f"data {spec.data.source} · {budget} · batch {t.batch_size}×{spec.model.block_size} tokens "
        f"(micro {spec.micro_batch_size} × accum {spec.grad_accum_steps} × workers {p.num_workers}) · "
        f"{p.launcher}/{p.strategy} · {'GPU' if p.use_gpu else 'CPU'}",
        highlight=False,
    )
    if trials := _trials(spec):
        sweep = trials["sweep"]
        selection, verdict = sweep["selection"], sweep["verdict"]
        console.print(
            f"sweep on Ray Tune ({spec.sweep.scheduler if spec.sweep else ''}): {len(selection)} selection trials on seed "
            f"{spec.train.run_seeds[0]} ({', '.join(selection)}), then {len(verdict)} verdict runs at each variant's chosen "
            f"setting ({', '.join(verdict)})",
            highlight=False,
            soft_wrap=True,
        )


def _trials(spec: ExperimentSpec) -> dict[str, dict[str, list[str]]]:
    """A sweep's trials by run name, ``{"sweep": {"selection": [...], "verdict": [...]}}``, or {} without a sweep."""
    if spec.sweep is None:
        return {}
    first, rest = spec.train.run_seeds[0], spec.train.run_seeds[1:]
    selection = [f"{v.name}+{setting}/seed={first}" for v, setting, _ in spec.trials()]
    verdict = [f"{v.name}/seed={seed}" for v in spec.expand() for seed in rest]
    return {"sweep": {"selection": selection, "verdict": verdict}}


def variant_budget(spec: ExperimentSpec) -> dict[str, Any]:
    """What one variant costs, from its spec: sizes, KV-cache bytes per token (in the run's precision), and
    steps, tokens and training FLOPs (None under max_epochs, which needs the data's size)."""
    from gpt2exp.launch.plan import total_steps
    from gpt2exp.model.size import flops_per_token, kv_bytes_per_token, num_params, precision_bytes

    m, t = spec.model, spec.train
    dtype_bytes = precision_bytes(t.precision, spec.parallel.use_gpu)
    steps = None if t.max_epochs else total_steps(spec, 0)
    tokens = None if steps is None else steps * t.batch_size * m.block_size
    return {
        "attention": m.attention_kind,
        "positional": m.positional,
        "params": num_params(m),
        "non_embedding_params": num_params(m, exclude_embeddings=True),
        "flops_per_token": flops_per_token(m),
        "kv_bytes_per_token": kv_bytes_per_token(m, dtype_bytes),
        "kv_dtype_bytes": dtype_bytes,
        "steps": steps,
        "tokens": tokens,
        "train_flops": None if tokens is None else tokens * flops_per_token(m),
    }


def run(
    spec_file: SpecArg,
    set_: SetOpt = None,
    launcher: LauncherOpt = None,
    output: Annotated[Path, typer.Option(help="Folder for runs, checkpoints and results.")] = Path("outputs"),
    progress: Annotated[bool, typer.Option(help="Live progress table.")] = True,
    json_: JsonOpt = False,
) -> None:
    """Train every variant of a spec and print the results table, the verdicts and where to look next."""
    from gpt2exp.launch.plan import experiment_dir
    from gpt2exp.launch.runner import run_experiment
    from gpt2exp.launch.status import FINAL

    overrides = list(set_ or []) + ([f"parallel.launcher={launcher.value}"] if launcher else [])
    spec = load_spec(spec_file, overrides)
    out = err_console if json_ else console  # --json: stdout holds the JSON alone
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks for all ranks
        out.quiet = True
        progress = False
    out_dir = experiment_dir(spec, output)
    try:
        result = run_experiment(spec, output, out, show_progress=progress)
    except KeyboardInterrupt:
        raise fail(f"interrupted: rerun the same command to resume from the last checkpoints in {out_dir}", 130) from None
    if out.quiet:
        return
    if json_:
        print_json(result.to_dict())
    else:
        _next_steps(result, spec_file, output)
    failed = [
        f"{r['variant']} (seed {r['seed']}): {r['status']}" + (f" ({r['error']})" if isinstance(r["error"], str) else "")
        for r in result.runs.to_dict("records")
        if r["status"] not in FINAL  # stopped: early, by a sweep's scheduler, is an outcome
    ]
    if failed:
        raise fail(f"{len(failed)} run(s) did not complete: {'; '.join(failed)}")


def _next_steps(result: ExperimentResult, spec_file: Path, output: Path) -> None:
    """What ``run`` ends with: where the results are, the MLflow runs, the best model's URI, the next commands."""
    console.print(f"results: {result.out_dir / 'results.csv'}", highlight=False, soft_wrap=True)
    if result.parent_run_id is None:
        return
    console.print(f"MLflow: {result.tracking_uri} · parent run {result.parent_run_id}", highlight=False, soft_wrap=True)
    for r in result.runs.to_dict("records"):
        console.print(f"  {r['variant']}/seed={r['seed']}: run {r['run_id']}", highlight=False, soft_wrap=True)
    opt = "" if output == Path("outputs") else f" --output {shlex.quote(str(output))}"
    lines = [f"gpt2exp compare {shlex.quote(str(spec_file))}{opt}", f"gpt2exp ui{opt}"]
    if (best := result.best) is not None:
        uri = result.registered or best["model_uri"]
        console.print(
            f"best: {best['variant']} (seed {best['seed']}, val loss {best['val_loss']:.4f}) · model {uri}", highlight=False
        )
        lines.append(f"gpt2exp generate --model-uri {uri}{opt} --prompt 'ROMEO:'")
    console.print("next:\n" + "\n".join(f"  {line}" for line in lines), highlight=False, markup=False, soft_wrap=True)


def compare(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment (the spec's name), or the spec YAML.", show_default=False)],
    output: Annotated[Path, typer.Option(help="The --output folder of `gpt2exp run` (holds mlflow.db).")] = Path("outputs"),
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow store (default: MLFLOW_TRACKING_URI, else OUTPUT/mlflow.db).")
    ] = None,
    format_: Annotated[Format, typer.Option("--format", "-f", help="What to print.")] = Format.table,
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
    from gpt2exp.report import comparison_table as make_table
    from gpt2exp.report import default_tracking_uri, load_runs, print_table, render, write_report

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
    if format_ is Format.table:
        print_table(console, table)
    else:
        sys.stdout.write(render(table, format_.value))
    if paths:
        (console if format_ is Format.table else err_console).print(
            f"report: {paths['html']}", highlight=False
        )  # csv/json stay clean


def schema() -> None:
    """Print the JSON Schema of experiment specs (for editor autocompletion of the YAML)."""
    sys.stdout.write(json.dumps(ExperimentSpec.model_json_schema(), indent=2) + "\n")
