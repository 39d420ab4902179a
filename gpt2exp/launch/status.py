"""Each run's outcome, kept in ``<run_dir>/status.json``: written once per attempt (by the driver, or by rank 0
of a Ray worker group), read when a rerun decides what is left to do, and gathered into the results table."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import pandas as pd

from gpt2exp.errors import one_line
from gpt2exp.training.job import Diverged, TrainJob

STATUS = "status.json"
FINAL = ("completed", "stopped")  # outcomes a rerun keeps: trained to the end, or stopped early by a sweep's scheduler
RESULT_COLUMNS = [
    "variant",
    "seed",
    "params",
    "tokens",
    "train_loss",
    "val_loss",
    "val_loss_se",
    "val_perplexity",
    "tokens_per_sec_during_training",  # the loop's tokens/s, with whatever else ran beside it (status.json: tokens_per_sec)
    "wall_s",
    "status",
    "error",
]


def read_status(job: TrainJob) -> dict[str, Any]:
    """The job's last recorded outcome ({} before its first attempt ends)."""
    path = Path(job.run_dir) / STATUS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_status(job: TrainJob, status: str, **fields: Any) -> dict[str, Any]:
    """Record a job's outcome (``completed``, ``stopped``, ``failed``, ``diverged``, ``interrupted``) and its figures."""
    record = {"experiment": job.experiment, "variant": job.variant, "seed": job.seed, "status": status, **fields}
    path = Path(job.run_dir) / STATUS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)
    return record


def outcome(job: TrainJob, summary: dict[str, Any] | None, wall_s: float, error: BaseException | None) -> dict[str, Any]:
    """Record the end of an attempt: its figures when it completed, else its status and one-line error (a
    failure's traceback goes to ``<run_dir>/error.log``)."""
    if error is None:
        assert summary is not None
        keys = ("params", "train_loss", "val_loss", "val_loss_se", "val_perplexity", "tokens_per_sec_during_training", "mfu")
        fields = {k: summary.get(k) for k in keys}
        return write_status(job, "completed", tokens=summary.get("tokens_seen"), wall_s=wall_s, **fields)
    status = "diverged" if isinstance(error, Diverged) else "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    text = str(error) or type(error).__name__
    if status == "failed":
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(job.run_dir) / "error.log").write_text("".join(traceback.format_exception(error)))
    return write_status(job, status, wall_s=wall_s, error=one_line(text))


def results_table(jobs: list[TrainJob]) -> pd.DataFrame:
    """One row per job (``RESULT_COLUMNS``), from the outcomes recorded; a job without one is ``not run``."""
    rows = [read_status(j) or {"variant": j.variant, "seed": j.seed, "status": "not run"} for j in jobs]
    return pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)
