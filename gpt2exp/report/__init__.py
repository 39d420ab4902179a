"""Reports: compare the variants of an experiment from its MLflow runs (tables, plots, HTML/Markdown).

One job per module: :mod:`~gpt2exp.report.runs` reads the runs from MLflow, :mod:`~gpt2exp.report.stats`
holds the statistics, :mod:`~gpt2exp.report.table` makes the comparison table, :mod:`~gpt2exp.report.render`
writes it as text or HTML, :mod:`~gpt2exp.report.plots` draws the figure and :mod:`~gpt2exp.report.write`
writes the report's files and puts them, the table and the headline figures on the parent run."""

import gpt2exp.tracking  # noqa: F401  first: MLflow's environment defaults, set before the modules below import mlflow
from gpt2exp.report.render import FORMATS, print_table, render, rich_table
from gpt2exp.report.runs import ReportError, Runs, combine_runs, default_tracking_uri, load_runs, lower_is_better, per_run
from gpt2exp.report.table import compare, comparison_table
from gpt2exp.report.write import log_report, report_files, write_report

__all__ = [
    "FORMATS",
    "ReportError",
    "Runs",
    "combine_runs",
    "compare",
    "comparison_table",
    "default_tracking_uri",
    "load_runs",
    "log_report",
    "lower_is_better",
    "per_run",
    "print_table",
    "render",
    "report_files",
    "rich_table",
    "write_report",
]
