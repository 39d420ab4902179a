"""From a validated spec to the list of training jobs: data prepared once, one job per variant and
seed, each with its own output folder and a step budget. A job whose final weights and status
file exist is finished, and a rerun skips it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gpt2exp.data.prepare import TokenData, prepare
from gpt2exp.errors import check_inside
from gpt2exp.launch.status import FINAL, read_status
from gpt2exp.model.size import flops_per_token
from gpt2exp.spec import DataSpec, ExperimentSpec
from gpt2exp.training.job import TrainJob, Trial


@dataclass
class Plan:
    spec: ExperimentSpec
    output: Path  # the folder given to `gpt2exp run --output`
    out_dir: Path  # <output>/<experiment>
    jobs: list[TrainJob]

    def pending(self) -> list[TrainJob]:
        return [j for j in self.jobs if read_status(j).get("status") not in FINAL]


def total_steps(spec: ExperimentSpec, n_train_tokens: int) -> int:
    """The step budget from max_steps, max_tokens, max_epochs or max_flops (tokens per step = batch x
    block; FLOPs per step = that x the variant's ``flops_per_token``, so a costlier variant gets fewer steps)."""
    t = spec.train
    per_step = t.batch_size * spec.model.block_size
    if t.max_steps:
        return t.max_steps
    if t.max_tokens:
        return math.ceil(t.max_tokens / per_step)
    if t.max_flops:
        return max(1, round(t.max_flops / (flops_per_token(spec.model) * per_step)))
    assert t.max_epochs is not None  # TrainSpec requires one budget
    return max(1, math.ceil(t.max_epochs * n_train_tokens / per_step))


def experiment_dir(spec: ExperimentSpec, output: Path) -> Path:
    """Where ``gpt2exp run --output OUTPUT`` keeps an experiment: ``<output>/<experiment>``."""
    return check_inside(output, output / spec.name)


def make_plan(spec: ExperimentSpec, output: Path, show_progress: bool = True, out_dir: Path | None = None) -> Plan:
    """Prepare every distinct data source once and lay out one job per variant and seed, in
    ``out_dir`` (default ``<output>/<experiment>``)."""
    out_dir = out_dir.resolve() if out_dir else experiment_dir(spec, output)
    prepared: dict[str, TokenData] = {}

    def tokens_for(data: DataSpec) -> TokenData:
        key = data.model_dump_json()
        if key not in prepared:
            prepared[key] = prepare(data, show_progress=show_progress)
        return prepared[key]

    def job(name: str, seed: int, spec_: ExperimentSpec, files: TokenData, folder: Path, trial: Trial | None = None) -> TrainJob:
        return TrainJob(
            experiment=spec.name,
            variant=name,
            seed=seed,
            spec=spec_,
            train_tokens=str(files.path("train")),
            val_tokens=str(files.path("val")),
            run_dir=str(check_inside(out_dir, folder / f"seed_{seed}")),
            total_steps=total_steps(spec_, files.n_train),
            trial=trial,
        )

    jobs = []
    for variant in spec.expand():
        files = tokens_for(variant.spec.data)
        files.check_min_tokens(variant.spec.model.block_size)
        if spec.sweep is None:
            jobs += [
                job(variant.name, seed, variant.spec, files, out_dir / "runs" / variant.name) for seed in spec.train.run_seeds
            ]
    for variant, setting, trial_spec in spec.trials():  # a sweep: each variant's settings on the first seed
        trial, folder = Trial(variant.name, setting, "selection"), out_dir / "runs" / variant.name / setting
        jobs.append(
            job(f"{variant.name}+{setting}", spec.train.run_seeds[0], trial_spec, tokens_for(trial_spec.data), folder, trial)
        )
    return Plan(spec, output.resolve(), out_dir, jobs)
