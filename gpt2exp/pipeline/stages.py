"""What each kind of stage does. A stage gets its :class:`Context` (the store, its own folder, the
outputs of the stages before it) and returns its output: a small JSON-able dict of references
(MLflow run ids, model URIs, files) that later stages and reruns read from the pipeline run."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from gpt2exp.errors import Gpt2expError
from gpt2exp.pipeline.spec import (
    CompareStage,
    ExportStage,
    GenerateStage,
    PipelineSpec,
    PrepareStage,
    RegisterStage,
    RunStage,
    Stage,
    is_stage_ref,
)
from gpt2exp.pipeline.state import PipelineRun


class StageFailed(Gpt2expError):
    """A stage that could not do its work; the message is one line for the user."""


@dataclass
class Context:
    pipeline: PipelineSpec
    output: Path  # the --output folder (the project's store and token cache live there by default)
    uri: str  # MLflow tracking URI of the pipeline and of its run stages
    run: PipelineRun
    folder: Path  # this stage's own output folder
    outputs: dict[str, dict[str, Any]]  # earlier stages' outputs
    launcher: str | None  # override of the run stages' parallel.launcher
    console: Console
    show_progress: bool

    def artifact_path(self, stage: Stage) -> str:
        return f"stages/{stage.name}"


def prepare_stage(stage: PrepareStage, ctx: Context) -> dict[str, Any]:
    from gpt2exp.data import prepare

    data = prepare(stage.data, show_progress=ctx.show_progress)
    return {
        "source": stage.data.source,
        "key": data.meta["key"],
        "dir": str(data.dir),
        "train_tokens": data.n_train,
        "val_tokens": data.n_val,
    }


def run_stage(stage: RunStage, ctx: Context) -> dict[str, Any]:
    from gpt2exp.launch.runner import run_experiment
    from gpt2exp.launch.status import FINAL
    from gpt2exp.spec import set_dotted, validate_spec

    raw = stage.experiment.model_dump(mode="json", exclude_unset=True)
    set_dotted(raw, "tracking.tracking_uri", ctx.uri)
    if ctx.launcher:
        set_dotted(raw, "parallel.launcher", ctx.launcher)
    spec = validate_spec(raw, f"stage {stage.name}")
    result = run_experiment(spec, ctx.output, ctx.console, show_progress=ctx.show_progress, out_dir=ctx.folder)
    runs = result.runs
    failed = [f"{r['variant']} (seed {r['seed']}): {r['status']}" for r in runs.to_dict("records") if r["status"] not in FINAL]
    if failed:
        raise StageFailed(f"{len(failed)} of {len(runs)} run(s) did not complete: {'; '.join(failed)}")
    best = result.best
    assert result.parent_run_id is not None and best is not None  # a pipeline's runs are tracked, and all completed
    ctx.run.client.set_tag(result.parent_run_id, "gpt2exp.pipeline_run", ctx.run.run_id)
    return {
        "experiment": spec.tracking.experiment_name or spec.name,
        "parent_run_id": result.parent_run_id,
        "out_dir": str(result.out_dir),
        "runs": len(runs),
        "best_variant": best["variant"],
        "best_seed": int(best["seed"]),
        "best_val_loss": float(best["val_loss"]),
        "best_model_uri": best["model_uri"],
    }


def _runs(stage: CompareStage | RegisterStage, ctx: Context) -> Any:
    """The child runs of the referenced run stages, as one comparison."""
    from gpt2exp.report import combine_runs, load_runs

    parts = {name: load_runs(ctx.uri, ctx.outputs[name]["experiment"], ctx.outputs[name]["parent_run_id"]) for name in stage.runs}
    return combine_runs(parts)


def compare_stage(stage: CompareStage, ctx: Context) -> dict[str, Any]:
    from gpt2exp.report import comparison_table, print_table, report_files

    runs = _runs(stage, ctx)
    table = comparison_table(runs, stage.metric, stage.baseline)
    paths = report_files(runs, ctx.folder, table)
    for path in paths.values():
        ctx.run.client.log_artifact(ctx.run.run_id, str(path), ctx.artifact_path(stage))
    print_table(ctx.console, table)
    final = table[f"final_{stage.metric}"]
    winner = table.variant[final.idxmin() if table.attrs["lower_is_better"] else final.idxmax()]
    return {"report": str(paths["html"]), "artifacts": ctx.artifact_path(stage), "best_variant": winner}


def register_stage(stage: RegisterStage, ctx: Context) -> dict[str, Any]:
    from gpt2exp.report import lower_is_better, per_run
    from gpt2exp.tracking.runs import register

    per = per_run(_runs(stage, ctx), stage.metric).dropna(subset=[f"final_{stage.metric}"])
    if per.empty:
        raise StageFailed(f"no finished run of {', '.join(stage.runs)} logged {stage.metric!r}")
    per = per.sort_values(f"final_{stage.metric}", ascending=lower_is_better(stage.metric), kind="stable")
    best = per.iloc[0]
    version = register(ctx.uri, best.run_id, stage.model_name, stage.alias)
    value = float(best[f"final_{stage.metric}"])
    ctx.console.print(
        f"registered models:/{stage.model_name}@{stage.alias} (version {version}): {best.variant}, seed {best.seed}, "
        f"{stage.metric} {value:.4f}",
        highlight=False,
    )
    return {
        "model_name": stage.model_name,
        "version": version,
        "alias": stage.alias,
        "model_uri": f"models:/{stage.model_name}/{version}",
        "run_id": best.run_id,
        "variant": best.variant,
        stage.metric: value,
    }


def model_uri(ref: str, outputs: dict[str, dict[str, Any]]) -> str:
    """A model reference: a register stage's version, a run stage's best model, else the URI itself."""
    if not is_stage_ref(ref):
        return ref
    out = outputs[ref]
    return out.get("model_uri") or out["best_model_uri"]


def _load(ref: str, ctx: Context) -> tuple[str, Any, Any]:
    from gpt2exp.tracking.pyfunc import load_model
    from gpt2exp.tracking.runs import using

    uri = model_uri(ref, ctx.outputs)
    with using(ctx.uri):
        model, tokenizer = load_model(uri)
    return uri, model, tokenizer


def generate_stage(stage: GenerateStage, ctx: Context) -> dict[str, Any]:
    from gpt2exp.tracking.pyfunc import generate_text

    uri, model, tokenizer = _load(stage.model, ctx)
    samples = []
    for i, prompt in enumerate(stage.prompts):
        for k in range(stage.samples_per_prompt):
            seed = stage.seed + k
            args = (stage.max_new_tokens, stage.temperature, stage.top_k, stage.top_p, seed)
            text = generate_text(model, tokenizer, [prompt], *args)[0]
            samples.append({"prompt": prompt, "sample": k, "seed": seed, "text": text})
            ctx.console.rule(f"prompt {i + 1}, sample {k + 1}", style="dim")
            ctx.console.print(prompt + text, highlight=False, markup=False)
    ctx.folder.mkdir(parents=True, exist_ok=True)
    txt = ctx.folder / "samples.txt"
    txt.write_text(
        f"# {uri} · temperature {stage.temperature} · top_k {stage.top_k} · top_p {stage.top_p}\n\n"
        + "\n\n".join(
            f"=== prompt {s['prompt']!r} · sample {s['sample'] + 1} (seed {s['seed']}) ===\n{s['prompt']}{s['text']}"
            for s in samples
        )
        + "\n"
    )
    (ctx.folder / "samples.json").write_text(json.dumps({"model_uri": uri, "samples": samples}, indent=1))
    for path in (txt, ctx.folder / "samples.json"):
        ctx.run.client.log_artifact(ctx.run.run_id, str(path), ctx.artifact_path(stage))
    return {"model_uri": uri, "file": str(txt), "artifact": f"{ctx.artifact_path(stage)}/samples.txt", "samples": len(samples)}


def export_stage(stage: ExportStage, ctx: Context) -> dict[str, Any]:
    from gpt2exp.data.tokenizer import bpe_files

    uri, model, _ = _load(stage.model, ctx)
    folder = Path(stage.folder) if stage.folder else ctx.folder / "hf"
    try:
        model.save_pretrained(folder)
    except ValueError as e:
        raise StageFailed(f"{uri}: {e}") from None
    if files := bpe_files():  # Hugging Face's GPT-2 tokenizer files: the same BPE under its names
        vocab_bpe, encoder_json = files
        shutil.copyfile(encoder_json, folder / "vocab.json")
        shutil.copyfile(vocab_bpe, folder / "merges.txt")
    ctx.console.print(f"exported {uri} to {folder} (Hugging Face GPT-2 format)", highlight=False)
    return {"model_uri": uri, "folder": str(folder.resolve())}


RUNNERS: dict[str, Callable[[Any, Context], dict[str, Any]]] = {
    "prepare": prepare_stage,
    "run": run_stage,
    "compare": compare_stage,
    "register": register_stage,
    "generate": generate_stage,
    "export": export_stage,
}
