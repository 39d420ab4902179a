"""The environment gpt2exp runs MLflow and Ray in: one home for the variables it sets, as defaults that a
user's own setting overrides. The driver applies them before importing either library; a Ray job and an
MLflow server get them in their environment, since they run in processes of their own."""

from __future__ import annotations

import os

MLFLOW = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # the CLI prints the URIs a user needs itself
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per artifact would bury the run's own progress
}
RAY_TRAIN = {
    # Ray Train's controller polls its workers every 2 s by default, which delays every checkpoint report and the
    # end of every run; the Train controller actor reads it too, so a Ray job sets it job-wide
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
RAY_TUNE = {"RAY_AIR_NEW_OUTPUT": "0"}  # Tune's legacy output, which verbose=0 silences (its new one prints each experiment)
RAY = RAY_TRAIN | {  # and for a private cluster on this machine: bound to 127.0.0.1, no usage reporting
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply(defaults: dict[str, str]) -> None:
    """Set each variable of ``defaults`` in this process's environment unless the user set it."""
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
