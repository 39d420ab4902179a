"""Run every job of a plan with the spec's launcher, record each outcome, write ``results.csv``.

One failing job does not stop its siblings; finished jobs are skipped on a rerun and unfinished
ones resume from their last checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml
from rich.console import Console

if TYPE_CHECKING:
    from gpt2exp.tracking.runs import ExperimentTracker

from gpt2exp.data.sources import find_files
from gpt2exp.errors import one_line
from gpt2exp.launch.cluster import beside_ray
from gpt2exp.launch.plan import Plan, experiment_dir, make_plan, read_status, write_status
from gpt2exp.launch.progress import ProgressView
from gpt2exp.lock import exclusive
from gpt2exp.spec import ExperimentSpec
from gpt2exp.training.job import Diverged, TrainJob

METRICS = "metrics.jsonl"
RESULT_COLUMNS = [
    "variant",
    "seed",
    "params",
    "tokens",
    "train_loss",
    "val_loss",
    "val_loss_se",
    "val_perplexity",
    "tokens_per_sec",
    "wall_s",
    "status",
    "error",
]


def outcome(job: TrainJob, summary: dict[str, Any] | None, wall_s: float, error: BaseException | None) -> dict[str, Any]:
    """The status record of a finished attempt (written to the run folder)."""
    if error is None:
        assert summary is not None
        keys = ("params", "train_loss", "val_loss", "val_loss_se", "val_perplexity", "tokens_per_sec", "mfu")
        fields = {k: summary.get(k) for k in keys}
        return write_status(job, "completed", tokens=summary.get("tokens_seen"), wall_s=wall_s, **fields)
    status = "diverged" if isinstance(error, Diverged) else "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    text = str(error) or type(error).__name__
    if status == "failed":
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(job.run_dir) / "error.log").write_text("".join(traceback.format_exception(error)))
    return write_status(job, status, wall_s=wall_s, error=one_line(text))


class Recorder:
    """Where metric records go on the driver: the progress view and ``<run_dir>/metrics.jsonl``. Like the
    MLflow run, the file holds each step once: a resume re-runs the steps after its checkpoint, and those
    already written are not written again. (Under Ray a step can be missing instead: records in flight
    from the workers when the driver is killed are lost, and the steps up to the checkpoint are not re-run.)"""

    def __init__(self, plan: Plan, view: ProgressView) -> None:
        self.view, self.run_dirs = view, {j.key: Path(j.run_dir) for j in plan.jobs}
        self.steps: dict[str, set[int]] = {}
        for key, run_dir in self.run_dirs.items():
            path = run_dir / METRICS
            text = path.read_text(errors="replace") if path.is_file() else ""
            if text and not text.endswith("\n"):  # a line cut short (say, by a full disk): the next record starts afresh
                with open(path, "a") as f:
                    f.write("\n")
            self.steps[key] = {r["step"] for r in parse_records(text) if r.get("event") == "step"}

    def record(self, key: str, record: dict[str, Any]) -> None:
        self.view.record(key, record)
        if record.get("event") == "step":
            if record["step"] in self.steps[key]:
                return
            self.steps[key].add(record["step"])
        self.run_dirs[key].mkdir(parents=True, exist_ok=True)
        with open(self.run_dirs[key] / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def status(self, key: str, status: str) -> None:
        self.view.status(key, status)


def parse_records(text: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` text; a line cut short is left out."""
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def read_metrics(job: TrainJob) -> pd.DataFrame:
    """The step records of a run (one row per logged step)."""
    path = Path(job.run_dir) / METRICS
    rows = parse_records(path.read_text(errors="replace")) if path.is_file() else []
    return pd.DataFrame([r for r in rows if r.get("event") == "step"])


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
) -> tuple[Plan, pd.DataFrame]:
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
            for path in {v.spec.data.path for v in spec.expand()} - {None}:
                find_files(path)
        plan, tracker = beside_ray(prepare, start=launcher == "ray")
        return plan, execute(plan, launcher, tracker, console, show_progress)


def run_plan(plan: Plan, launcher: str, console: Console | None = None, show_progress: bool = True) -> pd.DataFrame:
    """Run the plan's unfinished jobs and return (and write) the results table. With the Ray launcher,
    Ray starts on the main thread while MLflow is set up."""
    with one_writer(plan.out_dir):
        tracker = beside_ray(lambda: set_up(plan, launcher), start=launcher == "ray" and bool(plan.pending()))
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
) -> pd.DataFrame:
    """Run the unfinished jobs with the launcher, then close the MLflow runs and write the results
    table and the comparison report."""
    pending = plan.pending()
    view = ProgressView([j.key for j in plan.jobs], console, enabled=show_progress)
    for job in plan.jobs:
        if job not in pending:
            view.status(job.key, "done (earlier)")
    runner: Callable[[Plan, Recorder], None]
    if launcher == "ray":
        from gpt2exp.launch.ray import run_jobs_on_ray as runner
    else:
        runner = run_jobs_locally
    try:
        with view:
            runner(plan, Recorder(plan, view))
    finally:
        results = write_results(plan)
        if tracker is not None:
            finish_tracking(plan, tracker, results, console or Console())
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 speaks for all ranks
        print_results(console or Console(), results)
        if tracker is not None:
            write_run_report(plan, tracker, console)
    return results


