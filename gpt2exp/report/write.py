"""The report of a comparison: its files (``report.md``, ``report.html``, ``<metric>.png``), also put on the
parent run in MLflow."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from gpt2exp.report.render import render, to_html
from gpt2exp.report.runs import Runs

ARTIFACTS = "report"


def write_report(runs: Runs, table: pd.DataFrame, out_dir: str | Path, log: bool = True) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``<metric>.png`` of ``table`` under ``out_dir/report`` and
    (``log``) log them on the parent run under ``report/``. Returns ``{"markdown", "html", "plot"}`` paths."""
    paths = report_files(runs, Path(out_dir) / "report", table)
    if log:
        log_report(runs.client, runs.parent_id, table, paths)
    return paths


def report_files(runs: Runs, folder: Path, table: pd.DataFrame) -> dict[str, Path]:
    """``report.md``, ``report.html`` and ``<metric>.png`` in ``folder``: the comparison ``table`` of ``runs``
    and their curves."""
    from gpt2exp.report.plots import plot_curves  # matplotlib: only when a report is written

    metric = table.attrs["metric"]
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{metric.replace('/', '_')}.png"
    plot_curves(runs, metric, png, variants=list(table.variant), table=table)
    md = folder / "report.md"
    md.write_text(
        f"# {runs.experiment}: comparison of variants\n\n"
        f"Parent run `{runs.parent_id}` · metric `{metric}` · baseline `{table.attrs['baseline']}`\n\n"
        f"{render(table, 'markdown')}\n![{metric} curves]({png.name})\n"
    )
    page = folder / "report.html"
    page.write_text(to_html(table, png))
    return {"markdown": md, "html": page, "plot": png}


def log_report(
    client: MlflowClient, run_id: str, table: pd.DataFrame, paths: dict[str, Path], artifact_path: str = ARTIFACTS
) -> None:
    """Put the report's files on ``run_id`` under ``artifact_path``."""
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path)
