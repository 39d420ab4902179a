"""gpt2exp from Python (a script, a notebook): what ``gpt2exp run`` and ``gpt2exp compare`` do, returning values.

import gpt2exp
result = gpt2exp.run("experiments/quickstart.yaml", overrides=["train.max_steps=50"])
result.runs                 # pandas: one row per variant and seed (val_loss, run_id, model_uri, ...)
result.comparison           # the verdicts: paired differences to the baseline, Holm-corrected
gpt2exp.compare("quickstart")   # the same table again, later, from MLflow
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console

    from gpt2exp.launch.runner import ExperimentResult
    from gpt2exp.spec import ExperimentSpec


def _spec(spec: str | Path | dict[str, Any] | ExperimentSpec, overrides: list[str] | None) -> ExperimentSpec:
    import copy

    from gpt2exp.spec import ExperimentSpec, load_spec, override_and_validate

    if isinstance(spec, str | Path):
        return load_spec(spec, overrides or [])
    raw = spec.model_dump(mode="json", exclude_unset=True) if isinstance(spec, ExperimentSpec) else copy.deepcopy(spec)
    return override_and_validate(raw, overrides or [], "<python>", what="overrides")


def run(
    spec: str | Path | dict[str, Any] | ExperimentSpec,
    output: str | Path = "outputs",
    overrides: list[str] | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> ExperimentResult:
    """Train every variant and seed of ``spec`` (a YAML file, a dict as in one, or an ``ExperimentSpec``) with
    ``overrides`` (``a.b.c=value``, as ``--set``), resuming what an earlier run left; returns the runs, their
    MLflow ids and the comparison. A user mistake raises ``gpt2exp.errors.Gpt2expError`` (``SpecError`` for
    the spec), as the CLI prints it."""
    from gpt2exp.launch.runner import run_experiment

    return run_experiment(_spec(spec, overrides), Path(output), console, show_progress=progress)


def compare(
    experiment: str,
    output: str | Path = "outputs",
    tracking_uri: str | None = None,
    metric: str = "val_loss",
    baseline: str | None = None,
    parent_run_id: str | None = None,
) -> pd.DataFrame:
    """The comparison table of an experiment's latest run (or of ``parent_run_id``) from MLflow: one row per
    variant, its mean ± 95% CI over seeds, the paired difference to the baseline and the corrected verdict."""
    from gpt2exp.report import comparison_table, default_tracking_uri, load_runs

    runs = load_runs(tracking_uri or default_tracking_uri(Path(output)), experiment, parent_run_id)
    return comparison_table(runs, metric, baseline)
