"""The report of a comparison: its files (``report.md``, ``report.html``, ``<metric>.png``) and what goes on
the parent run in MLflow: those files, the table's headline as an MLflow table (``report/comparison.json``,
shown as a table in the UI, read back by ``MlflowClient.load_table``) and its figures as metrics per variant."""

from __future__ import annotations

import math
import posixpath
import re
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric

from gpt2exp.report.render import render, to_html
from gpt2exp.report.runs import Runs
from gpt2exp.report.sweep import selection_markdown, split_sweep
from gpt2exp.report.table import summary_frame

ARTIFACTS = "report"
TABLE = "comparison.json"
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch
MAX_NAME = 150  # of a variant within a metric key (MLflow allows 250 characters per key)


def write_report(runs: Runs, table: pd.DataFrame, out_dir: str | Path, log: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``<metric>.png`` of ``table`` under ``out_dir/report`` and
    (``log``) put the report on the parent run (:func:`log_report`). Returns ``{"markdown", "html", "plot"}`` paths."""
    paths = report_files(runs, Path(out_dir) / "report", table)
    if log:
        log_report(runs.client, runs.parent_id, table, paths)
    return paths


def report_files(runs: Runs, folder: Path, table: pd.DataFrame) -> dict[str, Path]:
    """``report.md``, ``report.html`` and ``<metric>.png`` in ``folder``: the comparison ``table`` of ``runs``
    and their curves; with ``eval.contexts``, the long-context figures too (:mod:`gpt2exp.report.context`)."""
    from gpt2exp.report.context import plot_context_figures  # matplotlib: only when a report is written
    from gpt2exp.report.plots import plot_curves

    metric = table.attrs["metric"]
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{metric.replace('/', '_')}.png"
    verdict_runs = split_sweep(runs)[0]  # a sweep: the runs at each variant's chosen setting
    plot_curves(verdict_runs, metric, png, variants=list(table.variant), table=table)
    figures = plot_context_figures(verdict_runs, folder, list(table.variant))  # eval.contexts: {} without
    selection = table.attrs.get("selection")
    md = folder / "report.md"
    md.write_text(
        f"# {runs.experiment}: comparison of variants\n\n"
        f"Parent run `{runs.parent_id}` · metric `{metric}` · baseline `{table.attrs['baseline']}`\n\n"
        f"{render(table, 'markdown')}\n![{metric} curves]({png.name})\n"
        + "".join(f"\n![{path.stem.replace('_', ' ')}]({path.name})\n" for path in figures.values())
        + (f"\n## Selection of each variant's setting\n\n{selection_markdown(selection)}" if selection else "")
    )
    page = folder / "report.html"
    page.write_text(to_html(table, png, list(figures.values())))
    return {"markdown": md, "html": page, "plot": png, **figures}


def log_report(
    client: MlflowClient, run_id: str, table: pd.DataFrame, paths: dict[str, Path], artifact_path: str = ARTIFACTS
) -> None:
    """Put the report on ``run_id``: the files under ``artifact_path``, the table's headline as people read it
    (:func:`summary_frame`) as ``<artifact_path>/comparison.json`` and :func:`headline_metrics` at step 0."""
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path)
    log_table(client, run_id, summary_frame(table), f"{artifact_path}/{TABLE}")
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in headline_metrics(table).items()]
    for i in range(0, len(metrics), MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_BATCH])


def log_table(client: MlflowClient, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
    """``client.log_table``, except that a table logged before is replaced, not appended to (MLflow appends the
    rows to an existing one: a report written again would list every variant twice)."""
    folder = posixpath.dirname(artifact_file) or None
    if artifact_file not in {f.path for f in client.list_artifacts(run_id, folder)}:
        with warnings.catch_warnings():  # MLflow's own select_dtypes("object") call, deprecated by pandas 3
            warnings.filterwarnings("ignore", message=".*select_dtypes")
            client.log_table(run_id, data=frame, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the same file log_table writes, over the old one
        path = Path(tmp) / posixpath.basename(artifact_file)
        frame.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path), folder)


def headline_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Per variant ``<metric>_mean/<variant>`` (final value, mean over seeds), ``delta_<metric>/<variant>`` and,
    where there is one, ``delta_<metric>_ci95/<variant>`` and ``p_holm/<variant>``: the table's own numbers,
    NaN left out. Variant names are made valid metric keys by :func:`metric_names`."""
    metric = table.attrs["metric"]
    columns = {
        f"{metric}_mean": f"final_{metric}",
        f"delta_{metric}": "delta",
        f"delta_{metric}_ci95": "delta_ci95",
        "p_holm": "p_adjusted",
    }
    out = {}
    for name, (_, row) in zip(metric_names(list(table.variant)), table.iterrows(), strict=True):
        for key, column in columns.items():
            value = row.get(column)
            if value is not None and not math.isnan(value):
                out[f"{key}/{name}"] = float(value)
    return out


def metric_names(variants: list[str]) -> list[str]:
    """Each variant as the last part of an MLflow metric key: characters MLflow refuses (``, = +``, which grid
    variant names hold) become ``_``, and a name that would then repeat another gets ``_2``, ``_3``, ..."""
    out: list[str] = []
    for variant in variants:
        name = re.sub(r"[^\w.\- /]", "_", variant)[:MAX_NAME]
        if posixpath.normpath(name) != name:  # MLflow refuses keys that read as another path ("a//b", "a/")
            name = name.replace("/", "_")
        base, n = name, 1
        while name in out:
            n += 1
            name = f"{base}_{n}"
        out.append(name)
    return out
