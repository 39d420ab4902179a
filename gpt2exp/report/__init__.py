"""Reports: compare the variants of an experiment from its MLflow runs (tables, plots, HTML/Markdown)."""

from gpt2exp.report.compare import (
    FORMATS,
    ReportError,
    Runs,
    combine_runs,
    compare,
    comparison_table,
    default_tracking_uri,
    load_runs,
    lower_is_better,
    per_run,
    print_table,
    render,
    report_files,
    rich_table,
    write_report,
)

__all__ = [
    "FORMATS",
    "ReportError",
    "Runs",
    "combine_runs",
    "compare",
    "comparison_table",
    "default_tracking_uri",
    "load_runs",
    "lower_is_better",
    "per_run",
    "print_table",
    "render",
    "report_files",
    "rich_table",
    "write_report",
]
