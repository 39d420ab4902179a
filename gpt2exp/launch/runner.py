"""Run every job of a plan with the spec's launcher, record each outcome, and give back the results:
the table of runs (also written to ``results.csv``), their MLflow run ids and the comparison.

One failing job does not stop its siblings; finished jobs are skipped on a rerun and unfinished
ones resume from their last checkpoint."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml
from rich.console import Console

from gpt2exp.data.sources import find_files
from gpt2exp.launch.cluster import beside_ray, ensure_ray
from gpt2exp.launch.plan import Plan, experiment_dir, make_plan
from gpt2exp.launch.progress import ProgressView, Recorder
from gpt2exp.launch.status import FINAL, outcome, results_table
from gpt2exp.lock import exclusive
from gpt2exp.spec import ExperimentSpec
from gpt2exp.training.job import BENCH_METRICS, TrainJob

if TYPE_CHECKING:
    from gpt2exp.tracking.runs import ExperimentTracker


@dataclass
class ExperimentResult:
    """What running an experiment gives back."""

    spec: ExperimentSpec
    out_dir: Path  # <output>/<experiment>: checkpoints, final models, results.csv, the report
    runs: pd.DataFrame  # one row per variant and seed (RESULT_COLUMNS; with tracking also run_id, model_uri)
    tracking_uri: str | None = None
    parent_run_id: str | None = None  # the experiment's MLflow parent run
    comparison: pd.DataFrame | None = None  # the verdicts (``gpt2exp.report.comparison_table``), when one was made
    report: Path | None = None  # report.html
    registered: str | None = None  # models:/<name>@best when the spec registers the best model
    notes: list[str] = field(default_factory=list)  # why a report or registration is missing

    @property
    def completed(self) -> bool:
        return bool(self.runs.status.isin(FINAL).all())

    @property
    def best(self) -> dict[str, Any] | None:
        """The completed run with the lowest final validation loss (its row), if any."""
        done = self.runs.loc[self.runs.status == "completed"].dropna(subset=["val_loss"])
        return None if done.empty else done.sort_values("val_loss", kind="stable").iloc[0].to_dict()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the figures and references a script or notebook needs next."""
        from gpt2exp.report.render import plain

        rows = [{k: plain(v) for k, v in row.items()} for row in self.runs.to_dict("records")]
        best = self.best
        return {
            "experiment": self.spec.name,
            "out_dir": str(self.out_dir),
            "results_csv": str(self.out_dir / "results.csv"),
            "tracking_uri": self.tracking_uri,
            "parent_run_id": self.parent_run_id,
            "runs": rows,
            "best": None
            if best is None
            else {k: plain(best.get(k)) for k in ("variant", "seed", "val_loss", "run_id", "model_uri")},
            "registered": self.registered,
            "report": None if self.report is None else str(self.report),
            "comparison": None if self.comparison is None else json.loads(_comparison_json(self.comparison)),
            "notes": self.notes,
        }


def _comparison_json(table: pd.DataFrame) -> str:
    from gpt2exp.report import render

    return render(table, "json")


def run_jobs_locally(plan: Plan, view: Recorder) -> None:
    """The unfinished jobs one after another in this process (the local launcher)."""
    from gpt2exp.launch.local import run_local

    for job in plan.pending():
        view.status(job.key, "starting")
        t0, summary, error = time.perf_counter(), None, None
        try:
            summary = run_local(job, lambda record, key=job.key: view.record(key, record))
        except KeyboardInterrupt as e:
            view.status(job.key, "interrupted")
            outcome(job, None, time.perf_counter() - t0, e)
            raise
        except Exception as e:  # recorded (traceback in error.log); siblings go on
            error = e
        record = outcome(job, summary, time.perf_counter() - t0, error)
        view.status(job.key, record["status"] if record["status"] != "completed" else "done")


def run_experiment(
    spec: ExperimentSpec, output: Path, console: Console | None = None, show_progress: bool = True, out_dir: Path | None = None
) -> ExperimentResult:
    """Prepare the data and lay out the jobs (``make_plan``), then run them as ``run_plan`` does. With
    the Ray launcher, Ray starts on the main thread while the data is prepared and MLflow set up."""
    out = console or Console()
    launcher = spec.parallel.launcher
    out_dir = out_dir or experiment_dir(spec, output)

    def prepare() -> tuple[Plan, ExperimentTracker | None]:
        plan = make_plan(spec, output, show_progress=show_progress, out_dir=out_dir)
        out.print(
            f"[bold]{spec.name}[/]: {len(plan.jobs)} run(s), {len(plan.pending())} to do · output {plan.out_dir}", highlight=False
        )
        return plan, set_up(plan, launcher)

    with one_writer(out_dir):
        if launcher == "ray":  # a data path that names nothing is reported before Ray starts
            for path in {v.spec.data.path for v in spec.expand() if v.spec.data.path is not None}:
                find_files(path)
        if ray_data := any(v.spec.data.prepare_with == "ray" for v in spec.expand()):
            ensure_ray()  # Ray Data tokenizes: Ray first (a private cluster with the local launcher)
        plan, tracker = beside_ray(prepare, start=(launcher == "ray" or spec.sweep is not None) and not ray_data)
        return execute(plan, launcher, tracker, console, show_progress)


