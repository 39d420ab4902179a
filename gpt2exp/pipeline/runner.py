"""Run a pipeline's stages in order, skipping what is done.

A stage is done when the pipeline run records it ``completed`` with the same fingerprint: a hash of
its resolved configuration (a run stage's effective experiment spec, a prepare stage's source files'
sizes and times) and of the outputs it uses. A stage that changed reruns, and so does every stage that
uses its outputs. A stage left ``running``, ``failed`` or ``interrupted`` continues in the same folder
(a run stage resumes its runs from their checkpoints); ``--from STAGE`` reruns that stage and all after
it in fresh folders (``<stage>.<attempt>``). Folders: ``<output>/<pipeline>/<run id[:8]>/<stage>``."""

from __future__ import annotations

import hashlib
import json
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpt2exp.errors import Gpt2expError, check_inside, one_line
from gpt2exp.lock import exclusive
from gpt2exp.pipeline.spec import AnyStage, PipelineSpec, PrepareStage, RunStage, Stage
from gpt2exp.pipeline.stages import RUNNERS, Context, StageFailed
from gpt2exp.pipeline.state import PipelineRun, StageState

MACHINE_LOCAL = frozenset({"dir", "out_dir", "file", "folder", "report"})  # outputs that name this machine's files


class PipelineError(Gpt2expError):
    """The pipeline cannot go on; the message is one line for the user."""


