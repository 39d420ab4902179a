"""Multi-stage pipelines: prepare data → run experiments → compare → register → generate / export,
resumable, with their state in MLflow."""
