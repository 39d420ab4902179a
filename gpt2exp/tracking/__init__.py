"""MLflow tracking: runs of an experiment, worker-side logging, logged models and loading them."""
