"""MLflow runs of an experiment: one parent run per experiment output folder, one nested child run
per variant and seed (made by the driver before any worker starts), and the worker-side logger
that rank 0 uses to write metrics, checkpoints and the final model into its child run.

A rerun of the same experiment (same output folder) continues the same runs: their ids are kept
in ``<out>/<experiment>/mlflow.json`` and ``<run_dir>/mlflow.json``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.async_logging.run_operations import RunOperations

from gpt2exp.lock import exclusive
from gpt2exp.spec import ExperimentSpec
from gpt2exp.spec.sections import split_context
from gpt2exp.tracking.store import sqlite_path
from gpt2exp.training.job import RunRef, Trial

MAX_PARAM = 6000  # MLflow's limit on a param value
METRICS = (
    "train_loss",
    "val_loss",
    "val_loss_se",
    "val_perplexity",
    "lr",
    "grad_norm",
    "tokens_per_sec_during_training",  # the loop's own: slowed by evaluation threads, other runs (see launch.bench)
    "mfu",
    "tokens_seen",
    "train_seconds",
)
IDS = "mlflow.json"
# MLflow's record of what an experiment is: "custom_model_development" is model training (runs, metrics, models),
# as opposed to GenAI (traces, evaluations). MLflow 3.17's UI takes its view from a switch kept in the browser
# instead (see gpt2exp.tracking.ui.ui_url); the tag is for the MLflow versions and tools that read it.
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE = "mlflow.note.content"  # the description MLflow's UI shows on an experiment's or run's page
SYSTEM_METRICS_INTERVAL_S = 5  # MLflow samples every 10 s by default: too few points for short runs
SAMPLING_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
VARIANT_INDEX = "gpt2exp.variant_index"  # a child run's variant's place in the spec: the report's row order
# a sweep: the parent's children are variant runs (ROLE), each holding its trials (SETTING, PHASE, STOPPED_EARLY)
ROLE, SETTING, PHASE, STOPPED_EARLY = "gpt2exp.role", "gpt2exp.setting", "gpt2exp.phase", "gpt2exp.stopped_early"
for _name in ("mlflow.store.db.utils", "mlflow.system_metrics"):  # "Creating initial ... tables", "Started monitoring"
    logging.getLogger(_name).setLevel(logging.WARNING)


def project_store(output: str | Path) -> str:
    """The project's own SQLite store: <output>/mlflow.db, as an absolute URI."""
    return f"sqlite:///{Path(output).resolve() / 'mlflow.db'}"


def store_uri(output: str | Path, explicit: str | None = None) -> str:
    """``explicit`` (a flag or the spec), else MLFLOW_TRACKING_URI, else the project's store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or project_store(output)


def tracking_uri(spec: ExperimentSpec, output: Path) -> str:
    """Where a run of ``spec`` with ``--output output`` records."""
    return store_uri(output, spec.tracking.tracking_uri)


@contextlib.contextmanager
def using(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI (and MLFLOW_TRACKING_URI, which MLflow sets with it) pointed at
    ``uri`` for the block only, so one process can drive several stores without leaking one."""
    old_uri, old_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def store_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """Held while opening a SQLite store (which creates it when new) and its experiment: ``.<db>.lock`` beside
    the database, waited for. Two processes creating one store at the same moment can break it for good."""
    db = sqlite_path(uri)
    if db is None or not db.parent.is_dir():  # a folder that is not there: SQLite says so
        return contextlib.nullcontext()
    return exclusive(db.with_name(f".{db.name}.lock"), wait=True)


def experiment_tags(description: str = "") -> dict[str, str]:
    """The experiment tags gpt2exp sets: the UI's model-training view, and the spec's description as its note."""
    return {EXPERIMENT_KIND: TRAINING_KIND} | ({NOTE: description} if description else {})


def experiment_id(client: MlflowClient, name: str, output: str | Path, description: str = "") -> str:
    """The MLflow experiment ``name``, created if new (with a SQLite store, artifacts go to ``<output>/mlartifacts``),
    with :func:`experiment_tags`. An existing experiment gets only the tags it lacks: a kind or note set in the UI stays."""
    tags = experiment_tags(description)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in tags.items():
            if key not in experiment.tags:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    local = client.tracking_uri.startswith("sqlite:")
    location = (Path(output).resolve() / "mlartifacts").as_uri() if local else None
    return client.create_experiment(name, artifact_location=location, tags=tags)


