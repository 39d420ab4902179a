"""Sweeps on Ray Tune: every variant is compared at its own best setting (say, its own learning rate).

Two phases, so that the selection never sees the seeds of the verdict:

1. selection: every variant x setting on the first seed, as Tune trials (with ``scheduler: asha``, ASHA stops a
   variant's poor settings early; a variant's settings compete only with each other). A stopped trial is recorded
   ``stopped``, never taken for finished.
2. verdict: each variant at the setting whose completed trial has the lowest final validation loss, on the other
   seeds (paired: same data, same init per seed), as Tune trials too; the comparison is made over these.

A trial is one job on one worker: the worker loop runs inside the trial, its checkpoints in the run folder as with
the local launcher, and it reports each evaluation to Tune once it is stored in MLflow. A rerun skips the trials
recorded ``completed`` or ``stopped`` and resumes the others from their checkpoints. This module is the driver's
side; ``tune_worker`` is the trials'."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.experiment import Trial as TuneTrial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.stopper import Stopper

from gpt2exp import env
from gpt2exp.errors import check_inside
from gpt2exp.launch.cluster import Background, ensure_ray, shutdown_under
from gpt2exp.launch.plan import Plan
from gpt2exp.launch.progress import Recorder
from gpt2exp.launch.ray import ProgressBus
from gpt2exp.launch.status import FINAL, outcome, read_status, write_status
from gpt2exp.spec import ParallelSpec
from gpt2exp.spec.sweep import SweepSpec
from gpt2exp.training.job import TrainJob


def run_sweep(plan: Plan, recorder: Recorder, track: Callable[[TrainJob], TrainJob]) -> None:
    """Run the selection trials (``plan.jobs``), choose each variant's setting, then add the verdict runs to the plan
    (``track`` gives each its MLflow run) and run them."""
    assert plan.spec.sweep is not None
    env.apply(env.RAY_TUNE)
    ensure_ray()
    bus = ProgressBus.remote()
    selection = list(plan.jobs)
    _fit(plan, selection, bus, recorder, plan.spec.sweep if plan.spec.sweep.scheduler == "asha" else None)
    verdict = [track(job) for job in verdict_jobs(plan.out_dir, selection, plan.spec.train.run_seeds[1:])]
    for job in verdict:
        recorder.add(job)
        recorder.status(job.key, "done (earlier)" if read_status(job).get("status") in FINAL else "pending")
    plan.jobs += verdict
    _fit(plan, verdict, bus, recorder, None)


def chosen(selection: list[TrainJob]) -> dict[str, TrainJob]:
    """Each variant's selection trial with the lowest final validation loss among its completed ones."""
    best: dict[str, tuple[float, TrainJob]] = {}
    for job in selection:
        assert job.trial is not None
        record = read_status(job)
        loss = record.get("val_loss") if record.get("status") == "completed" else None
        if loss is not None and loss < best.get(job.trial.variant, (math.inf, job))[0]:
            best[job.trial.variant] = (loss, job)
    return {variant: job for variant, (_, job) in best.items()}


def verdict_jobs(out_dir: Path, selection: list[TrainJob], seeds: list[int]) -> list[TrainJob]:
    """Each variant's chosen setting on ``seeds``, beside its selection trial: ``runs/<variant>/<setting>/seed_<N>``."""
    return [
        replace(
            job,
            seed=seed,
            run_dir=str(check_inside(out_dir, Path(job.run_dir).parent / f"seed_{seed}")),
            tracking=None,
            trial=replace(job.trial, phase="verdict"),
        )
        for job in chosen(selection).values()
        if job.trial is not None
        for seed in seeds
    ]


class PerVariant(FIFOScheduler):
    """ASHA within each variant: a variant's settings compete with each other only. (One ASHA over all trials would
    stop every setting of a variant that is worse at its best than the others, and leave it nothing to compare.)"""

    def __init__(self, variant_of: dict[str, str], make: Callable[[str], ASHAScheduler]) -> None:
        super().__init__()
        self.variant_of, self.make, self.by_variant = variant_of, make, {}

    def _asha(self, trial: TuneTrial) -> ASHAScheduler:
        variant = self.variant_of[trial.config["job"]]
        if variant not in self.by_variant:
            self.by_variant[variant] = self.make(variant)
        return self.by_variant[variant]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # each ASHA has its own: val_loss, min

    def on_trial_add(self, tune_controller: Any, trial: TuneTrial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: TuneTrial, result: dict[str, Any]) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: TuneTrial, result: dict[str, Any]) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: TuneTrial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)


