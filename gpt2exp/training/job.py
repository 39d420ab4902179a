"""A training job as it crosses processes: plain data, importable without torch (the driver of a
Ray run, and Ray's own processes, unpickle it without loading the model code)."""

from __future__ import annotations

from dataclasses import dataclass

from gpt2exp.errors import Gpt2expError
from gpt2exp.spec import ExperimentSpec

# figures of the interleaved speed benchmark of an experiment's final models (gpt2exp.launch.bench): MLflow metrics
# of the measured run (each variant's first seed), columns of results.csv and of the comparison
BENCH_METRICS = ("prefill_tokens_per_sec", "decode_tokens_per_sec", "decode_tokens_per_sec_b8", "train_tokens_per_sec")


@dataclass(frozen=True)
class RunRef:
    """Where rank 0 logs a job: the tracking URI and its MLflow child run (plain data: it crosses processes)."""

    uri: str
    run_id: str
    experiment_id: str


@dataclass(frozen=True)
class Trial:
    """What a job is in a sweep: a setting of a variant, tried on the first seed (selection) or run on the others at the
    variant's chosen setting (verdict)."""

    variant: str
    setting: str  # e.g. "lr=0.002"
    phase: str  # "selection" or "verdict"


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs to train one variant at one seed (plain data: it crosses processes)."""

    experiment: str
    variant: str
    seed: int
    spec: ExperimentSpec  # the variant's own spec
    train_tokens: str  # token files written by data preparation
    val_tokens: str
    run_dir: str  # this run's output folder (final weights go to <run_dir>/final)
    total_steps: int
    tracking: RunRef | None = None  # the MLflow child run that rank 0 logs into
    trial: Trial | None = None  # in a sweep: the variant and setting (``variant`` is then ``<variant>+<setting>``)

    @property
    def key(self) -> str:
        return f"{self.variant}/seed={self.seed}"


class Diverged(Gpt2expError, RuntimeError):
    """The loss or gradient became NaN/inf (a run's outcome: its siblings go on)."""