def _source_files(stage: PrepareStage) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of a path source's files: an edited corpus changes the fingerprint."""
    from gpt2exp.data.sources import find_files

    if stage.data.path is None:
        return []
    return [(str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in find_files(stage.data.path)]


def fingerprint(stage: Stage, outputs: dict[str, dict[str, Any]]) -> str:
    """Hash of what the stage does and of the stable parts of the outputs it uses."""
    body = stage.model_dump(mode="json")
    if isinstance(stage, RunStage):
        body.update(spec=stage.experiment.model_dump(mode="json"), set={})
    if isinstance(stage, PrepareStage):
        body["files"] = _source_files(stage)
    used = {ref: {k: v for k, v in outputs[ref].items() if k not in MACHINE_LOCAL} for ref in stage.references()}
    return hashlib.sha256(json.dumps([body, used], sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_done(stage: Stage, state: StageState | None, digest: str) -> bool:
    """Completed with this fingerprint (and, for prepare, its token folder still on this machine)."""
    if state is None or state.status != "completed" or state.fingerprint != digest:
        return False
    return not isinstance(stage, PrepareStage) or Path(state.output.get("dir", "")).is_dir()


def run_pipeline(
    pipeline: PipelineSpec,
    output: Path,
    *,
    start_from: str | None = None,
    new: bool = False,
    launcher: str | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> PipelineRun:
    """Run the stages that are not done; raise PipelineError (stage state recorded) when one fails."""
    from gpt2exp.tracking.runs import store_uri

    console = console or Console()
    names = [s.name for s in pipeline.stages]
    if start_from is not None and start_from not in names:
        raise PipelineError(f"--from {start_from}: no such stage; the stages are {', '.join(names)}")
    output = output.resolve()
    uri = store_uri(output, pipeline.tracking_uri)
    with exclusive(output / pipeline.name / ".lock"):
        run = PipelineRun.open(uri, pipeline.name, output, new=new, spec=pipeline.self_contained())
        console.print(
            f"[bold]pipeline {pipeline.name}[/]: {len(names)} stage(s) · MLflow run {run.run_id} · {uri}", highlight=False
        )
        outputs: dict[str, dict[str, Any]] = {}
        forced = False
        for i, stage in enumerate(pipeline.stages, 1):
            forced = forced or stage.name == start_from
            state = run.states.get(stage.name)
            title = f"stage {i}/{len(names)}: {stage.name} ({stage.kind})"
            try:
                digest = fingerprint(stage, outputs)
            except Exception as e:
                raise PipelineError(f"{title}: {type(e).__name__}: {e}") from None
            if not forced and is_done(stage, state, digest):
                assert state is not None
                console.print(f"[green]✓[/] {title}: done earlier", highlight=False)
                outputs[stage.name] = state.output
                continue
            resume = not forced and state is not None and state.status != "completed" and state.fingerprint == digest
            attempt = state.attempt if resume and state else (state.attempt + 1 if state else 1)
            folder = check_inside(
                output, output / pipeline.name / run.run_id[:8] / (stage.name if attempt == 1 else f"{stage.name}.{attempt}")
            )
            console.rule(f"{title}" + (" · resuming" if resume else f" · attempt {attempt}" if attempt > 1 else ""))
            ctx = Context(pipeline, output, uri, run, folder, outputs, launcher, console, show_progress)
            outputs[stage.name] = _execute(stage, ctx, run.start(stage, attempt, digest), title)
        run.finish("FINISHED")
    console.print(status_table(pipeline, run))
    return run


def _execute(stage: AnyStage, ctx: Context, state: StageState, title: str) -> dict[str, Any]:
    """One stage, its outcome recorded in the pipeline run whatever happens."""
    run = ctx.run
    try:
        out = RUNNERS[stage.kind](stage, ctx)
    except KeyboardInterrupt:
        run.end(stage.name, state, "interrupted")
        run.finish("KILLED")
        raise
    except Exception as e:
        message = str(e) if isinstance(e, StageFailed) else one_line(f"{type(e).__name__}: {e}")
        ctx.folder.mkdir(parents=True, exist_ok=True)
        (ctx.folder / "error.log").write_text("".join(traceback.format_exception(e)))
        run.end(stage.name, state, "failed", error=message)
        run.finish("FAILED")
        raise PipelineError(f"{title} failed: {message} (details: {ctx.folder / 'error.log'})") from None
    run.end(stage.name, state, "completed", out)
    return out


def stale_stages(pipeline: PipelineSpec, run: PipelineRun) -> set[str]:
    """Completed stages that the next ``pipeline run`` would redo: changed since, or using a stage that will run."""
    stale: set[str] = set()
    outputs = {name: state.output for name, state in run.states.items() if state.status == "completed"}
    for stage in pipeline.stages:
        state = run.states.get(stage.name)
        if state is None or state.status != "completed":
            continue
        if any(ref in stale or ref not in outputs for ref in stage.references()):
            stale.add(stage.name)
            continue
        try:
            changed = not is_done(stage, state, fingerprint(stage, outputs))
        except Exception:  # e.g. a data file gone: the run will say so
            changed = True
        if changed:
            stale.add(stage.name)
    return stale


def status_rows(pipeline: PipelineSpec, run: PipelineRun | None) -> list[dict[str, Any]]:
    """One record per stage: name, kind, status (``completed, will rerun`` when stale), attempt, seconds,
    error and outputs; a stage not run yet is ``pending``."""
    stale = stale_stages(pipeline, run) if run else set()
    rows = []
    for stage in pipeline.stages:
        state = run.states.get(stage.name) if run else None
        row: dict[str, Any] = {"stage": stage.name, "kind": stage.kind, "status": "pending"}
        if state is not None:
            status = f"{state.status}, will rerun" if stage.name in stale else state.status
            row |= {"status": status, "attempt": state.attempt, "seconds": state.seconds, "error": state.error}
            row["output"] = state.output
        rows.append(row)
    return rows


def status_table(pipeline: PipelineSpec, run: PipelineRun | None) -> Table:
    """:func:`status_rows` as a table, showing the outputs later stages use."""
    table = Table(title=f"pipeline {pipeline.name}" + (f" · run {run.run_id}" if run else " · not run yet"))
    for col in ("stage", "kind", "status", "attempt", "seconds", "output"):
        table.add_column(col, justify="right" if col in ("attempt", "seconds") else "left")
    for row in status_rows(pipeline, run):
        shown = {k: v for k, v in row.get("output", {}).items() if k not in MACHINE_LOCAL}
        detail = row.get("error") or ", ".join(f"{k}={v}" for k, v in shown.items())
        seconds = "" if row.get("seconds") is None else f"{row['seconds']:.1f}"
        table.add_row(row["stage"], row["kind"], row["status"], str(row.get("attempt", "")), seconds, detail)
    return table