def _scheduler(sweep: SweepSpec | None, jobs: list[TrainJob]) -> TrialScheduler:
    """FIFO, or ASHA on validation loss per variant, its time the training step (``max_t``: the variant's budget)."""
    if sweep is None:
        return FIFOScheduler()
    variant_of = {j.key: j.trial.variant for j in jobs if j.trial is not None}
    budget = {v: max(j.total_steps for j in jobs if variant_of[j.key] == v) for v in variant_of.values()}
    grace = {j.trial.variant: sweep.grace_period or j.spec.train.eval_interval for j in jobs if j.trial is not None}

    def make(variant: str) -> ASHAScheduler:
        max_t = budget[variant]
        return ASHAScheduler(
            time_attr="step",
            metric="val_loss",
            mode="min",
            max_t=max_t,
            grace_period=min(grace[variant], max_t),
            reduction_factor=sweep.reduction_factor,
        )

    return PerVariant(variant_of, make)


def _trial(config: dict[str, Any], jobs: dict[str, TrainJob], bus: Any) -> None:
    """One trial (the trial side, with torch and the loop, is imported there only)."""
    from gpt2exp.launch.tune_worker import run_trial

    run_trial(jobs[config["job"]], bus)


def _resources(p: ParallelSpec) -> dict[str, float]:
    """A trial's: one worker's CPUs (default 1) and, on GPUs, its GPUs."""
    return {"cpu": p.cpus_per_worker or 1} | ({"gpu": p.gpus_per_worker} if p.use_gpu else {})


def _fit(plan: Plan, jobs: list[TrainJob], bus: Any, recorder: Recorder, asha: SweepSpec | None) -> None:
    """The unfinished ``jobs`` as Tune trials (:func:`_resources` each), each one's outcome
    recorded as it ends (:class:`Outcomes`)."""
    todo = {j.key: j for j in jobs if read_status(j).get("status") not in FINAL}
    if not todo:
        return
    phase = next((j.trial.phase for j in todo.values() if j.trial is not None), "trials")
    p = plan.spec.parallel
    started: dict[str, float] = {}
    stop = threading.Event()  # Ctrl-C: Tune stops every trial, and records nothing more
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, jobs=todo, bus=bus), _resources(p)),
        param_space={"job": tune.grid_search(list(todo))},
        tune_config=tune.TuneConfig(
            scheduler=_scheduler(asha, list(todo.values())),
            max_concurrent_trials=p.max_concurrent,
            # a fresh process per trial: Tune 2.60 cannot reuse the actor of a trial ASHA stopped mid-function
            # ("Trainable runner reuse requires reset_config()"), and the next trial failed with that error
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(plan.out_dir / "tune"),
            verbose=0,
            stop=StopAll(stop),
            callbacks=[Outcomes(todo, started, recorder, stop)],
        ),
    )

    def drain() -> None:
        for key, record in ray.get(bus.drain.remote()):
            if record.get("event") == "start":
                started[key] = time.perf_counter()
                recorder.status(key, "running")
            elif record.get("event") == "status":
                recorder.status(key, record["status"])
            else:
                recorder.record(key, record)

    fit = Background(tuner.fit, f"tune-{phase}")
    try:
        while not fit.ended.wait(0.25):
            drain()
        drain()
    except KeyboardInterrupt:  # stop the trials; their checkpoints stay for the rerun
        for key in started:
            if read_status(todo[key]).get("status") not in (*FINAL, "diverged"):
                outcome(todo[key], None, time.perf_counter() - started[key], KeyboardInterrupt())
        # Tune's end of the stopped experiment warns of each trial that never started: not news after a Ctrl-C
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        shutdown_under([fit], stop)
        raise
    if fit.error is not None:
        raise fit.error


class StopAll(Stopper):
    """Tune's stop of the whole experiment once ``event`` is set (the driver's Ctrl-C); no trial is stopped alone."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __getstate__(self) -> dict[str, Any]:
        return {}  # saved with the Tuner's state, never restored (see Outcomes)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.event.is_set()


class Outcomes(tune.Callback):
    """Each trial's end as it happens (in the driver): what the trial recorded itself, else ``failed`` (it raised) or
    ``stopped`` (by the scheduler, with the step and figures of its last report)."""

    def __init__(self, jobs: dict[str, TrainJob], started: dict[str, float], recorder: Recorder, stop: threading.Event) -> None:
        self.jobs, self.started, self.recorder, self.stop = jobs, started, recorder, stop

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune saves its callbacks for a Tuner.restore, which gpt2exp does not use (reruns read status files)

    def on_trial_complete(self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any) -> None:
        self._end(trial, None)

    def on_trial_error(self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any) -> None:
        self._end(trial, trial.get_error() or RuntimeError(f"trial {trial.trial_id} failed"))

    def _end(self, trial: TuneTrial, error: BaseException | None) -> None:
        job, last = self.jobs[trial.config["job"]], trial.last_result or {}
        if "outcome" in last or self.stop.is_set():  # the trial ran to its end and recorded it; or Ctrl-C did
            return
        wall = time.perf_counter() - self.started.get(job.key, time.perf_counter())
        if error is not None:
            outcome(job, None, wall, error)
            self.recorder.status(job.key, "failed")
        else:
            write_status(job, "stopped", wall_s=wall, tokens=last.get("tokens_seen"), val_loss=last.get("val_loss"))
            self.recorder.status(job.key, f"stopped early (step {last.get('step', 0)})")
