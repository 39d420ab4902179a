"""MLflow tracking: runs of an experiment, worker-side logging, logged models and loading them.

Importing any ``gpt2exp.tracking`` module runs this first, so MLflow's environment defaults (``gpt2exp.env``)
are set before ``mlflow`` is imported (it reads the telemetry switch at import). A user's own setting wins."""

from gpt2exp import env

env.apply(env.MLFLOW)