def register(uri: str, run_id: str, name: str, alias: str = "best") -> str:
    """Register the run's ``model`` under ``name``, point ``alias`` at the new version; returns the version."""
    client = MlflowClient(uri)
    found = client.search_logged_models(
        [client.get_run(run_id).info.experiment_id], f"source_run_id = '{run_id}' AND name = 'model'", max_results=1
    )
    if not found:
        raise ValueError(f"run {run_id} has no logged model named 'model' (did it finish?)")
    with using(uri):
        version = mlflow.register_model(f"models:/{found[0].model_id}", name).version
    client.set_registered_model_alias(name, alias, version)
    return str(version)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)[:MAX_PARAM]
    return out


def _git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


class ExperimentTracker:
    """Driver side: the store, the MLflow experiment, the parent run and one child run per job."""

    def __init__(self, spec: ExperimentSpec, output: Path, out_dir: Path) -> None:
        from gpt2exp import __version__

        self.uri = tracking_uri(spec, output)
        with store_lock(self.uri):  # made here, before any worker, and by one driver at a time
            self.client = MlflowClient(self.uri)
            name = spec.tracking.experiment_name or spec.name
            self.experiment_id = experiment_id(self.client, name, output, spec.description)
        self.out_dir, self.spec = out_dir, spec
        self.order = {v.name: i for i, v in enumerate(spec.expand())}
        self.tags = {"gpt2exp.experiment": spec.name, "gpt2exp.version": __version__, "host": platform.node()}
        if commit := _git_commit():
            self.tags["mlflow.source.git.commit"] = commit
        note = {NOTE: spec.description} if spec.description else {}
        self.parent_id = self._run(out_dir / IDS, spec.name, self.tags | note, None)
        self.groups: dict[str, str] = {}  # a sweep's variant -> its run
        self.client.log_dict(self.parent_id, spec.model_dump(mode="json"), "spec.yaml")

    def _run(self, ids_file: Path, name: str, tags: dict[str, str], parent: str | None) -> str:
        """The run recorded in ``ids_file`` if it still exists in this store, else a new one."""
        if ids_file.is_file():
            known = json.loads(ids_file.read_text())
            if known.get("uri") == self.uri:
                try:
                    run = self.client.get_run(known["run_id"])
                    if run.info.lifecycle_stage == "active":
                        self.client.update_run(run.info.run_id, status="RUNNING")
                        return run.info.run_id
                except MlflowException:
                    pass
        all_tags = tags | ({"mlflow.parentRunId": parent} if parent else {})
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        ids_file.parent.mkdir(parents=True, exist_ok=True)
        ids_file.write_text(json.dumps({"uri": self.uri, "run_id": run_id, "experiment_id": self.experiment_id}))
        return run_id

    def child(
        self, variant: str, seed: int, spec: ExperimentSpec, run_dir: Path, facts: dict[str, Any], trial: Trial | None = None
    ) -> RunRef:
        """The child run of one variant and seed, with its params (flattened spec + derived facts). A sweep's trial is
        nested in its variant's run (:meth:`group`) and tagged with its setting and phase."""
        tags = self.tags | {"gpt2exp.variant": variant, "gpt2exp.seed": str(seed)}
        parent, name = self.parent_id, f"{variant}/seed={seed}"
        if trial is not None:
            parent, name = self.group(trial.variant), f"{trial.variant}/{trial.setting}/seed={seed}"
            tags |= {"gpt2exp.variant": trial.variant, SETTING: trial.setting, PHASE: trial.phase}
            variant = trial.variant
        run_id = self._run(run_dir / IDS, name, tags, parent)
        if variant in self.order:  # set on a rerun too: the spec may list its variants in a new order
            self.client.set_tag(run_id, VARIANT_INDEX, str(self.order[variant]))
        if not self.client.get_run(run_id).data.params:
            params = flatten(spec.model_dump(mode="json", exclude={"variants", "grid", "sweep"})) | {
                k: str(v) for k, v in facts.items()
            }
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])
            self.client.log_dict(run_id, spec.model_dump(mode="json", exclude={"variants", "grid", "sweep"}), "spec.yaml")
        return RunRef(self.uri, run_id, self.experiment_id)

    def group(self, variant: str) -> str:
        """A sweep's run of one variant (under the parent run): its trials are nested in it."""
        if variant not in self.groups:
            tags = self.tags | {"gpt2exp.variant": variant, ROLE: "variant", VARIANT_INDEX: str(self.order[variant])}
            self.groups[variant] = self._run(self.out_dir / "runs" / variant / IDS, variant, tags, self.parent_id)
        return self.groups[variant]

    def log_dataset(self, run_id: str, source: str, key: str, n_tokens: int) -> None:
        """The training corpus as the run's dataset input: ``source`` is the run's own spec's ``kind:value`` (see
        :func:`gpt2exp.tracking.dataset.dataset_input`), ``key`` its token cache key, ``n_tokens`` its training tokens."""
        from gpt2exp.tracking.dataset import dataset_input

        self.client.log_inputs(run_id, [dataset_input(source, key, n_tokens)])
        self.client.set_tag(run_id, "gpt2exp.dataset_tokens", str(n_tokens))

    def register_best(self, candidates: dict[str, float], name: str) -> tuple[str, float]:
        """Register the ``model`` of the child run with the lowest val loss (run id -> loss) under
        ``name`` and point the alias ``best`` at it; returns (model version, its val loss)."""
        run_id = min(candidates, key=candidates.__getitem__)
        version = register(self.uri, run_id, name)
        self.client.set_tag(self.parent_id, "gpt2exp.best_run", run_id)
        return version, candidates[run_id]

    def finish(self, run_id: str, status: str) -> None:
        if status == "stopped":  # by a sweep's scheduler: KILLED, and said why
            self.client.set_tag(run_id, STOPPED_EARLY, "true")
        self.client.set_terminated(
            run_id, "FINISHED" if status == "completed" else "FAILED" if status in ("failed", "diverged") else "KILLED"
        )