def print_results(console: Console, results: pd.DataFrame) -> None:
    """The table of runs: one row per variant and seed (the comparison of variants follows it)."""
    from rich.table import Table

    table = Table(title="runs")
    cols = ("variant", "seed", "params", "tokens", "train loss", "val loss", "± se", "perplexity", "tokens/s", "wall s", "status")
    for col in cols:
        table.add_column(col, justify="left" if col in ("variant", "status") else "right")
    num = lambda v, f: "" if v is None or v != v else format(v, f)
    for r in results.itertuples():
        table.add_row(
            str(r.variant),
            str(r.seed),
            num(r.params, ",.0f"),
            num(r.tokens, ",.0f"),
            num(r.train_loss, ".4f"),
            num(r.val_loss, ".4f"),
            num(r.val_loss_se, ".4f"),
            num(r.val_perplexity, ".2f"),
            num(r.tokens_per_sec, ",.0f"),
            num(r.wall_s, ".1f"),
            str(r.status),
        )
    console.print(table)


def write_run_report(plan: Plan, tracker: ExperimentTracker, console: Console | None) -> None:
    """Print the comparison (verdicts) and write its report (<out_dir>/report/report.md/.html/.png, logged
    on the parent run); a report that cannot be made is a warning: the training results stand."""
    from gpt2exp.report import comparison_table, load_runs, print_table, write_report

    out = console or Console(stderr=True)
    try:
        runs = load_runs(tracker.uri, plan.spec.tracking.experiment_name or plan.spec.name, tracker.parent_id)
        table = comparison_table(runs, baseline=plan.spec.baseline)
        paths = write_report(runs, table, plan.out_dir)
    except Exception as e:  # e.g. ReportError: every run failed, or none reached an evaluation
        out.print(f"[yellow]no comparison report:[/] {type(e).__name__}: {e}", highlight=False)
        return
    print_table(out, table)
    out.print(f"report: {paths['html']}", highlight=False)


def finish_tracking(plan: Plan, tracker: ExperimentTracker, results: pd.DataFrame, console: Console) -> None:
    """Close the MLflow runs and register the best variant's model when the spec asks for it."""
    for job in plan.jobs:
        if job.tracking is not None:
            tracker.finish(job.tracking.run_id, read_status(job).get("status", "interrupted"))
    done = {
        j.tracking.run_id: read_status(j)["val_loss"]
        for j in plan.jobs
        if j.tracking and read_status(j).get("status") == "completed"
    }
    if plan.spec.tracking.register and done:
        name = plan.spec.tracking.register
        version, loss = tracker.register_best(done, name)
        console.print(f"registered models:/{name}@best (version {version}, val loss {loss:.4f})")
    tracker.finish(tracker.parent_id, "completed" if (results.status == "completed").all() else "failed")


def track(plan: Plan) -> ExperimentTracker:
    """Create (or find again) the MLflow runs of the plan and attach each job's run to it. The
    model's own figures (parameters, FLOPs per token) are logged by the training loop, which builds it."""
    from gpt2exp.tracking.runs import ExperimentTracker

    tracker = ExperimentTracker(plan.spec, plan.output, plan.out_dir)
    jobs = []
    for job in plan.jobs:
        p = job.spec.parallel
        facts = {"world_size": p.num_workers, "device": "cuda" if p.use_gpu else "cpu"}
        ref = tracker.child(job.variant, job.seed, job.spec, Path(job.run_dir), facts)
        data = json.loads((Path(job.train_tokens).parent / "meta.json").read_text())
        tracker.log_dataset(ref.run_id, data["source"], data.get("key", ""), int(data["n_train_tokens"]))
        jobs.append(replace(job, tracking=ref))
    plan.jobs = jobs
    return tracker


def write_results(plan: Plan) -> pd.DataFrame:
    rows = [read_status(j) or {"variant": j.variant, "seed": j.seed, "status": "not run"} for j in plan.jobs]
    df = pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)
    df.to_csv(Path(plan.out_dir) / "results.csv", index=False)
    return df