def run_plan(plan: Plan, launcher: str, console: Console | None = None, show_progress: bool = True) -> ExperimentResult:
    """Run the plan's unfinished jobs and return the results (``results.csv`` written). With the Ray
    launcher, Ray starts on the main thread while MLflow is set up."""
    with one_writer(plan.out_dir):
        start = (launcher == "ray" or plan.spec.sweep is not None) and bool(plan.pending())
        tracker = beside_ray(lambda: set_up(plan, launcher), start=start)
        return execute(plan, launcher, tracker, console, show_progress)


def one_writer(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """``<out_dir>/.lock``, held while this process runs the experiment there: another run of it is turned
    away at once, saying who holds it. Under torchrun rank 0 holds it for the whole group."""
    return exclusive(out_dir / ".lock") if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()


def set_up(plan: Plan, launcher: str) -> ExperimentTracker | None:
    """The output folder with the effective spec, the MLflow runs when tracking is on, and the
    launcher's code imported (Ray Train's import overlaps Ray's start)."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / "spec.yaml").write_text(yaml.safe_dump(plan.spec.model_dump(mode="json"), sort_keys=False))
    if launcher == "ray":
        import gpt2exp.launch.ray  # noqa: F401
    return track(plan) if plan.spec.tracking.enabled else None


def execute(
    plan: Plan, launcher: str, tracker: ExperimentTracker | None, console: Console | None, show_progress: bool
) -> ExperimentResult:
    """Run the unfinished jobs with the launcher, then close the MLflow runs and write the results
    table and the comparison report."""
    pending = plan.pending()
    view = ProgressView([j.key for j in plan.jobs], console, enabled=show_progress)
    for job in plan.jobs:
        if job not in pending:
            view.status(job.key, "done (earlier)")
    runner: Callable[[Plan, Recorder], None]
    if plan.spec.sweep is not None:  # Ray Tune: the selection trials, then the verdict runs it chooses
        from gpt2exp.launch.tune import run_sweep

        runner = functools.partial(run_sweep, track=lambda job: job if tracker is None else track_job(tracker, job))
    elif launcher == "ray":
        from gpt2exp.launch.ray import run_jobs_on_ray as runner
    else:
        runner = run_jobs_locally
    result = ExperimentResult(plan.spec, plan.out_dir, pd.DataFrame())
    costs: dict[str, tuple[str, dict[str, float]]] = {}
    try:
        with view:
            runner(plan, Recorder(plan, view))
        costs = benchmark(plan, tracker, console or Console(), result.notes)
    finally:
        result.runs = results_table(plan.jobs)
        add_cost_columns(result.runs, plan, costs)
        if tracker is not None:
            result.tracking_uri, result.parent_run_id = tracker.uri, tracker.parent_id
            result.runs["run_id"] = [j.tracking.run_id if j.tracking else None for j in plan.jobs]
            done = result.runs.status == "completed"
            result.runs["model_uri"] = [f"runs:/{r}/model" if d else None for r, d in zip(result.runs.run_id, done, strict=True)]
        result.runs.to_csv(plan.out_dir / "results.csv", index=False)
        if tracker is not None:
            finish_tracking(plan, tracker, result, console or Console())
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 speaks for all ranks
        print_results(console or Console(), result.runs)
        if tracker is not None:
            write_run_report(plan, tracker, result, console)
    return result


def benchmark(
    plan: Plan, tracker: ExperimentTracker | None, console: Console, notes: list[str]
) -> dict[str, tuple[str, dict[str, float]]]:
    """The interleaved speed benchmark of the variants' final models (``gpt2exp.launch.bench``), logged into
    each measured job's MLflow run; one that fails is a note: the training results stand."""
    rounds = plan.spec.eval.benchmark_rounds
    if rounds == 0 or int(os.environ.get("RANK", 0)) != 0:
        return {}
    from gpt2exp.launch.bench import benchmark_plan

    console.print(f"speed benchmark of the final models: {rounds} interleaved round(s)", highlight=False)
    try:
        costs = benchmark_plan(plan)
    except Exception as e:
        notes.append(f"no speed benchmark: {type(e).__name__}: {e}")
        console.print(f"[yellow]no speed benchmark:[/] {type(e).__name__}: {e}", highlight=False)
        return {}
    if tracker is not None:
        from mlflow.entities import Metric

        runs = {j.key: j.tracking.run_id for j in plan.jobs if j.tracking is not None}
        now = int(time.time() * 1000)
        for key, figures in costs.values():
            if key in runs:
                tracker.client.log_batch(runs[key], metrics=[Metric(k, v, now, 0) for k, v in figures.items()])
    return costs


def add_cost_columns(runs: pd.DataFrame, plan: Plan, costs: dict[str, tuple[str, dict[str, float]]]) -> None:
    """``kv_bytes_per_token`` of every run and the benchmark's figures on the row of the job measured."""
    from gpt2exp.model.size import run_kv_bytes_per_token

    runs["kv_bytes_per_token"] = [run_kv_bytes_per_token(j.spec) for j in plan.jobs]
    measured = dict(costs.values())  # job key -> figures
    for name in BENCH_METRICS:
        runs[name] = [measured[j.key][name] if j.key in measured else float("nan") for j in plan.jobs]


def print_results(console: Console, results: pd.DataFrame) -> None:
    """The table of runs: one row per variant and seed (the comparison of variants follows it)."""
    from rich.table import Table

    table = Table(title="runs")
    cols = ("variant", "seed", "params", "tokens", "train loss", "val loss", "± se", "perplexity", "tokens/s (training)")
    cols += ("wall s", "status")
    for col in cols:
        table.add_column(col, justify="left" if col in ("variant", "status") else "right")
    num = lambda v, f: "" if v is None or v != v else format(v, f)
    for r in results.to_dict("records"):
        table.add_row(
            str(r["variant"]),
            str(r["seed"]),
            num(r["params"], ",.0f"),
            num(r["tokens"], ",.0f"),
            num(r["train_loss"], ".4f"),
            num(r["val_loss"], ".4f"),
            num(r["val_loss_se"], ".4f"),
            num(r["val_perplexity"], ".2f"),
            num(r["tokens_per_sec_during_training"], ",.0f"),
            num(r["wall_s"], ".1f"),
            str(r["status"]),
        )
    console.print(table)


def write_run_report(plan: Plan, tracker: ExperimentTracker, result: ExperimentResult, console: Console | None) -> None:
    """Print the comparison (verdicts) and write its report (<out_dir>/report/report.md/.html/.png, logged
    on the parent run) into ``result``; a report that cannot be made is a note: the training results stand."""
    from gpt2exp.report import comparison_table, load_runs, print_table, write_report

    out = console or Console(stderr=True)
    try:
        runs = load_runs(tracker.uri, plan.spec.tracking.experiment_name or plan.spec.name, tracker.parent_id)
        table = comparison_table(runs, baseline=plan.spec.baseline)
        paths = write_report(runs, table, plan.out_dir)
    except Exception as e:  # e.g. ReportError: every run failed, or none reached an evaluation
        result.notes.append(f"no comparison report: {type(e).__name__}: {e}")
        out.print(f"[yellow]no comparison report:[/] {type(e).__name__}: {e}", highlight=False)
        return
    result.comparison, result.report = table, paths["html"]
    print_table(out, table)
    out.print(f"report: {paths['html']}", highlight=False)


def finish_tracking(plan: Plan, tracker: ExperimentTracker, result: ExperimentResult, console: Console) -> None:
    """Close the MLflow runs and register the best variant's model when the spec asks for it."""
    for job, status in zip(plan.jobs, result.runs.status, strict=True):
        if job.tracking is not None:
            tracker.finish(job.tracking.run_id, "interrupted" if status == "not run" else status)
    if (name := plan.spec.tracking.register) and (best := result.best) is not None:
        version, _ = tracker.register_best({best["run_id"]: best["val_loss"]}, name)
        result.registered = f"models:/{name}@best"
        console.print(f"registered {result.registered} (version {version}, val loss {best['val_loss']:.4f})", highlight=False)
    for run_id in tracker.groups.values():  # a sweep's variant runs
        tracker.finish(run_id, "completed" if result.completed else "failed")
    tracker.finish(tracker.parent_id, "completed" if result.completed else "failed")


def track(plan: Plan) -> ExperimentTracker:
    """Create (or find again) the MLflow runs of the plan and attach each job's run to it. The
    model's own figures (parameters, FLOPs per token) are logged by the training loop, which builds it."""
    from gpt2exp.tracking.runs import ExperimentTracker

    tracker = ExperimentTracker(plan.spec, plan.output, plan.out_dir)
    plan.jobs = [track_job(tracker, job) for job in plan.jobs]
    return tracker


def track_job(tracker: ExperimentTracker, job: TrainJob) -> TrainJob:
    """The job with its MLflow child run (created, or found again) and the run's dataset."""
    from gpt2exp.model.size import run_kv_bytes_per_token

    p = job.spec.parallel
    facts = {"world_size": p.num_workers, "device": "cuda" if p.use_gpu else "cpu"}
    facts["kv_bytes_per_token"] = run_kv_bytes_per_token(job.spec)
    ref = tracker.child(job.variant, job.seed, job.spec, Path(job.run_dir), facts, job.trial)
    data = json.loads((Path(job.train_tokens).parent / "meta.json").read_text())
    # the run's own source: the token cache is keyed by content, and its meta.json names whichever path made it
    tracker.log_dataset(ref.run_id, job.spec.data.source, data.get("key", ""), int(data["n_train_tokens"]))
    return replace(job, tracking=ref)