@contextlib.contextmanager
def sampling_interval(seconds: float) -> Iterator[None]:
    """MLflow's system metrics sampling interval for the runs started in the block, unless the user set one
    (MLflow keeps it in an environment variable: left as it was afterwards)."""
    if os.environ.get(SAMPLING_ENV):
        yield
        return
    mlflow.set_system_metrics_sampling_interval(seconds)
    try:
        yield
    finally:
        mlflow.set_system_metrics_sampling_interval(None)


def end_status(error: BaseException | None) -> str:
    """A run's status when its logger closes, as ``with mlflow.start_run()`` sets it: FAILED on an error,
    KILLED on Ctrl-C, else FINISHED."""
    return "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


class RunLogger:
    """Worker side (rank 0): metrics batched and sent asynchronously, each step once (a resume re-runs the
    steps after its checkpoint: those already in the run are not sent again); checkpoints as MLflow logged
    models with their step and metrics, once committed; the final model as a pyfunc named ``model``.

    The child run is this thread's active MLflow run from creation to :meth:`close`: MLflow's public way
    to sample system metrics into a run (``start_run(log_system_metrics=True)``) and to log a model into it."""

    def __init__(self, ref: RunRef, system_metrics: bool = True) -> None:
        self.ref, self.client = ref, MlflowClient(ref.uri)
        # every record has a train_loss; async batches are stored in no set order, so the steps, not the last one
        self.logged = {m.step for m in self.client.get_metric_history(ref.run_id, "train_loss")}
        self.sent: list[Metric] = []  # the last record sent
        self.pending: list[RunOperations] = []  # batches sent, not yet known to be stored
        # nested: a run another caller has open in this thread stays open; system metrics resume after their last step
        with using(ref.uri), sampling_interval(SYSTEM_METRICS_INTERVAL_S):
            mlflow.start_run(run_id=ref.run_id, nested=True, log_system_metrics=system_metrics)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params known only once the model is built (logged again, unchanged, on a resume)."""
        items = [Param(k, str(v)) for k, v in params.items()]
        self.client.log_batch(self.ref.run_id, params=items, synchronous=False)

    def log(self, record: dict[str, Any]) -> None:
        """Send a step's metrics record, unless that step is in the run already."""
        step = int(record["step"])
        if step in self.logged:
            return
        now = int(time.time() * 1000)
        keys = [*METRICS, *(k for k in record if split_context(k))]  # val_loss_ctx512: eval.contexts
        self.sent = [Metric(k, float(record[k]), now, step) for k in keys if record.get(k) is not None]
        operations = self.client.log_batch(self.ref.run_id, metrics=self.sent, synchronous=False)
        assert operations is not None  # synchronous=False: the batch's pending operations
        self.pending.append(operations)
        self.logged.add(step)

    def log_series(self, key: str, values: dict[int, float]) -> None:
        """A curve over steps that are not training steps (logged again alike by a resumed run: the report keeps one per step)."""
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, int(step)) for step, v in values.items()]
        operations = self.client.log_batch(self.ref.run_id, metrics=metrics, synchronous=False)
        assert operations is not None  # synchronous=False: the batch's pending operations
        self.pending.append(operations)

    def flush(self) -> None:
        """Wait until every record sent is stored (MLflow reports one that fails): called before a checkpoint
        commits, so that a resume from it finds every step up to it in the run."""
        for operations in self.pending:
            with contextlib.suppress(MlflowException):
                operations.wait()
        self.pending.clear()

    def checkpoint(self, step: int, location: str) -> None:
        """Record a committed checkpoint (where it is stored, its step) as a logged model, and link its step's
        metrics (sent already) to it: sent again alike, they are one row of the run's history, and the model's."""
        name = f"checkpoint-{step:08d}"
        query = f"source_run_id = '{self.ref.run_id}' AND name = '{name}'"
        if self.client.search_logged_models([self.ref.experiment_id], query, max_results=1):
            return  # logged before Ray registered it, then its workers died: Ray re-ran to it
        model = self.client.create_logged_model(
            self.ref.experiment_id,
            name=name,
            source_run_id=self.ref.run_id,
            tags={"gpt2exp.checkpoint": location, "gpt2exp.step": str(step)},
            model_type="checkpoint",
        )
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id) for m in self.sent if m.step == step]
        if linked:
            self.client.log_batch(self.ref.run_id, metrics=linked, synchronous=False)

    def final_model(self, final_dir: Path, step: int) -> None:
        """Log the final model into the run (the active run: called from the thread that made the logger)."""
        from gpt2exp.tracking.pyfunc import log_gpt_model

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.ref.run_id:
            raise RuntimeError(f"RunLogger.final_model: run {self.ref.run_id} is not active in this thread")
        with using(self.ref.uri):
            log_gpt_model(final_dir, step=step)

    def close(self, status: str | None = None) -> None:
        """Store what was sent, stop the system metrics and end the run with ``status``: by default as
        :func:`end_status` of the exception being raised, if any (a ``finally`` closes it). The driver sets
        the job's status afterwards: it knows about restarts and divergence."""
        failing = sys.exc_info()[1]
        with using(self.ref.uri):  # the run's store: the default one would be a new mlflow.db in the cwd
            try:
                mlflow.flush_async_logging()
            finally:
                active = mlflow.active_run()
                if active is not None and active.info.run_id == self.ref.run_id:
                    with _store_errors_quiet(self.ref.run_id if failing is not None else None):
                        mlflow.end_run(status or end_status(failing))


@contextlib.contextmanager
def _store_errors_quiet(run_id: str | None) -> Iterator[None]:
    """While a run is failing, a store that fails too (the full disk that failed the run) must not bury the run's
    one-line error under MLflow's logged traceback: its error is dropped (the driver records the final status) and
    the run's system-metrics sampler, which ``end_run`` stops only after the store answered, is stopped here."""
    if run_id is None:
        yield
        return
    db_log = logging.getLogger("mlflow.store.db.utils")
    level, db_log.level = db_log.level, logging.CRITICAL
    try:
        yield
    except MlflowException:
        from mlflow.tracking import fluent

        if (monitor := getattr(fluent, "run_id_to_system_metrics_monitor", {}).pop(run_id, None)) is not None:
            monitor.finish()
    finally:
        db_log.setLevel(level)
