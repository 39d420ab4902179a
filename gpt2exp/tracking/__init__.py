"""MLflow tracking: runs of an experiment, worker-side logging, logged models and loading them.

Importing any ``gpt2exp.tracking`` module runs this first, so MLflow's environment defaults below are
set before ``mlflow`` is imported (it reads the telemetry switch at import). A user's own setting wins."""

import os

for _name, _value in (
    ("MLFLOW_DISABLE_TELEMETRY", "true"),  # else every process calls an outside host
    ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true"),  # the CLI prints the URIs a user needs itself
    ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),  # one bar per artifact would bury the run's own progress
):
    os.environ.setdefault(_name, _value)
